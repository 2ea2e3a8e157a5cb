"""Additive (Bahdanau) attention and hard stochastic attention trained with REINFORCE.

Additive attention (Bahdanau, Cho & Bengio 2015, "Neural Machine Translation by Jointly
Learning to Align and Translate"; the soft attention of Xu et al. 2015, "Show, Attend and
Tell") scores every query/key pair with a one-hidden-layer network instead of a dot product:

    e_ij = v^T tanh(W q_i + U k_j + b),     alpha_i = softmax_j(e_ij / T),     z_i = sum_j alpha_ij v_j

per head, with W, U (D, A), b, v (A,). Hard stochastic attention (Xu et al. 2015, Sec. 4.1)
draws one location s_i ~ Multinoulli(alpha_i) and attends to it alone, z_i = v_{s_i}; it is
trained with the score-function (REINFORCE) estimator of the paper's variational lower bound:
:func:`reinforce_surrogate` is a loss whose gradient is

    lambda_r (C - b) d log p(s | a) / dW  -  lambda_e dH[alpha] / dW,

C the per-sequence negative log-likelihood, b a moving-average baseline
(:func:`update_baseline`: b <- 0.9 b + 0.1 mean(C)), H the entropy of alpha.

Masked entries get alpha = 0 and are never sampled; a row with no allowed key gives zeros.
Scores are computed query chunk by query chunk: memory O(chunk · M · A) per (batch, head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.functional._common import acc_dtype, as_attention_mask
from attnlib.functional.softmax import _softmax_rows
from attnlib.masks import MaskLike

__all__ = [
    "additive_attention",
    "additive_scores",
    "attention_entropy",
    "hard_attention",
    "reinforce_surrogate",
    "sample_attention",
    "update_baseline",
]

_CHUNK_ELEMENTS = 1 << 21  # scores' hidden activations per chunk (B·H·rows·M·A)


def _check_params(q: Tensor, w_q: Tensor, w_k: Tensor, score: Tensor, bias: Tensor | None) -> int:
    h, d = q.shape[1], q.shape[3]
    if w_q.dim() != 3 or w_q.shape[:2] != (h, d):
        raise ValueError(f"additive attention: w_q must be (H={h}, D={d}, A), got {tuple(w_q.shape)}")
    a = w_q.shape[2]
    if tuple(w_k.shape) != (h, d, a):
        raise ValueError(f"additive attention: w_k must be (H={h}, D={d}, A={a}), got {tuple(w_k.shape)}")
    if tuple(score.shape) != (h, a):
        raise ValueError(f"additive attention: the score vector v must be (H={h}, A={a}), got {tuple(score.shape)}")
    if bias is not None and tuple(bias.shape) != (h, a):
        raise ValueError(f"additive attention: bias must be (H={h}, A={a}) or None, got {tuple(bias.shape)}")
    return a


def additive_scores(
    q: Tensor,
    k: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    score: Tensor,
    bias: Tensor | None = None,
    *,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """The additive scores ``e_ij = v^T tanh(W q_i + U k_j + b)`` of query rows ``rows``.

    Args:
        q: (B, H, N, D) queries; k: (B, H, M, D) keys (as many heads as q).
        w_q, w_k: (H, D, A) the per-head maps W and U; score: (H, A) the vector v; bias: (H, A) or None.
        rows: (s0, s1) query rows to score (default all).

    Returns:
        (B, H, s1 - s0, M) scores in the accumulation dtype (float32 for half inputs).
    """
    _check_params(q, w_q, w_k, score, bias)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"additive attention needs as many key heads as query heads, got {k.shape[1]} and {q.shape[1]}"
        )
    s0, s1 = rows if rows is not None else (0, q.shape[2])
    acc = acc_dtype(q.dtype)
    qa = torch.einsum("bhnd,hda->bhna", q[:, :, s0:s1].to(acc), w_q.to(acc))
    ka = torch.einsum("bhmd,hda->bhma", k.to(acc), w_k.to(acc))
    if bias is not None:
        ka = ka + bias.to(acc)[None, :, None, :]
    hidden = torch.tanh(qa.unsqueeze(3) + ka.unsqueeze(2))  # (B, H, rows, M, A)
    return torch.einsum("bhnma,ha->bhnm", hidden, score.to(acc))


def additive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    score: Tensor,
    bias: Tensor | None = None,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft additive attention: ``alpha = softmax(e / T)`` over the allowed keys, ``out = alpha v``.

    Args:
        q: (B, H, N, D); k: (B, H, M, D); v: (B, H, M, Dv).
        w_q, w_k, score, bias: the additive parameters (see :func:`additive_scores`).
        mask, causal: True = may attend (any :mod:`attnlib.masks` kind; causal bottom-right aligned).
        temperature: T > 0 divides the scores (the paper's hard mode uses T = 1).
        dropout_p: dropout on alpha before it averages v (the returned weights are before dropout).
        chunk_size: query rows per step (default: bounded by the hidden activations' size).

    Returns:
        (out (B, H, N, Dv), weights alpha (B, H, N, M)). Rows with no allowed key are zeros.
    """
    check_qkv(q, k, v, where="additive_attention")
    if not temperature > 0:
        raise ValueError(f"additive_attention: temperature must be > 0, got {temperature!r}")
    am = as_attention_mask(q, k, mask, causal)
    b, h, n, _ = q.shape
    m = k.shape[2]
    a = _check_params(q, w_q, w_k, score, bias)
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, b * h * m * a))
    positive_int(step, "additive_attention: chunk_size")
    weights = []
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        e = additive_scores(q, k, w_q, w_k, score, bias, rows=(s0, s1)) / temperature
        weights.append(_softmax_rows(e, am.dense_rows(s0, s1)))
    w = torch.cat(weights, 2) if len(weights) > 1 else weights[0]
    wd = F.dropout(w, dropout_p) if dropout_p > 0 else w
    return torch.matmul(wd.to(v.dtype), v), w.to(q.dtype)


def sample_attention(weights: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one location per row, ``s ~ Multinoulli(weights)``: (B, H, N, M) -> (one_hot, log_prob (B, H, N)).

    Rows whose weights are all zero (no allowed key) give a zero row and log_prob 0. Locations
    with weight 0 (masked) are never drawn. ``log_prob`` is ``log weights[s]`` and carries the
    gradient of the weights (the score function); ``one_hot`` carries none.
    """
    flat = weights.detach().reshape(-1, weights.shape[-1]).float()
    live = flat.sum(-1) > 0
    safe = torch.where(live[:, None], flat, torch.ones_like(flat))
    idx = torch.multinomial(safe, 1, generator=generator).squeeze(-1)
    one_hot = F.one_hot(idx, weights.shape[-1]).to(weights.dtype) * live[:, None].to(weights.dtype)
    one_hot = one_hot.reshape(weights.shape)
    picked = (weights * one_hot).sum(-1)
    log_prob = torch.where(picked > 0, torch.log(torch.where(picked > 0, picked, torch.ones_like(picked))), 0.0)
    return one_hot, log_prob


def attention_entropy(weights: Tensor) -> Tensor:
    """Entropy ``-sum_j alpha_j log alpha_j`` of each row (0 log 0 = 0): (..., M) -> (...)."""
    pos = weights > 0
    logw = torch.log(torch.where(pos, weights, torch.ones_like(weights)))
    return -(weights * logw).sum(-1)


def hard_attention(weights: Tensor, v: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attend with one location per row chosen from ``weights`` (B, H, N, M) over v (B, H, M, Dv).

    ``mode``: "sample" draws ``s ~ Multinoulli(weights)`` (:func:`sample_attention`), "argmax"
    takes the most probable location, "expected" keeps the weights (soft attention).

    Returns:
        (out (B, H, N, Dv), the weights used (B, H, N, M), log p(s) (B, H, N) or None unless sampled).
    """
    if mode == "sample":
        used, log_prob = sample_attention(weights)
    elif mode == "argmax":
        live = weights.sum(-1, keepdim=True) > 0
        used, log_prob = torch.zeros_like(weights).scatter_(-1, weights.argmax(-1, keepdim=True), 1.0) * live, None
    elif mode == "expected":
        used, log_prob = weights, None
    else:
        raise ValueError(f"hard_attention: mode must be 'sample', 'argmax' or 'expected', got {mode!r}")
    return torch.matmul(used.to(v.dtype), v), used, log_prob


def reinforce_surrogate(
    log_prob: Tensor | None,
    entropy: Tensor,
    cost: Tensor,
    baseline: Tensor | float,
    *,
    valid: Tensor | None = None,
    reward_scale: float = 0.1,
    entropy_weight: float = 0.0,
) -> Tensor:
    """A loss whose gradient is the REINFORCE estimate for hard attention (Xu et al. 2015, eq. 12).

    Per sequence b, with ``L_b`` = log p(s) and ``H_b`` = entropy of alpha summed over its heads
    and valid steps: ``mean_b[ reward_scale · (C_b - b) · L_b - entropy_weight · H_b ]``, the
    cost difference treated as a constant. Its gradient is ``lambda_r (C - b) d log p(s) -
    lambda_e dH`` averaged over the batch: descending it lowers the expected cost (and raises
    the entropy of alpha).

    Args:
        log_prob: (B, H, N) log-probability of each sampled location (with gradient), or None
            when the call did not sample (then only the entropy term remains).
        entropy: (B, H, N) entropy of each alpha row (with gradient).
        cost: (B,) each sequence's negative log-likelihood C (gradient ignored).
        baseline: the moving-average baseline b (a scalar).
        valid: (B, N) bool, the steps that belong to the sequence (not padding), or None for all.
        reward_scale: lambda_r (the official code divides by 10).
        entropy_weight: lambda_e.

    Returns:
        A scalar.
    """
    if cost.dim() != 1 or entropy.dim() != 3 or entropy.shape[0] != cost.shape[0]:
        raise ValueError(
            f"reinforce_surrogate: entropy must be (B, H, N) and cost (B,), got {tuple(entropy.shape)} "
            f"and {tuple(cost.shape)}"
        )
    if log_prob is not None and log_prob.shape != entropy.shape:
        raise ValueError(
            f"reinforce_surrogate: log_prob {tuple(log_prob.shape)} must match entropy {tuple(entropy.shape)}"
        )
    keep = torch.ones_like(entropy[:, 0]) if valid is None else valid.to(entropy.dtype)
    if keep.shape != entropy[:, 0].shape:
        raise ValueError(
            f"reinforce_surrogate: valid must be (B, N) = {tuple(entropy[:, 0].shape)}, got {tuple(keep.shape)}"
        )
    keep = keep[:, None]
    loss = -entropy_weight * (entropy * keep).sum((1, 2))
    if log_prob is not None:
        advantage = (cost.detach() - baseline).to(log_prob.dtype)
        loss = loss + reward_scale * advantage * (log_prob * keep).sum((1, 2))
    return loss.mean()


def update_baseline(baseline: Tensor, cost: Tensor, momentum: float = 0.9) -> Tensor:
    """The paper's moving-average baseline: ``b <- momentum · b + (1 - momentum) · mean(C)`` (no gradient)."""
    return momentum * baseline + (1.0 - momentum) * cost.detach().mean().to(baseline.dtype)
