"""Helpers shared by the benchmark scripts (kept for the scripts; the code lives in ``attnlib.bench``)."""

from __future__ import annotations

from pathlib import Path

from attnlib.bench.machine import cpu_model, machine_info
from attnlib.bench.report import markdown_table
from attnlib.bench.timing import interleaved_medians

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "cpu_model", "interleaved_medians", "machine_info", "markdown_table"]
