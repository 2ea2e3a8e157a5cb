"""Conditional positional encodings (PEG) vs learned absolute positions: train on 8x8 digits, test larger.

CPVT's headline property (Chu et al., ICLR 2023): positions generated from the local neighbourhood by a
zero-padded depthwise convolution let a ViT take larger inputs than it was trained on. Each model is
``experiment=vit_digits`` (patch 2: a 4x4 grid) with one position scheme, ``model.dynamic_img_size=true``,
trained for ``--steps``; every model is then tested on the 360 test digits

* as trained (8x8),
* padded: the digit pasted into a 12x12 or 16x16 canvas of blank pixels, centred or at a random
  patch-aligned offset (the patches are the training patches; only the grid is larger),
* upscaled: 16x16 by nearest-neighbour x2 (every patch a new, constant one).

The learned table is resized bicubically to the larger grid (DeiT / timm practice). Rows: learned
absolute, PEG (class token), PEG + mean pooling (CPVT-GAP), GTA with a fixed coordinate step (2-D
rotations of the patch positions at the training scale), and no positions.

    python benchmarks/cpe_resolution.py [--steps 1000] [--seeds 0] [--work DIR]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_work_dir, markdown_table
from _vision import arguments, finish, start, train_seeds

ROWS: dict[str, tuple[str, list[str]]] = {
    "learned": ("learned absolute (bicubic resize)", ["model.pos=learned"]),
    "peg": ("PEG after block 0", ["model.pos=peg"]),
    "peg_gap": ("PEG + mean pooling (CPVT-GAP)", ["model.pos=peg", "model.pool=mean"]),
    "gta": ("GTA so2, coordinate step 1/4", ["model.pos=gta", "model.pos_options={coord_scale:0.25}"]),
    "none": ("no positions", ["model.pos=none"]),
}
SETS = ("8x8", "pad12 centre", "pad16 centre", "pad16 random", "up16 nearest")


def canvas(x: torch.Tensor, side: int, fill: float, offsets: torch.Tensor) -> torch.Tensor:
    """x (B, 1, 8, 8) pasted into a (B, 1, side, side) canvas of ``fill`` at per-image (dy, dx) offsets."""
    out = torch.full((x.shape[0], 1, side, side), fill, dtype=x.dtype)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i, :, dy : dy + 8, dx : dx + 8] = x[i]
    return out


def test_sets(data) -> dict[str, torch.Tensor]:
    """The evaluation inputs built from the test split."""
    x = data.x["test"]
    b = x.shape[0]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 5, (b, 2), generator=g) * 2  # patch-aligned offsets 0..8 in a 16x16 canvas
    return {
        "8x8": x,
        "pad12 centre": canvas(x, 12, data._fill, torch.full((b, 2), 2)),
        "pad16 centre": canvas(x, 16, data._fill, torch.full((b, 2), 4)),
        "pad16 random": canvas(x, 16, data._fill, rand),
        "up16 nearest": F.interpolate(x, scale_factor=2, mode="nearest"),
    }


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def main() -> None:
    args = arguments(__doc__, steps=1000, seeds="0", rows=list(ROWS))
    meta = start()
    torch.set_num_threads(1)
    work = Path(args.work or default_work_dir("attnlib-cpe-resolution"))
    seeds = args.seeds
    records: dict[str, dict] = {}
    for name in args.rows.split(","):
        label, ov = ROWS[name]
        per_seed = []
        for run in train_seeds(
            name, ["experiment=vit_digits", "model.dynamic_img_size=true", *ov], args.steps, seeds, work
        ):
            data = run["data"]
            accs = {k: accuracy(run["model"], v, data.y["test"]) for k, v in test_sets(data).items()}
            seconds = run["results"]["train_seconds"]
            per_seed.append(
                {"seed": run["seed"], "overrides": run["overrides"], "accuracy": accs, "train_seconds": seconds}
            )
            print(f"  {accs}", flush=True)
        mean = {k: statistics.mean(r["accuracy"][k] for r in per_seed) for k in SETS}
        records[name] = {"label": label, "mean_accuracy": mean, "runs": per_seed}
    rows = [[records[n]["label"], *(f"{100 * records[n]['mean_accuracy'][k]:.1f}%" for k in SETS)] for n in records]
    md = (
        "# Conditional positional encodings: train on 8x8 digits, test on larger inputs\n\n<!-- machine -->"
        f"ViT of `experiment=vit_digits` (patch 2, dim 64, depth 4, class token unless noted), {args.steps} training "
        f"steps, `model.dynamic_img_size=true`, seeds {seeds} (mean test accuracy over the seeds; per seed in the "
        "JSON). Test: the 360 test digits as trained (8x8), pasted into a blank 12x12 / 16x16 canvas (centred, or "
        "at a random patch-aligned offset), or upscaled x2 (nearest). The learned table is resized bicubically.\n\n"
        + markdown_table(["positions", *SETS], rows)
        + "\n"
    )
    finish("cpe_resolution", meta, {"steps": args.steps, "seeds": seeds, "rows": records}, md, work)
    print(md)


if __name__ == "__main__":
    main()
