"""Overhead of ``attnlib.Attention(variant="softmax")`` over hand-written attention (CPU).

Both use the same weights: fused q/k/v projection, SDPA, output projection. B=1, N=4096,
dim=512, 8 heads, fp32, forward under ``torch.inference_mode``; medians of interleaved runs.
Writes benchmarks/results/module_overhead.md. Run: ``python benchmarks/module_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, machine_info, markdown_table

import attnlib


def main() -> None:
    """Time both paths and write the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = attnlib.Attention(args.dim, args.heads, variant="softmax").eval()
    w, b = attn.in_proj.weight, attn.in_proj.bias
    wo, bo = attn.out_proj.weight, attn.out_proj.bias
    h, d = args.heads, args.dim // args.heads
    x = torch.randn(1, args.n, args.dim)

    def by_hand() -> torch.Tensor:
        qkv = F.linear(x, w, b).view(1, args.n, 3, h, d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return F.linear(o.transpose(1, 2).reshape(1, args.n, args.dim), wo, bo)

    with torch.inference_mode():
        torch.testing.assert_close(attn(x), by_hand())
        med = interleaved_medians({"attnlib": lambda: attn(x), "hand-written": by_hand}, repeats=args.repeats)
    ratio = med["attnlib"] / med["hand-written"]
    info = machine_info()
    table = markdown_table(
        ["path", "median forward (ms)"],
        [[k, f"{v * 1e3:.2f}"] for k, v in med.items()] + [["ratio attnlib / hand-written", f"{ratio:.3f}"]],
    )
    text = (
        f"# Attention(variant='softmax') overhead\n\nB=1, N={args.n}, dim={args.dim}, heads={h}, fp32, "
        f"CPU `{info['cpu']}`, {args.threads} threads, torch {info['torch']}, commit {info['commit']}; "
        f"median of {args.repeats} interleaved runs.\n\n{table}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "module_overhead.md").write_text(text)
    (RESULTS / "module_overhead.json").write_text(
        json.dumps({"machine": info, "median_s": med, "ratio": ratio}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
