"""Triton block-sparse FlashAttention-2 kernels (forward, dK/dV, dQ) over a BlockMask layout.

Layout (see :class:`attnlib.masks.BlockMask`): per (b', h', query block I) the key blocks to
visit, split into *partial* blocks (``kv_num_blocks`` / ``kv_indices``, element mask in
``partial_tiles[b', h', I, t]``) and *full* blocks (``full_kv_*``, no element mask). The
dK/dV kernel walks the transposed lists (``q_num_blocks`` / ``q_indices`` / ``q_tile_slots``
and ``full_q_*``). B' and H' may be 1 (layout shared): their strides are then 0. The lists
are ascending, which the causal trimming below relies on.

* forward: a 1-D grid of B · H · (query tiles) programs (query tiles fastest, so neighbouring
  programs share K/V in L2; no grid axis is capped at 65535); online softmax in the exp2
  domain; rows with no allowed key give O = 0 and LSE = -inf.
* backward: Δ = rowsum(dO ⊙ O) in PyTorch; dK/dV kernel over B · H_kv · (key tiles) programs,
  looping over the G query heads of its KV head (deterministic, no atomics); dQ kernel like
  the forward.

Kernel tiles (BLOCK_M x BLOCK_N) are decoupled from the mask block (BQ x BK): a tile is the
mask block or a power-of-two fraction of it (>= 16), walked by one dynamic, software-
pipelined loop over (visited block, sub-tile) pairs. The partial-block mask tile is loaded
before the QK^T dot (prefetched). All offsets that scale with B, H, N or M are 64-bit.

Flags (constexpr): ``CAUSAL`` (bottom-right aligned, key j <= query i + M - N, applied
element-wise in the kernel; the host trims the block lists on the device, no sync) and
``HAS_KVLEN`` (per-batch-row key lengths: keys >= kv_len[b] are masked).

Tile / warp / stage configurations come from :mod:`attnlib.kernels._triton_configs`: pruned
by shared memory (against the device's limit) and registers, and by the precision class.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter
with one fixed configuration (``INTERPRET_TILE``; tests may change it).

Imported lazily by :mod:`attnlib.kernels.block_sparse`; importing it requires ``triton``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlib.kernels import _triton_configs as cfgs

__all__ = ["NoKernelConfigError", "backward", "forward", "precision_for"]

_LOG2E = 1.4426950408889634  # host-side constant
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # kernel-side constants must be constexpr
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N) under the interpreter; None = the mask block. Tests set smaller tiles to
# exercise the sub-tile loops.
INTERPRET_TILE: tuple[int, int] | None = None


class NoKernelConfigError(RuntimeError):
    """No tile configuration fits this device (shared memory / registers): use the PyTorch path."""


def _fwd(
    Q, K, V, O, LSE,
    KVN, KVI, FKVN, FKVI, TILES, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    snb, snh, sfb, sfh, sib, sih, siq, stb, sth, stq, stp,
    H, G, N, M, NQ, qk_scale, N_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    SPLIT_M: tl.constexpr = BQ // BLOCK_M
    SPLIT_N: tl.constexpr = BK // BLOCK_N
    pid = tl.program_id(0)
    nqt = NQ * SPLIT_M
    bh = pid // nqt
    qt = pid % nqt
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    qb = qt // SPLIT_M
    rm = (qt % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the mask block
    offs_m = qb * BQ + rm
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :],
        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    klen = M
    if HAS_KVLEN:
        klen = tl.load(KVLEN + b)
    til = b * stb + h * sth + qb.to(tl.int64) * stq
    lst = b * sib + h * sih + qb * siq
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    rn0 = tl.arange(0, BLOCK_N)
    for phase in tl.static_range(2):
        if phase == 0:
            cnt = tl.load(KVN + b * snb + h * snh + qb)
        else:
            cnt = tl.load(FKVN + b * sfb + h * sfh + qb)
        for it in range(0, cnt * SPLIT_N):
            t = it // SPLIT_N
            rn = (it % SPLIT_N) * BLOCK_N + rn0  # key columns inside the mask block
            if phase == 0:
                j = tl.load(KVI + lst + t)
                # the element mask of this partial block, issued before the dot (prefetch)
                tile = tl.load(TILES + til + t * stp + rm[:, None] * BK + rn[None, :])
            else:
                j = tl.load(FKVI + lst + t)
            offs_n = j * BK + rn
            kin = offs_n < klen
            kblk = (j * BK).to(tl.int64)  # 64-bit block start, 32-bit offsets inside the block
            kptr = kbase + kblk * skn + rn[:, None] * skn
            vptr = vbase + kblk * svn + rn[:, None] * svn
            if EVEN_N and BLOCK_D == D:
                k = tl.load(kptr + offs_d[None, :])
            else:
                k = tl.load(kptr + offs_d[None, :], mask=kin[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
            if phase == 0:
                s = tl.where(tile != 0, s, float("-inf"))
            if not EVEN_N:
                s = tl.where(kin[None, :], s, float("-inf"))
            if CAUSAL:
                s = tl.where(offs_n[None, :] <= offs_m[:, None] + (M - N), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if EVEN_N and BLOCK_DV == DV:
                vv = tl.load(vptr + offs_dv[None, :])
            else:
                vv = tl.load(vptr + offs_dv[None, :], mask=kin[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC, out_dtype=ACC)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(
        O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * son + offs_dv[None, :],
        o.to(O.dtype.element_ty),
        mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV),
    )
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=offs_m < N)


def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    QN, QI, QS, QST, FQN, FQI, FQST, TILES, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    snb, snh, sib, sih, sik, stb, sth, stq, stp,
    HKV, G, N, M, NK, sm_scale, qk_scale, N_BUCKET,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    SPLIT_M: tl.constexpr = BQ // BLOCK_M
    SPLIT_N: tl.constexpr = BK // BLOCK_N
    pid = tl.program_id(0)
    nkt = NK * SPLIT_N
    bh = pid // nkt
    kt = pid % nkt
    b = (bh // HKV).to(tl.int64)
    hk = (bh % HKV).to(tl.int64)
    kb = kt // SPLIT_N
    rn = (kt % SPLIT_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = kb * BK + rn
    klen = M
    if HAS_KVLEN:
        klen = tl.load(KVLEN + b)
    kin = offs_n < klen
    koff = offs_n.to(tl.int64)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + b * skb + hk * skh + koff * skn + offs_d[None, :],
        mask=kin[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    vv = tl.load(
        V + b * svb + hk * svh + koff * svn + offs_dv[None, :],
        mask=kin[:, None] & (offs_dv[None, :] < DV_),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    rm0 = tl.arange(0, BLOCK_M)
    live = kb * BK < klen  # key blocks past this row's key length: nothing to do
    for g in range(0, G):
        h = hk * G + g
        lay = b * snb + h * snh + kb
        lst = b * sib + h * sih + kb * sik
        qbase = Q + b * sqb + h * sqh
        dobase = DO + b * sdob + h * sdoh
        lbase = b * slb + h * slh
        for phase in tl.static_range(2):
            start = 0
            if phase == 0:
                cnt = tl.load(QN + lay)
                if CAUSAL:
                    start = tl.load(QST + lay)
            else:
                cnt = tl.load(FQN + lay)
                if CAUSAL:
                    start = tl.load(FQST + lay)
            cnt = tl.where(live, cnt, 0)
            for it in range(start * SPLIT_M, cnt * SPLIT_M):
                t = it // SPLIT_M
                rm = (it % SPLIT_M) * BLOCK_M + rm0
                if phase == 0:
                    qb = tl.load(QI + lst + t)
                    slot = tl.load(QS + lst + t)
                    tileT = tl.load(
                        TILES + b * stb + h * sth + qb.to(tl.int64) * stq + slot * stp + rm[None, :] * BK + rn[:, None]
                    )
                else:
                    qb = tl.load(FQI + lst + t)
                # computed transposed (key rows x query columns, as in Triton's FlashAttention
                # tutorial): k, v and the probabilities are the A operands, no transposes of P / dS
                offs_m = qb * BQ + rm
                qin = offs_m < N
                qblk = (qb * BQ).to(tl.int64)  # 64-bit block start, 32-bit offsets inside the block
                qT = tl.load(
                    qbase + qblk * sqn + rm[None, :] * sqn + offs_d[:, None],
                    mask=qin[None, :] & (offs_d[:, None] < D),
                    other=0.0,
                )
                do = tl.load(
                    dobase + qblk * sdon + rm[:, None] * sdon + offs_dv[None, :],
                    mask=qin[:, None] & (offs_dv[None, :] < DV_),
                    other=0.0,
                )
                lse = tl.load(LSE + lbase + offs_m, mask=qin, other=float("inf"))
                delta = tl.load(DELTA + lbase + offs_m, mask=qin, other=0.0)
                sT = tl.dot(k, qT, input_precision=PREC, out_dtype=ACC) * qk_scale
                pT = tl.math.exp2(sT - lse[None, :] * LOG2E)
                if phase == 0:
                    pT = tl.where(tileT != 0, pT, 0.0)
                if not EVEN_N:
                    pT = tl.where(kin[:, None], pT, 0.0)
                if CAUSAL:
                    pT = tl.where(offs_n[:, None] <= offs_m[None, :] + (M - N), pT, 0.0)
                dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
                dpT = tl.dot(vv, tl.trans(do), input_precision=PREC, out_dtype=ACC)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC, out_dtype=ACC)
    dk = dk * sm_scale
    nin = offs_n < M
    tl.store(
        DK + b * sdkb + hk * sdkh + koff * sdkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=nin[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + koff * sdvn + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=nin[:, None] & (offs_dv[None, :] < DV_),
    )


def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    KVN, KVI, FKVN, FKVI, TILES, KVLEN,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh, sdqb, sdqh, sdqn,
    snb, snh, sfb, sfh, sib, sih, siq, stb, sth, stq, stp,
    H, G, N, M, NQ, sm_scale, qk_scale, N_BUCKET,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    SPLIT_M: tl.constexpr = BQ // BLOCK_M
    SPLIT_N: tl.constexpr = BK // BLOCK_N
    pid = tl.program_id(0)
    nqt = NQ * SPLIT_M
    bh = pid // nqt
    qt = pid % nqt
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    qb = qt // SPLIT_M
    rm = (qt % SPLIT_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = qb * BQ + rm
    qin = offs_m < N
    qoff = offs_m.to(tl.int64)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + qoff * sqn + offs_d[None, :], mask=qin[:, None] & (offs_d[None, :] < D), other=0.0
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + qoff * sdon + offs_dv[None, :],
        mask=qin[:, None] & (offs_dv[None, :] < DV_),
        other=0.0,
    )
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=qin, other=float("inf"))
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=qin, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    klen = M
    if HAS_KVLEN:
        klen = tl.load(KVLEN + b)
    til = b * stb + h * sth + qb.to(tl.int64) * stq
    lst = b * sib + h * sih + qb * siq
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    rn0 = tl.arange(0, BLOCK_N)
    for phase in tl.static_range(2):
        if phase == 0:
            cnt = tl.load(KVN + b * snb + h * snh + qb)
        else:
            cnt = tl.load(FKVN + b * sfb + h * sfh + qb)
        for it in range(0, cnt * SPLIT_N):
            t = it // SPLIT_N
            rn = (it % SPLIT_N) * BLOCK_N + rn0
            if phase == 0:
                j = tl.load(KVI + lst + t)
                tile = tl.load(TILES + til + t * stp + rm[:, None] * BK + rn[None, :])
            else:
                j = tl.load(FKVI + lst + t)
            offs_n = j * BK + rn
            kin = offs_n < klen
            kblk = (j * BK).to(tl.int64)  # 64-bit block start, 32-bit offsets inside the block
            kptr = kbase + kblk * skn + rn[:, None] * skn
            vptr = vbase + kblk * svn + rn[:, None] * svn
            if EVEN_N and BLOCK_D == D and BLOCK_DV == DV_:
                k = tl.load(kptr + offs_d[None, :])
                vv = tl.load(vptr + offs_dv[None, :])
            else:
                k = tl.load(kptr + offs_d[None, :], mask=kin[:, None] & (offs_d[None, :] < D), other=0.0)
                vv = tl.load(vptr + offs_dv[None, :], mask=kin[:, None] & (offs_dv[None, :] < DV_), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
            p = tl.math.exp2(s - lse[:, None] * LOG2E)
            if phase == 0:
                p = tl.where(tile != 0, p, 0.0)
            if not EVEN_N:
                p = tl.where(kin[None, :], p, 0.0)
            if CAUSAL:
                p = tl.where(offs_n[None, :] <= offs_m[:, None] + (M - N), p, 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision=PREC, out_dtype=ACC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + qoff * sdqn + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qin[:, None] & (offs_d[None, :] < D),
    )


KERNELS = {"fwd": _fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq}

# ------------------------------------------------------------------------------------------
# compilation: JIT + autotune on CUDA, the interpreter on CPU tensors
# ------------------------------------------------------------------------------------------

_KEY = ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "BQ", "BK", "PREC", "CAUSAL", "HAS_KVLEN", "EVEN_N"]


def _prune_for(kernel: str) -> Any:
    def prune(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        args = {**named_args, **kwargs}  # the constexprs arrive as keyword arguments
        dtype = args["Q"].dtype if hasattr(args.get("Q"), "dtype") else torch.bfloat16
        keep = cfgs.prune(
            kernel,
            [cfgs.TileConfig.from_triton(c) for c in configs],
            dtype=dtype,
            block_d=args["BLOCK_D"],
            block_dv=args["BLOCK_DV"],
            bq=args["BQ"],
            bk=args["BK"],
            prec=args["PREC"],
            smem_limit=cfgs.device_smem_limit(),
            arch=cfgs.device_arch(),
        )
        if not keep:
            raise NoKernelConfigError(
                f"no {kernel} tile fits {cfgs.device_smem_limit() // 1024} KB of shared memory "
                f"(head dim {args['BLOCK_D']}, {dtype}, mask block {args['BQ']}x{args['BK']})"
            )
        wanted = {c.key() for c in keep}
        return [c for c in configs if cfgs.TileConfig.from_triton(c).key() in wanted]

    return prune


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> dict[str, Any]:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        if isinstance(tl.standard.zeros, JITFunction):  # decorated before TRITON_INTERPRET=1 was seen
            raise RuntimeError(
                "Triton's interpreter needs TRITON_INTERPRET=1 in the environment before `triton` is first "
                "imported (its standard library is compiled for the GPU otherwise)"
            )
        return {name: InterpretedFunction(fn) for name, fn in KERNELS.items()}
    from triton.runtime.jit import JITFunction

    out = {}
    for name, fn in KERNELS.items():
        configs = [c.to_triton() for c in cfgs.all_candidates(name)]
        out[name] = triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune_for(name)})(
            JITFunction(fn)
        )
    return out


def _interpreting(q: Tensor) -> bool:
    return not q.is_cuda or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _launch(name: str, n_blocks: int, n_bh: int, q: Tensor, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch kernel ``name`` over n_bh · n_blocks · (mask block / tile) programs (1-D grid)."""
    interpret = _interpreting(q)
    kern = _kernels(interpret)[name]
    split = ("BK", "BLOCK_N") if name == "dkdv" else ("BQ", "BLOCK_M")
    if interpret:
        bm_, bn_ = INTERPRET_TILE or (meta["BQ"], meta["BK"])
        tile = {"BLOCK_M": min(bm_, meta["BQ"]), "BLOCK_N": min(bn_, meta["BK"])}
        kern[(n_bh * n_blocks * (meta[split[0]] // tile[split[1]]),)](*args, **meta, **tile)
        return
    from triton.runtime.errors import OutOfResources

    try:
        with torch.cuda.device(q.device):  # launch on the tensors' device, not the current one
            kern[lambda m: (n_bh * n_blocks * (m[split[0]] // m[split[1]]),)](*args, **meta)
    except OutOfResources as e:  # a config passed the estimate but not the compiler: never crash the caller
        raise NoKernelConfigError(f"{name}: {e}") from e


# ------------------------------------------------------------------------------------------
# host side: layouts (cached on the BlockMask), trimmed counts, launches
# ------------------------------------------------------------------------------------------


def _bstride(t: Tensor, dim: int) -> int:
    return t.stride(dim) if t.shape[dim] > 1 else 0


def _cached(bm: Any, key: str, make: Any) -> Any:
    cache = getattr(bm, "_cache", None)
    if cache is not None and key in cache:
        return cache[key]
    val = make()
    if cache is not None:
        cache[key] = val
    return val


def _layout(bm: Any, transposed: bool) -> tuple[Tensor, ...]:
    def make() -> tuple[Tensor, ...]:
        if transposed:
            t = (bm.q_num_blocks, bm.q_indices, bm.q_tile_slots, bm.full_q_num_blocks, bm.full_q_indices)
        else:
            t = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
        return tuple(x.to(torch.int32).contiguous() for x in t)

    return _cached(bm, "triton_layout_T" if transposed else "triton_layout", make)


def _tiles(bm: Any) -> Tensor:
    def make() -> Tensor:
        tiles = bm.partial_tiles
        if tiles.shape[3] == 0:  # keep a valid pointer even without partial blocks
            tiles = torch.zeros(*tiles.shape[:3], 1, *tiles.shape[4:], dtype=torch.bool, device=tiles.device)
        return tiles.contiguous().view(torch.uint8)

    return _cached(bm, "triton_tiles", make)


def _count_below(num: Tensor, idx: Tensor, limit: Tensor) -> Tensor:
    """Entries of ascending lists (num (…,), idx (…, L)) that are <= limit (…,) (device ops, no sync)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    return (valid & (idx <= limit[..., None])).sum(-1, dtype=torch.int32)


def _fwd_counts(bm: Any, causal: bool, kv_len: Tensor | None) -> tuple[Tensor, Tensor]:
    """Partial / full key-block counts per (b, h, query block) after dropping the blocks that the
    causal rule or the key lengths mask entirely (lists are ascending: the kept ones are a prefix)."""
    kvn, kvi, fkvn, fkvi = _layout(bm, False)
    if not causal and kv_len is None:
        return kvn, fkvn
    bq, bk = bm.block_size
    n, m = bm.seq_lengths
    nq = kvn.shape[-1]

    def causal_limit() -> Tensor:
        last_row = (torch.arange(nq, device=kvn.device) * bq + bq - 1).clamp(max=n - 1)
        return torch.div(last_row + (m - n), bk, rounding_mode="floor")  # last key block a row may see

    if kv_len is None:
        return _cached(
            bm,
            "triton_causal_counts",
            lambda: (_count_below(kvn, kvi, causal_limit()), _count_below(fkvn, fkvi, causal_limit())),
        )
    lim = (torch.div(kv_len.long() + bk - 1, bk, rounding_mode="floor") - 1)[:, None, None]  # (B, 1, 1)
    if causal:
        lim = torch.minimum(lim, causal_limit())
    lim = lim.expand(kv_len.shape[0], kvn.shape[1], nq)
    return _count_below(kvn, kvi, lim), _count_below(fkvn, fkvi, lim)


def _bwd_starts(bm: Any) -> tuple[Tensor, Tensor]:
    """Causal dK/dV: per (b, h, key block) the number of leading query blocks (ascending lists)
    that lie entirely before the key block's first visible row."""
    qn, qi, _, fqn, fqi = _layout(bm, True)
    bq, bk = bm.block_size
    n, m = bm.seq_lengths

    def make() -> tuple[Tensor, Tensor]:
        nk = qn.shape[-1]
        first_row = torch.arange(nk, device=qn.device) * bk - (m - n)  # first query row that sees key block J
        qmin = torch.div(first_row, bq, rounding_mode="floor")  # query blocks below it see nothing
        return _count_below(qn, qi, qmin - 1), _count_below(fqn, fqi, qmin - 1)

    return _cached(bm, "triton_causal_starts", make)


def precision_for(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernel's dots (the fp32 policy, see the module docstring of
    :mod:`attnlib.kernels._triton_configs`)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16 / bf16 operands
    return cfgs.fp32_precision()


def _common(q: Tensor, v: Tensor, bm: Any, causal: bool, has_kvlen: bool) -> dict[str, Any]:
    d, dv = q.shape[-1], v.shape[-1]
    bq, bk = bm.block_size
    return {
        "D": d,
        "BLOCK_D": cfgs.block_d(d),
        "BLOCK_DV": cfgs.block_d(dv),
        "BQ": bq,
        "BK": bk,
        "EVEN_N": bm.seq_lengths[1] % bk == 0 and not has_kvlen,
        "CAUSAL": bool(causal),
        "HAS_KVLEN": bool(has_kvlen),
        "PREC": precision_for(q.dtype),
        "ACC": tl.float64 if q.dtype == torch.float64 else tl.float32,
    }


def _strided(t: Tensor) -> Tensor:
    """The kernels take B / H / N strides; only the last dimension must be dense."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _n_bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # autotune key: a new tuning per power of two of N


def _kv_len(kv_len: Tensor | None, q: Tensor, m: int) -> Tensor:
    if kv_len is None:
        return torch.zeros(1, dtype=torch.int32, device=q.device)  # a valid, unused pointer
    return kv_len.to(device=q.device, dtype=torch.int32).clamp(0, m).contiguous()


def forward(
    q: Tensor, k: Tensor, v: Tensor, bm: Any, scale: float, causal: bool = False, kv_len: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Triton forward: q (B, H, N, D), k/v (B, H_kv, M, ·) -> out (B, H, N, Dv), lse (B, H, N) fp32."""
    q, k, v = _strided(q), _strided(k), _strided(v)
    b, h, n, _ = q.shape
    hk, m = k.shape[1], k.shape[2]
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    _, kvi, _, fkvi = _layout(bm, False)
    kvn, fkvn = _fwd_counts(bm, causal, kv_len)
    tiles = _tiles(bm)
    meta = _common(q, v, bm, causal, kv_len is not None)
    meta["DV"] = v.shape[-1]
    nq = kvn.shape[-1]
    args = (
        q, k, v, out, lse, kvn, kvi, fkvn, fkvi, tiles, _kv_len(kv_len, q, m),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        _bstride(kvn, 0), _bstride(kvn, 1), _bstride(fkvn, 0), _bstride(fkvn, 1),
        _bstride(kvi, 0), _bstride(kvi, 1), kvi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        h, h // hk, n, m, nq, scale * _LOG2E, _n_bucket(n),
    )  # fmt: skip
    _launch("fwd", nq, b * h, q, args, meta)
    return out, lse


def backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bm: Any,
    scale: float,
    causal: bool = False,
    kv_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: gradients (dq, dk, dv) of the forward above."""
    q, k, v, do = _strided(q), _strided(k), _strided(v), _strided(do)
    b, h, n, d = q.shape
    hk, m = k.shape[1], k.shape[2]
    g = h // hk
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, hk, m, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, hk, m, v.shape[-1], dtype=v.dtype, device=v.device)
    _, kvi, _, fkvi = _layout(bm, False)
    kvn, fkvn = _fwd_counts(bm, causal, kv_len)
    qn, qi, qs, fqn, fqi = _layout(bm, True)
    qst, fqst = _bwd_starts(bm) if causal else (qn, fqn)  # unused pointers when not causal
    tiles = _tiles(bm)
    klen = _kv_len(kv_len, q, m)
    meta = _common(q, v, bm, causal, kv_len is not None)
    meta["DV_"] = v.shape[-1]
    nq, nk = kvn.shape[-1], qn.shape[-1]
    args_kv = (
        q, k, v, do, lse_b, delta, dk, dv, qn, qi, qs, qst, fqn, fqi, fqst, tiles, klen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_b.stride(0), lse_b.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        _bstride(qn, 0), _bstride(qn, 1), _bstride(qi, 0), _bstride(qi, 1), qi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        hk, g, n, m, nk, scale, scale * _LOG2E, _n_bucket(n),
    )  # fmt: skip
    _launch("dkdv", nk, b * hk, q, args_kv, meta)
    args_q = (
        q, k, v, do, lse_b, delta, dq, kvn, kvi, fkvn, fkvi, tiles, klen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_b.stride(0), lse_b.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
        _bstride(kvn, 0), _bstride(kvn, 1), _bstride(fkvn, 0), _bstride(fkvn, 1),
        _bstride(kvi, 0), _bstride(kvi, 1), kvi.stride(2),
        _bstride(tiles, 0), _bstride(tiles, 1), tiles.stride(2), tiles.stride(3),
        h, g, n, m, nq, scale, scale * _LOG2E, _n_bucket(n),
    )  # fmt: skip
    _launch("dq", nq, b * h, q, args_q, meta)
    return dq, dk, dv


def warn_fallback(reason: str) -> None:
    warnings.warn(
        f"block_sparse_attention: the Triton kernel cannot run this call ({reason}); using the PyTorch path",
        RuntimeWarning,
        stacklevel=4,
    )
