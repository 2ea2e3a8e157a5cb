"""Named block-sparse layouts, mixed into :class:`attnlib.masks.BlockMask` as classmethods.

``BlockMask.causal``, ``sliding_window``, ``all_blocks``, ``dilated``, ``strided``,
``global_tokens``, ``prefix_keys``, ``longformer``, ``document`` and ``grat``. Each layout is one element
predicate (from :mod:`attnlib.masks.predicates` where the kind has one) plus a block
classification that names the candidate blocks without touching N x M pairs, so building
costs O(candidate blocks · bq · bk); only blocks the classification cannot decide are
evaluated element by element, with the same predicate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attnlib._validation import describe, non_negative_int, positive_int, positive_int_pair
from attnlib.masks.predicates import MaskMod, and_mod, band_blocks, block_spans, causal_mod, window_mod

if TYPE_CHECKING:  # pragma: no cover
    from attnlib.masks.block import BlockMask

__all__ = ["BlockPatterns", "grat_groups", "grat_token_groups"]

GRAT_MODES = ("criss_cross", "surrounding")


def _sizes(n: object, m: object, where: str) -> tuple[int, int]:
    """(N, M) as positive ints; M defaults to N."""
    n = positive_int(n, f"{where}: N")
    return n, positive_int(n if m is None else m, f"{where}: M")


class BlockPatterns:
    """The named layouts of :class:`attnlib.masks.BlockMask` (a mixin: use them as ``BlockMask.causal(...)``)."""

    @classmethod
    def _band(
        cls: type[BlockMask],
        n: int,
        m: int,
        left: int | None,
        right: int | None,
        block_size: tuple[int, int],
        device: torch.device | str | None,
        *,
        shared: bool = False,
    ) -> BlockMask:
        """Keys ``p - left <= j <= p + right`` (None = unbounded) for position p = i + M - N.

        Element rule :func:`~attnlib.masks.predicates.window_mod`, blocks from
        :func:`~attnlib.masks.predicates.band_blocks`: O(active blocks). ``shared=True`` returns
        the layout built once per shape (shared between callers: treat it as read-only).
        """
        if shared:
            return _shared_band(cls, n, m, left, right, block_size, str(torch.device(device or "cpu")))
        maybe, sure = band_blocks(left, right, n, m, block_size, device)
        return cls._from_rule(
            window_mod(left, right, n, m),
            maybe[None, None],
            sure[None, None],
            block_size=block_size,
            seq_lengths=(n, m),
        )

    @classmethod
    def causal(
        cls: type[BlockMask],
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
        n, m = _sizes(N, M, "BlockMask.causal")
        return cls._band(n, m, None, 0, positive_int_pair(block_size, "block_size"), device)

    @classmethod
    def sliding_window(
        cls: type[BlockMask],
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
        ``p - left <= j <= p + right`` (the :class:`~attnlib.masks.SlidingWindow` rule).

        ``right`` defaults to ``left`` (the band |i - j| <= left); ``causal=True`` sets
        ``right = 0`` (keys p - left .. p). ``None`` means unbounded on that side.
        Built in O(active blocks).
        """
        where = "BlockMask.sliding_window"
        n, m = _sizes(N, M, where)
        lo = None if left is None else non_negative_int(left, f"{where}: left")
        hi = (
            lo
            if right is None and not causal
            else None
            if right is None
            else non_negative_int(right, f"{where}: right")
        )
        if causal:
            hi = 0
        return cls._band(n, m, lo, hi, positive_int_pair(block_size, "block_size"), device)

    @classmethod
    def all_blocks(
        cls: type[BlockMask],
        N: int,
        M: int | None = None,
        *,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Every block kept, all full: the layout of unconstrained attention (N queries, M keys).

        It is the band with no bound on either side; cached per shape (shared, read-only).
        """
        n, m = _sizes(N, M, "BlockMask.all_blocks")
        return cls._band(n, m, None, None, positive_int_pair(block_size, "block_size"), device, shared=True)

    @classmethod
    def _block_rule(
        cls: type[BlockMask],
        rule: Callable[[Tensor], Tensor],
        n: int,
        m: int,
        causal: bool,
        block_size: int | tuple[int, int],
        device: torch.device | str | None,
    ) -> BlockMask:
        """Layout of a rule on the block distance d = pb(i) - J, where pb(i) = (i + M - N) // bk
        is the key block holding query i's position (AND the causal predicate if asked)."""
        bq, bk = positive_int_pair(block_size, "block_size")
        off = m - n
        qlo, qhi, _, _ = block_spans(n, m, (bq, bk), device)
        nk = math.ceil(m / bk)
        kb = torch.arange(nk, device=device)[None, :]
        pb_lo, pb_hi = torch.div(qlo + off, bk, rounding_mode="floor"), torch.div(qhi + off, bk, rounding_mode="floor")
        maybe = torch.zeros(qlo.shape[0], nk, dtype=torch.bool, device=device)
        for t in range(int((pb_hi - pb_lo).max()) + 1):
            pb = pb_lo + t
            maybe |= rule(pb - kb) & (pb <= pb_hi)

        def rule_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return rule(torch.div(q + off, bk, rounding_mode="floor") - torch.div(kv, bk, rounding_mode="floor"))

        mask_mod = rule_mod
        if causal:
            maybe &= band_blocks(None, 0, n, m, (bq, bk), device)[0]
            mask_mod = and_mod(rule_mod, causal_mod(n, m))
        return cls._from_rule(mask_mod, maybe[None, None], None, block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def dilated(
        cls: type[BlockMask],
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
        n, m = _sizes(N, M, where)
        w = non_negative_int(window, f"{where}: window")
        dil = non_negative_int(dilation, f"{where}: dilation")
        if not dil:
            raise ValueError(f"{where}: dilation must be >= 1, got {dilation!r}")

        def rule(d: Tensor) -> Tensor:
            ok = (d.abs() <= w * dil) & (d % dil == 0)
            return ok & (d >= 0) if causal else ok

        return cls._block_rule(rule, n, m, causal, block_size, device)

    @classmethod
    def strided(
        cls: type[BlockMask],
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
        n, m = _sizes(N, M, where)
        st = non_negative_int(stride, f"{where}: stride")
        if not st:
            raise ValueError(f"{where}: stride must be >= 1, got {stride!r}")
        loc = st if local is None else non_negative_int(local, f"{where}: local")

        def rule(d: Tensor) -> Tensor:
            ok = (d.abs() < loc) | (d % st == 0)
            return ok & (d >= 0) if causal else ok

        return cls._block_rule(rule, n, m, causal, block_size, device)

    @classmethod
    def global_tokens(
        cls: type[BlockMask],
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
        also only keys j <= i + M - N). Combine with a local pattern with ``|``, or use
        :meth:`longformer`.
        """
        where = "BlockMask.global_tokens"
        n, m = _sizes(N, M, where)
        g = non_negative_int(num_global, f"{where}: num_global")
        bq, bk = positive_int_pair(block_size, "block_size")

        def global_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (q < g) | (kv < g)  # type: ignore[operator]

        # monotone (true for small q or kv): decided per block by its first / last corner
        qlo, qhi, klo, khi = block_spans(n, m, (bq, bk), device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        maybe, sure = global_mod(zero, zero, qlo, klo), global_mod(zero, zero, qhi, khi)
        mask_mod: MaskMod = global_mod
        if causal:
            c_maybe, c_sure = band_blocks(None, 0, n, m, (bq, bk), device)
            maybe, sure = maybe & c_maybe, sure & c_sure
            mask_mod = and_mod(global_mod, causal_mod(n, m))
        return cls._from_rule(mask_mod, maybe[None, None], sure[None, None], block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def prefix_keys(
        cls: type[BlockMask],
        N: int,
        num_keys: int,
        *,
        M: int | None = None,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Every query attends the first ``num_keys`` keys only (``kv_idx < num_keys``).

        In-context learning over table rows (TabICL, Orion-BiX): with the ``num_keys`` labelled
        rows first, every row - labelled or to be predicted - reads only the labelled ones, so
        no prediction sees another test row. Built in O(blocks).
        """
        where = "BlockMask.prefix_keys"
        n, m = _sizes(N, M, where)
        p = non_negative_int(num_keys, f"{where}: num_keys")
        bq, bk = positive_int_pair(block_size, "block_size")

        def prefix_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (kv < p) | (q < 0)  # type: ignore[operator]  # (q < 0) is False: broadcasts q

        qlo, qhi, klo, khi = block_spans(n, m, (bq, bk), device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        maybe, sure = prefix_mod(zero, zero, qlo, klo), prefix_mod(zero, zero, qhi, khi)
        return cls._from_rule(prefix_mod, maybe[None, None], sure[None, None], block_size=(bq, bk), seq_lengths=(n, m))

    @classmethod
    def longformer(
        cls: type[BlockMask],
        N: int,
        window: int,
        num_global: int,
        *,
        M: int | None = None,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Longformer (Beltagy et al. 2020): the band |i - j| <= ``window`` OR ``num_global``
        global tokens: ``sliding_window(N, window) | global_tokens(N, num_global)``."""
        kw = {"M": M, "block_size": block_size, "device": device}
        return cls.sliding_window(N, window, **kw) | cls.global_tokens(N, num_global, **kw)  # type: ignore[arg-type]

    @classmethod
    def _groups(
        cls: type[BlockMask],
        gid: Tensor,
        allowed: Tensor,
        *,
        causal: bool,
        block_size: tuple[int, int],
    ) -> BlockMask:
        """Layout of "token i may attend token j iff ``allowed[gid[i], gid[j]]``" (N = M).

        Args:
            gid: (B', N) int64 group of every token, in [0, G).
            allowed: (G, G) bool, which groups attend which.
            causal: also ``j <= i``.

        A block whose queries (keys) all lie in one group is decided by one lookup; only
        blocks straddling a group boundary are evaluated element by element.
        """
        bp, n = gid.shape
        bq, bk = block_size
        dev = gid.device
        n_groups = allowed.shape[0]
        pos = torch.arange(n, device=dev)

        def occupancy(bs: int) -> Tensor:
            occ = torch.zeros(bp, math.ceil(n / bs), n_groups, dtype=torch.float32, device=dev)
            occ[torch.arange(bp, device=dev)[:, None], pos // bs, gid] = 1.0
            return occ

        occ_q, occ_k = occupancy(bq), occupancy(bk)
        maybe = (occ_q @ allowed.to(occ_q.dtype) @ occ_k.transpose(-1, -2)) > 0  # (B', n_q, n_k)
        pure_q, pure_k = occ_q.sum(-1) == 1, occ_k.sum(-1) == 1
        gq, gk = occ_q.argmax(-1), occ_k.argmax(-1)
        sure = pure_q[:, :, None] & pure_k[:, None, :] & allowed[gq[:, :, None], gk[:, None, :]]
        rows = gid if bp > 1 else gid[0]

        def group_of(b: Tensor, i: Tensor) -> Tensor:
            return rows[b, i] if bp > 1 else rows[i]

        def group_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return allowed[group_of(b, q), group_of(b, kv)]

        mask_mod: MaskMod = group_mod
        if causal:
            c_maybe, c_sure = band_blocks(None, 0, n, n, block_size, dev)
            maybe, sure = maybe & c_maybe, sure & c_sure
            mask_mod = and_mod(group_mod, causal_mod(n))
        return cls._from_rule(mask_mod, maybe[:, None], sure[:, None], block_size=block_size, seq_lengths=(n, n))

    @classmethod
    def document(
        cls: type[BlockMask],
        doc_ids: Tensor,
        *,
        causal: bool = False,
        block_size: int | tuple[int, int] = 128,
    ) -> BlockMask:
        """Document (packed-sequence) mask: token i attends j iff ``doc_ids[i] == doc_ids[j]``
        (and j <= i with ``causal=True``). ``doc_ids``: int tensor (N,) or (B, N)."""
        if not isinstance(doc_ids, Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dim() not in (1, 2):
            raise ValueError(f"BlockMask.document expects an int tensor (N,) or (B, N), got {describe(doc_ids)}")
        ids = doc_ids[None] if doc_ids.dim() == 1 else doc_ids
        positive_int(ids.shape[1], "BlockMask.document: N")
        _, inv = torch.unique(ids, return_inverse=True)
        same = torch.eye(int(inv.max()) + 1, dtype=torch.bool, device=ids.device)
        return cls._groups(inv, same, causal=causal, block_size=positive_int_pair(block_size, "block_size"))

    @classmethod
    def grat(
        cls: type[BlockMask],
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
        tokens are listed group by group (:func:`attnlib.functional.grat.grat_permutation`), so
        every group is a contiguous run and all queries of a group share one set of key groups
        (:func:`grat_groups`):

        * ``mode="criss_cross"`` (GRAT-X): key groups in the same group-row, -column (or
          frame) as the query's group, i.e. sharing at least one group coordinate (in 1D: the
          query's own group);
        * ``mode="surrounding"`` (GRAT-B): key groups within ``radius`` groups along every axis.

        ``num_extra`` tokens after the grid (e.g. text tokens) attend every key and are
        attended by every query. N = M = prod(grid) + num_extra. When the group size is a
        multiple of the block size every block is full or empty (no element masks).
        """
        gid_raster, _, allowed = grat_groups(grid, group, mode=mode, radius=radius, device=device)
        extra = non_negative_int(num_extra, "BlockMask.grat: num_extra")
        n_groups = allowed.shape[0]
        # extra tokens form group n_groups, allowed with everything
        allowed_x = torch.ones(n_groups + 1, n_groups + 1, dtype=torch.bool, device=allowed.device)
        allowed_x[:n_groups, :n_groups] = allowed
        in_order = torch.sort(gid_raster).values  # the group of each token in group-major order
        gid = torch.cat([in_order, torch.full((extra,), n_groups, dtype=torch.long, device=allowed.device)])
        return cls._groups(gid[None], allowed_x, causal=False, block_size=positive_int_pair(block_size, "block_size"))


@functools.lru_cache(maxsize=32)
def _shared_band(cls: type[BlockMask], *args: Any) -> BlockMask:
    """``cls._band(*args)``, built once per argument tuple."""
    return cls._band(*args)


# ------------------------------------------------------------------------------------------
# GRAT groups (the layout part of GRAT; the token permutation is attnlib.functional.grat)
# ------------------------------------------------------------------------------------------


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


def grat_token_groups(
    grid: int | tuple[int, ...], group: int | tuple[int, ...], *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """For every token of the grid in raster order: its group and its place inside the group.

    Args:
        grid: token grid (T,), (H, W) or (T, H, W) in raster order (last axis fastest).
        group: group shape, same rank as ``grid``. Groups at a ragged edge are smaller.

    Returns:
        (gid, within), both (prod(grid),) int64: the group in raster order of the group grid,
        and the raster index of the token inside a full-size group.
    """
    grid_t, group_t = _grid_pair(grid, group)
    coords = _unravel(torch.arange(math.prod(grid_t), device=device), grid_t)
    ng = tuple(math.ceil(g / s) for g, s in zip(grid_t, group_t))
    gid = _ravel([c // s for c, s in zip(coords, group_t)], ng)
    within = _ravel([c % s for c, s in zip(coords, group_t)], group_t)
    return gid, within


def grat_groups(
    grid: int | tuple[int, ...],
    group: int | tuple[int, ...],
    *,
    mode: str = "criss_cross",
    radius: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRAT's group structure: (gid (T,), within (T,), allowed (G, G) bool).

    ``gid`` / ``within`` as in :func:`grat_token_groups`; ``allowed[g, g']``: whether the
    queries of group g attend the keys of group g' (``mode`` and ``radius`` as in
    :meth:`BlockPatterns.grat`).
    """
    grid_t, group_t = _grid_pair(grid, group)
    if mode not in GRAT_MODES:
        raise ValueError(f"BlockMask.grat: mode must be 'criss_cross' or 'surrounding', got {mode!r}")
    r = non_negative_int(radius, "BlockMask.grat: radius")
    gid, within = grat_token_groups(grid_t, group_t, device=device)
    ng = tuple(math.ceil(g / s) for g, s in zip(grid_t, group_t))
    gc = torch.stack(_unravel(torch.arange(math.prod(ng), device=device), ng), -1)  # (G, rank)
    diff = gc[:, None, :] - gc[None, :, :]
    allowed = (diff == 0).any(-1) if mode == "criss_cross" else (diff.abs() <= r).all(-1)
    return gid, within, allowed
