"""benchmarks/gpu_check.py starts, parses and reports on a CPU machine (its --dry-run: tiny sizes,
Triton's interpreter, the Hydra commands composed only), so the one GPU call it is written for
is known to work up to the GPU itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_print_run_matches_the_docstring() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--print-run"], capture_output=True, text=True, check=True)
    run = json.loads(res.stdout)
    assert run["carry"] == [".whl"] and run["timeout_s"] <= 600
    doc = " ".join(SCRIPT.read_text().split('"""')[1].replace("\\\n", " ").split())
    assert " ".join(run["command"].split()) in doc
    assert "$OUT" in run["command"] and ".whl/*.whl" in run["command"]


@pytest.mark.slow
def test_dry_run_every_step(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    assert list(steps) == ["tests", "kernels", "edge", "bench", "train", "entmax"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    kernels = steps["kernels"]["result"]["records"]
    assert {r["mask"] for r in kernels} == {"density 1.0", "density 0.5", "density 0.1", "causal"}
    assert all(r["err"]["ours"] < 1e-5 for r in kernels)
    assert any("ours grads" in r["err"] for r in kernels)  # the gradient reference path ran
    assert len(steps["edge"]["result"]["rows"]) == 9
    assert "| plain | 32 |" in steps["entmax"]["result"]["markdown"]  # the fused entmax row was timed
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| kernels | ok |" in md
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool brings back at most 8 files
