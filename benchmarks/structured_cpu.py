"""Sparse and structured variants against the ``softmax`` module at the same N (CPU).

Each row builds two ``attnlib.Attention`` modules (dim 512, 8 heads, B=1, fp32, projections
included in both): the variant (its YAML defaults, ``benchmark_kwargs(N)`` and the row's kwargs)
and ``variant="softmax"``. Time: the two are timed interleaved in one fresh process
(``torch.utils.benchmark`` blocks, order shuffled each round, median of the rounds); the ratio is
variant / softmax. "fwd" runs in eval mode under ``torch.no_grad``; "fwd+bwd" runs in training
mode (auxiliary losses included) and backpropagates ``y.sum()`` (+ the aux loss). Memory: peak RSS
growth of one call of the variant alone in another fresh process (``VmHWM - VmRSS``; first call,
so it includes one-time allocations, which are small next to the sizes measured). A row whose
process dies or runs past its timeout is recorded as such. The short-sequence rows use a
(64, 17, 64) batch with 4 heads.

    python benchmarks/structured_cpu.py --threads 2 --out structured_cpu_2t
    python benchmarks/structured_cpu.py --threads 1 --rows memory --out structured_cpu_memory
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from _common import RESULTS, machine_info, markdown_table

# (variant, N, pass, kwargs, target ratio vs softmax or None)
TIME_ROWS: list[tuple[str, int, str, dict[str, Any], float | None]] = [
    ("sparsifiner", 4096, "fwd", {}, 0.5),
    ("sparsifiner", 4096, "fwd", {"selection": "blocks"}, 0.5),
    ("aft_full", 8192, "fwd", {}, 1.5),
    ("swinbert_mask", 8192, "fwd", {"num_tokens": 8192}, 1.0),
    ("entmax", 4096, "fwd", {}, 10.0),
    ("sinkhorn", 4096, "fwd", {}, None),
    ("got", 4096, "fwd", {}, None),
    ("seer", 16384, "fwd", {"density": 0.1}, 0.2),
    ("kernelized_rpe", 16384, "fwd", {}, 1.0),
]
# (variant, N, pass, kwargs, limit in GiB or None)
MEMORY_ROWS: list[tuple[str, int, str, dict[str, Any], float | None]] = [
    ("softmax", 4096, "fwd+bwd", {}, None),
    ("sparsifiner", 4096, "fwd", {}, None),
    ("sparsifiner", 4096, "fwd+bwd", {}, 2.0),
    ("aft_full", 8192, "fwd", {}, None),
    ("sinkhorn", 16384, "fwd", {}, 8.0),
    ("sinkhorn", 4096, "fwd+bwd", {}, 8.0),
    ("got", 16384, "fwd", {}, 8.0),
    ("got", 4096, "fwd+bwd", {}, 8.0),
    ("entmax", 4096, "fwd", {}, None),
]
SHORT_VARIANTS = [
    "sparsifiner",
    "aft_full",
    "swinbert_mask",
    "entmax",
    "sinkhorn",
    "got",
    "seer",
    "kernelized_rpe",
    "ecoformer",
    "mosa",
]


def _module(variant: str, n: int, dim: int, heads: int, kwargs: dict[str, Any]) -> Any:
    import attnlib
    from attnlib.bench.methods import variant_defaults
    from attnlib.registry import get_variant

    kw = {**variant_defaults(variant), **get_variant(variant).benchmark_kwargs(n), **kwargs}
    kw.pop("variant", None)
    return attnlib.Attention(dim=dim, num_heads=heads, variant=variant, **kw)


def _call(mod: Any, x: Any, mode: str) -> Any:
    import torch

    import attnlib

    if mode == "fwd":
        mod.eval()

        def fwd() -> None:
            with torch.no_grad():
                mod(x)

        return fwd
    mod.train()

    def fwd_bwd() -> None:
        y = mod(x)
        loss = y.float().sum()
        aux = attnlib.aux_loss(mod)
        if aux is not None:
            loss = loss + aux
        loss.backward()
        mod.zero_grad(set_to_none=True)

    return fwd_bwd


def time_pair(
    variant: str, n: int, mode: str, kwargs: dict[str, Any], threads: int, runs: int, batch: int, dim: int, heads: int
) -> dict[str, Any]:
    """Interleaved medians of the variant and the softmax module (run in a fresh process)."""
    import torch

    from attnlib.bench.timing import time_cpu_interleaved

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, n, dim)
    fns = {
        "softmax": _call(_module("softmax", n, dim, heads, {}), x, mode),
        variant: _call(_module(variant, n, dim, heads, kwargs), x, mode),
    }
    t = time_cpu_interleaved(fns, runs=runs, warmup=1, threads=threads, shuffle=0, block_s=0.2)
    return {k: v.as_dict() for k, v in t.items()}


def peak_memory(variant: str, n: int, mode: str, kwargs: dict[str, Any], threads: int) -> dict[str, Any]:
    """Peak RSS growth of one call (run in a fresh process)."""
    import torch

    from attnlib.bench.isolate import peak_rss_growth

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(1, n, 512)
    return peak_rss_growth(_call(_module(variant, n, 512, 8, kwargs), x, mode), warmup=False)


def main() -> None:
    from attnlib.bench.isolate import IsolatedError, run_isolated
    from attnlib.bench.machine import load_average

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rows", default="time,memory,short", help="comma list of: time, memory, short")
    p.add_argument("--only", default="", help="comma list of variants to run (default all)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default="structured_cpu")
    a = p.parse_args()
    only = set(filter(None, a.only.split(",")))
    which = set(a.rows.split(","))
    started = dt.datetime.now(dt.UTC)
    info = machine_info(a.threads)
    rows: list[dict[str, Any]] = []

    def keep(variant: str) -> bool:
        return not only or variant in only

    def save(done: bool) -> None:
        result = {
            "command": "python benchmarks/structured_cpu.py " + " ".join(sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds") if done else None,
            "machine": info,
            "load_at_end": load_average(),
            "rows": rows,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{a.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{a.out}.md").write_text(_markdown(result))

    def log(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
        save(False)  # every finished row is on disk, should a later one run out of time

    def timed(table: str, variant: str, n: int, mode: str, kw: dict[str, Any], tgt: float | None, *shape: int) -> None:
        load = load_average()
        row: dict[str, Any] = {"table": table, "variant": variant, "n": n, "pass": mode, "kwargs": kw}
        try:
            t = run_isolated(time_pair, variant, n, mode, kw, a.threads, a.runs, *shape, timeout=a.timeout)
            row |= {
                "softmax_s": t["softmax"]["median_s"],
                "variant_s": t[variant]["median_s"],
                "ratio": t[variant]["median_s"] / t["softmax"]["median_s"],
                "noise": max(t["softmax"]["noise"], t[variant]["noise"]),
                "timings": t,
            }
        except IsolatedError as e:
            row["error"] = str(e).splitlines()[0]
        row |= {"target": tgt, "load_before": load, "load_after": load_average()}
        log(row)

    if "time" in which:
        for variant, n, mode, kw, target in TIME_ROWS:
            if keep(variant):
                timed("time", variant, n, mode, kw, target, 1, 512, 8)
    if "memory" in which:
        for variant, n, mode, kw, limit in MEMORY_ROWS:
            if not keep(variant):
                continue
            row = {"table": "memory", "variant": variant, "n": n, "pass": mode, "kwargs": kw, "limit_gib": limit}
            try:
                m = run_isolated(peak_memory, variant, n, mode, kw, a.threads, timeout=a.timeout)
                row |= {"peak_gib": m["peak_bytes"] / 2**30, "method": m["method"]}
            except IsolatedError as e:
                row["error"] = str(e).splitlines()[0]
            log(row)
    if "short" in which:
        for variant in SHORT_VARIANTS:
            if keep(variant):
                limit = 10.0 if variant in ("sinkhorn", "got") else 3.0
                timed("short", variant, 17, "fwd+bwd", {}, limit, 64, 64, 4)
    save(True)


def _verdict(row: dict[str, Any], key: str, target: float | None, noisy: bool) -> str:
    if "error" in row:
        return "did not complete"
    if target is None:
        return ""
    ok = row[key] <= target
    if noisy and key == "ratio":
        return ("within" if ok else "over") + " (under load: provisional)"
    return "met" if ok else "missed"


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    noisy = bool(m["loadavg"] and max(m["loadavg"][:1] + (r["load_at_end"] or [0])[:1]) > 0.5 * (m["cores"] or 1))
    out = [
        f"# Sparse and structured variants vs the softmax module ({m['threads']} threads)",
        "",
        f"Machine: CPU `{m['cpu']}` ({m['cores']} cores, {m['threads']} torch threads, {m['cpu_capability']}); "
        f"torch {m['torch']}, Python {m['python']}; commit `{m['commit']}`; {r['started']} to "
        + (r["finished"] or "(not finished: the rows below are those completed)")
        + ".",
        f"Load average (1/5/15 min) at start {m['loadavg']}, at end {r['load_at_end']}."
        + (
            " **Taken under load** (a shared machine): the time ratios are provisional; memory is load-independent."
            if noisy
            else ""
        ),
        "",
        f"Regenerate: `{r['command']}`",
        "",
        "dim 512, 8 heads, B=1, fp32, projections included; ratio = variant / `softmax` module at the same N,"
        " timed interleaved in one fresh process (medians); noise = interquartile range / median (the larger of"
        " the two). Memory = peak RSS growth of one call in a fresh process.",
        "",
    ]
    rows = r["rows"]
    t = [x for x in rows if x["table"] == "time"]
    if t:
        out += ["## Time (eval forward)", ""]
        out.append(
            markdown_table(
                ["variant", "N", "kwargs", "softmax s", "variant s", "ratio", "noise", "target", "verdict", "load"],
                [
                    [
                        x["variant"],
                        x["n"],
                        json.dumps(x["kwargs"]) if x["kwargs"] else "",
                        f"{x['softmax_s']:.3f}" if "ratio" in x else "",
                        f"{x['variant_s']:.3f}" if "ratio" in x else x.get("error", ""),
                        f"{x['ratio']:.2f}x" if "ratio" in x else "",
                        f"{x['noise']:.2f}" if "ratio" in x else "",
                        f"<= {x['target']}x" if x["target"] else "",
                        _verdict(x, "ratio", x["target"], noisy),
                        f"{x['load_before'][0]:.1f}" if x["load_before"] else "",
                    ]
                    for x in t
                ],
            )
        )
        out.append("")
    mm = [x for x in rows if x["table"] == "memory"]
    if mm:
        out += ["## Peak memory", ""]
        out.append(
            markdown_table(
                ["variant", "N", "pass", "peak GiB", "limit", "verdict"],
                [
                    [
                        x["variant"],
                        x["n"],
                        x["pass"],
                        f"{x['peak_gib']:.3f}" if "peak_gib" in x else x.get("error", ""),
                        f"<= {x['limit_gib']} GiB" if x["limit_gib"] else "",
                        _verdict(x, "peak_gib", x["limit_gib"], noisy),
                    ]
                    for x in mm
                ],
            )
        )
        out.append("")
    s = [x for x in rows if x["table"] == "short"]
    if s:
        out += ["## Short sequences: (64, 17, 64) batch, 4 heads, forward+backward (training mode)", ""]
        out.append(
            markdown_table(
                ["variant", "softmax ms", "variant ms", "ratio", "noise", "target", "verdict", "load"],
                [
                    [
                        x["variant"],
                        f"{x['softmax_s'] * 1e3:.1f}" if "ratio" in x else "",
                        f"{x['variant_s'] * 1e3:.1f}" if "ratio" in x else x.get("error", ""),
                        f"{x['ratio']:.2f}x" if "ratio" in x else "",
                        f"{x['noise']:.2f}" if "ratio" in x else "",
                        f"<= {x['target']}x",
                        _verdict(x, "ratio", x["target"], noisy),
                        f"{x['load_before'][0]:.1f}" if x["load_before"] else "",
                    ]
                    for x in s
                ],
            )
        )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
