"""Offline compile check of the block-sparse Triton kernels for sm_90 / sm_80 (no GPU needed).

Every tile configuration that the dispatcher may pick (``attnlib.kernels._triton_configs``:
the candidates that survive the shared-memory / register pruning), for bf16 / fp16 / fp32 and
the supported head dims, is compiled with ``triton.compile`` for a GPU target that this
machine does not have; the pruned candidates are compiled too (bf16, and fp32 for its own
candidate list) to show why they were pruned. Recorded per config: shared memory (the compiled
kernel's metadata) against the device's limit, registers and spill bytes from ``ptxas -v``
(Triton's bundled ptxas), compile seconds, and the pruning's verdict and shared-memory
estimate. The test ``tests/test_triton_configs.py`` reads the committed JSON and asserts that
the pruning never offers a config found over the limit, and that the estimate bounds the
measured shared memory.

    python benchmarks/gpu_compile_check.py                       # sm_90, the full matrix (~1 h on 2 cores)
    python benchmarks/gpu_compile_check.py --arch 80 --only-kept --dtypes bf16 fp32 --dims 128 256
                                                  # sm_80 (A100, 163 KB): the kept configs at the largest dims
    python benchmarks/gpu_compile_check.py --quick               # a handful of configs (smoke)

Writes benchmarks/results/gpu_compile_sm<arch>.{md,json} (with machine, command, date, commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from attnlib.kernels import _triton_configs as cfgs

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = ("fwd", "dkdv", "dq")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 96, 128, 256)
MASK_BLOCK = 128  # tiles are fractions of the mask block; smem / registers depend on the tile only
ARCH_SMEM = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)


def _signature(
    kernel: str, ty: str, d: int, bq: int, bk: int, tile: tuple[int, int], prec: str = "tf32"
) -> tuple[dict, dict, dict]:
    """Signature / constexprs / divisibility attributes as the JIT would infer them for a
    contiguous (B, H, N, D) call with N, M multiples of 128 (pointers and strides 16-aligned)."""
    import triton.language as tl

    from attnlib.kernels import _triton_block_sparse as tri

    fn = tri.KERNELS[kernel]
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    ptrs = {
        "fwd": {"Q": ty, "K": ty, "V": ty, "O": ty, "LSE": "fp32", "TILES": "u8"},
        "dkdv": {
            "Q": ty,
            "K": ty,
            "V": ty,
            "DO": ty,
            "LSE": "fp32",
            "DELTA": "fp32",
            "DK": ty,
            "DV": ty,
            "TILES": "u8",
        },
        "dq": {"Q": ty, "K": ty, "V": ty, "DO": ty, "LSE": "fp32", "DELTA": "fp32", "DQ": ty, "TILES": "u8"},
    }[kernel]
    bd = cfgs.block_d(d)
    const = {
        "D": d, "BLOCK_D": bd, "BLOCK_DV": bd, "BQ": bq, "BK": bk, "EVEN_N": True, "CAUSAL": False,
        "HAS_KVLEN": False, "PREC": prec, "ACC": tl.float32,
    }  # fmt: skip
    const["DV" if kernel == "fwd" else "DV_"] = d
    const["BLOCK_M"], const["BLOCK_N"] = tile
    floats = {"qk_scale", "sm_scale"}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = f"*{ptrs[name]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.isupper() and name not in ("H", "G", "N", "M", "NQ", "NK", "HKV", "N_BUCKET"):
            sig[name] = "*i32"  # layout lists / counts / key lengths
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in ("H", "G", "HKV", "NQ", "NK"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # strides and N / M: multiples of 16
    return sig, const, attrs


def _ptxas(ptx: str, arch: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    st = re.search(r"(\d+) bytes spill stores", text)
    ld = re.search(r"(\d+) bytes spill loads", text)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spill_stores": int(st.group(1)) if st else -1,
        "spill_loads": int(ld.group(1)) if ld else -1,
    }


def compile_one(job: dict) -> dict:
    """Compile one (kernel, dtype, head dim, tile config) for the target; never raises."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from attnlib.kernels import _triton_block_sparse as tri

    rec = dict(job)
    c = cfgs.TileConfig(job["block_m"], job["block_n"], job["warps"], job["stages"])
    sig, const, attrs = _signature(
        job["kernel"], job["dtype"], job["d"], MASK_BLOCK, MASK_BLOCK, (c.block_m, c.block_n), job["prec"]
    )
    src = ASTSource(JITFunction(tri.KERNELS[job["kernel"]]), sig, constexprs=const, attrs=attrs)
    return compile_and_measure(src, job["arch"], c.warps, c.stages, rec)


def compile_and_measure(src: Any, arch: int, warps: int, stages: int, rec: dict) -> dict:
    """Compile the ``triton.compiler.ASTSource`` ``src`` for ``sm_<arch>`` and add to ``rec`` the
    compile seconds, shared memory (and whether it fits), registers and spill bytes, or the
    compiler's error (a config the compiler rejects is a result too); never raises."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    rec["smem"] = int(k.metadata.shared)
    rec.update(_ptxas(k.asm["ptx"], arch))
    rec["fits_smem"] = rec["smem"] <= ARCH_SMEM[arch]
    rec["ok"] = True
    return rec


def _key(r: dict) -> tuple:
    return (r["arch"], r["kernel"], r["dtype"], r["prec"], r["d"], r["block_m"], r["block_n"], r["warps"], r["stages"])


def verdict(rec: dict) -> dict:
    """(Re)compute the pruning's verdict and estimates of a record from the current code."""
    dtype = DTYPES[rec["dtype"]]
    bd = cfgs.block_d(rec["d"])
    c = cfgs.TileConfig(rec["block_m"], rec["block_n"], rec["warps"], rec["stages"])
    kw = dict(dtype=dtype, block_d=bd, block_dv=bd, bq=MASK_BLOCK, bk=MASK_BLOCK, prec=rec["prec"], arch=rec["arch"])
    cands = cfgs.candidates(rec["kernel"], dtype, rec["prec"])
    kept = cfgs.prune(rec["kernel"], cands, smem_limit=ARCH_SMEM[rec["arch"]], **kw)
    rec["kept"] = c in kept
    rec["prune_reason"] = (
        None
        if rec["kept"]
        else (cfgs.why_pruned(rec["kernel"], c, smem_limit=ARCH_SMEM[rec["arch"]], **kw) or "beyond MAX_CONFIGS")
    )
    rec["smem_estimate"] = cfgs.smem_estimate(rec["kernel"], c, dtype, bd, bd, rec["prec"])
    rec["head_dims"] = list(cfgs.head_dims(rec["kernel"], c, dtype, rec["prec"], rec["arch"]))
    return rec


def jobs_for(
    arch: int, only_kept: bool, quick: bool, dtypes: tuple[str, ...] = tuple(DTYPES), dims: tuple[int, ...] = HEAD_DIMS
) -> list[dict]:
    """Every candidate of every kernel, dtype (fp32: both precisions of the policy) and head dim;
    the pruned ones only for bf16 / fp32 (fp16 has bf16's sizes) and not for head dim 96 (the
    padded 128)."""
    out = []
    for dname, dtype in DTYPES.items():
        if dname not in dtypes:
            continue
        for kernel in KERNELS:
            for prec in ("tf32", "tf32x3") if dname == "fp32" else ("tf32",):
                for d in dims:
                    for c in cfgs.candidates(kernel, dtype, prec):
                        job = {"arch": arch, "kernel": kernel, "dtype": dname, "prec": prec, "d": d}
                        job.update(block_m=c.block_m, block_n=c.block_n, warps=c.warps, stages=c.stages)
                        verdict(job)
                        if not job["kept"] and (only_kept or dname == "fp16" or d == 96):
                            continue
                        out.append(job)
    if quick:
        out = [j for j in out if j["d"] == 64 and j["dtype"] == "bf16"][:6]
    return out


def kernel_source_sha() -> str:
    """Hash of the three kernels' source (whitespace-insensitive): the results are stale when it changes."""
    import hashlib
    import inspect

    from attnlib.kernels import _triton_block_sparse as tri

    text = "".join("".join(inspect.getsource(fn).split()) for fn in tri.KERNELS.values())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "attnlib/kernels"], capture_output=True, text=True)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def write(path: Path, arch: int, records: list[dict], meta: dict) -> None:
    from attnlib.bench.report import markdown_table

    limit = ARCH_SMEM[arch]
    recs = sorted(records, key=lambda r: (KERNELS.index(r["kernel"]), r["dtype"], r["d"], not r["kept"], -r["block_m"]))
    rows = []
    for r in recs:
        rows.append(
            [
                r["kernel"],
                r["dtype"] + (f" {r['prec']}" if r["dtype"] == "fp32" else ""),
                r["d"],
                f"{r['block_m']}x{r['block_n']}",
                r["warps"],
                r["stages"],
                "kept" if r["kept"] else f"pruned ({r['prune_reason']})",
                f"{r['smem'] / 1024:.1f}" if r.get("ok") else "-",
                f"{r['smem_estimate'] / 1024:.1f}",
                r.get("regs", "-"),
                r.get("spill_stores", "-"),
                ("yes" if r["fits_smem"] else "**NO**") if r.get("ok") else f"error: {r.get('error')}",
                r["compile_s"],
            ]
        )
    kept = [r for r in records if r["kept"]]
    bad = [r for r in kept if not (r.get("ok") and r["fits_smem"])]
    over = [r for r in records if r.get("ok") and not r["fits_smem"]]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["dtype"] + (f" {r['prec']}" if r["dtype"] == "fp32" else "")), []).append(r)
    summary_rows = []
    for (kernel, cls_), rs in groups.items():
        k = [r for r in rs if r["kept"]]
        spills = [r["spill_stores"] for r in k if r.get("ok")]
        summary_rows.append(
            [kernel, cls_, len(rs), len(k), len(rs) - len(k),
             sum(1 for r in rs if r.get("ok") and not r["fits_smem"]), max(spills) if spills else "-",
             max((r["smem"] for r in k if r.get("ok")), default=0) // 1024]
        )  # fmt: skip
    summary = [
        f"- configs compiled: {len(records)}; kept by the pruning (the dispatcher may pick them): {len(kept)}; "
        f"pruned: {len(records) - len(kept)}",
        f"- kept configs over {limit // 1024} KB or failing to compile: {len(bad)}"
        + (": " + ", ".join(_label(r) for r in bad) if bad else ""),
        f"- compiled configs over the shared-memory limit: {len(over)} "
        f"(all pruned: {all(not r['kept'] for r in over)})",
        "- exact fp32 (3xTF32) at head dim 256 has no dK/dV or dQ config within the spill budget: such calls run "
        "the PyTorch path (with a warning); TF32 and fp16 / bf16 cover head dims up to 256",
        "",
        markdown_table(
            ["kernel", "dtype", "compiled", "kept", "pruned", "over smem", "max spill B (kept)", "max smem KB (kept)"],
            summary_rows,
        ),
    ]
    md = [
        f"# Block-sparse Triton kernels compiled offline for sm_{arch} (no GPU)",
        "",
        f"Machine: {meta['machine']}; triton {meta['triton']}, torch {meta['torch']}; commit {meta['commit']}; "
        f"date {meta['date']}; wall {meta['wall_s']:.0f} s with {meta['workers']} worker(s) (loaded shared machine, "
        f"load average {meta['loadavg'][0]:.0f}: compile seconds are indicative only).",
        "",
        f"{meta.get('reused', 0)} of the measurements were reused from earlier runs of this script on the same kernel "
        f"source ({', '.join(meta.get('reused_from') or []) or '-'}; only the pruning verdicts are recomputed), "
        f"{meta.get('compiled_now', len(records))} compiled by this run."
        if meta.get("reused")
        else f"All {len(records)} configs compiled by this run.",
        *(["", f"Note: {meta['note']}"] if meta.get("note") else []),
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Shared-memory limit: {limit} B ({limit / 1024:.0f} KB, the opt-in maximum per block). Registers and "
        "spill stores from `ptxas -v` (Triton's bundled ptxas) on the generated PTX; shared memory from the "
        "compiled kernel's metadata. Mask block 128 x 128 (a tile is a fraction of it; smem and registers "
        "depend on the tile, not on the mask block). Head dim 96 runs in a 128-wide padded tile (masked loads). "
        "`smem est` is the pruning's estimate (an upper bound, checked by tests/test_triton_configs.py).",
        "",
        "## Summary",
        "",
        *summary,
        "",
        "## All configs",
        "",
        markdown_table(
            [
                "kernel",
                "dtype",
                "d",
                "tile",
                "warps",
                "stages",
                "pruning",
                "smem KB",
                "smem est KB",
                "regs",
                "spill B",
                "fits",
                "compile s",
            ],
            rows,
        ),
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(md))
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "smem_limit": limit, "records": recs}, indent=1))


def _label(r: dict) -> str:
    prec = f" {r['prec']}" if r["dtype"] == "fp32" else ""
    return f"{r['kernel']} {r['dtype']}{prec} d={r['d']} {r['block_m']}x{r['block_n']} w{r['warps']} s{r['stages']}"


def _portable(arg: str) -> str:
    """A command-line argument as committed results may show it: paths inside the repository
    relative to it, other absolute paths (temporary files of an earlier run) by file name only."""
    p = Path(arg)
    if not p.is_absolute():
        return arg
    try:
        return p.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    except ValueError:
        return p.name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_SMEM))
    ap.add_argument("--only-kept", action="store_true", help="compile only the configs the pruning keeps")
    ap.add_argument("--quick", action="store_true", help="a handful of configs (smoke test of the script)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--reuse", nargs="*", default=[], help="earlier .json / .partial.jsonl results to reuse")
    ap.add_argument("--note", default="", help="provenance of reused measurements (written to the results)")
    ap.add_argument("--out", default=None, help="output stem under benchmarks/results (default gpu_compile_sm<arch>)")
    args = ap.parse_args(argv)
    import platform

    import triton

    from attnlib.bench.machine import cpu_model

    jobs = jobs_for(args.arch, args.only_kept, args.quick, tuple(args.dtypes), tuple(args.dims))
    stem = RESULTS / (args.out or f"gpu_compile_sm{args.arch}")
    done: dict[tuple, dict] = {}
    for path in args.reuse:  # measurements of an earlier run (same kernels): only verdicts are recomputed
        p = Path(path)
        lines = json.loads(p.read_text())["records"] if p.suffix == ".json" else map(json.loads, p.open())
        for r in lines:
            if r.get("ok"):
                done[_key(r)] = r
    todo = [j for j in jobs if _key(j) not in done]
    print(f"{len(jobs)} configs for sm_{args.arch}: {len(jobs) - len(todo)} reused, {len(todo)} to compile", flush=True)
    t0 = time.perf_counter()
    records = [verdict(dict(done[_key(j)])) for j in jobs if _key(j) in done]
    # reused measurements of configs outside today's job list (e.g. now pruned): kept as evidence
    job_keys = {_key(j) for j in jobs}
    records += [
        verdict(dict(r))
        for k, r in done.items()
        if k not in job_keys and r["arch"] == args.arch and r["dtype"] in args.dtypes and r["d"] in args.dims
    ]
    progress = stem.with_suffix(".partial.jsonl")
    with ProcessPoolExecutor(max_workers=args.workers) as ex, progress.open("a") as log:
        for i, rec in enumerate(ex.map(compile_one, todo)):
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            status = (
                f"smem={rec['smem'] / 1024:.1f}KB (est {rec['smem_estimate'] / 1024:.1f}) regs={rec['regs']} "
                f"spill={rec['spill_stores']}B"
                if rec.get("ok")
                else rec.get("error")
            )
            print(f"[{i + 1}/{len(todo)}] {_label(rec)} kept={rec['kept']} {status} ({rec['compile_s']}s)", flush=True)
    meta = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python "
        + " ".join(
            _portable(a)
            for a in [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])][
                : (None if not args.note else -2)
            ]
        )
        + (" --note <the note below>" if args.note else ""),
        "workers": args.workers,
        "scope": {"dtypes": args.dtypes, "dims": args.dims, "only_kept": args.only_kept},
        "kernel_source_sha": kernel_source_sha(),
        "compiled_now": len(todo),
        "reused": len(jobs) - len(todo),
        "reused_from": [_portable(p) for p in args.reuse],
        "note": args.note,
        "wall_s": time.perf_counter() - t0,
        "loadavg": os.getloadavg(),
    }
    write(stem, args.arch, [verdict(r) for r in records], meta)
    progress.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
