"""Token pruning on CPU: accuracy, FLOPs and inference throughput of vit_digits with ltp / topk.

    .venv/bin/python benchmarks/pruning_cpu.py [--work /tmp/attnlib-pruning] [--threads 1] [--repeats 7]

1. Trains the softmax vit_digits baseline once (``attnlib-train experiment=vit_digits``, cached
   in ``--work``), then evaluates the *same weights* with pruning after block 0 (blocks 1-3 run
   on the kept tokens): ``topk`` at keep ratios 0.75 / 0.5 / 0.25 and ``ltp`` (hard mode,
   length-normalised scores, so threshold 1.0 = uniform attention) at 3 thresholds. No
   fine-tuning: the numbers are a lower bound on what pruning-aware training gives.
2. Throughput: batch 256, eval, ``torch.inference_mode``, interleaved rounds, median images/s.
3. FLOPs: analytic multiply-adds x 2 of the blocks for the token counts actually run.

Writes benchmarks/results/pruning_cpu.{json,md}. The machine and its load average are recorded:
numbers from a shared, busy machine are noisy - compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from attnlib.data import build_data
from attnlib.models import build_model

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"

CONFIGS: list[tuple[str, dict | None]] = [
    ("none", None),
    ("topk r=0.75", {"name": "topk", "keep_ratio": 0.75, "layers": [0]}),
    ("topk r=0.5", {"name": "topk", "keep_ratio": 0.5, "layers": [0]}),
    ("topk r=0.25", {"name": "topk", "keep_ratio": 0.25, "layers": [0]}),
    ("ltp thr=0.5", {"name": "ltp", "final_threshold": 0.5 * 4, "normalize": True, "layers": [0], "mode": "hard"}),
    ("ltp thr=0.8", {"name": "ltp", "final_threshold": 0.8 * 4, "normalize": True, "layers": [0], "mode": "hard"}),
    ("ltp thr=1.0", {"name": "ltp", "final_threshold": 1.0 * 4, "normalize": True, "layers": [0], "mode": "hard"}),
]


def train_baseline(work: Path) -> Path:
    """Train (once) the vit_digits softmax baseline; returns its run dir."""
    run = work / "vit_base"
    if not (run / "checkpoints" / "last.pt").exists():
        exe = Path(sys.executable).parent / "attnlib-train"
        subprocess.run([str(exe), "experiment=vit_digits", f"hydra.run.dir={run}"], check=True)
    return run


def block_flops(n: float, dim: int, hidden: int) -> float:
    """FLOPs (2 x multiply-adds) of one pre-norm block on n tokens: qkv, scores, PV, out, MLP."""
    return 2 * (3 * n * dim * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/attnlib-pruning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    run = train_baseline(work)
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(ck["config"])
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True))
    data.ensure_setup()
    batches = list(data.eval_batches("test"))
    xs = torch.cat([b["x"] for b in batches])
    ys = torch.cat([b["y"] for b in batches])
    bench_x = xs[torch.arange(256) % xs.shape[0]]

    models = {}
    for label, pcfg in CONFIGS:
        mcfg = OmegaConf.to_container(cfg.model, resolve=True)
        mcfg["pruning"] = pcfg
        m = build_model(mcfg, cfg.attention, **data.model_kwargs())
        m.load_state_dict(ck["model"], strict=False)
        models[label] = m.eval()

    rows = {}
    depth, dim = len(models["none"].blocks), models["none"].blocks[0].attn.dim
    hidden = models["none"].blocks[0].mlp.fc2.in_features
    with torch.inference_mode():
        for label, m in models.items():
            pred = m(xs).argmax(-1)
            n0 = 17
            n1 = float(m.last_kept_index.shape[1]) if m.pruning is not None else n0
            flops = block_flops(n0, dim, hidden) + (depth - 1) * block_flops(n1, dim, hidden)
            rows[label] = {
                "accuracy": float((pred == ys).float().mean()),
                "tokens_after_block0": n1,
                "kept_fraction": n1 / n0,
                "gflops_per_image": flops / 1e9,
                "times": [],
            }
        for _ in range(2):  # warm-up
            for m in models.values():
                m(bench_x)
        for _ in range(args.repeats):  # interleaved rounds
            for label, m in models.items():
                t0 = time.perf_counter()
                m(bench_x)
                rows[label]["times"].append(time.perf_counter() - t0)
    base = rows["none"]
    for r in rows.values():
        r["images_per_s"] = 256 / statistics.median(r["times"])
        r["speedup"] = r["images_per_s"] / (256 / statistics.median(base["times"]))
        r["flops_ratio"] = base["gflops_per_image"] / r["gflops_per_image"]
        r["acc_drop_points"] = 100 * (base["accuracy"] - r["accuracy"])
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "note": "shared, busy machine: other jobs were running; ratios of interleaved runs are the meaningful numbers",
        "baseline_run": str(run),
        "pruning_after_block": 0,
        "fine_tuned": False,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pruning_cpu.json").write_text(json.dumps({"meta": meta, "vit_digits": rows}, indent=2))
    lines = [
        "# Token pruning on CPU: vit_digits (softmax), pruning after block 0, no fine-tuning",
        "",
        f"Machine: {meta['machine']}, {meta['cpus']} cores, {args.threads} thread(s), load average "
        f"{', '.join(f'{v:.2f}' for v in meta['loadavg'])} - **busy machine**, shared with other jobs; "
        "interleaved medians of "
        f"{args.repeats} rounds, batch 256, inference.",
        "",
        "| config | tokens after block 0 (of 17) | test acc | drop (points) | GFLOPs/img | FLOPs ratio | img/s "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['tokens_after_block0']:.1f} | {100 * r['accuracy']:.2f}% | {r['acc_drop_points']:+.2f} | "
            f"{r['gflops_per_image']:.5f} | {r['flops_ratio']:.2f}x | {r['images_per_s']:.0f} | {r['speedup']:.2f}x |"
        )
    (OUT / "pruning_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
