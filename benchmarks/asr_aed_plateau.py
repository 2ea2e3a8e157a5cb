"""When does the joint CTC/attention model leave its initial training-loss plateau? (spoken digits, CPU)

Short runs of ``experiment=asr_digits_aed`` (softmax everywhere) with one change each, logging the
training loss every 10 steps; a run is stopped once its last training step is logged (the study
needs the loss curve, not the final beam-search evaluation). Every attention-decoder run first
drops to a plateau near 2.3 (CTC emits only blanks, the decoder is a digit language model that
ignores the encoder) and learns once it leaves it; the table gives the first logged step whose
loss is below ``--below`` (2.0), or "not by N" when the run ended on the plateau.

    python benchmarks/asr_aed_plateau.py                      # every variant, seeds 1 2, 300 steps
    python benchmarks/asr_aed_plateau.py clip_0.3 --seeds 1
    python benchmarks/asr_aed_plateau.py --tables             # rewrite the markdown from the JSON

Finished runs (their metrics.csv reaches the last step) are reused from the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, default_work_dir, machine_info, markdown_table, save_records

# name -> (overrides of `attnlib-train experiment=asr_digits_aed`, what it tests)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "default": ([], "the recipe: gradient clipping at 1.0, ctc_weight 0.3, AdamW betas (0.9, 0.999)"),
    "ctc_loss_only": (["model.ctc_weight=1.0"], "the same model trained on its CTC loss alone"),
    "beta2_0.98": (["trainer.betas=[0.9,0.98]"], "Adam beta2 0.98 (ESPnet/Transformer): forgets early gradients"),
    "ctc_weight_0.5": (["model.ctc_weight=0.5"], "the CTC loss weighted 0.5 (Kim et al. 2017 / ESPnet use 0.2-0.5)"),
    "clip_0.3": (["trainer.grad_clip=0.3"], "gradient clipping at 0.3 = the CTC recipe's 1.0 times ctc_weight"),
}
OUT = "asr_aed_plateau"


def overrides(name: str, seed: int, steps: int) -> list[str]:
    return [
        "experiment=asr_digits_aed",
        *VARIANTS[name][0],
        f"seed={seed}",
        "+data.seed=0",
        f"trainer.max_steps={steps}",
        "trainer.log_every=10",
        "trainer.eval_every=0",
        f"trainer.checkpoint_every={steps}",
        "trainer.progress=false",
        "trainer.attention_entropy=0",
        "trainer.log_attention_entropy=false",
        "trainer.tensorboard=false",
    ]


def losses(run: Path) -> dict[int, float]:
    """step -> logged training loss of a run (its metrics.csv)."""
    path = run / "metrics.csv"
    if not path.exists():
        return {}
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return {int(r[0]): float(r[3]) for r in rows if len(r) == 4 and r[1:3] == ["train", "loss"]}


def train(name: str, seed: int, steps: int, runs: Path, record_only: bool = False) -> dict[int, float]:
    """Train one variant/seed until its last step is logged (or reuse the run); its loss curve.
    ``record_only``: no training, the curve as far as an earlier (possibly stopped) run got."""
    run = runs / f"{name}-s{seed}"
    if not record_only and max(losses(run), default=0) < steps:
        cmd = [sys.executable, "-m", "attnlib.cli.train", *overrides(name, seed, steps), f"hydra.run.dir={run}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and max(losses(run), default=0) < steps:
            time.sleep(5)
        if proc.poll() is None:  # the last step is logged: skip the final evaluation
            proc.terminate()
            proc.wait()
        elif proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return losses(run)


def left_plateau(curve: dict[int, float], below: float) -> int | None:
    """The first logged step after 60 whose loss is below ``below`` times the loss at step 60 (the
    plateau's level: about 2.3 for the joint loss, 2.77 for the CTC loss alone), or None."""
    level = curve.get(60)
    return None if level is None else next((s for s, v in sorted(curve.items()) if s > 60 and v < below * level), None)


def write_tables(records: dict) -> None:
    """Rewrite the markdown table from the records."""
    below = records["below"]
    rows = []
    for name, by_seed in records["runs"].items():
        for seed, rec in sorted(by_seed.items(), key=lambda x: int(x[0])):
            curve = {int(s): v for s, v in rec["loss"].items()}
            last = max(curve)
            step = left_plateau(curve, below)
            picks = [s for s in (60, 100, 150, 200, 250, 300) if s in curve]
            stopped = "" if last >= records["steps"] else f" (stopped at step {last})"
            rows.append(
                [
                    f"`{name}`",
                    seed,
                    (str(step) if step is not None else f"not by {last}") + stopped,
                    " / ".join(f"{curve[s]:.2f}" for s in picks),
                    f"{curve[last]:.2f}",
                    rec["commit"],
                ]
            )
    info = records["machine"]
    text = (
        "# Joint CTC/attention ASR: leaving the initial loss plateau (spoken digits, CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}, {records['date']}; a shared 2-core machine, one "
        f"training thread per run, two runs at a time, load average {records['load']}. Each run is "
        f"`attnlib-train experiment=asr_digits_aed` (softmax everywhere) for {records['steps']} steps "
        "(batch 32, cosine schedule over those steps, warmup 80, peak lr 2e-3) with one change, logging the "
        "training loss every 10 steps. Rerun: `python benchmarks/asr_aed_plateau.py`.\n\n"
        "Variants:\n\n"
        + "\n".join(f"- `{n}` (`{' '.join(ov) or '-'}`): {why}" for n, (ov, why) in VARIANTS.items())
        + f"\n\n'left the plateau' = the first logged step after 60 whose training loss is below {below} times "
        "the loss at step 60, the plateau's level (about 2.3 for the joint loss, 2.77 for the CTC loss alone). "
        "Runs stopped before the last step were stopped by hand to free the machine for other runs.\n\n"
        + markdown_table(
            ["variant", "seed", "left the plateau at step", "loss at 60/100/150/200/250/300", "last loss", "commit"],
            rows,
        )
        + "\n"
    )
    (RESULTS / f"{OUT}.md").write_text(text)


def main() -> None:
    """Run the chosen variants and seeds; merge their loss curves into the records."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"variants (default all): {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--below", type=float, default=0.85)
    ap.add_argument("--runs", default=None, help="run directories (default $TMPDIR/attnlib-asr-aed-plateau)")
    ap.add_argument("--tables", action="store_true", help="only rewrite the markdown from the JSON records")
    ap.add_argument("--record-only", action="store_true", help="record the runs as far as they got, train none")
    ap.add_argument("--trained-at", default=None, help="with --record-only: the commit the runs were trained at")
    args = ap.parse_args()
    path = RESULTS / f"{OUT}.json"
    if args.tables:
        write_tables(json.loads(path.read_text()))
        return
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    runs = Path(args.runs) if args.runs else default_work_dir("attnlib-asr-aed-plateau")
    runs.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(VARIANTS):
        for seed in args.seeds:
            load0 = os.getloadavg()[0]
            curve = train(name, seed, args.steps, runs, args.record_only)
            if not curve:
                continue
            records = json.loads(path.read_text()) if path.exists() else {"runs": {}, "loads": []}
            records["runs"].setdefault(name, {})[str(seed)] = {
                "loss": {str(s): v for s, v in sorted(curve.items())},
                "command": " ".join(["attnlib-train", *overrides(name, seed, args.steps)]),
                "commit": args.trained_at or machine_info()["commit"],
            }
            records["loads"] = [*records.get("loads", []), round(load0, 1), round(os.getloadavg()[0], 1)]
            load = f"{min(records['loads']):.1f}-{max(records['loads']):.1f}"
            write_tables(save_records(path, records, runs, steps=args.steps, below=args.below, load=load))
            print(f"{name} seed {seed}: left the plateau at {left_plateau(curve, args.below)}", flush=True)


if __name__ == "__main__":
    main()
