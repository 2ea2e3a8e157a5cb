"""``attnlib-bench``: speed, approximation-error and quality benchmarks (a Hydra app).

Examples::

    attnlib-bench mode=speed variants=[softmax,local,linear,flow] n=[1024,4096]
    attnlib-bench bench=cpu_full                 # the committed CPU speed table
    attnlib-bench bench=approx_full              # approximation error vs N / logit scale / knobs
    attnlib-bench bench=quality_cpu              # trains variants through attnlib-train
    attnlib-bench bench=gpu_quick                # H100-sized preset (needs CUDA)
    attnlib-bench --compare benchmarks/results/<machine>/speed.json   # regression gate
    attnlib-bench mode=compare compare=old.json current=new.json      # gate two saved runs
    attnlib-bench mode=render current=benchmarks/results/<machine>/speed.json   # redo markdown + plots

Configs: ``attnlib/configs/bench/`` (``config.yaml`` and the presets). Results go to
``benchmarks/results/<machine>/<name>.{md,json}`` plus ``<name>_*.png`` plots.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIG_ROOT", "main", "run"]

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def _container(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        out = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(out, dict)
        return {k: v for k, v in out.items() if k != "hydra"}
    return dict(cfg)


def _fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _command_line(overrides: list[str] | None) -> str:
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ValueError, ImportError):
            overrides = []
    return " ".join(["attnlib-bench", *overrides])


def run(cfg: DictConfig | dict[str, Any], *, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one mode of the benchmark from a composed config; write and return its results.

    Returns the result dict with ``paths`` (written files) and, with ``compare``, ``regressions``.
    """
    import torch

    from attnlib.bench.machine import load_average, machine_info, machine_slug
    from attnlib.bench.report import write_json

    c = _container(cfg)
    mode = str(c.get("mode", "speed"))
    if mode not in ("speed", "approx", "quality", "compare", "render"):
        raise ValueError(f"mode must be speed, approx, quality, compare or render, got {mode!r}")
    if mode == "render":
        return _render_only(c)
    threads = c.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    speed_raw = dict(c.get("speed") or {})
    if mode == "speed":
        devices = [str(d) for d in speed_raw.get("device") or ["cpu"]]
        runnable = [d for d in devices if not d.startswith("cuda") or torch.cuda.is_available()]
        if not runnable:
            raise ValueError(
                f"speed.device={devices} but CUDA is not available on this machine: nothing can be measured "
                "(the GPU preset bench=gpu_quick needs a CUDA device); no results were written"
            )
    device0 = (speed_raw.get("device") or ["cpu"])[0] if mode == "speed" else "cpu"
    machine = c.get("machine") or "auto"
    if machine == "auto":
        machine = machine_slug(str(device0), threads)
    out_dir = Path(c["out_dir"]) if c.get("out_dir") else Path("benchmarks") / "results" / machine
    name = c.get("name") or mode
    command = _command_line(overrides)
    info = machine_info(threads)
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result: dict[str, Any] = {"mode": mode, "machine": info, "command": command, "config": c}
    paths: list[Path] = []
    if mode == "compare":
        return _compare_only(c, out_dir, name, result)
    checkpoint = out_dir / f"{name}.partial.jsonl"
    if mode == "speed":
        if speed_raw.get("resume", True):
            speed_raw["checkpoint"] = str(checkpoint)
        _run_speed(c, speed_raw, result)
    elif mode == "approx":
        _run_approx(c, result)
    else:
        _run_quality(c, out_dir, result)
    info["loadavg_end"] = load_average()
    md, plots = _render(mode, result, out_dir, name, command, bool(c.get("plots", True)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(md)
    write_json(out_dir / f"{name}.json", result)
    paths += [out_dir / f"{name}.md", out_dir / f"{name}.json", *plots]
    print(f"[attnlib-bench] wrote {', '.join(str(p) for p in paths)}")
    checkpoint.unlink(missing_ok=True)  # the run finished: its rows are in the JSON
    result["paths"] = [str(p) for p in paths]
    if mode == "speed" and c.get("compare"):
        result["regressions"] = _gate(c, result["rows"], out_dir, name, result)
    return result


def _run_speed(c: dict[str, Any], raw: dict[str, Any], result: dict[str, Any]) -> None:
    from attnlib.bench.methods import set_flex_dynamic
    from attnlib.bench.speed import SpeedConfig, resolve_methods, run_speed

    if c.get("n") is not None:
        raw["n"] = list(c["n"])
    raw.setdefault("threads", c.get("threads"))
    raw["threads"] = c.get("threads")
    raw["seed"] = c.get("seed", 0)
    raw["progress"] = c.get("progress", True)
    scfg = SpeedConfig(**_fields(SpeedConfig, raw))
    set_flex_dynamic(bool(raw.get("flex_dynamic", False)))
    methods, skipped = resolve_methods(
        c.get("variants"),
        baselines=raw.get("baselines", ["sdpa", "flex"]),
        extra_variants=c.get("extra_variants") or {},
        variant_kwargs=c.get("variant_kwargs") or {},
        flex_same_mask=bool(raw.get("flex_same_mask", True)),
        block_densities=raw.get("block_densities") or [],
        block_density_methods=raw.get("block_density_methods") or ["flex"],
        head_dim=scfg.head_dim[0],
    )
    result["settings"] = dataclasses.asdict(scfg)
    result["methods"] = [m.describe() for m in methods]
    result["skipped_variants"] = skipped
    result.update(run_speed(scfg, methods))


def _run_approx(c: dict[str, Any], result: dict[str, Any]) -> None:
    from attnlib.bench.approx import ApproxConfig, run_approx
    from attnlib.bench.methods import MethodSpec
    from attnlib.registry import available

    raw = dict(c.get("approx") or {})
    if c.get("n") is not None:
        raw["n"] = list(c["n"])
    raw["threads"] = c.get("threads")
    raw["progress"] = c.get("progress", True)
    acfg = ApproxConfig(**_fields(ApproxConfig, raw))
    specs, skipped = [], {}
    extra = c.get("extra_variants") or {}
    for name in c.get("variants") or available():
        try:
            spec = MethodSpec.parse(str(name), extra)
        except ValueError as e:
            skipped[str(name)] = str(e)
            print(f"[attnlib-bench] skipping {name!r}: {e}")
            continue
        spec.kwargs = {**(c.get("variant_kwargs") or {}).get(spec.variant or "", {}), **spec.kwargs}
        specs.append(spec)
    result["settings"] = dataclasses.asdict(acfg)
    result["skipped_variants"] = skipped
    result.update(run_approx(acfg, specs))


def _run_quality(c: dict[str, Any], out_dir: Path, result: dict[str, Any]) -> None:
    from attnlib.bench.quality import QualityConfig, run_quality
    from attnlib.registry import available

    raw = dict(c.get("quality") or {})
    raw["progress"] = c.get("progress", True)
    qcfg = QualityConfig(**_fields(QualityConfig, raw))
    variants = [str(v) for v in (c.get("variants") or qcfg.variants)]
    runs_dir = Path(qcfg.runs_dir) if qcfg.runs_dir else out_dir / "quality_runs"
    result["settings"] = dataclasses.asdict(qcfg)
    result.update(run_quality(qcfg, variants, runs_dir, registered=available()))


def _render(mode: str, result: dict[str, Any], out_dir: Path, name: str, command: str, plots: bool) -> tuple[str, list]:
    from attnlib.bench import approx, quality, report

    titles = {
        "speed": "attnlib speed and memory beside SDPA and FlexAttention",
        "approx": "attnlib approximation error vs exact softmax attention",
        "quality": "attnlib quality: variants trained on small tasks",
    }
    title = f"{titles[mode]} ({out_dir.name})"
    notes = []
    written: list[Path] = []
    if plots:
        plotter = {"speed": report.speed_plots, "approx": approx.approx_plots, "quality": quality.quality_plots}[mode]
        written = plotter(result, out_dir, name)
        if not written and (result.get("rows") or result.get("points") or result.get("table")):
            notes.append("plots skipped (matplotlib missing or nothing to plot)")
    for p in written:
        notes.append(f"plot: [{p.name}]({p.name})")
    if mode == "speed":
        md = report.speed_markdown(result, title=title, command=command, notes=notes)
    elif mode == "approx":
        md = approx.approx_markdown(result, title=title, command=command, notes=notes)
    else:
        md = quality.quality_markdown(result, title=title, command=command, notes=notes)
    return md, written


def _gate(c: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path, name: str, result: dict[str, Any]) -> int:
    from attnlib.bench.compare import compare_markdown, compare_rows, load_rows
    from attnlib.bench.report import write_json

    reg = c.get("regression") or {}
    rel, floor = float(reg.get("rel_tol", 0.05)), float(reg.get("abs_floor_s", 30e-6))
    old = load_rows(c["compare"])
    verdicts = compare_rows(old, rows, rel_tol=rel, abs_floor_s=floor)
    md = compare_markdown(verdicts, against=str(c["compare"]), rel_tol=rel, abs_floor_s=floor)
    (out_dir / f"{name}_compare.md").write_text(md)
    write_json(out_dir / f"{name}_compare.json", {"against": str(c["compare"]), "verdicts": verdicts})
    print(md)
    n_reg = sum(v["verdict"] == "REGRESSION" for v in verdicts)
    result["compare_verdicts"] = verdicts
    return n_reg


def _compare_only(c: dict[str, Any], out_dir: Path, name: str, result: dict[str, Any]) -> dict[str, Any]:
    from attnlib.bench.compare import load_rows

    if not c.get("compare") or not c.get("current"):
        raise ValueError("mode=compare needs compare=<older results.json> and current=<newer results.json>")
    out_dir = Path(c["out_dir"]) if c.get("out_dir") else Path(c["current"]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result["regressions"] = _gate(c, load_rows(c["current"]), out_dir, name, result)
    return result


def _render_only(c: dict[str, Any]) -> dict[str, Any]:
    """``mode=render current=<results.json>``: rewrite the markdown and plots of a saved run."""
    import json

    if not c.get("current"):
        raise ValueError("mode=render needs current=<results.json> (a file written by attnlib-bench)")
    path = Path(c["current"])
    if not path.exists():
        raise FileNotFoundError(f"mode=render: no such results file {str(path)!r}")
    result = json.loads(path.read_text())
    mode = result.get("mode")
    if mode not in ("speed", "approx", "quality"):
        raise ValueError(f"{str(path)!r} is not a speed/approx/quality results file (mode={mode!r})")
    out_dir = path.parent
    md, plots = _render(
        mode, result, out_dir, path.stem, result.get("command", "attnlib-bench"), bool(c.get("plots", True))
    )
    (out_dir / f"{path.stem}.md").write_text(md)
    result["paths"] = [str(out_dir / f"{path.stem}.md"), *map(str, plots)]
    print(f"[attnlib-bench] wrote {', '.join(result['paths'])}")
    return result


def _translate_argv(argv: list[str]) -> list[str]:
    """``--compare X`` / ``--compare=X`` -> the Hydra override ``compare=X``."""
    out: list[str] = []
    it = iter(range(len(argv)))
    skip = False
    for i in it:
        if skip:
            skip = False
            continue
        a = argv[i]
        if a == "--compare":
            if i + 1 >= len(argv):
                raise SystemExit("attnlib-bench: --compare needs a path to a saved results JSON")
            out.append(f"compare={argv[i + 1]}")
            skip = True
        elif a.startswith("--compare="):
            out.append("compare=" + a.split("=", 1)[1])
        else:
            out.append(a)
    return out


def _hydra_entry() -> None:
    import hydra

    @hydra.main(version_base=None, config_path=str(CONFIG_ROOT), config_name="bench/config")
    def _app(cfg: DictConfig) -> None:
        from attnlib.bench.quality import TrainAppNotFoundError

        try:
            result = run(cfg)
        except (TrainAppNotFoundError, FileNotFoundError, ValueError) as e:
            print(f"attnlib-bench: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        n_reg = result.get("regressions") or 0
        if n_reg and (cfg.get("regression") or {}).get("fail", True):
            print(f"attnlib-bench: {n_reg} row(s) regressed", file=sys.stderr)
            raise SystemExit(1)

    _app()


def main() -> None:
    """Console entry point (``attnlib-bench``)."""
    sys.argv = [sys.argv[0], *_translate_argv(sys.argv[1:])]
    _hydra_entry()


if __name__ == "__main__":  # pragma: no cover
    main()
