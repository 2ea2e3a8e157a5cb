"""GRAT (Ren et al. 2025, "Grouping First, Attending Smartly", arXiv 2505.14687): the token order
and the layouts that the ``grat`` variant attends with.

GRAT cuts a token grid into groups; all queries of a group attend the same key groups. Listing
the tokens group by group (:func:`grat_permutation`) makes every group a contiguous run, so the
group mask becomes a block-sparse layout (:meth:`attnlib.masks.BlockMask.grat`, the layout
part, which lives in :mod:`attnlib.masks.patterns`). :func:`grat_layout` gives the layout and
the permutation for a sequence of N tokens; :func:`grat_caller_mask` carries the caller's masks
into the grouped order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlib.masks import AttentionMask, BlockMask
from attnlib.masks.patterns import grat_token_groups
from attnlib.masks.predicates import permuted_mod

__all__ = ["grat_caller_mask", "grat_layout", "grat_permutation"]


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
    gid, within = grat_token_groups(grid, group, device=device)
    group_size = math.prod((group,) if isinstance(group, int) else group)
    return torch.argsort(gid * group_size + within, stable=True)


def grat_layout(
    grid: tuple[int, ...],
    group: tuple[int, ...],
    n: int,
    *,
    mode: str,
    radius: int,
    block_size: int,
    device: torch.device | str,
) -> tuple[BlockMask, Tensor | None]:
    """GRAT's layout for a sequence of N tokens: the grid's tokens, then N - prod(grid) extra
    tokens (e.g. text) that attend and are attended by every token.

    Returns:
        (BlockMask (1, 1, N, N) in the grouped order, perm (N,) int64 from the original to the
        grouped order, or None when the grouped order is the original one).
    """
    t = math.prod(grid)
    if t > n:
        raise ValueError(f"grat: grid {grid} has {t} tokens but the sequence has only N={n}")
    bm = BlockMask.grat(grid, group, mode=mode, radius=radius, num_extra=n - t, block_size=block_size, device=device)
    perm = grat_permutation(grid, group, device=device)
    perm = torch.cat([perm, torch.arange(t, n, device=perm.device)])
    ident = bool((perm == torch.arange(n, device=perm.device)).all())
    return bm, None if ident else perm


def grat_caller_mask(mask: AttentionMask, perm: Tensor, block_size: int) -> BlockMask | None:
    """The caller's constraints on N tokens, in GRAT's grouped order, as a BlockMask (None if none).

    ``perm`` (N,): grouped token t is original token ``perm[t]``. The mask's predicate
    (:meth:`AttentionMask.mask_mod`) is evaluated at the original positions, per batch / head
    where a key-padding or full mask varies over them.
    """
    mod = mask.mask_mod()
    if mod is None:
        return None
    kp, full = mask.key_padding, mask.full
    batch = kp.shape[0] if kp is not None else (full.shape[0] if full is not None else 1)
    heads = full.shape[1] if full is not None else 1
    return BlockMask.from_mask_mod(
        permuted_mod(mod, perm), batch, heads, mask.n, mask.m, block_size, device=perm.device
    )
