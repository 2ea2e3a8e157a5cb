"""The math of the learned sparse-attention variants: SeerAttention, MoSA, Sparsifiner, SwinBERT.

Pure functions; the variants in :mod:`attnlib.variants.sparse` hold the parameters and pass
them in. Tensors are (B, H, N, D) for queries and (B, H, M, D) for keys/values unless a
function says otherwise. Masks follow :mod:`attnlib.masks` (True = may attend). Gates,
routers and predictors compute in float32 (float64 for float64 inputs): rankings and
top-k selections need the precision.

* Block pooling and block-max targets: :func:`block_pool`, :func:`rope_at_positions`,
  :func:`block_max_attention`.
* SeerAttention (Gao et al. 2024, arXiv 2410.13276): :func:`seer_gate_logits`,
  :func:`seer_own_blocks`, :func:`seer_select`, :func:`seer_gate_loss`.
* MoSA (Piękos, Csordás & Schmidhuber 2025, arXiv 2505.00315): :func:`mosa_route`,
  :func:`mosa_attention`.
* Sparsifiner (Wei et al., CVPR 2023): :func:`sparsifiner_approx_attention`,
  :func:`sparsifiner_recon_loss`, :func:`sparsifiner_attention`.
* SwinBERT's learnable soft mask (Lin et al., CVPR 2022): :func:`swinbert_soft_mask`,
  :func:`swinbert_hard_mask`, :func:`swinbert_sparsity`, :func:`swinbert_soft_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.functional._common import (
    acc_dtype,
    masked_scores,
    nonzero,
    repeat_kv,
    sequence_extent,
    softmax_or_zero,
)
from attnlib.functional.softmax import softmax_attention
from attnlib.masks import AttentionMask
from attnlib.positional import apply_rotary

__all__ = [
    "block_max_attention",
    "block_pool",
    "mosa_attention",
    "mosa_route",
    "rope_at_positions",
    "seer_gate_logits",
    "seer_gate_loss",
    "seer_own_blocks",
    "seer_select",
    "sparsifiner_approx_attention",
    "sparsifiner_attention",
    "sparsifiner_recon_loss",
    "swinbert_hard_mask",
    "swinbert_soft_attention",
    "swinbert_soft_mask",
    "swinbert_sparsity",
]


# ------------------------------------------------------------------------------------------
# block pooling, block-max targets
# ------------------------------------------------------------------------------------------


def block_pool(x: Tensor, size: int, ops: tuple[str, ...], valid: Tensor | None = None) -> Tensor:
    """Block pooling with ceil mode over valid tokens: x (B, H, L, D) -> (B, H, ceil(L/size), len(ops)·D).

    ``ops`` among "avg", "max", "min" (concatenated in that order along the last dim).
    ``valid`` (B, L) bool excludes padding tokens; a block without valid tokens pools to 0.
    """
    b, h, n, d = x.shape
    nb = math.ceil(n / size)
    pad = nb * size - n
    xb = F.pad(x, (0, 0, 0, pad)).view(b, h, nb, size, d)
    vm = (torch.arange(nb * size, device=x.device) < n).view(1, 1, nb, size, 1)
    if valid is not None:
        vm = vm & F.pad(valid, (0, pad)).view(valid.shape[0], 1, nb, size, 1)
    some = vm.any(3)
    outs = []
    for op in ops:
        if op == "avg":
            outs.append((xb * vm).sum(3) / vm.sum(3).clamp_min(1).to(x.dtype))
        elif op == "max":
            outs.append(torch.where(some, xb.masked_fill(~vm, float("-inf")).amax(3), 0.0))
        else:  # min
            outs.append(torch.where(some, xb.masked_fill(~vm, float("inf")).amin(3), 0.0))
    return torch.cat(outs, -1)


def rope_at_positions(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary embedding of x (B, H, n, d) at (float) positions pos (n,), frequencies ``base^(-2i/d)``."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    return apply_rotary(x, ang.cos(), ang.sin())


def block_max_attention(
    q: Tensor, k: Tensor, mask: AttentionMask, scale: float, bq: int, bk: int, chunk_blocks: int = 8
) -> Tensor:
    """SeerAttention's distillation target: ``GT[I, J] = max_{i in I, j in J} softmax(q k^T)[i, j]``, row-normalised.

    q (B, H, N, D), k (B, H, M, D) -> (B, H, ceil(N/bq), ceil(M/bk)) in float32 (float64 for
    float64 inputs), computed over chunks of ``chunk_blocks`` query blocks (memory
    O(chunk · M)). Rows with no allowed key are 0.
    """
    b, h, n, _ = q.shape
    m = k.shape[2]
    nq, nk = math.ceil(n / bq), math.ceil(m / bk)
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, h, nq, nk, dtype=acc, device=q.device)
    rows = chunk_blocks * bq
    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        s = masked_scores(q, k, mask, (s0, s1), scale, acc)
        p = softmax_or_zero(s)  # empty rows -> 0
        nr = s1 - s0
        i0 = s0 // bq
        nblk = math.ceil(nr / bq)
        p = F.pad(p, (0, nk * bk - m, 0, nblk * bq - nr))
        p = p.view(b, h, nblk, bq, nk, bk).amax((3, 5))
        out[:, :, i0 : i0 + nblk] = p
    return out / nonzero(out.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------------------
# SeerAttention
# ------------------------------------------------------------------------------------------


def seer_gate_logits(
    q: Tensor,
    k: Tensor,
    k_gate: Tensor,
    q_gate: Tensor | None = None,
    *,
    block_size: int,
    q_pool: tuple[str, ...] = ("avg",),
    k_pool: tuple[str, ...] = ("max", "min", "avg"),
    rope_base: float | None = 10000.0,
    allowed: Tensor | None = None,
    causal_gate: bool = False,
    key_valid: Tensor | None = None,
    cross: bool = False,
) -> Tensor:
    """SeerAttention's AttnGate: block logits (B, H, n_q, n_k), float32 (float64 for float64 inputs).

    Q is pooled per block with ``q_pool``, K with ``k_pool`` (:func:`block_pool`); per-head
    maps ``q_gate`` (H, len(q_pool)·D, d_g) (None: the pooled Q itself, one op and d_g == D)
    and ``k_gate`` (H, len(k_pool)·D, d_g); RoPE at block positions (first token of each
    block, bottom-right aligned for N != M) unless ``rope_base`` is None; then
    ``S = Q~ K~^T / sqrt(d_g)``.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D) (the pooled keys are repeated to H heads).
        allowed: block-level mask broadcastable to (B, H, n_q, n_k); the rest is -inf.
        causal_gate: query block I is represented by query block I - 1 (block 0 by its first
            query) and only key blocks entirely before it are scored, so the gate never reads
            future tokens.
        key_valid: (B, M) bool, keeps padding out of the pooling (of the queries too in
            self-attention, i.e. N == M and not ``cross``).
        cross: cross-attention (the queries are not padded, whatever N and M).
    """
    _, h, n, _ = q.shape
    m = k.shape[2]
    bs = block_size
    acc = acc_dtype(q.dtype)
    q_valid = key_valid if key_valid is not None and n == m and not cross else None
    qp = block_pool(q.to(acc), bs, q_pool, q_valid)
    kp = block_pool(k.to(acc), bs, k_pool, key_valid)
    if causal_gate:
        first = q[:, :, :1].to(acc).repeat(1, 1, 1, len(q_pool))
        qp = torch.cat([first, qp[:, :, :-1]], 2)
    if kp.shape[1] != h:
        kp = kp.repeat_interleave(h // kp.shape[1], 1)
    qg = qp if q_gate is None else torch.einsum("bhnd,hde->bhne", qp, q_gate.to(acc))
    kg = torch.einsum("bhnd,hde->bhne", kp, k_gate.to(acc))
    if rope_base is not None:
        qpos = torch.arange(qg.shape[2], device=q.device) * bs + (m - n)
        kpos = torch.arange(kg.shape[2], device=q.device) * bs
        qg = rope_at_positions(qg, qpos, rope_base)
        kg = rope_at_positions(kg, kpos, rope_base)
    s = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(k_gate.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if causal_gate:
        first_pos = (torch.arange(s.shape[2], device=q.device) * bs + (m - n)).clamp(min=0)
        past = torch.arange(s.shape[3], device=q.device)[None, :] < (first_pos // bs)[:, None]
        s = s.masked_fill(~past, float("-inf"))
    return s


def seer_own_blocks(n: int, m: int, block_size: int, device: torch.device) -> Tensor:
    """(n_q, n_k) bool: the key blocks holding each query block's own positions (causal, bottom-right aligned)."""
    bs = block_size
    nq, nk = math.ceil(n / bs), math.ceil(m / bs)
    first = torch.arange(nq, device=device) * bs + (m - n)
    last = (torch.arange(nq, device=device) * bs + bs).clamp(max=n) - 1 + (m - n)
    j = torch.arange(nk, device=device)[None, :]
    return (j >= first[:, None].clamp(min=0) // bs) & (j <= last[:, None] // bs)


def seer_select(
    logits: Tensor,
    allowed: Tensor,
    *,
    causal: bool,
    density: float,
    threshold: float | None,
    block_size: int,
    n: int,
    m: int,
    key_padding: Tensor | None = None,
) -> Tensor:
    """SeerAttention's block selection (B, H, n_q, n_k) bool from gate logits (B, H, n_q, n_k).

    Top-k per query block by ``density`` (causal: k = max(1, floor((1 - sqrt(1 - density)) ·
    n_k)), the official ``nz_ratio`` rule; otherwise k = max(1, round(density · n_k))), or
    ``threshold`` on softmax(logits) when given; never a -inf logit. With ``causal`` the
    blocks holding each query block's own positions (:func:`seer_own_blocks`) that ``allowed``
    (block level) permits are always kept. With ``key_padding`` (B, M) n_k is each example's
    number of key blocks up to its last real key, so a padded example keeps the blocks it keeps
    when run alone.
    """
    nk = logits.shape[-1]
    finite = logits != float("-inf")  # NaN scores count as allowed (selected), so NaN is never hidden
    if threshold is not None:
        probs = torch.softmax(logits, -1)
        sel = (probs > threshold) | probs.isnan()  # a NaN score keeps its blocks: NaN must reach the output
    else:
        counts = -(-sequence_extent(key_padding, m, logits.shape[0], logits.device) // block_size)  # (B,)
        kk = (1 - math.sqrt(1 - density)) * counts if causal else density * counts
        kk = (kk.floor() if causal else kk.round()).clamp_min(1).to(torch.long)  # (B,)
        top = logits.topk(min(int(kk.max()), nk), dim=-1).indices
        keep = torch.arange(top.shape[-1], device=logits.device) < kk[:, None, None, None]
        sel = torch.zeros_like(finite).scatter_(-1, top, keep.expand_as(top))
    sel = sel & finite
    if causal:  # keep the block(s) holding each query block's own positions
        sel = sel | (seer_own_blocks(n, m, block_size, logits.device) & allowed)
    return sel


def seer_gate_loss(
    logits: Tensor, q: Tensor, k: Tensor, mask: AttentionMask, scale: float, block_size: int, skip_first: float
) -> Tensor:
    """The AttnGate's self-distillation loss KL(GT || softmax(logits)), averaged over all elements.

    GT is :func:`block_max_attention` of the (detached) q (B, H, N, D), k (B, H_kv, M, D)
    under ``mask``, restricted to the scored (finite) blocks of ``logits`` (B, H, n_q, n_k) and
    row-normalised; query blocks I < ``skip_first`` · n_q are left out (PyTorch ``KLDivLoss``
    'mean' over the rest). Gradients reach ``logits`` only.
    """
    kk = repeat_kv(k, q.shape[1] // k.shape[1])
    with torch.no_grad():
        gt = block_max_attention(q.detach(), kk.detach(), mask, scale, block_size, block_size)
    gt = gt * (logits.detach() > float("-inf"))  # the target lives on the scored blocks
    nq = logits.shape[2]
    start = int(nq * skip_first)
    if start >= nq:
        start = 0
    lg, t = logits[:, :, start:], gt[:, :, start:].to(logits.dtype)
    t = t / nonzero(t.sum(-1, keepdim=True))
    dead = ~(lg > float("-inf")).any(-1, keepdim=True)  # rows with nothing to score
    logp = torch.log_softmax(lg.masked_fill(dead, 0.0), -1)
    keep = t > 0
    term = torch.where(keep, t * (torch.log(torch.where(keep, t, torch.ones_like(t))) - logp), torch.zeros_like(t))
    return term.sum() / term.numel()


# ------------------------------------------------------------------------------------------
# MoSA
# ------------------------------------------------------------------------------------------


def mosa_route(
    q: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    key_padding: Tensor | None = None,
    causal_routing: bool,
    sparsity: float = 4.0,
    min_tokens: int = 2,
    threshold: float = 0.5,
    include_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """MoSA's router and token choice per head.

    Router ``r = sigmoid(x W^T + b)`` with x the concatenated per-head queries (B, N, H·D),
    ``weight`` (H, H·D), ``bias`` (H,) or None, in float32 (float64 for float64 inputs).
    Expert choice (``causal_routing=False``): head e picks its top-k tokens,
    k = clamp(floor(N / sparsity), min_tokens, N), N the example's number of real tokens.
    Causal routing: token t is picked iff ``r_t > threshold`` (a per-token decision; k varies per head). Padding tokens
    (``key_padding`` (B, N) False) are never picked; ``include_first`` always picks token 0.

    Returns:
        (r (B, H, N), idx (B, H, K) picked positions ascending, slot_valid (B, H, K) bool:
        which of the K slots hold a picked token).
    """
    b, h, n, d = q.shape
    x = q.transpose(1, 2).reshape(b, n, h * d)
    acc = acc_dtype(q.dtype)  # router in >= fp32
    logits = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    r = torch.sigmoid(logits).transpose(1, 2)  # (B, H, N)
    valid = torch.ones(b, 1, n, dtype=torch.bool, device=q.device)
    if key_padding is not None:
        valid = valid & key_padding[:, None, :]
    if causal_routing:
        pick = ((r.detach() > threshold) | r.detach().isnan()) & valid  # a NaN score is picked: NaN stays NaN
        if include_first:
            pick[..., 0] = valid[..., 0].expand_as(pick[..., 0])
        cnt = pick.sum(-1)
        kmax = max(1, int(cnt.max()))
        order = torch.argsort((~pick).to(torch.int8), dim=-1, stable=True)[..., :kmax]
        slot_valid = torch.arange(kmax, device=q.device) < cnt[..., None]
        return r, order, slot_valid
    kk = min(n, max(min_tokens, math.floor(n / sparsity)))
    score = r.detach().masked_fill(~valid, float("-inf"))
    if include_first:
        score[..., 0] = torch.where(valid[..., 0], float("inf"), float("-inf"))
    top = score.topk(kk, dim=-1).indices
    idx, order = top.sort(-1)
    slot_valid = torch.gather(valid.expand(b, h, n), -1, idx)
    if key_padding is not None:  # k from the example's real tokens: a padded example picks what it picks alone
        real = key_padding.sum(-1)  # (B,)
        k_b = torch.minimum(real, (real.double() / sparsity).floor().long().clamp_min(min_tokens))
        slot_valid = slot_valid & (order < k_b[:, None, None])
    return r, idx, slot_valid


def mosa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    idx: Tensor,
    slot_valid: Tensor,
    *,
    causal: bool = False,
    full: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    need_importance: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """MoSA's attention among each head's picked tokens, scaled by the router score and scattered back.

    q, k, v (B, H, N, D); r, idx, slot_valid from :func:`mosa_route`. Head e attends among its
    K tokens only (causal by original positions when ``causal``; ``full`` (B|1, H|1, N, N) a
    caller mask), multiplies the result by its router score (the router's only gradient path)
    and scatters it back; tokens a head did not pick get 0 from it.

    Returns:
        (out (B, H, N, Dv), weights (B, H, N, N) or None, importance (B, H, N) or None).
    """
    b, h, n, d = q.shape
    kk = idx.shape[-1]
    gi = idx[..., None]
    qg = torch.gather(q, 2, gi.expand(b, h, kk, d))
    kg = torch.gather(k, 2, gi.expand(b, h, kk, d))
    vg = torch.gather(v, 2, gi.expand(b, h, kk, v.shape[-1]))
    rg = torch.gather(r, 2, idx).to(q.dtype) * slot_valid
    allowed = slot_valid[..., None, :] & slot_valid[..., :, None]  # (B, H, K, K)
    if causal:
        allowed = allowed & (idx[..., None, :] <= idx[..., :, None])
    if full is not None:
        fb = full.expand(b, h, n, n)
        allowed = allowed & fb.gather(2, gi.expand(b, h, kk, n)).gather(3, idx[..., None, :].expand(b, h, kk, kk))
    if need_weights or need_importance:
        out_g, w_g = softmax_attention(
            qg, kg, vg, mask=allowed, scale=scale, dropout_p=dropout_p, backend="math", return_weights=True
        )
    else:
        out_g = softmax_attention(qg, kg, vg, mask=allowed, scale=scale, dropout_p=dropout_p)
        w_g = None
    out_g = out_g * rg[..., None]
    out = torch.zeros(b, h, n, v.shape[-1], dtype=out_g.dtype, device=q.device)
    out = out.scatter(2, gi.expand(b, h, kk, v.shape[-1]), out_g)
    weights = imp = None
    if w_g is not None:
        wr = w_g * rg[..., None]
        if need_weights:
            full_w = torch.zeros(b, h, kk, n, dtype=wr.dtype, device=q.device)
            full_w = full_w.scatter(3, idx[..., None, :].expand(b, h, kk, kk), wr)
            weights = torch.zeros(b, h, n, n, dtype=wr.dtype, device=q.device)
            weights = weights.scatter(2, gi.expand(b, h, kk, n), full_w)
        if need_importance:
            imp = torch.zeros(b, h, n, dtype=wr.dtype, device=q.device)
            imp = imp.scatter_add(2, idx, wr.sum(2)) / n
    return out, weights, imp


# ------------------------------------------------------------------------------------------
# Sparsifiner
# ------------------------------------------------------------------------------------------


def sparsifiner_approx_attention(
    q: Tensor,
    k: Tensor,
    q_reduce: tuple[Tensor, Tensor],
    k_reduce: tuple[Tensor, Tensor],
    down: Tensor,
    up: Tensor,
    *,
    predictor_scale: float,
    sparse_basis: bool,
    basis_topk: int = 8,
    basis_threshold: float = 0.02,
    causal: bool = False,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Sparsifiner's low-rank connectivity predictor A^ (B, H, N, N), in float32 (float64 for float64 inputs).

    Channel reduction ``q_c = q W_q^T + b_q``, ``k_c = k W_k^T + b_k`` (``q_reduce`` /
    ``k_reduce`` = (weight (c, D), bias (c,))); token down-projection ``K_down = k_c^T P_down``
    with ``down`` (>= N, n_d) (its first N rows); ``Cf = softmax(q_c K_down · predictor_scale)``;
    ``A^ = Cf W_up`` with ``W_up`` = the first N rows of ``up`` (>= N, n_d), transposed. With
    ``sparse_basis`` Cf keeps its top ``basis_topk`` entries and W_up becomes |W_up| with
    entries <= ``basis_threshold`` zeroed.

    ``key_valid`` (B, N) leaves padding keys out of the down-projection; with ``causal`` query i
    uses the down-projection of keys j <= i only (a prefix sum), so the predicted mask never
    depends on later tokens.
    """
    n = q.shape[2]
    acc = acc_dtype(q.dtype)  # ranking needs precision
    wq, bq_, wk, bk_ = (t.to(acc) for t in (*q_reduce, *k_reduce))
    qc, kc = F.linear(q.to(acc), wq, bq_), F.linear(k.to(acc), wk, bk_)
    if key_valid is not None:
        kc = kc * key_valid[:, None, :, None].to(acc)
    dn = down[:n].to(acc)
    if causal:
        k_down = torch.einsum("bhnc,nd->bhncd", kc, dn).cumsum(2)
        logits = torch.einsum("bhnc,bhncd->bhnd", qc, k_down)
    else:
        logits = torch.einsum("bhnc,bhcd->bhnd", qc, torch.einsum("bhnc,nd->bhcd", kc, dn))
    cf = torch.softmax(logits * predictor_scale, -1)
    w_up = up[:n].to(acc).T  # (n_d, N)
    if sparse_basis:
        top = cf.topk(min(basis_topk, cf.shape[-1]), -1).indices
        cf = torch.zeros_like(cf).scatter(-1, top, cf.gather(-1, top))
        w_up = w_up.abs()
        w_up = w_up * (w_up > basis_threshold)
    return torch.matmul(cf, w_up)


def sparsifiner_recon_loss(
    a_raw: Tensor, q: Tensor, k: Tensor, allowed: Tensor | None, scale: float, num_dense_queries: int
) -> Tensor:
    """Sparsifiner's reconstruction loss ``sum((A^_raw - A)^2)`` over the rows after ``num_dense_queries``.

    ``a_raw`` (B, H, N, N) is the predictor's raw output; A = softmax(q k^T · scale) under
    ``allowed`` (broadcastable bool or None), detached: the predictor's only gradient.
    """
    with torch.no_grad():
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        teacher = softmax_or_zero(s.to(acc_dtype(q.dtype)))
    nd = num_dense_queries
    return (a_raw[:, :, nd:] - teacher[:, :, nd:].to(a_raw.dtype)).square().sum()


def sparsifiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a_hat: Tensor,
    *,
    keep_rate: float,
    allowed: Tensor | None = None,
    causal: bool = False,
    num_dense_queries: int = 1,
    scale: float,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention of each query over the K keys the predictor ranks highest.

    Query i keeps K_i = ceil(keep_rate · #keys it may see) (ceil(keep_rate · N) without masks),
    so neither a causal prefix's output nor a padded example's depends on N; ``a_hat``
    (B, H, N, N) ranks the keys (no gradient), ``allowed`` (broadcastable to (B, H, N, N)) restricts them. The first
    ``num_dense_queries`` query rows (CLS) attend densely. O(N·K·D).

    Args:
        q, k, v: (B, H, N, D).

    Returns:
        (out (B, H, N, Dv), weights (B, H, N, N) when ``return_weights`` else None).
    """
    b, h, n, d = q.shape
    kk = min(n, math.ceil(keep_rate * n))
    rank_ok = None
    if allowed is not None:
        # query i keeps ceil(keep_rate * #keys it may see), so neither a causal prefix's output
        # (incremental decoding == full forward) nor a padded example's depends on the length
        k_row = (allowed.sum(-1, keepdim=True) * keep_rate).ceil().clamp(min=1)  # (B|1, H|1, N, 1)
        kk = min(n, int(k_row.max()))
        rank_ok = torch.arange(kk, device=q.device) < k_row  # (B|1, H|1, N, K)
    with torch.no_grad():
        if allowed is not None:
            a_hat = a_hat.masked_fill(~allowed, float("-inf"))
        idx = a_hat.topk(kk, -1).indices  # (B, H, N, K), best first
    # gathered attention over K keys per query; dense rows (CLS) separately
    kg = torch.gather(k[:, :, None].expand(b, h, n, n, d), 3, idx[..., None].expand(b, h, n, kk, d))
    vg = torch.gather(v[:, :, None].expand(b, h, n, n, v.shape[-1]), 3, idx[..., None].expand(b, h, n, kk, v.shape[-1]))
    s = torch.einsum("bhnd,bhnkd->bhnk", q, kg) * scale
    s = s.to(acc_dtype(q.dtype))
    if allowed is not None:
        ok = torch.gather(allowed.expand(b, h, n, n), 3, idx)
        if rank_ok is not None:
            ok = ok & rank_ok
        s = s.masked_fill(~ok, float("-inf"))
    p = softmax_or_zero(s).to(q.dtype)
    pd = F.dropout(p, dropout_p) if dropout_p > 0 else p
    out = torch.einsum("bhnk,bhnkd->bhnd", pd, vg)
    nd = min(num_dense_queries, n)
    w_dense = None
    if nd:
        dmask = None if allowed is None else allowed[:, :, :nd]
        o_d, w_dense = softmax_attention(
            q[:, :, :nd], k, v, mask=dmask, scale=scale, dropout_p=dropout_p, backend="math", return_weights=True
        )
        out = torch.cat([o_d, out[:, :, nd:]], 2)
    if not return_weights:
        return out, None
    w = torch.zeros(b, h, n, n, dtype=p.dtype, device=q.device).scatter(3, idx, p)
    if w_dense is not None:
        w = torch.cat([w_dense, w[:, :, nd:]], 2)
    return out, w


# ------------------------------------------------------------------------------------------
# SwinBERT learnable sparse mask
# ------------------------------------------------------------------------------------------


def swinbert_soft_mask(mask_logits: Tensor, size: int | None = None) -> Tensor:
    """``S = I + (1 - I) ⊙ sigmoid(V)`` over the leading (size, size) block of V (T, T) (default all)."""
    size = mask_logits.shape[0] if size is None else size
    eye = torch.eye(size, dtype=mask_logits.dtype, device=mask_logits.device)
    return eye + (1 - eye) * torch.sigmoid(mask_logits[:size, :size])


def swinbert_hard_mask(
    mask_logits: Tensor, n: int, threshold: float, device: torch.device | str, ends: Tensor | None = None
) -> Tensor:
    """The binarised soft mask ``S >= threshold`` over the last min(N, T) of N tokens, others all True: (N, N) bool.

    ``ends`` (B,): each example's sequence ends at ``ends[b]`` (its last real token + 1, see key
    padding); the mask then covers the min(end, T) tokens before it, and the result is (B, 1, N, N).
    """
    if ends is not None:
        out = torch.ones(len(ends), 1, n, n, dtype=torch.bool, device=device)
        for end in ends.unique().tolist():
            out[ends == end, :, :end, :end] = swinbert_hard_mask(mask_logits, end, threshold, device)
        return out
    s0 = max(0, n - mask_logits.shape[0])
    dense = torch.ones(n, n, dtype=torch.bool, device=device)
    with torch.no_grad():
        dense[s0:, s0:] = swinbert_soft_mask(mask_logits, n - s0).to(device) >= threshold
    return dense


def swinbert_sparsity(mask_logits: Tensor) -> Tensor:
    """SwinBERT's L1 sparsity term ``mean((1 - I) ⊙ sigmoid(V))`` of the mask logits V (T, T)."""
    eye = torch.eye(mask_logits.shape[0], dtype=mask_logits.dtype, device=mask_logits.device)
    return ((1 - eye) * torch.sigmoid(mask_logits)).abs().mean()


def swinbert_soft_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    soft_mask: Tensor,
    *,
    mask_scale: float,
    allowed: Tensor | None = None,
    scale: float,
    ends: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention with SwinBERT's soft mask as the additive bias ``-mask_scale · (1 - S)``.

    q (B, H, N, D), k, v (B, H_kv, M=N, D); ``soft_mask`` S (T, T), T <= N, covers the last T
    tokens (SwinBERT's [text; video] order); ``allowed`` (broadcastable bool) the caller's
    masks. ``ends`` (B,): example b ends at ``ends[b]`` (its last real token + 1, see key
    padding) and its mask is the leading (T_b, T_b) block of S on the T_b = min(end, T) tokens
    before that (None: every example ends at N). Logits and softmax in float32 (float64 for
    float64 inputs).

    Returns:
        (out (B, H, N, Dv), weights (B, H, N, N)).
    """
    b, h, n = q.shape[:3]
    g = h // k.shape[1]
    kk, vv = repeat_kv(k, g), repeat_kv(v, g)
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q, kk.transpose(-1, -2)).to(acc) * scale
    penalty = -mask_scale * (1 - soft_mask.to(acc))
    if ends is None:
        s0 = n - soft_mask.shape[0]
        s = torch.cat([s[..., :s0, :], torch.cat([s[..., s0:, :s0], s[..., s0:, s0:] + penalty], -1)], -2)
    else:
        bias = torch.zeros(b, 1, n, n, dtype=acc, device=q.device)
        for end in ends.unique().tolist():
            tb = min(end, soft_mask.shape[0])
            bias[ends == end, :, end - tb : end, end - tb : end] = penalty[:tb, :tb]
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = softmax_or_zero(s).to(q.dtype)
    return torch.matmul(w, vv), w
