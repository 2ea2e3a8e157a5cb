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

import functools
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
    "grat_permutation",
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

    def intersect(self, other: SlidingWindow) -> SlidingWindow:
        """The window allowed by both (the smaller radius on each side)."""

        def side(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return SlidingWindow(side(self.left, other.left), side(self.right, other.right))

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


def _listed(num: Tensor, idx: Tensor) -> Tensor:
    """(count (…,), indices (…, n_k)) -> (…, n_k) bool of the listed ids (unlisted entries are don't-care)."""
    nk = idx.shape[-1]
    valid = torch.arange(nk, device=idx.device) < num[..., None]
    target = torch.where(valid, idx.long(), nk)
    out = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, target, valid)
    return out[..., :nk].contiguous()


def _check_nm(n: object, m: object, where: str) -> tuple[int, int]:
    for name, val in (("N", n), ("M", m)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {val!r}")
    return n, m  # type: ignore[return-value]


def _nonneg(name: str, val: object, where: str, *, allow_none: bool = False) -> int | None:
    if val is None and allow_none:
        return None
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
        raise ValueError(f"{where}: {name} must be a non-negative int, got {val!r}")
    return val


def _spans(
    n: int, m: int, bq: int, bk: int, device: torch.device | str | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query block: first/last *position* (i + M - N), shape (n_q, 1); per key block: first/last key, (1, n_k)."""
    nq, nk = math.ceil(n / bq), math.ceil(m / bk)
    qlo = torch.arange(nq, device=device) * bq
    qhi = (qlo + bq).clamp(max=n) - 1
    klo = torch.arange(nk, device=device) * bk
    khi = (klo + bk).clamp(max=m) - 1
    off = m - n
    return (qlo + off)[:, None], (qhi + off)[:, None], klo[None, :], khi[None, :]


def grat_permutation(
    grid: int | tuple[int, ...], group: int | tuple[int, ...], *, device: torch.device | str | None = None
) -> Tensor:
    """Token order that makes GRAT groups contiguous (raster order -> group-major order).

    Args:
        grid: token grid (T,), (H, W) or (T, H, W) in raster order (last axis fastest).
        group: group shape, same rank as ``grid``. Groups at a ragged edge are smaller.

    Returns:
        perm (prod(grid),) int64 such that ``x[..., perm, :]`` lists the tokens group by group
        (groups in raster order of the group grid, tokens in raster order inside a group).
        Undo with ``inv = torch.argsort(perm)``.
    """
    grid_t, group_t = _grid_pair(grid, group)
    coords = _unravel(torch.arange(math.prod(grid_t), device=device), grid_t)
    ng = tuple(math.ceil(g / s) for g, s in zip(grid_t, group_t))
    gid = _ravel([c // s for c, s in zip(coords, group_t)], ng)
    within = _ravel([c % s for c, s in zip(coords, group_t)], group_t)
    return torch.argsort(gid * math.prod(group_t) + within, stable=True)


def _grid_pair(grid: int | tuple[int, ...], group: int | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    g = (grid,) if isinstance(grid, int) else tuple(grid)
    s = (group,) if isinstance(group, int) else tuple(group)
    if not 1 <= len(g) <= 3 or len(s) != len(g):
        raise ValueError(f"GRAT: grid and group must be 1-3 ints of the same rank, got grid={grid!r}, group={group!r}")
    for name, vals in (("grid", g), ("group", s)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in vals):
            raise ValueError(f"GRAT: {name} entries must be positive ints, got {vals!r}")
    return g, s


def _unravel(idx: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    out = []
    for size in reversed(shape):
        out.append(idx % size)
        idx = idx // size
    return out[::-1]


def _ravel(coords: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    out = torch.zeros_like(coords[0])
    for c, size in zip(coords, shape):
        out = out * size + c
    return out


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
        # derived structures (transposed LUT, kernel plans), computed once per layout
        self._cache: dict[str, Any] = {}

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

    def all_full(self) -> bool:
        """True when every (query block, key block) pair is a full block: the layout allows every
        pair (dense attention). Cached (one device sync per layout)."""
        if "all_full" not in self._cache:
            n_k = self.num_blocks[1]
            ok = bool((self.kv_num_blocks == 0).all()) and bool((self.full_kv_num_blocks == n_k).all())
            self._cache["all_full"] = ok
        return bool(self._cache["all_full"])

    def block_states(self) -> tuple[Tensor, Tensor]:
        """(partial, full) bool tensors of shape (B', H', n_q, n_k): which blocks are which."""
        if "states" not in self._cache:
            self._cache["states"] = (
                _listed(self.kv_num_blocks, self.kv_indices),
                _listed(self.full_kv_num_blocks, self.full_kv_indices),
            )
        partial, full = self._cache["states"]
        return partial.clone(), full.clone()

    def tile_slots(self) -> Tensor:
        """(B', H', n_q, n_k) int64: slot t of each partial block in ``partial_tiles[b, h, I]`` (-1 if not partial)."""
        if "slots" not in self._cache:
            nk = self.kv_indices.shape[-1]
            p = self.partial_tiles.shape[3]
            ar = torch.arange(p, device=self.device)
            valid = ar < self.kv_num_blocks[..., None]
            target = torch.where(valid, self.kv_indices[..., :p].long(), nk)
            out = torch.full((*self.kv_indices.shape[:-1], nk + 1), -1, dtype=torch.long, device=self.device)
            out.scatter_(-1, target, ar.expand_as(target).contiguous())
            self._cache["slots"] = out[..., :nk].contiguous()
        return self._cache["slots"]

    def dense_rows(self, start: int, end: int) -> Tensor:
        """Rows ``start:end`` of :meth:`to_dense`: bool (B', H', end - start, M).

        Only the query blocks overlapping the range are expanded, so memory is
        O((end - start + bq) · M), never N x M.
        """
        n, m = self.seq_lengths
        if not 0 <= start <= end <= n:
            raise ValueError(f"BlockMask.dense_rows: need 0 <= start <= end <= N={n}, got start={start}, end={end}")
        bq, bk = self.block_size
        bp, hp = self.kv_num_blocks.shape[:2]
        i0, i1 = start // bq, max(start // bq, -(-end // bq))
        _, full = self.block_states()
        rows = i1 - i0
        nk = self.num_blocks[1]
        tiles = full[:, :, i0:i1, :, None, None].expand(bp, hp, rows, nk, bq, bk).clone()
        slots = self.tile_slots()[:, :, i0:i1]
        b, h, i, j = torch.nonzero(slots >= 0, as_tuple=True)
        if b.numel():
            tiles[b, h, i, j] = self.partial_tiles[b, h, i + i0, slots[b, h, i, j]]
        dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(bp, hp, rows * bq, nk * bk)
        return dense[..., start - i0 * bq : end - i0 * bq, :m]

    def to_dense(self) -> Tensor:
        """The element-wise mask, a bool tensor of shape (B', H', N, M)."""
        return self.dense_rows(0, self.seq_lengths[0]).contiguous()

    # -- transposed layout (for the dK/dV pass of block-sparse kernels) ---------------------

    def _transposed(self) -> dict[str, Tensor]:
        if "transposed" not in self._cache:
            partial, full = self.block_states()
            slots = self.tile_slots()
            qn, qi = _ordered(partial.transpose(-1, -2))
            qs = slots.transpose(-1, -2).gather(-1, qi.long()).clamp_min(0).to(torch.int32)
            fqn, fqi = _ordered(full.transpose(-1, -2))
            self._cache["transposed"] = {
                "q_num_blocks": qn.contiguous(),
                "q_indices": qi.contiguous(),
                "q_tile_slots": qs.contiguous(),
                "full_q_num_blocks": fqn.contiguous(),
                "full_q_indices": fqi.contiguous(),
            }
        return self._cache["transposed"]

    @property
    def q_num_blocks(self) -> Tensor:
        """(B', H', n_k) int32: number of query blocks that visit key block J as a *partial* block."""
        return self._transposed()["q_num_blocks"]

    @property
    def q_indices(self) -> Tensor:
        """(B', H', n_k, n_q) int32: those query-block ids first, ascending (the transposed LUT)."""
        return self._transposed()["q_indices"]

    @property
    def q_tile_slots(self) -> Tensor:
        """(B', H', n_k, n_q) int32: for the t-th entry I of ``q_indices[b, h, J]``, the slot of
        block (I, J) in ``partial_tiles[b, h, I]`` (its element mask)."""
        return self._transposed()["q_tile_slots"]

    @property
    def full_q_num_blocks(self) -> Tensor:
        """(B', H', n_k) int32: number of query blocks that visit key block J as a *full* block."""
        return self._transposed()["full_q_num_blocks"]

    @property
    def full_q_indices(self) -> Tensor:
        """(B', H', n_k, n_q) int32: those query-block ids first, ascending."""
        return self._transposed()["full_q_indices"]

    # -- block-level algebra ----------------------------------------------------------------

    def _in_range(self, i: Tensor, j: Tensor) -> Tensor:
        """(K, bq, bk) bool: which pairs of blocks (i[K], j[K]) lie inside (N, M)."""
        bq, bk = self.block_size
        n, m = self.seq_lengths
        r = torch.arange(bq, device=i.device)
        c = torch.arange(bk, device=i.device)
        return ((i[:, None, None] * bq + r[None, :, None]) < n) & ((j[:, None, None] * bk + c[None, None, :]) < m)

    def _tiles_at(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """Element masks (K, bq, bk) of blocks (b, h, i, j) (indices into the broadcast layout)."""
        bp, hp = self.kv_num_blocks.shape[:2]
        b = b if bp > 1 else torch.zeros_like(b)
        h = h if hp > 1 else torch.zeros_like(h)
        _, full = self.block_states()
        out = full[b, h, i, j][:, None, None] & self._in_range(i, j)
        s = self.tile_slots()[b, h, i, j]
        sel = s >= 0
        if bool(sel.any()):
            out[sel] = self.partial_tiles[b[sel], h[sel], i[sel], s[sel]]
        return out

    def restrict(self, active: Tensor) -> BlockMask:
        """Keep only the blocks where ``active`` is True (a block-level filter).

        ``active``: bool, broadcastable to (B'', H'', n_q, n_k), e.g. a top-k selection of
        learned block scores. Kept partial blocks keep their element mask, so the result
        equals this mask AND the block selection. Its (B', H') is the broadcast of both.
        """
        nq, nk = self.num_blocks
        if not isinstance(active, Tensor) or active.dtype != torch.bool:
            raise ValueError(
                f"BlockMask.restrict expects a bool tensor (…, n_q={nq}, n_k={nk}), got {_describe(active)}"
            )
        if active.dim() == 2:
            active = active[None, None]
        if active.dim() != 4 or tuple(active.shape[-2:]) != (nq, nk):
            raise ValueError(
                f"BlockMask.restrict expects shape (n_q, n_k) or (B, H, n_q, n_k) with (n_q, n_k) = {(nq, nk)}, "
                f"got {tuple(active.shape)}"
            )
        partial, full = self.block_states()
        shape = torch.broadcast_shapes(partial.shape, active.shape)
        active = active.to(self.device)
        p_new = partial.expand(shape) & active
        f_new = full.expand(shape) & active
        b, h, i, j = torch.nonzero(p_new, as_tuple=True)
        tiles = self._tiles_at(b, h, i, j)
        mm = self.mask_mod
        new_mm: MaskModFn | None = None
        if mm is not None:
            bq, bk = self.block_size
            act = active
            ab, ah = act.shape[:2]

            def new_mm(bb: Tensor, hh: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                sel = act[bb if ab > 1 else bb * 0, hh if ah > 1 else hh * 0, q // bq, kv // bk]
                return mm(bb, hh, q, kv) & sel

        return BlockMask._from_states(
            p_new, f_new, tiles, block_size=self.block_size, seq_lengths=self.seq_lengths, mask_mod=new_mm
        )

    def _combine(self, other: BlockMask, op: str) -> BlockMask:
        if not isinstance(other, BlockMask):
            return NotImplemented
        if other.block_size != self.block_size or other.seq_lengths != self.seq_lengths:
            raise ValueError(
                f"cannot combine BlockMasks with different layouts: block_size {self.block_size} vs "
                f"{other.block_size}, seq_lengths {self.seq_lengths} vs {other.seq_lengths}"
            )
        if other.device != self.device:
            raise ValueError(f"cannot combine BlockMasks on {self.device} and {other.device}")
        pa, fa = self.block_states()
        pb, fb = other.block_states()
        shape = torch.broadcast_shapes(pa.shape, pb.shape)
        pa, fa, pb, fb = (t.expand(shape) for t in (pa, fa, pb, fb))
        if op == "and":
            full = fa & fb
            mixed = (pa & (pb | fb)) | (fa & pb)
        else:
            full = fa | fb
            mixed = (pa | pb) & ~full
        b, h, i, j = torch.nonzero(mixed, as_tuple=True)
        ta, tb = self._tiles_at(b, h, i, j), other._tiles_at(b, h, i, j)
        tiles = ta & tb if op == "and" else ta | tb
        cnt = tiles.sum((1, 2))
        cap = self._in_range(i, j).sum((1, 2))
        is_full = cnt == cap
        is_part = (cnt > 0) & ~is_full
        full = full.clone()
        full[b[is_full], h[is_full], i[is_full], j[is_full]] = True
        partial = torch.zeros(shape, dtype=torch.bool, device=self.device)
        partial[b[is_part], h[is_part], i[is_part], j[is_part]] = True
        ma, mb = self.mask_mod, other.mask_mod
        mm: MaskModFn | None = None
        if ma is not None and mb is not None:
            if op == "and":

                def mm(bb: Tensor, hh: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                    return ma(bb, hh, q, kv) & mb(bb, hh, q, kv)

            else:

                def mm(bb: Tensor, hh: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                    return ma(bb, hh, q, kv) | mb(bb, hh, q, kv)

        return BlockMask._from_states(
            partial, full, tiles[is_part], block_size=self.block_size, seq_lengths=self.seq_lengths, mask_mod=mm
        )

    def __and__(self, other: BlockMask) -> BlockMask:
        """Intersection: pairs allowed by both masks (same block size and sequence lengths)."""
        return self._combine(other, "and")

    def __or__(self, other: BlockMask) -> BlockMask:
        """Union: pairs allowed by either mask, e.g. ``sliding_window(...) | global_tokens(...)``."""
        return self._combine(other, "or")

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

    # -- generic builders -----------------------------------------------------------------

    @classmethod
    def _from_states(
        cls,
        partial: Tensor,
        full: Tensor,
        tiles: Tensor,
        *,
        block_size: tuple[int, int],
        seq_lengths: tuple[int, int],
        mask_mod: MaskModFn | None = None,
    ) -> BlockMask:
        """Assemble a layout from block states (B', H', n_q, n_k) (disjoint) and the element
        masks ``tiles`` (P_total, bq, bk) of the partial blocks in row-major order."""
        bq, bk = block_size
        kv_num, kv_idx = _ordered(partial)
        f_num, f_idx = _ordered(full)
        bp, hp, nq, _ = partial.shape
        pmax = int(kv_num.max()) if kv_num.numel() else 0
        pt = torch.zeros(bp, hp, nq, pmax, bq, bk, dtype=torch.bool, device=partial.device)
        if pmax:
            rank = partial.to(torch.int64).cumsum(-1) - 1
            b, h, i, j = torch.nonzero(partial, as_tuple=True)
            pt[b, h, i, rank[b, h, i, j]] = tiles
        return cls(
            block_size=(bq, bk),
            seq_lengths=seq_lengths,
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=f_num,
            full_kv_indices=f_idx,
            partial_tiles=pt,
            mask_mod=mask_mod,
        )

    @classmethod
    def _from_rule(
        cls,
        mask_mod: MaskModFn,
        maybe: Tensor,
        sure_full: Tensor | None,
        *,
        block_size: tuple[int, int],
        seq_lengths: tuple[int, int],
        chunk_elems: int = 1 << 22,
    ) -> BlockMask:
        """Layout of ``mask_mod`` when the caller knows which blocks can hold allowed pairs.

        ``maybe`` (B', H', n_q, n_k) bool: a superset of the active blocks; ``sure_full``: blocks
        known to be full (not evaluated). ``mask_mod`` is evaluated on the other candidate
        tiles only, so building costs O(candidate blocks · bq · bk), not O(N · M).
        """
        bq, bk = block_size
        n, m = seq_lengths
        dev = maybe.device
        full = torch.zeros_like(maybe) if sure_full is None else sure_full.expand_as(maybe).clone()
        b, h, i, j = torch.nonzero(maybe & ~full, as_tuple=True)
        r = torch.arange(bq, device=dev)[None, :, None]
        c = torch.arange(bk, device=dev)[None, None, :]
        step = max(1, chunk_elems // (bq * bk))
        kf, kp, tiles = [], [], []
        for s in range(0, b.numel(), step):
            sl = slice(s, s + step)
            qi = i[sl, None, None] * bq + r
            kv = j[sl, None, None] * bk + c
            ok = (qi < n) & (kv < m)
            val = mask_mod(b[sl, None, None], h[sl, None, None], qi.clamp(max=n - 1), kv.clamp(max=m - 1))
            val = torch.as_tensor(val, device=dev).to(torch.bool).expand(ok.shape) & ok
            cnt = val.sum((1, 2))
            is_full = cnt == ok.sum((1, 2))
            is_part = (cnt > 0) & ~is_full
            kf.append(is_full)
            kp.append(is_part)
            tiles.append(val[is_part])
        partial = torch.zeros_like(maybe)
        if kf:
            f_sel, p_sel = torch.cat(kf), torch.cat(kp)
            full[b[f_sel], h[f_sel], i[f_sel], j[f_sel]] = True
            partial[b[p_sel], h[p_sel], i[p_sel], j[p_sel]] = True
            tile_t = torch.cat(tiles)
        else:
            tile_t = torch.zeros(0, bq, bk, dtype=torch.bool, device=dev)
        return cls._from_states(
            partial, full, tile_t, block_size=block_size, seq_lengths=seq_lengths, mask_mod=mask_mod
        )

    # -- patterns -------------------------------------------------------------------------

    @classmethod
    def causal(
        cls,
        N: int,
        M: int | None = None,
        *,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Causal layout, bottom-right aligned: query i may attend keys j <= i + (M - N).

        Blocks strictly below the diagonal are full, diagonal blocks partial. Built in
        O(active blocks), never O(N · M).
        """
        n, m = _check_nm(N, N if M is None else M, "BlockMask.causal")
        bq, bk = _as_pair(block_size)
        plo, phi, klo, khi = _spans(n, m, bq, bk, device)
        off = m - n

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return kv <= q + off

        return cls._from_rule(
            mask_mod, (klo <= phi)[None, None], (khi <= plo)[None, None], block_size=(bq, bk), seq_lengths=(n, m)
        )

    @classmethod
    def sliding_window(
        cls,
        N: int,
        left: int | None,
        right: int | None = None,
        *,
        M: int | None = None,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Sliding-window layout: query position p = i + (M - N) may attend keys
        ``p - left <= j <= p + right`` (the :class:`SlidingWindow` rule).

        ``right`` defaults to ``left`` (the band |i - j| <= left); ``causal=True`` sets
        ``right = 0`` (keys p - left .. p). ``None`` means unbounded on that side.
        Built in O(active blocks).
        """
        where = "BlockMask.sliding_window"
        n, m = _check_nm(N, N if M is None else M, where)
        lo = _nonneg("left", left, where, allow_none=True)
        hi = lo if right is None and not causal else _nonneg("right", right, where, allow_none=True)
        if causal:
            hi = 0
        return cls._window(n, m, lo, hi, _as_pair(block_size), device)

    @classmethod
    def _window(
        cls,
        n: int,
        m: int,
        lo: int | None,
        hi: int | None,
        block_size: tuple[int, int],
        device: torch.device | str | None,
    ) -> BlockMask:
        """Keys ``p - lo <= j <= p + hi`` (None = unbounded) for position p = i + m - n."""
        bq, bk = block_size
        plo, phi, klo, khi = _spans(n, m, bq, bk, device)
        off = m - n
        sure = torch.ones_like(klo <= phi)
        maybe = torch.ones_like(sure)
        if lo is not None:
            sure = sure & (klo >= phi - lo)
            maybe = maybe & (khi >= plo - lo)
        if hi is not None:
            sure = sure & (khi <= plo + hi)
            maybe = maybe & (klo <= phi + hi)

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            ok = kv >= 0
            if lo is not None:
                ok = ok & (kv >= q + off - lo)
            if hi is not None:
                ok = ok & (kv <= q + off + hi)
            return ok

        return cls._from_rule(mask_mod, maybe[None, None], sure[None, None], block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def _block_rule(
        cls,
        rule: Callable[[Tensor], Tensor],
        n: int,
        m: int,
        causal: bool,
        block_size: int | tuple[int, int],
        device: torch.device | str | None,
    ) -> BlockMask:
        """Layout of a rule on the block distance d = pb(i) - J, where pb(i) = (i + M - N) // bk
        is the key block holding query i's position (plus token-level causality if asked)."""
        bq, bk = _as_pair(block_size)
        off = m - n
        plo, phi, _, _ = _spans(n, m, bq, bk, device)
        nk = math.ceil(m / bk)
        kb = torch.arange(nk, device=device)[None, :]
        pb_lo, pb_hi = torch.div(plo, bk, rounding_mode="floor"), torch.div(phi, bk, rounding_mode="floor")
        maybe = torch.zeros(plo.shape[0], nk, dtype=torch.bool, device=device)
        for t in range(int((pb_hi - pb_lo).max()) + 1):
            pb = pb_lo + t
            maybe |= rule(pb - kb) & (pb <= pb_hi)
        if causal:
            maybe &= kb * bk <= phi

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            d = torch.div(q + off, bk, rounding_mode="floor") - torch.div(kv, bk, rounding_mode="floor")
            ok = rule(d)
            if causal:
                ok = ok & (kv <= q + off)
            return ok

        return cls._from_rule(mask_mod, maybe[None, None], None, block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def dilated(
        cls,
        N: int,
        window: int,
        dilation: int = 2,
        *,
        M: int | None = None,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Dilated sliding window at block granularity (LongNet / dilated Longformer style).

        With ``pb(i) = (i + M - N) // bk`` the key block of query i's position and
        ``d = pb(i) - J``, key block J is allowed iff ``|d| <= window · dilation`` and
        ``d % dilation == 0``: ``window`` blocks on each side, every ``dilation``-th block.
        ``causal=True`` keeps ``d >= 0`` and token-level ``j <= i + M - N``.
        """
        where = "BlockMask.dilated"
        n, m = _check_nm(N, N if M is None else M, where)
        w = _nonneg("window", window, where)
        dil = _nonneg("dilation", dilation, where)
        if not dil:
            raise ValueError(f"{where}: dilation must be >= 1, got {dilation!r}")
        assert w is not None

        def rule(d: Tensor) -> Tensor:
            ok = (d.abs() <= w * dil) & (d % dil == 0)
            return ok & (d >= 0) if causal else ok

        return cls._block_rule(rule, n, m, causal, block_size, device)

    @classmethod
    def strided(
        cls,
        N: int,
        stride: int,
        *,
        local: int | None = None,
        M: int | None = None,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Sparse Transformer "strided" pattern (Child et al. 2019) at block granularity.

        With d = pb(i) - J as in :meth:`dilated`, key block J is allowed iff ``|d| < local``
        (the local part, default ``local = stride``) or ``d % stride == 0`` (the strided
        part: every ``stride``-th block). ``causal=True`` keeps ``d >= 0`` and ``j <= i + M - N``.
        """
        where = "BlockMask.strided"
        n, m = _check_nm(N, N if M is None else M, where)
        st = _nonneg("stride", stride, where)
        if not st:
            raise ValueError(f"{where}: stride must be >= 1, got {stride!r}")
        loc = st if local is None else _nonneg("local", local, where)
        assert loc is not None

        def rule(d: Tensor) -> Tensor:
            ok = (d.abs() < loc) | (d % st == 0)
            return ok & (d >= 0) if causal else ok

        return cls._block_rule(rule, n, m, causal, block_size, device)

    @classmethod
    def global_tokens(
        cls,
        N: int,
        num_global: int,
        *,
        M: int | None = None,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Global tokens (Longformer / BigBird / ETC): the first ``num_global`` queries attend
        every key and every query attends the first ``num_global`` keys (with ``causal=True``
        also only keys j <= i + M - N). Combine with a local pattern with ``|``:
        ``BlockMask.sliding_window(N, w) | BlockMask.global_tokens(N, g)``.
        """
        where = "BlockMask.global_tokens"
        n, m = _check_nm(N, N if M is None else M, where)
        g = _nonneg("num_global", num_global, where)
        bq, bk = _as_pair(block_size)
        plo, phi, klo, khi = _spans(n, m, bq, bk, device)
        qlo, qhi = plo - (m - n), phi - (m - n)  # query indices
        maybe = (qlo < g) | (klo < g)
        sure = (qhi < g) | (khi < g)
        off = m - n
        if causal:
            maybe = maybe & (klo <= phi)
            sure = sure & (khi <= plo)

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            ok = (q < g) | (kv < g)
            return ok & (kv <= q + off) if causal else ok

        return cls._from_rule(mask_mod, maybe[None, None], sure[None, None], block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def document(
        cls,
        doc_ids: Tensor,
        *,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
    ) -> BlockMask:
        """Document (packed-sequence) mask: token i attends j iff ``doc_ids[i] == doc_ids[j]``
        (and j <= i with ``causal=True``). ``doc_ids``: int tensor (N,) or (B, N)."""
        if not isinstance(doc_ids, Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dim() not in (1, 2):
            raise ValueError(f"BlockMask.document expects an int tensor (N,) or (B, N), got {_describe(doc_ids)}")
        ids = doc_ids[None] if doc_ids.dim() == 1 else doc_ids
        bp, n = ids.shape
        _check_nm(n, n, "BlockMask.document")
        bq, bk = _as_pair(block_size)
        _, inv = torch.unique(ids, return_inverse=True)
        ndoc = int(inv.max()) + 1
        pos = torch.arange(n, device=ids.device)

        def occupancy(bs: int) -> Tensor:
            occ = torch.zeros(bp, math.ceil(n / bs), ndoc, device=ids.device)
            occ[torch.arange(bp, device=ids.device)[:, None], pos // bs, inv] = 1.0
            return occ

        maybe = torch.einsum("bid,bjd->bij", occupancy(bq), occupancy(bk)) > 0
        if causal:
            _, phi, klo, _ = _spans(n, n, bq, bk, ids.device)
            maybe = maybe & (klo <= phi)

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            ok = ids[b, q] == ids[b, kv]
            return ok & (kv <= q) if causal else ok

        return cls._from_rule(mask_mod, maybe[:, None], None, block_size=(bq, bk), seq_lengths=(n, n))

    @classmethod
    def grat(
        cls,
        grid: int | tuple[int, ...],
        group: int | tuple[int, ...],
        *,
        mode: str = "criss_cross",
        radius: int = 1,
        num_extra: int = 0,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """GRAT layout (Ren et al. 2025, "Grouping First, Attending Smartly"), in group-major order.

        The token grid (T,), (H, W) or (T, H, W) is cut into groups of shape ``group``; the
        tokens are listed group by group (:func:`grat_permutation`), so every group is a
        contiguous run and all queries of a group share one set of key groups:

        * ``mode="criss_cross"`` (GRAT-X): key groups in the same group-row, -column (or
          frame) as the query's group, i.e. sharing at least one group coordinate (in 1D: the
          query's own group);
        * ``mode="surrounding"`` (GRAT-B): key groups within ``radius`` groups along every axis.

        ``num_extra`` tokens after the grid (e.g. text tokens) attend every key and are
        attended by every query. N = M = prod(grid) + num_extra. When the group size is a
        multiple of the block size every block is full or empty (no element masks).
        """
        grid_t, group_t = _grid_pair(grid, group)
        if mode not in ("criss_cross", "surrounding"):
            raise ValueError(f"BlockMask.grat: mode must be 'criss_cross' or 'surrounding', got {mode!r}")
        r = _nonneg("radius", radius, "BlockMask.grat")
        extra = _nonneg("num_extra", num_extra, "BlockMask.grat")
        assert r is not None and extra is not None
        t = math.prod(grid_t)
        n = t + extra
        bq, bk = _as_pair(block_size)
        ng = tuple(math.ceil(g / s) for g, s in zip(grid_t, group_t))
        perm = grat_permutation(grid_t, group_t, device=device)
        coords = _unravel(perm, grid_t)
        tok_gid = _ravel([c // s for c, s in zip(coords, group_t)], ng)  # group of each grouped position
        n_groups = math.prod(ng)
        gc = torch.stack(_unravel(torch.arange(n_groups, device=device), ng), -1)  # (G, rank)
        diff = gc[:, None, :] - gc[None, :, :]
        if mode == "criss_cross":
            allowed = (diff == 0).any(-1)
        else:
            allowed = (diff.abs() <= r).all(-1)
        # extra tokens form group id n_groups, allowed with everything
        allowed_x = torch.ones(n_groups + 1, n_groups + 1, dtype=torch.bool, device=device)
        allowed_x[:n_groups, :n_groups] = allowed
        gid = torch.cat([tok_gid, torch.full((extra,), n_groups, dtype=torch.long, device=device)])

        def occupancy(bs: int) -> Tensor:
            occ = torch.zeros(math.ceil(n / bs), n_groups + 1, device=device)
            occ[torch.arange(n, device=device) // bs, gid] = 1.0
            return occ

        occ_q, occ_k = occupancy(bq), occupancy(bk)
        maybe = (occ_q @ allowed_x.float() @ occ_k.T) > 0
        # blocks inside one group are exactly full or empty: no element evaluation needed
        pure_q, pure_k = occ_q.sum(-1) == 1, occ_k.sum(-1) == 1
        gq, gk = occ_q.argmax(-1), occ_k.argmax(-1)
        sure = pure_q[:, None] & pure_k[None, :] & allowed_x[gq][:, gk]

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return allowed_x[gid[q], gid[kv]]

        return cls._from_rule(mask_mod, maybe[None, None], sure[None, None], block_size=(bq, bk), seq_lengths=(n, n))

    @classmethod
    def from_key_padding(cls, key_padding: Tensor, N: int, *, block_size: int | tuple[int, int] = 128) -> BlockMask:
        """Layout of a key-padding mask (B, M) (True = real key) for N queries; B' = B, H' = 1."""
        if not isinstance(key_padding, Tensor) or key_padding.dtype != torch.bool or key_padding.dim() != 2:
            raise ValueError(f"BlockMask.from_key_padding expects a bool tensor (B, M), got {_describe(key_padding)}")
        bb, m = key_padding.shape
        n, _ = _check_nm(N, m, "BlockMask.from_key_padding")
        bq, bk = _as_pair(block_size)
        nq, nk = math.ceil(n / bq), math.ceil(m / bk)
        kp = torch.nn.functional.pad(key_padding, (0, nk * bk - m)).view(bb, nk, bk)
        cnt = kp.sum(-1)
        cap = (torch.arange(nk, device=kp.device) * bk + bk).clamp(max=m) - torch.arange(nk, device=kp.device) * bk
        full = (cnt == cap)[:, None, None, :].expand(bb, 1, nq, nk)
        maybe = (cnt > 0)[:, None, None, :].expand(bb, 1, nq, nk)

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return key_padding[b, kv]

        return cls._from_rule(mask_mod, maybe, full, block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def from_topk(
        cls,
        scores: Tensor,
        k: int | None = None,
        density: float | None = None,
        *,
        block_size: int | tuple[int, int] = 128,
        seq_lengths: tuple[int, int] | None = None,
    ) -> BlockMask:
        """Keep, for every query block, the ``k`` key blocks with the highest scores.

        Args:
            scores: (n_q, n_k) or (B', H', n_q, n_k) float block scores (e.g. a learned gate);
                ``-inf`` entries are never kept, so a row keeps min(k, #finite) blocks.
            k: blocks per query block (>= 1), or
            density: fraction of key blocks per row, k = max(1, round(density · n_k)).
            block_size: (bq, bk) of the layout.
            seq_lengths: (N, M); default (n_q · bq, n_k · bk).

        Kept blocks are *full*; AND an element mask (causal, padding) with ``&`` or use
        :meth:`restrict` on that mask to keep its element masks.
        """
        if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() not in (2, 4):
            raise ValueError(
                f"BlockMask.from_topk expects float scores (n_q, n_k) or (B, H, n_q, n_k), got {_describe(scores)}"
            )
        if scores.dim() == 2:
            scores = scores[None, None]
        if bool(torch.isnan(scores).any()):
            raise ValueError("BlockMask.from_topk: scores contain NaN")
        nq, nk = scores.shape[-2:]
        if (k is None) == (density is None):
            raise ValueError(
                f"BlockMask.from_topk: give exactly one of k and density, got k={k!r}, density={density!r}"
            )
        if k is None:
            if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
                raise ValueError(f"BlockMask.from_topk: density must be in (0, 1], got {density!r}")
            k = max(1, round(float(density) * nk))
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"BlockMask.from_topk: k must be an int >= 1, got {k!r}")
        bq, bk = _as_pair(block_size)
        if seq_lengths is None:
            seq_lengths = (nq * bq, nk * bk)
        n, m = _check_nm(*seq_lengths, "BlockMask.from_topk")
        if (math.ceil(n / bq), math.ceil(m / bk)) != (nq, nk):
            raise ValueError(
                f"BlockMask.from_topk: scores have (n_q, n_k) = {(nq, nk)} but seq_lengths {seq_lengths} with "
                f"block_size {(bq, bk)} need {(math.ceil(n / bq), math.ceil(m / bk))}"
            )
        top = scores.topk(min(k, nk), dim=-1).indices
        active = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        active.scatter_(-1, top, True)
        active &= scores > float("-inf")
        empty = torch.zeros(0, bq, bk, dtype=torch.bool, device=scores.device)
        layout = torch.zeros_like(active)
        ab, ah = active.shape[:2]

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return active[b if ab > 1 else b * 0, h if ah > 1 else h * 0, q // bq, kv // bk]

        return cls._from_states(layout, active, empty, block_size=(bq, bk), seq_lengths=(n, m), mask_mod=mask_mod)

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
            out = _and(out, self.block.dense_rows(start, end).to(self.device))
        return out

    def as_block_mask(self, block_size: int | tuple[int, int] = 128) -> BlockMask | None:
        """The combined constraint as one :class:`BlockMask` (None when nothing constrains the call).

        Causal and sliding-window parts are built from the block geometry (O(active blocks),
        cached per shape), key padding in O(B · active blocks), a full mask from its rows
        (O(N · M), like the mask itself); a BlockMask with another block size is re-tiled
        from its rows. The parts are ANDed block by block.
        """
        bq, bk = _as_pair(block_size)
        n, m, dev = self.n, self.m, self.device
        parts: list[BlockMask] = []
        if self.block is not None:
            if self.block.block_size == (bq, bk):
                parts.append(self.block)
            else:
                rows = (self.block.dense_rows(s, min(n, s + bq)) for s in range(0, n, bq))
                parts.append(BlockMask._from_row_blocks(rows, block_size=(bq, bk), seq_lengths=(n, m)))
        if self.causal:
            parts.append(_cached_pattern("causal", n, m, bq, bk, None, None, str(dev)))
        if self.window is not None:
            parts.append(_cached_pattern("window", n, m, bq, bk, self.window.left, self.window.right, str(dev)))
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


@functools.lru_cache(maxsize=32)
def _cached_pattern(
    kind: str, n: int, m: int, bq: int, bk: int, left: int | None, right: int | None, device: str
) -> BlockMask:
    """Causal / sliding-window layouts, cached per shape (they are immutable)."""
    if kind == "causal":
        return BlockMask.causal(n, m, block_size=(bq, bk), device=device)
    return BlockMask._window(n, m, left, right, (bq, bk), device)


def _and_blocks(a: BlockMask, b: BlockMask) -> BlockMask:
    """Intersection of two BlockMasks (re-blocked to ``a``'s block size when they differ)."""
    if a.block_size == b.block_size:
        return a & b
    return BlockMask.from_dense(a.to_dense() & b.to_dense(), a.block_size)


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
