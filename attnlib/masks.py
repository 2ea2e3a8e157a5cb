"""One mask vocabulary for every attention variant.

Convention everywhere in attnlib: masks are boolean and **True = may attend** (the SDPA
convention). The kinds of mask a caller can give:

* key padding: a bool tensor of shape (B, M) - key j of batch b is real (True) or padding;
* full: a bool tensor of shape (B|1, H|1, N, M);
* ``causal=True`` (a flag of the module / functional call, not a tensor);
* sliding window: :class:`SlidingWindow` (``left`` / ``right`` radius);
* :class:`BlockMask`: a block-sparse layout whose partial blocks keep their element-wise mask.

Causal and sliding-window masks with N != M are *bottom-right aligned* (the FlashAttention
convention): query row i sits at absolute position ``i + (M - N)``. So a decoder step with one
query and a cache of M keys sees all M keys under ``causal=True``.

Query rows that may attend to no key at all return zeros (never NaN) in every variant.

Everything a variant receives is normalised into one :class:`AttentionMask` by
:func:`normalize_mask`, which validates shapes, dtypes and devices and raises a
`ValueError` saying what was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

__all__ = [
    "AttentionMask",
    "BlockMask",
    "MaskLike",
    "SlidingWindow",
    "causal_mask",
    "normalize_mask",
    "sliding_window",
    "window_mask",
]

MaskModFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------
# dense helpers
# ----------------------------------------------------------------------------------------


def causal_mask(n: int, m: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right aligned causal mask.

    Returns a bool tensor of shape (N, M); entry (i, j) is True iff ``j <= i + (M - N)``.
    With N == M this is the usual lower triangle.
    """
    m = n if m is None else m
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


def window_mask(
    n: int,
    m: int | None = None,
    *,
    left: int | None,
    right: int | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sliding-window (banded) mask, bottom-right aligned.

    Returns a bool tensor of shape (N, M); entry (i, j) is True iff
    ``p - left <= j <= p + right`` where ``p = i + (M - N)``. ``None`` means unbounded.
    """
    m = n if m is None else m
    p = torch.arange(n, device=device)[:, None] + (m - n)
    j = torch.arange(m, device=device)[None, :]
    ok = torch.ones(n, m, dtype=torch.bool, device=device)
    if left is not None:
        ok &= j >= p - left
    if right is not None:
        ok &= j <= p + right
    return ok


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window mask: query position p may attend key j iff ``p - left <= j <= p + right``.

    ``None`` for a side means unbounded on that side. ``SlidingWindow(w, w)`` is the
    Longformer band |i - j| <= w; combine ``SlidingWindow(w - 1, 0)`` or ``causal=True``
    with ``SlidingWindow(w - 1, None)`` for a Mistral-style causal window of W = w keys.
    """

    left: int | None
    right: int | None

    def __post_init__(self) -> None:
        for side in ("left", "right"):
            val = getattr(self, side)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"SlidingWindow.{side} must be a non-negative int or None, got {val!r}")

    def dense(self, n: int, m: int, device: torch.device | str | None = None) -> Tensor:
        """The window as a dense bool tensor of shape (N, M)."""
        return window_mask(n, m, left=self.left, right=self.right, device=device)


def sliding_window(left: int | None, right: int | None = None) -> SlidingWindow:
    """Shorthand for :class:`SlidingWindow`; ``right`` defaults to ``left`` (symmetric band)."""
    return SlidingWindow(left, left if right is None else right)


# ----------------------------------------------------------------------------------------
# BlockMask
# ----------------------------------------------------------------------------------------


def _as_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    bq, bk = (int(b) for b in block_size)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return bq, bk


def _ordered(active: Tensor) -> tuple[Tensor, Tensor]:
    """(…, n_k) bool -> (count (…,) int32, indices (…, n_k) int32, active ids first, ascending)."""
    num = active.sum(-1, dtype=torch.int32)
    idx = torch.argsort(active.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


class BlockMask:
    """A block-sparse attention layout with exact element-wise masks on partial blocks.

    The layout follows FlexAttention's (and the spec's ``BlockSparseLayout``): for every
    (batch, head, query block) it lists the key blocks to visit, split into *full* blocks
    (every in-range pair allowed, no element mask needed) and *partial* blocks (some pairs
    allowed; their (bq, bk) element mask is stored in ``partial_tiles``). Attention under a
    BlockMask therefore equals attention under the dense mask it came from.

    Attributes (B', H' are 1 when the layout is shared across batch / heads):
        block_size: (bq, bk).
        seq_lengths: (N, M).
        kv_num_blocks: (B', H', n_q) int32 - number of partial key blocks per query block.
        kv_indices: (B', H', n_q, n_k) int32 - partial key-block ids first, ascending.
        full_kv_num_blocks: (B', H', n_q) int32 - number of full key blocks.
        full_kv_indices: (B', H', n_q, n_k) int32 - full key-block ids first, ascending.
        partial_tiles: (B', H', n_q, P, bq, bk) bool - element mask of the t-th partial block
            (t < kv_num_blocks), P = max number of partial blocks in any row (may be 0).
        mask_mod: optional FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``
            that the layout was built from (kept for :meth:`to_flex`).
    """

    def __init__(
        self,
        *,
        block_size: tuple[int, int],
        seq_lengths: tuple[int, int],
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        full_kv_num_blocks: Tensor,
        full_kv_indices: Tensor,
        partial_tiles: Tensor,
        mask_mod: MaskModFn | None = None,
    ) -> None:
        self.block_size = block_size
        self.seq_lengths = seq_lengths
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.partial_tiles = partial_tiles
        self.mask_mod = mask_mod

    # -- basic properties ------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B', H', N, M) of the dense mask this layout stands for."""
        b, h = self.kv_num_blocks.shape[:2]
        return (b, h, *self.seq_lengths)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(n_q, n_k): number of query and key blocks."""
        return self.kv_num_blocks.shape[-1], self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        """Device of the layout tensors."""
        return self.kv_num_blocks.device

    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are visited (partial or full)."""
        total = self.kv_indices.numel()
        active = int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())
        return active / total if total else 0.0

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy of the layout on ``device``."""
        return BlockMask(
            block_size=self.block_size,
            seq_lengths=self.seq_lengths,
            kv_num_blocks=self.kv_num_blocks.to(device),
            kv_indices=self.kv_indices.to(device),
            full_kv_num_blocks=self.full_kv_num_blocks.to(device),
            full_kv_indices=self.full_kv_indices.to(device),
            partial_tiles=self.partial_tiles.to(device),
            mask_mod=self.mask_mod,
        )

    def __repr__(self) -> str:
        b, h, n, m = self.shape
        return (
            f"BlockMask(shape=(B'={b}, H'={h}, N={n}, M={m}), block_size={self.block_size}, "
            f"density={self.density():.3f})"
        )

    # -- dense conversion ------------------------------------------------------------------

    def block_states(self) -> tuple[Tensor, Tensor]:
        """(partial, full) bool tensors of shape (B', H', n_q, n_k): which blocks are which."""
        _nq, nk = self.num_blocks
        ar = torch.arange(nk, device=self.device)
        partial = torch.zeros(self.kv_indices.shape, dtype=torch.bool, device=self.device)
        full = torch.zeros_like(partial)
        sel = ar < self.kv_num_blocks[..., None]
        partial.scatter_(-1, self.kv_indices.long(), sel)
        sel_f = ar < self.full_kv_num_blocks[..., None]
        full.scatter_(-1, self.full_kv_indices.long(), sel_f)
        return partial, full

    def to_dense(self) -> Tensor:
        """The element-wise mask, a bool tensor of shape (B', H', N, M)."""
        bq, bk = self.block_size
        n, m = self.seq_lengths
        nq, nk = self.num_blocks
        bp, hp = self.kv_num_blocks.shape[:2]
        _, full = self.block_states()
        tiles = full[..., None, None].expand(bp, hp, nq, nk, bq, bk).clone()
        p = self.partial_tiles.shape[3]
        if p:
            valid = torch.arange(p, device=self.device) < self.kv_num_blocks[..., None]
            idx = self.kv_indices[..., :p].long()
            bi, hi, qi, ti = torch.nonzero(valid, as_tuple=True)
            tiles[bi, hi, qi, idx[bi, hi, qi, ti]] = self.partial_tiles[bi, hi, qi, ti]
        dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(bp, hp, nq * bq, nk * bk)
        return dense[..., :n, :m].contiguous()

    @classmethod
    def _from_row_blocks(
        cls,
        rows: Iterator[Tensor],
        *,
        block_size: tuple[int, int],
        seq_lengths: tuple[int, int],
        mask_mod: MaskModFn | None = None,
    ) -> BlockMask:
        """Build from an iterator of (B', H', bq, M) bool row-blocks (the last may be short)."""
        bq, bk = block_size
        _n, m = seq_lengths
        nk = math.ceil(m / bk)
        kv_num, kv_idx, f_num, f_idx, tiles_list = [], [], [], [], []
        for row in rows:
            rows_here = row.shape[-2]
            row = torch.nn.functional.pad(row, (0, nk * bk - m, 0, bq - rows_here))
            bp, hp = row.shape[:2]
            t = row.view(bp, hp, bq, nk, bk).permute(0, 1, 3, 2, 4)  # (B', H', n_k, bq, bk)
            counts = t.sum((-1, -2))
            cols = torch.full((nk,), bk, device=row.device)
            cols[-1] = m - (nk - 1) * bk
            capacity = cols * rows_here
            full = counts == capacity
            partial = (counts > 0) & ~full
            pn, pi = _ordered(partial)
            fn, fi = _ordered(full)
            kv_num.append(pn)
            kv_idx.append(pi)
            f_num.append(fn)
            f_idx.append(fi)
            pmax = int(pn.max()) if pn.numel() else 0
            gathered = torch.gather(t, 2, pi[..., :pmax, None, None].long().expand(bp, hp, pmax, bq, bk))
            tiles_list.append(gathered)
        pmax = max(x.shape[2] for x in tiles_list)
        tiles = torch.stack(
            [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pmax - x.shape[2])) for x in tiles_list],
            dim=2,
        )
        return cls(
            block_size=block_size,
            seq_lengths=seq_lengths,
            kv_num_blocks=torch.stack(kv_num, -1),
            kv_indices=torch.stack(kv_idx, -2),
            full_kv_num_blocks=torch.stack(f_num, -1),
            full_kv_indices=torch.stack(f_idx, -2),
            partial_tiles=tiles,
            mask_mod=mask_mod,
        )

    @classmethod
    def from_dense(cls, mask: Tensor, block_size: int | tuple[int, int] = 128) -> BlockMask:
        """Layout of a dense bool mask of shape (N, M) or (B'|1, H'|1, N, M).

        Blocks whose in-range pairs are all allowed become *full*; blocks with some allowed
        pairs become *partial* and keep their element mask.
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"BlockMask.from_dense expects a bool tensor of shape (N, M) or (B, H, N, M), "
                f"got {type(mask).__name__}" + (f" of dtype {mask.dtype}" if isinstance(mask, Tensor) else "")
            )
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"BlockMask.from_dense expects shape (N, M) or (B, H, N, M), got {tuple(mask.shape)}")
        bq, bk = _as_pair(block_size)
        n, m = mask.shape[-2:]
        if n == 0 or m == 0:
            raise ValueError(f"BlockMask needs N > 0 and M > 0, got N={n}, M={m}")
        rows = (mask[..., s : s + bq, :] for s in range(0, n, bq))
        return cls._from_row_blocks(rows, block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskModFn,
        B: int | None,
        H: int | None,
        N: int,
        M: int,
        block_size: int | tuple[int, int] = 128,
        *,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Layout of a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

        ``mask_mod`` is evaluated on broadcast index tensors one query block at a time, so
        memory is O(B·H·bq·M), never N x M. ``B``/``H`` of None mean "shared" (1).
        """
        bq, bk = _as_pair(block_size)
        if N <= 0 or M <= 0:
            raise ValueError(f"BlockMask needs N > 0 and M > 0, got N={N}, M={M}")
        bb, hh = B or 1, H or 1
        b = torch.arange(bb, device=device)[:, None, None, None]
        h = torch.arange(hh, device=device)[None, :, None, None]
        kv = torch.arange(M, device=device)[None, None, None, :]

        def rows() -> Iterator[Tensor]:
            for s in range(0, N, bq):
                q = torch.arange(s, min(s + bq, N), device=device)[None, None, :, None]
                out = mask_mod(b, h, q, kv)
                yield torch.as_tensor(out, device=device).to(torch.bool).expand(bb, hh, q.shape[2], M)

        return cls._from_row_blocks(rows(), block_size=(bq, bk), seq_lengths=(N, M), mask_mod=mask_mod)

    # -- FlexAttention interop -------------------------------------------------------------

    @classmethod
    def from_flex(cls, flex_mask: FlexBlockMask) -> BlockMask:
        """Convert a ``torch.nn.attention.flex_attention.BlockMask`` (same layout, same mask).

        Partial-block element masks are obtained by evaluating the flex mask's ``mask_mod``
        on those blocks only.
        """
        bq, bk = _as_pair(tuple(flex_mask.BLOCK_SIZE))  # type: ignore[arg-type]
        n, m = flex_mask.seq_lengths
        kv_num = flex_mask.kv_num_blocks.to(torch.int32)
        kv_idx = flex_mask.kv_indices.to(torch.int32)
        nq, nk = math.ceil(n / bq), math.ceil(m / bk)
        kv_num, kv_idx = kv_num[..., :nq], kv_idx[..., :nq, :nk]
        if flex_mask.full_kv_num_blocks is not None:
            f_num = flex_mask.full_kv_num_blocks.to(torch.int32)[..., :nq]
            f_idx = flex_mask.full_kv_indices.to(torch.int32)[..., :nq, :nk]
        else:
            f_num = torch.zeros_like(kv_num)
            f_idx = torch.zeros_like(kv_idx)
        # re-sort so that listed ids come first in ascending order (Flex does the same)
        kv_num, kv_idx = _reorder(kv_num, kv_idx, nk)
        f_num, f_idx = _reorder(f_num, f_idx, nk)
        mm = flex_mask.mask_mod
        bp, hp = kv_num.shape[:2]
        pmax = int(kv_num.max()) if kv_num.numel() else 0
        dev = kv_num.device
        b = torch.arange(bp, device=dev)[:, None, None, None, None, None]
        h = torch.arange(hp, device=dev)[None, :, None, None, None, None]
        qi = torch.arange(nq, device=dev)[:, None, None, None] * bq + torch.arange(bq, device=dev)[None, None, :, None]
        blocks = kv_idx[..., :pmax].long()  # (B', H', n_q, P)
        ki = blocks[..., None, None] * bk + torch.arange(bk, device=dev)  # (B',H',nq,P,1,bk)
        ok = (qi < n) & (ki < m)
        tiles = torch.as_tensor(mm(b, h, qi.clamp(max=n - 1), ki.clamp(max=m - 1)), device=dev)
        tiles = tiles.to(torch.bool).expand(bp, hp, nq, pmax, bq, bk) & ok
        tiles = tiles & (torch.arange(pmax, device=dev) < kv_num[..., None])[..., None, None]
        return cls(
            block_size=(bq, bk),
            seq_lengths=(n, m),
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=f_num,
            full_kv_indices=f_idx,
            partial_tiles=tiles.contiguous(),
            mask_mod=mm,
        )

    def to_flex(self) -> FlexBlockMask:
        """The same layout as a FlexAttention ``BlockMask`` (so the mask runs on Flex too).

        Uses the original ``mask_mod`` when the layout came from one; otherwise a mask_mod
        that looks the element mask up in the dense form (O(N·M) bools, built once).
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        mm = self.mask_mod
        if mm is None:
            dense = self.to_dense()
            bp, hp = dense.shape[:2]

            def mm(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                return dense[b if bp > 1 else b * 0, h if hp > 1 else h * 0, q, kv]

        return FlexBlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=mm,
            seq_lengths=self.seq_lengths,
        )


def _reorder(num: Tensor, idx: Tensor, nk: int) -> tuple[Tensor, Tensor]:
    """Normalise a (num, indices) list so listed ids come first in ascending order."""
    ar = torch.arange(idx.shape[-1], device=idx.device)
    active = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool, device=idx.device)
    active.scatter_(-1, idx.long().clamp(max=nk - 1), ar < num[..., None])
    return _ordered(active)


# ----------------------------------------------------------------------------------------
# the per-call normalised mask
# ----------------------------------------------------------------------------------------

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

    def dense_rows(self, start: int, end: int) -> Tensor | None:
        """Rows ``start:end`` of :meth:`dense`: bool (B|1, H|1, end - start, M), or None if empty.

        Causal, window and key-padding rows are built directly, so chunked paths (importance,
        local attention) stay O(chunk · M) in memory.
        """
        out: Tensor | None = None

        def _and(a: Tensor | None, b: Tensor) -> Tensor:
            return b if a is None else a & b

        if self.causal or self.window is not None:
            p = torch.arange(start, end, device=self.device)[:, None] + (self.m - self.n)
            j = torch.arange(self.m, device=self.device)[None, :]
            if self.causal:
                out = _and(out, (j <= p)[None, None])
            if self.window is not None:
                if self.window.left is not None:
                    out = _and(out, (j >= p - self.window.left)[None, None])
                if self.window.right is not None:
                    out = _and(out, (j <= p + self.window.right)[None, None])
        if self.key_padding is not None:
            out = _and(out, self.key_padding[:, None, None, :])
        if self.full is not None:
            out = _and(out, self.full[..., start:end, :])
        if self.block is not None:
            if "block" not in self._dense_cache:
                self._dense_cache["block"] = self.block.to_dense().to(self.device)
            out = _and(out, self._dense_cache["block"][..., start:end, :])
        return out

    def empty_rows(self) -> Tensor | None:
        """Query rows with no allowed key: bool (B|1, H|1, N), or None when there can be none."""
        if self.is_empty:
            return None
        if self.kinds() == ["causal"] and self.n <= self.m:
            return None
        d = self.dense()
        assert d is not None
        rows = ~d.any(-1)
        return rows if bool(rows.any()) else None


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return type(x).__name__


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
            if out.window is not None:
                raise ValueError("more than one SlidingWindow given; combine them into one")
            out.window = item
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
            if out.block is not None:
                raise ValueError("more than one BlockMask given; combine them into one")
            out.block = item
            continue
        if not isinstance(item, Tensor):
            raise ValueError(
                "mask must be a bool tensor (B, M) or (B|1, H|1, N, M), a SlidingWindow, a "
                f"BlockMask, an AttentionMask or a list of these; got {_describe(item)}"
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
