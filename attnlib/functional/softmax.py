"""Exact softmax attention: SDPA / FlexAttention / explicit math backends, float64 reference.

All functions take q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) with H a multiple
of H_kv (grouped-query attention: query head h reads key/value head h // (H / H_kv)) and
return (B, H, N, Dv). Masks follow :mod:`attnlib.masks`: True = may attend; query rows with
no allowed key return zeros.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib import dispatch
from attnlib._validation import check_index, check_qkv, positive_int
from attnlib.dispatch import cpu_key_padding  # its documented name here
from attnlib.errors import UnsupportedError
from attnlib.functional._common import acc_dtype, as_attention_mask, repeat_kv, softmax_or_zero
from attnlib.masks import AttentionMask, BlockMask, MaskLike

__all__ = [
    "Backend",
    "biased_softmax_attention",
    "cpu_key_padding",
    "reference_attention",
    "softmax_attention",
    "softmax_attention_importance",
    "softmax_importance",
    "softmax_query_weights",
]

Backend = Literal["auto", "sdpa", "flex", "math", "block_sparse"]


def _exp_floor(dtype: torch.dtype) -> float:
    """Lowest exponent kept by the explicit softmax: ``exp`` of anything below it is a subnormal
    (or 0), far slower to compute than a normal ``exp``; the entries it lifts weigh < 1e-34 (fp32)."""
    return math.log(torch.finfo(dtype).tiny) + 8.0


def _softmax_rows(x: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Softmax over the last dim of x (..., M) restricted to ``allowed``; empty rows -> zeros.

    Args:
        x: (..., M) logits (float32 or float64). allowed: bool broadcastable to x (True = may
            attend) or None.

    Where :func:`attnlib.dispatch.softmax_rows_explicit` says so (short rows on CPU) it is
    computed as ``exp(x - max) / sum`` explicitly, else by ``torch.softmax``. The explicit form
    never takes ``exp`` of ``-inf`` or of subnormal results, both slow to compute: exponents are
    floored at :func:`_exp_floor` and masked entries are zeroed after the ``exp``.
    """
    empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
    if dispatch.softmax_rows_explicit(x.shape[-1], x.device):
        xm = x if allowed is None else x.masked_fill(~allowed, float("-inf"))
        mx = xm.amax(-1, keepdim=True)
        if empty is not None:
            mx = mx.masked_fill(empty, 0.0)  # all -inf: keep -inf - -inf out of the exp
        e = torch.exp((xm - mx).clamp_min(_exp_floor(x.dtype)))
        if allowed is not None:
            e = e.masked_fill(~allowed, 0.0)
        den = e.sum(-1, keepdim=True)
        return e / (den if empty is None else den.masked_fill(empty, 1.0))
    if allowed is None:
        return torch.softmax(x, dim=-1)
    assert empty is not None
    return torch.softmax(x.masked_fill(~(allowed | empty), float("-inf")), dim=-1).masked_fill(empty, 0.0)


def _math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Explicit attention in the input dtype (softmax in >= fp32). Returns (out, weights)."""
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    acc = scores.to(acc_dtype(scores.dtype))
    w = _softmax_rows(acc, allowed)
    w = w.to(q.dtype)
    wd = F.dropout(w, p=dropout_p) if dropout_p > 0 else w
    return torch.matmul(wd, v), w


def _sdpa(q: Tensor, k: Tensor, v: Tensor, am: AttentionMask, scale: float, dropout_p: float) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    kinds = am.kinds()
    if kinds == ["causal"] and am.n == am.m:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa)
    pad = dispatch.cpu_key_padding(am.m, q.device, q.dtype)
    if not kinds and not pad:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    allowed = am.dense()
    if allowed is None:  # no mask of the caller's: only the padded keys below are masked
        allowed = torch.ones(1, 1, 1, am.m, dtype=torch.bool, device=q.device)
    if pad:
        allowed = F.pad(allowed, (0, pad), value=False)
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    empty = ~allowed.any(-1, keepdim=True)
    has_empty = bool(empty.any())
    if has_empty:  # let empty rows attend to everything (finite grads), then zero them
        allowed = allowed | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0) if has_empty else out


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, am: AttentionMask, scale: float, compile: bool) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if compile else flex_attention
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, block_mask=am.to_flex(), scale=scale, enable_gqa=gqa)


def _block_sparse(q: Tensor, k: Tensor, v: Tensor, am: AttentionMask, scale: float) -> Tensor:
    """Route through the block-sparse kernel: every mask is folded into one BlockMask."""
    from attnlib.kernels import block_sparse_attention

    block_size = am.block.block_size if am.block is not None else (128, 128)
    bm = am.as_block_mask(block_size)
    if bm is None:  # nothing constrains the call: every block kept
        bm = BlockMask.all_blocks(am.n, am.m, block_size=block_size, device=q.device)
    return block_sparse_attention(q, k, v, bm, scale=scale)  # type: ignore[return-value]


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: Backend = "auto",
    return_weights: bool = False,
    compile_flex: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention ``softmax(q k^T · scale) v`` under masks.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        mask: anything :func:`attnlib.masks.normalize_mask` accepts (True = may attend).
        causal: bottom-right aligned causal mask (query i may see keys j <= i + M - N).
        scale: logit scale, default D**-0.5.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        backend: "sdpa" (PyTorch fused kernels), "flex" (FlexAttention; masks become a
            FlexAttention BlockMask), "math" (explicit, any dtype incl. float64, can return
            weights), "block_sparse" (:func:`attnlib.kernels.block_sparse_attention`; all
            masks are combined into one BlockMask) or "auto" (:func:`attnlib.dispatch.softmax_backend`:
            math when weights are requested; the block-sparse kernel when the masks include a
            BlockMask and there is no dropout; else SDPA).
        return_weights: also return the (B, H, N, M) attention weights (math backend).
        compile_flex: run FlexAttention through ``torch.compile`` (the fast path).

    Returns:
        out (B, H, N, Dv), or (out, weights (B, H, N, M)) when ``return_weights``.
        Rows with no allowed key are zeros (and their weights are zeros).
    """
    check_qkv(q, k, v, where="softmax_attention")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend not in ("auto", "sdpa", "flex", "math", "block_sparse"):
        raise ValueError(f"backend must be 'auto', 'sdpa', 'flex', 'math' or 'block_sparse', got {backend!r}")
    if return_weights and backend in ("sdpa", "flex", "block_sparse"):
        raise UnsupportedError(
            f"softmax_attention: backend {backend!r} cannot return weights; use backend='math' or 'auto'"
        )
    route = dispatch.softmax_backend(
        backend, return_weights=return_weights, block_mask=am.block is not None, dropout_p=dropout_p
    )
    if route == "math":
        out, w = _math(q, k, v, am.dense(), scale, dropout_p)
        return (out, w) if return_weights else out
    if route == "block_sparse":
        if dropout_p > 0:
            raise UnsupportedError("softmax_attention: the 'block_sparse' backend has no attention dropout")
        return _block_sparse(q, k, v, am, scale)
    if route == "flex":
        if dropout_p > 0:
            raise UnsupportedError("softmax_attention: the 'flex' backend has no attention dropout")
        return _flex(q, k, v, am, scale, compile_flex)
    return _sdpa(q, k, v, am, scale, dropout_p)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Float64 softmax attention, materialised: the oracle for tests.

    Same arguments and masks as :func:`softmax_attention`; inputs are cast to float64 and the
    result (out (B, H, N, Dv), optionally weights (B, H, N, M)) is float64.
    """
    check_qkv(q, k, v, where="reference_attention")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # written out on its own (torch.softmax in float64, no fast-path helpers) so the oracle
    # shares no code with the paths it checks
    qd, kd, vd = q.double(), k.double(), v.double()
    g = qd.shape[1] // kd.shape[1]
    kd, vd = repeat_kv(kd, g), repeat_kv(vd, g)
    scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    allowed = am.dense()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    out = torch.matmul(w, vd)
    return (out, w) if return_weights else out


def softmax_importance(
    q: Tensor,
    k: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = 512,
) -> Tensor:
    """Attention mass each key receives, averaged over queries: (B, H, M).

    ``importance[b, h, j] = mean_i softmax(q k^T · scale)[b, h, i, j]`` under the masks,
    computed over query chunks so memory is O(chunk_size · M), never N x M.
    q (B, H, N, D), k (B, H_kv, M, D).
    """
    check_qkv(q, k, k, where="softmax_importance")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, h, n, _ = q.shape
    kk = repeat_kv(k, h // k.shape[1])
    acc = torch.zeros(b, h, k.shape[2], dtype=acc_dtype(q.dtype), device=q.device)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        scores = torch.matmul(q[:, :, s:e], kk.transpose(-1, -2)).to(acc.dtype) * scale
        allowed = am.dense_rows(s, e)
        p = _softmax_rows(scores, allowed)
        acc += p.sum(2)
    return (acc / n).to(q.dtype)


def softmax_query_weights(
    q: Tensor,
    k: Tensor,
    query: int,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The softmax attention weights of ONE query row: (B, H, 1, M).

    ``softmax(q[:, :, query] k^T · scale)`` under the masks (row ``query`` of the full weights;
    an empty row gives zeros), in O(M) work per (batch, head) instead of O(N·M) - e.g. the class
    token's row that EViT-style token pruning ranks by. q (B, H, N, D), k (B, H_kv, M, D);
    ``query`` in [-N, N) (negative counts from the end).
    """
    check_qkv(q, k, k, where="softmax_query_weights")
    row = check_index(query, q.shape[2], what="softmax_query_weights: query")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kk = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q[:, :, row : row + 1], kk.transpose(-1, -2)) * scale
    acc = scores.to(acc_dtype(scores.dtype))
    return _softmax_rows(acc, am.dense_rows(row, row + 1)).to(q.dtype)


def softmax_attention_importance(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    chunk_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention and the importance of each key, from ONE pass over Q K^T.

    Per chunk of ``chunk_size`` queries the weights ``w = softmax(q k^T · scale)`` (under the
    masks) are formed explicitly, ``out = dropout(w) @ v`` and ``importance += w.sum(queries)``,
    so the logits are computed once - unlike :func:`softmax_attention` followed by
    :func:`softmax_importance` (two Q K^T passes). Memory is O(B·H·chunk_size·M), the same as
    :func:`softmax_importance`; never N x M unless N <= chunk_size. The importance is taken
    before dropout and accumulated in >= float32.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv); H a multiple of H_kv.
        mask, causal, scale, dropout_p: as in :func:`softmax_attention`.
        chunk_size: queries per chunk (>= 1).

    Returns:
        ``(out (B, H, N, Dv), importance (B, H, M))`` with ``importance[b, h, j] =
        mean_i w[b, h, i, j]`` (rows with no allowed key contribute zeros), in q's dtype.
    """
    check_qkv(q, k, v, where="softmax_attention_importance")
    positive_int(chunk_size, "chunk_size")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, h, n, _ = q.shape
    g = h // k.shape[1]
    kk, vv = repeat_kv(k, g), repeat_kv(v, g)
    dt = acc_dtype(q.dtype)
    kt = kk.transpose(-1, -2)
    outs: list[Tensor] = []
    imp: Tensor | None = None
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        scores = torch.matmul(q[:, :, s:e], kt) * scale
        acc = scores.to(dt)
        allowed = am.dense_rows(s, e) if am.kinds() else None
        p = _softmax_rows(acc, allowed)
        part = p.sum(2)
        imp = part if imp is None else imp + part
        w = p.to(q.dtype)
        wd = F.dropout(w, p=dropout_p) if dropout_p > 0 else w
        outs.append(torch.matmul(wd, vv))
    if imp is None:  # N == 0
        return q.new_zeros(b, h, 0, v.shape[-1]), q.new_zeros(b, h, k.shape[2])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out, (imp / n).to(q.dtype)


def biased_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention with an additive score bias: ``softmax(q k^T · scale + bias) v``, explicit.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        bias: float, broadcastable to (B, H, N, M) - e.g. nn.MultiheadAttention's additive float
            ``attn_mask``; ``-inf`` entries forbid like a False entry of ``mask``.
        mask, causal, scale, dropout_p: as :func:`softmax_attention`.
        return_weights: also return the (B, H, N, M) weights.

    Rows with no allowed key return zeros. The softmax runs in :func:`acc_dtype` (>= fp32).
    """
    check_qkv(q, k, v, where="biased_softmax_attention")
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor broadcastable to (B, H, N, M), got {bias!r:.80}")
    am = as_attention_mask(q, k, mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    g = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc_dtype(q.dtype, bias.dtype)) * scale + bias
    allowed = am.dense()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    w = softmax_or_zero(scores).to(q.dtype)
    wd = F.dropout(w, p=dropout_p) if dropout_p > 0 else w
    out = torch.matmul(wd, v)
    return (out, w) if return_weights else out
