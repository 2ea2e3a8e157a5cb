"""Print the capability matrix and a short CPU comparison of every registered variant.

For each variant (its YAML defaults, sized for N by the variant's ``benchmark_kwargs(n)`` as in
``attnlib-bench``, e.g. a maximum length >= N): forward time at B=1, H=8, N=1024, D=64, fp32
(median of interleaved runs) and its error against exact float64 softmax attention on Gaussian
q/k with logit scale 1. Exact variants show ~1e-7 (fp32 rounding) where they see every key;
those that restrict the keys (local's window, the block layouts of block_sparse and grat) are
exact *within their mask*, so their error here is how far that mask is from global attention.

Run: ``python examples/compare_variants.py [--n 1024] [--threads 2]``; ``--smoke`` runs every
variant at small sizes (N=256, H=2, D=16, one timed run) to check that the example works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import interleaved_medians, markdown_table

import attnlib
from attnlib.bench.methods import MethodSpec
from attnlib.cli.info import capability_matrix
from attnlib.functional import reference_attention
from attnlib.masks import normalize_mask
from attnlib.testing import make_qkv, max_error, rel_error


def main(argv: list[str] | None = None) -> None:
    """Print the matrix and the comparison table (``argv``: the command-line arguments)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="sequence length (default 1024; --smoke: 256)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 8; --smoke: 2)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim (default 64; --smoke: 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; --smoke: 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that every variant runs")
    args = ap.parse_args(argv)

    def pick(value: int | None, full: int, tiny: int) -> int:
        return value if value is not None else (tiny if args.smoke else full)

    b, h, n, d = 1, pick(args.heads, 8, 2), pick(args.n, 1024, 256), pick(args.head_dim, 64, 16)
    repeats = pick(args.repeats, 5, 1)
    torch.set_num_threads(args.threads)
    print("## Capability matrix\n")
    print(capability_matrix())
    q, k, v = make_qkv(b, h, n, d, dtype=torch.float64, seed=0)
    exact = reference_attention(q, k, v)
    qf, kf, vf = q.float(), k.float(), v.float()
    am = normalize_mask(None, causal=False, batch=b, heads=h, n=n, m=n, device=q.device)
    rows, fns, outs = [], {}, {}
    for name in attnlib.available():
        torch.manual_seed(0)
        spec = MethodSpec(label=name, variant=name)  # YAML defaults + benchmark_kwargs(n), as attnlib-bench
        core = spec.core_class()(num_heads=h, head_dim=d, **spec.ctor_kwargs(n)).eval()
        with torch.inference_mode():
            outs[name] = core(qf, kf, vf, am).out
        fns[name] = lambda c=core: c(qf, kf, vf, am)
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats=repeats, warmup=1)
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
