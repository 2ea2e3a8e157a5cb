"""Variant / softmax ratios in thread CPU time (1 thread): a load-robust companion of structured_cpu.py.

On a shared machine wall-clock time mostly measures how long a process waited for a core; the CPU
time of the (single) compute thread does not (memory and cache contention from other processes
still shows). Each row builds the same modules as ``benchmarks/structured_cpu.py`` (dim 512,
8 heads, B=1, fp32, projections included, eval forward under ``torch.no_grad``) and times the
variant and the ``softmax`` module interleaved in one process with ``time.thread_time``; the
ratio is of the medians. The ``sdpa_mask`` row times the attention alone: one SDPA call with a
cached (1, 1, N, N) float mask that keeps half the pairs at random (what ``swinbert_mask`` runs for
its untrained binarised mask) against the unmasked call.

    python benchmarks/cpu_time_ratios.py --runs 5 --out cpu_time_ratios
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import RESULTS, machine_info, markdown_table
from structured_cpu import _module

ROWS: list[tuple[str, int, dict[str, Any], float | None]] = [
    ("seer", 16384, {"density": 0.1}, 0.2),
    ("swinbert_mask", 8192, {"num_tokens": 8192}, 1.0),
    ("sdpa_mask", 8192, {}, None),
]


def _pair(variant: str, n: int, kwargs: dict[str, Any]) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if variant == "sdpa_mask":
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        keep = (torch.rand(n, n) < 0.5) | torch.eye(n, dtype=torch.bool)
        bias = torch.zeros(1, 1, n, n).masked_fill_(~keep, float("-inf"))
        return {
            "softmax": lambda: F.scaled_dot_product_attention(q, k, v),
            variant: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        }
    x = torch.randn(1, n, 512)
    mods = {"softmax": _module("softmax", n, 512, 8, {}), variant: _module(variant, n, 512, 8, kwargs)}
    for m in mods.values():
        m.eval()
    return {name: (lambda m=m: m(x)) for name, m in mods.items()}


def time_row(variant: str, n: int, kwargs: dict[str, Any], runs: int) -> dict[str, Any]:
    """Median thread CPU seconds of the variant and of softmax, interleaved (one warm-up call each)."""
    import torch

    torch.set_num_threads(1)
    fns = _pair(variant, n, kwargs)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.thread_time()
                fn()
                times[name].append(time.thread_time() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"softmax_cpu_s": med["softmax"], "variant_cpu_s": med[variant], "times": times}


def main() -> None:
    from attnlib.bench.machine import load_average

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default="", help="comma list of rows (variants) to run (default all)")
    p.add_argument("--out", default="cpu_time_ratios")
    a = p.parse_args()
    only = set(filter(None, a.only.split(",")))
    started = dt.datetime.now(dt.UTC)
    info = machine_info(1)
    rows = []
    for variant, n, kw, target in ROWS:
        if only and variant not in only:
            continue
        load = load_average()
        row = {"variant": variant, "n": n, "kwargs": kw, "target": target, "load_before": load}
        row |= time_row(variant, n, kw, a.runs)
        row["ratio"] = row["variant_cpu_s"] / row["softmax_cpu_s"]
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
        rows.append(row)
    result = {
        "command": "python benchmarks/cpu_time_ratios.py " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "load_at_end": load_average(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    md = [
        "# Variant / softmax in thread CPU time (1 thread)",
        "",
        f"Machine: CPU `{m['cpu']}` ({m['cores']} cores, 1 torch thread, {m['cpu_capability']}); torch {m['torch']}; "
        f"commit `{m['commit']}`; {result['started']} to {result['finished']}. Load average (1/5/15 min) at start "
        f"{m['loadavg']}, at end {result['load_at_end']}.",
        "",
        f"Regenerate: `{result['command']}`",
        "",
        "Medians of interleaved calls, CPU time of the one compute thread (waiting for a core is not counted;"
        " memory and cache contention from other processes is). Modules as in `structured_cpu.py` (eval"
        " forward, projections included); `sdpa_mask` is attention alone: SDPA with a cached float mask that"
        " keeps half the pairs at random vs unmasked SDPA.",
        "",
        markdown_table(
            ["row", "N", "kwargs", "softmax CPU s", "variant CPU s", "ratio", "target", "load"],
            [
                [
                    x["variant"],
                    x["n"],
                    json.dumps(x["kwargs"]) if x["kwargs"] else "",
                    f"{x['softmax_cpu_s']:.3f}",
                    f"{x['variant_cpu_s']:.3f}",
                    f"{x['ratio']:.3f}x",
                    f"<= {x['target']}x" if x["target"] else "",
                    f"{x['load_before'][0]:.1f}" if x["load_before"] else "",
                ]
                for x in rows
            ],
        ),
        "",
    ]
    (RESULTS / f"{a.out}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
