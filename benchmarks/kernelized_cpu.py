"""``kernelized_rpe`` scaling on CPU: O(N log N) by FFT, checked against N = 16384.

Times the core functional :func:`attnlib.functional.kernelized_rpe_attention` (forward, fp32,
``torch.inference_mode``) for N = 1024 .. 16384, causal and not, B=1, H=4, D=32, m=16 random
features (the paper's MT setting), and - for context - exact softmax attention (SDPA, O(N^2)).
Each size is timed as the median of interleaved runs (sizes round-robin, so a busy machine
slows all of them alike). The bar: time(16384) / time(4096) <= 6 (N log N predicts 4.6).

Writes benchmarks/results/kernelized_cpu.{md,json}. Run: ``python benchmarks/kernelized_cpu.py``
(``--quick`` for a 1k/4k smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, machine_info, markdown_table

from attnlib.functional.kernelized import draw_random_features, kernelized_rpe_attention


def main() -> None:
    """Time every size, write the table and the 16k/4k ratios."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="1 by default: on a shared 2-core machine 2 threads time contention"
    )
    ap.add_argument("--no-softmax", action="store_true", help="skip the SDPA reference")
    ap.add_argument("--quick", action="store_true", help="sizes 1024 4096, 3 repeats, no files written")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats = [1024, 4096], 3
    torch.set_num_threads(args.threads)
    h, d, m = args.heads, args.head_dim, args.features
    g = torch.Generator().manual_seed(0)
    w = draw_random_features(m, d, generator=g)
    fns = {}
    for n in args.sizes:
        q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
        bias = torch.randn(h, 2 * n - 1, generator=g) * 0.5
        for causal in (False, True):
            fns[f"kernelized_rpe causal={causal} N={n}"] = lambda q=q, k=k, v=v, b=bias, c=causal: (
                kernelized_rpe_attention(q, k, v, b, w, causal=c)
            )
            if not args.no_softmax:
                fns[f"softmax (SDPA) causal={causal} N={n}"] = lambda q=q, k=k, v=v, c=causal: (
                    F.scaled_dot_product_attention(q, k, v, is_causal=c)
                )
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats=args.repeats, warmup=1)
    rows, ratios = [], {}
    for causal in (False, True):
        for n in args.sizes:
            kr = med[f"kernelized_rpe causal={causal} N={n}"]
            sm = med.get(f"softmax (SDPA) causal={causal} N={n}")
            rows.append([causal, n, f"{kr * 1e3:.1f}", "-" if sm is None else f"{sm * 1e3:.1f}"])
        lo, hi = 4096, max(args.sizes)
        if lo in args.sizes and hi > lo:
            r = med[f"kernelized_rpe causal={causal} N={hi}"] / med[f"kernelized_rpe causal={causal} N={lo}"]
            ratios[f"causal={causal}"] = r
    predicted = None
    if ratios:
        hi = max(args.sizes)
        predicted = hi * math.log2(2 * hi) / (4096 * math.log2(2 * 4096))
    info = machine_info()
    table = markdown_table(["causal", "N", "kernelized_rpe (ms)", "softmax SDPA (ms)"], rows)
    ratio_lines = "\n".join(
        f"- time(N={max(args.sizes)}) / time(N=4096), {k}: **{v:.2f}** (bar <= 6; N log N predicts {predicted:.2f})"
        for k, v in ratios.items()
    )
    text = (
        f"# kernelized_rpe on CPU: O(N log N)\n\n"
        f"Forward of `kernelized_rpe_attention`, B=1, H={h}, D={d}, m={m} random features, fp32, "
        f"CPU `{info['cpu']}`, {args.threads} threads, torch {info['torch']}, commit {info['commit']}; "
        f"median of {args.repeats} interleaved runs (all sizes round-robin). Measured on a shared, busy "
        f"machine: compare ratios, not absolute times.\n\n{table}\n\n{ratio_lines}\n"
    )
    print(text)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernelized_cpu.md").write_text(text)
    (RESULTS / "kernelized_cpu.json").write_text(
        json.dumps(
            {
                "machine": info,
                "config": {"heads": h, "head_dim": d, "features": m, "repeats": args.repeats},
                "median_s": med,
                "ratio_16k_over_4k": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
