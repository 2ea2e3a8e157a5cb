"""Flowformer flow attention (Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows", ICML 2022).

Attention as a flow network: values are sources, outputs are sinks, and the kernel
``φ(q_i)·φ(k_j)`` (φ = sigmoid) is the capacity between them. With ``q̃ = φ(Q)``, ``k̃ = φ(K)``
(non-causal, N queries and M keys)::

    I_i = q̃_i · Σ_j k̃_j                 incoming flow of sink i
    O_j = k̃_j · Σ_i q̃_i                 outgoing flow of source j
    Î_i = q̃_i · Σ_j k̃_j / O_j           incoming flow when every source emits one unit
    Ô_j = k̃_j · Σ_i q̃_i / I_i           outgoing flow when every sink receives one unit
    comp_j  = M · softmax_j(Ô)           competition (mean 1)
    alloc_i = sigmoid(Î_i · N / M)       allocation gate
    R_i = alloc_i · (q̃_i / I_i) · Σ_j k̃_j^T (comp_j v_j)

Conservation: ``Σ_j Ô_j = N`` and ``Σ_i Î_i = M``. The implicit attention matrix is
``W_ij = alloc_i · comp_j · q̃_i·k̃_j / I_i`` (``R = W V``). The factors M and N/M follow the
official code (treated as normative).

Causal form (N == M, t_i = 1-based position, counting real tokens only)::

    I_i = q̃_i · Σ_{j<=i} k̃_j             O_j = k̃_j · Σ_{i<=j} q̃_i
    Î_i = q̃_i · Σ_{j<=i} k̃_j t_j / O_j / t_i     Ô_j = k̃_j · Σ_{i<=j} q̃_i t_i / I_i / t_j
    comp_j = t_j · exp(Ô_j) / Σ_{j'<=j} exp(Ô_j')    alloc_i = sigmoid(Î_i)
    R_i = alloc_i · (q̃_i / I_i) · Σ_{j<=i} k̃_j^T (comp_j v_j)

computed with prefix sums and the chunked parallel form (no (N, D, Dv) cumsum as in the
official code). Everything is computed in float32 or better: with sigmoid features
``I ≈ M·D/4`` exceeds the fp16 range at M = 4096, D = 64.

Official-code quirks behind flags: ``competition_clamp=c`` clamps Ô to [-c, c] before the
competition softmax (1.0 in the core/CV/GPT files, 5 NLP causal, 10 RL causal). Since
Ô >= 0 has mean N/M, the ±1 clamp saturates about half the sources for N = M and all of them
when N > M, switching competition off; the default (None) is the paper's equation.
``eps`` only guards divisions (flows below eps are treated as eps), so for positive features
the result equals the quadratic definition exactly; the official code adds 1e-6 to features
and pre-summed vectors instead (about 1e-7 difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.functional._common import acc_dtype, repeat_kv
from attnlib.functional._scan import (
    block_rows,
    chunk_states,
    column_mass,
    grad_free,
    linear_scan,
    pack_result,
    prefix_mask,
    slabs,
    split_mask,
)
from attnlib.masks import MaskLike

__all__ = ["FLOW_FEATURE_MAPS", "flow_attention", "flow_quantities", "flow_step"]

Result = Tensor | tuple[Tensor, ...]


def _relu_eps(x: Tensor) -> Tensor:
    return F.relu(x) + 1e-6


FLOW_FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,  # core, CV, NLP, time-series, RL, GPT files
    "relu": _relu_eps,  # LRA (JAX) file: relu(x) + 1e-6
}


def _div(x: Tensor, y: Tensor, eps: float) -> Tensor:
    return x / y.clamp_min(eps)


def flow_quantities(
    qf: Tensor,
    kf: Tensor,
    *,
    causal: bool,
    eps: float,
    competition_clamp: float | None,
    q_valid: Tensor | None,
    k_valid: Tensor | None,
) -> dict[str, Tensor]:
    """The flows of Flowformer from features (no values involved).

    Args:
        qf: (B, H, N, F) φ(Q), zero on padded queries; kf: (B, H, M, F) φ(K), zero on padded keys.
        causal: prefix (causal) flows, N == M.
        eps: lower clamp of every divisor.
        competition_clamp: clamp Ô to [-c, c] (official code) or None.
        q_valid: (B, N) bool of real queries or None; k_valid: (B, M) bool or None.

    Returns:
        dict with I (B, H, N), O (B, H, M), I_hat (B, H, N), O_hat (B, H, M) (after the
        clamp), comp (B, H, M) and alloc (B, H, N).
    """
    b, _h, n, _ = qf.shape
    m = kf.shape[2]
    dt = qf.dtype
    kv_ = torch.ones(b, m, dtype=torch.bool, device=qf.device) if k_valid is None else k_valid
    if not causal:
        n_q = (
            torch.full((b, 1, 1), float(n), dtype=dt, device=qf.device)
            if q_valid is None
            else q_valid.sum(-1, dtype=dt)[:, None, None]
        )
        m_k = kv_.sum(-1, dtype=dt)[:, None, None]
        i_flow = (qf * kf.sum(-2, keepdim=True)).sum(-1)
        o_flow = (kf * qf.sum(-2, keepdim=True)).sum(-1)
        i_hat = (qf * _div(kf, o_flow[..., None], eps).sum(-2, keepdim=True)).sum(-1)
        o_hat = (kf * _div(qf, i_flow[..., None], eps).sum(-2, keepdim=True)).sum(-1)
        if competition_clamp is not None:
            o_hat = o_hat.clamp(-competition_clamp, competition_clamp)
        logits = o_hat.masked_fill(~kv_[:, None, :], torch.finfo(dt).min / 4)
        soft = torch.softmax(logits, -1)
        soft = torch.where(kv_[:, None, :], soft, torch.zeros_like(soft))
        comp = m_k * soft
        alloc = torch.sigmoid(i_hat * _div(n_q, m_k, 1e-30))
    else:
        pos = kv_.to(dt).cumsum(-1)[:, None, :]  # (B, 1, N): t_i, counting real tokens
        cq = qf.cumsum(-2)
        ck = kf.cumsum(-2)
        i_flow = (qf * ck).sum(-1)
        o_flow = (kf * cq).sum(-1)
        i_hat = _div((qf * _div(kf * pos[..., None], o_flow[..., None], eps).cumsum(-2)).sum(-1), pos, 1.0)
        o_hat = _div((kf * _div(qf * pos[..., None], i_flow[..., None], eps).cumsum(-2)).sum(-1), pos, 1.0)
        if competition_clamp is not None:
            o_hat = o_hat.clamp(-competition_clamp, competition_clamp)
        low = torch.finfo(dt).min / 4
        logits = o_hat.masked_fill(~kv_[:, None, :], low)
        lse = torch.logcumsumexp(logits, -1)
        comp = pos * torch.exp(logits - lse)
        comp = torch.where(kv_[:, None, :], comp, torch.zeros_like(comp))
        alloc = torch.sigmoid(i_hat)
    return {"I": i_flow, "O": o_flow, "I_hat": i_hat, "O_hat": o_hat, "comp": comp, "alloc": alloc}


def flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    competition_clamp: float | None = None,
    feature_map: Literal["sigmoid", "relu"] | Callable[[Tensor], Tensor] = "sigmoid",
    competition: bool = True,
    allocation: bool = True,
    mask: MaskLike | list[MaskLike] = None,
    query_padding: Tensor | None = None,
    chunk_size: int = 64,
    explicit: bool = False,
    return_weights: bool = False,
    return_importance: bool = False,
) -> Result:
    """Flowformer attention; see the module docstring for the equations.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv). N != M allowed (non-causal).
        causal: causal flows (N == M), prefix sums + chunked parallel form.
        eps: lower clamp of the flows in every division.
        competition_clamp: clamp Ô to [-c, c] before the competition (official code: 1.0); None = paper.
        feature_map: "sigmoid" (default), "relu" (relu + 1e-6, LRA code) or a positive callable.
        competition: False replaces comp by 1 (the paper's "w/o competition" ablation).
        allocation: False replaces alloc by 1 ("w/o allocation"). With both False the layer is
            normalised linear attention with φ = sigmoid.
        mask: key padding (B, M) (True = real key).
        query_padding: (B, N) bool of real queries. Padded queries would otherwise feed the
            outgoing flows O and Ô (σ > 0); for self-attention with padding pass the key
            padding here (:class:`attnlib.Attention` does). Padded queries return zeros.
        chunk_size, explicit, return_weights, return_importance: as in :mod:`attnlib.functional.linear`.

    Returns:
        (B, H, N, Dv), or ``(out, weights?, importance?)``; weights
        ``W_ij = alloc_i comp_j q̃_i·k̃_j / I_i`` satisfy ``out == W @ v``.
    """
    positive_int(chunk_size, "chunk_size")
    check_qkv(q, k, v, where="flow_attention")
    kp, causal = split_mask(q, k, mask, causal, where="flow_attention")
    b, _h, n, _ = q.shape
    if query_padding is not None and (query_padding.dtype != torch.bool or tuple(query_padding.shape) != (b, n)):
        raise ValueError(
            f"flow_attention: query_padding must be a bool (B, N) = ({b}, {n}) tensor, got "
            f"{query_padding.dtype} {tuple(query_padding.shape)}"
        )
    if competition_clamp is not None and not competition_clamp > 0:
        raise ValueError(f"competition_clamp must be positive or None, got {competition_clamp!r}")
    phi = feature_map if callable(feature_map) else FLOW_FEATURE_MAPS.get(feature_map)
    if phi is None:
        raise ValueError(f"feature_map must be one of {sorted(FLOW_FEATURE_MAPS)} or a callable, got {feature_map!r}")
    out_dtype = q.dtype
    g = q.shape[1] // k.shape[1]
    dt = acc_dtype(q.dtype)
    q, k, v = q.to(dt), repeat_kv(k, g).to(dt), repeat_kv(v, g).to(dt)
    if causal and not (explicit or return_weights or return_importance):
        valid = kp if query_padding is None else (query_padding if kp is None else query_padding & kp)
        out = _flow_fast_causal(
            q,
            k,
            v,
            phi,
            eps=eps,
            clamp=competition_clamp,
            competition=competition,
            allocation=allocation,
            valid=valid,
            chunk_size=chunk_size,
        )
        return out.to(out_dtype)
    if not (explicit or return_weights or return_importance):
        out = _flow_fast_noncausal(
            q,
            k,
            v,
            phi,
            eps=eps,
            clamp=competition_clamp,
            competition=competition,
            allocation=allocation,
            q_valid=query_padding,
            k_valid=kp,
        )
        return out.to(out_dtype)
    qf, kf = phi(q), phi(k)
    if query_padding is not None:
        qf = qf * query_padding[:, None, :, None].to(dt)
    if causal and query_padding is None and kp is not None:
        qf = qf * kp[:, None, :, None].to(dt)  # causal flows are self-attention: pads are queries too
    if kp is not None:
        kf = kf * kp[:, None, :, None].to(dt)
    fl = flow_quantities(
        qf,
        kf,
        causal=causal,
        eps=eps,
        competition_clamp=competition_clamp,
        q_valid=query_padding,
        k_valid=kp,
    )
    comp = fl["comp"] if competition else (torch.ones_like(fl["comp"]) if kp is None else kp[:, None, :].to(dt))
    alloc = fl["alloc"] if allocation else torch.ones_like(fl["alloc"])
    row = alloc / fl["I"].clamp_min(eps)  # (B, H, N)
    weights = importance = None
    if explicit or return_weights:
        a = qf @ kf.transpose(-1, -2)
        if causal:
            a = a.masked_fill(~prefix_mask(n, a.device), 0.0)
        w = row[..., None] * a * comp[:, :, None, :]
        out = w @ v
        weights = w
        importance = w.mean(-2) if return_importance else None
    else:
        num, _ = linear_scan(qf, kf, v * comp[..., None], causal=causal, chunk_size=chunk_size, need_den=False)
        out = row[..., None] * num
        if return_importance:
            importance = comp * column_mass(qf * row[..., None], kf, causal=causal) / n
    out = out.to(out_dtype)
    weights = weights.to(out_dtype) if weights is not None else None
    importance = importance.to(out_dtype) if importance is not None else None
    return pack_result(out, weights, importance, return_weights=return_weights, return_importance=return_importance)


# --------------------------------------------------------------------------------------------
# fast paths (outputs only): no (N, F) cumulative sums, features per block
# --------------------------------------------------------------------------------------------


def flow_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: dict[str, Tensor],
    *,
    eps: float = 1e-6,
    competition_clamp: float | None = None,
    feature_map: Literal["sigmoid", "relu"] | Callable[[Tensor], Tensor] = "sigmoid",
    competition: bool = True,
    allocation: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One causal decoding step of :func:`flow_attention`: q, k (B, H, 1, D), v (B, H, 1, Dv).

    Feeding a sequence token by token equals the causal parallel form token by token (same
    arguments). State (accumulation dtype), sums over the past tokens: ``S`` (B, H, D, Dv) =
    Σ k̃_j (comp_j v_j)^T, ``sum_q``, ``sum_k`` (B, H, D) = Σ q̃, Σ k̃, ``sum_q_t_over_I``,
    ``sum_k_t_over_O`` (B, H, D) = Σ q̃_j·j/I_j, Σ k̃_j·j/O_j, ``lse`` (B, H) the running
    log-sum-exp of Ô (-inf before the first token) and ``count`` (a 0-d tensor, tokens so far).

    Returns:
        (out (B, H, 1, Dv) in q's dtype, new state).
    """
    dt = acc_dtype(q.dtype)
    phi = feature_map if callable(feature_map) else FLOW_FEATURE_MAPS[feature_map]
    qf, kf, vt = phi(q.to(dt)[:, :, 0]), phi(k.to(dt)[:, :, 0]), v.to(dt)[:, :, 0]
    t = state["count"] + 1
    sum_q = state["sum_q"] + qf
    sum_k = state["sum_k"] + kf
    i_flow = (qf * sum_k).sum(-1, keepdim=True).clamp_min(eps)
    o_flow = (kf * sum_q).sum(-1, keepdim=True).clamp_min(eps)
    sq = state["sum_q_t_over_I"] + qf * t / i_flow
    sk = state["sum_k_t_over_O"] + kf * t / o_flow
    i_hat = (qf * sk).sum(-1) / t
    o_hat = (kf * sq).sum(-1) / t
    if competition_clamp is not None:
        o_hat = o_hat.clamp(-competition_clamp, competition_clamp)
    lse = torch.logaddexp(state["lse"], o_hat)
    comp = t * torch.exp(o_hat - lse) if competition else torch.ones_like(o_hat)
    s = state["S"] + kf[..., :, None] * (comp[..., None] * vt)[..., None, :]
    alloc = torch.sigmoid(i_hat) if allocation else torch.ones_like(i_hat)
    out = alloc[..., None] * ((qf / i_flow)[..., :, None] * s).sum(-2)
    new = {
        "S": s,
        "sum_q": sum_q,
        "sum_k": sum_k,
        "sum_q_t_over_I": sq,
        "sum_k_t_over_O": sk,
        "lse": lse,
        "count": t,
    }
    return out[:, :, None].to(q.dtype), new


def _mv(x: Tensor, vec: Tensor) -> Tensor:
    """x (..., L, F) @ vec (..., F) -> (..., L) (einsum: much faster than a bmm with one column on CPU)."""
    return torch.einsum("...lf,...f->...l", x, vec)


def _vm(w: Tensor, x: Tensor) -> Tensor:
    """Σ_l w_l x_l: w (..., L), x (..., L, F) -> (..., F)."""
    return torch.einsum("...l,...lf->...f", w, x)


def _flow_fast_noncausal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: Callable[[Tensor], Tensor],
    *,
    eps: float,
    clamp: float | None,
    competition: bool,
    allocation: bool,
    q_valid: Tensor | None,
    k_valid: Tensor | None,
) -> Tensor:
    """Non-causal Flowformer over slabs of (batch, heads); every flow is a matrix-vector product.

    Slabs come from :func:`attnlib.functional._scan.slabs`: several whole batch rows, or one
    batch row and as many heads, such that φ(Q) of a slab holds about ``BLOCK_ELEMENTS``
    elements (at least one head, over the whole length). Per slab: features once; ``1/I``
    from Σ k̃ (one matvec); (Σ q̃, Σ q̃/I) as one 2-row product over φ(Q); (O, Ô) as one
    2-column product over φ(K); the competition softmax over the slab's whole key axis;
    Σ k̃/O and the allocation gate (matvecs); ``kv = Σ k̃^T comp v``; and
    the output matmul written straight into the output. Without autograd φ(Q) goes to one
    buffer reused by every slab and φ(K) into the slab's own output slice (when M == N and
    Dv == F; it is dead before the output is written), updated in place: a call touches
    little memory beyond its inputs and output. On the 2-core VM the first touch of a page
    not used for a while costs microseconds, so memory touched per call is time (the
    earlier row-blocked version with 64 MiB of cached features ran 2-3x slower in
    interleaved benchmarks).

    Args:
        q: (B, H, N, F); k: (B, H, M, F); v: (B, H, M, Dv) (k, v already repeated for GQA).
        phi: positive feature map; eps: lower clamp of the flows.
        clamp, competition, allocation: as in :func:`flow_attention`.
        q_valid: (B, N) bool or None; k_valid: (B, M) bool or None.

    Returns:
        (B, H, N, Dv).
    """
    b, h, n, f = q.shape
    m, dv = k.shape[2], v.shape[-1]
    dt = q.dtype
    inplace = grad_free(q, k, v)  # no autograd: temporaries may be updated in place
    own = inplace and any(phi is fn for fn in FLOW_FEATURE_MAPS.values())  # φ returns fresh tensors
    out = q.new_empty(b, h, n, dv)
    low = torch.finfo(dt).min / 4
    bufs: dict[tuple[str | int, ...], Tensor] = {}
    # φ(K) of a slab can live in the slab's output slice (dead once kv is formed): one buffer less
    k_in_out = m == n and dv == f

    def feats(x: Tensor, valid: Tensor | None, tag: str, dest: Tensor | None = None) -> Tensor:
        if own and phi is torch.sigmoid:
            if dest is None:
                key = (tag, *x.shape)  # φ(Q) and φ(K) may have equal shapes: never one buffer
                dest = bufs.get(key)
                if dest is None:
                    dest = bufs[key] = x.new_empty(x.shape)
            y = torch.sigmoid(x, out=dest)
        else:
            y = phi(x)
        if valid is None:
            return y
        w = valid[:, None, :, None].to(dt)
        return y.mul_(w) if own else y * w

    for bsl, hsl, _ in slabs(b, h, max(n, m), max(f, dv), 1, split_rows=False):
        qv = None if q_valid is None else q_valid[bsl]
        kvd = None if k_valid is None else k_valid[bsl]
        n_q = float(n) if qv is None else qv.sum(-1, dtype=dt)[:, None, None]
        m_k = float(m) if kvd is None else kvd.sum(-1, dtype=dt)[:, None, None]
        o = out[bsl, hsl]
        qf = feats(q[bsl, hsl], qv, "q")
        kf = feats(k[bsl, hsl], kvd, "k", o if k_in_out else None)
        inv_i = _mv(qf, kf.sum(-2)).clamp_min(eps).reciprocal()  # 1 / I   (B', H', N)
        # one pass over φ(Q) for (Σ_i q̃_i, Σ_i q̃_i / I_i), one over φ(K) for (O, Ô)
        sums = torch.stack([torch.ones_like(inv_i), inv_i], -2) @ qf  # (B', H', 2, F)
        flows = kf @ sums.transpose(-1, -2)  # (B', H', M, 2)
        inv_o = flows[..., 0].clamp_min(eps).reciprocal()  # 1 / O
        vb = v[bsl, hsl]
        if competition:
            o_hat = flows[..., 1]
            if clamp is not None:
                o_hat = o_hat.clamp(-clamp, clamp)
            if kvd is not None:
                o_hat = o_hat.masked_fill(~kvd[:, None, :], low)
            comp = torch.softmax(o_hat, -1) * m_k
            if kvd is not None:
                comp = comp * kvd[:, None, :].to(dt)
        gate = None
        if allocation:
            acc_k = _vm(inv_o, kf)  # Σ_j k̃_j / O_j
            ratio = n_q / (m_k if isinstance(m_k, float) else m_k.clamp_min(1.0))
            gate = torch.sigmoid(_mv(qf, acc_k) * ratio)
        if competition:
            # kf is not needed after this: scale it in place instead of a (M, Dv) copy of v
            kf = kf.mul_(comp[..., None]) if own else kf * comp[..., None]
        kv = kf.transpose(-1, -2) @ vb  # (B', H', F, Dv)
        row = inv_i if gate is None else gate * inv_i
        if inplace:
            torch.matmul(qf, kv, out=o)
            o.mul_(row[..., None])
        else:
            o.copy_((qf @ kv) * row[..., None])
    return out


def _flow_fast_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: Callable[[Tensor], Tensor],
    *,
    eps: float,
    clamp: float | None,
    competition: bool,
    allocation: bool,
    valid: Tensor | None,
    chunk_size: int,
) -> Tensor:
    """Causal Flowformer in one sweep over blocks of chunks.

    Per chunk, ``S = q̃_c k̃_c^T`` (C x C) gives every intra-chunk term: ``I`` (row sums of
    tril S), ``O`` (column sums of triu S), ``Î`` (tril S @ t/O), ``Ô`` ((t/I)^T triu S) and the
    output (tril S @ comp·v); running sums of k̃, q̃, k̃ t/O, q̃ t/I, the running log-sum-exp of
    Ô and the state ``Σ k̃^T comp v`` carry the earlier chunks. No (N, F) prefix sum is built.
    """
    b, h, n, _ = q.shape
    dv = v.shape[-1]
    dt = q.dtype
    c = max(1, min(int(chunk_size), n))
    low = torch.finfo(dt).min / 4
    vmask = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
    pos_all = vmask.to(dt).cumsum(-1)  # (B, N): 1-based position among real tokens
    out = q.new_empty(b, h, n, dv)
    inplace = grad_free(q, k, v)
    tri = prefix_mask(c, q.device)
    carry: dict[str, Tensor] = {}
    rows = block_rows(b, h, max(q.shape[-1], dv), c, n)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        length = e - s
        g = math.ceil(length / c)
        pad = g * c - length
        vm = vmask[:, None, s:e, None].to(dt)
        qf, kf, vb = phi(q[:, :, s:e]) * vm, phi(k[:, :, s:e]) * vm, v[:, :, s:e]
        pos = pos_all[:, None, s:e]
        ok = vmask[:, None, s:e]
        if pad:
            qf, kf, vb = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vb))
            pos = F.pad(pos, (0, pad), value=1.0)
            ok = F.pad(ok, (0, pad), value=False)
        f = qf.shape[-1]
        qc, kc, vc = qf.reshape(b, h, g, c, f), kf.reshape(b, h, g, c, f), vb.reshape(b, h, g, c, dv)
        t = pos.reshape(b, 1, g, c)
        t1 = t.clamp_min(1.0)
        okc = ok.reshape(b, 1, g, c)
        if not carry:
            zf = q.new_zeros(b, h, f)
            carry = {
                "k": zf,
                "q": zf,
                "kw": zf,
                "qu": zf,
                "lse": torch.full((b, h, 1), low, dtype=dt, device=q.device),
                "S": q.new_zeros(b, h, f, dv),
            }

        def excl(x: Tensor, start: Tensor) -> Tensor:
            """Exclusive prefix over the block's chunks plus the carry: x (B, H, g, F)."""
            return start[:, :, None] + F.pad(x[:, :, :-1].cumsum(2), (0, 0, 1, 0))

        sc = qc @ kc.transpose(-1, -2)  # (B, H, g, c, c)
        lo = sc.masked_fill(~tri, 0.0)  # j <= i
        up = sc.masked_fill(~tri.T, 0.0)  # i <= j
        ks, qs = kc.sum(-2), qc.sum(-2)
        i_cl = (lo.sum(-1) + _mv(qc, excl(ks, carry["k"]))).clamp_min(eps)
        o_cl = (up.sum(-2) + _mv(kc, excl(qs, carry["q"]))).clamp_min(eps)
        w = t / o_cl
        u = t / i_cl
        kw = (w.unsqueeze(-2) @ kc).squeeze(-2)  # (B, H, g, F): Σ_chunk k̃ t/O
        qu = (u.unsqueeze(-2) @ qc).squeeze(-2)
        i_hat = (_mv(lo, w) + _mv(qc, excl(kw, carry["kw"]))) / t1
        if competition:
            o_hat = ((u.unsqueeze(-2) @ up).squeeze(-2) + _mv(kc, excl(qu, carry["qu"]))) / t1
            if clamp is not None:
                o_hat = o_hat.clamp(-clamp, clamp)
            logits = o_hat.masked_fill(~okc, low).reshape(b, h, g * c)
            lse = torch.logaddexp(carry["lse"], torch.logcumsumexp(logits, -1))
            comp = (t.reshape(b, 1, g * c) * torch.exp(logits - lse)).masked_fill(~ok.reshape(b, 1, g * c), 0.0)
            comp = comp.reshape(b, h, g, c)
            carry["lse"] = lse[..., -1:]
            cv = vc * comp[..., None]
        else:
            cv = vc * okc[..., None].to(dt)
        num = lo @ cv
        kvc, carry["S"] = chunk_states(kc.transpose(-1, -2) @ cv, carry["S"], None)  # (B, H, g, F, Dv)
        if inplace:
            num.view(-1, c, dv).baddbmm_(qc.reshape(-1, c, f), kvc.view(-1, f, dv))
        else:
            num = num + qc @ kvc
        row = (torch.sigmoid(i_hat) if allocation else torch.ones_like(i_hat)) / i_cl
        res = num.mul_(row[..., None]) if inplace else num * row[..., None]
        out[:, :, s:e] = res.reshape(b, h, g * c, dv)[:, :, :length]
        carry["k"] = carry["k"] + ks.sum(2)
        carry["q"] = carry["q"] + qs.sum(2)
        carry["kw"] = carry["kw"] + kw.sum(2)
        carry["qu"] = carry["qu"] + qu.sum(2)
    return out
