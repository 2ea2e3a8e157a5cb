"""Small helpers shared by the functional modules (internal): the accumulation dtype, GQA head
repetition, mask normalisation and guarded division."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlib.masks import AttentionMask, MaskLike, normalize_mask

__all__ = [
    "acc_dtype",
    "as_attention_mask",
    "masked_scores",
    "nonzero",
    "repeat_kv",
    "safe_div",
    "sequence_extent",
    "softmax_or_zero",
    "weights_importance",
]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype attnlib computes and accumulates in for inputs of ``dtypes``.

    float32 for fp16 / bf16 / fp32 inputs, float64 when any input is float64 (the promotion of
    float32 with every given dtype).
    """
    dt = torch.float32
    for d in dtypes:
        dt = torch.promote_types(dt, d)
    return dt


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Repeat key/value heads for grouped-query attention: (B, H_kv, M, D) -> (B, H_kv·G, M, D)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def as_attention_mask(q: Tensor, k: Tensor, mask: MaskLike | list[MaskLike], causal: bool) -> AttentionMask:
    """Normalise ``mask`` and ``causal`` for q (B, H, N, D) and k (B, H_kv, M, D)."""
    b, h, n, _ = q.shape
    return normalize_mask(mask, causal=causal, batch=b, heads=h, n=n, m=k.shape[2], device=q.device)


def masked_scores(
    q: Tensor, k: Tensor, mask: AttentionMask, rows: tuple[int, int], scale: float, dtype: torch.dtype
) -> Tensor:
    """The logits of query rows ``rows = (s0, s1)``: ``q[s0:s1] k^T`` cast to ``dtype``, times
    ``scale``, -inf where ``mask`` forbids. q (B, H, N, D), k (B, H, M, D) -> (B, H, s1 - s0, M)."""
    s0, s1 = rows
    s = torch.matmul(q[:, :, s0:s1], k.transpose(-1, -2)).to(dtype)
    if scale != 1.0:
        s = s * scale
    allowed = mask.dense_rows(s0, s1)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def nonzero(den: Tensor) -> Tensor:
    """``den`` with its zeros replaced by 1: a divisor for sums that are 0 only when their numerator is."""
    return torch.where(den != 0, den, torch.ones_like(den))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (finite gradients; rows with no key -> 0)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def sequence_extent(valid: Tensor | None, size: int, batch: int, device: torch.device) -> Tensor:
    """Each example's length up to its last real token: 1 + the index of the last True of
    ``valid`` (B, T) (0 when none), or ``size`` for every example when ``valid`` is None -> (B,) long.

    A right-padded example run alone has this length; budgets and lengths that a variant derives
    from the sequence length use it so that padding does not change a real row's output."""
    if valid is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    idx = torch.arange(1, size + 1, device=device)
    return (valid.to(torch.long) * idx).amax(-1)


def softmax_or_zero(s: Tensor) -> Tensor:
    """Softmax over the last dim of logits s (..., M) with -inf at masked entries; a row whose
    entries are all -inf gives zeros (with finite gradients), and NaN stays NaN (never hidden as a
    plausible number, as ``softmax(s).nan_to_num(0)`` would)."""
    empty = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)


def weights_importance(weights: Tensor) -> Tensor:
    """Attention mass each key receives, averaged over the queries: weights (B, H, N, M) -> (B, H, M)."""
    return weights.mean(2)
