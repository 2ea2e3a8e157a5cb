"""Approx mode: how far each approximate variant is from exact softmax attention.

For every variant with ``capabilities.exact == False``, on Gaussian q/k with a controlled logit
scale (:func:`attnlib.testing.make_qkv`), in float64 so only the approximation shows:

* relative error of the output, ``||out - ref|| / ||ref||``, against float64 softmax attention
  under the same caller mask (causal or not), and
* relative error of the input gradients (dq, dk, dv, and all three together) for a fixed
  Gaussian upstream gradient,

as a function of N and of the logit scale (defaults of the variant), and as a function of each
*approximation knob* (number of random features, hash bits, kept density, ...) at ``knob_n``.
Knobs come from ``approx.knobs.<variant>`` (the user's choice), else from
``AttentionCore.approximation_knobs()`` (the variant's own declaration), else from
``approx.fallback_knobs.<variant>`` (the config's defaults for variants that declare none).
Errors are averaged over seeds (the random inputs and the variant's own randomness, e.g. random
features, both change with the seed). Variants with trainable parameters are evaluated at
initialisation, which the table says.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlib.bench.methods import MethodSpec, dtype_of
from attnlib.bench.report import fmt_err, header, markdown_table, plot_lines
from attnlib.functional import reference_attention
from attnlib.masks import normalize_mask
from attnlib.testing import make_qkv, rel_error

__all__ = ["ApproxConfig", "approx_error", "approx_markdown", "approx_plots", "discover_knobs", "run_approx"]


@dataclass
class ApproxConfig:
    """Settings of the approx mode (the ``approx:`` section of the Hydra config)."""

    n: list[int] = field(default_factory=lambda: [128, 512, 2048])
    logit_scale: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    knob_n: int = 512
    causal: list[bool] = field(default_factory=lambda: [False])
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float64"
    device: str = "cpu"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    grads: bool = True
    knobs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    fallback_knobs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    threads: int | None = 2
    progress: bool = True


def discover_knobs(
    spec: MethodSpec,
    override: dict[str, list[Any]] | None = None,
    fallback: dict[str, list[Any]] | None = None,
) -> tuple[dict[str, list], list[str]]:
    """The variant's knobs: ``override`` (the user's), else ``approximation_knobs()`` (the variant's
    own declaration), else ``fallback`` (the config's guess for variants that declare none).

    Returns (knobs, notes); knobs the constructor does not accept are dropped with a note.
    """
    cls = spec.core_class()
    knobs = dict(override or cls.approximation_knobs() or fallback or {})
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    notes = []
    for k in list(knobs):
        if not takes_any and k not in params:
            notes.append(f"{spec.label}: knob {k!r} is not a constructor argument; dropped")
            del knobs[k]
        elif not isinstance(knobs[k], (list, tuple)) or not knobs[k]:
            notes.append(f"{spec.label}: knob {k!r} needs a non-empty list of values; dropped")
            del knobs[k]
    return knobs, notes


def approx_error(
    spec: MethodSpec,
    *,
    n: int,
    causal: bool,
    logit_scale: float,
    seed: int,
    cfg: ApproxConfig,
    kwargs: dict[str, Any] | None = None,
    ref_cache: dict[tuple, tuple[torch.Tensor, list[torch.Tensor | None]]] | None = None,
) -> dict[str, float | None]:
    """Errors of one (variant, N, causal, logit scale, seed, knob setting) vs float64 softmax.

    ``ref_cache`` (optional): float64 reference output and input gradients keyed by
    ``(N, causal, logit scale, seed)``, shared by every variant and knob setting at that point
    (the quadratic float64 reference with its backward dominates the cost at large N).
    """
    dt = dtype_of(cfg.dtype)
    q, k, v = make_qkv(
        cfg.batch, cfg.heads, n, cfg.head_dim, logit_scale=logit_scale, dtype=dt, device=cfg.device, seed=seed
    )
    g = torch.Generator().manual_seed(seed + 7)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype=dt, device=cfg.device)
    torch.manual_seed(seed)
    cls = spec.core_class()
    ctor = {**spec.ctor_kwargs(n), **(kwargs or {})}
    core = cls(num_heads=cfg.heads, head_dim=cfg.head_dim, **ctor).to(device=cfg.device, dtype=dt).eval()
    am = normalize_mask(None, causal=causal, batch=cfg.batch, heads=cfg.heads, n=n, m=n, device=q.device)
    leaves = [t.clone().requires_grad_(cfg.grads) for t in (q, k, v)]
    out = core(*leaves, am).out
    key = (n, causal, float(logit_scale), seed, cfg.grads)
    if ref_cache is not None and key in ref_cache:
        ref, ref_grads = ref_cache[key]
    else:
        ref_leaves = [t.double().clone().requires_grad_(cfg.grads) for t in (q, k, v)]
        ref = reference_attention(*ref_leaves, causal=causal)
        if cfg.grads:
            ref.backward(grad_out.double())
        ref = ref.detach()
        ref_grads = [t.grad for t in ref_leaves]
        if ref_cache is not None:
            ref_cache[key] = (ref, ref_grads)
    res: dict[str, float | None] = {"out": rel_error(out, ref) if torch.isfinite(out).all() else float("nan")}
    if cfg.grads:
        try:
            out.backward(grad_out)
            grads = [t.grad for t in leaves]
        except RuntimeError:  # not differentiable (e.g. hard hashing without a surrogate)
            grads = [None, None, None]
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            res[name] = rel_error(a, b) if a is not None and b is not None else None
        if all(gr is not None for gr in grads) and all(gr is not None for gr in ref_grads):
            a = torch.cat([gr.flatten() for gr in grads])  # type: ignore[union-attr]
            b = torch.cat([gr.flatten() for gr in ref_grads])  # type: ignore[union-attr]
            res["grad"] = rel_error(a, b)
        else:
            res["grad"] = None
    return res


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def run_approx(cfg: ApproxConfig, specs: list[MethodSpec], *, log: Any = print) -> dict[str, Any]:
    """Run the error grid for the approximate variants among ``specs``. JSON-ready result."""
    from attnlib.bench.progress import progress_bar

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    approx_specs = [s for s in specs if not s.is_baseline and not s.exact]
    notes: list[str] = [f"{s.label}: exact variant, not an approximation; skipped" for s in specs if s.exact]
    plan: list[tuple[MethodSpec, str, Any, int, bool, float]] = []
    knob_info: dict[str, dict[str, list]] = {}
    for spec in approx_specs:
        key = spec.variant or ""
        knobs, kn = discover_knobs(
            spec,
            cfg.knobs.get(spec.label) or cfg.knobs.get(key),
            cfg.fallback_knobs.get(spec.label) or cfg.fallback_knobs.get(key),
        )
        notes += kn
        knob_info[spec.label] = knobs
        for causal in cfg.causal:
            if causal and not spec.capabilities.causal:
                notes.append(f"{spec.label}: no causal support; causal points skipped")
                continue
            for n in cfg.n:
                for s in cfg.logit_scale:
                    plan.append((spec, "", None, n, causal, s))
            for knob, values in knobs.items():
                for val in values:
                    for s in cfg.logit_scale:
                        plan.append((spec, knob, val, cfg.knob_n, causal, s))
    bar = progress_bar(total=len(plan), desc="approx", enabled=cfg.progress)
    points: list[dict[str, Any]] = []
    # visit the plan grouped by (causal, N, logit scale) so that every variant and knob setting at
    # a point reuses one float64 reference (kept only while its group runs); report in plan order
    order = sorted(range(len(plan)), key=lambda i: (plan[i][4], plan[i][3], plan[i][5]))
    ref_cache: dict[tuple, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}
    group: tuple | None = None
    by_index: dict[int, dict[str, Any]] = {}
    for idx in order:
        spec, knob, val, n, causal, s = plan[idx]
        if (causal, n, s) != group:
            group = (causal, n, s)
            ref_cache.clear()
        bar.set_description(f"approx {spec.label} N={n} scale={s}" + (f" {knob}={val}" if knob else ""))
        per_seed: list[dict[str, Any]] = []
        err_msg = ""
        for seed in cfg.seeds:
            try:
                per_seed.append(
                    approx_error(
                        spec,
                        n=n,
                        causal=causal,
                        logit_scale=s,
                        seed=seed,
                        cfg=cfg,
                        kwargs={knob: val} if knob else None,
                        ref_cache=ref_cache,
                    )
                )
            except Exception as e:
                err_msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                break
        bar.update(1)
        p: dict[str, Any] = {
            "method": spec.label,
            "knob": knob or None,
            "value": val,
            "n": n,
            "causal": causal,
            "logit_scale": s,
            "seeds": len(per_seed),
            "trainable": spec.capabilities.trainable,
        }
        if err_msg:
            p.update(status="error", reason=err_msg)
        else:
            p["status"] = "ok"
            for key in ("out", "dq", "dk", "dv", "grad"):
                p[f"err_{key}"] = _mean([r.get(key) for r in per_seed])
        by_index[idx] = p
    bar.close()
    points = [by_index[i] for i in range(len(plan))]
    for line in notes:
        log(f"[attnlib-bench] {line}")
    return {
        "points": points,
        "knobs": knob_info,
        "notes": notes,
        "methods": [s.describe() for s in approx_specs],
        "wall_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def approx_markdown(result: dict[str, Any], *, title: str, command: str, notes: list[str] | None = None) -> str:
    """Tables: summary at (knob_n, scale 1), error vs N x logit scale, error vs each knob."""
    cfg = result.get("settings", {})
    pts = [p for p in result["points"]]
    parts = [header(title, result["machine"], command, notes or [])]
    parts.append(
        f"Relative error vs exact softmax attention (float64 reference), B={cfg.get('batch')}, "
        f"H={cfg.get('heads')}, d={cfg.get('head_dim')}, computed in {cfg.get('dtype')}, mean over seeds "
        f"{cfg.get('seeds')}. Inputs: Gaussian q/k whose logits q·k/√d have standard deviation `logit scale`. "
        "`out` = output error; `grad` = error of (dq, dk, dv) together for a Gaussian upstream gradient. "
        "Variants marked * have trainable parameters and are evaluated at initialisation (untrained)."
    )
    if result.get("notes"):
        parts.append("\n" + "\n".join(f"- {x}" for x in result["notes"]))
    if not pts:
        parts.append("\nNo approximate variant is registered in this run.")
        return "\n".join(parts) + "\n"
    methods = list(dict.fromkeys(p["method"] for p in pts))
    base = [p for p in pts if p["knob"] is None]
    ns = sorted({p["n"] for p in base})
    scales = sorted({p["logit_scale"] for p in pts})
    for causal in sorted({p["causal"] for p in pts}):
        parts.append(f"\n## Output / gradient error vs N ({'causal' if causal else 'non-causal'}, default settings)\n")
        rows = []
        for m in methods:
            for s in scales:
                by = {p["n"]: p for p in base if p["method"] == m and p["logit_scale"] == s and p["causal"] == causal}
                if not by:
                    continue
                star = "*" if next(iter(by.values()))["trainable"] else ""
                cells = []
                for n in ns:
                    p = by.get(n)
                    if p is None:
                        cells.append("")
                    elif p["status"] != "ok":
                        cells.append("error")
                    else:
                        cells.append(f"{fmt_err(p.get('err_out'))} / {fmt_err(p.get('err_grad'))}")
                rows.append([f"`{m}`{star}", s, *cells])
        parts.append(markdown_table(["method", "logit scale", *[f"N={n} out / grad" for n in ns]], rows))
    knobbed = [p for p in pts if p["knob"] is not None]
    if knobbed:
        parts.append(f"\n## Error vs approximation knob (N={cfg.get('knob_n')}; output error / gradient error)\n")
        rows = []
        for m in methods:
            for knob in dict.fromkeys(p["knob"] for p in knobbed if p["method"] == m):
                sub = [p for p in knobbed if p["method"] == m and p["knob"] == knob]
                for val in dict.fromkeys(p["value"] for p in sub):
                    cells = []
                    for s in scales:
                        p = next((x for x in sub if x["value"] == val and x["logit_scale"] == s), None)
                        if p is None:
                            cells.append("")
                        elif p["status"] != "ok":
                            cells.append("error")
                        else:
                            cells.append(f"{fmt_err(p.get('err_out'))} / {fmt_err(p.get('err_grad'))}")
                    rows.append([f"`{m}`", f"{knob}={val}", *cells])
        parts.append(markdown_table(["method", "setting", *[f"scale {s}" for s in scales]], rows))
    errs = sorted(
        {
            f"`{p['method']}` ({p.get('knob') or 'default'}, N={p['n']}): {p['reason']}"
            for p in pts
            if p["status"] != "ok"
        }
    )
    if errs:
        parts.append("\nErrors:\n" + "\n".join(f"- {e}" for e in errs))
    return "\n".join(parts) + "\n"


def approx_plots(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Error vs N (panel per logit scale, line per variant) and error vs each knob."""
    pts = [p for p in result["points"] if p["status"] == "ok"]
    written: list[Path] = []
    base = [p for p in pts if p["knob"] is None]
    for key, label in (("err_out", "output"), ("err_grad", "input-gradient")):
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        for p in sorted(base, key=lambda p: p["n"]):
            ptitle = f"logit scale {p['logit_scale']}" + (" · causal" if p["causal"] else "")
            xs, ys = panels.setdefault(ptitle, {}).setdefault(p["method"], ([], []))
            xs.append(p["n"])
            ys.append(p.get(key))
        out = plot_lines(
            out_dir / f"{name}_{'error' if key == 'err_out' else 'grad_error'}_vs_n.png",
            panels,
            xlabel="sequence length N",
            ylabel=f"relative {label} error vs softmax",
            title=f"{label} error vs N (float64, default settings)",
        )
        if out:
            written.append(out)
    knobbed = [p for p in pts if p["knob"] is not None]
    panels = {}
    for p in knobbed:
        if not isinstance(p["value"], (int, float)) or isinstance(p["value"], bool):
            continue
        ptitle = f"{p['method']}: {p['knob']}" + (" · causal" if p["causal"] else "")
        xs, ys = panels.setdefault(ptitle, {}).setdefault(f"scale {p['logit_scale']}", ([], []))
        xs.append(p["value"])
        ys.append(p.get("err_out"))
    out = plot_lines(
        out_dir / f"{name}_error_vs_knob.png",
        panels,
        xlabel="knob value",
        ylabel="relative output error vs softmax",
        title=f"output error vs approximation knob (N={result.get('settings', {}).get('knob_n')})",
    )
    if out:
        written.append(out)
    return written
