"""The PyTorch path of :func:`attnlib.kernels.block_sparse_attention` with a ``score_mod``.

Each bucket of query blocks (the same plan as the fused path: every query block with all of its
active key blocks) forms its score tile ``q k^T · scale`` (R, X, bq, c·bk) explicitly, applies
``score_mod(score, b, h, q_idx, kv_idx)`` with the tile's global indices, adds the partial
blocks' element mask and takes the row softmax over the tile - which holds every key the row
may see, so no log-sum-exp merge is needed. Plain autograd gives the backward pass (the score
mod's own derivative included). Time and memory stay O(active blocks); rows are processed in
groups of at most ``_TILE_ELEMS`` scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["score_mod_forward"]

_TILE_ELEMS = 1 << 22  # scores per group of rows (bounds peak memory)


def score_mod_forward(
    q: Tensor, k: Tensor, v: Tensor, bm: Any, scale: float, score_mod: Callable[..., Tensor]
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention with ``score_mod`` applied to every score tile -> (out (B, H, N, Dv), lse (B, H, N)).

    q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv); ``bm`` an attnlib BlockMask for (N, M).
    Rows with no allowed key (or only scores the mod sends to -inf) give zeros and lse -inf.
    Differentiable through autograd.
    """
    from attnlib.kernels.block_sparse import _flat, _plan

    b, h, n, d = q.shape
    hk, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = bm.block_size
    nq, nk = math.ceil(n / bq), math.ceil(m / bk)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = _flat(q, bq, nq), _flat(k, bk, nk), _flat(v, bk, nk)
    rows_q = torch.arange(bq, device=q.device)
    rows_k = torch.arange(bk, device=q.device)
    idx_parts: list[Tensor] = []
    out_parts: list[Tensor] = []
    lse_parts: list[Tensor] = []
    for bucket in _plan(bm, b, h, hk):
        r_all, x = bucket.qflat.shape
        c = bucket.kflat.shape[2]
        step = max(1, _TILE_ELEMS // max(1, x * bq * c * bk))
        for s0 in range(0, r_all, step):
            sl = slice(s0, min(r_all, s0 + step))
            qi, ki = bucket.qflat[sl], bucket.kflat[sl]  # (r, X), (r, X, c)
            r = qi.shape[0]
            qb = qf[qi]  # (r, X, bq, D)
            kb = kf[ki].reshape(r, x, c * bk, d)
            vb = vf[ki].reshape(r, x, c * bk, dv)
            s = torch.matmul(qb, kb.transpose(-1, -2)).to(acc) * scale
            bh = qi // nq
            q_idx = (qi % nq)[..., None] * bq + rows_q  # (r, X, bq)
            kv_idx = ((ki % nk)[..., None] * bk + rows_k).reshape(r, x, c * bk)
            s = score_mod(
                s, (bh // h)[..., None, None], (bh % h)[..., None, None], q_idx[..., None], kv_idx[..., None, :]
            )
            bias = bucket.bias(acc, sl)
            if bias is not None:
                s = s + bias
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx).detach()
            p = torch.exp(s - mx)
            den = p.sum(-1, keepdim=True)
            ok = den > 0
            p = p / torch.where(ok, den, torch.ones_like(den))
            o = torch.matmul(p.to(v.dtype), vb)  # (r, X, bq, Dv)
            lse = torch.where(ok, mx + torch.log(torch.where(ok, den, torch.ones_like(den))), float("-inf"))
            idx_parts.append(qi.reshape(-1))
            out_parts.append(o.reshape(-1, bq, dv))
            lse_parts.append(lse.reshape(-1, bq).detach())
    out = torch.zeros(b * h * nq, bq, dv, dtype=q.dtype, device=q.device)
    lse_all = torch.full((b * h * nq, bq), float("-inf"), dtype=acc, device=q.device)
    if idx_parts:
        index = torch.cat(idx_parts)
        out = out.index_copy(0, index, torch.cat(out_parts).to(q.dtype))
        lse_all = lse_all.index_copy(0, index, torch.cat(lse_parts))
    out = out.reshape(b, h, nq * bq, dv)[:, :, :n]
    return out, lse_all.reshape(b, h, nq * bq)[:, :, :n]
