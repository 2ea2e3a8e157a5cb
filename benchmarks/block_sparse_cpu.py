"""Block-sparse attention on the CPU: attnlib's PyTorch path vs compiled FlexAttention vs dense SDPA.

Same masks for all three (an attnlib BlockMask, its ``to_flex()`` twin, and its dense bool
form for SDPA): causal, sliding window (|i - j| <= 256), document (packed documents of 384 /
640 / 512 tokens) and GRAT (2D token grid, 8 x 16 groups = one 128-block, criss-cross).
B=1, H=8, D=64, fp32, block 128, N = 1k .. 16k, forward (and forward + backward for
N <= --bwd-max-n, against SDPA: FlexAttention has no CPU backward). Timing: warm-up
(FlexAttention's compile time is excluded and reported separately), then the median of
repeats. With ``--isolate`` (the default) each implementation's forward is timed in its own
fresh process (same inputs from the same seed, same mask), ``--rounds`` times in a shuffled
order, and the median over rounds is reported: no implementation inherits another's allocator
state, caches or compiled graphs; ``--no-isolate`` interleaves the three in one process (the
earlier method). A correctness column (max |ours - Flex|) sits beside every timing.

Dense SDPA gets the dense bool mask up to --sdpa-mask-max-n (is_causal=True for causal);
beyond that the unmasked SDPA time is reported as the dense reference (marked *).

    python benchmarks/block_sparse_cpu.py                 # full sweep (~15-25 min on 2 cores)
    python benchmarks/block_sparse_cpu.py --n 4096 --masks sliding_window --out block_sparse_cpu_target  # target config

Writes benchmarks/results/block_sparse_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, machine_info, markdown_table

from attnlib.kernels import block_sparse_attention
from attnlib.masks import BlockMask

B, H, D, BLOCK = 1, 8, 64, 128
MASKS = ("causal", "sliding_window", "document", "grat")


def grat_grid(n: int) -> tuple[int, int]:
    """A 2D token grid with n tokens, both sides multiples of the 8 x 16 group."""
    rows = 2 ** (int(math.log2(n)) // 2)
    return rows, n // rows


def build_mask(kind: str, n: int) -> BlockMask:
    if kind == "causal":
        return BlockMask.causal(n, block_size=BLOCK)
    if kind == "sliding_window":
        return BlockMask.sliding_window(n, 256, block_size=BLOCK)
    if kind == "document":
        sizes, ids, doc = [384, 640, 512], [], 0
        while len(ids) < n:
            ids += [doc] * sizes[doc % 3]
            doc += 1
        return BlockMask.document(torch.tensor(ids[:n]), block_size=BLOCK)
    if kind == "grat":
        return BlockMask.grat(grat_grid(n), (8, 16), mode="criss_cross", block_size=BLOCK)
    raise ValueError(kind)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bwd-max-n", type=int, default=4096)
    ap.add_argument("--sdpa-mask-max-n", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="block_sparse_cpu")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="time each implementation's forward in its own process (default)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation (--isolate)")
    ap.add_argument("--child", choices=("ours", "flex", "sdpa"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_timing(args.child, args.n[0], args.masks[0], args)))
        return
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled graph per (N, mask): lift dynamo's recompile limit so Flex never falls back to eager
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 10_000
    flex = torch.compile(flex_attention, dynamic=False)
    rows: list[list[object]] = []
    records: list[dict[str, object]] = []
    for n in args.n:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        for kind in args.masks:
            rec, row = run_config(n, kind, q, k, v, flex, args)
            records.append(rec)
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
            _write(args.out, rows, records)  # after every config: an interrupted sweep keeps its results


def run_config(
    n: int, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flex, args: argparse.Namespace
) -> tuple[dict[str, object], list[object]]:
    """Time one (N, mask): ours vs Flex vs SDPA forward, and ours vs SDPA forward + backward
    (FlexAttention has no backward on the CPU)."""
    scale = D**-0.5
    dense_flops = 4 * B * H * n * n * D
    t0 = time.perf_counter()
    bm = build_mask(kind, n)
    build_s = time.perf_counter() - t0
    fm = bm.to_flex()
    dens = bm.density()
    t0 = time.perf_counter()
    ref = flex(q, k, v, block_mask=fm, scale=scale)
    compile_s = time.perf_counter() - t0
    err = float((block_sparse_attention(q, k, v, bm, scale=scale) - ref).abs().max())
    sdpa_note = ""
    if kind == "causal":
        sdpa_kw: dict[str, object] = {"is_causal": True}
    elif n <= args.sdpa_mask_max_n:
        sdpa_kw = {"attn_mask": bm.to_dense()}
    else:
        sdpa_kw, sdpa_note = {}, "*"

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **sdpa_kw)  # type: ignore[arg-type]

    fns = {
        "ours": lambda: block_sparse_attention(q, k, v, bm, scale=scale),
        "flex": lambda: flex(q, k, v, block_mask=fm, scale=scale),
        "sdpa": sdpa,
    }
    reps = args.repeats if n <= 4096 else max(3, args.repeats // 2)
    t = isolated_medians(n, kind, args) if args.isolate else interleaved_medians(fns, repeats=reps, warmup=1)
    rec: dict[str, object] = {
        "n": n,
        "mask": kind,
        "density": dens,
        "build_s": build_s,
        "flex_first_call_s": compile_s,
        "fwd_ms": {key: val * 1e3 for key, val in t.items()},
        "sdpa_masked": sdpa_note == "",
        "max_abs_err_vs_flex": err,
        "ours_over_flex": t["ours"] / t["flex"],
        "ours_over_sdpa": t["ours"] / t["sdpa"],
        "ours_eff_gflops": dense_flops / t["ours"] / 1e9,
        "ours_actual_gflops": dens * dense_flops / t["ours"] / 1e9,
    }
    fb_cell = "-"
    if n <= args.bwd_max_n:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def fwd_bwd(fn):
            def run() -> None:
                out = fn()
                out.backward(torch.ones_like(out))
                qg.grad = kg.grad = vg.grad = None

            return run

        bfns = {
            "ours": fwd_bwd(lambda: block_sparse_attention(qg, kg, vg, bm, scale=scale)),
            "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, scale=scale, **sdpa_kw)),  # type: ignore[arg-type]
        }
        tb = interleaved_medians(bfns, repeats=max(3, reps // 2), warmup=1)
        rec["fwd_bwd_ms"] = {key: val * 1e3 for key, val in tb.items()}
        rec["fwd_bwd_ours_over_sdpa"] = tb["ours"] / tb["sdpa"]
        fb_cell = f"{tb['ours'] * 1e3:.1f} / {tb['sdpa'] * 1e3:.1f} ({tb['ours'] / tb['sdpa']:.2f})"
    row = [
        n,
        kind,
        f"{dens:.3f}",
        f"{t['ours'] * 1e3:.1f}",
        f"{t['flex'] * 1e3:.1f}",
        f"{t['sdpa'] * 1e3:.1f}{sdpa_note}",
        f"**{t['ours'] / t['flex']:.2f}**",
        f"{t['ours'] / t['sdpa']:.2f}",
        f"{rec['ours_eff_gflops']:.0f} / {rec['ours_actual_gflops']:.0f}",
        fb_cell,
        f"{err:.1e}",
        f"{compile_s:.1f}",
    ]
    return rec, row


def _sdpa_kwargs(kind: str, n: int, bm: BlockMask, args: argparse.Namespace) -> dict[str, object]:
    if kind == "causal":
        return {"is_causal": True}
    return {"attn_mask": bm.to_dense()} if n <= args.sdpa_mask_max_n else {}


def child_timing(impl: str, n: int, kind: str, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: the median forward seconds of one implementation (and its first call)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    bm = build_mask(kind, n)
    scale = D**-0.5
    if impl == "ours":

        def fn() -> torch.Tensor:
            return block_sparse_attention(q, k, v, bm, scale=scale)

    elif impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        fm = bm.to_flex()

        def fn() -> torch.Tensor:
            return flex(q, k, v, block_mask=fm, scale=scale)

    else:
        kw = _sdpa_kwargs(kind, n, bm, args)

        def fn() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = args.repeats if n <= 4096 else max(3, args.repeats // 2)
    med = interleaved_medians({impl: fn}, repeats=reps, warmup=1)[impl]
    return {"median_s": med, "first_s": first}


def isolated_medians(n: int, kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Each implementation in its own process, ``args.rounds`` rounds in a shuffled order; the
    median over rounds of each process's median."""
    runs: dict[str, list[float]] = {"ours": [], "flex": [], "sdpa": []}
    rng = random.Random(n)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    for _ in range(args.rounds):
        order = list(runs)
        rng.shuffle(order)
        for impl in order:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--n", str(n), "--masks", kind,
                   "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--sdpa-mask-max-n", str(args.sdpa_mask_max_n)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs[impl].append(json.loads(res.stdout.strip().splitlines()[-1])["median_s"])
    return {impl: statistics.median(ts) for impl, ts in runs.items()}


def _write(name: str, rows: list[list[object]], records: list[dict[str, object]]) -> None:
    info = machine_info()
    header = [
        "N",
        "mask",
        "block density",
        "ours fwd ms",
        "Flex fwd ms",
        "SDPA fwd ms",
        "ours/Flex",
        "ours/SDPA",
        "ours GFLOP/s eff / actual",
        "fwd+bwd ms ours / SDPA (ratio)",
        "max abs err vs Flex",
        "Flex 1st call s",
    ]
    md = [
        "# Block-sparse attention on the CPU: attnlib PyTorch path vs compiled FlexAttention vs SDPA",
        "",
        f"B={B}, H={H}, D={D}, fp32, block {BLOCK}. Forward: each implementation timed in its own fresh "
        "process (median over rounds of per-process medians; `--no-isolate`: interleaved in one process). "
        "Medians of repeats after warm-up; Flex "
        "compile time excluded (its first call is listed). SDPA gets the dense bool mask (is_causal for "
        "causal); * = unmasked dense SDPA (mask too large). Effective GFLOP/s count 4·B·H·N²·D, actual ones "
        "that times the block density. FlexAttention has no backward on the CPU, so forward + backward is "
        "compared with dense masked SDPA.",
        "",
        f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, commit {info['commit']}, "
        f"load average {os.getloadavg()[0]:.1f} at the end. "
        "Shared, busy machine (other jobs running): ratios are the meaningful numbers.",
        "",
        markdown_table(header, rows),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "records": records}, indent=1))


if __name__ == "__main__":
    main()
