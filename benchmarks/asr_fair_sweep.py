"""A small step-count / learning-rate sweep for the Branchformer vs Conformer comparison on asr_digits (CPU).

The Branchformer recipe copied the Conformer's (lr 2e-3, 800 steps); this sweep asks whether the
gap comes from the recipe. Each run is one ``attnlib-train`` command (one seed unless ``--seeds``),
run one after another (one thread each); records are merged into
benchmarks/results/asr_fair_sweep.json and the table is rewritten in asr_fair_sweep.md after every
run, so an interrupted sweep keeps what it finished.

    python benchmarks/asr_fair_sweep.py                 # every run (about 1-2 CPU hours on a loaded box)
    python benchmarks/asr_fair_sweep.py bf_lr1e-3 cf_1600
    python benchmarks/asr_fair_sweep.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    "bf_concat_lr2e-3_1600": [*BF, "trainer.max_steps=1600", "trainer.warmup_steps=160"],
    "cf_lr2e-3_800": CF,
    "cf_lr2e-3_1600": [*CF, "trainer.max_steps=1600", "trainer.warmup_steps=160"],
}


def write_tables(records: dict) -> None:
    """Rewrite asr_fair_sweep.md from the records."""
    rows = [
        [
            f"`{n}`",
            f"`{r['command']}`",
            f"{r['value']:.4f}" if "value" in r else "error",
            f"{r.get('train_seconds', '-')}",
            str(r.get("load_average_after", "-")),
            r.get("when", "-"),
        ]
        for n, r in sorted(records["runs"].items())
    ]
    info = records["machine"]
    text = (
        "# asr_digits: Branchformer vs Conformer recipe sweep (CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}, commit {info['commit']}. Test character error rate "
        "(lower is better) of one seed per recipe; a shared 2-core machine (load average after each run in "
        "the table), so train seconds are upper bounds. Rerun: `python benchmarks/asr_fair_sweep.py [names]`.\n\n"
        + markdown_table(["run", "command", "test CER", "train s", "load avg (1/5/15 min)", "date"], rows)
        + "\n"
    )
    (RESULTS / "asr_fair_sweep.md").write_text(text)


def main() -> None:
    """Run the chosen recipes and merge their records."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"runs (default all): {', '.join(RUNS)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds per recipe (default 0)")
    args = ap.parse_args()
    if args.list:
        for n, ov in RUNS.items():
            print(f"{n:28s} attnlib-train {' '.join(ov)}")
        return
    names = args.names or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    path = RESULTS / "asr_fair_sweep.json"
    records = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    runs = Path(tempfile.mkdtemp(prefix="attnlib-asr-sweep-"))
    for n in names:
        for seed in args.seeds:
            key = n if seed == 0 else f"{n}_seed{seed}"
            training_bars.BARS[key] = ([*RUNS[n], f"seed={seed}"], "test_cer", "<=", 1.0, None)
            print(f"{key}: running ...", flush=True)
            rec = training_bars.run_bar(key, runs)
            records["runs"][key] = rec
            records["machine"] = machine_info()
            path.write_text(json.dumps(records, indent=2) + "\n")
            write_tables(records)
            print(f"{key}: test_cer={rec.get('value')} train={rec.get('train_seconds')} s", flush=True)


if __name__ == "__main__":
    main()
