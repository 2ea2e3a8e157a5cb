"""EcoFormer (Liu et al., "EcoFormer: Energy-Saving Attention with Linear Complexity", NeurIPS 2022).

Queries and keys are hashed to b-bit codes ``h ∈ {-1, +1}^b`` by kernelised hash functions
(KSH, Liu et al. CVPR 2012): with ``x̂ = x / |x|``, m anchors ``a_l`` and bandwidth σ::

    d_il = |x̂_i - a_l|^2,   κ_il = exp(-d_il / (2σ)) - μ_l,   y_i = A κ_i,   h_i = sign(y_i)

(``sign(0) = +1``; backward: straight-through, gradient passed where |y| < 1). σ is the mean
of d over the sample's tokens (recomputed every call, as in the official code; causal: the
mean over the tokens up to i, so no future token changes a code). Since
``h_i·h_j = b - 2·Hamming(h_i, h_j)``, the Hamming affinity ``s_ij = b - D_H = (b + h_i·h_j)/2``
is a dot product of the features ``[h_i, 1]`` and ``[h_j/2, b/2]``, giving attention in linear
time with (for ±1 codes) additions only:

* ``bias_mode="consistent"`` (default): ``out_i = Σ_j s_ij v_j / Σ_j s_ij`` - weights >= 0 that
  sum to 1.
* ``bias_mode="faithful"`` (released code, ``linear_attention_bias``; self-attention only):
  ``out_i = [h_i^T Σ_j h_j v_j^T + c·v_i] / [h_i·Σ_j h_j + c·n]`` with ``c = b + 1`` and n the
  number of keys: its implied weights ``(h_i·h_j + c δ_ij) / Z_i`` neither sum to 1 nor stay
  >= 0. Needed to load released checkpoints.

The hash functions are learned once from the layer's own attention structure
(:func:`learn_ksh_hash`): the top-k most / least similar (query, key) pairs by cosine similarity
are the positives / negatives, and the rows of A are fitted greedily bit by bit (the official
code's ``train_hashing_weight_woeig``: tanh relaxation, SGD with Nesterov momentum, a bit kept
only if its binarised loss improved, residual update ``R <- R - y_q y_k^T``). This step is
O(N^2) in memory; it runs once, on at most ``max_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib import dispatch
from attnlib._validation import check_qkv
from attnlib.errors import UnsupportedError
from attnlib.functional._common import acc_dtype, nonzero, repeat_kv, safe_div
from attnlib.functional._scan import (
    column_mass,
    kernel_step,
    linear_scan,
    pack_result,
    prefix_mask,
    split_mask,
)
from attnlib.masks import MaskLike

__all__ = [
    "anchor_distances",
    "binarize",
    "ecoformer_attention",
    "ecoformer_step",
    "hash_from_distances",
    "hash_kernel_features",
    "kernelized_hash",
    "learn_ksh_hash",
]

Result = Tensor | tuple[Tensor, ...]
BiasMode = Literal["consistent", "faithful"]


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 and sign(NaN) = NaN; straight-through gradient where |y| < 1 (hardtanh STE)."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y)
        return torch.where(y >= 0, 1.0, y.clamp(-1.0, -1.0))  # clamp keeps NaN

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.where(y.abs() < 1, grad, 0.0)


def binarize(y: Tensor) -> Tensor:
    """Codes in {-1, +1} (``y >= 0`` -> +1; NaN stays NaN) with the straight-through gradient of |y| < 1."""
    return _SignSTE.apply(y)


def _bandwidth(d: Tensor, valid: Tensor | None, causal: bool) -> Tensor:
    """d (B, H, N, m) anchor distances -> σ (B, H, N|1, 1): the mean over the sample's (real) tokens
    and anchors, or over the tokens up to i (``causal``); 1 where that mean is not positive."""
    if valid is None and not causal:  # one reduction
        sig = d.mean((-2, -1), keepdim=True)
        return torch.where(sig > 0, sig, 1.0)
    dbar = d.mean(-1)
    w = torch.ones_like(dbar) if valid is None else valid[:, None, :].to(dbar.dtype).expand_as(dbar)
    if causal:
        sig = (dbar * w).cumsum(-1) / w.cumsum(-1).clamp_min(1.0)
    else:
        sig = (dbar * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1.0)
    sig = torch.where(sig > 0, sig, torch.ones_like(sig))
    return sig[..., None]


def anchor_distances(x: Tensor, anchors: Tensor) -> Tensor:
    """Squared distances ``|x̂_i - a_l|^2`` of the normalised tokens to the anchors.

    x (B, H, N, D), anchors (H, m, D) -> (B, H, N, m) in float32 or better.
    """
    dt = acc_dtype(x.dtype)
    xh = F.normalize(x.to(dt), dim=-1, eps=1e-12)
    a = anchors.to(dt)
    sq = xh.square().sum(-1, keepdim=True) + a.square().sum(-1)[None, :, None, :]
    return (sq - 2 * xh @ a.transpose(-1, -2)).clamp_min(0.0)


def hash_kernel_features(
    x: Tensor,
    anchors: Tensor,
    center: Tensor | None = None,
    *,
    causal: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """Centred Gaussian-kernel features ``κ_il = exp(-|x̂_i - a_l|^2 / (2σ)) - μ_l``.

    Args:
        x: (B, H, N, D); anchors: (H, m, D) (unit vectors); center μ: (H, m) or None (no centring).
        causal: σ is the mean distance over tokens <= i (else over the whole sample).
        valid: (B, N) bool of real tokens (excluded from σ) or None.

    Returns:
        (B, H, N, m) in float32 or better.
    """
    d = anchor_distances(x, anchors)
    return _kernel(d, _bandwidth(d, valid, causal), center)


def _kernel(d: Tensor, sigma: Tensor, center: Tensor | None) -> Tensor:
    kf = torch.exp(d / (-2.0 * sigma))
    return kf if center is None else kf - center.to(kf.dtype)[None, :, None, :]


def hash_from_distances(d: Tensor, sigma: Tensor, center: Tensor | None, projection: Tensor) -> Tensor:
    """Codes from anchor distances d (B, H, N, m) and a given bandwidth σ (broadcastable to d)."""
    kf = _kernel(d, sigma, center)
    return binarize(torch.einsum("bhnm,hrm->bhnr", kf, projection.to(kf.dtype)))


def kernelized_hash(
    x: Tensor,
    anchors: Tensor,
    projection: Tensor,
    center: Tensor | None = None,
    *,
    causal: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """b-bit codes ``sign(A κ(x))`` in {-1, +1}: x (B, H, N, D), anchors (H, m, D), projection A (H, b, m).

    Returns (B, H, N, b) codes in float32 or better (straight-through gradient).
    """
    fixed = not any(t is not None and t.requires_grad for t in (anchors, projection, center))
    if valid is None and not causal and fixed:  # one autograd node (the usual training call)
        dt = acc_dtype(x.dtype)
        return _SampleHash.apply(x.to(dt), anchors.to(dt), projection.to(dt), center)
    d = anchor_distances(x, anchors)
    return hash_from_distances(d, _bandwidth(d, valid, causal), center, projection)


class _SampleHash(torch.autograd.Function):
    """:func:`kernelized_hash` with the sample bandwidth (no mask, not causal) and a fixed hash, its
    straight-through gradient with respect to x written out (a few operators instead of autograd's
    graph through normalisation, distances, bandwidth, kernel and projection)."""

    @staticmethod
    def forward(ctx, x: Tensor, anchors: Tensor, projection: Tensor, center: Tensor | None) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        safe = norm.clamp_min(1e-12)  # F.normalize's eps
        xh = x / safe
        a2 = anchors.square().sum(-1)[None, :, None, :]
        d_raw = torch.matmul(xh, anchors.transpose(-1, -2) * -2.0).add_(xh.square().sum(-1, keepdim=True) + a2)
        d = d_raw.clamp_min(0.0)
        mean = d.mean((-2, -1), keepdim=True)  # σ: the sample's mean distance (1 where not positive)
        live = mean > 0
        sig = torch.where(live, mean, 1.0)
        u = torch.exp(d / (-2.0 * sig))
        kf = u if center is None else u - center.to(u.dtype)[None, :, None, :]
        y = torch.matmul(kf, projection.transpose(-1, -2))
        ctx.save_for_backward(xh, norm, safe, d_raw, d, sig, live, u, y, anchors, projection)
        return torch.where(y >= 0, 1.0, y.clamp(-1.0, -1.0))  # clamp keeps NaN

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        xh, norm, safe, d_raw, d, sig, live, u, y, anchors, projection = ctx.saved_tensors
        g_y = torch.where(y.abs() < 1, grad, 0.0)  # straight-through
        g_t = torch.matmul(g_y, projection) * u  # d(exp t)/dt, t = -d / (2σ)
        g_d = g_t / (-2.0 * sig)
        n_avg = d.shape[-2] * d.shape[-1]  # σ = the mean of d (where positive)
        g_sig = (g_t * d).sum((-2, -1), keepdim=True) / (2.0 * n_avg) / sig.square()
        g_d = torch.where(d_raw >= 0, g_d + torch.where(live, g_sig, 0.0), 0.0)
        # d = |x̂|² + |a|² - 2 x̂·a
        g_xh = xh * (2.0 * g_d.sum(-1, keepdim=True)) - torch.matmul(g_d, anchors * 2.0)
        # x̂ = x / max(|x|, eps): the radial part leaves where |x| >= eps
        radial = (g_xh * xh).sum(-1, keepdim=True)
        g_x = (g_xh - xh * torch.where(norm >= 1e-12, radial, 0.0)) / safe
        return g_x, None, None, None


def ecoformer_attention(
    q_codes: Tensor,
    k_codes: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    bias_mode: BiasMode = "consistent",
    mask: MaskLike | list[MaskLike] = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """Hamming-affinity attention on binary codes (see the module docstring for both bias modes).

    Args:
        q_codes: (B, H, N, b) in {-1, +1}; k_codes: (B, H_kv, M, b); v: (B, H_kv, M, Dv).
        causal: prefix sums (N == M), chunked parallel form.
        bias_mode: "consistent" (rows sum to 1, weights >= 0) or "faithful" (official code; needs N == M).
        mask: key padding (B, M). Padded keys leave every sum and the count n.
        chunk_size, explicit, return_weights, return_importance: as in :mod:`attnlib.functional.linear`.

    Returns:
        (B, H, N, Dv) in v's dtype, or ``(out, weights?, importance?)``.
    """
    if bias_mode not in ("consistent", "faithful"):
        raise ValueError(f"bias_mode must be 'consistent' or 'faithful', got {bias_mode!r}")
    out_dtype = v.dtype
    dt = acc_dtype(v.dtype)
    q_codes, k_codes, v = q_codes.to(dt), k_codes.to(dt), v.to(dt)
    check_qkv(q_codes, k_codes, v, where="ecoformer_attention")
    kp, causal = split_mask(q_codes, k_codes, mask, causal, where="ecoformer_attention")
    g = q_codes.shape[1] // k_codes.shape[1]
    k_codes, v = repeat_kv(k_codes, g), repeat_kv(v, g)
    b, _, n, nbits = q_codes.shape
    m = k_codes.shape[2]
    kvalid = None if kp is None else kp[:, None, :, None].to(dt)
    weights = importance = None
    if bias_mode == "consistent" and not (explicit or return_weights or causal or return_importance):
        # s_ij = h_i·(h_j / 2) + b / 2 against [v_j, 1]: numerator and denominator from one product
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        if kvalid is not None:
            v1 = v1 * kvalid
        both = torch.matmul(q_codes, k_codes.transpose(-1, -2) @ v1).mul_(0.5)
        both = both.add_(v1.sum(-2, keepdim=True), alpha=nbits / 2)
        den = both[..., -1:]
        out = both[..., :-1] / den.masked_fill(den == 0, float("inf"))  # no key: 0, finite gradients
    elif bias_mode == "consistent":
        ones = torch.ones_like(q_codes[..., :1])
        qf = torch.cat([q_codes, ones], -1)
        kf = torch.cat([k_codes * 0.5, torch.full_like(k_codes[..., :1], nbits / 2)], -1)
        if kvalid is not None:
            kf = kf * kvalid
        if explicit or return_weights:
            a = qf @ kf.transpose(-1, -2)
            if causal:
                a = a.masked_fill(~prefix_mask(n, a.device), 0.0)
            w = safe_div(a, a.sum(-1, keepdim=True))
            out, weights = w @ v, w
            importance = w.mean(-2) if return_importance else None
        else:
            num, den = linear_scan(qf, kf, v, causal=causal, chunk_size=chunk_size)
            assert den is not None
            out = safe_div(num, den[..., None])
            if return_importance:
                importance = column_mass(safe_div(qf, den[..., None]), kf, causal=causal) / n
    else:
        if n != m:
            raise UnsupportedError(
                f"ecoformer_attention bias_mode='faithful' adds each query's own value (self-attention), "
                f"so it needs N == M, got N={n}, M={m}"
            )
        c = float(nbits + 1)
        kf = k_codes if kvalid is None else k_codes * kvalid
        diag = torch.ones(b, 1, n, 1, dtype=dt, device=v.device) if kvalid is None else kvalid
        cnt_src = diag[:, :, :, 0]
        cnt = (cnt_src.cumsum(-1) if causal else cnt_src.sum(-1, keepdim=True).expand(b, 1, n))[..., None]
        if explicit or return_weights:
            a = q_codes @ kf.transpose(-1, -2)
            if causal:
                a = a.masked_fill(~prefix_mask(n, a.device), 0.0)
            den = a.sum(-1, keepdim=True) + c * cnt
            a = a + c * torch.diag_embed(diag[..., 0])
            w = safe_div(a, den)
            out, weights = w @ v, w
            importance = w.mean(-2) if return_importance else None
        else:
            num, den = linear_scan(q_codes, kf, v, causal=causal, chunk_size=chunk_size)
            assert den is not None
            den = den[..., None] + c * cnt
            num = num + c * diag * v
            out = safe_div(num, den)
            if return_importance:
                importance = column_mass(safe_div(q_codes, den), kf, causal=causal) / n
                importance = importance + c * safe_div(diag, den)[..., 0] / n
    out = out.to(out_dtype)
    weights = weights.to(out_dtype) if weights is not None else None
    importance = importance.to(out_dtype) if importance is not None else None
    return pack_result(out, weights, importance, return_weights=return_weights, return_importance=return_importance)


def ecoformer_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: dict[str, Tensor],
    anchors: Tensor,
    center: Tensor | None,
    projection: Tensor,
    *,
    bias_mode: BiasMode = "consistent",
) -> tuple[Tensor, dict[str, Tensor]]:
    """One causal decoding step of the hashed attention: q, k (B, H, 1, D), v (B, H, 1, Dv).

    The token's codes use the causal bandwidth (the prefix mean of the anchor distances), so
    feeding a sequence token by token equals :func:`kernelized_hash` (``causal=True``) followed
    by :func:`ecoformer_attention` (``causal=True``). anchors (H, m, D), center (H, m),
    projection (H, b, m) as in :func:`kernelized_hash`.

    State (accumulation dtype): ``S`` (B, H, F, Dv), ``z`` (B, H, F) - running sums of the key
    features (F = b + 1 for "consistent", b for "faithful") - ``dist_q``, ``dist_k`` (B, H),
    the running sums of the mean anchor distances, and ``count`` (a 0-d tensor, tokens so far).

    Returns:
        (out (B, H, 1, Dv) in q's dtype, new state).
    """
    dt = acc_dtype(q.dtype)
    qd, kd, vt = q.to(dt), k.to(dt), v.to(dt)[:, :, 0]
    count = state["count"] + 1
    dq = anchor_distances(qd, anchors)  # (B, H, 1, m)
    dk = anchor_distances(kd, anchors)
    dist_q = state["dist_q"] + dq.mean(-1)[..., 0]
    dist_k = state["dist_k"] + dk.mean(-1)[..., 0]
    hq = hash_from_distances(dq, (dist_q / count)[..., None, None], center, projection)[:, :, 0]
    hk = hash_from_distances(dk, (dist_k / count)[..., None, None], center, projection)[:, :, 0]
    nb = float(projection.shape[-2])
    if bias_mode == "consistent":
        qf = torch.cat([hq, torch.ones_like(hq[..., :1])], -1)
        kf = torch.cat([hk * 0.5, torch.full_like(hk[..., :1], nb / 2)], -1)
    else:
        qf, kf = hq, hk
    num, den, s, z = kernel_step(qf, kf, vt, state["S"], state["z"])
    assert den is not None
    if bias_mode == "faithful":
        num = num + (nb + 1) * vt
        den = den + (nb + 1) * count
    out = num / nonzero(den)
    new = {"S": s, "z": z, "dist_q": dist_q, "dist_k": dist_k, "count": count}
    return out[:, :, None].to(q.dtype), new  # type: ignore[return-value]


def _sample_rows(n: int, k: int, generator: torch.Generator | None, valid: Tensor | None) -> Tensor:
    """k indices among the valid rows of one sample (with replacement when there are fewer)."""
    idx = torch.arange(n) if valid is None else torch.nonzero(valid.cpu(), as_tuple=True)[0]
    if idx.numel() == 0:
        idx = torch.arange(n)
    if idx.numel() >= k:
        return idx[torch.randperm(idx.numel(), generator=generator)[:k]]
    return idx[torch.randint(idx.numel(), (k,), generator=generator)]


def _supervision(q: Tensor, k: Tensor, allowed: Tensor | None, topk: int) -> Tensor:
    """S0 (B, H, N, M): +1 on each row's top-k cosine similarities, -1 on its bottom-k, 0 elsewhere."""
    sim = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    m = sim.shape[-1]
    kk = max(1, min(topk, m // 2))
    s0 = torch.zeros_like(sim)
    hi = sim if allowed is None else sim.masked_fill(~allowed, float("-inf"))
    lo = sim if allowed is None else sim.masked_fill(~allowed, float("inf"))
    vals, idx = (-lo).topk(kk, -1)
    s0.scatter_(-1, idx, torch.where(torch.isfinite(vals), -1.0, 0.0).to(s0.dtype))
    vals, idx = hi.topk(kk, -1)
    s0.scatter_(-1, idx, torch.where(torch.isfinite(vals), 1.0, 0.0).to(s0.dtype))
    if allowed is not None:
        s0 = s0 * allowed
    return s0


def _ksh_loss(kq: Tensor, kk: Tensor, resid: Tensor, a: Tensor, scale: float, binary: bool) -> Tensor:
    """KSH's loss of one bit per head: ``-scale · Σ_{b,i,j} y^q_i R_ij y^k_j`` (H,).

    kq (B, H, N, m), kk (B, H, M, m): centred kernel features; resid R (B, H, N, M); a (H, m).
    ``binary``: y = sign(k a) (±1); else the relaxation y = tanh(k a / 2) = 2 sigmoid(k a) - 1.
    """
    yq = torch.einsum("bhnm,hm->bhn", kq, a)
    yk = torch.einsum("bhnm,hm->bhn", kk, a)
    if binary:
        yq = torch.where(yq >= 0, 1.0, -1.0).to(kq.dtype)
        yk = torch.where(yk >= 0, 1.0, -1.0).to(kq.dtype)
    else:
        yq, yk = torch.tanh(yq / 2), torch.tanh(yk / 2)
    # Σ_{b,i,j} yq_i R_ij yk_j as matrix-vector products (no (N, M) temporaries)
    return -torch.einsum("bhn,bhnm,bhm->h", yq, resid, yk) * scale  # (H,)


def _ksh_pack(kq: Tensor, kk: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """The operands of :func:`_ksh_grad_packed`: the features of queries and keys stacked per head,
    ``feats`` (H, B·(N+M), m), and ``pair`` (H, B, N+M, N+M) = [[0, R], [Rᵀ, 0]] per example."""
    b, h, n, _ = kq.shape
    m = kk.shape[2]
    feats = torch.cat([kq, kk], 2).transpose(0, 1).reshape(h, b * (n + m), -1)
    pair = resid.new_zeros(h, b, n + m, n + m)
    r = resid.transpose(0, 1)
    pair[:, :, :n, n:] = r
    pair[:, :, n:, :n] = r.transpose(-1, -2)
    return feats, pair


def _ksh_grad_packed(feats: Tensor, pair: Tensor, a: Tensor, scale: float) -> Tensor:
    """:func:`_ksh_grad` on the packed operands of :func:`_ksh_pack`: five batched products per step
    (the greedy KSH runs thousands of them, one after another, on small tensors)."""
    h, b, ln = pair.shape[:3]
    y = torch.tanh(torch.matmul(feats, a[:, :, None]) * 0.5)  # (H, B·L, 1): [tanh(kq a/2); tanh(kk a/2)]
    g = torch.matmul(pair, y.view(h, b, ln, 1)).view(h, b * ln, 1) * (1 - y * y)  # [R yk; Rᵀ yq] ⊙ (1 - y²)
    return torch.matmul(feats.transpose(1, 2), g)[..., 0] * (-scale / 2)


def _ksh_grad(kq: Tensor, kk: Tensor, resid: Tensor, a: Tensor, scale: float) -> Tensor:
    """d Σ_h _ksh_loss(..., binary=False) / da (H, m), written out: with u = kq a, w = kk a,
    ``dL/du_i = -scale/2 · (R tanh(w/2))_i (1 - tanh²(u/2))`` and likewise for w."""
    return _ksh_grad_packed(*_ksh_pack(kq, kk, resid), a, scale)


def _nesterov_sgd(grad: Callable[[Tensor], Tensor], a0: Tensor, lr: float, momentum: float, iters: int) -> Tensor:
    """``iters`` steps of ``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=True)`` from a0,
    with the gradient from ``grad(a)`` (no autograd graph, no optimizer object per step)."""
    a, buf = a0.clone(), None
    for _ in range(iters):
        g = grad(a)
        buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
        a = a - lr * (g + momentum * buf)
    return a


def learn_ksh_hash(
    q: Tensor,
    k: Tensor,
    projection: Tensor,
    *,
    num_anchors: int,
    topk: int = 10,
    lr: float = 5e-4,
    momentum: float = 0.9,
    iters: int = 100,
    causal: bool = False,
    key_padding: Tensor | None = None,
    max_tokens: int | None = 2048,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Learn EcoFormer's kernelised hash functions from one batch (greedy bitwise KSH).

    Args:
        q: (B, H, N, D), k: (B, H, M, D) (detached inside).
        projection: (H, b, m) initial A (e.g. N(0, 1)); a learned copy is returned.
        num_anchors: m; anchors are m random (real) key tokens of the first sample, normalised.
        topk: positives / negatives per query row.
        lr, momentum, iters: Nesterov SGD on each bit (official: 5e-4, 0.9, 100), with the
            gradient of the relaxed loss written out (the steps of ``torch.optim.SGD`` without
            an autograd graph per step).
        causal: the supervision only uses pairs j <= i (and σ is the prefix mean).
        key_padding: (B, M) bool of real keys (also used as query padding when N == M).
        max_tokens: learn on at most this many tokens (a random ordered subset; None = all);
            the supervision matrix is (B, H, N, M).
        generator: CPU generator for anchors and subsampling.

    Returns:
        dict: anchors (H, m, D), center (H, m), projection (H, b, m), loss_before (H, b) and
        loss_after (H, b) - the binarised loss of each bit at its initial and accepted value.
    """
    with torch.no_grad():
        dt = acc_dtype(q.dtype)
        q, k = q.detach().to(dt), k.detach().to(dt)
        b, h, n, _ = q.shape
        m = k.shape[2]
        kp = key_padding
        qp = key_padding if (key_padding is not None and n == m) else None
        if max_tokens is not None and max(n, m) > max_tokens:
            if n == m:
                sel = torch.randperm(n, generator=generator)[:max_tokens].sort().values.to(q.device)
                q, k = q[:, :, sel], k[:, :, sel]
                kp = kp[:, sel] if kp is not None else None
                qp = qp[:, sel] if qp is not None else None
            else:
                sq = torch.randperm(n, generator=generator)[: min(n, max_tokens)].sort().values.to(q.device)
                sk = torch.randperm(m, generator=generator)[: min(m, max_tokens)].sort().values.to(q.device)
                q, k = q[:, :, sq], k[:, :, sk]
                kp = kp[:, sk] if kp is not None else None
            n, m = q.shape[2], k.shape[2]
        rows = _sample_rows(m, num_anchors, generator, None if kp is None else kp[0])
        anchors = F.normalize(k[0][:, rows.to(k.device)], dim=-1)  # (H, m_anchors, D)
        kq = hash_kernel_features(q, anchors, None, causal=causal, valid=qp)
        kk = hash_kernel_features(k, anchors, None, causal=causal, valid=kp)
        wq = torch.ones(b, n, dtype=dt, device=q.device) if qp is None else qp.to(dt)
        wk = torch.ones(b, m, dtype=dt, device=q.device) if kp is None else kp.to(dt)
        tot = (kq * wq[:, None, :, None]).sum((0, 2)) + (kk * wk[:, None, :, None]).sum((0, 2))
        center = tot / (wq.sum() + wk.sum()).clamp_min(1.0)  # (H, m)
        kq = (kq - center[None, :, None, :]) * wq[:, None, :, None]
        kk = (kk - center[None, :, None, :]) * wk[:, None, :, None]
        allowed = None
        if causal or kp is not None or qp is not None:
            allowed = torch.ones(b, 1, n, m, dtype=torch.bool, device=q.device)
            if causal:
                allowed = allowed & prefix_mask(n, q.device)
            if kp is not None:
                allowed = allowed & kp[:, None, None, :]
            if qp is not None:
                allowed = allowed & qp[:, None, :, None]
        nbits = projection.shape[1]
        resid = nbits * _supervision(q, k, allowed, topk)
        proj = projection.detach().to(dt).clone()
        before = torch.zeros(h, nbits, dtype=dt)
        after = torch.zeros(h, nbits, dtype=dt)
        scale = 1.0 / (n * nbits)

        def loss(a: Tensor, binary: bool) -> Tensor:
            return _ksh_loss(kq, kk, resid, a, scale, binary)

        # thousands of dependent steps on small tensors: one intra-op thread (see dispatch.serial_cpu_loop)
        with dispatch.serial_cpu_loop(resid.numel() + kq.numel() + kk.numel(), q.device):
            for r in range(nbits):
                a0 = proj[:, r].clone()
                l0 = loss(a0, True)
                feats, pair = _ksh_pack(kq, kk, resid)
                a1 = _nesterov_sgd(lambda a, f=feats, p=pair: _ksh_grad_packed(f, p, a, scale), a0, lr, momentum, iters)
                l1 = loss(a1, True)
                if not torch.isfinite(a1).all():
                    a1, l1 = a0, l0
                keep = (l1 < l0)[:, None]
                best = torch.where(keep, a1, a0)
                proj[:, r] = best
                before[:, r] = l0.cpu()
                after[:, r] = torch.minimum(l0, l1).cpu()
                yq = torch.where(torch.einsum("bhnm,hm->bhn", kq, best) >= 0, 1.0, -1.0).to(dt)
                yk = torch.where(torch.einsum("bhnm,hm->bhn", kk, best) >= 0, 1.0, -1.0).to(dt)
                outer = yq[..., :, None] * yk[..., None, :]
                resid = resid - (outer if allowed is None else outer * allowed)
        return {
            "anchors": anchors,
            "center": center,
            "projection": proj,
            "loss_before": before,
            "loss_after": after,
        }
