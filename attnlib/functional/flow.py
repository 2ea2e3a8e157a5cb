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

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv
from attnlib.functional._scan import (
    acc_dtype,
    column_mass,
    linear_scan,
    pack_result,
    prefix_mask,
    split_mask,
)
from attnlib.functional.softmax import repeat_kv
from attnlib.masks import MaskLike

__all__ = ["FLOW_FEATURE_MAPS", "flow_attention", "flow_quantities"]

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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
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
