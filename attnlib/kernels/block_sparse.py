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

Dispatch (``backend="auto"``): Triton on CUDA when :func:`triton_supports` accepts the call -
which includes "some tile configuration fits this device's shared memory" (see
:mod:`attnlib.kernels._triton_configs`, where the fp32 precision policy is documented too) -
else the PyTorch path, with a ``RuntimeWarning`` when a CUDA call falls back for a reason the
caller may not expect (no tile fits, a launch out of resources).

``causal=True`` and ``kv_lengths=`` are applied by the Triton kernels themselves (no new
BlockMask per call, no host synchronisation); the PyTorch path folds them into the layout.

This module sits at the bottom of attnlib's layers: it reads the BlockMask's public tensors
(duck-typed; the PyTorch path builds the causal / key-length layouts through the BlockMask's
own class) and imports nothing from attnlib but its error type and :mod:`attnlib.dispatch`
(which path runs where).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlib import dispatch
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
    interpreted = not q.is_cuda  # CPU tensors only reach here under TRITON_INTERPRET=1
    if q.dtype not in _TRITON_DTYPES and not (interpreted and q.dtype == torch.float64):
        return (
            f"the Triton kernel supports float16, bfloat16 and float32 (and float64 under the interpreter), "
            f"got {q.dtype}; use backend='torch'"
        )
    bq, bk = block_mask.block_size
    if bq not in _TRITON_BLOCKS or bk not in _TRITON_BLOCKS:
        return f"the Triton kernel needs block sizes in {_TRITON_BLOCKS}, got {(bq, bk)}; use backend='torch'"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return f"the Triton kernel supports head dims up to 256, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if not interpreted:
        from attnlib.kernels import _triton_configs as cfgs

        why = cfgs.unsupported(q.dtype, q.shape[-1], v.shape[-1], (bq, bk), q.device)
        if why is not None:
            return why
    return None


def check_kernel_qkv(q: Tensor, k: Tensor, v: Tensor, where: str) -> None:
    """ValueError unless q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) are non-empty float
    tensors of one dtype and device with H a multiple of H_kv (the kernels' common contract)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a float tensor (B, H, N, D), got {got}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"{where}: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    b, h, n, d = q.shape
    bk_, hk, m, dk = k.shape
    if bk_ != b or v.shape[0] != b or v.shape[1] != hk or v.shape[2] != m or dk != d:
        raise ValueError(
            f"{where}: expected q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if hk == 0 or h % hk:
        raise ValueError(f"{where}: query heads H={h} must be a multiple of key/value heads H_kv={hk}")
    if n == 0 or m == 0 or b == 0:
        raise ValueError(f"{where}: empty input (B={b}, N={n}, M={m})")


def _check(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> None:
    check_kernel_qkv(q, k, v, "block_sparse_attention")
    b, h, n, _ = q.shape
    m = k.shape[2]
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
    causal: bool = False,
    kv_lengths: Tensor | None = None,
    backend: KernelBackend = "auto",
    return_lse: bool = False,
    score_mod: Any = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention over the pairs a BlockMask allows, visiting only active blocks.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv). H a multiple of H_kv
            (grouped-query attention: query head h reads key/value head h // (H / H_kv)). Any
            strides (the Triton kernels read them; only the last dimension must be dense).
        block_mask: :class:`attnlib.masks.BlockMask` for (N, M), shared (B'=1, H'=1) or per
            batch / head. Partial blocks are masked element-wise.
        scale: logit scale, default D**-0.5.
        causal: also apply the bottom-right aligned causal rule (key j <= query i + M - N),
            in the kernel: no new BlockMask is built per call on the Triton path.
        kv_lengths: optional int tensor (B,): batch row b attends its first kv_lengths[b] keys
            only (key padding as lengths), applied in the kernel likewise.
        backend: "auto" (Triton where :func:`attnlib.dispatch.triton_preferred` says so - CUDA -
            and it supports the call, else PyTorch), "triton" or
            "torch". With ``TRITON_INTERPRET=1``, "triton" runs CPU tensors through Triton's
            interpreter.
        return_lse: also return the natural-log log-sum-exp (B, H, N), float32 (float64 for
            float64 inputs); -inf on rows with no allowed key.
        score_mod: optional ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's signature)
            applied to each scaled score tile before the softmax, on the PyTorch path (explicit
            tiles per bucket of query blocks, autograd backward; "auto" picks it, "triton" raises).

    Returns:
        out (B, H, N, Dv) (or (out, lse)). Rows with no allowed key are zeros, with zero
        gradients. Differentiable w.r.t. q, k, v.
    """
    _check(q, k, v, block_mask)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"block_sparse_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if kv_lengths is not None:
        if not isinstance(kv_lengths, Tensor) or kv_lengths.shape != (q.shape[0],) or kv_lengths.is_floating_point():
            got = f"{tuple(kv_lengths.shape)} {kv_lengths.dtype}" if isinstance(kv_lengths, Tensor) else kv_lengths
            raise ValueError(
                f"block_sparse_attention: kv_lengths must be an int tensor (B,) = ({q.shape[0]},), got {got}"
            )
        if kv_lengths.device != q.device:
            raise ValueError(f"block_sparse_attention: kv_lengths is on {kv_lengths.device} but q is on {q.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if score_mod is not None:
        if backend == "triton":
            raise UnsupportedError(
                "block_sparse_attention(backend='triton'): no score_mod support; use backend='torch'"
            )
        from attnlib.kernels._block_sparse_score_mod import score_mod_forward

        out, lse = score_mod_forward(q, k, v, _torch_mask(block_mask, bool(causal), kv_lengths), scale, score_mod)
        return (out, lse) if return_lse else out
    if backend == "triton":
        why = triton_supports(q, k, v, block_mask)
        if why is not None:
            raise UnsupportedError(f"block_sparse_attention(backend='triton'): {why}")
        impl = "triton!"
    elif backend == "auto" and dispatch.triton_preferred(q.device):
        why = triton_supports(q, k, v, block_mask)
        impl = "triton" if why is None else "torch"
        if why is not None and triton_available() and q.dtype in _TRITON_DTYPES:
            _warn_once(why)
    else:
        impl = "torch"
    out, lse = _BlockSparseFn.apply(q, k, v, block_mask, scale, impl, bool(causal), kv_lengths)
    return (out, lse) if return_lse else out


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"block_sparse_attention: using the PyTorch path on CUDA, the Triton kernel cannot run this call: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


_KV_MASKS_KEPT = 8  # key-length layouts the PyTorch path keeps per BlockMask


def _torch_mask(bm: Any, causal: bool, kv_lengths: Tensor | None) -> Any:
    """The PyTorch path's layout: ``bm`` AND the causal rule AND the key lengths (built through
    the BlockMask's own class; the causal one is cached on ``bm``, the key-length ones on the
    causal one for the last :data:`_KV_MASKS_KEPT` sets of lengths, so a model whose layers
    share one padding builds it once per batch, and each layout's plan is cached with it)."""
    if causal:
        cache = getattr(bm, "_cache", None)
        if cache is not None and "torch_causal_mask" in cache:
            bm = cache["torch_causal_mask"]
        else:
            n, m = bm.seq_lengths
            both = bm & type(bm).causal(n, m, block_size=bm.block_size, device=bm.device)
            if cache is not None:
                cache["torch_causal_mask"] = both
            bm = both
    if kv_lengths is not None:
        n, m = bm.seq_lengths
        key = tuple(min(int(x), m) for x in kv_lengths.tolist())
        if all(x == m for x in key):
            return bm
        cache = getattr(bm, "_cache", None)
        held = None if cache is None else cache.setdefault("torch_kv_masks", {})
        if held is not None and key in held:
            return held[key]
        keep = torch.arange(m, device=kv_lengths.device)[None, :] < kv_lengths[:, None]
        both = bm & type(bm).from_key_padding(keep, n, block_size=bm.block_size)
        if held is not None:  # the layouts of the last few length sets (with their cached plans)
            held[key] = both
            while len(held) > _KV_MASKS_KEPT:
                del held[next(iter(held))]
        bm = both
    return bm


class _BlockSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bm: Any,
        scale: float,
        impl: str,
        causal: bool,
        kv_lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        if impl.startswith("triton"):
            from attnlib.kernels import _triton_block_sparse as tri

            try:
                out, lse = tri.forward(q, k, v, bm, scale, causal, kv_lengths)
            except tri.NoKernelConfigError as e:
                if impl == "triton!":
                    raise UnsupportedError(f"block_sparse_attention(backend='triton'): {e}") from e
                _warn_once(str(e))
                impl = "torch"
        if impl == "torch":
            bm = _torch_mask(bm, causal, kv_lengths)
            out, lse = _torch_forward(q, k, v, bm, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bm, ctx.scale, ctx.impl, ctx.causal, ctx.kv_lengths = bm, scale, impl, causal, kv_lengths
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        bm = ctx.bm
        if ctx.impl.startswith("triton"):
            from attnlib.kernels import _triton_block_sparse as tri

            try:
                dq, dk, dv = tri.backward(dout, q, k, v, out, lse, bm, ctx.scale, ctx.causal, ctx.kv_lengths)
                return dq, dk, dv, None, None, None, None, None
            except tri.NoKernelConfigError as e:
                if ctx.impl == "triton!":
                    raise UnsupportedError(f"block_sparse_attention(backend='triton'): {e}") from e
                _warn_once(str(e))
                bm = _torch_mask(bm, ctx.causal, ctx.kv_lengths)
        dq, dk, dv = _torch_backward(dout, q, k, v, out, lse, bm, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------------------------
# PyTorch path: plan (cached on the BlockMask), fused per-bucket attention, LSE merge
# ------------------------------------------------------------------------------------------


_BIAS_CACHE_ELEMS = 1 << 24  # float-mask elements a plan may keep cached (per dtype); the rest is rebuilt per call


class _Bucket:
    """Query blocks that visit the same number c of key blocks (full and partial together).

    Attributes: qflat (R, X) flat index (b·H + h)·n_q + I of every expanded query block;
    kflat (R, X, c) flat index (b·H_kv + h_kv)·n_k + J of its key blocks (ascending);
    the element masks of its non-full blocks only - rows ``prow`` (P,), positions ``pcol``
    (P,) among the c blocks, tiles ``ptile`` (P, bq, bk) - and row_any (R, 1, bq), the rows
    with at least one allowed key (None when every block is full).
    """

    def __init__(
        self, qflat: Tensor, kflat: Tensor, prow: Tensor, pcol: Tensor, ptile: Tensor, budget: list[int]
    ) -> None:
        self.qflat, self.kflat = qflat, kflat
        self.prow, self.pcol, self.ptile = prow, pcol, ptile
        self._budget = budget
        self._bias: dict[torch.dtype, Tensor] = {}
        self.row_any: Tensor | None = None
        r, c = kflat.shape[0], kflat.shape[2]
        if prow.numel():
            bq = ptile.shape[1]
            n_masked = torch.zeros(r, dtype=torch.long, device=qflat.device).index_add_(0, prow, torch.ones_like(prow))
            dense_rows = n_masked < c  # rows with at least one full block
            any_p = torch.zeros(r, bq, dtype=torch.bool, device=qflat.device)
            any_p.index_put_((prow,), ptile.any(-1), accumulate=True)
            self.row_any = (dense_rows[:, None] | any_p)[:, None, :]

    def bias(self, dtype: torch.dtype, sl: slice) -> Tensor | None:
        """Additive mask (R, 1, bq, c·bk) of rows ``sl``: 0 where allowed, -inf elsewhere (None if all full)."""
        if self.row_any is None:
            return None
        if dtype in self._bias:
            return self._bias[dtype][sl]
        r, c = self.kflat.shape[0], self.kflat.shape[2]
        bq, bk = self.ptile.shape[1:]
        whole = r * bq * c * bk <= self._budget[0]
        start, stop = (0, r) if whole else (sl.start, sl.stop)
        out = torch.zeros(stop - start, bq, c, bk, dtype=dtype, device=self.ptile.device)
        sel = (self.prow >= start) & (self.prow < stop)
        vals = torch.zeros(self.ptile[sel].shape, dtype=dtype, device=out.device).masked_fill_(
            ~self.ptile[sel], float("-inf")
        )
        out[self.prow[sel] - start, :, self.pcol[sel], :] = vals
        out = out.view(stop - start, 1, bq, c * bk)
        if whole:
            self._budget[0] -= out.numel()
            self._bias[dtype] = out
            return out[sl]
        return out


def _plan(bm: Any, b: int, h: int, hk: int) -> list[_Bucket]:
    """Buckets for the call sizes (B, H, H_kv); cached on the BlockMask (its layout never changes).

    Memory: the element masks of the partial blocks (as in the BlockMask) plus a bounded cache of
    float masks; no full-width mask is stored.
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
    budget = [_BIAS_CACHE_ELEMS]
    for c in torch.unique(counts).tolist():
        if c == 0:
            continue
        units = torch.nonzero(counts == c).flatten()
        r = units.numel()
        kblk = order[units, :c]
        bidx = (unit_b[units, None] if ex_b is None else ex_b[None, :]).expand(r, nx_b * nx_h)
        hidx = (unit_h[units, None] if ex_h is None else ex_h[None, :]).expand(r, nx_b * nx_h)
        s = flat_slots[units[:, None], kblk]  # (R, c): >= 0 partial slot, -1 full, -2 full tail block
        prow, pcol = torch.nonzero(s != -1, as_tuple=True)
        ptile = torch.zeros(prow.numel(), bq, bk, dtype=torch.bool, device=dev)
        ps = s[prow, pcol]
        if flat_tiles.shape[1]:
            sel = ps >= 0
            ptile[sel] = flat_tiles[units[prow[sel]], ps[sel]]
        if tail_tile is not None:
            ptile[ps == -2] = tail_tile
        qflat = (bidx * h + hidx) * nq + unit_i[units][:, None]
        kflat = ((bidx * hk + hidx // (h // hk)) * nk)[:, :, None] + kblk[:, None, :]
        plan.append(_Bucket(qflat.contiguous(), kflat.contiguous(), prow, pcol, ptile, budget))
    if cache is not None:
        cache[key] = plan
    return plan


def _affine(idx: Tensor) -> tuple[int, int, int] | None:
    """(base, row step, column step) when idx (R, X) == base + r·step_r + x·step_x with both steps
    >= 0 (a strided view cannot step backwards: ``as_strided`` rejects negative strides), else None."""
    r, x = idx.shape
    base = int(idx[0, 0])
    sr = int(idx[1, 0] - idx[0, 0]) if r > 1 else 0
    sx = int(idx[0, 1] - idx[0, 0]) if x > 1 else 0
    if sr < 0 or sx < 0:
        return None
    want = base + torch.arange(r, device=idx.device)[:, None] * sr + torch.arange(x, device=idx.device)[None, :] * sx
    return (base, sr, sx) if torch.equal(idx, want) else None


def _affine_segments(bucket: _Bucket) -> list[slice] | None:
    """Split a bucket's rows into maximal runs whose query and key blocks are affine with
    non-negative steps (see _Item), or None when some row's key blocks are not one contiguous run
    (then they are gathered). A step going down (key blocks visited by one query block lying
    *before* those of the previous one) starts a new run."""
    kf, qf = bucket.kflat, bucket.qflat
    r, x, c = kf.shape
    if c > 1 and not bool((kf[..., 1:] - kf[..., :-1] == 1).all()):
        return None
    if x > 1:
        dx = kf[:, 1:, 0] - kf[:, :-1, 0]
        qx = qf[:, 1:] - qf[:, :-1]
        if not (bool((dx == dx[0, 0]).all()) and bool((qx == qx[0, 0]).all())):
            return None
    ks, qs = kf[:, 0, 0].tolist(), qf[:, 0].tolist()
    out, start = [], 0
    for i in range(1, r + 1):
        dk_, dq_ = (ks[i] - ks[i - 1], qs[i] - qs[i - 1]) if i < r else (-1, -1)
        if dk_ >= 0 and dq_ >= 0 and (i - start < 2 or (dk_ == ks[start + 1] - ks[start]
                                                         and dq_ == qs[start + 1] - qs[start])):  # fmt: skip
            continue
        out.append(slice(start, i))
        start = i
    return out


class _Item:
    """One fused attention call: rows ``sl`` of a bucket.

    When its query blocks (resp. key blocks: a contiguous run per row) sit at affinely spaced
    positions - sliding windows, causal prefixes, documents - they are read through a
    strided view (``q_spec`` / ``k_spec``), with no copy; otherwise they are gathered.
    """

    def __init__(self, bucket: _Bucket, sl: slice) -> None:
        self.bucket, self.sl = bucket, sl
        self.qflat, self.kflat = bucket.qflat[sl], bucket.kflat[sl]
        self.r, self.x, self.c = self.kflat.shape
        self.q_spec = _affine(self.qflat)
        run = torch.arange(self.c, device=self.kflat.device)
        contiguous = bool((self.kflat - self.kflat[..., :1] == run).all())
        self.k_spec = _affine(self.kflat[..., 0]) if contiguous else None
        self.q_off = self.k_off = -1


def _view(x: Tensor, spec: tuple[int, int, int], r: int, xx: int, rows: int) -> Tensor:
    """Strided view (R, X, rows, ·) of a contiguous block tensor x (n_blocks, blk[, ·])."""
    base, sr, sx = spec
    per = math.prod(x.shape[1:])  # elements per block
    inner = x.shape[2:]
    size = (r, xx, rows, *inner)
    stride = (sr * per, sx * per, *(x.stride()[1:]))
    return x.as_strided(size, stride, x.storage_offset() + base * per)


class _Group:
    """Calls whose non-affine query / key blocks are gathered together (one index_select each)."""

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        qg = [it.qflat.reshape(-1) for it in items if it.q_spec is None]
        kg = [it.kflat.reshape(-1) for it in items if it.k_spec is None]
        self.q_gather = torch.cat(qg) if qg else None
        self.k_gather = torch.cat(kg) if kg else None
        self.k_all = torch.cat([it.kflat.reshape(-1) for it in items])
        q_off = k_off = 0
        for it in items:
            if it.q_spec is None:
                it.q_off, q_off = q_off, q_off + it.r * it.x
            if it.k_spec is None:
                it.k_off, k_off = k_off, k_off + it.r * it.x * it.c


def _groups(bm: Any, b: int, h: int, hk: int, d: int, bk: int) -> tuple[list[_Group], Tensor | None]:
    """Group the buckets' calls so that each group gathers at most ~_GATHER_ELEMS key elements
    (bounded memory) with few separate tensor ops; plus the rows (flat (B·H·n_q, bq) bool)
    that lie in active blocks but have no allowed key (or None)."""
    key = f"torch_groups/{b}/{h}/{hk}/{d}"
    cache = getattr(bm, "_cache", None)
    if cache is not None and key in cache:
        return cache[key]
    groups: list[_Group] = []
    items: list[_Item] = []
    size_acc = 0
    empty: Tensor | None = None
    for bucket in _plan(bm, b, h, hk):
        r, x = bucket.qflat.shape
        c = bucket.kflat.shape[2]
        step = max(1, _GATHER_ELEMS // max(1, x * c * bk * d))
        segments = _affine_segments(bucket)
        if segments is not None and len(segments) <= max(1, r // 2):
            slices = segments  # strided views: no copies, no memory bound needed
        else:
            slices = [slice(s0, min(r, s0 + step)) for s0 in range(0, r, step)]
        for sl in slices:
            it = _Item(bucket, sl)
            size = it.r * it.x * c * bk * d if it.k_spec is None else 0
            if items and size_acc + size > _GATHER_ELEMS:
                groups.append(_Group(items))
                items, size_acc = [], 0
            items.append(it)
            size_acc += size
        if bucket.row_any is not None and not bool(bucket.row_any.all()):
            if empty is None:
                nq = bm.kv_num_blocks.shape[-1]
                empty = torch.zeros(b * h * nq, bucket.row_any.shape[-1], dtype=torch.bool, device=bucket.qflat.device)
            rows = bucket.qflat.reshape(-1)
            empty[rows] = (~bucket.row_any).expand(r, x, -1).reshape(rows.numel(), -1)
    if items:
        groups.append(_Group(items))
    if cache is not None:
        cache[key] = (groups, empty)
    return groups, empty


def _part_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, nan_guard: bool = True
) -> tuple[Tensor, Tensor]:
    """Attention of rows q (R, X, bq, D) over k/v (R, X, L, ·) with additive bias -> (out, lse).

    ``nan_guard=False`` when the caller knows q holds no NaN (the fused kernel's NaN rows need a fix-up).
    """
    if dispatch.fused_cpu_block_parts(q.device, q.shape[-1], v.shape[-1]):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q,
            k,
            v,
            0.0,
            False,
            attn_mask=None if bias is None else bias.expand(*q.shape[:2], *bias.shape[2:]),
            scale=scale,
        )
        if not nan_guard:
            return out, lse
        nan_q = q.isnan().any(-1, keepdim=True)  # the fused kernel returns 0 for such a row (few keys)
        return out.masked_fill(nan_q, float("nan")), lse.masked_fill(nan_q.squeeze(-1), float("nan"))
    # fp16 / bf16 inputs: scores, probabilities and the output accumulate in fp32 (a half-precision
    # matmul would round the scores to bf16 before the softmax: ~1e-2 relative error in the LSE)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(acc)) / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(q.dtype), (mx + torch.log(den)).squeeze(-1)


def _part_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part given the *global* out and lse of its rows (lse = +inf on empty rows)."""
    if dispatch.fused_cpu_block_parts(q.device, q.shape[-1], v.shape[-1]):
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


def _flat(x: Tensor, size: int, n_blocks: int) -> Tensor:
    """(B, H, L, D) -> zero-padded blocks flattened to a contiguous (B·H·n_blocks, size, D)."""
    return _blocks(x, size, n_blocks).reshape(-1, size, x.shape[-1]).contiguous()


def _q_side(it: _Item, flat: Tensor, gathered: Tensor | None, rows: int) -> Tensor:
    if it.q_spec is not None:
        return _view(flat, it.q_spec, it.r, it.x, rows)
    assert gathered is not None
    return gathered[it.q_off : it.q_off + it.r * it.x].view(it.r, it.x, rows, *flat.shape[2:])


def _k_side(it: _Item, flat: Tensor, gathered: Tensor | None, bk: int) -> Tensor:
    if it.k_spec is not None:
        return _view(flat, it.k_spec, it.r, it.x, it.c * bk)
    assert gathered is not None
    n = it.r * it.x * it.c
    return gathered[it.k_off : it.k_off + n].view(it.r, it.x, it.c * bk, flat.shape[-1])


def _add_runs(acc: Tensor, grad: Tensor, it: _Item, bk: int) -> None:
    """acc[kflat] += grad for an item whose key blocks are affine runs (windows may overlap
    across rows, so add the j-th block of every row at a time: those never overlap). Columns that
    read the same blocks (step 0: query heads sharing one key/value head) are summed first."""
    assert it.k_spec is not None
    base, sr, sx = it.k_spec
    x = it.x
    g = grad.reshape(it.r, x, it.c, bk, grad.shape[-1]).to(acc.dtype)
    if sx == 0 and x > 1:  # every column reads the same blocks (multi-query attention)
        g, x = g.sum(1, keepdim=True), 1
    if sr == 0 or it.r == 1:  # every row reads the same blocks
        _view(acc, (base, sr, sx), 1, x, it.c * bk).add_(g.sum(0, keepdim=True).reshape(1, x, -1, grad.shape[-1]))
        return
    for j in range(it.c):
        _view(acc, (base + j, sr, sx), it.r, x, bk).add_(g[:, :, j])


class _Gather:
    """``src.index_select(0, idx)`` written into one buffer per operand, reused by every group of a call.

    A fresh gather of tens of MB per group is page-faulted in anew each time: measured on the
    CPU at N=16384 with a 10%-dense data-dependent layout, that was ~20% of the forward's CPU time.
    The returned tensor is a view of the buffer, valid until the next gather of the same operand.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, src: Tensor, idx: Tensor | None) -> Tensor | None:
        if idx is None:
            return None
        n = idx.numel()
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._bufs[name] = src.new_empty((n, *src.shape[1:]))
        return torch.index_select(src, 0, idx, out=buf[:n])


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
    groups, empty = _groups(bm, b, h, hk, d, bk)
    # one pass over q instead of one per part (the per-part fix-up costs as much as the gathers)
    # (a NaN anywhere in q makes its sum NaN; +inf and -inf together only run the guard needlessly)
    nan_guard = dispatch.fused_cpu_block_parts(q.device, d, dv) and bool(q.sum().isnan())
    gather = _Gather()
    for grp in groups:
        qg = gather("q", qf, grp.q_gather)
        kg, vg = gather("k", kf, grp.k_gather), gather("v", vf, grp.k_gather)
        outs, lses = [], []
        for it in grp.items:
            o, l_ = _part_forward(
                _q_side(it, qf, qg, bq),
                _k_side(it, kf, kg, bk),
                _k_side(it, vf, vg, bk),
                it.bucket.bias(q.dtype, it.sl),
                scale,
                nan_guard,
            )
            if it.q_spec is not None:
                _view(out, it.q_spec, it.r, it.x, bq).copy_(o)
                _view(lse, it.q_spec, it.r, it.x, bq).copy_(l_)
            else:
                outs.append(o.reshape(-1, bq, dv))
                lses.append(l_.reshape(-1, bq))
        if outs:
            assert grp.q_gather is not None
            out.index_copy_(0, grp.q_gather, outs[0] if len(outs) == 1 else torch.cat(outs))
            lse.index_copy_(0, grp.q_gather, (lses[0] if len(lses) == 1 else torch.cat(lses)).to(lse_dtype))
    if empty is not None:  # rows whose keys are all masked: out is 0, lse -inf
        lse.masked_fill_(empty, float("-inf"))
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
    qf, kf, vf = _flat(q, bq, nq), _flat(k, bk, nk), _flat(v, bk, nk)
    dof, of = _flat(dout.to(q.dtype), bq, nq), _flat(out, bq, nq)
    lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # empty rows: P = 0
    if nq * bq > n:
        lse_b = F.pad(lse_b, (0, nq * bq - n), value=float("inf"))
    lse_b = lse_b.reshape(b * h * nq, bq).contiguous()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(b * h * nq, bq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b * hk * nk, bk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b * hk * nk, bk, dv_, dtype=acc, device=q.device)
    groups, _ = _groups(bm, b, h, hk, d, bk)
    gather = _Gather()
    for grp in groups:
        qi, ki = grp.q_gather, grp.k_gather
        qg, dog, og, lg = (gather(name, t, qi) for name, t in zip("qdol", (qf, dof, of, lse_b), strict=True))
        kg, vg = gather("k", kf, ki), gather("v", vf, ki)
        gqs, gks, gvs = [], [], []
        for it in grp.items:
            gq, gk, gv = _part_backward(
                _q_side(it, dof, dog, bq),
                _q_side(it, qf, qg, bq),
                _k_side(it, kf, kg, bk),
                _k_side(it, vf, vg, bk),
                _q_side(it, of, og, bq),
                _q_side(it, lse_b, lg, bq),
                it.bucket.bias(q.dtype, it.sl),
                scale,
            )
            if it.q_spec is not None:
                _view(dq, it.q_spec, it.r, it.x, bq).add_(gq)
            else:
                gqs.append(gq.reshape(-1, bq, d))
            if it.k_spec is not None:
                _add_runs(dk, gk, it, bk)
                _add_runs(dv, gv, it, bk)
            else:
                gks.append(gk.reshape(-1, bk, d))
                gvs.append(gv.reshape(-1, bk, dv_))
        if gqs:
            assert qi is not None
            dq.index_add_(0, qi, torch.cat(gqs).to(acc))
        if gks:
            assert ki is not None
            dk.index_add_(0, ki, torch.cat(gks).to(acc))
            dv.index_add_(0, ki, torch.cat(gvs).to(acc))
    dq = dq.reshape(b, h, nq * bq, d)[:, :, :n].to(q.dtype)
    dk = dk.reshape(b, hk, nk * bk, d)[:, :, :m].to(k.dtype)
    dv = dv.reshape(b, hk, nk * bk, dv_)[:, :, :m].to(v.dtype)
    return dq, dk, dv
