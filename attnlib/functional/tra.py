"""TRA, Threshold Relative Attention (Opper, Fernandez, Smolensky, Gao 2025, arXiv 2503.23174).

Per head, with QK-RMSNorm'd queries and keys and ``s_ij = q_i·k_j · scale``:

1. selective sparsity: key j is *kept* for query i iff the masks allow it and ``s_ij > threshold``
   (0 in the paper's code); dropped keys leave the softmax entirely;
2. contextualised distance: ``n_ij`` = the number of kept keys between key j and the query's own
   position p_i, both ends included (p_i = i + M - N: bottom-right aligned as the causal mask);
3. a learned forget gate ``g <= 0`` (a log-sigmoid) turns it into a bias:
   ``a_ij = s_ij + g_i · n_ij`` (``gate_on="query"``, the paper's code: one gate per query) or
   ``a_ij = s_ij + sum_{kept k between j and p_i} g_k`` (``gate_on="key"``: one gate per key,
   accumulated over the kept keys, as in the Forgetting Transformer);
4. ``P = softmax over kept keys of a``; a row with no kept key outputs 0.

Without a causal mask the distance counts the kept keys between j and p_i on either side
(an extension for bidirectional use; the paper is decoder-only). Query chunks keep memory at
O(chunk·M); time is O(N·M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.functional._common import acc_dtype, as_attention_mask, repeat_kv
from attnlib.masks import AttentionMask, MaskLike

__all__ = ["GATE_ON", "rms_normalize", "tra_attention", "tra_chunks"]

GATE_ON = ("query", "key")


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim (RMSNorm without a learned scale)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _between(cum: Tensor, own: Tensor, pos: Tensor) -> Tensor:
    """Sum of the per-key quantity between key j and position p (both included) from its
    inclusive cumulative sum ``cum`` (..., c, M) and its own values ``own`` (..., c, M).

    For j <= p: cum[p] - cum[j] + own[j]; for j > p: cum[j] - cum[p] + own[p].
    ``pos`` (c,) long holds p per query row (clamped into [0, M); rows with p < 0 see no key).
    """
    m = cum.shape[-1]
    p = pos.clamp(0, m - 1).view(1, 1, -1, 1).expand(*cum.shape[:-1], 1)
    at_p = cum.gather(-1, p)
    own_p = own.gather(-1, p)
    j = torch.arange(m, device=cum.device)
    left = j.view(1, 1, 1, m) <= pos.view(1, 1, -1, 1)
    return torch.where(left, at_p - cum + own, cum - at_p + own_p)


def tra_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    am: AttentionMask,
    *,
    scale: float,
    threshold: float = 0.0,
    qk_norm: bool = True,
    gate_on: str = "query",
    dropout_p: float = 0.0,
    eps: float = 1e-6,
    chunk_size: int = 256,
    need_weights: bool = False,
    need_importance: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """TRA over query chunks -> (out (B, H, N, Dv), weights (B, H, N, M) | None, importance (B, H, M) | None).

    Arguments as :func:`tra_attention` (``am`` the normalised masks). Weights and importance
    are taken before dropout.
    """
    _, h, n, _ = q.shape
    m = k.shape[2]
    g = h // k.shape[1]
    kk, vv = repeat_kv(k, g), repeat_kv(v, g)
    dt = acc_dtype(q.dtype)
    qn = rms_normalize(q.to(dt), eps) if qk_norm else q.to(dt)
    kn = rms_normalize(kk.to(dt), eps) if qk_norm else kk.to(dt)
    gate = gate.to(dt)
    offset = m - n  # query i sits at key position i + M - N (bottom-right, as the causal mask)
    outs: list[Tensor] = []
    ws: list[Tensor] = []
    imp: Tensor | None = None
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        scores = torch.matmul(qn[:, :, s:e], kn.transpose(-1, -2)) * scale  # (B, H, c, M)
        keep = scores > threshold
        allowed = am.dense_rows(s, e)
        if allowed is not None:
            keep = keep & allowed
        kf = keep.to(dt)
        pos = torch.arange(s, e, device=q.device) + offset
        if gate_on == "query":
            dist = _between(kf.cumsum(-1), kf, pos)
            bias = gate[:, :, s:e, None] * dist
        else:
            own = kf * gate[:, :, None, :]
            bias = _between(own.cumsum(-1), own, pos)
        logits = (scores + bias).masked_fill(~keep, float("-inf"))
        empty = ~keep.any(-1, keepdim=True)
        mx = logits.amax(-1, keepdim=True).masked_fill(empty, 0.0).detach()
        p = torch.exp(logits - mx)
        p = p / p.sum(-1, keepdim=True).masked_fill(empty, 1.0)
        if need_weights:
            ws.append(p)
        if need_importance:
            part = p.sum(2)
            imp = part if imp is None else imp + part
        pd = F.dropout(p, p=dropout_p) if dropout_p > 0 else p
        outs.append(torch.matmul(pd.to(v.dtype), vv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    weights = None if not need_weights else (ws[0] if len(ws) == 1 else torch.cat(ws, 2)).to(q.dtype)
    importance = None if imp is None else (imp / n).to(q.dtype)
    return out, weights, importance


def tra_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    threshold: float = 0.0,
    qk_norm: bool = True,
    gate_on: str = "query",
    dropout_p: float = 0.0,
    eps: float = 1e-6,
    chunk_size: int = 256,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Threshold Relative Attention (see the module docstring for the definition).

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv) (H a multiple of H_kv).
        gate: log forget gates (<= 0): (B, H, N) per query (``gate_on="query"``) or (B, H, M) per
            key (``gate_on="key"``).
        mask, causal: the library's masks (True = may attend); ``causal`` is bottom-right aligned.
        scale: logit scale, default D**-0.5.
        threshold: keys with ``s_ij <= threshold`` are dropped (0 in the paper's code).
        qk_norm: RMS-normalise q and k (no learned scale) before the scores, as the paper's code.
        dropout_p: dropout on the attention probabilities.
        eps: RMSNorm epsilon.
        chunk_size: query rows per chunk (memory O(chunk·M)).
        return_weights: also return the (B, H, N, M) weights.

    Returns:
        out (B, H, N, Dv), or (out, weights).
    """
    check_qkv(q, k, v, where="tra_attention")
    if gate_on not in GATE_ON:
        raise ValueError(f"tra_attention: gate_on must be one of {GATE_ON}, got {gate_on!r}")
    want = (q.shape[0], q.shape[1], q.shape[2] if gate_on == "query" else k.shape[2])
    if not isinstance(gate, Tensor) or tuple(gate.shape) != want:
        got = tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__
        raise ValueError(
            f"tra_attention: gate must be (B, H, {'N' if gate_on == 'query' else 'M'}) = {want}, got {got}"
        )
    positive_int(chunk_size, "tra_attention: chunk_size")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, w, _ = tra_chunks(
        q, k, v, gate, am, scale=scale, threshold=threshold, qk_norm=qk_norm, gate_on=gate_on,
        dropout_p=dropout_p, eps=eps, chunk_size=chunk_size, need_weights=return_weights,
    )  # fmt: skip
    return (out, w) if return_weights else out  # type: ignore[return-value]
