"""Fused alpha-entmax attention: a Triton kernel that never builds the N x M probability matrix.

``entmax_attention_fused(q, k, v, alpha=1.5)`` computes ``entmax_alpha(q k^T · scale) v`` with the
threshold of every query row found inside the kernel by streaming over the key tiles (see
:mod:`attnlib.kernels._triton_entmax` for the algorithm: a bracket from the row maximum, exact
support-restricted roots for alpha = 1.5 and 2, Halley steps with bisection otherwise, then one
pass for the output), in the spirit of AdaSplash (Gonçalves et al. 2025). Memory O(N · (D + Dv))
beyond the inputs; time O(passes · N · M · D) where a pass is one QK^T sweep (the threshold
search usually settles in a few). Forward and backward (the entmax Jacobian, recomputing
the probabilities tile by tile from the stored thresholds).

Runs on CUDA tensors, or on CPU tensors through Triton's interpreter with ``TRITON_INTERPRET=1``
(tests). :func:`attnlib.functional.entmax_attention` routes here on CUDA when the call is one the
kernel supports (:func:`fused_entmax_supports`); everything else keeps the PyTorch path. This
module imports nothing from attnlib but its error type and :mod:`attnlib.kernels.block_sparse`'s
Triton probes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlib.errors import UnsupportedError
from attnlib.kernels.block_sparse import _interpret, check_kernel_qkv, triton_available

__all__ = ["FUSED_ENTMAX_MAX_HEAD_DIM", "entmax_attention_fused", "fused_entmax_supports"]

FUSED_ENTMAX_MAX_HEAD_DIM = 128
"""Largest head dim (D and Dv) of the fused entmax kernel."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_entmax_supports(q: Tensor, k: Tensor, v: Tensor, alpha: Any) -> str | None:
    """None when the fused kernel can run ``entmax_alpha(q k^T) v`` for these tensors, else why not."""
    if not triton_available():
        return "the `triton` package is not installed (pip install 'triton>=3.0')"
    if not q.is_cuda and not _interpret():
        return (
            f"the fused entmax kernel runs on CUDA tensors, got tensors on {q.device}; set TRITON_INTERPRET=1 "
            "to run it on the CPU through Triton's interpreter (slow, for tests)"
        )
    if isinstance(alpha, Tensor) or not isinstance(alpha, (int, float)) or not float(alpha) > 1:
        return f"the fused entmax kernel takes one fixed float alpha > 1, got {alpha!r} (learned alphas: PyTorch path)"
    interpreted = not q.is_cuda
    if q.dtype not in _DTYPES and not (interpreted and q.dtype == torch.float64):
        return f"the fused entmax kernel supports float16, bfloat16 and float32, got {q.dtype}"
    if q.shape[-1] > FUSED_ENTMAX_MAX_HEAD_DIM or v.shape[-1] > FUSED_ENTMAX_MAX_HEAD_DIM:
        return (
            f"the fused entmax kernel supports head dims up to {FUSED_ENTMAX_MAX_HEAD_DIM}, "
            f"got D={q.shape[-1]}, Dv={v.shape[-1]}"
        )
    return None


def _check(q: Tensor, k: Tensor, v: Tensor, kv_lengths: Tensor | None) -> None:
    check_kernel_qkv(q, k, v, "entmax_attention_fused")
    b = q.shape[0]
    if kv_lengths is not None and (
        not isinstance(kv_lengths, Tensor) or kv_lengths.shape != (b,) or kv_lengths.is_floating_point()
    ):
        got = tuple(kv_lengths.shape) if isinstance(kv_lengths, Tensor) else type(kv_lengths).__name__
        raise ValueError(f"entmax_attention_fused: kv_lengths must be an integer tensor of shape ({b},), got {got}")


class _FusedEntmax(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_lengths: Tensor | None,
        opts: dict[str, Any],
    ) -> Tensor:
        from attnlib.kernels import _triton_entmax as tri

        need = any(ctx.needs_input_grad[:3])
        out, tau, psum, a = tri.forward(q, k, v, kv_lengths=kv_lengths, need_grad=need, **opts)
        if need:
            ctx.save_for_backward(q, k, v, tau, psum, a, kv_lengths)
        ctx.opts = opts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        from attnlib.kernels import _triton_entmax as tri

        q, k, v, tau, psum, a, kv_lengths = ctx.saved_tensors
        o = {key: ctx.opts[key] for key in ("alpha", "scale", "causal", "interpreted")}
        dq, dk, dv = tri.backward(do, q, k, v, tau, psum, a, kv_lengths=kv_lengths, **o)
        return dq, dk, dv, None, None


def entmax_attention_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float = 1.5,
    scale: float | None = None,
    causal: bool = False,
    kv_lengths: Tensor | None = None,
    n_iter: int = 30,
    tol: float = 1e-6,
) -> Tensor:
    """alpha-entmax attention ``entmax_alpha(q k^T · scale) v`` in one fused Triton kernel.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv); H a multiple of H_kv
            (grouped-query attention). float16 / bfloat16 / float32, D and Dv up to 128.
        alpha: a fixed alpha > 1 (1.5 and 2 take exact support-restricted roots).
        scale: logit scale, default D**-0.5.
        causal: bottom-right aligned causal mask (key j <= query i + M - N).
        kv_lengths: (B,) integer key lengths: keys >= kv_lengths[b] are masked (right padding).
        n_iter: most threshold steps (one pass over the keys each).
        tol: a row's threshold search stops when its step is below ``tol · (1 + |tau|)``.

    Returns:
        (B, H, N, Dv) in q's dtype; rows with no allowed key are zeros. Differentiable in q, k, v.

    Raises:
        UnsupportedError: the kernel cannot run this call (see :func:`fused_entmax_supports`).
    """
    _check(q, k, v, kv_lengths)
    why = fused_entmax_supports(q, k, v, alpha)
    if why is not None:
        raise UnsupportedError(f"entmax_attention_fused: {why}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"entmax_attention_fused: n_iter must be a positive int, got {n_iter!r}")
    d = q.shape[-1]
    opts = {
        "alpha": float(alpha),
        "scale": d**-0.5 if scale is None else float(scale),
        "causal": bool(causal),
        "n_iter": n_iter,
        "tol": float(tol),
        "interpreted": not q.is_cuda,
    }
    kvl = None if kv_lengths is None else kv_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    return _FusedEntmax.apply(q.contiguous(), k.contiguous(), v.contiguous(), kvl, opts)
