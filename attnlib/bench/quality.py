"""Quality mode: train chosen variants on small tasks with ``attnlib-train`` and tabulate the results.

There is no training loop here. Each (task, variant, seed) runs the training app as a
subprocess::

    attnlib-train experiment=<experiment> attention=<variant> trainer.max_steps=<steps> seed=<seed> \
        hydra.run.dir=<runs_dir>/<task>/<variant>/seed<seed> [task overrides] [variant overrides]

and reads the ``results.json`` it writes into its run directory (flat keys such as
``test_accuracy``, ``test_bpc``, ``train_seconds`` and a parameter count). With ``resume`` an
existing ``results.json`` is reused and a run stopped before writing it continues from its
checkpoint (``resume=true``), so an interrupted table resumes where it stopped. The
command is configurable (``quality.train_command``), which is how the tests drive a stub.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlib.bench.report import header, markdown_table

__all__ = [
    "QualityConfig",
    "TrainAppNotFoundError",
    "find_train_command",
    "quality_markdown",
    "quality_plots",
    "run_quality",
]

PARAM_KEYS = ("params", "num_params", "n_params", "param_count", "parameters", "num_parameters")
LOWER_IS_BETTER = ("bpc", "loss", "ppl", "perplexity", "wer", "cer", "error")


class TrainAppNotFoundError(FileNotFoundError):
    """``attnlib-train`` (or the configured command) is not installed."""


@dataclass
class QualityConfig:
    """Settings of the quality mode (the ``quality:`` section of the Hydra config).

    ``tasks`` maps a table column to ``{"experiment": name, "metric": key in results.json,
    "overrides": [extra Hydra overrides], "steps": optional step budget of that task (default
    ``steps``)}``. Runs live in ``<runs_dir>/<task>/<variant>/steps<S>-seed<k>``.
    """

    train_command: list[str] = field(default_factory=lambda: ["attnlib-train"])
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 300
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: ["softmax", "local"])
    variant_overrides: dict[str, list[str]] = field(default_factory=dict)
    extra_overrides: list[str] = field(default_factory=list)
    timeout_s: float = 3600.0
    resume: bool = True
    runs_dir: str | None = None
    progress: bool = True


def find_train_command(cmd: list[str]) -> list[str]:
    """Resolve the training command; raise :class:`TrainAppNotFoundError` with what to do when missing."""
    if not cmd:
        raise ValueError("quality.train_command is empty; expected e.g. [attnlib-train]")
    exe = cmd[0]
    if os.sep in exe or (os.altsep and os.altsep in exe):
        found = exe if Path(exe).exists() else None
    else:
        found = shutil.which(exe)
        if found is None:  # console scripts live next to the interpreter of a venv that is not activated
            cand = Path(sys.executable).parent / exe
            found = str(cand) if cand.exists() else None
    if found is None:
        raise TrainAppNotFoundError(
            f"quality mode: the training app {exe!r} was not found (not on PATH, not next to {sys.executable}). "
            "The quality table is produced by running `attnlib-train experiment=<task> attention=<variant> ...` "
            "(the Hydra training app of attnlib's models/training issue); install an attnlib that provides it "
            "(`make setup`), or point quality.train_command at another command, e.g. "
            "quality.train_command='[python,-m,attnlib.cli.train]'."
        )
    return [found, *cmd[1:]]


def _metric(results: dict[str, Any], wanted: str | None) -> tuple[str | None, float | None]:
    if wanted and results.get(wanted) is not None:
        return wanted, float(results[wanted])
    for k in ("test_accuracy", "test_bpc", "test_acc", "accuracy", "bpc", "val_accuracy", "val_bpc"):
        if results.get(k) is not None:
            return k, float(results[k])
    return wanted, None


def _params(results: dict[str, Any]) -> int | None:
    for k in PARAM_KEYS:
        if results.get(k) is not None:
            return int(results[k])
    return None


def run_quality(
    cfg: QualityConfig,
    variants: list[str],
    runs_dir: Path,
    *,
    registered: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train every (task, variant, seed) through the training app and collect its results.json."""
    from attnlib.bench.progress import progress_bar

    if not cfg.tasks:
        raise ValueError("quality mode needs at least one task (quality.tasks)")
    cmd = find_train_command(list(cfg.train_command))
    skipped: dict[str, str] = {}
    if registered is not None:
        for v in variants:
            if v not in registered:
                skipped[v] = f"not registered here (available: {', '.join(registered)})"
                log(f"[attnlib-bench] skipping {v!r}: {skipped[v]}")
        variants = [v for v in variants if v not in skipped]
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    plan = [(t, v, s) for t in cfg.tasks for v in variants for s in cfg.seeds]
    bar = progress_bar(total=len(plan), desc="quality", enabled=cfg.progress)
    for task, variant, seed in plan:
        spec = cfg.tasks[task] or {}
        experiment = spec.get("experiment", task)
        steps = int(spec.get("steps", cfg.steps))
        run_dir = runs_dir / task / variant / f"steps{steps}-seed{seed}"  # another budget never reuses a run
        res_path = run_dir / "results.json"
        argv = [
            *cmd,
            f"experiment={experiment}",
            f"attention={variant}",
            f"trainer.max_steps={steps}",
            f"seed={seed}",
            f"hydra.run.dir={run_dir}",
            *(["resume=true"] if cfg.resume else []),  # a run interrupted before its results continues
            *[str(o) for o in spec.get("overrides", []) or []],
            *[str(o) for o in cfg.variant_overrides.get(variant, []) or []],
            *[str(o) for o in cfg.extra_overrides],
        ]
        bar.set_description(f"quality {task} {variant} seed={seed}")
        rec: dict[str, Any] = {"task": task, "experiment": experiment, "variant": variant, "seed": seed}
        rec["command"] = " ".join(argv)
        wall = None
        if not (cfg.resume and res_path.exists()):
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "train.log"
            start = time.perf_counter()
            try:
                with open(log_path, "w") as fh:
                    proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=cfg.timeout_s, check=False)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - start
            if rc != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
                rec.update(status="error", reason=f"exit {rc}; log {log_path}: " + " | ".join(tail)[-300:], wall_s=wall)
                runs.append(rec)
                bar.update(1)
                continue
        if not res_path.exists():
            rec.update(status="error", reason=f"no {res_path} written", wall_s=wall)
            runs.append(rec)
            bar.update(1)
            continue
        try:
            results = json.loads(res_path.read_text())
        except json.JSONDecodeError as e:
            rec.update(status="error", reason=f"{res_path}: bad JSON ({e})")
            runs.append(rec)
            bar.update(1)
            continue
        key, value = _metric(results, spec.get("metric"))
        rec.update(
            status="ok" if value is not None else "error",
            reason="" if value is not None else f"metric {spec.get('metric')!r} not in results.json: {sorted(results)}",
            metric=key,
            value=value,
            train_seconds=results.get("train_seconds"),
            wall_s=wall,
            params=_params(results),
            results=results,
        )
        runs.append(rec)
        bar.update(1)
    bar.close()
    return {
        "runs": runs,
        "table": aggregate(runs),
        "skipped_variants": skipped,
        "command": cmd,
        "wall_s": time.perf_counter() - t0,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean / std over seeds per (task, variant)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    out = []
    for (task, variant), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        vals = [r["value"] for r in ok]
        secs = [r.get("train_seconds") or r.get("wall_s") for r in ok]
        secs = [s for s in secs if s is not None]
        out.append(
            {
                "task": task,
                "variant": variant,
                "metric": ok[0]["metric"] if ok else None,
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "seeds": len(ok),
                "failed": len(rs) - len(ok),
                "train_seconds": statistics.fmean(secs) if secs else None,
                "params": next((r.get("params") for r in ok if r.get("params") is not None), None),
            }
        )
    return out


def _fmt_metric(metric: str | None, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "FAILED"
    pct = metric is not None and "acc" in metric and mean <= 1.0
    v = f"{mean * 100:.1f} %" if pct else f"{mean:.3f}"
    if std is not None:
        v += f" ± {std * 100:.1f}" if pct else f" ± {std:.3f}"
    return v


def _fmt_params(p: int | None) -> str:
    if p is None:
        return "?"
    return f"{p / 1e6:.2f}M" if p >= 1e5 else f"{p / 1e3:.1f}k"


def quality_markdown(result: dict[str, Any], *, title: str, command: str, notes: list[str] | None = None) -> str:
    """One table: rows = variants, columns = tasks; each cell "metric (train time, params)"."""
    cfg = result.get("settings", {})
    table = result["table"]
    tasks = list(dict.fromkeys(r["task"] for r in table))
    variants = list(dict.fromkeys(r["variant"] for r in table))
    by = {(r["task"], r["variant"]): r for r in table}
    parts = [header(title, result["machine"], command, notes or [])]
    task_steps = {t: (cfg.get("tasks", {}).get(t) or {}).get("steps", cfg.get("steps")) for t in tasks}
    if len(set(task_steps.values())) == 1:
        budget = f"{next(iter(task_steps.values()))} steps"
    else:
        budget = "a fixed number of steps per task (" + ", ".join(f"{t}: {s}" for t, s in task_steps.items()) + ")"
    parts.append(
        f"Each variant trained with `attnlib-train` for {budget} (fixed budget), seeds "
        f"{cfg.get('seeds')}; cell = test metric (mean ± std over seeds) · training time · parameters. "
        "↑ higher is better, ↓ lower is better."
    )
    if result.get("skipped_variants"):
        parts.append("\nNot in this run: " + ", ".join(f"`{k}` ({v})" for k, v in result["skipped_variants"].items()))
    head = ["variant"]
    for t in tasks:
        metric = next((by[(t, v)]["metric"] for v in variants if (t, v) in by and by[(t, v)]["metric"]), None)
        arrow = "↓" if metric and any(x in metric for x in LOWER_IS_BETTER) else "↑"
        head.append(f"{t} ({metric or '?'} {arrow})")
    rows = []
    for v in variants:
        cells = [f"`{v}`"]
        for t in tasks:
            r = by.get((t, v))
            if r is None:
                cells.append("")
                continue
            secs = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") is not None else "? s"
            cells.append(f"{_fmt_metric(r['metric'], r['mean'], r['std'])} · {secs} · {_fmt_params(r['params'])}")
        rows.append(cells)
    parts.append("\n" + markdown_table(head, rows))
    errs = [r for r in result["runs"] if r.get("status") != "ok"]
    if errs:
        parts.append(
            "\nFailed runs:\n"
            + "\n".join(f"- {r['task']} / `{r['variant']}` seed {r['seed']}: {r['reason']}" for r in errs)
        )
    return "\n".join(parts) + "\n"


def quality_plots(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """A bar chart per task (metric by variant)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    table = [r for r in result["table"] if r["mean"] is not None]
    tasks = list(dict.fromkeys(r["task"] for r in table))
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        rs = [r for r in table if r["task"] == t]
        ax.bar([r["variant"] for r in rs], [r["mean"] for r in rs], yerr=[r["std"] or 0 for r in rs])
        ax.set_title(f"{t} ({rs[0]['metric']})", fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
