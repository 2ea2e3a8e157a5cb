"""Block-sparse softmax attention: one function, a Triton path (CUDA) and a PyTorch path (anywhere).

``block_sparse_attention(q, k, v, block_mask)`` computes exact softmax attention restricted to
the pairs a :class:`attnlib.masks.BlockMask` allows, visiting only its active blocks:

* **Triton** (CUDA; or CPU tensors through Triton's interpreter with ``TRITON_INTERPRET=1``):
  a FlashAttention-2 style kernel that walks each query block's key-block list (forward and
  dQ) and each key block's query-block list (the transposed layout, dK/dV). Partial blocks are
  masked element-wise from the layout's tiles; full blocks need no mask.
* **PyTorch**: the query blocks are bucketed by how many full (and, separately, partial) key
  blocks they visit; each bucket gathers exactly those key/value blocks and runs one fused
  attention call (on the CPU: PyTorch's flash kernel, which also returns the log-sum-exp),
  the two parts are merged through their log-sum-exps. Time and memory are O(active blocks);
  no N x M score matrix is ever built. The backward pass reuses the fused backward kernel per
  bucket with the *global* output and log-sum-exp, which gives each part's exact share of the
  gradients.

This module sits at the bottom of attnlib's layers: it reads the BlockMask's public tensors
(duck-typed) and imports nothing from attnlib but its error type.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlib.errors import UnsupportedError

if TYPE_CHECKING:  # pragma: no cover
    from attnlib.masks import BlockMask

__all__ = [
    "KernelBackend",
    "block_sparse_attention",
    "triton_available",
    "triton_supports",
]

KernelBackend = Literal["auto", "triton", "torch"]

_GATHER_ELEMS = 1 << 23  # elements of gathered K per fused call (bounds peak memory)
_TRITON_BLOCKS = (16, 32, 64, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_supports(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> str | None:
    """None when the Triton kernel can run this call, else the reason it cannot."""
    if not triton_available():
        return (
            "the `triton` package is not installed (pip install 'attnlib[kernels]' or 'triton>=3.0'); "
            "backend='torch' runs everywhere"
        )
    if not q.is_cuda and not _interpret():
        return (
            f"Triton kernels run on CUDA tensors, got tensors on {q.device}; set TRITON_INTERPRET=1 "
            "to run them on the CPU through Triton's interpreter (slow, for tests), or use backend='torch'"
        )
    if q.dtype not in _TRITON_DTYPES:
        return f"the Triton kernel supports float16, bfloat16 and float32, got {q.dtype}; use backend='torch'"
    bq, bk = block_mask.block_size
    if bq not in _TRITON_BLOCKS or bk not in _TRITON_BLOCKS:
        return f"the Triton kernel needs block sizes in {_TRITON_BLOCKS}, got {(bq, bk)}; use backend='torch'"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return f"the Triton kernel supports head dims up to 256, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


def _check(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"block_sparse_attention: {name} must be a float tensor (B, H, N, D), got {got}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"block_sparse_attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    b, h, n, d = q.shape
    bk_, hk, m, dk = k.shape
    if bk_ != b or v.shape[0] != b or v.shape[1] != hk or v.shape[2] != m or dk != d:
        raise ValueError(
            "block_sparse_attention: expected q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if hk == 0 or h % hk:
        raise ValueError(f"block_sparse_attention: query heads H={h} must be a multiple of key/value heads H_kv={hk}")
    if n == 0 or m == 0 or b == 0:
        raise ValueError(f"block_sparse_attention: empty input (B={b}, N={n}, M={m})")
    needed = ("block_size", "seq_lengths", "kv_num_blocks", "kv_indices", "partial_tiles", "block_states")
    if not all(hasattr(block_mask, a) for a in needed):
        raise ValueError(
            f"block_sparse_attention: block_mask must be an attnlib.masks.BlockMask, got {type(block_mask).__name__}"
        )
    if tuple(block_mask.seq_lengths) != (n, m):
        raise ValueError(
            f"block_sparse_attention: block_mask is for (N, M) = {tuple(block_mask.seq_lengths)}, "
            f"but q has N={n} and k has M={m}"
        )
    bp, hp = block_mask.kv_num_blocks.shape[:2]
    if bp not in (1, b) or hp not in (1, h):
        raise ValueError(
            f"block_sparse_attention: block_mask has (B', H') = {(bp, hp)}; expected B' in (1, {b}) and H' in (1, {h})"
        )
    if block_mask.kv_num_blocks.device != q.device:
        raise ValueError(
            f"block_sparse_attention: block_mask is on {block_mask.kv_num_blocks.device} but q is on {q.device}"
        )


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    backend: KernelBackend = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention over the pairs a BlockMask allows, visiting only active blocks.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv). H a multiple of H_kv
            (grouped-query attention: query head h reads key/value head h // (H / H_kv)).
        block_mask: :class:`attnlib.masks.BlockMask` for (N, M), shared (B'=1, H'=1) or per
            batch / head. Partial blocks are masked element-wise.
        scale: logit scale, default D**-0.5.
        backend: "auto" (Triton on CUDA when it supports the call, else PyTorch), "triton" or
            "torch". With ``TRITON_INTERPRET=1``, "triton" runs CPU tensors through Triton's
            interpreter.
        return_lse: also return the natural-log log-sum-exp (B, H, N), float32 (float64 for
            float64 inputs); -inf on rows with no allowed key.

    Returns:
        out (B, H, N, Dv) (or (out, lse)). Rows with no allowed key are zeros, with zero
        gradients. Differentiable w.r.t. q, k, v.
    """
    _check(q, k, v, block_mask)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"block_sparse_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        why = triton_supports(q, k, v, block_mask)
        if why is not None:
            raise UnsupportedError(f"block_sparse_attention(backend='triton'): {why}")
        impl = "triton"
    elif backend == "auto" and q.is_cuda and triton_supports(q, k, v, block_mask) is None:
        impl = "triton"
    else:
        impl = "torch"
    out, lse = _BlockSparseFn.apply(q, k, v, block_mask, scale, impl)
    return (out, lse) if return_lse else out


class _BlockSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bm: Any, scale: float, impl: str) -> tuple[Tensor, Tensor]:
        if impl == "triton":
            from attnlib.kernels import _triton_block_sparse as tri

            out, lse = tri.forward(q, k, v, bm, scale)
        else:
            out, lse = _torch_forward(q, k, v, bm, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bm, ctx.scale, ctx.impl = bm, scale, impl
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.impl == "triton":
            from attnlib.kernels import _triton_block_sparse as tri

            dq, dk, dv = tri.backward(dout.contiguous(), q, k, v, out, lse, ctx.bm, ctx.scale)
        else:
            dq, dk, dv = _torch_backward(dout, q, k, v, out, lse, ctx.bm, ctx.scale)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------------------
# PyTorch path: plan (cached on the BlockMask), fused per-bucket attention, LSE merge
# ------------------------------------------------------------------------------------------


_BIAS_CACHE_ELEMS = 1 << 22  # cache a bucket's float mask per dtype when at most this many elements


class _Bucket:
    """Query blocks that visit the same number c of key blocks (full and partial together).

    Attributes: qflat (R, X) flat index (b·H + h)·n_q + I of every expanded query block;
    kflat (R, X, c) flat index (b·H_kv + h_kv)·n_k + J of its key blocks (ascending); tiles
    (R, 1, bq, c·bk) bool element mask, or None when every block is full; row_any (R, 1, bq)
    rows with at least one allowed key (None when tiles is None).
    """

    def __init__(self, qflat: Tensor, kflat: Tensor, tiles: Tensor | None) -> None:
        self.qflat, self.kflat, self.tiles = qflat, kflat, tiles
        self.row_any = None if tiles is None else tiles.any(-1)
        self._bias: dict[torch.dtype, Tensor] = {}

    def bias(self, dtype: torch.dtype, sl: slice) -> Tensor | None:
        """Additive mask (R, 1, bq, c·bk) of rows ``sl``: 0 where allowed, -inf elsewhere (None if all full)."""
        if self.tiles is None:
            return None
        if dtype in self._bias:
            return self._bias[dtype][sl]
        t = self.tiles if self.tiles.numel() <= _BIAS_CACHE_ELEMS else self.tiles[sl]
        b = torch.zeros(t.shape, dtype=dtype, device=t.device).masked_fill_(~t, float("-inf"))
        if self.tiles.numel() <= _BIAS_CACHE_ELEMS:
            self._bias[dtype] = b
            return b[sl]
        return b


def _plan(bm: Any, b: int, h: int, hk: int) -> list[_Bucket]:
    """Buckets for the call sizes (B, H, H_kv); cached on the BlockMask (its layout never changes).

    Memory: the element masks of the buckets that hold partial blocks, O(active blocks · bq · bk) bools.
    """
    key = f"torch_plan/{b}/{h}/{hk}"
    cache = getattr(bm, "_cache", None)
    if cache is not None and key in cache:
        return cache[key]
    bq, bk = bm.block_size
    _, m = bm.seq_lengths
    dev = bm.kv_num_blocks.device
    partial, full = bm.block_states()
    slots = bm.tile_slots().clone()
    bp, hp, nq, nk = partial.shape
    slots[full] = -1
    active = partial | full
    tail_tile = None
    if m % bk and bool(full[..., -1].any()):
        # the last key block holds padding columns: its full blocks need a column mask
        slots[..., -1] = torch.where(full[..., -1], -2, slots[..., -1])
        cols = torch.arange(bk, device=dev) < m - (nk - 1) * bk
        tail_tile = cols[None, :].expand(bq, bk)
    # expansion of each layout unit (b', h', I) over the call's batch and heads
    nx_b = b if bp == 1 else 1
    nx_h = h if hp == 1 else 1
    unit_b = torch.arange(bp, device=dev)[:, None, None].expand(bp, hp, nq).reshape(-1)
    unit_h = torch.arange(hp, device=dev)[None, :, None].expand(bp, hp, nq).reshape(-1)
    unit_i = torch.arange(nq, device=dev)[None, None, :].expand(bp, hp, nq).reshape(-1)
    ex_b = torch.arange(b, device=dev).repeat_interleave(nx_h) if bp == 1 else None
    ex_h = torch.arange(h, device=dev).repeat(nx_b) if hp == 1 else None
    flat_tiles = bm.partial_tiles.reshape(bp * hp * nq, -1, bq, bk)
    flat_slots = slots.reshape(-1, nk)
    st = active.reshape(-1, nk)
    counts = st.sum(-1)
    order = torch.argsort(st.to(torch.int8), dim=-1, descending=True, stable=True)
    plan: list[_Bucket] = []
    for c in torch.unique(counts).tolist():
        if c == 0:
            continue
        units = torch.nonzero(counts == c).flatten()
        r = units.numel()
        kblk = order[units, :c]
        bidx = (unit_b[units, None] if ex_b is None else ex_b[None, :]).expand(r, nx_b * nx_h)
        hidx = (unit_h[units, None] if ex_h is None else ex_h[None, :]).expand(r, nx_b * nx_h)
        s = flat_slots[units[:, None], kblk]  # (R, c): >= 0 partial slot, -1 full, -2 full tail block
        tiles = None
        if bool((s != -1).any()):
            t = torch.ones(r, c, bq, bk, dtype=torch.bool, device=dev)
            if flat_tiles.shape[1]:
                sel = s >= 0
                t[sel] = flat_tiles[units[:, None].expand(r, c)[sel], s[sel]]
            if tail_tile is not None:
                t[s == -2] = tail_tile
            tiles = t.permute(0, 2, 1, 3).reshape(r, 1, bq, c * bk).contiguous()
        qflat = (bidx * h + hidx) * nq + unit_i[units][:, None]
        kflat = ((bidx * hk + hidx // (h // hk)) * nk)[:, :, None] + kblk[:, None, :]
        plan.append(_Bucket(qflat.contiguous(), kflat.contiguous(), tiles))
    if cache is not None:
        cache[key] = plan
    return plan


def _chunks(bucket: _Bucket, d: int, bk: int) -> list[slice]:
    r, x = bucket.qflat.shape
    per_row = max(1, x * bucket.kflat.shape[2] * bk * d)
    step = max(1, _GATHER_ELEMS // per_row)
    return [slice(s, s + step) for s in range(0, r, step)]


def _cpu_flash_ok(q: Tensor, v: Tensor) -> bool:
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def _part_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of rows q (R, X, bq, D) over k/v (R, X, L, ·) with additive bias -> (out, lse)."""
    if _cpu_flash_ok(q, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q,
            k,
            v,
            0.0,
            False,
            attn_mask=None if bias is None else bias.expand(*q.shape[:2], *bias.shape[2:]),
            scale=scale,
        )
        return out, lse
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s = s + bias.to(acc)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    out = torch.matmul(p.to(v.dtype), v).to(acc) / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(q.dtype), (mx + torch.log(den)).squeeze(-1)


def _part_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part given the *global* out and lse of its rows (lse = +inf on empty rows)."""
    if _cpu_flash_ok(q, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do,
            q,
            k,
            v,
            out,
            lse,
            0.0,
            False,
            attn_mask=None if bias is None else bias.expand(*q.shape[:2], *bias.shape[2:]),
            scale=scale,
        )
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka, va, doa = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    s = torch.matmul(qa, ka.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    p = torch.exp(s - lse.to(acc)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), doa)
    dp = torch.matmul(doa, va.transpose(-1, -2))
    delta = (doa * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return torch.matmul(ds, ka) * scale, torch.matmul(ds.transpose(-1, -2), qa) * scale, dv


def _blocks(x: Tensor, size: int, n_blocks: int) -> Tensor:
    """(B, H, L, D) -> zero-padded (B, H, n_blocks, size, D)."""
    pad = n_blocks * size - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0], x.shape[1], n_blocks, size, x.shape[3])


def _gather(bucket: _Bucket, sl: slice, qf: Tensor, kf: Tensor, vf: Tensor) -> tuple[Tensor, ...]:
    """Rows of one chunk: q (R, X, bq, D), k (R, X, c·bk, D), v (R, X, c·bk, Dv) (block copies)."""
    qi, ki = bucket.qflat[sl], bucket.kflat[sl]
    r, x = qi.shape
    qq = qf.index_select(0, qi.reshape(-1)).reshape(r, x, -1, qf.shape[-1])
    kk = kf.index_select(0, ki.reshape(-1)).reshape(r, x, -1, kf.shape[-1])
    vv = vf.index_select(0, ki.reshape(-1)).reshape(r, x, -1, vf.shape[-1])
    return qq, kk, vv


def _flat(x: Tensor, size: int, n_blocks: int) -> Tensor:
    """(B, H, L, D) -> zero-padded blocks flattened to (B·H·n_blocks, size, D)."""
    return _blocks(x, size, n_blocks).reshape(-1, size, x.shape[-1])


def _torch_forward(q: Tensor, k: Tensor, v: Tensor, bm: Any, scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, d = q.shape
    hk = k.shape[1]
    dv = v.shape[-1]
    bq, bk = bm.block_size
    nq, nk = math.ceil(n / bq), math.ceil(k.shape[2] / bk)
    qf, kf, vf = _flat(q, bq, nq), _flat(k, bk, nk), _flat(v, bk, nk)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(b * h * nq, bq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((b * h * nq, bq), float("-inf"), dtype=lse_dtype, device=q.device)
    for bucket in _plan(bm, b, h, hk):
        for sl in _chunks(bucket, d, bk):
            qq, kk, vv = _gather(bucket, sl, qf, kf, vf)
            o, l_ = _part_forward(qq, kk, vv, bucket.bias(q.dtype, sl), scale)
            if bucket.row_any is not None:  # rows whose keys are all masked: lse = -inf (out is 0)
                l_ = l_.to(lse_dtype).masked_fill(~bucket.row_any[sl], float("-inf"))
            rows = bucket.qflat[sl].reshape(-1)
            out.index_copy_(0, rows, o.reshape(-1, bq, dv))
            lse.index_copy_(0, rows, l_.reshape(-1, bq).to(lse_dtype))
    out = out.reshape(b, h, nq * bq, dv)[:, :, :n]
    lse = lse.reshape(b, h, nq * bq)[:, :, :n]
    return out.contiguous(), lse.contiguous()


def _torch_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bm: Any, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    hk, m = k.shape[1], k.shape[2]
    dv_ = v.shape[-1]
    bq, bk = bm.block_size
    nq, nk = math.ceil(n / bq), math.ceil(m / bk)
    plan = _plan(bm, b, h, hk)
    qf, kf, vf = _flat(q, bq, nq), _flat(k, bk, nk), _flat(v, bk, nk)
    dof, of = _flat(dout.to(q.dtype), bq, nq), _flat(out, bq, nq)
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # empty rows: P = 0
    if nq * bq > n:
        lse_b = F.pad(lse_b, (0, nq * bq - n), value=float("inf"))
    lse_b = lse_b.reshape(b * h * nq, bq)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(b * h * nq, bq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b * hk * nk, bk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b * hk * nk, bk, dv_, dtype=acc, device=q.device)
    for bucket in plan:
        for sl in _chunks(bucket, d, bk):
            qq, kk, vv = _gather(bucket, sl, qf, kf, vf)
            rows = bucket.qflat[sl].reshape(-1)
            r, x = bucket.qflat[sl].shape
            gq, gk, gv = _part_backward(
                dof.index_select(0, rows).reshape(r, x, bq, dv_),
                qq,
                kk,
                vv,
                of.index_select(0, rows).reshape(r, x, bq, dv_),
                lse_b.index_select(0, rows).reshape(r, x, bq),
                bucket.bias(q.dtype, sl),
                scale,
            )
            cols = bucket.kflat[sl].reshape(-1)
            dq.index_add_(0, rows, gq.reshape(-1, bq, d).to(acc))
            dk.index_add_(0, cols, gk.reshape(-1, bk, d).to(acc))
            dv.index_add_(0, cols, gv.reshape(-1, bk, dv_).to(acc))
    dq = dq.reshape(b, h, nq * bq, d)[:, :, :n].to(q.dtype)
    dk = dk.reshape(b, hk, nk * bk, d)[:, :, :m].to(k.dtype)
    dv = dv.reshape(b, hk, nk * bk, dv_)[:, :, :m].to(v.dtype)
    return dq, dk, dv
