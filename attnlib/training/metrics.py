"""Metric sinks (CSV, TensorBoard), edit distance and the results table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricLogger", "edit_distance", "format_table"]


def edit_distance(ref: str | list[Any], hyp: str | list[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


class MetricLogger:
    """Writes scalar metrics to ``metrics.csv`` (long format: step, split, metric, value) and TensorBoard.

    On resume from step s, rows after s are dropped from the CSV and TensorBoard events
    after s are purged, so a resumed run's logs read like an uninterrupted one.
    """

    FIELDS = ("step", "split", "metric", "value")

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, self.FIELDS)
                w.writeheader()
                w.writerows(rows)
        elif not self.path.exists() or resume_step is None:
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writeheader()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                print("tensorboard is not installed: metrics go to metrics.csv only")
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Append scalars for ``split`` ("train", "val", "test") at ``step``."""
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            for k, v in metrics.items():
                w.writerow([step, split, k, repr(float(v))])
        if self.tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def format_table(results: dict[str, Any]) -> str:
    """A two-column markdown table of the results."""
    rows = [("metric", "value"), ("---", "---")]
    for k, v in results.items():
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        rows.append((k, str(v)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"| {a.ljust(width)} | {b} |" for a, b in rows)
