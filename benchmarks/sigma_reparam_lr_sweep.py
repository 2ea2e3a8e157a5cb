"""sigmaReparam vs the baseline ViT on digits over a learning-rate sweep: attention entropy and accuracy.

Each arm trains ``experiment=vit_digits`` with no warmup (the setting where the paper reports
entropy collapse and instability for the baseline) for ``--steps`` steps at each learning rate,
with and without ``model.sigma_reparam=true`` (every Linear and the patch convolution); the
training loop logs the mean attention entropy (``attn_entropy``, sampled query rows) every 20
steps. Writes benchmarks/results/sigma_reparam_lr_sweep.{md,json,png}.

    python benchmarks/sigma_reparam_lr_sweep.py
    python benchmarks/sigma_reparam_lr_sweep.py --steps 100 --lrs 1e-3 3e-2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table
from _runs import load_avg, metric_series, run_configs

ARMS = {"baseline": [], "sigma_reparam": ["model.sigma_reparam=true"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", nargs="*", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (one thread each)")
    p.add_argument("--out", default=str(RESULTS / "sigma_reparam_lr_sweep"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sigma_sweep_"))
    base = [
        "experiment=vit_digits",
        f"trainer.max_steps={args.steps}",
        "trainer.warmup_steps=0",
        "trainer.log_every=20",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.threads=1",
        f"seed={args.seed}",
    ]
    cells = [(lr, arm) for lr in args.lrs for arm in ARMS]
    runs = [([*base, f"trainer.lr={lr}", *ARMS[arm]], work / f"{arm}_{lr:g}") for lr, arm in cells]
    records = []
    for (lr, arm), (_, run), res in zip(cells, runs, run_configs(runs, args.jobs)):
        rec = {
            "arm": arm,
            "lr": lr,
            "test_accuracy": res.get("test_accuracy"),
            "test_loss": res.get("test_loss"),
            "diverged": res.get("diverged"),
            "train_seconds": res.get("train_seconds"),
            "entropy": metric_series(run, "train", "attn_entropy"),
            "loss": metric_series(run, "train", "loss"),
            "load_avg": load_avg(),
        }
        print(json.dumps({k: v for k, v in rec.items() if k not in ("entropy", "loss")}), flush=True)
        records.append(rec)
    meta = {
        "command": "python benchmarks/sigma_reparam_lr_sweep.py " + " ".join(sys.argv[1:]),
        "overrides": base,
        "machine": machine_info(threads=1),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    plot(records, Path(args.out + ".png"))
    rows = []
    for r in records:
        ent = [v for _, v in r["entropy"]]
        rows.append([
            r["arm"], f"{r['lr']:g}",
            "diverged" if r["diverged"] else f"{r['test_accuracy']:.4f}",
            f"{ent[0]:.3f}" if ent else "-", f"{min(ent):.3f}" if ent else "-", f"{ent[-1]:.3f}" if ent else "-",
            f"{r['loss'][-1][1]:.3f}" if r["loss"] else "-",
        ])  # fmt: skip
    head = ["arm", "lr", "test acc", "entropy first log", "entropy min", "entropy last", "train loss last"]
    m = meta["machine"]
    text = (
        "# sigmaReparam vs baseline over a learning-rate sweep (ViT on digits)\n\n"
        f"`attnlib-train {' '.join(base)} trainer.lr=<lr> [model.sigma_reparam=true]`: {args.steps} steps, no "
        "warmup, otherwise the vit_digits experiment (AdamW, weight decay 0.05, grad clip 1, cosine decay). "
        "Entropy: mean attention entropy over layers, heads and 16 sampled query rows (nats; uniform over the 17 "
        f"tokens = {__import__('math').log(17):.3f}), logged every 20 steps. One seed per cell.\n\n"
        f"Machine: `{m['cpu']}`, 1 thread per run, {args.jobs} run(s) in parallel, torch {m['torch']}, "
        f"commit {m['commit']}; a shared machine "
        f"(load average after each run in the json). Date {meta['date']}. Command: `{meta['command']}`.\n\n"
        + markdown_table(head, rows)
        + f"\n\n![entropy curves and accuracy]({Path(args.out).name}.png)\n"
    )
    Path(args.out + ".md").write_text(text)
    print(text)


def plot(records: list[dict], path: Path) -> None:
    """Entropy curves (one panel per arm, one line per lr) and final accuracy vs lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lrs = sorted({r["lr"] for r in records})
    colors = plt.cm.viridis([i / max(len(lrs) - 1, 1) for i in range(len(lrs))])
    for ax, arm in zip(axes[:2], ARMS):
        for lr, c in zip(lrs, colors):
            r = next((x for x in records if x["arm"] == arm and x["lr"] == lr), None)
            if r and r["entropy"]:
                s, v = zip(*r["entropy"])
                ax.plot(s, v, color=c, label=f"lr {lr:g}" + (" (diverged)" if r["diverged"] else ""))
        ax.set_title(f"{arm}: mean attention entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=8)
    for arm, style in zip(ARMS, ("o-", "s--")):
        pts = [(r["lr"], r["test_accuracy"] or 0.0) for r in records if r["arm"] == arm]
        if pts:
            x, y = zip(*sorted(pts))
            axes[2].plot(x, y, style, label=arm)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("learning rate")
    axes[2].set_ylabel("test accuracy (diverged = 0)")
    axes[2].set_title("final test accuracy")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
