"""Offline compile check of the fused entmax Triton kernels for sm_90 (no GPU needed).

Compiles the forward, dQ and dK/dV kernels of :mod:`attnlib.kernels._triton_entmax` with the tile
configurations :func:`attnlib.kernels._triton_entmax.tiles` picks (fp16 at head dims 64 and 128,
fp32 at 128; 1.5-entmax, no mask flags, and the general-alpha forward once) for a GPU target
this machine does not have, and records shared memory (the compiled kernel's metadata) against
the H100's 227 KB, registers and spill bytes from ``ptxas -v`` (Triton's bundled ptxas, as in
``gpu_compile_check.py``) and compile seconds.

    python benchmarks/entmax_compile_check.py [--arch 90] [--out entmax_compile_sm90]

Writes benchmarks/results/<out>.{md,json} (machine, command, date, commit, load).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import RESULTS, machine_info, markdown_table
from gpu_compile_check import ARCH_SMEM, compile_and_measure

FLOATS = {"zscale", "alpha", "tol", "qk_scale"}
UNALIGNED = {"H", "G", "HK", "NQT", "NKT", "n_iter"}
TYPES = {torch.float16: "fp16", torch.float32: "fp32"}


def _job(kernel: str, dtype: torch.dtype, d: int, mode: int) -> dict:
    from attnlib.kernels import _triton_entmax as tri

    bm, bn, warps, stages = tri.tiles(dtype, d, d, interpreted=False, kernel=kernel)
    return {"kernel": kernel, "dtype": TYPES[dtype], "d": d, "mode": mode, "tile": (bm, bn), "w": warps, "s": stages}


def compile_one(job: dict, arch: int) -> dict:
    """Compile one kernel configuration for ``sm_<arch>``; never raises."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from attnlib.kernels import _triton_entmax as tri

    fn = {"fwd": tri._fwd, "dq": tri._bwd_dq, "dkdv": tri._bwd_dkdv}[job["kernel"]]
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    ty = job["dtype"]
    bm, bn = job["tile"]
    bd = max(16, 1 << (job["d"] - 1).bit_length())
    const = {
        "D": job["d"], "DV": job["d"], "BLOCK_D": bd, "BLOCK_DV": bd, "BLOCK_M": bm, "BLOCK_N": bn,
        "CAUSAL": False, "HAS_KVLEN": False, "MODE": job["mode"], "NEED_A": True,
        "PREC": tri._precision(torch.float32 if ty == "fp32" else torch.float16),
    }  # fmt: skip
    f32_ptrs = {"TAU", "SUM", "A", "INV", "CG", "DELTA"}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in const:
            sig[name] = "constexpr"
        elif (name.isupper() and name not in UNALIGNED and name not in ("N", "M")) or name == "DV_":
            sig[name] = "*i32" if name == "KVLEN" else "*fp32" if name in f32_ptrs else f"*{ty}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in UNALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]  # strides and N / M: multiples of 16
    const = {k: v for k, v in const.items() if k in names}
    src = ASTSource(JITFunction(fn), sig, constexprs=const, attrs=attrs)
    return compile_and_measure(src, arch, job["w"], job["s"], dict(job))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_SMEM))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or f"entmax_compile_sm{args.arch}"
    info = machine_info()
    jobs = [
        _job(kn, dt, d, 1)
        for dt, d in ((torch.float16, 64), (torch.float16, 128), (torch.float32, 128))
        for kn in ("fwd", "dq", "dkdv")
    ]
    jobs.append(_job("fwd", torch.float16, 128, 0))  # general alpha (Halley steps, exp2 / log2 powers)
    t0 = time.time()
    recs = []
    for job in jobs:
        recs.append(compile_one(job, args.arch))
        print(recs[-1], flush=True)
    rows = [
        [
            r["kernel"], r["dtype"], r["d"], "1.5" if r["mode"] == 1 else "any", f"{r['tile'][0]}x{r['tile'][1]}",
            r["w"], r["s"], r.get("regs", "-"), r.get("spill_stores", "-"),
            f"{r['smem'] / 1024:.1f}" if r.get("ok") else r.get("error", "-"),
            r.get("fits_smem", "-"), r["compile_s"],
        ]
        for r in recs
    ]  # fmt: skip
    cmd = "python benchmarks/entmax_compile_check.py" + (f" --arch {args.arch}" if args.arch != 90 else "")
    md = [
        f"# Fused entmax kernels compiled offline for sm_{args.arch}",
        "",
        f"`{cmd}` - `triton.compile` for sm_{args.arch} without a GPU; registers and spills from `ptxas -v`; "
        f"shared memory from the compiled metadata (limit {ARCH_SMEM[args.arch] // 1024} KB). Machine: {info['cpu']}, "
        f"load average {info['loadavg']}; torch {info['torch']}, triton {info['triton']}; commit {info['commit']}; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; wall {time.time() - t0:.0f} s. Not run on a GPU.",
        "",
        markdown_table(
            [
                "kernel",
                "dtype",
                "D",
                "alpha",
                "tile",
                "warps",
                "stages",
                "regs",
                "spill B",
                "smem KB",
                "fits",
                "compile s",
            ],
            rows,
        ),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.md").write_text("\n".join(md))
    (RESULTS / f"{out}.json").write_text(json.dumps({"command": cmd, "machine": info, "records": recs}, indent=1))


if __name__ == "__main__":
    main()
