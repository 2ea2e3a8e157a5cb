"""Kernelised linear attention: Linear Transformer, Performer (FAVOR+), cosFormer, linear self-attention.

All functions take q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) (H a multiple of
H_kv) and return (B, H, N, Dv) in the input dtype; fp16/bf16 inputs are computed and
accumulated in float32. They honour ``causal=True`` (N == M) and key padding ``mask`` (B, M)
(True = real key); other masks raise :class:`attnlib.UnsupportedError`. Rows with no key
return zeros.

Common keyword arguments:

* ``chunk_size``: chunk length C of the causal chunked parallel form (any C gives the same
  result as the quadratic causal form); no N x N tensor is built on the fast path.
* ``explicit=True``: compute through the quadratic (N x M) matrix instead - a slow reference
  mode for inspection. ``return_weights=True`` (implies ``explicit``) also returns that matrix
  W (B, H, N, M), with ``out == W @ v``.
* ``return_importance=True``: also return the attention mass each key receives, averaged over
  queries (B, H, M) - the column means of W, computed in O(N) on the fast path.

Return value: ``out``, or the tuple ``(out, weights?, importance?)`` of the requested extras.

Recurrent decoding: each family's ``*_step(q, k, v, state, ...)`` takes one token, q and k
(B, H, 1, D) and v (B, H, 1, Dv), and the state dict of the tokens before it (tensors in the
accumulation dtype; the keys are listed per function), and returns ``(out (B, H, 1, Dv) in q's
dtype, new state)``; fed a sequence token by token it equals the causal parallel form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, describe, positive_int
from attnlib.functional._common import acc_dtype, nonzero, repeat_kv, safe_div, sequence_extent
from attnlib.functional._scan import (
    FinishFn,
    blocked_attention,
    causal_chunk_max,
    column_mass,
    grad_free,
    kernel_step,
    linear_scan,
    pack_result,
    prefix_mask,
    split_mask,
)
from attnlib.masks import MaskLike

__all__ = [
    "FEATURE_MAPS",
    "cosformer_attention",
    "cosformer_features",
    "cosformer_step",
    "linear_attention",
    "linear_self_attention",
    "linear_step",
    "lsa_step",
    "performer_attention",
    "performer_feature_logits",
    "performer_projection",
    "performer_step",
]

Result = Tensor | tuple[Tensor, ...]
State = dict[str, Tensor]
FeatureMap = Literal["elu", "relu", "identity"] | Callable[[Tensor], Tensor]


def _elu1(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": _elu1,
    "relu": F.relu,
    "identity": lambda x: x,
}


def _feature_map(fm: FeatureMap) -> Callable[[Tensor], Tensor]:
    if callable(fm):
        return fm
    if fm not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {fm!r}")
    return FEATURE_MAPS[fm]


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, mask: MaskLike | list[MaskLike], causal: bool, where: str
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool, torch.dtype]:
    """Validate, repeat GQA heads, cast to the accumulation dtype; -> (q, k, v, key_padding, causal, dtype)."""
    check_qkv(q, k, v, where=where)
    kp, causal = split_mask(q, k, mask, causal, where=where)
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    dt = acc_dtype(q.dtype)
    return q.to(dt), k.to(dt), v.to(dt), kp, causal, dt


def _mask_keys(kf: Tensor, kp: Tensor | None) -> Tensor:
    """Zero the feature rows of padded keys: kf (B, H, M, F), kp (B, M)."""
    return kf if kp is None else kf * kp[:, None, :, None].to(kf.dtype)


def _causal_zero(a: Tensor, causal: bool) -> Tensor:
    return a.masked_fill(~prefix_mask(a.shape[-1], a.device), 0.0) if causal else a


def _finisher(eps_mode: str, eps: float, inplace: bool) -> FinishFn:
    """Row normalisation of the blocked fast path: num / norm(den) (see :func:`_normalised`)."""

    def finish(num: Tensor, den: Tensor | None, batch: slice, s: int, e: int) -> Tensor:
        assert den is not None
        if eps_mode == "add":
            d = den.add_(eps) if inplace else den + eps
        elif eps_mode == "clamp":
            d = den.clamp_min_(eps) if inplace else den.clamp_min(eps)
        else:  # guard: a zero denominator means a zero numerator (no key with weight)
            d = torch.where(den != 0, den, torch.ones_like(den))
        return num.div_(d.unsqueeze(-1)) if inplace else num / d.unsqueeze(-1)

    return finish


def _fast(q: Tensor, k: Tensor, v: Tensor, kp: Tensor | None, causal: bool, chunk_size: int, **kw: object) -> Tensor:
    return blocked_attention(q, k, v, causal=causal, chunk_size=chunk_size, key_valid=kp, **kw)  # type: ignore[arg-type]


def _step_tokens(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding token (B, H, 1, D) in the accumulation dtype."""
    dt = acc_dtype(q.dtype)
    return q.to(dt), k.to(dt), v.to(dt)


# --------------------------------------------------------------------------------------------
# Linear Transformer
# --------------------------------------------------------------------------------------------


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: FeatureMap = "elu",
    causal: bool = False,
    eps: float = 1e-6,
    mask: MaskLike | list[MaskLike] = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """Linear attention (Katharopoulos et al., "Transformers are RNNs", ICML 2020).

    ``out_i = φ(q_i)^T (Σ_j φ(k_j) v_j^T) / (φ(q_i) · Σ_j φ(k_j) + eps)`` with sums over
    j <= i when causal, i.e. ``W = A / (A 1 + eps)`` for ``A = φ(Q) φ(K)^T``.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        feature_map: "elu" (elu(x) + 1, the paper's), "relu", "identity" or a callable.
        causal: prefix sums (N == M), by the chunked parallel form.
        eps: added to the denominator (fast-transformers' convention).
        mask: key padding (B, M) bool (True = real key).
        chunk_size, explicit, return_weights, return_importance: see the module docstring.

    Returns:
        (B, H, N, Dv), or ``(out, weights?, importance?)``.
    """
    positive_int(chunk_size, "chunk_size")
    out_dtype = q.dtype
    q, k, v, kp, causal, _ = _prepare(q, k, v, mask, causal, "linear_attention")
    phi = _feature_map(feature_map)
    if not (explicit or return_weights or return_importance):
        inplace = grad_free(q, k, v)
        if feature_map == "elu" and inplace:

            def fmap(x: Tensor, start: int) -> Tensor:
                return F.elu(x).add_(1.0)
        else:

            def fmap(x: Tensor, start: int) -> Tensor:
                return phi(x)

        out = _fast(q, k, v, kp, causal, chunk_size, qmap=fmap, kmap=fmap, finish=_finisher("add", eps, inplace))
        return out.to(out_dtype)
    qf, kf = phi(q), _mask_keys(phi(k), kp)
    return _normalised(
        qf, kf, v, causal, eps, "add", chunk_size, explicit, return_weights, return_importance, out_dtype
    )


def linear_step(
    q: Tensor, k: Tensor, v: Tensor, state: State, *, feature_map: FeatureMap = "elu", eps: float = 1e-6
) -> tuple[Tensor, State]:
    """One causal decoding step of :func:`linear_attention` (see the module docstring).

    State: ``S`` (B, H, D, Dv) = Σ φ(k_j) v_j^T and ``z`` (B, H, D) = Σ φ(k_j) over the past
    tokens (zeros before the first); ``out = φ(q)^T S / (φ(q)·z + eps)``.
    """
    phi = _feature_map(feature_map)
    qd, kd, vd = _step_tokens(q, k, v)
    num, den, s, z = kernel_step(phi(qd)[:, :, 0], phi(kd)[:, :, 0], vd[:, :, 0], state["S"], state["z"])
    assert den is not None
    return (num / (den + eps))[:, :, None].to(q.dtype), {"S": s, "z": z}  # type: ignore[dict-item]


def _normalised(
    qf: Tensor,
    kf: Tensor,
    v: Tensor,
    causal: bool,
    eps: float,
    eps_mode: str,
    chunk_size: int,
    explicit: bool,
    return_weights: bool,
    return_importance: bool,
    out_dtype: torch.dtype | None,
    log_decay: Tensor | None = None,
) -> Result:
    """Normalised kernel attention ``out = (A v) / norm(A 1)`` for ``A = qf kf^T``.

    ``eps_mode``: "add" (den + eps), "clamp" (max(den, eps)) or "guard" (den, 0 where den == 0).
    """

    def norm(den: Tensor) -> Tensor:
        if eps_mode == "add":
            return den + eps
        if eps_mode == "clamp":
            return den.clamp_min(eps)
        return den

    n = qf.shape[2]
    weights = importance = None
    if explicit or return_weights:
        a = _causal_zero(qf @ kf.transpose(-1, -2), causal)
        w = safe_div(a, norm(a.sum(-1, keepdim=True)))
        out = w @ v
        weights = w
        importance = w.mean(-2) if return_importance else None
    else:
        num, den = linear_scan(qf, kf, v, causal=causal, chunk_size=chunk_size, log_decay=log_decay)
        assert den is not None
        d = norm(den)[..., None]
        out = safe_div(num, d)
        if return_importance:
            r = safe_div(qf, d)
            importance = column_mass(r, kf, causal=causal, chunk_size=chunk_size, log_decay=log_decay) / n
    return _finish(out, weights, importance, out_dtype, return_weights, return_importance)


def _finish(
    out: Tensor,
    weights: Tensor | None,
    importance: Tensor | None,
    out_dtype: torch.dtype | None,
    return_weights: bool,
    return_importance: bool,
) -> Result:
    if out_dtype is not None:
        out = out.to(out_dtype)
        weights = weights.to(out_dtype) if weights is not None else None
        importance = importance.to(out_dtype) if importance is not None else None
    return pack_result(out, weights, importance, return_weights=return_weights, return_importance=return_importance)


# --------------------------------------------------------------------------------------------
# Performer (FAVOR+)
# --------------------------------------------------------------------------------------------


def performer_projection(
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    scaling: Literal["chi", "sqrt_d"] = "chi",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random projection W (m, D) of FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

    ``orthogonal=True``: blocks of D exactly orthogonal rows, each block the Q factor of the QR
    decomposition of a Gaussian D x D matrix with the **sign fix** (columns of Q multiplied by
    ``sign(diag(R))``, which makes Q Haar-distributed; without it the estimator is biased).
    Rows are then rescaled to the norms of independent N(0, I_D) vectors (``scaling="chi"``,
    so each row is marginally Gaussian and the estimator unbiased) or to sqrt(D)
    (``scaling="sqrt_d"``). ``orthogonal=False``: i.i.d. N(0, I_D) rows.

    Deterministic given ``generator`` (sampling runs on the CPU in float64).

    Returns:
        (num_features, head_dim) tensor of ``dtype`` on ``device``.
    """
    positive_int(num_features, "num_features")
    positive_int(head_dim, "head_dim")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    m, d = num_features, head_dim
    if not orthogonal:
        w = torch.randn(m, d, generator=generator, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        sign = torch.sign(torch.diagonal(r))
        sign[sign == 0] = 1.0
        blocks.append((qm * sign).T)  # rows orthonormal
    w = torch.cat(blocks)[:m]
    if scaling == "chi":
        norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((m,), math.sqrt(d), dtype=torch.float64)
    return (w * norms[:, None]).to(dtype=dtype, device=device)


def performer_feature_logits(x: Tensor, projection: Tensor, scale: float) -> Tensor:
    """Log of the positive random features: ``a = W x' - |x'|^2 / 2`` with ``x' = sqrt(scale) x``.

    ``φ(x) = exp(a) / sqrt(m)`` satisfies ``E[φ(q)·φ(k)] = exp(scale · q·k)``.
    x (..., D), projection (m, D) -> (..., m).
    """
    xs = x * math.sqrt(scale)
    return xs @ projection.to(xs.dtype).T - 0.5 * xs.square().sum(-1, keepdim=True)


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: MaskLike | list[MaskLike] = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """FAVOR+ attention with positive random features (Choromanski et al., ICLR 2021).

    ``φ(x) = exp(W x' - |x'|^2/2) / sqrt(m)``, ``x' = sqrt(scale) x`` (default scale D^-1/2), so
    ``φ(q)·φ(k)`` is an unbiased estimate of ``exp(q·k / sqrt(D))`` and
    ``out_i = φ(q_i)^T Σ_j φ(k_j) v_j^T / φ(q_i)·Σ_j φ(k_j)`` estimates softmax attention.

    Numerical stabilisation (exact: every shift cancels in the ratio; there is no additive
    epsilon, so the result is the estimator itself): query features are shifted by their
    per-token maximum; key features by their maximum over the valid keys (non-causal) or by a
    running maximum at chunk granularity (causal, with the running state rescaled when the
    maximum grows), so no future key enters a query's shift beyond its own chunk. Features are
    computed in float32 or better.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        projection: (m, D), e.g. from :func:`performer_projection`.
        causal, mask, chunk_size, explicit, return_weights, return_importance: see the module docstring.
        scale: softmax temperature approximated; default D^-1/2.

    Returns:
        (B, H, N, Dv), or ``(out, weights?, importance?)``.
    """
    positive_int(chunk_size, "chunk_size")
    out_dtype = q.dtype
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(
            f"performer_attention: projection must be (num_features, D={q.shape[-1]}), got {tuple(projection.shape)}"
        )
    q, k, v, kp, causal, _dt = _prepare(q, k, v, mask, causal, "performer_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (explicit or return_weights or return_importance):

        def qmap(x: Tensor, start: int) -> Tensor:
            a = performer_feature_logits(x, projection, scale)
            return torch.exp(a - a.amax(-1, keepdim=True).detach())

        def kmap(x: Tensor, start: int) -> Tensor:
            return performer_feature_logits(x, projection, scale)

        out = _fast(
            q,
            k,
            v,
            kp,
            causal,
            chunk_size,
            qmap=qmap,
            kmap=kmap,
            finish=_finisher("guard", 0.0, grad_free(q, k, v, projection)),
            key_logits=True,
            width=projection.shape[0],
        )
        return out.to(out_dtype)
    aq = performer_feature_logits(q, projection, scale)
    ak = performer_feature_logits(k, projection, scale)
    qf = torch.exp(aq - aq.amax(-1, keepdim=True).detach())
    if kp is not None:
        ak = ak.masked_fill(~kp[:, None, :, None], float("-inf"))
    sk = ak.amax(-1).detach()  # (B, H, M)
    log_decay = None
    if causal and not (explicit or return_weights):
        shift, log_decay = causal_chunk_max(sk, chunk_size)
    else:
        glob = sk.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(glob), glob, torch.zeros_like(glob)).expand_as(sk)
    kf = torch.exp(ak - shift[..., None])
    return _normalised(
        qf,
        kf,
        v,
        causal,
        0.0,
        "guard",
        chunk_size,
        explicit,
        return_weights,
        return_importance,
        out_dtype,
        log_decay,
    )


def performer_step(
    q: Tensor, k: Tensor, v: Tensor, state: State, projection: Tensor, *, scale: float | None = None
) -> tuple[Tensor, State]:
    """One causal decoding step of :func:`performer_attention` (see the module docstring).

    State: ``S`` (B, H, m, Dv), ``z`` (B, H, m) - the running sums of the key features
    ``exp(a_k - shift)`` (:func:`performer_feature_logits`) - and ``shift`` (B, H), their running
    maximum logit (-inf before the first token); the sums are rescaled when it grows, so the
    result equals the stabilised causal parallel form. ``scale`` defaults to D**-0.5.
    """
    qd, kd, vd = _step_tokens(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    aq = performer_feature_logits(qd[:, :, 0], projection, scale)
    ak = performer_feature_logits(kd[:, :, 0], projection, scale)
    qf = torch.exp(aq - aq.amax(-1, keepdim=True))
    shift = torch.maximum(state["shift"], ak.amax(-1))
    decay = torch.exp(state["shift"] - shift)
    kf = torch.exp(ak - shift[..., None])
    num, den, s, z = kernel_step(qf, kf, vd[:, :, 0], state["S"], state["z"], decay=decay)
    out = num / nonzero(den)  # type: ignore[arg-type]
    return out[:, :, None].to(q.dtype), {"S": s, "z": z, "shift": shift}  # type: ignore[dict-item]


# --------------------------------------------------------------------------------------------
# cosFormer
# --------------------------------------------------------------------------------------------


def cosformer_features(x: Tensor, length: int, *, offset: int = 0) -> Tensor:
    """cosFormer features ``[relu(x_i) sin(a_i), relu(x_i) cos(a_i)]``, ``a_i = (π/2)·i / length``.

    Positions are 1-based: row r of x (..., T, D) has ``i = offset + r + 1``. Returns (..., T, 2D),
    so ``f(q_i)·f(k_j) = relu(q_i)·relu(k_j) · cos((π/2)(i - j)/length)``.
    """
    t = x.shape[-2]
    pos = torch.arange(offset + 1, offset + t + 1, device=x.device, dtype=x.dtype)
    ang = (math.pi / 2) * pos / length
    trig = torch.stack([ang.sin(), ang.cos()], -1)[:, :, None]  # (T, 2, 1)
    return (F.relu(x).unsqueeze(-2) * trig).flatten(-2)


def cosformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    max_len: int | None = None,
    mask: MaskLike | list[MaskLike] = None,
    query_padding: Tensor | None = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """cosFormer (Qin et al., "cosFormer: Rethinking Softmax in Attention", ICLR 2022).

    ReLU features with a cos re-weighting that decomposes into sin/cos features:
    ``A_ij = relu(q_i)·relu(k_j) · cos((π/2)(i - j)/L)``, positions i, j 1-based,
    ``out_i = Σ_j A_ij v_j / max(Σ_j A_ij, eps)`` (sums over j <= i when causal).
    ``L = max(N, M)`` as in the official code, or ``max_len`` when given (needed for decoding,
    where the final length is not known; it must be >= max(N, M)). With key padding and no
    ``max_len``, L is each example's own length ``max(N_b, M_b)``: M_b = the position of its
    last real key, N_b = that of its last real query (``query_padding``; N when None), so a
    padded example equals the example run alone (the official code takes the padded length).

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        eps: lower clamp of the denominator (official value 1e-6).
        max_len: fixed L; default max(N, M) (per example with padding, see above).
        query_padding: (B, N) bool of real queries (self-attention: the key padding) or None;
            it only sets N_b.
        causal, mask, chunk_size, explicit, return_weights, return_importance: see the module docstring.

    Returns:
        (B, H, N, Dv), or ``(out, weights?, importance?)``.
    """
    positive_int(chunk_size, "chunk_size")
    out_dtype = q.dtype
    q, k, v, kp, causal, _ = _prepare(q, k, v, mask, causal, "cosformer_attention")
    b, _, n, _ = q.shape
    m = k.shape[2]
    if max_len is not None and int(max_len) < max(n, m):
        raise ValueError(f"cosformer_attention: max_len={max_len} is shorter than the sequences (N={n}, M={m})")
    if query_padding is not None and (query_padding.dtype != torch.bool or tuple(query_padding.shape) != (b, n)):
        raise ValueError(
            f"cosformer_attention: query_padding must be a bool (B, N) = ({b}, {n}) tensor, "
            f"got {describe(query_padding)}"
        )
    args = (causal, eps, chunk_size, explicit, return_weights, return_importance, out_dtype)
    if max_len is not None or (kp is None and query_padding is None):
        return _cosformer(q, k, v, kp, max(n, m) if max_len is None else int(max_len), *args)
    lengths = torch.maximum(sequence_extent(query_padding, n, b, q.device), sequence_extent(kp, m, b, q.device))
    lengths = lengths.clamp_min(1)
    groups = [(int(length), (lengths == length).nonzero().flatten()) for length in lengths.unique().tolist()]
    if len(groups) == 1:
        return _cosformer(q, k, v, kp, groups[0][0], *args)
    parts = [
        _cosformer(q[i], k[i], v[i], None if kp is None else kp[i], length, *args) for length, i in groups
    ]  # one call per distinct length: L enters every feature
    order = torch.argsort(torch.cat([i for _, i in groups]))
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)[order]  # type: ignore[arg-type]
    return tuple(torch.cat([p[j] for p in parts])[order] for j in range(len(parts[0])))


def _cosformer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kp: Tensor | None,
    length: int,
    causal: bool,
    eps: float,
    chunk_size: int,
    explicit: bool,
    return_weights: bool,
    return_importance: bool,
    out_dtype: torch.dtype,
) -> Result:
    """:func:`cosformer_attention` with one length L for the whole batch (inputs prepared)."""
    if not (explicit or return_weights or return_importance):

        def fmap(x: Tensor, start: int) -> Tensor:
            return cosformer_features(x, length, offset=start)

        inplace = grad_free(q, k, v)
        out = _fast(
            q,
            k,
            v,
            kp,
            causal,
            chunk_size,
            qmap=fmap,
            kmap=fmap,
            finish=_finisher("clamp", eps, inplace),
            width=2 * q.shape[-1],
        )
        return out.to(out_dtype)
    qf = cosformer_features(q, length)
    kf = _mask_keys(cosformer_features(k, length), kp)
    return _normalised(
        qf, kf, v, causal, eps, "clamp", chunk_size, explicit, return_weights, return_importance, out_dtype
    )


def cosformer_step(
    q: Tensor, k: Tensor, v: Tensor, state: State, *, max_len: int, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """One causal decoding step of :func:`cosformer_attention` with the fixed length ``max_len``.

    State: ``S`` (B, H, 2D, Dv), ``z`` (B, H, 2D) - running sums of the key features
    (:func:`cosformer_features`) - and ``pos`` (a 0-d long tensor, the number of past tokens).
    ``out = f(q)^T S / max(f(q)·z, eps)``. Raises ValueError past ``max_len`` tokens.
    """
    pos = int(state["pos"])
    if pos >= max_len:
        raise ValueError(f"cosformer step: position {pos + 1} exceeds max_len={max_len}")
    qd, kd, vd = _step_tokens(q, k, v)
    qf = cosformer_features(qd, max_len, offset=pos)[:, :, 0]
    kf = cosformer_features(kd, max_len, offset=pos)[:, :, 0]
    num, den, s, z = kernel_step(qf, kf, vd[:, :, 0], state["S"], state["z"])
    out = num / den.clamp_min(eps)  # type: ignore[union-attr]
    return out[:, :, None].to(q.dtype), {"S": s, "z": z, "pos": state["pos"] + 1}  # type: ignore[dict-item]


# --------------------------------------------------------------------------------------------
# Linear self-attention (no feature map, no normalisation)
# --------------------------------------------------------------------------------------------

LSANorm = Literal["none", "n", "prefix_count"]


def lsa_counts(kp: Tensor | None, b: int, n: int, m: int, causal: bool, normalize: str, device, dtype) -> Tensor:
    """Divisor of each query row: (B, 1, N, 1)."""
    if normalize == "none":
        return torch.ones(1, 1, 1, 1, device=device, dtype=dtype)
    valid = torch.ones(b, m, device=device, dtype=dtype) if kp is None else kp.to(dtype)
    if normalize == "n" or not causal:
        cnt = valid.sum(-1)[:, None, None, None].expand(b, 1, n, 1)
    else:
        cnt = valid.cumsum(-1)[:, None, :, None]
    return cnt.clamp_min(1.0)


def linear_self_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    normalize: LSANorm = "n",
    scale: float = 1.0,
    mask: MaskLike | list[MaskLike] = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """Un-normalised linear self-attention, ``out = (scale · Q K^T ⊙ mask) V / n``.

    The layer of the in-context-learning analyses (von Oswald et al. 2023; Mahankali, Hashimoto
    & Ma, "One Step of Gradient Descent is Provably the Optimal In-Context Learner with One
    Layer of Linear Self-Attention", 2023): no feature map and no softmax/row normalisation, so
    suitable weights make it one step of gradient descent on in-context least squares.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        normalize: "n" - divide by the number of (real) keys M (the papers' 1/n);
            "prefix_count" - by the number of keys each query sees (i + 1 when causal; equals
            "n" otherwise); "none".
        scale: multiplies Q K^T (default 1, as in the papers).
        causal, mask, chunk_size, explicit, return_weights, return_importance: see the module docstring.

    Returns:
        (B, H, N, Dv), or ``(out, weights?, importance?)``. Weights may be negative.
    """
    positive_int(chunk_size, "chunk_size")
    if normalize not in ("none", "n", "prefix_count"):
        raise ValueError(f"normalize must be 'none', 'n' or 'prefix_count', got {normalize!r}")
    out_dtype = q.dtype
    q, k, v, kp, causal, dt = _prepare(q, k, v, mask, causal, "linear_self_attention")
    b, _, n, _ = q.shape
    cnt = lsa_counts(kp, b, n, k.shape[2], causal, normalize, q.device, dt)
    if not (explicit or return_weights or return_importance):
        inplace = grad_free(q, k, v)

        def qmap(x: Tensor, start: int) -> Tensor:
            return x * scale if scale != 1.0 else x

        def kmap(x: Tensor, start: int) -> Tensor:
            return x

        def finish(num: Tensor, den: Tensor | None, batch: slice, s: int, e: int) -> Tensor:
            c = cnt if cnt.shape[0] == 1 else cnt[batch]  # (B' or 1, 1, N or 1, 1)
            c = c if c.shape[2] == 1 else c[:, :, s:e]
            return num.div_(c) if inplace else num / c

        out = _fast(q, k, v, kp, causal, chunk_size, qmap=qmap, kmap=kmap, finish=finish, need_den=False)
        return out.to(out_dtype)
    qf = q * scale
    kf = _mask_keys(k, kp)
    weights = importance = None
    if explicit or return_weights:
        w = _causal_zero(qf @ kf.transpose(-1, -2), causal) / cnt
        out = w @ v
        weights = w
        importance = w.mean(-2) if return_importance else None
    else:
        num, _ = linear_scan(qf, kf, v, causal=causal, chunk_size=chunk_size, need_den=False)
        out = num / cnt
        if return_importance:
            importance = column_mass(qf / cnt, kf, causal=causal) / n
    return _finish(out, weights, importance, out_dtype, return_weights, return_importance)


def lsa_step(
    q: Tensor, k: Tensor, v: Tensor, state: State, *, normalize: LSANorm = "prefix_count", scale: float = 1.0
) -> tuple[Tensor, State]:
    """One causal decoding step of :func:`linear_self_attention`.

    State: ``S`` (B, H, D, Dv) = Σ k_j v_j^T and ``count`` (a 0-d tensor, the tokens so far).
    ``out = scale · q^T S``, divided by the count unless ``normalize == "none"``. ``"n"`` (the
    final length) has no step form: it raises ValueError.
    """
    if normalize not in ("none", "prefix_count"):
        raise ValueError(f"lsa_step: normalize must be 'none' or 'prefix_count', got {normalize!r}")
    qd, kd, vd = _step_tokens(q, k, v)
    num, _, s, _ = kernel_step(qd[:, :, 0] * scale, kd[:, :, 0], vd[:, :, 0], state["S"])
    count = state["count"] + 1
    out = num if normalize == "none" else num / count
    return out[:, :, None].to(q.dtype), {"S": s, "count": count}
