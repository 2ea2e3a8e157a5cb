"""Vision options on vit_digits: class-attention (CaiT), attention pooling (PatchConvNet), CoaT
conv-attention, LIT (MLP-only early blocks, deformable token merging) - accuracy and FLOPs.

Every row is ``attnlib-train experiment=vit_digits <overrides>`` for ``--steps`` steps (the same
recipe for every row), tested on the 360 test digits; FLOPs are torch's count of one image's
forward (matmuls, convolutions, attention), so they do not depend on the machine's load.

    python benchmarks/vision_digits.py [--steps 1000] [--seeds 0] [--rows a,b] [--work DIR]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_work_dir, markdown_table
from _vision import arguments, count_flops, finish, start, train_seeds

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
    args = arguments(__doc__, steps=1000, seeds="0", rows=list(ROWS))
    meta = start()
    torch.set_num_threads(1)
    work = Path(args.work or default_work_dir("attnlib-vision-digits"))
    seeds = args.seeds
    records: dict[str, dict] = {}
    for name in args.rows.split(","):
        label, ov = ROWS[name]
        runs = []
        for run in train_seeds(name, ["experiment=vit_digits", *ov], args.steps, seeds, work):
            model, res = run["model"], run["results"]
            acc, seconds = res["test_accuracy"], res["train_seconds"]
            runs.append(
                {"seed": run["seed"], "overrides": run["overrides"], "test_accuracy": acc, "train_seconds": seconds}
            )
            print(f"  test accuracy {acc:.4f}", flush=True)
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
