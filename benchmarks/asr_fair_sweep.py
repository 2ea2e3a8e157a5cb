"""A small step-count / learning-rate sweep for the Branchformer vs Conformer comparison on asr_digits (CPU).

The Branchformer recipe copied the Conformer's (lr 2e-3, 800 steps); this sweep asks whether the
gap comes from the recipe. Each run is one ``attnlib-train`` command (one seed unless ``--seeds``),
run one after another (one thread each); records are merged into
benchmarks/results/asr_fair_sweep.json and the table is rewritten in asr_fair_sweep.md after every
run, so an interrupted sweep keeps what it finished.

    python benchmarks/asr_fair_sweep.py                 # every run (about 1-2 CPU hours on a loaded box)
    python benchmarks/asr_fair_sweep.py bf_lr1e-3 cf_1600
    python benchmarks/asr_fair_sweep.py --list
    python benchmarks/asr_fair_sweep.py --record bf_concat_lr1e-3_800 RUN_DIR --commit abc1234

``--record`` adds a run that finished earlier (the run directory of one of these commands, e.g.
left by an interrupted sweep: its results.json and metrics.csv), with the commit it ran at.
Every record keeps the validation CER at each evaluation (every 200 steps): the step-count
dimension of the sweep without a run per step count.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_bars
from _common import RESULTS, machine_info, markdown_table

BF = ["experiment=asr_digits_branchformer"]
CF = ["experiment=asr_digits"]
# name -> overrides (the recipe: learning rate, steps, warm-up, merge)
RUNS: dict[str, list[str]] = {
    "bf_concat_lr2e-3_800": BF,
    "bf_concat_lr1e-3_800": [*BF, "trainer.lr=1.0e-3"],
    "bf_concat_lr4e-3_800": [*BF, "trainer.lr=4.0e-3"],
    "bf_learned_ave_lr2e-3_800": [*BF, "model.merge=learned_ave"],
    "bf_learned_ave_drop0.2_lr2e-3_800": [*BF, "model.merge=learned_ave", "model.dropout=0.2"],
    "bf_concat_lr2e-3_1600": [*BF, "trainer.max_steps=1600", "trainer.warmup_steps=160"],
    "cf_lr2e-3_800": CF,
    "cf_lr2e-3_1600": [*CF, "trainer.max_steps=1600", "trainer.warmup_steps=160"],
}


def curve(run_dir: Path) -> dict[str, dict[str, float]]:
    """Validation CER and last training loss at each evaluation step of a run's metrics.csv."""
    out: dict[str, dict[str, float]] = {}
    with (run_dir / "metrics.csv").open() as f:
        for row in csv.reader(f):
            if len(row) == 4 and row[1] == "val" and row[2] == "cer":
                out.setdefault(row[0], {})["val_cer"] = float(row[3])
            elif len(row) == 4 and row[1] == "train" and row[2] == "loss":
                out.setdefault(row[0], {})["train_loss"] = float(row[3])
    return {step: v for step, v in out.items() if "val_cer" in v}


def record(name: str, run_dir: Path, commit: str, when: str | None = None) -> dict:
    """The record of a finished run directory of the command ``RUNS[name]``."""
    rec: dict = {"command": " ".join(["attnlib-train", *RUNS[name]]), "commit": commit}
    res_path = run_dir / "results.json"
    if res_path.exists():
        res = json.loads(res_path.read_text())
        rec.update(value=res["test_cer"], train_seconds=res["train_seconds"], results=res)
    rec["curve"] = curve(run_dir) if (run_dir / "metrics.csv").exists() else {}
    rec["when"] = when or time.strftime("%Y-%m-%d %H:%M:%S")
    return rec


def write_tables(records: dict) -> None:
    """Rewrite asr_fair_sweep.md from the records."""

    def cell(r: dict) -> str:
        pts = r.get("curve", {})
        return " / ".join(f"{pts[s]['val_cer']:.3f}" for s in sorted(pts, key=int)) or "-"

    def last_loss(r: dict) -> str:
        pts = r.get("curve", {})
        return f"{pts[max(pts, key=int)]['train_loss']:.3f}" if pts else "-"

    rows = [
        [
            f"`{n}`",
            f"`{r['command']}`",
            f"{r['value']:.4f}" if "value" in r else r.get("note", "error"),
            cell(r),
            last_loss(r),
            f"{r.get('train_seconds', '-')}",
            str(r.get("load_average_after", "-")),
            r.get("commit", "-"),
            r.get("when", "-"),
        ]
        for n, r in sorted(records["runs"].items())
    ]
    info = records["machine"]
    text = (
        "# asr_digits: Branchformer vs Conformer recipe sweep (CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}. Test character error rate (lower is better) of one "
        "seed per recipe, validation CER at every 200 steps, and the training loss at the last evaluation; a "
        "shared 2-core machine (load average after each run where recorded), so train seconds are upper bounds. "
        "Rerun: `python benchmarks/asr_fair_sweep.py [names]`.\n\n"
        + markdown_table(
            [
                "run",
                "command",
                "test CER",
                "val CER by step",
                "train loss (last)",
                "train s",
                "load avg (1/5/15 min)",
                "commit",
                "date",
            ],
            rows,
        )
        + "\n"
    )
    (RESULTS / "asr_fair_sweep.md").write_text(text)


def main() -> None:
    """Run the chosen recipes (or record finished runs) and merge their records."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"runs (default all): {', '.join(RUNS)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds per recipe (default 0)")
    ap.add_argument("--record", nargs=2, metavar=("NAME", "RUN_DIR"), help="record a finished run directory")
    ap.add_argument("--commit", help="with --record: the commit the run used")
    ap.add_argument("--note", help="with --record: a note for a run without results (e.g. stopped)")
    args = ap.parse_args()
    if args.list:
        for n, ov in RUNS.items():
            print(f"{n:28s} attnlib-train {' '.join(ov)}")
        return
    path = RESULTS / "asr_fair_sweep.json"
    records = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.record:
        name, run_dir = args.record[0], Path(args.record[1])
        if name not in RUNS or not args.commit:
            raise SystemExit(f"--record needs a known run name ({', '.join(RUNS)}) and --commit")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((run_dir / "metrics.csv").stat().st_mtime))
        records["runs"][name] = record(name, run_dir, args.commit, started)
        if args.note:
            records["runs"][name]["note"] = args.note
        records.setdefault("machine", machine_info())
        path.write_text(json.dumps(records, indent=2) + "\n")
        write_tables(records)
        return
    names = args.names or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    runs = Path(tempfile.mkdtemp(prefix="attnlib-asr-sweep-"))
    for n in names:
        for seed in args.seeds:
            key = n if seed == 0 else f"{n}_seed{seed}"
            training_bars.BARS[key] = ([*RUNS[n], f"seed={seed}"], "test_cer", "<=", 1.0, None)
            print(f"{key}: running ...", flush=True)
            rec = training_bars.run_bar(key, runs)
            info = machine_info()
            rec.update(commit=info["commit"], curve=curve(runs / key) if (runs / key / "metrics.csv").exists() else {})
            records = json.loads(path.read_text()) if path.exists() else {"runs": {}}  # others may have recorded
            records["runs"][key] = rec
            records["machine"] = info
            path.write_text(json.dumps(records, indent=2) + "\n")
            write_tables(records)
            print(f"{key}: test_cer={rec.get('value')} train={rec.get('train_seconds')} s", flush=True)


if __name__ == "__main__":
    main()
