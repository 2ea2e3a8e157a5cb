"""Attention Free Transformer (Zhai et al., "An Attention Free Transformer", 2021, arXiv:2105.14103).

AFT drops the Q·K dot product. Per channel c, with a learned pairwise position bias
``w_{t,t'}`` and ``σ_q = sigmoid``::

    Y_tc = σ_q(Q_tc) · Σ_{t'} exp(K_t'c + w_{t,t'}) V_t'c / Σ_{t'} exp(K_t'c + w_{t,t'})

i.e. implicit attention with one head per channel whose maps are never materialised.

* **AFT-full** (:func:`aft_full`): any ``w`` (T x T'), typically factorised ``w = U V^T``
  (pass the factors; blocks of w are then formed per row chunk). O(T·T'·C) time,
  O(chunk·T' + T·C) memory.
* **AFT-local** (:func:`aft_local`): ``w_{t,t'}`` kept where ``|t - t'| < s`` and set to **0**
  (not -inf) outside, so global connectivity remains: ``num = Σ_{t'} e^{K} V + Band(e^w - 1)(e^K V)``.
  O(T·(s + chunk)·C).
* **AFT-simple** (:func:`aft_simple`): no w: ``Y_t = σ(Q_t) ⊙ Σ_{t'} softmax_{t'}(K) ⊙ V_t'``. O(T·C).
* **AFT-conv** (:func:`aft_conv`): multi-head, w a depthwise (per-head) filter of size s
  shared by the head's channels: ``num = Σ e^K V + conv(e^K V, e^w - 1)``. The paper ties the
  key dimension to the number of heads (k may be (B, H, T, 1), broadcast over the head's channels).

Causal forms restrict the sums to t' <= t (N == M). Stabilisation (exact, every shift
cancels in the ratio): K is shifted per channel by its maximum over the keys in use (causal:
a running maximum per block of rows, with the prefix sums rescaled as it grows), and each
row of w by ``max(0, max w)`` (or its maximum for AFT-full). Causal row blocks are split until
no row's shift exceeds its own running maximum (over t' <= t) by more than half the
exponent range of the dtype (:func:`causal_row_blocks`), so a large later key never flushes
an earlier row's terms to zero: the past does not depend on the future, numerically too.
For AFT-local/conv the keys outside a row's band are summed from prefix and suffix sums,
never as "all keys minus the band" (that subtraction cancels catastrophically in float32 when
band biases are very negative). Computation is in float32 or better. Rows with no (real) key return zeros.
Limitation: K and w are shifted separately (a joint shift would need a (T, T', C) tensor),
so in float32 a term ``e^{K_t' + w_tt'}`` whose two factors are each below ~e^-87 of their
maxima is flushed to zero even when their sum is not small (|K|, |w| in the tens and more).

Tensors: q, k, v are (..., T, C) / (..., T', C) with any leading dims, e.g. (B, T, C) or
(B, H, T, D) (AFT-conv: (B, H, T, D) with w (H, s)). Key padding ``mask`` is (B, T') bool (or a
:class:`attnlib.masks.KeyPadding` of it, as the other families take it) with B
the first dim. ``return_importance=True`` also returns the per-channel attention mass each
key receives averaged over the queries, (..., T', C), in the same time and memory order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import positive_int
from attnlib.errors import UnsupportedError
from attnlib.functional._common import acc_dtype, nonzero, safe_div
from attnlib.functional._scan import prefix_sum
from attnlib.masks.padding import KeyPadding
from attnlib.masks.predicates import MaskMod, and_mod, causal_mod, window_mod

__all__ = [
    "aft_conv",
    "aft_conv_filter",
    "aft_conv_row",
    "aft_factor_row",
    "aft_full",
    "aft_head_key",
    "aft_local",
    "aft_simple",
    "aft_step",
    "causal_row_blocks",
    "conv_offsets",
]

Result = Tensor | tuple[Tensor, Tensor]
PairBias = Tensor | tuple[Tensor, Tensor]
# (s, e, lo, hi) -> (w block (..., e - s, hi - lo), allowed (e - s, hi - lo) or broadcastable)
BlockFn = Callable[[int, int, int, int], tuple[Tensor, Tensor]]
# (position t, cached key positions (L,)) -> pair bias w_{t, positions} (H|1, L)
PairRow = Callable[[int, Tensor], Tensor]


def _check(q: Tensor, k: Tensor, v: Tensor, where: str, *, same_channels: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating tensor (..., T, C), got {t!r:.80}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{where}: k and v must share (..., T'), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != v.shape[:-2] or q.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"{where}: q (..., T, C) and v (..., T', C) must share leading dims and C, got "
            f"{tuple(q.shape)} and {tuple(v.shape)}"
        )
    if same_channels and k.shape[-1] != v.shape[-1]:
        raise ValueError(f"{where}: k must have C={v.shape[-1]} channels, got {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"{where}: empty sequence (T={q.shape[-2]}, T'={k.shape[-2]})")


def _key_valid(mask: Tensor | KeyPadding | None, k: Tensor, where: str) -> Tensor | None:
    """Key padding (B, T') -> float (B, 1.., T', 1) broadcastable to k."""
    if isinstance(mask, KeyPadding):
        mask = mask.valid
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise UnsupportedError(f"{where} supports key padding masks only: a bool (B, T') tensor, got {mask!r:.80}")
    tk = k.shape[-2]
    if mask.dim() != 2 or mask.shape[0] != k.shape[0] or mask.shape[1] != tk:
        raise ValueError(f"{where}: key padding must be (B, T') = ({k.shape[0]}, {tk}), got {tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], *([1] * (k.dim() - 3)), tk, 1)


def _gate(q: Tensor, query_gate: str) -> Tensor:
    if query_gate == "sigmoid":
        return torch.sigmoid(q)
    if query_gate == "none":
        return torch.ones_like(q)
    raise ValueError(f"query_gate must be 'sigmoid' or 'none', got {query_gate!r}")


def _rows(buf: Tensor, first: int, count: int) -> Tensor:
    """``buf[..., first:first + count, :]`` with zero rows where the index is outside [0, T)."""
    t = buf.shape[-2]
    a, b = max(first, 0), min(first + count, t)
    if b <= a:
        return buf.new_zeros(*buf.shape[:-2], count, buf.shape[-1])
    return F.pad(buf[..., a:b, :], (0, 0, a - first, first + count - b))


def _on_rows(mask_mod: MaskMod, s: int, e: int, lo: int, hi: int, device: torch.device) -> Tensor:
    """A predicate on rows s:e and keys lo:hi: bool (e - s, hi - lo)."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    rows = torch.arange(s, e, device=device)[:, None]
    return mask_mod(zero, zero, rows, torch.arange(lo, hi, device=device)[None, :])


def causal_row_blocks(k: Tensor, chunk_size: int, low: float) -> list[tuple[int, int]]:
    """Row blocks [s, e) of the causal AFT scan whose shared key shift is safe for every row.

    A block shifts its keys by their running maximum at its last row, ``m_{e-1}`` (per channel);
    row t's own maximum is ``m_t = max_{t' <= t} K_t'``. A block of ``chunk_size`` rows is halved
    until ``m_{e-1} - m_t <= L`` for all its rows (and every leading index and channel), with
    ``L = -log(tiny) / 2`` of k's dtype (43.7 in float32): then every term of row t keeps full
    relative precision (its largest term is >= e^-L, far above the smallest normal number) and
    the result equals the exact-shift one to rounding, whatever the later keys are.

    Args:
        k: (..., T, C) keys, ``low`` (the dtype's lowest value) at padded keys.
        chunk_size: rows per block before any split.
        low: the value of padded keys (rows that have seen no real key need no shift).

    Returns:
        Consecutive (s, e) covering [0, T).
    """
    t = k.shape[-2]
    c = max(1, min(int(chunk_size), t))
    run = k.detach().cummax(-2).values  # m_t
    first = torch.where(run > low / 2, run, torch.full_like(run, float("inf")))  # rows with a real key
    limit = -math.log(torch.finfo(k.dtype).tiny) / 2
    starts = list(range(0, t, c))
    ends = [min(t, s + c) for s in starts]
    last = run[..., [e - 1 for e in ends], :]  # (..., nb, C)
    pad = len(starts) * c - t
    firstp = F.pad(first, (0, 0, 0, pad), value=float("inf")) if pad else first
    low_row = firstp.reshape(*first.shape[:-2], len(starts), c, first.shape[-1]).amin(-2)
    spans = (last - low_row).clamp_min(0).movedim(-2, 0).flatten(1).amax(1).tolist()  # (nb,)

    def span(s: int, e: int) -> float:
        return float((run[..., e - 1 : e, :] - first[..., s:e, :].amin(-2, keepdim=True)).clamp_min(0).amax())

    def split(s: int, e: int, width: float) -> list[tuple[int, int]]:
        if e - s == 1 or not width > limit:  # NaN spans (NaN keys) are not split
            return [(s, e)]
        mid = (s + e) // 2
        return split(s, mid, span(s, mid)) + split(mid, e, span(mid, e))

    return [blk for s, e, w in zip(starts, ends, spans, strict=True) for blk in split(s, e, w)]


def _aft(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block: BlockFn | None,
    band: tuple[int, int] | None,
    causal: bool,
    valid: Tensor | None,
    chunk_size: int,
    query_gate: str,
    need_importance: bool,
) -> tuple[Tensor, Tensor | None]:
    """Shared AFT evaluation over row chunks.

    Three modes: ``block`` and ``band is None`` - AFT-full (the pair bias on every allowed key);
    ``block`` and ``band = (left, right)`` - AFT-local/conv (bias on keys t' in
    [t - left, t + right], weight e^0 = 1 elsewhere); ``block is None`` - AFT-simple.

    For row t (shifts: K by m per channel, the row's bias by r)::

        num_t = e^{-r_t} · OUT_t + Σ_{t' in band} e^{w_tt' - r_t} e^{K_t' - m} V_t'

    where OUT_t sums ``e^{K_t' - m} V_t'`` over the keys outside the band - read from prefix
    and suffix sums (never as total minus band, which cancels catastrophically when the band
    biases are very negative). Causal: m is a running maximum per row block
    (:func:`causal_row_blocks`); prefix sums of earlier blocks are rescaled to the current
    block's m as they are read.
    """
    t, tk = q.shape[-2], k.shape[-2]
    dt = acc_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    c = max(1, min(int(chunk_size), t))
    low = torch.finfo(dt).min
    kmask = k if valid is None else k.masked_fill(valid == 0, low)
    lead = torch.broadcast_shapes((*k.shape[:-2], 1, k.shape[-1]), (*v.shape[:-2], 1, v.shape[-1]))
    ch = lead[-1]
    simple = block is None
    full = block is not None and band is None
    left, right = band if band is not None else (0, 0)

    def expk(lo: int, hi: int, m: Tensor) -> Tensor:  # padded keys: e^{low - m} = 0, whatever k holds
        return torch.exp(kmask[..., lo:hi, :] - m)

    def finite(m: Tensor) -> Tensor:
        return torch.where(m > low / 2, m, torch.zeros_like(m))

    # ---- key sums outside the pair terms ---------------------------------------------------
    m_glob = None
    if not causal:
        m_glob = finite(kmask.amax(-2, keepdim=True).detach())
        if not full:
            e_all = expk(0, tk, m_glob)
            ev_all = e_all * v
            if simple:
                tot_num, tot_den = ev_all.sum(-2, keepdim=True), e_all.sum(-2, keepdim=True)
            else:
                pre_num, suf_num = prefix_sum(ev_all), prefix_sum(ev_all, reverse=True)
                del ev_all
                pre_den, suf_den = prefix_sum(e_all), prefix_sum(e_all, reverse=True)
                del e_all
    else:
        shape_tc = (*lead[:-2], t, ch)
        pre_num_c = torch.zeros(shape_tc, dtype=dt, device=q.device) if not full else None
        pre_den_c = torch.zeros(shape_tc, dtype=dt, device=q.device) if not full else None
        m_pos = torch.zeros(shape_tc, dtype=dt, device=q.device)  # the chunk shift of every position
        m_run = torch.full(lead, low, dtype=dt, device=q.device)
        carry_num = torch.zeros(lead, dtype=dt, device=q.device)
        carry_den = torch.zeros(lead, dtype=dt, device=q.device)

    # causal and band rules of the pair terms; positions are absolute (t, t'): predicates with T' = T
    rules = ([causal_mod(t)] if causal else []) + ([] if full else [window_mod(left, right, t)])
    pair_rule = and_mod(*rules) if rules else None
    outs: list[Tensor] = []
    ekv_full: Tensor | None = None
    mass = torch.zeros(*lead[:-2], tk, ch, dtype=dt, device=q.device) if need_importance else None
    u_rows: list[Tensor] = []  # importance: e^{-r_t} / den_t of every row (out-of-band weight)
    blocks = causal_row_blocks(kmask, c, low) if causal else [(s, min(t, s + c)) for s in range(0, t, c)]
    for s, e in blocks:
        if causal:
            m_new = torch.maximum(m_run, kmask[..., s:e, :].amax(-2, keepdim=True).detach())
            m_c = finite(m_new)
            m_prev = torch.where(m_run > low / 2, m_run, m_c)
            m_run = m_new
            m_pos[..., s:e, :] = m_c
            if not full:
                scale = torch.exp(m_prev - m_c)
                ek_c = expk(s, e, m_c)
                p_num = (ek_c * v[..., s:e, :]).cumsum(-2) + carry_num * scale
                p_den = ek_c.cumsum(-2) + carry_den * scale
                pre_num_c[..., s:e, :] = p_num
                pre_den_c[..., s:e, :] = p_den
                carry_num, carry_den = p_num[..., -1:, :], p_den[..., -1:, :]
        else:
            assert m_glob is not None
            m_c = m_glob
        # out-of-band sums for the chunk's rows
        out_num = out_den = None
        if simple:
            if causal:
                out_num, out_den = pre_num_c[..., s:e, :], pre_den_c[..., s:e, :]
            else:
                out_num, out_den = tot_num, tot_den
        elif not full:
            if causal:
                j0 = s - left - 1  # keys <= t - left - 1, stored relative to their own chunk's shift
                seen = (torch.arange(j0, j0 + e - s, device=q.device) >= 0)[:, None]  # the shifts are detached
                resc = torch.where(seen, torch.exp(_rows(m_pos, j0, e - s) - m_c), torch.zeros((), dtype=dt))
                out_num = _rows(pre_num_c, j0, e - s) * resc
                out_den = _rows(pre_den_c, j0, e - s) * resc
            else:
                out_num = _rows(pre_num, s - left - 1, e - s) + _rows(suf_num, s + right + 1, e - s)
                out_den = _rows(pre_den, s - left - 1, e - s) + _rows(suf_den, s + right + 1, e - s)
        # pair terms
        pair = None
        g_scale: Tensor | float = 1.0
        num: Tensor | None = None
        den: Tensor | None = None
        if block is not None:
            lo, hi = (0, e if causal else tk) if full else (max(0, s - left), min(tk, e + right))
            if causal:
                hi = min(hi, e)
            wb, allowed = block(s, e, lo, hi)
            wb = wb.to(dt)
            if pair_rule is not None:
                allowed = allowed & _on_rows(pair_rule, s, e, lo, hi, q.device)
            every = allowed.numel() == 1 and bool(allowed.all())  # no pair masked: skip the selects
            wmax = (wb if every else wb.masked_fill(~allowed, low)).amax(-1, keepdim=True).detach()
            r = finite(wmax) if full else wmax.clamp_min(0.0)
            pair = (wb - r).exp_() if every else torch.where(allowed, (wb - r).exp_(), torch.zeros_like(wb))
            if ekv_full is not None:  # non-causal AFT-full: every block reads the same keys and shift
                ekv = ekv_full
            else:
                ek = expk(lo, hi, m_c)
                ekv = _stack_channels(ek * v[..., lo:hi, :], ek)
                if pair.dim() == 2:  # one bias for every batch and head: fold them into the columns
                    ekv = ekv.movedim(-2, 0).contiguous()
                if full and not causal:
                    ekv_full = ekv
            # numerator and denominator in one product
            if pair.dim() == 2:
                nd = torch.matmul(pair, ekv.view(ekv.shape[0], -1)).view(pair.shape[0], *ekv.shape[1:]).movedim(0, -2)
            else:
                nd = _bmm(pair, ekv)
            num, den = nd[..., :ch], nd[..., ch:]
            if not full:
                g_scale = torch.exp(-r)
        if out_num is not None and out_den is not None:
            num = g_scale * out_num if num is None else num + g_scale * out_num
            den = g_scale * out_den if den is None else den + g_scale * out_den
        assert num is not None and den is not None
        num, den = num.expand(*lead[:-2], e - s, ch), den.expand(*lead[:-2], e - s, ch)  # simple: one row
        outs.append(_gate(q[..., s:e, :], query_gate) * safe_div(num, den))
        if need_importance:
            assert mass is not None
            p = safe_div(torch.ones_like(den), den)  # (..., Cq, C)
            if pair is not None:
                mass[..., lo:hi, :] += _bmm(pair.transpose(-1, -2), p) * expk(lo, hi, m_c)
            if not full:
                u_rows.append((p * g_scale).expand_as(p))
    out = torch.cat(outs, -2)
    if not need_importance:
        return out, None
    assert mass is not None
    if not full:
        u = torch.cat(u_rows, -2)  # (..., T, C)
        if not causal:
            e_all = expk(0, tk, m_glob)
            if simple:
                mass += e_all * u.sum(-2, keepdim=True)
            else:  # rows t >= t' + left + 1 and rows t <= t' - right - 1 see key t' outside their band
                suf_u = prefix_sum(u, reverse=True)
                pre_u = prefix_sum(u)
                mass += e_all * (_rows(suf_u, left + 1, tk) + _rows(pre_u, -right - 1, tk))
        else:  # Σ_{t >= t' + gap} u_t e^{K_t' - m_c(t)}, by a reverse scan over chunks
            gap = 0 if simple else left + 1
            suf_u = torch.zeros_like(u)
            tail = torch.zeros(lead, dtype=dt, device=q.device)
            m_next = None
            for s, e in reversed(blocks):
                m_c = m_pos[..., s : s + 1, :]
                if m_next is not None:
                    tail = tail * torch.exp(m_c - m_next)
                intra = u[..., s:e, :].flip(-2).cumsum(-2).flip(-2) + tail
                suf_u[..., s:e, :] = intra
                tail = intra[..., :1, :]
                m_next = m_c
            e_own = torch.exp(kmask - m_pos)
            seen = (torch.arange(tk, device=q.device) + gap < t)[:, None]  # some row reads key t' outside its band
            resc = torch.where(seen, torch.exp(m_pos - _rows(m_pos, gap, tk)), torch.zeros((), dtype=dt))
            mass += e_own * _rows(suf_u, gap, tk) * resc
    return out, mass / t


def _stack_channels(a: Tensor, b: Tensor) -> Tensor:
    """a (..., L, C) and b (broadcastable to a) side by side: (..., L, 2C), one matmul operand."""
    return torch.cat([a, b.expand_as(a)], -1)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """a (..., R, L) @ b (..., L, C) with broadcasting of leading dims."""
    return torch.matmul(a, b)


def _pair_source(w: PairBias, t: int, tk: int, where: str) -> Callable[[int, int, int, int], Tensor]:
    """w (T, T') or factors (U (T, r), V (T', r)) -> block(s, e, lo, hi) = w[s:e, lo:hi]."""
    if isinstance(w, tuple):
        if len(w) != 2:
            raise ValueError(f"{where}: factorised w must be a pair (U (T, r), V (T', r)), got {len(w)} tensors")
        u, vv = w
        if u.dim() != 2 or vv.dim() != 2 or u.shape[1] != vv.shape[1] or u.shape[0] < t or vv.shape[0] < tk:
            raise ValueError(
                f"{where}: factors must be U (>= T={t}, r) and V (>= T'={tk}, r), got "
                f"{tuple(u.shape)} and {tuple(vv.shape)}"
            )
        return lambda s, e, lo, hi: u[s:e] @ vv[lo:hi].T
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] < t or w.shape[1] < tk:
        raise ValueError(
            f"{where}: w must be a (T, T') = ({t}, {tk}) tensor (or larger) or a factor pair, got {w!r:.80}"
        )
    return lambda s, e, lo, hi: w[s:e, lo:hi]


def _check_causal(causal: bool, t: int, tk: int, where: str) -> None:
    if causal and t != tk:
        raise UnsupportedError(f"{where} supports causal=True only with T == T', got T={t}, T'={tk}")


def aft_full(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: PairBias,
    *,
    causal: bool = False,
    mask: Tensor | KeyPadding | None = None,
    query_gate: Literal["sigmoid", "none"] = "sigmoid",
    chunk_size: int = 128,
    return_importance: bool = False,
) -> Result:
    """AFT-full: ``Y_t = σ(Q_t) ⊙ Σ_{t'} exp(K_t' + w_{t,t'}) V_t' / Σ_{t'} exp(K_t' + w_{t,t'})``.

    Args:
        q: (..., T, C); k, v: (..., T', C).
        w: pairwise position bias (T, T') (larger is sliced), or factors ``(U (T, r), V (T', r))``
            with ``w = U V^T`` (the paper's parameterisation).
        causal: sums over t' <= t (T == T').
        mask: key padding (B, T'), True = real key, or a :class:`~attnlib.masks.KeyPadding` of it.
        query_gate: "sigmoid" (paper) or "none" (σ_q ≡ 1).
        chunk_size: query rows per block (memory O(chunk · T')).
        return_importance: also return the per-channel key mass (..., T', C).

    Returns:
        (..., T, C), or (out, importance).
    """
    _check(q, k, v, "aft_full")
    t, tk = q.shape[-2], k.shape[-2]
    _check_causal(causal, t, tk, "aft_full")
    src = _pair_source(w, t, tk, "aft_full")
    ones = torch.ones(1, 1, dtype=torch.bool, device=q.device)

    def block(s: int, e: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return src(s, e, lo, hi), ones

    out, imp = _aft(
        q,
        k,
        v,
        block=block,
        band=None,
        causal=causal,
        valid=_key_valid(mask, k, "aft_full"),
        chunk_size=chunk_size,
        query_gate=query_gate,
        need_importance=return_importance,
    )
    return _result(out, imp, q.dtype, return_importance)


def _result(out: Tensor, imp: Tensor | None, dtype: torch.dtype, return_importance: bool) -> Result:
    out = out.to(dtype)
    if return_importance:
        assert imp is not None
        return out, imp.to(dtype)
    return out


def aft_local(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: PairBias,
    window: int,
    *,
    causal: bool = False,
    mask: Tensor | KeyPadding | None = None,
    query_gate: Literal["sigmoid", "none"] = "sigmoid",
    chunk_size: int = 128,
    return_importance: bool = False,
) -> Result:
    """AFT-local: AFT-full with ``w_{t,t'}`` replaced by 0 where ``|t - t'| >= window``.

    Outside the window the bias is 0, not -inf (keys there still count with weight e^K):
    ``num_t = Σ_{t'} e^{K_t'} V_t' + Σ_{|t-t'|<s} (e^{w_{t,t'}} - 1) e^{K_t'} V_t'`` (same for den).

    Args:
        q: (..., T, C); k, v: (..., T', C); w: (T, T') or factors, as in :func:`aft_full`.
        window: s >= 1 (s = 1 keeps only the diagonal of w).
        causal, mask, query_gate, chunk_size, return_importance: as in :func:`aft_full`.
    """
    _check(q, k, v, "aft_local")
    t, tk = q.shape[-2], k.shape[-2]
    _check_causal(causal, t, tk, "aft_local")
    s_w = positive_int(window, "aft_local: window s", hint=" (|t - t'| < s)")
    src = _pair_source(w, t, tk, "aft_local")

    band = window_mod(s_w - 1, s_w - 1, t)  # |t - t'| < s, in absolute positions

    def block(s: int, e: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return src(s, e, lo, hi), _on_rows(band, s, e, lo, hi, q.device)

    out, imp = _aft(
        q,
        k,
        v,
        block=block,
        band=(s_w - 1, s_w - 1),
        causal=causal,
        valid=_key_valid(mask, k, "aft_local"),
        chunk_size=chunk_size,
        query_gate=query_gate,
        need_importance=return_importance,
    )
    return _result(out, imp, q.dtype, return_importance)


def aft_simple(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | KeyPadding | None = None,
    query_gate: Literal["sigmoid", "none"] = "sigmoid",
    chunk_size: int = 256,
    return_importance: bool = False,
) -> Result:
    """AFT-simple: ``Y_t = σ(Q_t) ⊙ Σ_{t'} softmax_{t'}(K)_{t'} ⊙ V_t'`` (softmax over time, per channel).

    Causal: ``Y_t = σ(Q_t) ⊙ Σ_{t'<=t} e^{K_t'} V_t' / Σ_{t'<=t} e^{K_t'}`` by stabilised prefix
    sums. O(T·C) time and memory.

    Args: as in :func:`aft_full` without w.
    """
    _check(q, k, v, "aft_simple")
    t, tk = q.shape[-2], k.shape[-2]
    _check_causal(causal, t, tk, "aft_simple")
    if not causal and not return_importance:  # one pooled vector per channel, broadcast over t
        dt = acc_dtype(q.dtype)
        valid = _key_valid(mask, k, "aft_simple")
        kk = k.to(dt)
        if valid is not None:
            kk = kk.masked_fill(~valid, float("-inf"))
        m = kk.amax(-2, keepdim=True).detach()
        e = torch.exp(kk - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        pooled = safe_div((e * v.to(dt)).sum(-2, keepdim=True), e.sum(-2, keepdim=True))
        return (_gate(q.to(dt), query_gate) * pooled).to(q.dtype)
    out, imp = _aft(
        q,
        k,
        v,
        block=None,
        band=None,
        causal=causal,
        valid=_key_valid(mask, k, "aft_simple"),
        chunk_size=chunk_size,
        query_gate=query_gate,
        need_importance=return_importance,
    )
    return _result(out, imp, q.dtype, return_importance)


def conv_offsets(size: int, causal: bool) -> Tensor:
    """Key offsets t' - t covered by a filter of ``size`` taps: causal 0, -1, ..., -(s-1);
    otherwise centred ``j - (s-1)//2`` for j = 0..s-1 (tap j multiplies key t + offset_j)."""
    j = torch.arange(size)
    return -j if causal else j - (size - 1) // 2


def aft_conv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | KeyPadding | None = None,
    query_gate: Literal["sigmoid", "none"] = "sigmoid",
    chunk_size: int = 128,
    return_importance: bool = False,
) -> Result:
    """AFT-conv (1-D): per-head depthwise filter w shared by the head's channels.

    For head i: ``Y^i_t = σ(Q^i_t) ⊙ [conv(e^{K^i} ⊙ V^i, e^{w^i} - 1) + Σ_{t'} e^{K^i_t'} V^i_t']
    / [conv(e^{K^i}, e^{w^i} - 1) + Σ_{t'} e^{K^i_t'}]``: AFT-local with the translation-invariant
    band ``w_{t,t'} = w^i[j]`` for ``t' - t = offset_j`` (see :func:`conv_offsets`), so it
    generalises across lengths.

    Args:
        q: (B, H, T, D); k: (B, H, T, D) or (B, H, T, 1) (key dim tied to the heads, as in the
            paper; broadcast over the head's channels); v: (B, H, T, D).
        w: (H, s) filter taps (after any reparameterisation).
        causal: one-sided filter over past keys, prefix sums (causal conv).
        mask, query_gate, chunk_size, return_importance: as in :func:`aft_full`.
    """
    _check(q, k, v, "aft_conv", same_channels=False)
    if k.shape[-1] not in (1, v.shape[-1]):
        raise ValueError(f"aft_conv: k must have 1 or C={v.shape[-1]} channels, got {tuple(k.shape)}")
    if q.dim() != 4:
        raise ValueError(f"aft_conv: q, k, v must be (B, H, T, D), got q {tuple(q.shape)}")
    h = q.shape[1]
    if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != h:
        raise ValueError(f"aft_conv: w must be an (H={h}, s) filter, got {w!r:.80}")
    t, tk = q.shape[-2], k.shape[-2]
    if t != tk:
        raise UnsupportedError(f"aft_conv is self-attention only (a convolution over one sequence), got T={t}, T'={tk}")
    size = w.shape[1]
    offs = conv_offsets(size, causal).to(q.device)
    left, right = int(-offs.min()), int(offs.max())

    def block(s: int, e: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        rows = torch.arange(s, e, device=q.device)[:, None]
        cols = torch.arange(lo, hi, device=q.device)[None, :]
        d = cols - rows  # (Cq, L) offsets
        tap = (d[None] == offs[:, None, None]).to(w.dtype)  # (s, Cq, L): which tap hits (t, t')
        return torch.einsum("hs,sql->hql", w, tap), tap.sum(0) > 0  # (H, Cq, L), (Cq, L)

    out, imp = _aft(
        q,
        k.expand_as(v) if k.shape[-1] == 1 else k,
        v,
        block=lambda s, e, lo, hi: _expand_heads(block(s, e, lo, hi)),
        band=(left, right),
        causal=causal,
        valid=_key_valid(mask, k, "aft_conv"),
        chunk_size=chunk_size,
        query_gate=query_gate,
        need_importance=return_importance,
    )
    return _result(out, imp, q.dtype, return_importance)


def aft_head_key(k: Tensor) -> Tensor:
    """AFT-conv's key tied to the heads: the mean of each head's channels, (B, H, T, D) -> (B, H, T, 1)."""
    return k.mean(-1, keepdim=True)


def aft_conv_filter(w_raw: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """AFT-conv's reparameterised filter ``w = γ (w_raw - mean) / std + β``: w_raw (H, s), γ, β (H,) -> (H, s).

    A one-tap filter has no spread: its normalised part is 0 (w = β).
    """
    w = w_raw
    if w.shape[-1] > 1:
        w = (w - w.mean(-1, keepdim=True)) / (w.std(-1, unbiased=False, keepdim=True) + 1e-5)
    else:
        w = torch.zeros_like(w)
    return gamma[:, None] * w + beta[:, None]


def aft_factor_row(u: Tensor, v: Tensor, pos: int, positions: Tensor) -> Tensor:
    """Row ``pos`` of the factorised bias ``w = U V^T`` at key ``positions`` (L,): (1, L)."""
    return (u[pos] @ v[positions].T)[None]


def aft_conv_row(w: Tensor, pos: int, positions: Tensor) -> Tensor:
    """Row ``pos`` of the causal AFT-conv bias at key ``positions`` (L,): (H, L); w (H, s) the filter."""
    offs = conv_offsets(w.shape[-1], True).to(positions.device)  # 0, -1, ...
    d = positions - pos  # (L,)
    tap = (d[None, :] == offs[:, None]).to(w.dtype)  # (s, L)
    return w @ tap


def aft_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: dict[str, Tensor],
    *,
    keep: int | None,
    global_sums: bool,
    pair_row: PairRow | None = None,
    tied_key: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One causal decoding step of the AFT family: q, k, v (B, H, 1, D) -> out (B, H, 1, D).

    Feeding a sequence token by token equals the causal parallel form token by token.

    Args:
        state: accumulation-dtype tensors over the past tokens: ``max`` (B, H, 1, D) running key
            maximum (the dtype's lowest value before the first token), ``num``, ``den``
            (B, H, 1, D) running sums of ``e^{K - max} V`` and ``e^{K - max}``, ``keys``,
            ``values`` (B, H, L, D) the cached last keys / values, ``pos`` (0-d long) the
            position of this token.
        keep: cached keys: None = all (AFT-full), 0 = none (AFT-simple), s = the last s.
        global_sums: the running sums enter the output with weight e^0 = 1 outside the pair
            terms (AFT-local / conv / simple); False: only the cached keys count (AFT-full).
        pair_row: the pair bias of this position against the cached positions
            (:func:`aft_factor_row`, :func:`aft_conv_row`); not called when ``keep == 0``.
        tied_key: reduce k to one channel per head (:func:`aft_head_key`) after the cast.

    Returns:
        (out in q's dtype, new state).
    """
    dt = acc_dtype(q.dtype)
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    kd = (aft_head_key(kd) if tied_key else kd).expand_as(vd)
    pos = int(state["pos"])
    low = torch.finfo(state["max"].dtype).min
    m_new = torch.maximum(state["max"], kd)
    m_old = torch.where(state["max"] > low / 2, state["max"], m_new)
    rescale = torch.exp(m_old - m_new)
    ek = torch.exp(kd - m_new)
    gnum = state["num"] * rescale + ek * vd
    gden = state["den"] * rescale + ek
    keys = torch.cat([state["keys"], kd], 2)
    values = torch.cat([state["values"], vd], 2)
    if keep is not None:
        first = keys.shape[2] - min(keys.shape[2], keep)
        keys, values = keys[:, :, first:], values[:, :, first:]
    num, den = (gnum, gden) if global_sums else (torch.zeros_like(gnum), torch.zeros_like(gden))
    if keys.shape[2] and (not global_sums or keep):
        assert pair_row is not None
        positions = torch.arange(pos - keys.shape[2] + 1, pos + 1, device=q.device)
        w = pair_row(pos, positions).to(gnum.dtype)[None, :, :, None]  # (1, H|1, L, 1)
        wmax = w.amax(-2, keepdim=True)
        e_all = torch.exp(keys - m_new)
        if global_sums:
            r = wmax.clamp_min(0.0)
            pair = torch.exp(w - r) - torch.exp(-r)
            scale = torch.exp(-r)[:, :, 0]  # (1, H|1, 1)
            num = scale[..., None] * gnum + (pair * e_all * values).sum(2, keepdim=True)
            den = scale[..., None] * gden + (pair * e_all).sum(2, keepdim=True)
        else:
            pair = torch.exp(w - wmax)
            num = (pair * e_all * values).sum(2, keepdim=True)
            den = (pair * e_all).sum(2, keepdim=True)
    out = torch.sigmoid(qd) * num / nonzero(den)
    cached = keep is None or keep
    new = {
        "max": m_new,
        "num": gnum,
        "den": gden,
        "keys": keys if cached else state["keys"],
        "values": values if cached else state["values"],
        "pos": state["pos"] + 1,
    }
    return out.to(q.dtype), new


def _expand_heads(res: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(H, Cq, L) head blocks -> (1, H, Cq, L), broadcasting over batch (dims (B, H, T, D))."""
    wb, allowed = res
    return wb[None], allowed
