"""The per-call normalised mask: :class:`AttentionMask`, :data:`MaskLike`, :func:`normalize_mask`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from attnlib._validation import describe, positive_int_pair
from attnlib.masks.block import BlockMask
from attnlib.masks.padding import KeyPadding, prefix_lengths
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

MaskLike = Union[Tensor, SlidingWindow, KeyPadding, BlockMask, "AttentionMask", None]


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

    def key_lengths(self) -> Tensor | None:
        """The key padding as per-example lengths (B,) when it is right padding, else None.

        None also when there is no key padding. See :func:`attnlib.masks.padding.prefix_lengths`
        (one host synchronisation per padding tensor, remembered while the tensor is unchanged).
        """
        return None if self.key_padding is None else prefix_lengths(self.key_padding)

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
        bq, bk = positive_int_pair(block_size, "AttentionMask.as_block_mask: block_size", hint=" (bq, bk)")
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


def _flatten(mask: Any) -> list[Any]:
    """The items of a (nested) list / tuple of masks, in order."""
    if not isinstance(mask, (list, tuple)):
        return [mask]
    return [item for it in mask for item in _flatten(it)]


def normalize_mask(
    mask: MaskLike | list[MaskLike] | tuple[MaskLike, ...],
    *,
    causal: bool,
    batch: int,
    heads: int,
    n: int,
    m: int,
    device: torch.device,
    key_padding_mask: Tensor | None = None,
) -> AttentionMask:
    """Validate ``mask`` for a call with sizes (B, H, N, M) and bundle it with ``causal``.

    ``mask`` may be None, a bool tensor, a :class:`SlidingWindow`, a :class:`KeyPadding`, a
    :class:`BlockMask`, an :class:`AttentionMask`, or a (nested) list / tuple of these: their
    AND, in any order. A plain tensor broadcasts to (B, H, N, M) as in SDPA: (N, M), (1, N, M)
    or (B|1, H|1, N, M), where N and M may also be 1 (broadcast); a 3-D tensor with a leading
    size > 1 is refused as ambiguous. Key padding (B, M) is ``key_padding_mask`` or a
    :class:`KeyPadding` item, never a plain tensor. Raises ValueError naming the argument, the
    expected and the given shape, dtype or device.
    """
    out = AttentionMask(batch=batch, heads=heads, n=n, m=m, device=device, causal=bool(causal))
    for item in _flatten(mask):
        _add(out, item)
    if key_padding_mask is not None:
        _add_key_padding(out, key_padding_mask, "key_padding_mask")
    return out


def _add(out: AttentionMask, item: Any) -> None:
    """AND one mask item into ``out`` (validated against its sizes)."""
    if item is None:
        return
    if isinstance(item, AttentionMask):
        if (item.batch, item.n, item.m) != (out.batch, out.n, out.m):
            raise ValueError(
                f"mask: an AttentionMask built for (B, N, M) = {(item.batch, item.n, item.m)} was given "
                f"to a call with {(out.batch, out.n, out.m)}"
            )
        out.causal = out.causal or item.causal
        for part in (item.full, item.window, item.block):
            _add(out, part)
        if item.key_padding is not None:
            _add_key_padding(out, item.key_padding, "mask (an AttentionMask's key_padding)")
    elif isinstance(item, SlidingWindow):
        out.window = item if out.window is None else out.window.intersect(item)
    elif isinstance(item, KeyPadding):
        _add_key_padding(out, item.valid, "KeyPadding.valid")
    elif isinstance(item, BlockMask):
        bb, hh, bn, bm = item.shape
        if (bn, bm) != (out.n, out.m) or bb not in (1, out.batch) or hh not in (1, out.heads):
            raise ValueError(
                f"mask: BlockMask shape (B', H', N, M) = {(bb, hh, bn, bm)} does not match the call: "
                f"expected B' in (1, {out.batch}), H' in (1, {out.heads}), N={out.n}, M={out.m}"
            )
        if item.device != out.device:
            raise ValueError(f"mask: BlockMask is on {item.device} but the inputs are on {out.device}")
        out.block = item if out.block is None else _and_blocks(out.block, item)
    elif isinstance(item, Tensor):
        _add_tensor(out, item)
    else:
        raise ValueError(
            f"mask must be a bool tensor ({_tensor_readings(out)}), a SlidingWindow, a KeyPadding, "
            f"a BlockMask, an AttentionMask or a list of these; got {describe(item)}"
        )


def _tensor_readings(out: AttentionMask) -> str:
    b, h, n, m = out.batch, out.heads, out.n, out.m
    return f"(N, M) = ({n}, {m}), (1, N, M) or (B|1, H|1, N, M) = ({b}|1, {h}|1, {n}, {m}), broadcast as in SDPA"


def _check_bool_on(out: AttentionMask, t: Tensor, what: str, meaning: str = "True = may attend") -> None:
    if t.dtype != torch.bool:
        raise ValueError(
            f"{what} must be a bool tensor ({meaning}), got dtype {t.dtype}; "
            f"convert an additive or 0/1 mask with `{what} > 0` or `{what} == 0` as appropriate"
        )
    if t.device != out.device:
        raise ValueError(f"{what} is on {t.device} but the inputs are on {out.device}")


def _add_key_padding(out: AttentionMask, kp: object, what: str) -> None:
    """AND key padding (B, M) into ``out``."""
    if not isinstance(kp, Tensor):
        raise ValueError(
            f"{what} must be a bool tensor (B, M) = ({out.batch}, {out.m}) (True = real key), got {describe(kp)}"
        )
    _check_bool_on(out, kp, what, "True = real key")
    if tuple(kp.shape) != (out.batch, out.m):
        raise ValueError(
            f"{what} is key padding of shape (B, M) = ({out.batch}, {out.m}) (True = real key), "
            f"got shape {tuple(kp.shape)}"
        )
    out.key_padding = kp if out.key_padding is None else out.key_padding & kp


def _add_tensor(out: AttentionMask, t: Tensor) -> None:
    """AND a plain tensor mask, read with SDPA's broadcasting to (B, H, N, M), into ``out``."""
    _check_bool_on(out, t, "mask")

    b, h, n, m = out.batch, out.heads, out.n, out.m
    shape = tuple(t.shape)
    padding_hint = (
        f"key padding (B, M) = ({b}, {m}) is not a plain tensor mask: pass it as "
        "key_padding_mask= or as masks.KeyPadding(valid) in the mask list"
    )
    if t.dim() == 2 and not (shape[0] in (1, n) and shape[1] in (1, m)):
        raise ValueError(
            f"mask: a 2-D mask is read as (N, M) = ({n}, {m}), as in SDPA, and {padding_hint}; "
            f"got shape {shape}, which fits {'the key-padding reading only' if shape == (b, m) else 'neither'}"
        )
    if t.dim() == 3 and shape[0] != 1:
        raise ValueError(
            f"mask: a 3-D mask must be (1, N, M) = (1, {n}, {m}); got shape {shape}, whose leading size "
            f"{shape[0]} is ambiguous (SDPA reads (H, N, M), nn.MultiheadAttention (B·H, N, M), others "
            f"(B, N, M)): give it 4 dims, (B, 1, N, M) per example or (1, H, N, M) per head"
        )
    if t.dim() not in (2, 3, 4):
        raise ValueError(
            f"mask: expected a bool tensor {_tensor_readings(out)}; got a {t.dim()}-D tensor of shape {shape}"
        )
    t4 = t.reshape((1,) * (4 - t.dim()) + shape)
    if any(have not in (1, want) for have, want in zip(t4.shape, (b, h, n, m))):
        raise ValueError(
            f"mask: expected a bool tensor {_tensor_readings(out)} (a size-1 N or M broadcasts too; "
            f"{padding_hint}); got shape {shape}"
        )
    bb, hh, nn_, mm = t4.shape
    if hh == 1 and nn_ == 1 and mm == m:  # (B|1, 1, 1, M): key padding
        _add_key_padding(out, t4[:, 0, 0, :].expand(b, m), "mask")
        return
    full = t4.expand(bb, hh, n, m)
    out.full = full if out.full is None else out.full & full
