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
* MoSA (Piękos, Csordás & Schmidhuber 2025, arXiv 2505.00315): :func:`mosa_router`,
  :func:`mosa_select`, :func:`mosa_attention` (projected tokens), :func:`mosa_token_attention`
  (projects only the picked tokens).
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
from attnlib.masks import AttentionMask, BlockMask
from attnlib.positional import RotaryCall, rotate_at

__all__ = [
    "MOSA_ROUTINGS",
    "RowsFn",
    "block_max_attention",
    "block_pool",
    "layout_masked_attention",
    "mosa_attention",
    "mosa_k",
    "mosa_picked_attention",
    "mosa_router",
    "mosa_scatter_weights",
    "mosa_select",
    "mosa_token_attention",
    "partial_rotary",
    "rope_at_positions",
    "seer_gate_from_official",
    "seer_gate_logits",
    "seer_gate_loss",
    "seer_own_blocks",
    "seer_select",
    "sparsifiner_approx_attention",
    "sparsifiner_attention",
    "sparsifiner_block_select",
    "sparsifiner_predictor",
    "sparsifiner_recon_loss",
    "sparsifiner_select",
    "swinbert_hard_mask",
    "swinbert_soft_attention",
    "swinbert_soft_mask",
    "swinbert_sparsity",
    "top_k_earliest_fill",
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
    if valid is None:  # real tokens only (the last block may be short): plain reductions, no masks
        fill = {"avg": 0.0, "max": float("-inf"), "min": float("inf")}
        red = {"avg": torch.sum, "max": torch.amax, "min": torch.amin}
        outs = []
        for op in ops:
            xv = (F.pad(x, (0, 0, 0, pad), value=fill[op]) if pad else x).reshape(b, h, nb, size, d)
            outs.append(red[op](xv, 3))
        if "avg" in ops:
            i = ops.index("avg")
            count = torch.full((nb, 1), float(size), dtype=x.dtype, device=x.device)
            count[-1] = size - pad
            outs[i] = outs[i] / count
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]
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
    """Rotary embedding of x (B, H, n, d) at (float) positions pos (n,) or (B, n), frequencies ``base^(-2i/d)``."""
    return rotate_at(x, pos, base)


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


def layout_masked_attention(q: Tensor, k: Tensor, v: Tensor, bm: BlockMask, *, scale: float | None = None) -> Tensor:
    """Exact attention under a block layout as one SDPA call with its dense additive mask.

    q (B, H, N, D), k, v (B, H_kv, M, ·) -> (B, H, N, Dv). The mask (B'|1, H'|1, N, M) in q's
    dtype (0 allowed, -inf not) is built once and cached on ``bm`` (see
    :func:`attnlib.dispatch.block_layout_as_masked_dense` for when this beats the block-sparse
    kernel); rows with no allowed key are 0. Differentiable w.r.t. q, k, v.
    """
    key = f"masked_dense/{q.dtype}"
    if key not in bm._cache:
        allowed = bm.to_dense()
        empty = ~allowed.any(-1, keepdim=True)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~(allowed | empty), float("-inf"))
        bm._cache[key] = (bias, empty if bool(empty.any()) else None)
    bias, empty = bm._cache[key]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out if empty is None else out.masked_fill(empty, 0.0)


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
    rotary: RotaryCall | None = None,
    cross: bool = False,
) -> Tensor:
    """SeerAttention's AttnGate: block logits (B, H, n_q, n_k), float32 (float64 for float64 inputs).

    Q is pooled per block with ``q_pool``, K with ``k_pool`` (:func:`block_pool`); per-head
    maps ``q_gate`` (H, len(q_pool)·D, d_g) (None: the pooled Q itself, one op and d_g == D)
    and ``k_gate`` (H, len(k_pool)·D, d_g); RoPE at block positions (the position of the first
    token of each block) unless ``rope_base`` is None; then ``S = Q~ K~^T / sqrt(d_g)``.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D) (the pooled keys are repeated to H heads).
        allowed: block-level mask broadcastable to (B, H, n_q, n_k); the rest is -inf.
        causal_gate: query block I is represented by query block I - 1 (block 0 by its first
            query) and only key blocks entirely before it are scored, so the gate never reads
            future tokens (not the official gate, which scores the diagonal block).
        key_valid: (B, M) bool, keeps padding out of the pooling (of the queries too in
            self-attention, i.e. N == M and not ``cross``).
        rotary: the rotary positions q and k were rotated at by the module. The gate then pools
            the pre-rotary q and k (the rotation is undone) and rotates the gate vectors at the
            first position of each block with ``rotary.base``, as the official gate (which is
            called before the model applies RoPE). Without it, q and k are pooled as given and the
            block positions are ``I·block_size`` (queries bottom-right aligned for N != M).
        cross: cross-attention (the queries are not padded, whatever N and M).
    """
    _, h, n, _ = q.shape
    m = k.shape[2]
    bs = block_size
    acc = acc_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    if rotary is not None:
        q, k = rotary.unrotate_q(q), rotary.unrotate_k(k)
    q_valid = key_valid if key_valid is not None and n == m and not cross else None
    qp = block_pool(q, bs, q_pool, q_valid)
    kp = block_pool(k, bs, k_pool, key_valid)
    if causal_gate:
        first = q[:, :, :1].repeat(1, 1, 1, len(q_pool))
        qp = torch.cat([first, qp[:, :, :-1]], 2)
    if kp.shape[1] != h:
        kp = kp.repeat_interleave(h // kp.shape[1], 1)
    qg = qp if q_gate is None else torch.einsum("bhnd,hde->bhne", qp, q_gate.to(acc))
    kg = torch.einsum("bhnd,hde->bhne", kp, k_gate.to(acc))
    if rotary is not None:
        qg = rotate_at(qg, rotary.q_positions[..., ::bs], rotary.base)
        kg = rotate_at(kg, rotary.k_positions[..., ::bs], rotary.base)
    elif rope_base is not None:
        qpos = torch.arange(qg.shape[2], device=q.device) * bs + (m - n)
        kpos = torch.arange(kg.shape[2], device=q.device) * bs
        qg = rotate_at(qg, qpos, rope_base)
        kg = rotate_at(kg, kpos, rope_base)
    s = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(k_gate.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if causal_gate:
        first_pos = (torch.arange(s.shape[2], device=q.device) * bs + (m - n)).clamp(min=0)
        past = torch.arange(s.shape[3], device=q.device)[None, :] < (first_pos // bs)[:, None]
        s = s.masked_fill(~past, float("-inf"))
    return s


def seer_gate_from_official(state: dict[str, Tensor], num_heads: int, prefix: str = "") -> tuple[Tensor | None, Tensor]:
    """Gate weights of the official SeerAttention AttnGate -> (q_gate (H, ·, d_g) | None, k_gate (H, ·, d_g)).

    ``state`` holds ``{prefix}mask_linear_k.weight`` (H or H_kv, len(k_pool)·D, d_g) and, when the
    gate has a query map, ``{prefix}mask_linear_q.weight`` (H, len(q_pool)·D, d_g) - the official
    ``MultiHeadLinear`` layout, which is ours. A key map per KV head (grouped-query attention) is
    repeated to the query heads of its group (head h uses KV head h // (H / H_kv), as the
    official ``repeat_kv``), which gives the same logits.
    """
    kw = state[f"{prefix}mask_linear_k.weight"]
    qw = state.get(f"{prefix}mask_linear_q.weight")
    if kw.dim() != 3 or num_heads % kw.shape[0]:
        raise ValueError(
            f"mask_linear_k.weight must be (H_kv, in, d_g) with H_kv dividing H={num_heads}, got {tuple(kw.shape)}"
        )
    if kw.shape[0] != num_heads:
        kw = kw.repeat_interleave(num_heads // kw.shape[0], 0)
    if qw is not None and (qw.dim() != 3 or qw.shape[0] != num_heads):
        raise ValueError(f"mask_linear_q.weight must be (H={num_heads}, in, d_g), got {tuple(qw.shape)}")
    return qw, kw


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
    last_block_dense: bool = True,
    keep_own_blocks: bool = False,
    key_padding: Tensor | None = None,
    cross: bool = False,
) -> Tensor:
    """SeerAttention's block selection (B, H, n_q, n_k) bool from gate logits (B, H, n_q, n_k).

    Top-k per query block by ``density`` (causal: k = max(1, floor((1 - sqrt(1 - density)) ·
    n_k)), the official ``nz_ratio`` rule; otherwise k = max(1, round(density · n_k))), or
    ``threshold`` on softmax(logits) when given; never a -inf logit. ``last_block_dense`` (the
    official default) keeps every allowed block of the last two query-block rows.
    ``keep_own_blocks`` (with ``causal``) always keeps the block(s) holding each query block's own
    positions (:func:`seer_own_blocks`) that ``allowed`` permits, so no row is empty under a
    threshold; the official selection does not. With ``key_padding`` (B, M) n_k is each
    example's number of key blocks up to its last real key, and in self-attention (N == M, not
    ``cross``) the last two query-block rows are each example's own, so a padded example keeps
    the blocks it keeps when run alone.
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
    if last_block_dense:
        nq = logits.shape[-2]
        rows = torch.arange(nq, device=logits.device)
        if key_padding is not None and n == m and not cross:  # each example's own last two query blocks
            last = -(-sequence_extent(key_padding, m, logits.shape[0], logits.device) // block_size)  # (B,)
            dense = (rows >= last[:, None] - 2)[:, None, :, None]  # (B, 1, n_q, 1)
        else:
            dense = (rows >= nq - 2)[:, None]  # (n_q, 1)
        sel = (sel | dense) & allowed
    if causal and keep_own_blocks:
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


MOSA_ROUTINGS = ("expert_choice", "causal_expert_choice", "threshold")


def mosa_k(n: int, sparsity: float, min_tokens: int = 2) -> int:
    """MoSA's tokens per head for a sequence of n: ``clamp(floor(n / sparsity), min_tokens, n)`` (official)."""
    return min(n, max(min_tokens, math.floor(n / sparsity)))


def mosa_router(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """MoSA's router scores ``r = sigmoid(x W_r^T + b)``: x (B, N, C), weight (E, C) -> r (B, E, N).

    Computed in float32 (float64 for float64 inputs): rankings need the precision.
    """
    acc = acc_dtype(x.dtype)
    logits = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return torch.sigmoid(logits).transpose(1, 2)


def _causal_expert_choice(score: Tensor, sparsity: float, min_tokens: int) -> Tensor:
    """Causal expert choice: (B, E, N) scores (-inf = never) -> picked (B, E, N) bool.

    Token t is a candidate iff expert choice over the prefix 0..t would pick it (it ranks among
    the top ``k(t+1)`` of ``score[0..t]``, earlier tokens winning ties) and it is picked iff it
    is a candidate and the head has picked fewer than ``k(t+1)`` tokens so far, with
    ``k(n) = clamp(floor(n / sparsity), min_tokens, n)``. Each decision reads only the prefix, so it
    never changes when later tokens arrive, and a head never holds more than ``k(N)`` tokens. The
    running count ``c_{t+1} = min(c_t + cand_t, k(t+1))`` has the closed form
    ``A_{t+1} + min(0, min_{s<=t} (k(s+1) - A_{s+1}))`` with A the candidate prefix count.
    """
    n = score.shape[-1]
    dev = score.device
    t = torch.arange(n, device=dev)
    kt = torch.clamp(torch.clamp(torch.div(t + 1, sparsity, rounding_mode="floor"), min=min_tokens), max=t + 1).long()
    # rank of r_t among r_0..r_t: strictly larger earlier scores and equal earlier ones (ties: earlier first)
    rank = torch.zeros_like(score, dtype=torch.long)
    step = max(1, 2**22 // max(1, score[..., :1].numel() * n))  # query chunk: memory O(chunk * N)
    for a in range(0, n, step):
        b = min(n, a + step)
        cur = score[..., a:b, None]  # (B, E, c, 1)
        prev = score[..., None, :]  # (B, E, 1, N)
        earlier = t[None, :] < t[a:b, None]  # (c, N)
        beats = (prev > cur) | ((prev == cur) & (prev > float("-inf")))
        rank[..., a:b] = (beats & earlier).sum(-1)
    cand = (rank < kt) & (score > float("-inf"))
    cum = cand.long().cumsum(-1)  # A_{t+1}
    slack = torch.cummin(kt - cum, -1).values.clamp(max=0)
    count = cum + slack  # c_{t+1}
    prev_count = F.pad(count, (1, 0))[..., :-1]
    return count > prev_count


def mosa_select(
    r: Tensor,
    *,
    routing: str,
    sparsity: float = 4.0,
    min_tokens: int = 2,
    threshold: float = 0.5,
    include_first: bool = False,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MoSA's token choice per head from router scores r (B, E, N).

    * ``"expert_choice"`` (the paper and the official code): head e keeps its top-k tokens of the
      whole sequence, k = :func:`mosa_k` of the example's number of real tokens; ``include_first``
      keeps token 0 and the top-(k-1) of the rest (official). Whether token t is picked depends on
      later tokens' scores.
    * ``"causal_expert_choice"``: the same budget decided token by token from the prefix only
      (:func:`_causal_expert_choice`): causal outputs never depend on later tokens and
      incremental decoding equals the full forward.
    * ``"threshold"``: token t is picked iff ``r_t > threshold`` (k varies per head).

    ``valid`` (B, N) bool: padding tokens are never picked, so a right-padded example picks what
    it picks alone. A NaN score is always picked (beyond the budget if need be): NaN reaches the
    output instead of being hidden as an unpicked token.

    Returns:
        (idx (B, E, K) picked positions ascending, slot_valid (B, E, K) bool: the slots holding
        a picked token).
    """
    if routing not in MOSA_ROUTINGS:
        raise ValueError(f"mosa: routing must be one of {MOSA_ROUTINGS}, got {routing!r}")
    b, e, n = r.shape
    ok = torch.ones(b, 1, n, dtype=torch.bool, device=r.device) if valid is None else valid[:, None, :]
    score = r.detach().masked_fill(~ok, float("-inf"))
    if routing == "expert_choice":  # topk ranks NaN first: a NaN score is picked
        kk = mosa_k(n, sparsity, min_tokens)
        if include_first:
            score = score.clone()
            score[..., 0] = torch.where(ok[..., 0], float("inf"), float("-inf"))
        idx, order = score.topk(kk, dim=-1).indices.sort(-1)
        slot_valid = torch.gather(ok.expand(b, e, n), -1, idx)
        if valid is not None:  # k from the example's real tokens
            real = valid.sum(-1)  # (B,)
            k_b = torch.minimum(real, (real.double() / sparsity).floor().long().clamp_min(min_tokens))
            slot_valid = slot_valid & (order < k_b[:, None, None])
        return idx, slot_valid
    if routing == "threshold":
        pick = (score > threshold) & ok
        if include_first:
            pick[..., 0] = ok[..., 0].expand_as(pick[..., 0])
    else:
        pick = _causal_expert_choice(score, sparsity, min_tokens)
    pick = pick | (score.isnan() & ok)
    cnt = pick.sum(-1)
    kmax = max(1, int(cnt.max()))
    order = torch.argsort((~pick).to(torch.int8), dim=-1, stable=True)[..., :kmax]
    return order, torch.arange(kmax, device=r.device) < cnt[..., None]


def mosa_picked_attention(
    qg: Tensor,
    kg: Tensor,
    vg: Tensor,
    idx: Tensor,
    slot_valid: Tensor,
    *,
    causal: bool = False,
    full: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention among each head's picked tokens: qg, kg (B, E, K, D), vg (B, E, K, Dv).

    ``idx`` / ``slot_valid`` (B, E, K) from :func:`mosa_select`; causal by the original positions
    (``idx[j1] >= idx[j2]``, the paper's mask); ``full`` (B|1, E|1, N, N) a caller mask in the
    original positions. Returns (out (B, E, K, Dv), weights (B, E, K, K) or None).
    """
    b, e, kk = idx.shape
    allowed = slot_valid[..., None, :] & slot_valid[..., :, None]  # (B, E, K, K)
    if causal:
        allowed = allowed & (idx[..., None, :] <= idx[..., :, None])
    if full is not None:
        n = full.shape[-1]
        fb = full.expand(b, e, n, n)
        allowed = allowed & fb.gather(2, idx[..., None].expand(b, e, kk, n)).gather(
            3, idx[..., None, :].expand(b, e, kk, kk)
        )
    if need_weights:
        return softmax_attention(
            qg, kg, vg, mask=allowed, scale=scale, dropout_p=dropout_p, backend="math", return_weights=True
        )
    return softmax_attention(qg, kg, vg, mask=allowed, scale=scale, dropout_p=dropout_p), None


def mosa_scatter_weights(
    w_g: Tensor, idx: Tensor, n: int, need_weights: bool, need_importance: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Picked-token weights w_g (B, E, K, K) (router-scaled) in the sequence's positions.

    Returns (weights (B, E, N, N) or None, importance (B, E, N) or None).
    """
    b, e, kk = idx.shape
    weights = imp = None
    if need_weights:
        full_w = torch.zeros(b, e, kk, n, dtype=w_g.dtype, device=w_g.device)
        full_w = full_w.scatter(3, idx[..., None, :].expand(b, e, kk, kk), w_g)
        weights = torch.zeros(b, e, n, n, dtype=w_g.dtype, device=w_g.device)
        weights = weights.scatter(2, idx[..., None].expand(b, e, kk, n), full_w)
    if need_importance:
        imp = torch.zeros(b, e, n, dtype=w_g.dtype, device=w_g.device).scatter_add(2, idx, w_g.sum(2)) / n
    return weights, imp


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
    """MoSA over already projected tokens: q, k, v (B, E, N, D); r (B, E, N); idx, slot_valid from :func:`mosa_select`.

    Head e attends among its K picked tokens only (:func:`mosa_picked_attention`), multiplies the
    result by its router score (the router's only gradient path) and scatters it back; tokens a
    head did not pick get 0 from it.

    Returns:
        (out (B, E, N, Dv), weights (B, E, N, N) or None, importance (B, E, N) or None).
    """
    b, e, n, d = q.shape
    kk = idx.shape[-1]
    gi = idx[..., None]
    qg = torch.gather(q, 2, gi.expand(b, e, kk, d))
    kg = torch.gather(k, 2, gi.expand(b, e, kk, d))
    vg = torch.gather(v, 2, gi.expand(b, e, kk, v.shape[-1]))
    rg = torch.where(slot_valid, torch.gather(r, 2, idx).to(q.dtype), 0.0)
    out_g, w_g = mosa_picked_attention(
        qg, kg, vg, idx, slot_valid, causal=causal, full=full, scale=scale, dropout_p=dropout_p,
        need_weights=need_weights or need_importance,
    )  # fmt: skip
    out = torch.zeros(b, e, n, v.shape[-1], dtype=out_g.dtype, device=q.device)
    out = out.scatter(2, gi.expand(b, e, kk, v.shape[-1]), out_g * rg[..., None])
    if w_g is None:
        return out, None, None
    weights, imp = mosa_scatter_weights(w_g * rg[..., None], idx, n, need_weights, need_importance)
    return out, weights, imp


def partial_rotary(x: Tensor, positions: Tensor, base: float, n_rot: int) -> Tensor:
    """Rotate the first ``n_rot`` dims of x (..., K, D) at positions (broadcastable to x's (..., K)), keep the rest."""
    if n_rot <= 0:
        return x
    return torch.cat([rotate_at(x[..., :n_rot], positions, base), x[..., n_rot:]], -1)


def mosa_token_attention(
    x: Tensor,
    w_qkv: tuple[Tensor, Tensor, Tensor],
    b_qkv: tuple[Tensor | None, Tensor | None, Tensor | None],
    w_out: Tensor,
    r: Tensor,
    idx: Tensor,
    slot_valid: Tensor,
    *,
    positions: Tensor | None = None,
    rope_base: float = 10000.0,
    n_rot: int = 0,
    causal: bool = False,
    full: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """MoSA from tokens, projecting only the picked ones (the paper's compute and KV saving).

    x (B, N, C); per-head maps ``w_qkv`` = (W_q, W_k, W_v) each (E, D, C) and biases (E, D) or
    None; ``w_out`` (E, C, Dv) (head e's columns of the output projection); r, idx, slot_valid
    as in :func:`mosa_attention`. Head e gathers its K tokens, projects them
    (``X_s W^T``, O(K·C·D)), rotates the first ``n_rot`` dims of q and k at the tokens' original
    ``positions`` (N,) or (B, N) (none when None), attends among them
    (:func:`mosa_picked_attention`), scales by the router score, projects out (O(K·Dv·C)) and
    scatter-adds into the sequence.

    Returns:
        (y (B, N, C) without the output bias, router-scaled weights among the picks (B, E, K, K) or None).
    """
    b, n, c = x.shape
    e, kk = idx.shape[1], idx.shape[2]
    flat = (idx + n * torch.arange(b, device=x.device)[:, None, None]).reshape(-1)  # rows of x (B·N, C)
    xs = x.reshape(b * n, c).index_select(0, flat).view(b, e, kk, c)  # (B, E, K, C); saves a 1-D index only
    q, k, v = (
        torch.einsum("bekc,edc->bekd", xs, w) + (0 if bb is None else bb[None, :, None, :])
        for w, bb in zip(w_qkv, b_qkv)
    )
    if positions is not None and n_rot > 0:
        pos = positions.expand(b, n) if positions.dim() == 2 else positions[None].expand(b, n)
        pg = torch.gather(pos[:, None].expand(b, e, n), 2, idx)
        q, k = partial_rotary(q, pg, rope_base, n_rot), partial_rotary(k, pg, rope_base, n_rot)
    rg = torch.where(slot_valid, torch.gather(r, 2, idx).to(x.dtype), 0.0)
    out_g, w_g = mosa_picked_attention(
        q, k, v, idx, slot_valid, causal=causal, full=full, scale=scale, dropout_p=dropout_p, need_weights=need_weights
    )
    yg = torch.einsum("bekd,ecd->bekc", out_g * rg[..., None], w_out)
    y = torch.zeros(b * n, c, dtype=yg.dtype, device=x.device).index_add(0, flat, yg.reshape(b * e * kk, c))
    return y.view(b, n, c), None if w_g is None else w_g * rg[..., None]


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
    block_pooled: int | None = None,
) -> RowsFn:
    """Sparsifiner's predictor A^ as a function of a row range: ``rows(s, e)`` -> A^[:, :, s:e] (B, H, e-s, N).

    With ``block_pooled`` = b the function gives the mean of A^ over each (query block, key block)
    of b x b tokens instead, ``rows(I0, I1)`` -> (B, H, I1-I0, ceil(N/b)) for query blocks I0..I1-1
    (the last blocks' means over their real tokens): A^ is linear in Cf, so this is the block mean
    of Cf's rows times W_up's block means, O(N·n_d + (N/b)²·n_d), never A^ itself.

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

    def scaled_logits(s: int, e: int) -> Tensor:
        if k_down is None:  # query i sees the down-projection of keys j <= i only
            sc = torch.matmul(qc[:, :, s:e], kc[:, :, :e].transpose(-1, -2))
            later = torch.arange(s, e, device=q.device)[:, None] < torch.arange(e, device=q.device)
            logits = torch.matmul(sc.masked_fill(later, 0.0), dn[:e])
        else:
            logits = torch.matmul(qc[:, :, s:e], k_down)
        return logits * predictor_scale

    def coefficients(s: int, e: int) -> Tensor:
        return torch.softmax(scaled_logits(s, e), -1)

    if block_pooled is not None:  # mean of A^ over blocks = (mean of Cf over the query block) W_up pooled
        bs = block_pooled
        nb = math.ceil(n / bs)
        w_pool = F.pad(w_up, (0, nb * bs - n)).view(-1, nb, bs).sum(-1) / _block_counts(n, bs, w_up)
        step = max(bs, dispatch.row_block(n, w_up.shape[0], q.shape[0] * q.shape[1]) // bs * bs)
        pooled = []
        for s in range(0, n, step):
            e = min(n, s + step)
            rows_here = math.ceil((e - s) / bs)
            if sparse_basis:  # the basis_topk kept coefficients of each row, added into its block's row
                logits = scaled_logits(s, e)
                top = logits.topk(min(basis_topk, logits.shape[-1]), -1)
                vals = torch.exp(top.values - torch.logsumexp(logits, -1, keepdim=True))  # softmax at the top
                n_d = logits.shape[-1]
                at = (torch.arange(e - s, device=q.device) // bs * n_d)[:, None] + top.indices
                cf = vals.new_zeros(*vals.shape[:2], rows_here * n_d)
                cf = cf.scatter_add_(-1, at.flatten(2), vals.flatten(2)).view(*vals.shape[:2], rows_here, n_d)
            else:
                cf = coefficients(s, e)
                cf = F.pad(cf, (0, 0, 0, rows_here * bs - (e - s))).unflatten(2, (rows_here, bs)).sum(3)
            pooled.append(cf / _block_counts(e - s, bs, cf)[:, None])
        cf_pooled = torch.cat(pooled, 2) if len(pooled) > 1 else pooled[0]
        return lambda s, e: torch.matmul(cf_pooled[:, :, s:e], w_pool)

    def rows(s: int, e: int) -> Tensor:
        cf = coefficients(s, e)
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


def _block_counts(n: int, size: int, like: Tensor) -> Tensor:
    """Real tokens in each of the ceil(n / size) blocks of n tokens: (n_blocks,) in like's dtype."""
    nb = math.ceil(n / size)
    c = torch.full((nb,), float(size), dtype=like.dtype, device=like.device)
    c[-1] = n - (nb - 1) * size
    return c


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


def top_k_earliest(a: Tensor, kk: int, k_row: Tensor | None = None) -> Tensor:
    """Bool mask of the ``k`` highest entries of each row of ``a`` (..., N): k = ``kk``, or per row
    ``k_row`` (..., 1) <= kk. Ties at the k-th value go to the earlier positions (NaN ranks highest),
    so the choice is that of a stable sort: unlike ``topk``'s, it never depends on the row length
    (a causal row keeps the same keys however many later keys exist). O(N + kk log kk) per row."""
    n = a.shape[-1]
    if k_row is None and kk < n:
        # one unsorted top-(k+1): the k-th and (k+1)-th values tell whether the k-th value is tied
        # across the cut; without such a tie ``a >= k-th value`` is the top-k set whatever the order
        vals = a.topk(kk + 1, -1, sorted=False).values
        if bool(vals.isnan().any()):
            a = torch.nan_to_num(a, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
            vals = a.topk(kk + 1, -1, sorted=False).values
        cut = vals.topk(2, -1, largest=False).values  # (..., 2): (k+1)-th, k-th value
        thr = cut[..., 1:]
        if bool((cut[..., :1] < thr).all()):
            return a >= thr
    vals = a.topk(kk, -1).values  # descending (NaN first)
    if bool(vals.isnan().any()):
        a = torch.nan_to_num(a, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
        vals = a.topk(kk, -1).values
    k = torch.full((*vals.shape[:-1], 1), kk, device=a.device) if k_row is None else k_row.long()
    k = k.expand(*vals.shape[:-1], 1)
    thr = vals.gather(-1, k - 1)  # (..., 1): the k-th value
    above = a > thr
    ties = a == thr
    need = k - above.sum(-1, keepdim=True)  # how many of the tied entries to keep
    if not bool((ties.sum(-1, keepdim=True) > need).any()):  # no row has more ties than places
        return above | ties
    return above | (ties & (ties.cumsum(-1) <= need))


def top_k_earliest_fill(
    a: Tensor, kk: int, k_row: Tensor | None = None, *, hit: float | bool = True, miss: float | bool = False
) -> Tensor:
    """:func:`top_k_earliest`'s choice written as values: (..., N) of ``miss`` with ``hit`` at the kept keys.

    The dtype is ``a``'s for float ``hit`` / ``miss`` (e.g. 0 / -inf: an additive logit bias), bool
    for bool ones. The kept keys come from one ``topk`` (unsorted for one k, sorted for per-row
    ``k_row``) and are scattered into a tensor filled with ``miss`` (K writes per row, no
    N-long comparison); rows whose k-th value is tied across the cut take the stable rule of
    :func:`top_k_earliest`, computed on those rows only.
    """
    n = a.shape[-1]
    dtype = torch.bool if isinstance(hit, bool) else a.dtype
    kk = min(kk, n)
    if bool(torch.isnan(a.sum())):  # NaN ranks highest (a sum is NaN also for +inf and -inf: harmless)
        a = torch.nan_to_num(a, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    out = torch.full(a.shape, miss, dtype=dtype, device=a.device)
    if kk == 0:
        return out
    m = min(kk + 1, n)  # one past the cut, to see a tie across it
    if k_row is None:
        top = a.topk(m, -1, sorted=False)
        if m == kk:  # every key kept
            return out.fill_(hit)
        cut = top.values.topk(2, -1, largest=False)  # (k+1)-th and k-th values, and where they are
        src = torch.full(top.values.shape, hit, dtype=dtype, device=a.device)
        src.scatter_(-1, cut.indices[..., :1], miss)  # the (k+1)-th is not kept
        tied = cut.values[..., 0] == cut.values[..., 1]
    else:
        top = a.topk(m, -1)  # descending
        k = k_row.long().expand(*a.shape[:-1], 1)
        src = torch.where(torch.arange(m, device=a.device) < k, hit, miss).to(dtype)
        after = k.clamp(max=m - 1)
        tied = (k < n) & (top.values.gather(-1, after) == top.values.gather(-1, k - 1))
        tied = tied[..., 0]
    out.scatter_(-1, top.indices, src)
    if bool(tied.any()):  # ties across the cut: the stable rule on those rows
        flat, rows = out.view(-1, n), tied.reshape(-1).nonzero()[:, 0]
        sub_k = None if k_row is None else k.reshape(-1, 1)[rows]
        sel = top_k_earliest(a.reshape(-1, n)[rows], kk, sub_k)
        flat[rows] = torch.where(sel, hit, miss).to(dtype)
    return out


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
    allowed key; a row that may see no key keeps none. Selection has no gradient. Every block
    uses the same top-k size (the largest K_i), so a row's selection does not depend on the
    block it falls in.
    """
    rows_of = _as_rows(a_hat)
    kk = min(n, math.ceil(keep_rate * n))
    k_row = None
    empty = None
    if allowed is not None:
        # query i keeps ceil(keep_rate * #keys it may see), so neither a causal prefix's output
        # (incremental decoding == full forward) nor a padded example's depends on the length
        seen = allowed.sum(-1, keepdim=True)  # (B|1, H|1, N, 1)
        k_row = (seen * keep_rate).ceil().clamp(min=1)
        kk = min(n, int(k_row.max()))
        empty = seen == 0
        empty = empty if bool(empty.any()) else None  # such a row's one pick is a key it may not see
    nd = min(num_dense_queries, n)
    hit, miss = (0.0, float("-inf")) if additive else (True, False)

    def keep(s: int, e: int) -> Tensor:
        with torch.no_grad():
            a = rows_of(s, e)
            ok = _mask_rows(allowed, s, e)
            if ok is not None:
                a = a.masked_fill(~ok, float("-inf"))
            out = top_k_earliest_fill(a, kk, None if k_row is None else k_row[..., s:e, :], hit=hit, miss=miss)
            if empty is not None:
                out.masked_fill_(empty[..., s:e, :], miss)
            if s < nd:  # dense (CLS) rows
                dense = out[..., : nd - s, :]
                dense.fill_(hit)
                if ok is not None:
                    dense.masked_fill_(~ok[..., : nd - s, :], miss)
            return out

    return keep


def sparsifiner_block_select(scores: Tensor, allowed: Tensor, *, keep_rate: float) -> Tensor:
    """Key blocks each query block keeps: (B, H, n_q, n_k) bool from block scores (B, H, n_q, n_k).

    Query block I keeps its ceil(keep_rate · #key blocks it may visit) highest-scored key blocks
    among ``allowed`` (bool, broadcastable; the caller's layout), at least one where any is allowed.
    The block form of :func:`sparsifiner_select` (which ranks single keys per query).
    """
    allowed = allowed.expand_as(scores)
    counts = (allowed.sum(-1, keepdim=True) * keep_rate).ceil().clamp(min=1).to(torch.long)  # (B, H, n_q, 1)
    kk = min(scores.shape[-1], int(counts.max()))
    idx = scores.masked_fill(~allowed, float("-inf")).topk(kk, -1).indices  # best first
    keep = torch.arange(kk, device=scores.device) < counts
    return torch.zeros_like(allowed).scatter_(-1, idx, keep) & allowed


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
    no_key = None if allowed is None else ~allowed.any(-1, keepdim=True)  # rows that may see no key
    no_key = no_key if no_key is not None and bool(no_key.any()) else None
    step = dispatch.row_block(n, n, b * h)
    for s in range(0, n, step):
        e = min(n, s + step)
        if fused:
            bias = keep(s, e).to(q.dtype)
            empty = None if no_key is None else no_key[..., s:e, :]
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
