"""Relaxed attention with vs without on a small-data task: ViT on ~215 digits images, 3 seeds.

``experiment=vit_digits`` with ``data.val_fraction=0.85`` leaves 15% of the non-test images for
training (215 images; 1222 validation, 360 test); each seed trains the plain model and the same
model with relaxed self-attention (``attention.modifiers=[{name: relaxed, gamma: <g>}]``, active in
training only, as in the paper). Writes benchmarks/results/relaxed_small_data.{md,json}.

    python benchmarks/relaxed_small_data.py
    python benchmarks/relaxed_small_data.py --steps 100 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table
from _runs import load_avg, run_configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (one thread each)")
    p.add_argument("--out", default=str(RESULTS / "relaxed_small_data"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relaxed_small_"))
    base = [
        "experiment=vit_digits",
        "data.val_fraction=0.85",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.threads=1",
    ]
    arms = {"plain": [], f"relaxed_{args.gamma:g}": [f"attention.modifiers=[{{name: relaxed, gamma: {args.gamma}}}]"]}
    cells = [(seed, arm) for seed in range(args.seeds) for arm in arms]
    runs = [([*base, f"seed={seed}", *arms[arm]], work / f"{arm}_{seed}") for seed, arm in cells]
    records = []
    for (seed, arm), res in zip(cells, run_configs(runs, args.jobs)):
        rec = {"arm": arm, "seed": seed, "load_avg": load_avg()}
        keys = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds")
        rec.update({k: res.get(k) for k in keys})
        print(json.dumps(rec), flush=True)
        records.append(rec)
    meta = {
        "command": "python benchmarks/relaxed_small_data.py " + " ".join(sys.argv[1:]),
        "overrides": base,
        "machine": machine_info(threads=1),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    rows = []
    for arm in arms:
        rs = [r for r in records if r["arm"] == arm]
        row = [f"`{arm}`"]
        for key in ("test_accuracy", "test_loss", "val_accuracy", "val_loss"):
            vals = [r[key] for r in rs]
            row.append(f"{statistics.median(vals):.4f} ({', '.join(f'{v:.4f}' for v in vals)})")
        rows.append(row)
    m = meta["machine"]
    text = (
        "# Relaxed attention on a small-data task (ViT, 215 digits images)\n\n"
        f"`attnlib-train {' '.join(base)} seed=<s> [attention.modifiers=[{{name: relaxed, gamma: {args.gamma}}}]]`. "
        f"Median over {args.seeds} seeds (per seed in brackets, seeds 0..{args.seeds - 1}); test = the 360 held-out "
        "images, val = 1222 images.\n\n"
        f"Machine: `{m['cpu']}`, 1 thread per run, {args.jobs} run(s) in parallel, torch {m['torch']}, "
        f"commit {m['commit']}; a shared machine "
        f"(load average after each run in the json). Date {meta['date']}. Command: `{meta['command']}`.\n\n"
        + markdown_table(["arm", "test acc", "test loss", "val acc", "val loss"], rows)
        + "\n"
    )
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
