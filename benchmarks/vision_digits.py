"""Vision options on vit_digits: class-attention (CaiT), attention pooling (PatchConvNet), CoaT
conv-attention, LIT (MLP-only early blocks, deformable token merging) - accuracy and FLOPs.

Every row is ``attnlib-train experiment=vit_digits <overrides>`` for ``--steps`` steps (the same
recipe for every row), tested on the 360 test digits; FLOPs are torch's count of one image's
forward (matmuls, convolutions, attention), so they do not depend on the machine's load.

    python benchmarks/vision_digits.py [--steps 1500] [--seeds 0] [--rows a,b] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_work_dir, markdown_table
from _vision import count_flops, finish, start, train_run

ROWS: dict[str, tuple[str, list[str]]] = {
    "cls": ("class token (baseline)", []),
    "mean": ("mean pooling", ["model.pool=mean"]),
    "cait": ("CaiT class-attention (2 blocks)", ["model.pool=cait"]),
    "attn": ("PatchConvNet attention pooling (1 block, 1 head)", ["model.pool=attn"]),
    "attn_multi": (
        "PatchConvNet attention pooling, one token per class",
        ["model.pool=attn", "model.class_attention={multiclass:true}"],
    ),
    "factorized": ("CoaT factorized attention", ["attention=factorized"]),
    "coat": ("CoaT conv-attention (factorized + CRPE)", ["attention=coat"]),
    "lit": ("LIT: blocks 0-1 MLP-only", ["model.mlp_only_blocks=2"]),
    "lit_dtm": (
        "LIT: blocks 0-1 MLP-only + DTM after block 1",
        ["model.mlp_only_blocks=2", "pruning=dtm", "model.pruning.layers=[1]"],
    ),
    "dtm": ("DTM after block 1", ["pruning=dtm", "model.pruning.layers=[1]"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--work", default=None, help="run directories (finished runs are reused)")
    args = ap.parse_args()
    meta = start()
    torch.set_num_threads(1)
    work = Path(args.work or default_work_dir("attnlib-vision-digits"))
    seeds = [int(s) for s in args.seeds.split(",")]
    records: dict[str, dict] = {}
    for name in args.rows.split(","):
        label, ov = ROWS[name]
        runs = []
        for seed in seeds:
            overrides = [
                "experiment=vit_digits",
                *ov,
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_every={args.steps}",
                f"trainer.checkpoint_every={args.steps}",
                f"seed={seed}",
            ]
            print(f"{name} seed {seed}: attnlib-train {' '.join(overrides)}", flush=True)
            model, res, _ = train_run(overrides, work / f"{name}_s{seed}")
            runs.append(
                {
                    "seed": seed,
                    "overrides": overrides,
                    "test_accuracy": res["test_accuracy"],
                    "train_seconds": res["train_seconds"],
                }
            )
            print(f"  test accuracy {res['test_accuracy']:.4f}", flush=True)
        flops = count_flops(model, torch.randn(1, 1, 8, 8))
        params = sum(p.numel() for p in model.parameters())
        accs = [r["test_accuracy"] for r in runs]
        records[name] = {
            "label": label,
            "mean_test_accuracy": statistics.mean(accs),
            "std_test_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "flops_per_image": flops,
            "params": params,
            "runs": runs,
        }
    base = records.get("cls", {}).get("flops_per_image")
    rows = []
    for n, r in records.items():
        spread = f" (±{100 * r['std_test_accuracy']:.2f})" if len(seeds) > 1 else ""
        ratio = f"{r['flops_per_image'] / base:.2f}x" if base else "-"
        rows.append(
            [
                r["label"],
                f"`{' '.join(ROWS[n][1]) or '-'}`",
                f"{100 * r['mean_test_accuracy']:.2f}%{spread}",
                f"{r['flops_per_image'] / 1e6:.3f}",
                ratio,
                f"{r['params']:,}",
            ]
        )
    md = (
        "# Vision options on vit_digits: class-attention, attention pooling, CoaT, LIT\n\n<!-- machine -->"
        f"`attnlib-train experiment=vit_digits <overrides>` (patch 2: a 4x4 grid, dim 64, depth 4, 4 heads, softmax "
        f"unless the row says otherwise), {args.steps} steps, seeds {seeds} (mean test accuracy on the 360 test "
        "digits; per seed in the JSON). MFLOPs: torch's flop count of one 8x8 image's forward.\n\n"
        + markdown_table(["model", "overrides", "test acc", "MFLOPs/img", "vs class token", "params"], rows)
        + "\n"
    )
    finish("vision_digits", meta, {"steps": args.steps, "seeds": seeds, "rows": records}, md, work)
    print(md)


if __name__ == "__main__":
    main()
