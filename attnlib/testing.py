"""Reusable checks for attention implementations (used by attnlib's own test suite).

* :func:`make_qkv` - realistic inputs: Gaussian q/k with a controlled logit scale.
* :func:`assert_close` - FlexAttention's rule: the error of a fast path against a float64
  golden result may be at most ``factor`` times the error of the plain eager computation at
  the same precision (1.1x for fp16/bf16, 10x for fp32), with a small absolute floor.
* :func:`rel_error` - relative Frobenius error.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assert_close", "make_qkv", "max_error", "rel_error"]


def make_qkv(
    b: int,
    h: int,
    n: int,
    d: int,
    *,
    m: int | None = None,
    h_kv: int | None = None,
    dv: int | None = None,
    logit_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv).

    q and k are scaled so that the logits q·k / sqrt(D) have standard deviation
    ``logit_scale`` (1 is a typical trained model; 10-30 gives peaked attention).
    """
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    h_kv = h if h_kv is None else h_kv
    dv = d if dv is None else dv
    s = logit_scale**0.5
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * s
    k = torch.randn(b, h_kv, m, d, generator=gen, dtype=torch.float64) * s
    v = torch.randn(b, h_kv, m, dv, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))  # type: ignore[return-value]


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / max(||expected||, tiny)`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def max_error(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference, in float64."""
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def assert_close(
    actual: Tensor,
    golden: Tensor,
    eager: Tensor | None = None,
    *,
    factor: float | None = None,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``actual`` is as close to the float64 ``golden`` as precision allows.

    With ``eager`` (the plain computation at ``actual``'s precision), the rule is
    ``max|actual - golden| <= factor * max|eager - golden| + atol`` with ``factor`` 1.1 for
    fp16/bf16 and 10 for fp32 (FlexAttention's rule). Without ``eager`` (or for float64),
    ``max|actual - golden| <= atol`` with atol 1e-10 (fp64), 1e-5 (fp32) or 2e-2 (half).
    Raises AssertionError with both errors in the message. Also fails on any NaN/inf.
    """
    if actual.shape != golden.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(golden.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: contains NaN or inf")
    dt = actual.dtype
    half = dt in (torch.float16, torch.bfloat16)
    if atol is None:
        atol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dt, 2e-2)
        atol *= max(1.0, float(golden.detach().double().abs().max()))
    err = max_error(actual, golden)
    if eager is not None and dt != torch.float64:
        factor = (1.1 if half else 10.0) if factor is None else factor
        ref_err = max_error(eager, golden)
        bound = factor * ref_err + atol * 1e-2
        if err > bound:
            raise AssertionError(
                f"{name}: error vs float64 {err:.3e} exceeds {factor} x eager error {ref_err:.3e} (+{atol * 1e-2:.1e})"
            )
        return
    if err > atol:
        raise AssertionError(f"{name}: max abs error vs float64 {err:.3e} > atol {atol:.1e}")
