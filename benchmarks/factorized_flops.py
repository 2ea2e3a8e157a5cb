"""CoaT's factorized attention is linear in the sequence length: flop counts against softmax attention.

One attention module (dim 64, 4 heads of 16, no masks) on one sequence of N tokens, for softmax
(SDPA), ``factorized`` and ``coat`` (square grids); torch's flop counter (matmuls, SDPA,
convolutions), so the numbers do not depend on the machine or its load. Time is not measured.

    python benchmarks/factorized_flops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from _vision import count_flops, finish, start

import attnlib

SIDES = (16, 32, 64, 128)  # square grids: N = 256 .. 16384
VARIANTS = ("softmax", "factorized", "coat")


def main() -> None:
    meta = start()
    torch.set_num_threads(1)
    flops: dict[str, dict[int, int]] = {v: {} for v in VARIANTS}
    for v in VARIANTS:
        attn = attnlib.Attention(64, 4, variant=v).eval()
        for side in SIDES:
            n = side * side
            flops[v][n] = count_flops(attn, torch.randn(1, n, 64))
    rows = []
    for side in SIDES:
        n = side * side
        soft = flops["softmax"][n]
        rows.append(
            [f"{n:,}", *(f"{flops[v][n] / 1e6:,.1f}" for v in VARIANTS), f"{soft / flops['factorized'][n]:.1f}x"]
        )
    md = (
        "# Factorized attention (CoaT) vs softmax attention: flops against the sequence length\n\n<!-- machine -->"
        "`attnlib.Attention(64, 4, variant=...)` (4 heads of 16 channels, projections included) on one sequence "
        "of N tokens, torch's flop count in MFLOPs. Softmax grows as N², factorized and coat (factorized + "
        "convolutional relative position encoding on a square grid) as N.\n\n"
        + markdown_table(["N", *VARIANTS, "softmax / factorized"], rows)
        + "\n"
    )
    finish("factorized_flops", meta, {"flops": {v: {str(n): f for n, f in d.items()} for v, d in flops.items()}}, md)
    print(md)


if __name__ == "__main__":
    main()
