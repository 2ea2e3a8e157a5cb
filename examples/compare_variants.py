"""Print the capability matrix and a short CPU comparison of every registered variant.

For each variant (default options): forward time at B=1, H=8, N=1024, D=64, fp32 (median of
interleaved runs) and its error against exact float64 softmax attention on Gaussian q/k with
logit scale 1. Exact variants show ~1e-7 (fp32 rounding); local is exact *within its window*,
so its error here is how far its window is from global attention.

Run: ``python examples/compare_variants.py [--n 1024] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import interleaved_medians, markdown_table

import attnlib
from attnlib.cli.info import capability_matrix
from attnlib.functional import reference_attention
from attnlib.masks import normalize_mask
from attnlib.registry import get_variant
from attnlib.testing import make_qkv, max_error, rel_error


def main() -> None:
    """Print the matrix and the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, h, n, d = 1, 8, args.n, 64
    print("## Capability matrix\n")
    print(capability_matrix())
    q, k, v = make_qkv(b, h, n, d, dtype=torch.float64, seed=0)
    exact = reference_attention(q, k, v)
    qf, kf, vf = q.float(), k.float(), v.float()
    am = normalize_mask(None, causal=False, batch=b, heads=h, n=n, m=n, device=q.device)
    rows, fns, outs = [], {}, {}
    for name in attnlib.available():
        torch.manual_seed(0)
        core = get_variant(name)(num_heads=h, head_dim=d).eval()
        with torch.inference_mode():
            outs[name] = core(qf, kf, vf, am).out
        fns[name] = lambda c=core: c(qf, kf, vf, am)
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats=args.repeats, warmup=1)
    base = med.get("softmax")
    for name in attnlib.available():
        caps = attnlib.variant_info(name)
        rows.append(
            [
                f"`{name}`",
                caps.complexity,
                "yes" if caps.exact else "no",
                f"{med[name] * 1e3:.2f}",
                f"{base / med[name]:.2f}x" if base else "-",
                f"{max_error(outs[name], exact):.2e}",
                f"{rel_error(outs[name], exact):.2e}",
            ]
        )
    print(f"\n## CPU comparison: B={b}, H={h}, N={n}, D={d}, fp32, {args.threads} threads, non-causal\n")
    print(
        markdown_table(
            [
                "variant",
                "complexity",
                "exact",
                "forward ms (median)",
                "speed vs softmax",
                "max abs err vs softmax",
                "rel err vs softmax",
            ],
            rows,
        )
    )
    print("\nSwap the attention of a module by name: attnlib.Attention(dim, heads, variant='<name>').")


if __name__ == "__main__":
    main()
