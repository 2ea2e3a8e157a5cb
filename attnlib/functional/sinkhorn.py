"""Doubly-stochastic (Sinkhorn) attention - Sander, Ablin, Blondel & Peyré, "Sinkformers:
Transformers with Doubly Stochastic Attention" (AISTATS 2022).

The softmax's row normalisation of ``K = exp(q k^T · scale)`` is replaced by Sinkhorn's
alternating normalisations in the log domain: step 1 normalises rows (to 1), step 2 columns
(to N/M, so the total mass stays N), step 3 rows again, ... ``n_iters`` counts the steps, so
``n_iters=1`` is exactly softmax attention and the matrix approaches a doubly-stochastic one as
``n_iters`` grows (the Sinkformers convention).

Masking: disallowed (query, key) pairs get zero weight; padded queries (``query_mask``) take part
in no column sum and return zeros - in self-attention with key padding the padded tokens are
padded queries too. Rows with no allowed key return zeros; columns with no allowed query stay
zero. The row/column targets use the numbers of real queries and keys, so padding does not
change the result for the real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, describe, int_at_least
from attnlib.functional._common import acc_dtype, as_attention_mask, repeat_kv
from attnlib.functional.ot import NEG, sinkhorn_steps, sinkhorn_steps_blocked, transport_blocked
from attnlib.masks import MaskLike

__all__ = ["sinkhorn_attention"]


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    query_mask: Tensor | None = None,
    scale: float | None = None,
    n_iters: int = 3,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sinkhorn attention: ``P v`` with P the Sinkhorn normalisation of ``exp(q k^T · scale)``.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv) (H a multiple of H_kv).
        mask: attnlib masks (True = may attend): key padding (B, M), full (B|1, H|1, N, M), ...
        causal: bottom-right aligned causal constraint on the pairs. Note that column
            normalisation lets later queries influence earlier outputs, so the result is not
            causal in the autoregressive sense for ``n_iters >= 2`` (the attention variant does
            not offer it).
        query_mask: (B, N) bool, False = padded query (zero row, excluded from column sums).
        scale: logit scale, default D**-0.5.
        n_iters: normalisation steps, rows first (1 = softmax).
        dropout_p: dropout on P (training).
        return_weights: also return P (B, H, N, M) (before dropout). Without weights the
            iterations run over blocks of query rows (:func:`attnlib.functional.ot.sinkhorn_steps_blocked`):
            memory O(N · block) instead of O(N · M), the logits recomputed at every step.

    Returns:
        out (B, H, N, Dv) in q's dtype (the iterations run in >= float32), or (out, P).
    """
    check_qkv(q, k, v, where="sinkhorn_attention")
    int_at_least(n_iters, 1, "sinkhorn_attention: n_iters", hint=" (1 = softmax)")
    b, h, n, d = q.shape
    m = k.shape[2]
    if query_mask is not None and (
        not isinstance(query_mask, Tensor) or query_mask.dtype != torch.bool or tuple(query_mask.shape) != (b, n)
    ):
        raise ValueError(
            f"sinkhorn_attention: query_mask must be a bool tensor (B, N) = ({b}, {n}), got {describe(query_mask)}"
        )
    am = as_attention_mask(q, k, mask, causal)
    g = h // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    ct = acc_dtype(q.dtype)
    scale = d**-0.5 if scale is None else scale
    allowed = am.dense()
    if query_mask is not None:
        qm = query_mask[:, None, :, None]
        allowed = qm if allowed is None else allowed & qm
    if allowed is None:
        log_row = torch.zeros((), dtype=ct, device=q.device)
        log_col = torch.full((), float(torch.log(torch.tensor(n / m, dtype=torch.float64))), dtype=ct, device=q.device)
        rows = cols = None
    else:
        allowed = allowed.expand(b, h, n, m)
        rows = allowed.any(-1)  # (B, H, N): queries with at least one key
        cols = allowed.any(-2)  # (B, H, M): keys with at least one query
        n_real = rows.sum(-1, keepdim=True).to(ct)
        m_real = cols.sum(-1, keepdim=True).to(ct).clamp_min(1)
        log_row = torch.zeros((), dtype=ct, device=q.device)
        log_col = torch.log(n_real.clamp_min(1) / m_real)  # columns carry N_real / M_real each
    f = torch.zeros(b, h, n, dtype=ct, device=q.device)  # log row scalings
    gpot = torch.zeros(b, h, m, dtype=ct, device=q.device)  # log column scalings
    if not return_weights:  # blocks of query rows: the logits are recomputed, never held N x M
        qc, kc = q.to(ct), k.to(ct)

        def logit_rows(s: int, e: int) -> Tensor:
            lg = torch.matmul(qc[..., s:e, :], kc.transpose(-1, -2)) * scale
            if allowed is not None:
                lg = lg.masked_fill(~allowed[..., s:e, :], NEG)
            return lg

        shape = (b, h, n, m)
        f, gpot = sinkhorn_steps_blocked(logit_rows, shape, log_row, log_col, n_iters, f, gpot, rmask=rows, cmask=cols)
        return transport_blocked(logit_rows, f, gpot, v.to(ct), dropout_p=dropout_p).to(q.dtype)
    logits = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # (B, H, N, M)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, NEG)  # NEG + finite potentials stays ~NEG: no refill needed
    f, gpot = sinkhorn_steps(logits, log_row, log_col, n_iters, f, gpot, rmask=rows, cmask=cols)
    z = logits + f[..., :, None] + gpot[..., None, :]
    p = torch.exp(z)  # exp(~NEG) == 0 exactly on disallowed pairs
    pd = F.dropout(p, p=dropout_p) if dropout_p > 0 else p
    out = torch.matmul(pd, v.to(ct)).to(q.dtype)
    if return_weights:
        return out, p.to(q.dtype)
    return out
