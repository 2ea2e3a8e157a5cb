"""Run the training bars of the backbones (CPU) and record results, wall time and the machine.

Each bar is one ``attnlib-train`` command line; its results.json, wall-clock time and the
bar's pass/fail are merged into benchmarks/results/training_bars.json, and the table is
rewritten in benchmarks/results/training_bars.md. Run some or all:

    python benchmarks/training_bars.py                       # every bar (about 30 CPU minutes)
    python benchmarks/training_bars.py vit_softmax lm_chars  # some
    python benchmarks/training_bars.py --list

Variants that are not registered (e.g. ``flow`` before its branch is merged) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

import attnlib

# name -> (overrides, metric, comparison, threshold, time budget: (seconds, "wall" | "train") or None).
# "wall" is the whole command (start-up, data, training, evaluation); "train" the training steps
# (results.json's train_seconds; e.g. without the one-off speech synthesis).
BARS: dict[str, tuple[list[str], str, str, float, tuple[float, str] | None]] = {
    "vit_softmax": (["experiment=vit_digits"], "test_accuracy", ">=", 0.97, (180, "wall")),
    "vit_flow": (["experiment=vit_digits", "attention=flow"], "test_accuracy", ">=", 0.95, None),
    "vit_local": (["experiment=vit_digits", "attention=local"], "test_accuracy", ">=", 0.95, None),
    "lm_chars": (["experiment=lm_chars", "trainer.max_steps=300"], "val_bpc", "<", 3.0, None),
    "asr_conformer": (["experiment=asr_digits"], "test_cer", "<=", 0.15, (600, "train")),
    "asr_branchformer": (["experiment=asr_digits_branchformer"], "test_cer", "<=", 0.15, (600, "train")),
    "mqar_softmax": (["experiment=mqar"], "test_accuracy", ">=", 0.99, None),
}


def _variant(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("attention=")), "softmax")


def run_bar(name: str, runs: Path) -> dict:
    """Run one bar; returns its record."""
    overrides, metric, op, thr, budget = BARS[name]
    cmd = [
        sys.executable,
        "-m",
        "attnlib.cli.train",
        *overrides,
        "trainer.progress=false",
        f"hydra.run.dir={runs / name}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"command": " ".join(["attnlib-train", *overrides]), "error": proc.stderr[-2000:], "passed": False}
    res = json.loads((runs / name / "results.json").read_text())
    value = res[metric]
    ok = {">=": value >= thr, "<": value < thr, "<=": value <= thr}[op]
    if budget is not None:
        ok = ok and (wall if budget[1] == "wall" else res["train_seconds"]) <= budget[0]
    return {
        "command": " ".join(["attnlib-train", *overrides]),
        "metric": metric,
        "value": value,
        "bar": f"{metric} {op} {thr}" + (f", {budget[1]} <= {budget[0]:.0f} s" if budget else ""),
        "passed": bool(ok),
        "wall_seconds": round(wall, 1),
        "train_seconds": res["train_seconds"],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": res,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_tables(records: dict) -> None:
    """Rewrite training_bars.md from the records."""
    rows = [
        [
            f"`{n}`",
            f"`{r['command']}`",
            r.get("bar", "-"),
            f"{r['value']:.4f}" if "value" in r else "error",
            f"{r.get('wall_seconds', '-')}",
            f"{r.get('train_seconds', '-')}",
            "yes" if r.get("passed") else "NO",
            str(r.get("load_average_after", "-")),
        ]
        for n, r in sorted(records["bars"].items())
    ]
    info = records["machine"]
    text = (
        "# Training bars (CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}, commit {info['commit']}. A shared 2-core machine: other "
        "jobs ran at the same time (load average after each run in the last column), so wall times are upper "
        "bounds for a quiet machine. Rerun: `python benchmarks/training_bars.py [names]`.\n\n"
        + markdown_table(
            ["bar", "command", "bar", "value", "wall s", "train s", "passed", "load avg (1/5/15 min)"], rows
        )
        + "\n"
    )
    (RESULTS / "training_bars.md").write_text(text)


def main() -> None:
    """Run the chosen bars and merge their records."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"bars to run (default all): {', '.join(BARS)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--runs", default=None, help="where run directories go (default: a temporary directory)")
    args = ap.parse_args()
    if args.list:
        for n, (ov, metric, op, thr, _budget) in BARS.items():
            print(f"{n:18s} attnlib-train {' '.join(ov)}   ({metric} {op} {thr})")
        return
    names = args.names or list(BARS)
    unknown = [n for n in names if n not in BARS]
    if unknown:
        raise SystemExit(f"unknown bars {unknown}; known: {', '.join(BARS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "training_bars.json"
    records = json.loads(path.read_text()) if path.exists() else {"bars": {}}
    runs = Path(args.runs or tempfile.mkdtemp(prefix="attnlib-bars-"))
    for n in names:
        if _variant(BARS[n][0]) not in attnlib.available():
            print(f"{n}: skipped, variant {_variant(BARS[n][0])!r} is not registered")
            continue
        print(f"{n}: running attnlib-train {' '.join(BARS[n][0])} ...", flush=True)
        rec = run_bar(n, runs)
        records["bars"][n] = rec
        records["machine"] = machine_info()
        path.write_text(json.dumps(records, indent=2) + "\n")
        write_tables(records)
        print(f"{n}: {rec.get('metric')}={rec.get('value')} wall={rec.get('wall_seconds')} s passed={rec['passed']}")


if __name__ == "__main__":
    main()
