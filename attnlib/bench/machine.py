"""Machine and software description for benchmark result files.

Every result file of ``attnlib-bench`` records where it was measured: CPU model, cores and the
threads torch used, CPU capability, GPU name, torch / triton / Python versions, the git commit
and the load average before and after the run (the development machines are shared).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_model", "git_commit", "load_average", "machine_info", "machine_slug"]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(where: str | Path | None = None) -> str:
    """Short commit hash of the checkout holding ``where`` (default: this package), '+dirty' if modified."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd, check=False, timeout=10
        ).stdout.strip()
        if not commit:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=cwd,
            check=False,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info(threads: int | None = None) -> dict[str, object]:
    """Machine and software versions: a flat JSON-serialisable dict.

    Keys: cpu, cores, threads, cpu_capability, mem_gib, gpu (name or None), cuda, torch,
    triton, python, platform, commit, loadavg.
    """
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_gib": _mem_total_gib(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "loadavg": load_average(),
    }
    return info


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(cpu|processor|@.*ghz)\b", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_slug(device: str = "cpu", threads: int | None = None) -> str:
    """Folder name for results of this machine: the GPU name for CUDA runs, else CPU model + threads.

    >>> machine_slug("cpu", 2)  # doctest: +SKIP
    'intel-xeon-2t'
    """
    if device.startswith("cuda") and torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name())
    threads = torch.get_num_threads() if threads is None else threads
    return f"{_slug(cpu_model())}-{threads}t"
