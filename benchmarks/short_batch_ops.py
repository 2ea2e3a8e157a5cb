"""Aten ops and time of one training step on a short batch, variant vs the ``softmax`` module (CPU).

A (64, 17, 64) batch, 4 heads, forward + backward (auxiliary losses included), as the short rows of
``structured_cpu.py``; besides the interleaved medians it counts the aten ops of one step with
``torch.profiler``: on a busy machine each op waits for the thread pool, so the op count says what
the medians cannot. The first call (where a variant learns something once, e.g. EcoFormer's hash)
is timed on its own. Run it in two checkouts to compare (``--label``).

    python benchmarks/short_batch_ops.py --only seer,ecoformer --label after
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def measure(variant: str, threads: int, runs: int) -> dict[str, Any]:
    """First-call time, interleaved medians and aten op counts of one step (variant and softmax)."""
    import torch

    import attnlib
    from attnlib.bench.methods import variant_defaults
    from attnlib.bench.timing import aten_op_counts, time_cpu_interleaved
    from attnlib.registry import get_variant

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(64, 17, 64)

    def step_of(name: str) -> Any:
        kw = {**variant_defaults(name), **get_variant(name).benchmark_kwargs(17)}
        kw.pop("variant", None)
        mod = attnlib.Attention(dim=64, num_heads=4, variant=name, **kw).train()

        def step() -> None:
            loss = mod(x).sum()
            aux = attnlib.aux_loss(mod)
            (loss if aux is None else loss + aux).backward()
            mod.zero_grad(set_to_none=True)

        return step

    fns = {variant: step_of(variant), "softmax": step_of("softmax")}
    t0 = time.perf_counter()
    fns[variant]()
    first = time.perf_counter() - t0
    t = time_cpu_interleaved(fns, runs=runs, warmup=1, threads=threads, shuffle=0, block_s=0.2)
    ops = aten_op_counts(fns)
    return {
        "variant": variant,
        "first_call_s": first,
        "variant_ms": t[variant].median_s * 1e3,
        "softmax_ms": t["softmax"].median_s * 1e3,
        "ratio": t[variant].median_s / t["softmax"].median_s,
        "noise": max(t[variant].noise, t["softmax"].noise),
        "aten_ops": ops[variant],
        "softmax_aten_ops": ops["softmax"],
    }


def main() -> None:
    from attnlib.bench.machine import load_average

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="seer,ecoformer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--label", default="this checkout")
    a = p.parse_args()
    for v in a.only.split(","):
        row = {"label": a.label, "threads": a.threads, "load": load_average(), **measure(v, a.threads, a.runs)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
