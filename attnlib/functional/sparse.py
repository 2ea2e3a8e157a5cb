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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlib import dispatch
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
    "RowsFn",
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
    "sparsifiner_predictor",
    "sparsifiner_recon_loss",
    "sparsifiner_select",
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


RowsFn = Callable[[int, int], Tensor]
"""``rows(s, e)`` -> the rows s..e-1 of a (B, H, N, N) matrix, computed on demand (blocked paths)."""


def sparsifiner_predictor(
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
) -> RowsFn:
    """Sparsifiner's predictor A^ as a function of a row range: ``rows(s, e)`` -> A^[:, :, s:e] (B, H, e-s, N).

    The same A^ as :func:`sparsifiner_approx_attention`, computed a block of query rows at a
    time so that nothing N x N is held: the channel reduction and (non-causal) key
    down-projection are shared by every block; with ``causal`` a block's logits are
    ``(tril(q_c k_c^T) P_down)`` over its rows (O(block · N · (c + n_d)), never the
    (N, c, n_d) prefix sums). With ``sparse_basis`` Cf has ``basis_topk`` entries per row, so
    a row of A^ is a weighted sum of that many rows of |W_up| (an embedding bag: O(topk · N)
    per row instead of O(n_d · N)).
    """
    n = q.shape[2]
    acc = acc_dtype(q.dtype)  # ranking needs precision
    wq, bq_, wk, bk_ = (t.to(acc) for t in (*q_reduce, *k_reduce))
    qc, kc = F.linear(q.to(acc), wq, bq_), F.linear(k.to(acc), wk, bk_)
    if key_valid is not None:
        kc = kc * key_valid[:, None, :, None].to(acc)
    dn = down[:n].to(acc)
    k_down = None if causal else torch.einsum("bhnc,nd->bhcd", kc, dn)
    w_up = up[:n].to(acc).T  # (n_d, N)
    if sparse_basis:
        w_up = w_up.abs()
        w_up = (w_up * (w_up > basis_threshold)).contiguous()  # rows gathered by the embedding bag

    def rows(s: int, e: int) -> Tensor:
        if k_down is None:  # query i sees the down-projection of keys j <= i only
            sc = torch.matmul(qc[:, :, s:e], kc[:, :, :e].transpose(-1, -2))
            later = torch.arange(s, e, device=q.device)[:, None] < torch.arange(e, device=q.device)
            logits = torch.matmul(sc.masked_fill(later, 0.0), dn[:e])
        else:
            logits = torch.matmul(qc[:, :, s:e], k_down)
        cf = torch.softmax(logits * predictor_scale, -1)
        if not sparse_basis:
            return torch.matmul(cf, w_up)
        top = cf.topk(min(basis_topk, cf.shape[-1]), -1)
        lead = top.indices.shape[:-1]
        a = F.embedding_bag(
            top.indices.reshape(-1, top.indices.shape[-1]),
            w_up,
            per_sample_weights=top.values.reshape(-1, top.values.shape[-1]),
            mode="sum",
        )
        return a.view(*lead, n)

    return rows


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
    depends on later tokens. The whole matrix at once; :func:`sparsifiner_predictor` gives it
    a block of rows at a time.
    """
    rows = sparsifiner_predictor(
        q,
        k,
        q_reduce,
        k_reduce,
        down,
        up,
        predictor_scale=predictor_scale,
        sparse_basis=sparse_basis,
        basis_topk=basis_topk,
        basis_threshold=basis_threshold,
        causal=causal,
        key_valid=key_valid,
    )
    return rows(0, q.shape[2])


def _as_rows(a: Tensor | RowsFn) -> RowsFn:
    return a if callable(a) else (lambda s, e: a[:, :, s:e])


def _mask_rows(allowed: Tensor | None, s: int, e: int) -> Tensor | None:
    return None if allowed is None else allowed[..., s:e, :]


def sparsifiner_recon_loss(
    a_raw: Tensor | RowsFn, q: Tensor, k: Tensor, allowed: Tensor | None, scale: float, num_dense_queries: int
) -> Tensor:
    """Sparsifiner's reconstruction loss ``sum((A^_raw - A)^2)`` over the rows after ``num_dense_queries``.

    ``a_raw`` (B, H, N, N) is the predictor's raw output, or ``rows(s, e)`` giving its rows
    (:func:`sparsifiner_predictor`, ``sparse_basis=False``): the loss is then summed over blocks
    of rows, each recomputed in the backward pass (activation checkpointing), so neither the
    forward nor the backward holds an N x N matrix. A = softmax(q k^T · scale) under
    ``allowed`` (broadcastable bool or None), detached: the predictor's only gradient.
    """
    rows_of = _as_rows(a_raw)
    b, h, n = q.shape[:3]

    def block(s: int, e: int) -> Tensor:
        with torch.no_grad():
            sc = torch.matmul(q[:, :, s:e], k.transpose(-1, -2)) * scale
            ok = _mask_rows(allowed, s, e)
            if ok is not None:
                sc = sc.masked_fill(~ok, float("-inf"))
            teacher = softmax_or_zero(sc.to(acc_dtype(q.dtype)))
        a = rows_of(s, e)
        return (a - teacher.to(a.dtype)).square().sum()

    nd = min(num_dense_queries, n)
    step = dispatch.row_block(n - nd, n, b * h)
    total = q.new_zeros((), dtype=acc_dtype(q.dtype))
    for s in range(nd, n, step):
        e = min(n, s + step)
        part = checkpoint(block, s, e, use_reentrant=False) if callable(a_raw) else block(s, e)
        total = total + part
    return total


def sparsifiner_select(
    a_hat: Tensor | RowsFn,
    n: int,
    *,
    keep_rate: float,
    allowed: Tensor | None = None,
    num_dense_queries: int = 1,
    additive: bool = False,
) -> Callable[[int, int], Tensor]:
    """The keys each query keeps: ``keep(s, e)`` -> bool (B, H, e-s, N) for query rows s..e-1.

    With ``additive`` the same selection as an additive logit bias in the dtype of ``a_hat``
    (0 where kept, -inf elsewhere): what PyTorch's fused CPU attention takes without converting.

    Query i keeps its K_i = ceil(keep_rate · #keys it may see) (ceil(keep_rate · N) without
    masks) highest-ranked keys under ``a_hat`` ((B, H, N, N) or ``rows(s, e)``), restricted to
    ``allowed`` (broadcastable to (B, H, N, N)); the first ``num_dense_queries`` rows keep every
    allowed key. Selection has no gradient. Every block uses the same top-k size (the largest
    K_i), so a row's selection does not depend on the block it falls in.
    """
    rows_of = _as_rows(a_hat)
    kk = min(n, math.ceil(keep_rate * n))
    k_row = None
    if allowed is not None:
        # query i keeps ceil(keep_rate * #keys it may see), so neither a causal prefix's output
        # (incremental decoding == full forward) nor a padded example's depends on the length
        k_row = (allowed.sum(-1, keepdim=True) * keep_rate).ceil().clamp(min=1)  # (B|1, H|1, N, 1)
        kk = min(n, int(k_row.max()))
    nd = min(num_dense_queries, n)

    def keep(s: int, e: int) -> Tensor:
        with torch.no_grad():
            a = rows_of(s, e)
            ok = _mask_rows(allowed, s, e)
            if ok is not None:
                a = a.masked_fill(~ok, float("-inf"))
            # best first where rows keep different counts (the first K_i ranks); a set otherwise
            idx = a.topk(kk, -1, sorted=k_row is not None).indices  # (B, H, e-s, K)
            if additive:
                out, hit, miss = torch.full_like(a, float("-inf")), 0.0, float("-inf")
            else:
                out, hit, miss = torch.zeros(a.shape, dtype=torch.bool, device=a.device), True, False
            if k_row is None:
                out.scatter_(-1, idx, hit)
            else:
                picked = (torch.arange(kk, device=idx.device) < k_row[..., s:e, :]).expand(idx.shape)
                out.scatter_(-1, idx, torch.full(idx.shape, hit, dtype=out.dtype).masked_fill(~picked, miss))
            if ok is not None:
                out.masked_fill_(~ok, miss)
            if s < nd:  # dense (CLS) rows
                dense = out[..., : nd - s, :]
                dense.fill_(hit)
                if ok is not None:
                    dense.masked_fill_(~ok[..., : nd - s, :], miss)
            return out

    return keep


def sparsifiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a_hat: Tensor | RowsFn,
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
    ((B, H, N, N), or ``rows(s, e)`` giving its rows, see :func:`sparsifiner_predictor`) ranks
    the keys (no gradient), ``allowed`` (broadcastable to (B, H, N, N)) restricts them. The first
    ``num_dense_queries`` query rows (CLS) attend densely (see :func:`sparsifiner_select`).

    Computed a block of query rows at a time: the block's selection becomes a boolean mask
    and softmax attention runs under it (PyTorch's fused kernel on CPU, the explicit form when
    weights are requested), so memory is O(block · N) besides the output and ``allowed``.
    Softmax over the K kept keys equals softmax over the whole row with the others masked.

    Args:
        q, k, v: (B, H, N, D).

    Returns:
        (out (B, H, N, Dv), weights (B, H, N, N) when ``return_weights`` else None).
    """
    b, h, n = q.shape[:3]
    fused = not return_weights and q.dtype == acc_dtype(q.dtype)  # the bias in q's dtype is exact
    keep = sparsifiner_select(
        a_hat, n, keep_rate=keep_rate, allowed=allowed, num_dense_queries=num_dense_queries, additive=fused
    )
    outs: list[Tensor] = []
    weights: list[Tensor] = []
    step = dispatch.row_block(n, n, b * h)
    for s in range(0, n, step):
        e = min(n, s + step)
        if fused:
            bias = keep(s, e).to(q.dtype)
            empty = None if allowed is None else bias.amax(-1, keepdim=True) == float("-inf")
            if empty is not None:  # rows without a key: attend anywhere (finite), then zero
                bias = bias.masked_fill(empty, 0.0)
            o = F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
            outs.append(o if empty is None else o.masked_fill(empty, 0.0))
            continue
        res = softmax_attention(
            q[:, :, s:e], k, v, mask=keep(s, e), scale=scale, dropout_p=dropout_p, return_weights=return_weights
        )
        if return_weights:
            outs.append(res[0])
            weights.append(res[1])
        else:
            outs.append(res)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    if not return_weights:
        return out, None
    return out, weights[0] if len(weights) == 1 else torch.cat(weights, 2)


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
