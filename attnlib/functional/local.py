"""Exact sliding-window (local) attention in O(N·w) time and memory.

Query i attends key j iff |i - j| <= w (and j <= i when causal): 2w + 1 keys, the
Longformer convention (w + 1 keys when causal, including i itself). The sequence is cut into
query chunks of c tokens; chunk t attends the c + 2w keys around it (a strided view of the
padded keys) with a small band mask, several chunks per SDPA call, so no N x N tensor is
ever built and SDPA's fused CPU/GPU kernels do the work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.functional._common import acc_dtype, as_attention_mask, repeat_kv
from attnlib.masks import AttentionMask, MaskLike
from attnlib.masks.predicates import window_mod

__all__ = ["default_chunk_size", "local_attention", "local_importance"]

_GROUP_ELEMS = 1 << 23  # scores per SDPA call (B·H·chunks·c·L), bounds peak memory


def default_chunk_size(window: int, causal: bool) -> int:
    """Query chunk length: about the window (so a chunk sees ~3 chunks of keys), in [16, 256]."""
    span = window if causal else 2 * window
    return int(min(256, max(16, 2 ** math.ceil(math.log2(max(span, 1))))))


def _windows(x: Tensor, g0: int, g1: int, c: int, seg: int) -> Tensor:
    """Key windows of chunks g0..g1-1: padded x (B, H, M', D) -> (B·G, H, L, D)."""
    span = seg - c
    w = x[:, :, g0 * c : g1 * c + span].unfold(2, seg, c)  # (B, H, G, D, L)
    b, h, g = w.shape[:3]
    return w.permute(0, 2, 1, 4, 3).reshape(b * g, h, seg, x.shape[-1])


def _chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    am: AttentionMask,
    window: int,
    chunk_size: int | None,
) -> tuple[int, int, int, int, list[tuple[int, int, Tensor, Tensor, Tensor | None, Tensor]]]:
    """Cut the call into groups of query chunks.

    Returns (c, left, right, L, groups) with each group
    (g0, g1, q_g (B·G, H, c, D), k_g (B·G, H, L, D), v_g or None, allowed (B·G|G, 1|H, c, L)).
    """
    b, h, n, d = q.shape
    causal = am.causal
    window = min(window, max(n - 1, 1))  # no key is farther than n - 1: same band, less padding
    left, right = window, (0 if causal else window)
    c = min(chunk_size or default_chunk_size(window, causal), n)  # short sequences: one chunk of n
    nch = math.ceil(n / c)
    span = left + right
    seg = c + span  # L: keys visible to one chunk
    qp = F.pad(q, (0, 0, 0, nch * c - n))
    kp = F.pad(k, (0, 0, left, nch * c - n + right))
    vp = F.pad(v, (0, 0, left, nch * c - n + right)) if v is not None else None
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(seg, device=q.device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    band = window_mod(left, right, c)(zero, zero, r, t - left)  # (c, L): query r, key t - left of the chunk
    kpad = None
    if am.key_padding is not None:
        kpad = F.pad(am.key_padding, (left, nch * c - n + right), value=False)
    per_chunk = b * h * c * seg
    g_size = max(1, _GROUP_ELEMS // per_chunk)
    groups = []
    for g0 in range(0, nch, g_size):
        g1 = min(nch, g0 + g_size)
        gs = g1 - g0
        qg = qp[:, :, g0 * c : g1 * c].reshape(b, h, gs, c, d)
        qg = qg.transpose(1, 2).reshape(b * gs, h, c, d)

        kg = _windows(kp, g0, g1, c, seg)
        vg = _windows(vp, g0, g1, c, seg) if vp is not None else None
        j = torch.arange(g0, g1, device=q.device)[:, None] * c + t - left  # (G, L) key index
        allowed = band[None] & ((j >= 0) & (j < n))[:, None, :]  # (G, c, L)
        allowed = allowed[None, :, None]  # (1, G, 1, c, L)
        if kpad is not None:
            kw = kpad[:, g0 * c : g1 * c + span].unfold(1, seg, c)  # (B, G, L)
            allowed = allowed & kw[:, :, None, None, :]
        if am.full is not None:
            rows = (torch.arange(g0 * c, g1 * c, device=q.device).view(gs, c)).clamp(max=n - 1)
            cols = j.clamp(0, n - 1)
            f = am.full[:, :, rows[:, :, None], cols[:, None, :]]  # (B', H', G, c, L)
            allowed = allowed & f.transpose(1, 2)[:, :, :, :, :]
        bb = allowed.shape[0]
        allowed = allowed.expand(b, gs, *allowed.shape[2:]) if bb != b else allowed
        allowed = allowed.reshape(b * gs, *allowed.shape[2:])
        groups.append((g0, g1, qg, kg, vg, allowed))
    return c, left, right, seg, groups


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, window: int, mask: MaskLike | list[MaskLike], causal: bool
) -> tuple[AttentionMask, Tensor, Tensor]:
    check_qkv(q, k, v, where="local_attention")
    window = positive_int(window, "window", hint=" (keys at distance <= window)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"local_attention is self-attention: N and M must be equal, got N={q.shape[2]}, M={k.shape[2]}"
        )
    am = as_attention_mask(q, k, mask, causal)
    if am.window is not None or am.block is not None:
        from attnlib.errors import UnsupportedError

        raise UnsupportedError(
            "local_attention: its window is the `window` argument; extra SlidingWindow or "
            "BlockMask masks are not supported (use softmax_attention with them instead)"
        )
    g = q.shape[1] // k.shape[1]
    return am, repeat_kv(k, g), repeat_kv(v, g)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact sliding-window softmax attention.

    Args:
        q: (B, H, N, D); k: (B, H_kv, N, D); v: (B, H_kv, N, Dv) (self-attention, N == M).
        window: w >= 1; query i attends keys with |i - j| <= w (j <= i too when causal).
        mask: key padding (B, N) and/or full (B|1, H|1, N, N) masks, ANDed with the band.
        causal: only keys j <= i.
        scale: logit scale, default D**-0.5.
        dropout_p: dropout on attention probabilities.
        chunk_size: query chunk length (default: :func:`default_chunk_size`).

    Returns:
        (B, H, N, Dv). Equals ``softmax_attention`` under the banded mask; rows with no
        allowed key are zeros. Time O(N·w·D), memory O(N·w) (bounded per SDPA call).
    """
    am, k, v = _prepare(q, k, v, window, mask, causal)
    b, h, n, _ = q.shape
    c, _, _, _, groups = _chunks(q, k, v, am, window, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    outs = []
    for g0, g1, qg, kg, vg, allowed in groups:
        assert vg is not None
        empty = ~allowed.any(-1, keepdim=True)
        # under torch.compile always take the (value-identical) masked branch: no data-dependent branch
        has_empty = torch.compiler.is_compiling() or bool(empty.any())
        if has_empty:
            allowed = allowed | empty
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
        if has_empty:
            o = o.masked_fill(empty, 0.0)
        outs.append(o.view(b, g1 - g0, h, c, -1))
    out = torch.cat(outs, 1).transpose(1, 2).reshape(b, h, -1, v.shape[-1])
    return out[:, :, :n]


def local_importance(
    q: Tensor,
    k: Tensor,
    window: int,
    *,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Attention mass each key receives under local attention, averaged over queries: (B, H, N).

    Same arguments as :func:`local_attention` (without v); O(N·w) memory.
    """
    am, k, _ = _prepare(q, k, k, window, mask, causal)
    b, h, n, _ = q.shape
    c, left, _, seg, groups = _chunks(q, k, None, am, window, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = acc_dtype(q.dtype)
    nch = math.ceil(n / c)
    acc = torch.zeros(b, h, nch * c + seg, dtype=dt, device=q.device)
    for g0, g1, qg, kg, _, allowed in groups:
        gs = g1 - g0
        s = torch.matmul(qg, kg.transpose(-1, -2)).to(dt) * scale  # (B·G, H, c, L)
        rows_ok = (torch.arange(g0 * c, g1 * c, device=q.device) < n).view(1, gs, 1, c, 1)
        allowed = allowed.view(-1, gs, *allowed.shape[1:]) & rows_ok
        allowed = allowed.reshape(-1, *allowed.shape[2:])
        empty = ~allowed.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~(allowed | empty), float("-inf")), -1).masked_fill(empty, 0.0)
        col = p.sum(2).view(b, gs, h, seg)  # mass per window position
        idx = (
            torch.arange(g0, g1, device=q.device)[:, None] * c + torch.arange(seg, device=q.device)[None, :]
        ).reshape(-1)  # padded key index
        acc.index_add_(2, idx, col.permute(0, 2, 1, 3).reshape(b, h, -1))
    return (acc[:, :, left : left + n] / n).to(q.dtype)
