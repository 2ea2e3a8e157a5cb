"""Helpers for benchmark scripts that train configurations through ``attnlib.training.train``."""

from __future__ import annotations

import csv
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["load_avg", "metric_series", "run_config", "run_configs"]


def run_config(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Compose ``train.yaml`` with ``overrides`` and train it in ``run_dir``.

    Returns the results dict, or ``{"diverged": message}`` when the loss became non-finite.
    """
    from hydra import compose, initialize_config_module

    from attnlib.training import train
    from attnlib.training.loop import NonFiniteLossError

    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    try:
        res = train(cfg, run_dir)
    except NonFiniteLossError as e:
        return {"diverged": str(e).split(";")[0], "wall_seconds": round(time.perf_counter() - t0, 1)}
    return res


def run_configs(runs: list[tuple[list[str], Path]], jobs: int = 1) -> list[dict[str, Any]]:
    """:func:`run_config` on each ``(overrides, run_dir)``, ``jobs`` at a time in worker processes;
    results in the order given."""
    if jobs <= 1:
        return [run_config(o, d) for o, d in runs]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.starmap(run_config, runs)


def metric_series(run_dir: Path, split: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from a run's metrics.csv (empty when absent)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and r["metric"] == metric]
    return [(int(r["step"]), float(r["value"])) for r in rows]


def load_avg() -> list[float]:
    """The 1/5/15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]
