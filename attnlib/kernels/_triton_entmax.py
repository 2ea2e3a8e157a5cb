"""Triton alpha-entmax attention kernels: the threshold per query row, the output, and the backward.

For one query row with scores s_j = scale · q · k_j over its allowed keys and z_j = (alpha - 1) s_j,

    p_j = [z_j - tau]_+ ^ (1 / (alpha - 1)),   tau such that f(tau) = sum_j p_j - 1 = 0.

The forward kernel walks the key tiles of one query tile several times, never holding more than
one (BLOCK_M x BLOCK_N) tile of scores (the QK^T tile is recomputed on every pass):

1. the row maximum m of z gives the bracket tau in [m - 1, m - n^(1 - alpha)] (n = the row's
   allowed keys): f(m - 1) >= 0 (the maximum alone contributes 1), f(m - n^(1 - alpha)) <= 0;
2. safeguarded root finding, one pass over the keys per step, the bracket shrinking with the sign
   of f: alpha = 1.5 takes the exact root of the quadratic sum over {z > t} (z - tau)^2 = 1 (exact
   as soon as {z > t} is the final support), alpha = 2 (sparsemax) the exact root of the linear
   sum over {z > t} (z - tau) = 1, any other alpha a Halley step from f, f', f''; a step that leaves
   the bracket is replaced by bisection. Steps stop when every row of the tile moved by less
   than ``tol · (1 + |tau|)`` or after ``n_iter`` steps;
3. a last pass computes p, O = (P V) / sum(p) (renormalised, so rows sum to one even when the
   threshold is not exact) and, when gradients are needed, A = (U V) / sum(U) with
   U = [z - tau]_+ ^ ((2 - alpha) / (alpha - 1)) = p^(2 - alpha).

Backward (the entmax Jacobian): with g = p^(2 - alpha) (p renormalised), dP = dO V^T,
dS = g ⊙ (dP - delta), delta_i = <g_i, dP_i> / sum(g_i) = dO_i · A_i; dQ = scale · dS K,
dK = scale · dS^T Q, dV = P^T dO. One kernel per query tile for dQ, one per key tile for dK / dV
(looping over the query heads that share the key/value head: deterministic, no atomics).

Masks: ``CAUSAL`` (bottom-right aligned, key j <= query i + M - N) and ``HAS_KVLEN`` (keys
>= kv_len[b] are masked), both applied element-wise; a causal tile stops at its last allowed
key. A row with no allowed key gives zeros. Grid: one 1-D axis over B · H · tiles (no axis capped
at 65535); offsets that scale with B, H, N or M are 64-bit.

Imported lazily by :mod:`attnlib.kernels.entmax`; importing it requires ``triton``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MODE_BISECT", "MODE_ENTMAX15", "MODE_SPARSEMAX", "backward", "forward", "tiles"]

MODE_BISECT = 0
"""Halley steps with bisection (any alpha)."""
MODE_ENTMAX15 = 1
"""alpha = 1.5: the exact root of the quadratic on the current support."""
MODE_SPARSEMAX = 2
"""alpha = 2: the exact root of the linear equation on the current support."""

INTERPRET_TILES = (16, 16)
"""(BLOCK_M, BLOCK_N) under ``TRITON_INTERPRET=1`` (tests run tiny problems)."""


def tiles(dtype: torch.dtype, d: int, dv: int, interpreted: bool, kernel: str = "fwd") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("fwd", "dq", "dkdv") for a call:
    64 x 64 tiles, 4 warps, 2 stages; 64 x 32 for fp32 with a head dim above 64 (shared memory); 8
    warps for dK/dV with a head dim above 64 (4 spill registers on sm_90). Chosen from an offline
    compile for sm_90 (``benchmarks/results/entmax_compile_sm90.md``); not tuned on a GPU."""
    if interpreted:
        return (*INTERPRET_TILES, 1, 1)
    wide = max(d, dv) > 64
    warps = 8 if kernel == "dkdv" and wide else 4
    if dtype == torch.float32 and wide:
        return 64, 32, warps, 2
    return 64, 64, warps, 2


@triton.jit
def _masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """z = (alpha - 1) · scale · q k^T for a (BLOCK_M, BLOCK_N) tile, -inf where masked."""
    z = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32) * zscale
    ok = offs_n[None, :] < klen
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _weights(y, c0, c1, MODE: tl.constexpr):
    """From y = z - tau: (p, u) = ([y]_+^c0, [y]_+^c1), c0 = 1 / (alpha - 1), c1 = c0 - 1 (unnormalised)."""
    pos = y > 0
    yy = tl.where(pos, y, 0.0)
    if MODE == 1:
        p = yy * yy
        u = yy
    elif MODE == 2:
        p = yy
        u = pos.to(tl.float32)
    else:
        ly = tl.log2(tl.where(pos, y, 1.0))
        p = tl.where(pos, tl.exp2(ly * c0), 0.0)
        u = tl.where(pos, tl.exp2(ly * c1), 0.0)
    return p, u


@triton.jit
def _load_rows(ptr, offs, n, d_offs, D, stride):
    return tl.load(
        ptr + offs.to(tl.int64)[:, None] * stride + d_offs[None, :],
        mask=(offs[:, None] < n) & (d_offs[None, :] < D),
        other=0.0,
    )


@triton.jit
def _query_tile(pid, NQT, H, G, N, M, KVLEN, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """The query tile of program ``pid`` -> (b, h, kv head, flat (b, h) index, rows, key length,
    M - N, end of the keys this tile reads)."""
    bh = pid // NQT
    qt = pid % NQT
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    klen = M
    if HAS_KVLEN:
        klen = tl.minimum(tl.load(KVLEN + b).to(tl.int32), M)
    shift = M - N
    kend = klen
    if CAUSAL:
        kend = tl.maximum(tl.minimum(klen, qt * BLOCK_M + BLOCK_M + shift), 0)
    return b, h, h // G, bh.to(tl.int64), offs_m, klen, shift, kend


def _fwd(
    Q, K, V, O, TAU, SUM, A, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sab, sah, san,
    H, G, N, M, NQT, zscale, alpha, tol, n_iter,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MODE: tl.constexpr, NEED_A: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b, h, hk, bh, offs_m, klen, shift, kend = _query_tile(
        tl.program_id(0), NQT, H, G, N, M, KVLEN, BLOCK_M, CAUSAL, HAS_KVLEN
    )
    rn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, N, offs_d, D, sqn)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    c0 = 1.0 / (alpha - 1.0)
    c1 = c0 - 1.0
    c2 = c0 - 2.0
    # 1. row maxima -> the bracket
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start in range(0, kend, BLOCK_N):
        offs_n = start + rn
        k = _load_rows(kbase, offs_n, klen, offs_d, D, skn)
        mx = tl.maximum(mx, tl.max(_masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL, PREC), 1))
    nvalid = tl.zeros([BLOCK_M], tl.int32) + klen
    if CAUSAL:
        nvalid = tl.minimum(nvalid, offs_m + shift + 1)
    valid = (mx > float("-inf")) & (offs_m < N)
    mx = tl.where(valid, mx, 0.0)
    lo = mx - 1.0
    hi = mx - tl.exp2((1.0 - alpha) * tl.log2(tl.maximum(nvalid, 1).to(tl.float32)))
    if MODE == 0:
        t = 0.5 * (lo + hi)
    else:
        t = lo
    # 2. safeguarded root finding, one pass over the keys per step
    it = 0
    moving = 1
    while (it < n_iter) & (moving > 0):
        s0 = tl.zeros([BLOCK_M], tl.float32)
        s1 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, kend, BLOCK_N):
            offs_n = start + rn
            k = _load_rows(kbase, offs_n, klen, offs_d, D, skn)
            y = _masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL, PREC) - t[:, None]
            pos = y > 0
            yy = tl.where(pos, y, 0.0)
            if MODE == 1:  # s0 = f + 1, s1 = sum y, s2 = support size
                s0 += tl.sum(yy * yy, 1)
                s1 += tl.sum(yy, 1)
                s2 += tl.sum(pos.to(tl.float32), 1)
            elif MODE == 2:
                s0 += tl.sum(yy, 1)
                s2 += tl.sum(pos.to(tl.float32), 1)
            else:  # s0 = f + 1, s1 ~ -f', s2 ~ f''
                ly = tl.log2(tl.where(pos, y, 1.0))
                s0 += tl.sum(tl.where(pos, tl.exp2(ly * c0), 0.0), 1)
                s1 += tl.sum(tl.where(pos, tl.exp2(ly * c1), 0.0), 1)
                s2 += tl.sum(tl.where(pos, tl.exp2(ly * c2), 0.0), 1)
        f = s0 - 1.0
        lo = tl.where(f > 0, t, lo)
        hi = tl.where(f < 0, t, hi)
        if MODE == 1:
            # sum over {z > t} of (z - t - u)^2 = 1: s2 u^2 - 2 s1 u + f = 0, the smaller root
            num = f
            den = s1 + tl.sqrt(tl.maximum(s1 * s1 - s2 * f, 0.0))
        elif MODE == 2:
            num = f
            den = s2
        else:  # Halley: t - 2 f f' / (2 f'^2 - f f'')
            df = -c0 * s1
            num = -2.0 * f * df
            den = 2.0 * df * df - f * (c0 * c1 * s2)
        ok = den != 0
        new = t + num / tl.where(ok, den, 1.0)
        inside = ok & (new >= lo) & (new <= hi)  # False for NaN
        new = tl.where(inside, new, 0.5 * (lo + hi))
        new = tl.where((f == 0) | ~valid, t, new)
        step = tl.where(valid, tl.abs(new - t) - tol * (1.0 + tl.abs(new)), -1.0)
        moving = (tl.max(step, 0) > 0).to(tl.int32)
        t = new
        it += 1
    # 3. the output (and A = U V / sum U for the backward)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    psum = tl.zeros([BLOCK_M], tl.float32)
    ga = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    gsum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, kend, BLOCK_N):
        offs_n = start + rn
        k = _load_rows(kbase, offs_n, klen, offs_d, D, skn)
        v = _load_rows(vbase, offs_n, klen, offs_dv, DV, svn)
        y = _masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL, PREC) - t[:, None]
        p, u = _weights(y, c0, c1, MODE)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=tl.float32)
        psum += tl.sum(p, 1)
        if NEED_A:
            ga += tl.dot(u.to(v.dtype), v, input_precision=PREC, out_dtype=tl.float32)
            gsum += tl.sum(u, 1)
    has = psum > 0
    out = acc / tl.where(has, psum, 1.0)[:, None]
    rows = offs_m < N
    o_ptr = O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * son + offs_dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=rows[:, None] & (offs_dv[None, :] < DV))
    row_off = bh * N + offs_m
    tl.store(TAU + row_off, tl.where(valid, t, float("inf")), mask=rows)
    tl.store(SUM + row_off, psum, mask=rows)
    if NEED_A:
        a = ga / tl.where(gsum > 0, gsum, 1.0)[:, None]
        a_ptr = A + b * sab + h * sah + offs_m.to(tl.int64)[:, None] * san + offs_dv[None, :]
        tl.store(a_ptr, a, mask=rows[:, None] & (offs_dv[None, :] < DV))


def _bwd_dq(
    Q, K, V, DO, DQ, TAU, INV, CG, DELTA, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, G, N, M, NQT, zscale, qk_scale, alpha,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MODE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b, h, hk, bh, offs_m, klen, shift, kend = _query_tile(
        tl.program_id(0), NQT, H, G, N, M, KVLEN, BLOCK_M, CAUSAL, HAS_KVLEN
    )
    rn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, N, offs_d, D, sqn)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, N, offs_dv, DV, sdn)
    rows = offs_m < N
    row_off = bh * N + offs_m
    t = tl.load(TAU + row_off, mask=rows, other=float("inf"))
    cg = tl.load(CG + row_off, mask=rows, other=0.0)
    delta = tl.load(DELTA + row_off, mask=rows, other=0.0)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    c0 = 1.0 / (alpha - 1.0)
    c1 = c0 - 1.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kend, BLOCK_N):
        offs_n = start + rn
        k = _load_rows(kbase, offs_n, klen, offs_d, D, skn)
        v = _load_rows(vbase, offs_n, klen, offs_dv, DV, svn)
        y = _masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL, PREC) - t[:, None]
        _, u = _weights(y, c0, c1, MODE)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=tl.float32)
        ds = u * cg[:, None] * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=tl.float32)
    dq_ptr = DQ + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :]
    tl.store(dq_ptr, (dq * qk_scale).to(DQ.dtype.element_ty), mask=rows[:, None] & (offs_d[None, :] < D))


def _bwd_dkdv(
    Q, K, V, DO, DK, DV_, TAU, INV, CG, DELTA, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, HK, G, N, M, NKT, zscale, qk_scale, alpha,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    MODE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bhk = pid // NKT
    kt = pid % NKT
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    klen = M
    if HAS_KVLEN:
        klen = tl.minimum(tl.load(KVLEN + b).to(tl.int32), M)
    k = _load_rows(K + b * skb + hk * skh, offs_n, klen, offs_d, D, skn)
    v = _load_rows(V + b * svb + hk * svh, offs_n, klen, offs_dv, DV, svn)
    shift = M - N
    qstart = 0
    if CAUSAL:  # the first query that may see this key tile: i + M - N >= kt * BLOCK_N
        qstart = (tl.maximum(kt * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
    c0 = 1.0 / (alpha - 1.0)
    c1 = c0 - 1.0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        qbase = Q + b * sqb + h * sqh
        dobase = DO + b * sdb + h * sdh
        for start in range(qstart, N, BLOCK_M):
            offs_m = start + rm
            rows = offs_m < N
            row_off = bh * N + offs_m
            q = _load_rows(qbase, offs_m, N, offs_d, D, sqn)
            do = _load_rows(dobase, offs_m, N, offs_dv, DV, sdn)
            t = tl.load(TAU + row_off, mask=rows, other=float("inf"))
            inv = tl.load(INV + row_off, mask=rows, other=0.0)
            cg = tl.load(CG + row_off, mask=rows, other=0.0)
            delta = tl.load(DELTA + row_off, mask=rows, other=0.0)
            y = _masked_z(q, k, offs_m, offs_n, klen, shift, zscale, CAUSAL, PREC) - t[:, None]
            p, u = _weights(y, c0, c1, MODE)
            p = p * inv[:, None]
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC, out_dtype=tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=tl.float32)
            ds = u * cg[:, None] * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC, out_dtype=tl.float32)
    cols = offs_n < M
    dk_ptr = DK + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * skn + offs_d[None, :]
    tl.store(dk_ptr, (dk * qk_scale).to(DK.dtype.element_ty), mask=cols[:, None] & (offs_d[None, :] < D))
    dv_ptr = DV_ + b * svb + hk * svh + offs_n.to(tl.int64)[:, None] * svn + offs_dv[None, :]
    tl.store(dv_ptr, dv.to(DV_.dtype.element_ty), mask=cols[:, None] & (offs_dv[None, :] < DV))


_fwd_kernel = triton.jit(_fwd)
_bwd_dq_kernel = triton.jit(_bwd_dq)
_bwd_dkdv_kernel = triton.jit(_bwd_dkdv)


def _pow2(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the dots: fp32 inputs take 3xTF32 (about fp32 accuracy; plain TF32's
    10-bit mantissa moves the thresholds, and IEEE fp32 dots spill tens of KB per thread at
    D = 128 on sm_90), or IEEE with ``ATTNLIB_TRITON_FP32=ieee``; ignored for fp16 / bf16 operands."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if os.environ.get("ATTNLIB_TRITON_FP32", "").lower() == "ieee" else "tf32x3"
    return "tf32"


def _mode(alpha: float) -> int:
    if alpha == 1.5:
        return MODE_ENTMAX15
    if alpha == 2.0:
        return MODE_SPARSEMAX
    return MODE_BISECT


def _kvlen(kv_lengths: Tensor | None, q: Tensor) -> Tensor:
    return kv_lengths if kv_lengths is not None else torch.empty(1, dtype=torch.int32, device=q.device)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float,
    scale: float,
    causal: bool,
    kv_lengths: Tensor | None,
    n_iter: int,
    tol: float,
    need_grad: bool,
    interpreted: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Launch the forward kernel. q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv), last dims
    dense; kv_lengths (B,) int32 or None -> (out (B, H, N, Dv), tau (B, H, N) fp32 (+inf for rows
    with no key), sum of p (B, H, N) fp32, A (B, H, N, Dv) fp32 when ``need_grad`` else None)."""
    b, h, n, d = q.shape
    hk, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    bm, bn, warps, stages = tiles(q.dtype, d, dv, interpreted)
    nqt = triton.cdiv(n, bm)
    out = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    tau = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    psum = torch.empty_like(tau)
    a = torch.empty(b, h, n, dv, dtype=torch.float32, device=q.device) if need_grad else out
    _fwd_kernel[(b * h * nqt,)](
        q, k, v, out, tau, psum, a, _kvlen(kv_lengths, q),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *a.stride()[:3],
        h, h // hk, n, m, nqt, (alpha - 1.0) * scale, float(alpha), float(tol), int(n_iter),
        D=d, DV=dv, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=bool(causal), HAS_KVLEN=kv_lengths is not None, MODE=_mode(alpha), NEED_A=bool(need_grad),
        PREC=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, tau, psum, (a if need_grad else None)


def backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    psum: Tensor,
    a: Tensor,
    *,
    alpha: float,
    scale: float,
    causal: bool,
    kv_lengths: Tensor | None,
    interpreted: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the dQ and dK / dV kernels from the forward's (tau, sum of p, A) -> (dq, dk, dv)."""
    b, h, n, d = q.shape
    hk, m, dv_ = k.shape[1], k.shape[2], v.shape[-1]
    do = do.contiguous()
    has = psum > 0
    safe = torch.where(has, psum, torch.ones_like(psum))
    inv = torch.where(has, 1.0 / safe, torch.zeros_like(psum))
    cg = torch.where(has, safe ** (alpha - 2.0), torch.zeros_like(psum))  # g = p^(2 - alpha) = u · sum^(alpha - 2)
    delta = (do.float() * a).sum(-1)  # <g, dP> / sum(g) = dO · (U V / sum U)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = {
        "D": d,
        "DV": dv_,
        "BLOCK_D": _pow2(d),
        "BLOCK_DV": _pow2(dv_),
        "CAUSAL": bool(causal),
        "HAS_KVLEN": kv_lengths is not None,
        "MODE": _mode(alpha),
        "PREC": _precision(q.dtype),
    }
    kvl = _kvlen(kv_lengths, q)
    bm, bn, warps, stages = tiles(q.dtype, d, dv_, interpreted, "dq")
    nqt = triton.cdiv(n, bm)
    _bwd_dq_kernel[(b * h * nqt,)](
        q, k, v, do, dq, tau, inv, cg, delta, kvl,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        h, h // hk, n, m, nqt, (alpha - 1.0) * scale, scale, float(alpha), **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    bm, bn, warps, stages = tiles(q.dtype, d, dv_, interpreted, "dkdv")
    nkt = triton.cdiv(m, bn)
    _bwd_dkdv_kernel[(b * hk * nkt,)](
        q, k, v, do, dk, dv, tau, inv, cg, delta, kvl,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        h, hk, h // hk, n, m, nkt, (alpha - 1.0) * scale, scale, float(alpha), **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv
