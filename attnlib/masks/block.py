"""BlockMask: a block-sparse attention layout with exact element masks on partial blocks.

Generic layout code only: storage, dense conversion, the transposed layout for kernels, block
algebra (``&``, ``|``, :meth:`BlockMask.restrict`) and the generic builders (``from_dense``,
``from_mask_mod``, ``from_key_padding``, ``from_topk``, ``from_flex`` / ``to_flex``). The named
layouts (causal, sliding window, dilated, ...) are in :mod:`attnlib.masks.patterns`. Element
masks of built layouts come from predicates (:mod:`attnlib.masks.predicates`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnlib._validation import describe, positive_int, positive_int_pair
from attnlib.masks.patterns import BlockPatterns
from attnlib.masks.predicates import (
    MaskMod,
    and_mod,
    dense_mod,
    evaluate_rows,
    key_padding_mod,
    or_mod,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

__all__ = ["BlockMask"]


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


class BlockMask(BlockPatterns):
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
        mask_mod: MaskMod | None = None,
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
                f"BlockMask.restrict expects a bool tensor (…, n_q={nq}, n_k={nk}), got {describe(active)}"
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
        new_mm = None if self.mask_mod is None else and_mod(self.mask_mod, dense_mod(active, self.block_size))
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
        mm: MaskMod | None = None
        if ma is not None and mb is not None:
            mm = and_mod(ma, mb) if op == "and" else or_mod(ma, mb)
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
        mask_mod: MaskMod | None = None,
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
        bq, bk = positive_int_pair(block_size, "BlockMask.from_dense: block_size", hint=" (bq, bk)")
        n, m = mask.shape[-2:]
        if n == 0 or m == 0:
            raise ValueError(f"BlockMask needs N > 0 and M > 0, got N={n}, M={m}")
        rows = (mask[..., s : s + bq, :] for s in range(0, n, bq))
        return cls._from_row_blocks(rows, block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskMod,
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
        where = "BlockMask.from_mask_mod"
        if not callable(mask_mod):
            raise ValueError(
                f"{where}: mask_mod must be a function (b, h, q_idx, kv_idx) -> bool tensor, got {describe(mask_mod)}"
            )
        bq, bk = positive_int_pair(block_size, f"{where}: block_size", hint=" (bq, bk)")
        N, M = positive_int(N, f"{where}: N"), positive_int(M, f"{where}: M")
        bb = 1 if B is None else positive_int(B, f"{where}: B", hint=" (or None: shared)")
        hh = 1 if H is None else positive_int(H, f"{where}: H", hint=" (or None: shared)")
        rows = (_checked_rows(mask_mod, s, min(s + bq, N), M, bb, hh, device, where) for s in range(0, N, bq))
        return cls._from_row_blocks(rows, block_size=(bq, bk), seq_lengths=(N, M), mask_mod=mask_mod)

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
        mask_mod: MaskMod | None = None,
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
        mask_mod: MaskMod,
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

    @classmethod
    def from_key_padding(cls, key_padding: Tensor, N: int, *, block_size: int | tuple[int, int] = 128) -> BlockMask:
        """Layout of a key-padding mask (B, M) (True = real key) for N queries; B' = B, H' = 1."""
        if not isinstance(key_padding, Tensor) or key_padding.dtype != torch.bool or key_padding.dim() != 2:
            raise ValueError(f"BlockMask.from_key_padding expects a bool tensor (B, M), got {describe(key_padding)}")
        bb, m = key_padding.shape
        n = positive_int(N, "BlockMask.from_key_padding: N")
        if m == 0:
            raise ValueError("BlockMask.from_key_padding: key_padding has M = 0 keys; M must be > 0")
        bq, bk = positive_int_pair(block_size, "BlockMask.from_key_padding: block_size", hint=" (bq, bk)")
        nq, nk = math.ceil(n / bq), math.ceil(m / bk)
        kp = torch.nn.functional.pad(key_padding, (0, nk * bk - m)).view(bb, nk, bk)
        cnt = kp.sum(-1)
        cap = (torch.arange(nk, device=kp.device) * bk + bk).clamp(max=m) - torch.arange(nk, device=kp.device) * bk
        full = (cnt == cap)[:, None, None, :].expand(bb, 1, nq, nk)
        maybe = (cnt > 0)[:, None, None, :].expand(bb, 1, nq, nk)

        return cls._from_rule(key_padding_mod(key_padding), maybe, full, block_size=(bq, bk), seq_lengths=(n, m))

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
                f"BlockMask.from_topk expects float scores (n_q, n_k) or (B, H, n_q, n_k), got {describe(scores)}"
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
        bq, bk = positive_int_pair(block_size, "BlockMask.from_topk: block_size", hint=" (bq, bk)")
        if seq_lengths is None:
            seq_lengths = (nq * bq, nk * bk)
        n, m = positive_int_pair(seq_lengths, "BlockMask.from_topk: seq_lengths", hint=" (N, M)")
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
        none = torch.zeros_like(active)
        mask_mod = dense_mod(active, (bq, bk))
        return cls._from_states(none, active, empty, block_size=(bq, bk), seq_lengths=(n, m), mask_mod=mask_mod)

    # -- FlexAttention interop -------------------------------------------------------------

    @classmethod
    def from_flex(cls, flex_mask: FlexBlockMask) -> BlockMask:
        """Convert a ``torch.nn.attention.flex_attention.BlockMask`` (same layout, same mask).

        Partial-block element masks are obtained by evaluating the flex mask's ``mask_mod``
        on those blocks only.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        if not isinstance(flex_mask, FlexBlockMask):
            raise ValueError(
                "BlockMask.from_flex: flex_mask must be a torch.nn.attention.flex_attention.BlockMask "
                f"(e.g. from create_block_mask), got {describe(flex_mask)}"
            )
        bq, bk = positive_int_pair(tuple(flex_mask.BLOCK_SIZE), "BlockMask.from_flex: flex_mask.BLOCK_SIZE")
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

        Its ``mask_mod`` is :meth:`element_mod`.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        return FlexBlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=self.element_mod(),
            seq_lengths=self.seq_lengths,
        )

    def element_mod(self) -> MaskMod:
        """The layout's predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

        The ``mask_mod`` the layout was built from when there is one; otherwise a lookup in the
        dense form (:func:`attnlib.masks.predicates.dense_mod`; O(N·M) bools, built once).
        """
        if self.mask_mod is not None:
            return self.mask_mod
        if "dense_mod" not in self._cache:
            self._cache["dense_mod"] = dense_mod(self.to_dense())
        return self._cache["dense_mod"]


def _checked_rows(
    mask_mod: MaskMod,
    start: int,
    end: int,
    m: int,
    batch: int,
    heads: int,
    device: torch.device | str | None,
    where: str,
) -> Tensor:
    """Rows ``start:end`` of a user's ``mask_mod``, (B, H, end - start, M) bool; ValueError naming
    ``where`` when its result is not a bool tensor of the index grids' broadcast shape."""
    want = (batch, heads, end - start, m)
    try:
        rows = evaluate_rows(mask_mod, start, end, m, batch=batch, heads=heads, device=device, expand=True)
    except RuntimeError as err:  # a result that does not broadcast to the index grids
        raise ValueError(
            f"{where}: mask_mod(b, h, q_idx, kv_idx) must return a bool tensor of the broadcast shape "
            f"of its index arguments, {want} here; calling it failed with: {err}"
        ) from None
    if not isinstance(rows, Tensor) or tuple(rows.shape) != want:
        raise ValueError(
            f"{where}: mask_mod(b, h, q_idx, kv_idx) must return a bool tensor of the broadcast shape "
            f"of its index arguments, {want} here; got {describe(rows)}"
        )
    return rows


def _reorder(num: Tensor, idx: Tensor, nk: int) -> tuple[Tensor, Tensor]:
    """Normalise a (num, indices) list so listed ids come first in ascending order."""
    ar = torch.arange(idx.shape[-1], device=idx.device)
    active = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool, device=idx.device)
    active.scatter_(-1, idx.long().clamp(max=nk - 1), ar < num[..., None])
    return _ordered(active)
