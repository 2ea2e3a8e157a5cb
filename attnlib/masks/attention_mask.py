"""The per-call normalised mask: :class:`AttentionMask`, :data:`MaskLike`, :func:`normalize_mask`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from attnlib._validation import describe
from attnlib.masks._checks import as_block_pair
from attnlib.masks.block import BlockMask
from attnlib.masks.predicates import (
    MaskMod,
    and_mod,
    causal_mod,
    dense_mod,
    evaluate_rows,
    key_padding_mod,
)
from attnlib.masks.window import SlidingWindow

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

__all__ = ["AttentionMask", "MaskLike", "normalize_mask"]

MaskLike = Union[Tensor, SlidingWindow, BlockMask, "AttentionMask", None]


@dataclass
class AttentionMask:
    """Every constraint on one attention call, validated and normalised.

    Attributes:
        batch, heads, n, m: sizes of the call (B, H, N, M).
        causal: bottom-right aligned causal constraint.
        key_padding: (B, M) bool or None.
        full: (B|1, H|1, N, M) bool or None.
        window: SlidingWindow or None.
        block: BlockMask or None (its dense form has shape (B'|1, H'|1, N, M)).
        device: device of the call.

    Variants read :meth:`kinds` to check support and either honour each constraint natively
    or call :meth:`dense` to get the combined (B|1, H|1, N, M) bool mask.
    """

    batch: int
    heads: int
    n: int
    m: int
    device: torch.device
    causal: bool = False
    key_padding: Tensor | None = None
    full: Tensor | None = None
    window: SlidingWindow | None = None
    block: BlockMask | None = None
    _dense_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def kinds(self) -> list[str]:
        """Names of the constraints present: 'causal', 'key_padding', 'full_mask', 'window', 'block_mask'."""
        out = []
        if self.causal:
            out.append("causal")
        if self.key_padding is not None:
            out.append("key_padding")
        if self.full is not None:
            out.append("full_mask")
        if self.window is not None:
            out.append("window")
        if self.block is not None:
            out.append("block_mask")
        return out

    @property
    def is_empty(self) -> bool:
        """True when nothing constrains the call (every query may attend every key)."""
        return not self.kinds()

    def without(self, *kinds: str) -> AttentionMask:
        """A copy with the named constraints removed (for variants that honour them natively)."""
        names = {
            "causal": "causal",
            "key_padding": "key_padding",
            "full_mask": "full",
            "window": "window",
            "block_mask": "block",
        }
        changes: dict[str, Any] = {}
        for k in kinds:
            if k not in names:
                raise ValueError(f"unknown mask kind {k!r}; expected one of {sorted(names)}")
            changes[names[k]] = False if k == "causal" else None
        return replace(self, _dense_cache={}, **changes)

    def dense(self) -> Tensor | None:
        """The combined constraint as a bool tensor of shape (B|1, H|1, N, M), or None if empty.

        O(N·M) memory: for reference paths and variants that are O(N^2) anyway.
        """
        if "dense" not in self._dense_cache:
            self._dense_cache["dense"] = self.dense_rows(0, self.n)
        return self._dense_cache["dense"]

    def predicates(self, *, with_block: bool = True) -> list[MaskMod]:
        """One predicate per constraint present (:mod:`attnlib.masks.predicates`), in :meth:`kinds` order.

        The BlockMask's is its :meth:`BlockMask.element_mod`; ``with_block=False`` leaves it out.
        """
        mods: list[MaskMod] = []
        if self.causal:
            mods.append(causal_mod(self.n, self.m))
        if self.key_padding is not None:
            mods.append(key_padding_mod(self.key_padding))
        if self.full is not None:
            mods.append(dense_mod(self.full))
        if self.window is not None:
            mods.append(self.window.mask_mod(self.n, self.m))
        if self.block is not None and with_block:
            mods.append(self.block.element_mod())
        return mods

    def mask_mod(self) -> MaskMod | None:
        """The combined constraint as one FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``
        (the AND of :meth:`predicates`), or None when nothing constrains the call."""
        mods = self.predicates()
        return and_mod(*mods) if mods else None

    def dense_rows(self, start: int, end: int) -> Tensor | None:
        """Rows ``start:end`` of :meth:`dense`: bool (B|1, H|1, end - start, M) (a key-padding-only
        mask stays (B, 1, 1, M)), or None if empty.

        Evaluated from the predicates on the rows alone (a BlockMask from its tiles), so chunked
        paths (importance, local attention) stay O(chunk · M) in memory.
        """
        mods = self.predicates(with_block=False)
        out: Tensor | None = None
        if mods:
            out = evaluate_rows(
                and_mod(*mods), start, end, self.m, batch=self.batch, heads=self.heads, device=self.device
            )
        if self.block is not None:
            rows = self.block.dense_rows(start, end).to(self.device)
            out = rows if out is None else out & rows
        return out

    def to_flex(self) -> FlexBlockMask | None:
        """The combined constraint as a FlexAttention ``BlockMask`` (None when nothing constrains the call).

        A lone BlockMask converts with its own layout (:meth:`BlockMask.to_flex`); otherwise Flex
        builds the layout from :meth:`mask_mod`, per batch / head only where a constraint varies
        over them (key padding, or a full mask / BlockMask with B' > 1 / H' > 1).
        """
        kinds = self.kinds()
        if not kinds:
            return None
        if kinds == ["block_mask"]:
            assert self.block is not None
            return self.block.to_flex()
        from torch.nn.attention.flex_attention import create_block_mask

        per_b = self.key_padding is not None
        per_h = False
        for dense in (self.full, self.block):
            if dense is not None:
                per_b = per_b or dense.shape[0] > 1
                per_h = per_h or dense.shape[1] > 1
        return create_block_mask(
            self.mask_mod(),
            self.batch if per_b else None,
            self.heads if per_h else None,
            self.n,
            self.m,
            device=self.device,
        )

    def as_block_mask(self, block_size: int | tuple[int, int] = 128) -> BlockMask | None:
        """The combined constraint as one :class:`BlockMask` (None when nothing constrains the call).

        Causal and sliding-window parts are built from the block geometry (O(active blocks),
        cached per shape), key padding in O(B · active blocks), a full mask from its rows
        (O(N · M), like the mask itself); a BlockMask with another block size is re-tiled
        from its rows. The parts are ANDed block by block.
        """
        bq, bk = as_block_pair(block_size)
        n, m, dev = self.n, self.m, self.device
        parts: list[BlockMask] = []
        if self.block is not None:
            if self.block.block_size == (bq, bk):
                parts.append(self.block)
            else:
                rows = (self.block.dense_rows(s, min(n, s + bq)) for s in range(0, n, bq))
                parts.append(BlockMask._from_row_blocks(rows, block_size=(bq, bk), seq_lengths=(n, m)))
        if self.causal:
            parts.append(BlockMask._band(n, m, None, 0, (bq, bk), dev, shared=True))
        if self.window is not None:
            parts.append(BlockMask._band(n, m, self.window.left, self.window.right, (bq, bk), dev, shared=True))
        if self.key_padding is not None:
            parts.append(BlockMask.from_key_padding(self.key_padding, n, block_size=(bq, bk)))
        if self.full is not None:
            parts.append(BlockMask.from_dense(self.full, (bq, bk)))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out


def _and_blocks(a: BlockMask, b: BlockMask) -> BlockMask:
    """Intersection of two BlockMasks (re-blocked to ``a``'s block size when they differ)."""
    if a.block_size == b.block_size:
        return a & b
    return BlockMask.from_dense(a.to_dense() & b.to_dense(), a.block_size)


def normalize_mask(
    mask: MaskLike | list[MaskLike] | tuple[MaskLike, ...],
    *,
    causal: bool,
    batch: int,
    heads: int,
    n: int,
    m: int,
    device: torch.device,
) -> AttentionMask:
    """Validate ``mask`` for a call with sizes (B, H, N, M) and bundle it with ``causal``.

    ``mask`` may be None, a bool tensor of shape (B, M) (key padding) or (B|1, H|1, N, M)
    (full), a :class:`SlidingWindow`, a :class:`BlockMask`, an :class:`AttentionMask`, or a
    list/tuple of these (all constraints apply). Raises ValueError naming the expected and
    the given shape, dtype or device.
    """
    out = AttentionMask(batch=batch, heads=heads, n=n, m=m, device=device, causal=bool(causal))
    items: list[Any] = []
    stack: list[Any] = [mask]
    while stack:  # flatten nested lists / tuples
        it = stack.pop(0)
        if isinstance(it, (list, tuple)):
            stack = list(it) + stack
        else:
            items.append(it)
    for item in items:
        if item is None:
            continue
        if isinstance(item, AttentionMask):
            if (item.batch, item.n, item.m) != (batch, n, m):
                raise ValueError(
                    f"AttentionMask was built for (B, N, M) = {(item.batch, item.n, item.m)}, "
                    f"but the call has {(batch, n, m)}"
                )
            for k in item.kinds():
                _merge(out, k, item)
            continue
        if isinstance(item, SlidingWindow):
            out.window = item if out.window is None else out.window.intersect(item)
            continue
        if isinstance(item, BlockMask):
            bb, hh, bn, bm = item.shape
            if (bn, bm) != (n, m) or bb not in (1, batch) or hh not in (1, heads):
                raise ValueError(
                    f"BlockMask shape (B', H', N, M) = {(bb, hh, bn, bm)} does not match the call: "
                    f"expected B' in (1, {batch}), H' in (1, {heads}), N={n}, M={m}"
                )
            if item.device != device:
                raise ValueError(f"BlockMask is on {item.device} but the inputs are on {device}")
            out.block = item if out.block is None else _and_blocks(out.block, item)
            continue
        if not isinstance(item, Tensor):
            raise ValueError(
                "mask must be a bool tensor (B, M) or (B|1, H|1, N, M), a SlidingWindow, a "
                f"BlockMask, an AttentionMask or a list of these; got {describe(item)}"
            )
        if item.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor (True = may attend), got dtype {item.dtype}; "
                "convert an additive or 0/1 mask with `mask > 0` or `mask == 0` as appropriate"
            )
        if item.device != device:
            raise ValueError(f"mask is on {item.device} but the inputs are on {device}")
        if item.dim() == 2:
            if tuple(item.shape) != (batch, m):
                raise ValueError(f"a 2-D mask is key padding of shape (B, M) = ({batch}, {m}), got {tuple(item.shape)}")
            out.key_padding = item if out.key_padding is None else out.key_padding & item
        elif item.dim() == 4:
            b_, h_, n_, m_ = item.shape
            if b_ not in (1, batch) or h_ not in (1, heads) or (n_, m_) != (n, m):
                raise ValueError(
                    f"a 4-D mask must have shape (B|1, H|1, N, M) = ({batch}|1, {heads}|1, {n}, {m}), "
                    f"got {tuple(item.shape)}"
                )
            out.full = item if out.full is None else out.full & item
        else:
            raise ValueError(
                f"mask must be key padding (B, M) = ({batch}, {m}) or full (B|1, H|1, N, M) = "
                f"({batch}|1, {heads}|1, {n}, {m}); got a {item.dim()}-D tensor of shape "
                f"{tuple(item.shape)}"
            )
    return out


def _merge(out: AttentionMask, kind: str, src: AttentionMask) -> None:
    if kind == "causal":
        out.causal = True
    elif kind == "key_padding":
        kp = src.key_padding
        assert kp is not None
        out.key_padding = kp if out.key_padding is None else out.key_padding & kp
    elif kind == "full_mask":
        f = src.full
        assert f is not None
        out.full = f if out.full is None else out.full & f
    elif kind == "window":
        out.window = src.window
    elif kind == "block_mask":
        out.block = src.block
