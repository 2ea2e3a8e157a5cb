"""The math of the attention modifiers: score modifications, relaxed attention, attention
entropy and the spectral-norm estimate of sigmaReparam. Pure functions, no parameters.

Score modifications follow FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``: an
elementwise edit of the scaled logit ``s = q·k / sqrt(D)`` before the softmax. Every function
here is written with broadcasting tensor ops, so the same callable runs inside FlexAttention
(scalar index tensors) and on a whole (B, H, N, M) score tile (broadcast index tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlib.functional._common import nonzero, repeat_kv
from attnlib.masks import AttentionMask

__all__ = [
    "ScoreMod",
    "ScoreModFn",
    "alibi_score_mod",
    "alibi_slopes",
    "apply_score_mod",
    "attention_entropy",
    "compose_score_mods",
    "is_additive",
    "masked_value_mean",
    "relaxed_importance",
    "relaxed_weights",
    "score_bias",
    "shift_queries",
    "spectral_power_step",
    "spectral_sigma",
    "ultravico_score_mod",
    "uniform_weights",
]

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``score_mod(score, b, h, q_idx, kv_idx) -> score'`` (FlexAttention's signature)."""


@dataclass(frozen=True)
class ScoreMod:
    """A score modification with what the code paths need to know about it.

    Attributes:
        fn: ``fn(score, b, h, q_idx, kv_idx) -> score'``, elementwise and broadcastable.
        additive: ``fn(s, ...) == s + fn(0, ...)`` for every s - a score-independent bias (ALiBi),
            which SDPA can take as an additive float mask.
        name: for messages and ``repr``.
    """

    fn: ScoreModFn
    additive: bool = False
    name: str = "score_mod"

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(score, b, h, q_idx, kv_idx)


def is_additive(score_mod: ScoreModFn | None) -> bool:
    """Whether ``score_mod`` is a :class:`ScoreMod` declared as a score-independent additive bias."""
    return isinstance(score_mod, ScoreMod) and score_mod.additive


def compose_score_mods(mods: Sequence[ScoreModFn]) -> ScoreModFn | None:
    """Apply ``mods`` one after the other (None when empty); additive when all of them are."""
    mods = list(mods)
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]

    def fn(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        for m in mods:
            s = m(s, b, h, qi, kj)
        return s

    name = "+".join(getattr(m, "name", "score_mod") for m in mods)
    return ScoreMod(fn, additive=all(is_additive(m) for m in mods), name=name)


def shift_queries(score_mod: ScoreModFn, offset: int) -> ScoreModFn:
    """``score_mod`` with query index ``q_idx + offset``: the queries of a call are positions
    ``offset .. offset + N - 1`` of the sequence (bottom-right aligned decoding, N < M)."""
    if offset == 0:
        return score_mod

    def fn(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        return score_mod(s, b, h, qi + offset, kj)

    return ScoreMod(fn, additive=is_additive(score_mod), name=getattr(score_mod, "name", "score_mod"))


def _indices(shape: tuple[int, int, int, int], device: torch.device, q_start: int) -> tuple[Tensor, ...]:
    b, h, n, m = shape
    return (
        torch.arange(b, device=device).view(b, 1, 1, 1),
        torch.arange(h, device=device).view(1, h, 1, 1),
        torch.arange(q_start, q_start + n, device=device).view(1, 1, n, 1),
        torch.arange(m, device=device).view(1, 1, 1, m),
    )


def apply_score_mod(scores: Tensor, score_mod: ScoreModFn, *, q_start: int = 0) -> Tensor:
    """``score_mod`` on a tile of scores: (B, H, n, M) -> (B, H, n, M).

    The tile holds query rows ``q_start .. q_start + n - 1`` against all M keys; ``score_mod``
    gets broadcast index tensors b (B,1,1,1), h (1,H,1,1), q_idx (1,1,n,1), kv_idx (1,1,1,M).
    """
    b, h, qi, kj = _indices(tuple(scores.shape), scores.device, q_start)  # type: ignore[arg-type]
    out = score_mod(scores, b, h, qi, kj)
    if out.shape != scores.shape:
        out = out.expand(scores.shape)
    return out


def score_bias(
    score_mod: ScoreModFn,
    batch: int,
    heads: int,
    n: int,
    m: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    q_start: int = 0,
) -> Tensor:
    """The bias ``score_mod(0, b, h, q_idx, kv_idx)`` of an additive score mod: (B|1, H|1, n, M).

    Equal to ``score_mod(s) - s`` for every s when ``score_mod`` is additive (:func:`is_additive`);
    dimensions the bias does not depend on stay 1.
    """
    b, h, qi, kj = _indices((batch, heads, n, m), device, q_start)
    bias = score_mod(torch.zeros((), dtype=dtype, device=device), b, h, qi, kj)
    return bias.to(dtype).expand(*bias.shape[:2], n, m) if bias.dim() == 4 else bias.to(dtype).expand(1, 1, n, m)


# ------------------------------------------------------------------------------------------
# ALiBi and UltraViCo
# ------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022): the geometric sequence ``2^(-8/H · (h + 1))``.

    For H a power of two that is the whole rule; otherwise the slopes of the largest power of two
    P < H come first, followed by every other slope of the 2P sequence, H - P of them (the rule
    of the paper's reference code).
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    if p == num_heads:
        return power_of_two(num_heads)
    return power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]


def alibi_score_mod(slopes: Tensor) -> ScoreMod:
    """ALiBi as an additive score mod: ``s - slope[h] · |q_idx - kv_idx|``.

    ``slopes`` (H,) float. Under a causal mask this is the paper's ``-m (i - j)`` for j <= i; without
    one it is the symmetric ``-m |i - j|`` used for bidirectional encoders.
    """

    def fn(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        return s - slopes[h] * (qi - kj).abs()

    return ScoreMod(fn, additive=True, name="alibi")


def ultravico_score_mod(
    alpha: float,
    window: int,
    *,
    beta: float | None = None,
    bands: Sequence[tuple[int, int]] = (),
    exempt_from: int | None = None,
) -> ScoreMod:
    """UltraViCo's decay of out-of-window attention (Zhao et al. 2025), as a score mod.

    A positive score of a pair farther apart than ``window`` tokens is multiplied by ``alpha``::

        s' = factor · s  if s > 0,   s' = s otherwise,
        factor = beta   if |i - j| lies in one of ``bands`` (inclusive distance ranges),
                 alpha  if |i - j| > window,
                 1      otherwise.

    Negative scores are left alone (scaling them by alpha < 1 would raise their weight).
    ``exempt_from``: pairs where the query or the key index is >= it keep their score (e.g. the
    text tokens appended to a video sequence).
    """
    lo = [int(a) for a, _ in bands]
    hi = [int(b) for _, b in bands]
    b_val = 1.0 if beta is None else float(beta)

    def fn(s: Tensor, b: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        d = (qi - kj).abs()
        damped = torch.where(d > window, s * alpha, s)  # s * python float: exact in s's dtype
        for a, z in zip(lo, hi):
            damped = torch.where((d >= a) & (d <= z), s * b_val, damped)
        if exempt_from is not None:
            damped = torch.where((qi >= exempt_from) | (kj >= exempt_from), s, damped)
        return torch.where(s > 0, damped, s)

    return ScoreMod(fn, additive=False, name="ultravico")


# ------------------------------------------------------------------------------------------
# relaxed attention
# ------------------------------------------------------------------------------------------


def uniform_weights(
    am: AttentionMask,
    *,
    uniform_over: str = "allowed",
    rows: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The uniform distribution over each row's keys: (B|1, H|1, n, M) in ``dtype``.

    ``uniform_over="allowed"``: 1 / #allowed on the allowed keys (rows with none are zeros);
    ``"all"``: 1 / M on every key, masked or not. ``rows`` = (s0, s1) limits it to those query rows.
    """
    s0, s1 = rows if rows is not None else (0, am.n)
    if uniform_over == "all":
        return torch.full((1, 1, s1 - s0, am.m), 1.0 / am.m, device=am.device, dtype=dtype)
    allowed = am.dense_rows(s0, s1)
    if allowed is None:
        return torch.full((1, 1, s1 - s0, am.m), 1.0 / am.m, device=am.device, dtype=dtype)
    a = allowed.to(dtype)
    return a / nonzero(a.sum(-1, keepdim=True))


def relaxed_weights(weights: Tensor, am: AttentionMask, gamma: float, *, uniform_over: str = "allowed") -> Tensor:
    """Relaxed attention weights (Lohrenz et al. 2021/2022): ``(1 - gamma) · P + gamma · U``.

    weights (B, H, N, M); U from :func:`uniform_weights`. Rows with no allowed key stay zero.
    """
    u = uniform_weights(am, uniform_over=uniform_over, dtype=weights.dtype)
    out = (1.0 - gamma) * weights + gamma * u
    if uniform_over == "all":
        allowed = am.dense()
        if allowed is not None:
            out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out


def relaxed_importance(
    importance: Tensor, am: AttentionMask, gamma: float, *, uniform_over: str = "allowed", chunk_size: int = 512
) -> Tensor:
    """The importance (B, H, M) of relaxed weights: ``(1 - gamma) · importance + gamma · mean_i U_ij``."""
    dt = torch.float64 if importance.dtype == torch.float64 else torch.float32
    acc = torch.zeros(1, 1, am.m, device=am.device, dtype=dt)
    for s in range(0, am.n, chunk_size):
        e = min(am.n, s + chunk_size)
        u = uniform_weights(am, uniform_over=uniform_over, rows=(s, e), dtype=dt)
        acc = acc + u.expand(*u.shape[:2], e - s, am.m).sum(2)
    return (1.0 - gamma) * importance + gamma * (acc / am.n).to(importance.dtype)


def masked_value_mean(v: Tensor, am: AttentionMask, *, heads: int, chunk_size: int = 512) -> Tensor:
    """The mean of the values each query may attend to: v (B, H_kv, M, Dv) -> (B, H, N, Dv).

    ``out[b, h, i] = mean_{j allowed for (b, h, i)} v[b, h, j]`` (zeros for rows with no allowed
    key) - the output of uniform attention, i.e. the gamma term of relaxed attention. A causal-only
    mask is a running mean (O(N·Dv)); other masks are evaluated per query chunk (O(chunk·M) memory).
    """
    v = repeat_kv(v, heads // v.shape[1])
    b, h, m, dv = v.shape
    n = am.n
    vf = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    if not am.kinds():
        return vf.mean(2, keepdim=True).expand(b, h, n, dv).to(v.dtype)
    if am.kinds() == ["causal"]:
        csum = vf.cumsum(2)  # (B, H, M, Dv): sum of keys 0..j
        last = torch.arange(n, device=v.device) + (m - n)  # key index each query sees up to
        ok = last >= 0
        rows = csum[:, :, last.clamp_min(0)] / (last.clamp_min(0) + 1).to(vf.dtype)[:, None]
        return rows.masked_fill(~ok[:, None], 0.0).to(v.dtype)
    outs = []
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        allowed = am.dense_rows(s, e)
        assert allowed is not None
        a = allowed.expand(*allowed.shape[:2], e - s, m).to(vf.dtype)
        outs.append(torch.matmul(a, vf) / nonzero(a.sum(-1, keepdim=True)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out.expand(b, h, n, dv).to(v.dtype)


# ------------------------------------------------------------------------------------------
# attention entropy and sigmaReparam's spectral norm
# ------------------------------------------------------------------------------------------


def attention_entropy(weights: Tensor) -> Tensor:
    """Entropy of each attention row, ``-sum_j A_ij log A_ij`` (natural log, 0 log 0 = 0).

    weights (..., N, M) with rows summing to 1 (masked keys weigh 0 and so contribute nothing)
    -> (..., N), computed in >= float32. A uniform row over T keys gives log T; a one-hot row 0.
    """
    w = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
    safe = torch.where(w > 0, w, torch.ones_like(w))
    return -(w * safe.log()).sum(-1)


def spectral_power_step(weight: Tensor, u: Tensor, eps: float = 1e-12) -> Tensor:
    """One power-iteration step for the top right singular vector of ``weight`` (out, in):
    ``u' = normalize(W^T normalize(W u))``. u (in,) -> (in,), no gradient."""
    with torch.no_grad():
        v = torch.nn.functional.normalize(weight @ u, dim=0, eps=eps)
        return torch.nn.functional.normalize(weight.transpose(0, 1) @ v, dim=0, eps=eps)


def spectral_sigma(weight: Tensor, u: Tensor, eps: float = 1e-12) -> Tensor:
    """The spectral-norm estimate ``sigma = v^T W u`` with ``v = normalize(W u)`` (= ||W u|| for a unit u).

    Differentiable in ``weight`` (u and v are constants: d sigma / dW = v u^T), never larger than
    the true spectral norm, and equal to it when u is the top right singular vector.
    weight (out, in), u (in,) -> scalar.
    """
    with torch.no_grad():
        v = torch.nn.functional.normalize(weight @ u, dim=0, eps=eps)
    return torch.einsum("o,oi,i->", v, weight, u)
