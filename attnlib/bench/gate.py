"""Correctness gate of the speed benchmark (fla's rule: no speed number without a green gate).

Two checks, both against float64 softmax attention (:func:`attnlib.functional.reference_attention`):

1. :func:`exactness_gate` - for ``exact`` variants only: the variant in float64 on a small input
   (N=256 by default) must equal the float64 reference under the caller's mask AND the
   variant's ``implied_mask()`` to float64 rounding (max error <= 1e-10 · max|ref|). A variant
   that fails is reported FAILED and never timed.
2. :func:`row_errors` - every row of the speed table: the method's output at the benchmark's
   own N and dtype, on sampled query rows (the first and the last ``rows`` rows), against the
   float64 reference for those rows. Exact methods must also pass FlexAttention's rule there
   (error <= k x the error of plain eager attention at the same dtype, k = 10 for fp32,
   k = 2 for fp16/bf16); approximate ones only report the error (relative to exact softmax
   under the caller's mask) and fail only on NaN/inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlib.bench.methods import Case, Inputs, MethodSpec, Runner
from attnlib.functional import reference_attention, softmax_attention
from attnlib.masks import AttentionMask
from attnlib.testing import assert_close, max_error, rel_error

__all__ = ["GateResult", "exactness_gate", "row_blocks", "row_errors"]

HALF_FACTOR = 2.0
FP32_FACTOR = 10.0


@dataclass
class GateResult:
    """Outcome of :func:`exactness_gate`: ``ok`` is None when the check could not run."""

    ok: bool | None
    error_max: float | None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"ok": self.ok, "error_max": self.error_max, "message": self.message}


def exactness_gate(
    spec: MethodSpec,
    *,
    causal: bool,
    head_dim: int,
    device: str = "cpu",
    n: int = 256,
    heads: int = 2,
    seed: int = 0,
) -> GateResult:
    """Float64 check of an exact method on a small Gaussian input (see the module docstring)."""
    case = Case(device, "float64", 1, heads, head_dim, n, causal, "fwd")
    try:
        torch.manual_seed(seed)
        runner = Runner(spec, case, Inputs.make(case, seed=seed))
        out = runner.forward_output()
    except Exception as e:  # float64 unsupported on this device, bad kwargs, ...
        return GateResult(None, None, f"float64 gate not run: {type(e).__name__}: {e}")
    i = runner.inputs
    golden = reference_attention(i.q, i.k, i.v, mask=runner.reference_mask)
    err = max_error(out, golden) if out.shape == golden.shape else float("inf")
    try:
        assert_close(out, golden, name=f"{spec.label} (float64, N={n}, causal={causal})")
    except AssertionError as e:
        return GateResult(False, err, str(e))
    return GateResult(True, err, "")


def row_blocks(n: int, rows: int) -> list[tuple[int, int]]:
    """Query-row ranges checked at length ``n``: the first and last ``rows`` rows (all if n <= 2·rows)."""
    if rows <= 0 or n <= 2 * rows:
        return [(0, n)]
    return [(0, rows), (n - rows, n)]


def _rows(t: Tensor, blocks: list[tuple[int, int]]) -> Tensor:
    return torch.cat([t[:, :, s:e] for s, e in blocks], dim=2)


def row_errors(runner: Runner, out: Tensor, *, rows: int = 32) -> dict[str, Any]:
    """Error of ``out`` (the runner's forward output) vs float64 attention on sampled rows.

    Returns ``error_rel`` (relative Frobenius), ``error_max``, ``eager_error_max`` (exact
    methods, non-float64), ``gate`` ("pass" / "FAILED") and ``gate_msg``.
    """
    i = runner.inputs
    q, k, v = i.q.detach(), i.k.detach(), i.v.detach()
    n = q.shape[2]
    blocks = row_blocks(n, rows)
    mask: AttentionMask = runner.reference_mask
    golden, eager = [], []
    for s, e in blocks:
        allowed = mask.dense_rows(s, e)
        golden.append(reference_attention(q[:, :, s:e], k, v, mask=allowed))
        if runner.spec.exact and q.dtype != torch.float64:
            eager.append(softmax_attention(q[:, :, s:e], k, v, mask=allowed, backend="math"))
    g = torch.cat(golden, dim=2)
    a = _rows(out, blocks)
    res: dict[str, Any] = {"gate": "pass", "gate_msg": "", "error_rows": sum(e - s for s, e in blocks)}
    if a.shape != g.shape:
        res.update(gate="FAILED", gate_msg=f"output shape {tuple(out.shape)} != expected {tuple(q.shape)}")
        return res
    if not torch.isfinite(a).all():
        res.update(gate="FAILED", gate_msg="output has NaN/inf", error_rel=float("nan"), error_max=float("nan"))
        return res
    res["error_rel"] = rel_error(a, g)
    res["error_max"] = max_error(a, g)
    if runner.spec.exact:
        ea = torch.cat(eager, dim=2) if eager else None
        if ea is not None:
            res["eager_error_max"] = max_error(ea, g)
        half = q.dtype in (torch.float16, torch.bfloat16)
        try:
            assert_close(a, g, ea, factor=HALF_FACTOR if half else FP32_FACTOR, name=runner.spec.label)
        except AssertionError as e:
            res.update(gate="FAILED", gate_msg=str(e))
    return res
