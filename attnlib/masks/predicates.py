"""One predicate per mask kind, in FlexAttention's ``mask_mod`` form.

A predicate is ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: True where query ``q_idx`` of
batch ``b``, head ``h`` may attend key ``kv_idx``. The arguments are integer tensors that
broadcast against each other (0-d under FlexAttention, index grids for dense evaluation), and
the result has their broadcast shape. Every other form of a mask is derived from these:

* dense rows (:func:`evaluate_rows`, :func:`causal_mask`, :func:`window_mask`,
  :meth:`attnlib.masks.AttentionMask.dense_rows`);
* block layouts (:class:`attnlib.masks.BlockMask` evaluates the predicate on the blocks it
  cannot classify from :func:`band_blocks`' corner evaluations);
* FlexAttention block masks (the predicate is passed to Flex as is).

Causal and sliding-window predicates are *bottom-right aligned*: with N queries and M keys,
query row i sits at position ``i + (M - N)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "MaskMod",
    "and_mod",
    "band_blocks",
    "block_spans",
    "causal_mask",
    "causal_mod",
    "dense_mod",
    "evaluate_rows",
    "key_padding_mod",
    "or_mod",
    "permuted_mod",
    "true_mod",
    "window_mask",
    "window_mod",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` (True = may attend)."""


def true_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """No constraint: every (query, key) pair is allowed."""
    return (q_idx >= 0) & (kv_idx >= 0)


def window_mod(left: int | None, right: int | None, n: int, m: int | None = None) -> MaskMod:
    """Sliding window, bottom-right aligned, for N queries and M keys (M defaults to N).

    Query i at position ``p = i + (M - N)`` may attend key j iff ``p - left <= j <= p + right``;
    ``None`` leaves that side unbounded.
    """
    off = (n if m is None else m) - n

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + off
        if left is None and right is None:
            return true_mod(b, h, q_idx, kv_idx)
        if right is None:
            return kv_idx >= pos - left  # type: ignore[operator]
        upper = kv_idx <= pos + right
        return upper if left is None else upper & (kv_idx >= pos - left)

    return mask_mod


def causal_mod(n: int, m: int | None = None) -> MaskMod:
    """Causal mask, bottom-right aligned: query i may attend key j iff ``j <= i + (M - N)``.

    It is the sliding window with no left bound and right radius 0.
    """
    return window_mod(None, 0, n, m)


def dense_mod(mask: Tensor, block_size: tuple[int, int] = (1, 1)) -> MaskMod:
    """Look a bool tensor up: ``mask[b, h, q_idx // bq, kv_idx // bk]``.

    Args:
        mask: bool (N, M) or (B'|1, H'|1, N|1, M|1); a dimension of size 1 is broadcast (its
            index is ignored), so a (B, 1, 1, M) key-padding mask or a (1, 1, N, M) mask serves
            any batch and head.
        block_size: (bq, bk) when ``mask`` holds one entry per (query block, key block), e.g. a
            block selection (B', H', n_q, n_k); (1, 1) for an element mask.
    """
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4:
        raise ValueError(f"dense_mod expects a bool tensor (N, M) or (B, H, N, M), got shape {tuple(mask.shape)}")
    used = [d for d in range(4) if mask.shape[d] != 1]
    table = mask[tuple(slice(None) if d in used else 0 for d in range(4))]
    bq, bk = block_size

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        idx = (b, h, q_idx // bq if bq > 1 else q_idx, kv_idx // bk if bk > 1 else kv_idx)
        return table[tuple(idx[d] for d in used)]

    return mask_mod


def key_padding_mod(key_padding: Tensor) -> MaskMod:
    """Key padding: key j of batch b may be attended iff ``key_padding[b, j]`` (B, M) is True."""
    return dense_mod(key_padding[:, None, None, :])


def and_mod(*mods: MaskMod) -> MaskMod:
    """Pairs allowed by every predicate (no predicate: every pair)."""
    if not mods:
        return true_mod
    if len(mods) == 1:
        return mods[0]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            ok = ok & mod(b, h, q_idx, kv_idx)
        return ok

    return mask_mod


def or_mod(*mods: MaskMod) -> MaskMod:
    """Pairs allowed by at least one predicate (needs at least one)."""
    if not mods:
        raise ValueError("or_mod needs at least one predicate")
    if len(mods) == 1:
        return mods[0]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            ok = ok | mod(b, h, q_idx, kv_idx)
        return ok

    return mask_mod


def permuted_mod(mask_mod: MaskMod, order: Tensor) -> MaskMod:
    """``mask_mod`` for tokens listed in ``order`` (L,) int: token t of the new order is token
    ``order[t]`` of the old one (queries and keys reordered alike)."""

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, order[q_idx], order[kv_idx])

    return mod


def evaluate_rows(
    mask_mod: MaskMod,
    start: int,
    end: int,
    m: int,
    *,
    batch: int = 1,
    heads: int = 1,
    device: torch.device | str | None = None,
    expand: bool = False,
) -> Tensor:
    """Rows ``start:end`` of a predicate's dense form: bool (B|1, H|1, end - start, M).

    The predicate is called once on broadcast index grids b (B, 1, 1, 1), h (1, H, 1, 1),
    q (1, 1, end - start, 1), kv (1, 1, 1, M); a batch or head dimension the predicate does not
    read stays 1 unless ``expand`` (then the result is expanded to (B, H, end - start, M)).
    """
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    q = torch.arange(start, end, device=device)[None, None, :, None]
    kv = torch.arange(m, device=device)[None, None, None, :]
    out = torch.as_tensor(mask_mod(b, h, q, kv), device=device).to(torch.bool)
    if out.dim() < 4:
        out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
    shape = (batch, heads, end - start, m) if expand else torch.broadcast_shapes(out.shape, (1, 1, end - start, m))
    return out.expand(shape)


def causal_mask(n: int, m: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Dense form of :func:`causal_mod`: bool (N, M), entry (i, j) True iff ``j <= i + (M - N)``.

    With N == M this is the usual lower triangle.
    """
    m = n if m is None else m
    return evaluate_rows(causal_mod(n, m), 0, n, m, device=device)[0, 0]


def window_mask(
    n: int,
    m: int | None = None,
    *,
    left: int | None,
    right: int | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dense form of :func:`window_mod`: bool (N, M), entry (i, j) True iff
    ``p - left <= j <= p + right`` with ``p = i + (M - N)`` (``None`` = unbounded)."""
    m = n if m is None else m
    return evaluate_rows(window_mod(left, right, n, m), 0, n, m, device=device)[0, 0]


def block_spans(
    n: int, m: int, block_size: tuple[int, int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First / last query index of each query block, (n_q, 1) each, and first / last key of each
    key block, (1, n_k) each, for N queries and M keys in blocks of (bq, bk) (the last ones may be short)."""
    bq, bk = block_size
    qlo = torch.arange(-(-n // bq), device=device)[:, None] * bq
    klo = torch.arange(-(-m // bk), device=device)[None, :] * bk
    return qlo, (qlo + bq).clamp(max=n) - 1, klo, (klo + bk).clamp(max=m) - 1


def band_blocks(
    left: int | None,
    right: int | None,
    n: int,
    m: int,
    block_size: tuple[int, int],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Block classification of :func:`window_mod` (and so of :func:`causal_mod`) in O(n_q · n_k).

    The window is the AND of two monotone bounds, ``j <= p + right`` (more pairs for later
    queries and earlier keys) and ``j >= p - left`` (the reverse), so each bound is decided for a
    whole block by the predicate at two corners of it: a block has an allowed pair of a bound iff
    its most favourable corner passes, and only allowed pairs iff its least favourable corner
    passes. For a band of width >= 1 the two bounds' "some" tests together are exact.

    Returns:
        (maybe, sure): bool (n_q, n_k): blocks holding some allowed pair / only allowed pairs
        (among their in-range pairs).
    """
    qlo, qhi, klo, khi = block_spans(n, m, block_size, device)
    nq, nk = qlo.shape[0], klo.shape[1]
    zero = torch.zeros((), dtype=torch.long, device=device)
    maybe = torch.ones(nq, nk, dtype=torch.bool, device=device)
    sure = maybe.clone()
    if right is not None:
        upper = window_mod(None, right, n, m)
        maybe &= upper(zero, zero, qhi, klo)
        sure &= upper(zero, zero, qlo, khi)
    if left is not None:
        lower = window_mod(left, None, n, m)
        maybe &= lower(zero, zero, qlo, khi)
        sure &= lower(zero, zero, qhi, klo)
    return maybe, sure
