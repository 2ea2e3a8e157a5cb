"""Helpers of the vision / tabular benchmark scripts: train a configuration with the library's own
trainer (``attnlib.training.train``, the same code path as ``attnlib-train``), reload the model,
count FLOPs, and write a result pair (markdown + JSON) with machine, command, date, commit and load."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, machine_info, portable_paths
from hydra import compose, initialize_config_module
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from attnlib.bench.machine import load_average
from attnlib.data import build_data
from attnlib.training.loop import load_teacher, train

__all__ = ["arguments", "compose_config", "count_flops", "finish", "start", "train_run", "train_seeds"]

REUSED: list[str] = []  # run directories whose finished training was reused (named in the result file)
NOTE: list[str] = []  # --note: where reused runs come from, written into the result file


def compose_config(overrides: list[str]) -> Any:
    """The config ``attnlib-train <overrides>`` would run."""
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def train_run(overrides: list[str], run_dir: Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """Train (or reuse a finished run in ``run_dir``) -> (model in eval mode, results, data module)."""
    cfg = compose_config([*overrides, "trainer.progress=false", "trainer.tensorboard=false"])
    res_path = run_dir / "results.json"
    if res_path.exists():
        results = json.loads(res_path.read_text())
        REUSED.append(run_dir.name)
    else:
        results = train(cfg, run_dir)
    data_cfg = dict(cfg.data)
    data_cfg.setdefault("seed", int(cfg.seed))
    data = build_data(data_cfg)
    data.ensure_setup()
    model = load_teacher(run_dir, data)
    return model, results, data


def train_seeds(name: str, overrides: list[str], steps: int, seeds: list[int], work: Path) -> list[dict[str, Any]]:
    """``overrides`` + a budget of ``steps`` (one evaluation and checkpoint, at the end), once per seed, in
    ``work/<name>_s<seed>`` -> per seed ``{"seed", "overrides", "model", "results", "data"}``."""
    runs = []
    for seed in seeds:
        budget = [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}"]
        full = [*overrides, *budget, f"seed={seed}"]
        print(f"{name} seed {seed}: attnlib-train {' '.join(full)}", flush=True)
        model, results, data = train_run(full, work / f"{name}_s{seed}")
        runs.append({"seed": seed, "overrides": full, "model": model, "results": results, "data": data})
    return runs


def arguments(doc: str, *, steps: int, seeds: str, rows: list[str] | None = None) -> argparse.Namespace:
    """The command line every training benchmark takes: --steps, --seeds, --work (and --rows)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seeds", default=seeds, help="comma-separated training seeds")
    ap.add_argument("--work", default=None, help="run directories (finished runs are reused)")
    ap.add_argument("--note", default="", help="a sentence for the result file (e.g. where reused runs come from)")
    if rows is not None:
        ap.add_argument("--rows", default=",".join(rows), help=f"some of {','.join(rows)}")
    args = ap.parse_args()
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    NOTE[:] = [args.note] if args.note else []
    return args


try:  # torch counts the fused SDPA kernels of CUDA but not the CPU one; count it like them (2 matmuls)

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

except RuntimeError:  # a torch that counts it already
    pass


def count_flops(model: nn.Module, *args: Any) -> int:
    """FLOPs of one forward (torch's flop counter: matmuls, convolutions, SDPA)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*args)
    return int(fc.get_total_flops())


def start() -> dict[str, Any]:
    """What a result file records about the run before it starts."""
    return {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_start": load_average(),
        "t0": time.perf_counter(),
    }


def finish(name: str, meta: dict[str, Any], records: Any, markdown: str, *paths: Path) -> None:
    """Write ``benchmarks/results/<name>.json`` and ``.md`` (``markdown`` below a machine line)."""
    info = machine_info()
    meta = {k: v for k, v in meta.items() if k != "t0"} | {
        "load_average_end": load_average(),
        "wall_seconds": round(time.perf_counter() - meta["t0"], 1),
        "reused_runs": list(REUSED),
        "note": " ".join(NOTE),
        "machine": info,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps(portable_paths({**meta, "records": records}, *paths), indent=2) + "\n"
    )
    head = (
        f"Machine: `{info['cpu']}`, {info['cores']} cores, torch {info['torch']}, commit {info['commit']}; "
        f"{meta['date']}; load average {meta['load_average_start']} at the start and "
        f"{meta['load_average_end']} at the end "
        f"(a shared machine: other jobs ran at the same time; no timing below depends on it). "
        f"Rerun: `{meta['command']}`. Wall time {meta['wall_seconds']:.0f} s.\n\n"
    )
    if REUSED:
        head += (
            f"Trained by an earlier invocation and reused here (evaluated at this commit; their training time "
            f"is the earlier one's): {', '.join(REUSED)}. {' '.join(NOTE)}\n\n"
        )
    (RESULTS / f"{name}.md").write_text(markdown.replace("<!-- machine -->", head))
