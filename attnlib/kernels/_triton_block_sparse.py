"""Triton block-sparse FlashAttention-2 kernels (forward, dK/dV, dQ) over a BlockMask layout.

Layout (see :class:`attnlib.masks.BlockMask`): per (b', h', query block I) the key blocks to
visit, split into *partial* blocks (``kv_num_blocks`` / ``kv_indices``, element mask in
``partial_tiles[b', h', I, t]``) and *full* blocks (``full_kv_*``, no element mask). The
dK/dV kernel walks the transposed lists (``q_num_blocks`` / ``q_indices`` / ``q_tile_slots``
and ``full_q_*``). B' and H' may be 1 (layout shared): their strides are then 0.

* forward: grid (n_q · SPLIT_M, B · H); online softmax in the exp2 domain; rows with no
  allowed key give O = 0 and LSE = -inf.
* backward: Δ = rowsum(dO ⊙ O) in PyTorch; dK/dV kernel, grid (n_k · SPLIT_N, B · H_kv),
  loops over the G query heads of its KV head (deterministic, no atomics); dQ kernel, grid
  (n_q · SPLIT_M, B · H).

SPLIT_M / SPLIT_N cut a mask block into smaller kernel tiles (autotuned on CUDA together
with num_warps / num_stages). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors through Triton's interpreter with one fixed configuration.

Imported lazily by :mod:`attnlib.kernels.block_sparse`; importing it requires ``triton``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["backward", "forward"]

_LOG2E = 1.4426950408889634  # host-side constant
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # kernel-side constants must be constexpr
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def _fwd(
    Q, K, V, O, LSE,
    KVN, KVI, FKVN, FKVI, TILES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    snb, snh, sib, sih, siq, stb, sth, stq, stp,
    H, G, N, M, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    EVEN_N: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BQ // SPLIT_M
    BLOCK_N: tl.constexpr = BK // SPLIT_N
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    qb = pid // SPLIT_M
    sm = pid % SPLIT_M
    rm = sm * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the mask block
    offs_m = qb * BQ + rm
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    lay = b * snb + h * snh + qb
    lst = b * sib + h * sih + qb * siq
    til = b * stb + h * sth + qb * stq
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    for phase in tl.static_range(2):
        if phase == 0:
            cnt = tl.load(KVN + lay)
        else:
            cnt = tl.load(FKVN + lay)
        for t in range(0, cnt):
            if phase == 0:
                j = tl.load(KVI + lst + t)
            else:
                j = tl.load(FKVI + lst + t)
            for sn in tl.static_range(SPLIT_N):
                rn = sn * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_n = j * BK + rn
                kin = offs_n < M
                k = tl.load(
                    kbase + offs_n[:, None] * skn + offs_d[None, :],
                    mask=kin[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )
                s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
                if phase == 0:
                    tile = tl.load(TILES + til + t * stp + rm[:, None] * BK + rn[None, :])
                    s = tl.where(tile != 0, s, float("-inf"))
                elif not EVEN_N:
                    s = tl.where(kin[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                vv = tl.load(
                    vbase + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=kin[:, None] & (offs_dv[None, :] < DV),
                    other=0.0,
                )
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC, out_dtype=ACC)
                m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :],
        o.to(O.dtype.element_ty),
        mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV),
    )
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < N)


def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    QN, QI, QS, FQN, FQI, TILES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    snb, snh, sib, sih, sik, stb, sth, stq, stp,
    HKV, G, N, M, sm_scale, qk_scale,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    EVEN_N: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BQ // SPLIT_M
    BLOCK_N: tl.constexpr = BK // SPLIT_N
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    kb = pid // SPLIT_N
    sn = pid % SPLIT_N
    rn = sn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BK + rn
    kin = offs_n < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :],
        mask=kin[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    vv = tl.load(
        V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :],
        mask=kin[:, None] & (offs_dv[None, :] < DV_),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    for g in range(0, G):
        h = hk * G + g
        lay = b * snb + h * snh + kb
        lst = b * sib + h * sih + kb * sik
        qbase = Q + b * sqb + h * sqh
        dobase = DO + b * sdob + h * sdoh
        lbase = b * slb + h * slh
        for phase in tl.static_range(2):
            if phase == 0:
                cnt = tl.load(QN + lay)
            else:
                cnt = tl.load(FQN + lay)
            for t in range(0, cnt):
                if phase == 0:
                    qb = tl.load(QI + lst + t)
                    slot = tl.load(QS + lst + t)
                else:
                    qb = tl.load(FQI + lst + t)
                for sm in tl.static_range(SPLIT_M):
                    rm = sm * BLOCK_M + tl.arange(0, BLOCK_M)
                    offs_m = qb * BQ + rm
                    qin = offs_m < N
                    q = tl.load(
                        qbase + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=qin[:, None] & (offs_d[None, :] < D),
                        other=0.0,
                    )
                    do = tl.load(
                        dobase + offs_m[:, None] * sdon + offs_dv[None, :],
                        mask=qin[:, None] & (offs_dv[None, :] < DV_),
                        other=0.0,
                    )
                    lse = tl.load(LSE + lbase + offs_m, mask=qin, other=float("inf"))
                    delta = tl.load(DELTA + lbase + offs_m, mask=qin, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
                    p = tl.math.exp2(s - lse[:, None] * LOG2E)
                    if phase == 0:
                        tile = tl.load(
                            TILES + b * stb + h * sth + qb * stq + slot * stp + rm[:, None] * BK + rn[None, :]
                        )
                        p = tl.where(tile != 0, p, 0.0)
                    elif not EVEN_N:
                        p = tl.where(kin[None, :], p, 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
                    dp = tl.dot(do, tl.trans(vv), input_precision=PREC, out_dtype=ACC)
                    ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kin[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kin[:, None] & (offs_dv[None, :] < DV_),
    )


def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    KVN, KVI, FKVN, FKVI, TILES,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh, sdqb, sdqh, sdqn,
    snb, snh, sib, sih, siq, stb, sth, stq, stp,
    H, G, N, M, sm_scale, qk_scale,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    EVEN_N: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BQ // SPLIT_M
    BLOCK_N: tl.constexpr = BK // SPLIT_N
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    qb = pid // SPLIT_M
    sm = pid % SPLIT_M
    rm = sm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BQ + rm
    qin = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
        mask=qin[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_dv[None, :],
        mask=qin[:, None] & (offs_dv[None, :] < DV_),
        other=0.0,
    )
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=qin, other=float("inf"))
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=qin, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    lay = b * snb + h * snh + qb
    lst = b * sib + h * sih + qb * siq
    til = b * stb + h * sth + qb * stq
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    for phase in tl.static_range(2):
        if phase == 0:
            cnt = tl.load(KVN + lay)
        else:
            cnt = tl.load(FKVN + lay)
        for t in range(0, cnt):
            if phase == 0:
                j = tl.load(KVI + lst + t)
            else:
                j = tl.load(FKVI + lst + t)
            for sn in tl.static_range(SPLIT_N):
                rn = sn * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_n = j * BK + rn
                kin = offs_n < M
                k = tl.load(
                    kbase + offs_n[:, None] * skn + offs_d[None, :],
                    mask=kin[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )
                vv = tl.load(
                    vbase + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=kin[:, None] & (offs_dv[None, :] < DV_),
                    other=0.0,
                )
                s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
                p = tl.math.exp2(s - lse[:, None] * LOG2E)
                if phase == 0:
                    tile = tl.load(TILES + til + t * stp + rm[:, None] * BK + rn[None, :])
                    p = tl.where(tile != 0, p, 0.0)
                elif not EVEN_N:
                    p = tl.where(kin[None, :], p, 0.0)
                dp = tl.dot(do, tl.trans(vv), input_precision=PREC, out_dtype=ACC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qin[:, None] & (offs_d[None, :] < D),
    )


# ------------------------------------------------------------------------------------------
# compilation: JIT + autotune on CUDA, the interpreter on CPU tensors
# ------------------------------------------------------------------------------------------


def _configs() -> list[Any]:
    out = []
    for sm, sn in ((1, 1), (2, 1), (1, 2)):
        for warps, stages in ((4, 2), (8, 2), (4, 3)):
            out.append(triton.Config({"SPLIT_M": sm, "SPLIT_N": sn}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Drop configs whose kernel tiles would be smaller than 16 (tl.dot's minimum)."""
    args = {**named_args, **kwargs}  # BQ / BK are passed as keyword arguments
    bq, bk = args["BQ"], args["BK"]
    keep = [c for c in configs if bq // c.kwargs["SPLIT_M"] >= 16 and bk // c.kwargs["SPLIT_N"] >= 16]
    return keep or configs[:1]


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> dict[str, Any]:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return {name: InterpretedFunction(fn) for name, fn in (("fwd", _fwd), ("dkdv", _bwd_dkdv), ("dq", _bwd_dq))}
    from triton.runtime.jit import JITFunction

    key = ["BLOCK_D", "BLOCK_DV", "BQ", "BK", "PREC"]
    prune = {"early_config_prune": _prune}
    return {
        "fwd": triton.autotune(_configs(), key=key, prune_configs_by=prune)(JITFunction(_fwd)),
        "dkdv": triton.autotune(_configs(), key=key, prune_configs_by=prune)(JITFunction(_bwd_dkdv)),
        "dq": triton.autotune(_configs(), key=key, prune_configs_by=prune)(JITFunction(_bwd_dq)),
    }


def _interpreting(q: Tensor) -> bool:
    return not q.is_cuda or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _launch(name: str, grid_rows: int, grid_bh: int, q: Tensor, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    interpret = _interpreting(q)
    kern = _kernels(interpret)[name]
    split = "SPLIT_N" if name == "dkdv" else "SPLIT_M"
    if interpret:
        kern[(grid_rows, grid_bh)](*args, **meta, SPLIT_M=1, SPLIT_N=1)
    else:
        kern[lambda m: (grid_rows * m[split], grid_bh)](*args, **meta)


def _bstride(t: Tensor, dim: int) -> int:
    return t.stride(dim) if t.shape[dim] > 1 else 0


def _layout(bm: Any, transposed: bool) -> tuple[Tensor, ...]:
    key = "triton_layout_T" if transposed else "triton_layout"
    cache = getattr(bm, "_cache", None)
    if cache is not None and key in cache:
        return cache[key]
    if transposed:
        t = (bm.q_num_blocks, bm.q_indices, bm.q_tile_slots, bm.full_q_num_blocks, bm.full_q_indices)
    else:
        t = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    t = tuple(x.to(torch.int32).contiguous() for x in t)
    if cache is not None:
        cache[key] = t
    return t


def _tiles(bm: Any) -> Tensor:
    cache = getattr(bm, "_cache", None)
    if cache is not None and "triton_tiles" in cache:
        return cache["triton_tiles"]
    tiles = bm.partial_tiles
    if tiles.shape[3] == 0:  # keep a valid pointer even without partial blocks
        tiles = torch.zeros(*tiles.shape[:3], 1, *tiles.shape[4:], dtype=torch.bool, device=tiles.device)
    tiles = tiles.contiguous().view(torch.uint8)
    if cache is not None:
        cache["triton_tiles"] = tiles
    return tiles


def _common(q: Tensor, v: Tensor, bm: Any) -> dict[str, Any]:
    d, dv = q.shape[-1], v.shape[-1]
    bq, bk = bm.block_size
    exact = q.dtype == torch.float64 or (q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    prec = "ieee" if exact else "tf32"
    return {
        "D": d,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "BQ": bq,
        "BK": bk,
        "EVEN_N": bm.seq_lengths[1] % bk == 0,
        "PREC": prec,
        "ACC": tl.float64 if q.dtype == torch.float64 else tl.float32,
        "_dv": dv,
        "BLOCK_DV": max(16, triton.next_power_of_2(dv)),
    }


def forward(q: Tensor, k: Tensor, v: Tensor, bm: Any, scale: float) -> tuple[Tensor, Tensor]:
    """Triton forward: q (B, H, N, D), k/v (B, H_kv, M, ·) -> out (B, H, N, Dv), lse (B, H, N) fp32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, n, _ = q.shape
    hk, m = k.shape[1], k.shape[2]
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    kvn, kvi, fkvn, fkvi = _layout(bm, False)
    tiles = _tiles(bm)
    meta = _common(q, v, bm)
    dv = meta.pop("_dv")
    nq = kvn.shape[-1]
    args = (
        q, k, v, out, lse, kvn, kvi, fkvn, fkvi, tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        _bstride(kvn, 0), _bstride(kvn, 1), _bstride(kvi, 0), _bstride(kvi, 1), kvi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        h, h // hk, n, m, scale * _LOG2E,
    )  # fmt: skip
    _launch("fwd", nq, b * h, q, args, {**meta, "DV": dv})
    return out, lse


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bm: Any, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: gradients (dq, dk, dv) of the forward above."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    b, h, n, _ = q.shape
    hk, m = k.shape[1], k.shape[2]
    g = h // hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kvn, kvi, fkvn, fkvi = _layout(bm, False)
    qn, qi, qs, fqn, fqi = _layout(bm, True)
    tiles = _tiles(bm)
    meta = _common(q, v, bm)
    dvd = meta.pop("_dv")
    meta["DV_"] = dvd
    nq, nk = kvn.shape[-1], qn.shape[-1]
    args_kv = (
        q, k, v, do, lse_b, delta, dk, dv, qn, qi, qs, fqn, fqi, tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_b.stride(0), lse_b.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        _bstride(qn, 0), _bstride(qn, 1), _bstride(qi, 0), _bstride(qi, 1), qi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        hk, g, n, m, scale, scale * _LOG2E,
    )  # fmt: skip
    _launch("dkdv", nk, b * hk, q, args_kv, meta)
    args_q = (
        q, k, v, do, lse_b, delta, dq, kvn, kvi, fkvn, fkvi, tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_b.stride(0), lse_b.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
        _bstride(kvn, 0), _bstride(kvn, 1), _bstride(kvi, 0), _bstride(kvi, 1), kvi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        h, g, n, m, scale, scale * _LOG2E,
    )  # fmt: skip
    _launch("dq", nq, b * h, q, args_q, meta)
    return dq, dk, dv
