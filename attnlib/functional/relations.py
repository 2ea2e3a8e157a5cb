"""Attention distillation losses: attention-map transfer, MiniLMv2 relations, activation attention.

* :func:`attention_map_kl` - the student's attention maps towards the teacher's:
  ``mean over heads and query rows of KL(A^T_i || A^S_i)``.
* :func:`relation_matrix`, :func:`relation_kl`, :func:`minilm_relation_loss` - MiniLMv2 (Wang et
  al. 2021) self-attention relation distillation. For X in {Q, K, V} the heads' vectors are
  concatenated per token, (N, C), and re-split into R *relation heads* of size
  ``d_r = C / R`` (R need not equal either model's head count; teacher and student use their
  own d_r); ``Rel_{X,r} = softmax_row(X_r X_r^T / sqrt(d_r))`` (N, N), and
  ``L_XX = 1 / (R N) sum_r sum_t KL(Rel^T_{X,r,t} || Rel^S_{X,r,t})``, summed over Q-Q, K-K, V-V.
* :func:`activation_attention_map`, :func:`activation_transfer_loss` - attention transfer of
  Zagoruyko & Komodakis (2017) on feature maps: ``at(A) = vec(mean_c |A_c|^p) / ||.||_2`` and
  ``mean((at(S) - at(T))^2)``.

The teacher side is detached in every loss (KL(teacher || student), gradients reach the
student only). Masks are boolean, True = may attend / real token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import describe, positive_int

__all__ = [
    "activation_attention_map",
    "activation_transfer_loss",
    "attention_map_kl",
    "minilm_relation_loss",
    "relation_kl",
    "relation_matrix",
]


def _tokens(x: Tensor, what: str) -> Tensor:
    """(B, H, N, D) heads concatenated per token -> (B, N, H * D); (B, N, C) unchanged."""
    if not isinstance(x, Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        raise ValueError(f"{what} must be a float (B, N, C) or (B, H, N, D) tensor, got {describe(x)}")
    return x.transpose(1, 2).flatten(2) if x.dim() == 4 else x


def _check_padding(key_padding: Tensor | None, b: int, n: int) -> Tensor | None:
    if key_padding is None:
        return None
    if not isinstance(key_padding, Tensor) or key_padding.dtype != torch.bool or tuple(key_padding.shape) != (b, n):
        raise ValueError(f"key_padding must be bool (B={b}, N={n}) with True = real token, got {describe(key_padding)}")
    return key_padding


def _relation_log_probs(x: Tensor, num_relation_heads: int, key_padding: Tensor | None, what: str) -> Tensor:
    """log softmax_row(X_r X_r^T / sqrt(d_r)): (B, R, N, N), -inf at padded keys."""
    x = _tokens(x, what)
    b, n, c = x.shape
    r = positive_int(num_relation_heads, "num_relation_heads")
    if c % r:
        raise ValueError(f"{what}: its width C={c} (heads x head size) must be divisible by num_relation_heads={r}")
    xr = x.unflatten(-1, (r, c // r)).transpose(1, 2)  # (B, R, N, d_r)
    logits = xr @ xr.transpose(-1, -2) / math.sqrt(c // r)
    kp = _check_padding(key_padding, b, n)
    if kp is not None:
        logits = logits.masked_fill(~kp[:, None, None, :].to(logits.device), float("-inf"))
    return torch.log_softmax(logits, -1)


def relation_matrix(x: Tensor, num_relation_heads: int, key_padding: Tensor | None = None) -> Tensor:
    """MiniLMv2 relations of one of Q, K, V: ``softmax_row(X_r X_r^T / sqrt(d_r))`` per relation head.

    Args:
        x: (B, H, N, D) per-head vectors (concatenated over heads per token) or (B, N, C).
        num_relation_heads: R; must divide C = H·D (d_r = C / R).
        key_padding: (B, N) bool, True = real token; padded keys get 0, fully padded rows 0.

    Returns:
        (B, R, N, N), rows summing to 1.
    """
    p = _relation_log_probs(x, num_relation_heads, key_padding, "x").exp()
    return torch.nan_to_num(p, nan=0.0)


def _rows_kl(log_t: Tensor, log_s: Tensor, valid_rows: Tensor | None) -> Tensor:
    """Mean over (valid) rows of KL(T || S) from log-probabilities (..., N, M); -inf = no mass."""
    t = log_t.exp()
    terms = torch.where(t > 0, t * (log_t - log_s), torch.zeros_like(t))
    kl = terms.sum(-1)  # (..., N)
    if valid_rows is None:
        return kl.mean()
    w = valid_rows.to(kl.dtype).expand_as(kl)
    return (kl * w).sum() / w.sum().clamp_min(1.0)


def relation_kl(teacher: Tensor, student: Tensor, num_relation_heads: int, key_padding: Tensor | None = None) -> Tensor:
    """``1 / (R N) sum_r sum_t KL(Rel^T_{r,t} || Rel^S_{r,t})`` for one of Q, K, V, averaged over the batch.

    Args:
        teacher, student: (B, H, N, D) or (B, N, C) each (their widths may differ; each is split
            into ``num_relation_heads`` relation heads of its own size).
        num_relation_heads: R.
        key_padding: (B, N) bool, True = real token: padded keys are masked out of the relation
            softmax and padded query rows left out of the mean.

    Returns:
        scalar (mean over batch, relation heads and real query rows).
    """
    t, s = _tokens(teacher, "teacher"), _tokens(student, "student")
    if t.shape[:2] != s.shape[:2]:
        raise ValueError(
            f"teacher and student must cover the same (B, N) tokens, got {tuple(t.shape[:2])} and {tuple(s.shape[:2])}"
        )
    log_t = _relation_log_probs(t.detach(), num_relation_heads, key_padding, "teacher")
    log_s = _relation_log_probs(s, num_relation_heads, key_padding, "student")
    valid = None if key_padding is None else key_padding[:, None, :].to(log_s.device)
    return _rows_kl(log_t, log_s, valid)


def minilm_relation_loss(
    teacher: Sequence[Tensor],
    student: Sequence[Tensor],
    num_relation_heads: int,
    key_padding: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 self-attention relation distillation: ``L_QQ + L_KK + L_VV`` (:func:`relation_kl` each).

    Args:
        teacher, student: (q, k, v) of one layer each, (B, H, N, D) or (B, N, C) (projections
            before rotary positions; grouped-query k, v with their own head count are fine).
        num_relation_heads: R, shared by teacher and student.
        key_padding: (B, N) bool, True = real token.

    Returns:
        scalar loss.
    """
    if len(teacher) != 3 or len(student) != 3:
        raise ValueError(f"teacher and student must be (q, k, v) triples, got {len(teacher)} and {len(student)} items")
    return sum(
        (relation_kl(t, s, num_relation_heads, key_padding) for t, s in zip(teacher, student)),
        start=torch.zeros((), device=student[0].device, dtype=student[0].dtype),
    )


def attention_map_kl(
    teacher: Tensor, student: Tensor, mask: Tensor | None = None, *, average_heads: bool = False
) -> Tensor:
    """Attention-map transfer: mean over heads and query rows of ``KL(A^T_i || A^S_i)``.

    Args:
        teacher, student: (B, H, N, M) attention weights (rows summing to 1; a fully masked row
            may be all zero and is left out of the mean).
        mask: bool broadcastable to (B, H, N, M), True = may attend: keys outside are ignored.
        average_heads: compare the head-averaged maps (B, 1, N, M), e.g. when the teacher and
            the student have different head counts.

    Returns:
        scalar. ``log A^S`` is clamped at the dtype's smallest normal number, so a student that
        gives a key no mass at all where the teacher gives some costs a large finite amount.
    """
    for what, w in (("teacher", teacher), ("student", student)):
        if not isinstance(w, Tensor) or w.dim() != 4 or not w.is_floating_point():
            raise ValueError(f"{what} weights must be a float (B, H, N, M) tensor, got {describe(w)}")
    t, s = teacher.detach(), student
    if average_heads:
        t, s = t.mean(1, keepdim=True), s.mean(1, keepdim=True)
    if t.shape != s.shape:
        raise ValueError(
            f"teacher {tuple(t.shape)} and student {tuple(s.shape)} maps differ; with different head "
            "counts pass average_heads=True"
        )
    if mask is not None:
        keep = mask if not average_heads else mask.any(1, keepdim=True)
        t, s = t.masked_fill(~keep, 0.0), s.masked_fill(~keep, 0.0)
    tiny = torch.finfo(s.dtype).tiny
    terms = torch.special.xlogy(t, t) - t * torch.log(s.clamp_min(tiny))
    kl = torch.where(t > 0, terms, torch.zeros_like(terms)).sum(-1)
    valid = t.sum(-1) > 0
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def activation_attention_map(features: Tensor, p: float = 2.0, *, channel_dim: int = 1) -> Tensor:
    """Activation-based attention map (Zagoruyko & Komodakis 2017): ``vec(mean_c |A_c|^p)``, L2-normalised.

    Args:
        features: (B, C, *spatial) feature maps (``channel_dim=1``), or e.g. (B, N, C) tokens with
            ``channel_dim=-1``.
        p: the power (the paper's default 2).
        channel_dim: the channel dimension.

    Returns:
        (B, S) with S the product of the other dimensions, each row of unit L2 norm.
    """
    if not isinstance(features, Tensor) or features.dim() < 3 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor (B, C, *spatial), got {describe(features)}")
    q = features.abs().pow(p).mean(channel_dim)
    return F.normalize(q.flatten(1), dim=1)


def activation_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0, *, channel_dim: int = 1) -> Tensor:
    """Attention transfer loss ``mean((at(S) - at(T))^2)`` over batch and positions.

    student, teacher: feature maps with the same batch and spatial sizes (channel counts may
    differ); see :func:`activation_attention_map`. Returns a scalar (weight it by the paper's beta).
    """
    a_s = activation_attention_map(student, p, channel_dim=channel_dim)
    a_t = activation_attention_map(teacher.detach(), p, channel_dim=channel_dim)
    if a_s.shape != a_t.shape:
        raise ValueError(f"student and teacher maps differ in size: {tuple(a_s.shape)} vs {tuple(a_t.shape)}")
    return (a_s - a_t).pow(2).mean()
