"""Writing results: markdown tables, JSON (with machine info) and matplotlib plots.

Every mode writes ``<out_dir>/<name>.md``, ``<out_dir>/<name>.json`` and ``<name>_*.png``
(``out_dir`` defaults to ``benchmarks/results/<machine>/``). Plots need matplotlib; without it
the tables are still written and a note says the plots were skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "fmt_bytes_mb",
    "fmt_err",
    "fmt_time",
    "header",
    "markdown_table",
    "plot_lines",
    "speed_markdown",
    "speed_plots",
    "write_json",
]


def markdown_table(header_row: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(str(h) for h in header_row) + " |", "|" + "---|" * len(header_row)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (NaN/inf become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1, default=str) + "\n")


def fmt_time(s: float | None) -> str:
    """Seconds -> "12.3 ms" / "1.23 s" / "45 µs"."""
    if s is None or not math.isfinite(s):
        return "–"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_err(e: float | None) -> str:
    """An error as "3.1e-07" ("–" if missing)."""
    if e is None:
        return "–"
    if isinstance(e, float) and math.isnan(e):
        return "NaN"
    return f"{e:.1e}"


def fmt_bytes_mb(mb: float | None) -> str:
    """MiB with sensible precision."""
    if mb is None:
        return "–"
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.3g}"


def header(title: str, info: dict[str, Any], command: str, notes: Sequence[str] = ()) -> str:
    """The markdown preamble: title, machine, software, command and caveats."""
    gpu = f", GPU `{info['gpu']}`" if info.get("gpu") else ", no GPU"
    load = info.get("loadavg")
    load_end = info.get("loadavg_end")
    lines = [
        f"# {title}",
        "",
        f"Machine: CPU `{info.get('cpu')}` ({info.get('cores')} cores, {info.get('threads')} torch threads, "
        f"{info.get('cpu_capability')}){gpu}; torch {info.get('torch')}, triton {info.get('triton')}, "
        f"Python {info.get('python')}; commit `{info.get('commit')}`; {info.get('date', '')}.",
    ]
    if load:
        lines.append(
            f"Load average (1/5/15 min) at start {load}" + (f", at end {load_end}" if load_end else "") + ". "
            "Numbers from a shared or loaded machine are provisional; rerun the command below on a quiet one."
        )
    lines += ["", f"Regenerate: `{command}`", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + ("\n" if notes else "")


# ------------------------------------------------------------------------------------------
# speed
# ------------------------------------------------------------------------------------------

_ORDER = {"baseline": 0, "exact": 1, "approx": 2}


def _method_order(rows: Sequence[dict[str, Any]], declared: Sequence[str] = ()) -> list[str]:
    """Baselines, then exact, then approximate methods; within a kind, the declared order."""
    pos = {m: i for i, m in enumerate(declared)}
    seen: dict[str, tuple[int, int, int]] = {}
    for i, r in enumerate(rows):
        if r["method"] not in seen:
            seen[r["method"]] = (_ORDER.get(r.get("kind", ""), 3), pos.get(r["method"], len(pos)), i)
    return sorted(seen, key=lambda m: seen[m])


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["device"], r["dtype"], r["head_dim"], r["causal"], r["pass"]), []).append(r)
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return f"{r['status']}"
    t = fmt_time(r.get("median_s"))
    ratio = r.get("ratio_sdpa")
    return f"{t} ({ratio:.2f}×)" if ratio is not None and r["method"] != "sdpa" else t


def _crossover_text(c: dict[str, Any]) -> str:
    if c["status"] == "unknown":
        return "–"
    if c["status"] == "always":
        return f"≤ {c['n']} (faster at every N)"
    if c["status"] == "never":
        return f"> {max(c['ns'])} (not faster)"
    return f"≈ {c['n_interp']:.0f} (first win at {c['n']})"


def speed_markdown(result: dict[str, Any], *, title: str, command: str, notes: Sequence[str] = ()) -> str:
    """The speed report: gate, crossover table, then per (device, dtype, d, causal, pass) time/memory tables."""
    info = result["machine"]
    rows = result["rows"]
    cfg = result.get("settings", {})
    parts = [header(title, info, command, notes)]
    parts.append(
        f"B={cfg.get('batch')}, H={cfg.get('heads')}; inputs: Gaussian q/k with logit std 1 "
        "(`attnlib.testing.make_qkv`). **time**: median of "
        f">= {cfg.get('runs')} timed runs after warm-up ({_timer_text(rows)}); `(k×)` = time / SDPA time "
        "at the same point (< 1 is faster; on CPU from SDPA runs interleaved with the method's in the same "
        "process"
        + (
            f", above N={cfg.get('pair_sdpa_max_n')} from the SDPA row of that point"
            if cfg.get("pair_sdpa_max_n") is not None
            else ""
        )
        + "). **memory**: "
        + (
            "peak RSS growth of one call in a fresh process (after one warm-up call), MiB. "
            if not any(str(d).startswith("cuda") for d in cfg.get("device", []))
            else "`max_memory_allocated` growth during one call, MiB. "
        )
        + "**error**: relative error (Frobenius) of the output on the first and last "
        f"{cfg.get('error_rows')} query rows vs float64 softmax attention; exact methods are compared under "
        "their own mask (e.g. the sliding window of `local`) and must pass FlexAttention's rule "
        "(<= 10× the error of eager attention at the same dtype; 2× for fp16/bf16), approximate "
        "ones are compared with plain softmax. FAILED rows are not timed. FLOPs follow the "
        "FlashAttention convention (4·B·H·N²·D, ×0.5 causal, ×3.5 fwd+bwd)."
    )
    skipped = result.get("skipped_variants") or {}
    if skipped:
        parts.append("\nNot in this run (not registered here): " + ", ".join(f"`{k}`" for k in skipped) + ".")
    gates = result.get("gates") or []
    if gates:
        parts.append("\n## Correctness gate (exact variants, float64, N=" + str(cfg.get("gate_n")) + ")\n")
        parts.append(
            markdown_table(
                ["method", "device", "d", "causal", "max error vs float64", "verdict"],
                [
                    [
                        g["method"],
                        g["device"],
                        g["head_dim"],
                        g["causal"],
                        fmt_err(g.get("error_max")),
                        {True: "pass", False: "**FAILED**", None: "not run"}[g["ok"]]
                        + (f" ({g['message'][:120]})" if g.get("message") else ""),
                    ]
                    for g in gates
                ],
            )
        )
    cross = result.get("crossovers") or []
    if cross:
        win = cross[0].get("win_below", 0.95)
        parts.append("\n## Crossover: N from which each method is faster than SDPA\n")
        parts.append(
            f"Faster = time <= {win:g} × SDPA at that N and at every larger N measured (a margin so that "
            "timing noise does not make a crossover); `≈` interpolates log(time ratio) linearly in log N.\n"
        )
        parts.append(
            markdown_table(
                [
                    "method",
                    "device",
                    "dtype",
                    "d",
                    "causal",
                    "pass",
                    "faster than SDPA from N",
                    "time ratio at largest N",
                ],
                [
                    [
                        c["method"],
                        c["device"],
                        c["dtype"],
                        c["head_dim"],
                        c["causal"],
                        c["pass"],
                        _crossover_text(c),
                        f"{c['ratios'][-1]:.2f}× at {c['ns'][-1]}",
                    ]
                    for c in sorted(
                        cross, key=lambda c: (c["device"], c["dtype"], c["head_dim"], c["causal"], c["pass"])
                    )
                ],
            )
        )
    for (device, dtype, d, causal, pass_), grows in _groups(rows).items():
        ns = sorted({r["n"] for r in grows})
        by = {(r["method"], r["n"]): r for r in grows}
        methods = _method_order(grows, [m["label"] for m in result.get("methods", [])])
        kind = {r["method"]: r.get("kind", "") for r in grows}
        what = "forward + backward" if pass_ == "fwd_bwd" else "forward"
        parts.append(f"\n## {device} · {dtype} · d={d} · {'causal' if causal else 'non-causal'} · {what}\n")
        trows = []
        for m in methods:
            errs = [by[(m, n)].get("error_rel") for n in ns if (m, n) in by and by[(m, n)].get("error_rel") is not None]
            trows.append(
                [f"`{m}`", kind[m], *[_cell(by.get((m, n))) for n in ns], fmt_err(max(errs) if errs else None)]
            )
        parts.append(markdown_table(["method", "kind", *[f"N={n}" for n in ns], "max error"], trows))
        if any(r.get("mem_peak_mb") is not None for r in grows):
            parts.append("\nPeak memory (MiB):\n")
            parts.append(
                markdown_table(
                    ["method", *[f"N={n}" for n in ns]],
                    [
                        [f"`{m}`", *[fmt_bytes_mb(by[(m, n)].get("mem_peak_mb")) if (m, n) in by else "" for n in ns]]
                        for m in methods
                    ],
                )
            )
        reasons = sorted({f"`{r['method']}` {r['status']}: {r['reason']}" for r in grows if r.get("reason")})
        if reasons:
            parts.append("\n" + "\n".join(f"- {x}" for x in reasons))
    return "\n".join(parts) + "\n"


def _timer_text(rows: Sequence[dict[str, Any]]) -> str:
    timers = sorted({r["timer"] for r in rows if r.get("timer") and "single" not in r["timer"]})
    return "; ".join(timers) or "no timed rows"


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_lines(
    path: Path,
    panels: dict[str, dict[str, tuple[list[float], list[float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    logy: bool = True,
    dashed: Iterable[str] = (),
) -> Path | None:
    """One figure with a subplot per panel; each panel maps a line label to (xs, ys). None without matplotlib."""
    plt = _plt()
    if plt is None or not panels:
        return None
    dashed = set(dashed)
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}  # one colour per line label in every panel
    k = len(panels)
    cols = min(k, 2)
    nrows = math.ceil(k / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.4 * nrows), squeeze=False)
    for ax, (ptitle, lines) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in lines.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not logy)]
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="--" if label in dashed else "-",
                color=color[label],
                label=label,
            )
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    # one legend for all panels (a label has the same colour everywhere), outside the axes
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="upper left",
            bbox_to_anchor=(1.0, 0.95),
            fontsize=7,
            frameon=False,
        )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def speed_plots(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Time vs N and memory vs N (log-log), one figure per (device, dtype, d); panels per causal x pass."""
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    combos = sorted({(r["device"], r["dtype"], r["head_dim"]) for r in rows})
    written: list[Path] = []
    baselines = {r["method"] for r in rows if r.get("kind") == "baseline"}
    for device, dtype, d in combos:
        sub = [r for r in rows if (r["device"], r["dtype"], r["head_dim"]) == (device, dtype, d)]
        suffix = "" if len(combos) == 1 else f"_{device}_{dtype}_d{d}"
        for metric, ylabel, stem in (
            ("median_s", "time per call (s)", "time"),
            ("mem_peak_mb", "peak memory (MiB)", "memory"),
        ):
            panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
            for r in sorted(sub, key=lambda r: (r["pass"], r["causal"], r["n"])):
                if r.get(metric) is None:
                    continue
                ptitle = (
                    f"{'causal' if r['causal'] else 'non-causal'} · {'fwd+bwd' if r['pass'] == 'fwd_bwd' else 'fwd'}"
                )
                xs, ys = panels.setdefault(ptitle, {}).setdefault(r["method"], ([], []))
                xs.append(r["n"])
                ys.append(r[metric])
            p = plot_lines(
                out_dir / f"{name}_{stem}{suffix}.png",
                panels,
                xlabel="sequence length N",
                ylabel=ylabel,
                title=f"{stem} vs N — {device}, {dtype}, d={d}, B={result['settings'].get('batch')}, "
                f"H={result['settings'].get('heads')}",
                dashed=baselines,
            )
            if p is not None:
                written.append(p)
    return written
