"""Block-sparse Triton kernel on a GPU: correctness vs SDPA / FlexAttention, then speed.

Designed to finish in under 8 minutes on one H100 (a deadline, default 420 s, skips what is
left and says so). bf16, non-causal, block 128, per-head random block layouts (each query
block keeps round(density · n_k) key blocks chosen at random, the same layout for every
implementation), densities 1.0 / 0.5 / 0.25 / 0.1, N = 4k .. 32k, head dim 64 and 128,
B · N = 32k tokens and hidden 2048 (H = 2048 / d), as in the FlashAttention benchmarks.

1. Correctness (N = 4096, both head dims): our kernel vs SDPA at density 1.0 and vs
   FlexAttention at density 0.25, forward and gradients, relative L2 error <= 1e-2 (bf16);
   and an fp32 check against the float64 reference on a small ragged shape with GQA.
2. Speed: forward and forward + backward times (median of CUDA-event timings after
   warm-up, autotuning and compilation excluded) of ours, SDPA (flash backend, dense) and
   compiled FlexAttention on the same BlockMask. Reported: effective TFLOP/s (dense FLOPs
   4·B·H·N²·D per forward, x3.5 for forward + backward, divided by time), actual TFLOP/s
   (that times the block density), ours/SDPA speedup and ours/Flex speedup, and the targets:
   density 1.0 -> ours >= 0.9x SDPA; density d in [0.1, 0.5] -> speedup over dense
   >= 0.8/d and >= FlexAttention.

    python benchmarks/gpu_kernels.py [--deadline 420] [--n 4096 8192 16384 32768] [--d 128 64]

Writes benchmarks/results/gpu_kernels.{md,json} with the card's name.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

from attnlib.functional import reference_attention
from attnlib.kernels import block_sparse_attention
from attnlib.masks import BlockMask

BLOCK = 128
DENSITIES = (1.0, 0.5, 0.25, 0.1)
TOKENS, HIDDEN = 32768, 2048


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` CUDA-event timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def random_layout(h: int, n: int, density: float, seed: int) -> BlockMask:
    nb = math.ceil(n / BLOCK)
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(1, h, nb, nb, generator=g, device="cuda")
    k = max(1, round(density * nb))
    return BlockMask.from_topk(scores, k=k, block_size=BLOCK, seq_lengths=(n, n))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fwd_bwd(fn, qkv, grad):
    def run() -> None:
        out = fn(*qkv)
        torch.autograd.grad(out, qkv, grad)

    return run


def measure(fn, qkv, grad) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of fn(q, k, v)."""
    return cuda_time(lambda: fn(*qkv)), cuda_time(fwd_bwd(fn, qkv, grad))


def correctness(d: int, flex) -> list[dict[str, object]]:
    h, n, b = HIDDEN // d, 4096, 2
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out = []
    for density, other in ((1.0, "sdpa"), (0.25, "flex")):
        bm = random_layout(h, n, density, seed=1)
        ours = block_sparse_attention(*qkv, bm, backend="triton")
        g_ours = torch.autograd.grad(ours, qkv, grad)
        if other == "sdpa":
            ref = F.scaled_dot_product_attention(*qkv)
        else:
            ref = flex(*qkv, block_mask=bm.to_flex())
        g_ref = torch.autograd.grad(ref, qkv, grad)
        errs = [rel_l2(ours, ref)] + [rel_l2(a, r) for a, r in zip(g_ours, g_ref)]
        out.append({"d": d, "density": density, "vs": other, "rel_l2": errs, "ok": max(errs) <= 1e-2})
    # fp32, ragged N/M, GQA, partial blocks, empty rows: float64 reference
    q, k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2, :250], v[:, :2, :250]
    dense = torch.rand(2, 4, 300, 250, device="cuda") < 0.3
    dense[..., 5, :] = False
    bm = BlockMask.from_dense(dense, 64)
    qkv32 = tuple(t.float().requires_grad_() for t in (q, k, v))
    o32 = block_sparse_attention(*qkv32, bm, backend="triton")
    g32 = torch.autograd.grad(o32, qkv32, torch.ones_like(o32))
    qkv64 = tuple(t.requires_grad_() for t in (q, k, v))
    o64 = reference_attention(*qkv64, mask=dense)
    g64 = torch.autograd.grad(o64, qkv64, torch.ones_like(o64))
    errs = [rel_l2(o32, o64)] + [rel_l2(a, r) for a, r in zip(g32, g64)]
    out.append(
        {"d": d, "density": 0.3, "vs": "float64 reference (fp32, ragged, GQA)", "rel_l2": errs, "ok": max(errs) <= 1e-3}
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds; remaining configs are skipped")
    ap.add_argument("--out", default="gpu_kernels")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU; none is visible here (nothing measured).")
        return
    start = time.perf_counter()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 10_000  # one graph per shape: never fall back to eager Flex
    torch._dynamo.config.accumulated_recompile_limit = 10_000
    flex = torch.compile(flex_attention, dynamic=False)
    info = machine_info()
    checks: list[dict[str, object]] = []
    for d in args.d:
        checks += correctness(d, flex)
    print(json.dumps(checks, indent=1), flush=True)
    records: list[dict[str, object]] = []
    skipped: list[str] = []
    for d in args.d:
        h = HIDDEN // d
        for n in args.n:
            b = max(1, TOKENS // n)
            if time.perf_counter() - start > args.deadline:
                skipped.append(f"d={d} N={n}")
                continue
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            qkv = tuple(t.requires_grad_() for t in (q, k, v))
            grad = torch.randn_like(q)
            flops = 4 * b * h * n * n * d
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_sdpa, t_sdpa_fb = measure(F.scaled_dot_product_attention, qkv, grad)
            for dens in DENSITIES:
                if time.perf_counter() - start > args.deadline:
                    skipped.append(f"d={d} N={n} density={dens}")
                    continue
                bm = random_layout(h, n, dens, seed=n)
                fm = bm.to_flex()
                actual = bm.density()

                def ours(*t, bm=bm):
                    return block_sparse_attention(*t, bm, backend="triton")

                def fl(*t, fm=fm):
                    return flex(*t, block_mask=fm)

                t_o, t_o_fb = measure(ours, qkv, grad)
                t_f, t_f_fb = measure(fl, qkv, grad)
                rec = {
                    "d": d,
                    "n": n,
                    "b": b,
                    "h": h,
                    "density": actual,
                    "ms": {"ours": t_o * 1e3, "sdpa": t_sdpa * 1e3, "flex": t_f * 1e3},
                    "fwd_bwd_ms": {"ours": t_o_fb * 1e3, "sdpa": t_sdpa_fb * 1e3, "flex": t_f_fb * 1e3},
                    "eff_tflops": {"fwd": flops / t_o / 1e12, "fwd_bwd": 3.5 * flops / t_o_fb / 1e12},
                    "actual_tflops": {
                        "fwd": actual * flops / t_o / 1e12,
                        "fwd_bwd": actual * 3.5 * flops / t_o_fb / 1e12,
                    },
                    "speedup_vs_sdpa": {"fwd": t_sdpa / t_o, "fwd_bwd": t_sdpa_fb / t_o_fb},
                    "speedup_vs_flex": {"fwd": t_f / t_o, "fwd_bwd": t_f_fb / t_o_fb},
                }
                if dens == 1.0:
                    rec["bar"] = rec["speedup_vs_sdpa"]["fwd"] >= 0.9
                else:
                    rec["bar"] = rec["speedup_vs_sdpa"]["fwd"] >= 0.8 / dens and rec["speedup_vs_flex"]["fwd"] >= 1.0
                records.append(rec)
                print(json.dumps(rec), flush=True)
                write(args.out, info, checks, records, skipped)
    write(args.out, info, checks, records, skipped)
    print(f"done in {time.perf_counter() - start:.0f} s; skipped: {skipped or 'nothing'}")


def write(name: str, info: dict[str, object], checks, records, skipped) -> None:
    header = [
        "d",
        "N",
        "B x H",
        "density",
        "fwd ms ours / SDPA / Flex",
        "fwd TFLOP/s eff / actual",
        "fwd x SDPA",
        "fwd x Flex",
        "fwd+bwd ms ours / SDPA / Flex",
        "fwd+bwd TFLOP/s eff / actual",
        "fwd+bwd x SDPA",
        "fwd+bwd x Flex",
        "bar",
    ]
    rows = []
    for r in records:
        ms, fb = r["ms"], r["fwd_bwd_ms"]
        rows.append(
            [
                r["d"],
                r["n"],
                f"{r['b']} x {r['h']}",
                f"{r['density']:.3f}",
                f"{ms['ours']:.2f} / {ms['sdpa']:.2f} / {ms['flex']:.2f}",
                f"{r['eff_tflops']['fwd']:.0f} / {r['actual_tflops']['fwd']:.0f}",
                f"{r['speedup_vs_sdpa']['fwd']:.2f}",
                f"{r['speedup_vs_flex']['fwd']:.2f}",
                f"{fb['ours']:.2f} / {fb['sdpa']:.2f} / {fb['flex']:.2f}",
                f"{r['eff_tflops']['fwd_bwd']:.0f} / {r['actual_tflops']['fwd_bwd']:.0f}",
                f"{r['speedup_vs_sdpa']['fwd_bwd']:.2f}",
                f"{r['speedup_vs_flex']['fwd_bwd']:.2f}",
                "pass" if r["bar"] else "FAIL",
            ]
        )
    check_rows = [
        [c["d"], c["density"], c["vs"], " / ".join(f"{e:.1e}" for e in c["rel_l2"]), "ok" if c["ok"] else "FAIL"]
        for c in checks
    ]
    md = [
        f"# Block-sparse Triton kernel on {info.get('gpu', 'GPU')}",
        "",
        f"torch {info['torch']}, commit {info['commit']}. bf16, non-causal, block {BLOCK}, random per-head layouts; "
        f"B·N = {TOKENS}, H = {HIDDEN}/d. Median CUDA-event times after warm-up.",
        "",
        "## Correctness (relative L2 of out / dq / dk / dv)",
        "",
        markdown_table(["d", "density", "vs", "rel L2", "ok"], check_rows),
        "",
        "## Speed",
        "",
        markdown_table(header, rows),
        "",
        f"Skipped (deadline): {', '.join(skipped) if skipped else 'nothing'}",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"machine": info, "checks": checks, "records": records, "skipped": skipped}, indent=1)
    )


if __name__ == "__main__":
    main()
