"""How many threshold steps the fused entmax kernel needs: its error vs the float64 PyTorch entmax
when the steps are capped at 1, 2, 3, ... (each step is one QK^T pass over the keys; the kernel
also pays one pass for the row maxima and one for the output).

Runs the Triton kernel through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
here), so it measures the algorithm, not speed: fp32, B = H = 1, Gaussian q / k with logit
standard deviation 1, 3 and 10, alpha 1.5 (exact quadratic steps), 2 (exact linear steps) and
1.25 (Halley with bisection).

Usage: ``python benchmarks/entmax_kernel_steps.py [--n 128] [--d 64] [--out entmax_kernel_steps]``
(writes ``benchmarks/results/<out>.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

from attnlib.functional.entmax import entmax_attention
from attnlib.kernels import entmax_attention_fused
from attnlib.testing import make_qkv

CAPS = (1, 2, 3, 4, 6, 30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="queries = keys")
    ap.add_argument("--d", type=int, default=64, help="head dim")
    ap.add_argument("--out", default="entmax_kernel_steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info()
    t0 = time.time()
    rows, records = [], []
    for alpha in (1.5, 2.0, 1.25):
        for logit in (1.0, 3.0, 10.0):
            q, k, v = make_qkv(1, 1, args.n, args.d, logit_scale=logit, dtype=torch.float64, seed=1)
            ref = entmax_attention(q, k, v, alpha=alpha, n_iter=100)
            errs = {}
            for cap in CAPS:
                out = entmax_attention_fused(q.float(), k.float(), v.float(), alpha=alpha, n_iter=cap)
                errs[cap] = float((out.double() - ref).abs().max())
            weights = entmax_attention(q, k, v, alpha=alpha, return_weights=True)[1]
            support = float((weights > 0).sum(-1).double().mean())
            records.append({"alpha": alpha, "logit_std": logit, "mean_support": support, "max_abs_err": errs})
            rows.append([alpha, logit, f"{support:.1f}", *(f"{errs[c]:.0e}" for c in CAPS)])
            print(rows[-1], flush=True)
    wall = time.time() - t0
    cmd = f"python benchmarks/entmax_kernel_steps.py --n {args.n} --d {args.d} --out {args.out}"
    md = [
        "# Fused entmax kernel: error vs threshold steps",
        "",
        f"`{cmd}` - Triton interpreter on CPU (the algorithm, not speed), fp32, B = H = 1, N = M = {args.n}, "
        f"D = {args.d}; max |out - float64 PyTorch entmax| with the steps capped at each value (30: the default "
        f"cap, the tile stops when every row moved less than 1e-6·(1 + |tau|)).",
        "",
        f"Machine: {info['cpu']}, 1 thread, load average at start {info['loadavg']}; torch {info['torch']}, "
        f"triton {info['triton']}; commit {info['commit']}; {time.strftime('%Y-%m-%d', time.gmtime())}; "
        f"wall {wall:.0f} s.",
        "",
        markdown_table(["alpha", "logit std", "mean support", *(f"{c} steps" for c in CAPS)], rows),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(md))
    meta = {"command": cmd, "machine": info, "wall_s": wall}
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
