"""The GPU check: everything GPU-side of attnlib in ONE device call of at most 9 minutes.

Steps, in priority order, each in its own process with its own timeout (and an overall
deadline: a step that would start after it is skipped and says so):

1. ``tests``   - the gpu-marked tests (the Triton kernel in bf16 / fp16 / fp32 vs float64,
                 strided inputs, B·H > 65535, offsets past 2^31, fallbacks, no host syncs, the
                 conformance suite's half-precision test) and the Triton property test
                 (pytest -n 8, one tile config per kernel: correctness, not speed).
2. ``kernels`` - block-sparse kernel vs SDPA (flash, dense / is_causal) and compiled
                 FlexAttention on the *same* BlockMask (``to_flex()``): bf16, B=1, H=16, d=128,
                 N = 4k and 16k, block densities 1.0 / 0.5 / 0.1 (random per-head layouts) and
                 causal; forward and forward + backward (do_bench medians); relative L2 error
                 vs an fp32 reference beside Flex's own (N=16k: sampled query rows, output only).
3. ``edge``    - GQA, ragged N / M, empty rows, D = 80 / 96 / 256, non-contiguous inputs, the
                 causal / key-length flags, fp32 (TF32 and 3xTF32 policies), each vs fp32 / fp64
                 references, recording whether the Triton kernel ran.
4. ``bench``   - a short ``attnlib-bench bench=gpu_quick`` (N = 4k / 8k, d = 128, 30 s budget).
5. ``train``   - 30 steps of ``attnlib-train experiment=lm_chars trainer=gpu``.
6. ``entmax``  - the fused alpha-entmax Triton kernel: its gpu-marked fp16 tests, then fp16,
                 B=1, H=16, d=128, N=4096 (plain and causal) forward and forward + backward vs the
                 PyTorch entmax path and SDPA (softmax) on the same inputs (do_bench medians),
                 with its relative error vs the PyTorch path.

Output: a compact table on stdout and, under ``--out``: gpu_check.md, gpu_check.json,
gpu_check.log (every step's output), bench_speed.md / .json and train_results.json (at most
the 8 files that the device tool brings back).

How to call it (a task lent a GPU; 15 minutes of device time in all, so one call):

* once, here, in the repository root - the device machine has no network and no Hydra (it has
  torch, triton, pytest, hypothesis, numpy, einops, scikit-learn, tensorboard, tqdm)::

      echo /.whl/ >> .git/info/exclude
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
          --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
      python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only: a pure-Python wheel

* dry-run here first (CPU, tiny sizes, the interpreter; every step starts and parses)::

      python benchmarks/gpu_check.py --dry-run --out "$(mktemp -d)"

* then ONE device call: ``run`` with ``timeout_s=560``, ``carry=[".whl"]`` and the command
  (one line; ``python benchmarks/gpu_check.py --print-run`` prints it with the carry list)::

      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .whl/site .whl/*.whl && export PYTHONPATH=$PWD/.whl/site:$PWD || exit; \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

  and ``give_back`` afterwards. The report comes back as $OUT/gpu_check.md; copy it to
  benchmarks/results/ with the card's name.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--dry-run] [--budget 450] [--only STEP ...]``
(``--step NAME`` runs one step in this process; the driver uses it for its children).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site "
    ".whl/*.whl && export PYTHONPATH=$PWD/.whl/site:$PWD || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "
    "--out $OUT"
)
RUN_CARRY = [".whl"]
RUN_TIMEOUT_S = 560
STEPS = ("tests", "kernels", "edge", "bench", "train", "entmax")
# seconds per step on the GPU (sum 500 <= the call's 560 s, leaving time for the start); a step
# that fails or times out does not stop the next, and the last ones are skipped when the budget is spent
TIMEOUTS = {"tests": 120, "kernels": 145, "edge": 60, "bench": 55, "train": 70, "entmax": 50}
DRY_TIMEOUTS = {"tests": 240, "kernels": 300, "edge": 300, "bench": 120, "train": 120, "entmax": 240}


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _step_cmd(step: str, work: Path, dry: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--work", str(work)]
    return cmd + (["--dry-run"] if dry else [])


def drive(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    timeouts = DRY_TIMEOUTS if args.dry_run else TIMEOUTS
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    log = (out / "gpu_check.log").open("w")
    for step in args.only or STEPS:
        left = args.budget - (time.perf_counter() - t_start)
        limit = min(timeouts[step], left)
        if limit < 10:
            results.append({"step": step, "status": "skipped", "seconds": 0.0, "summary": "overall budget spent"})
            continue
        t0 = time.perf_counter()
        log.write(f"\n===== {step} (timeout {limit:.0f} s) =====\n")
        log.flush()
        try:
            proc = subprocess.run(
                _step_cmd(step, work, args.dry_run),
                cwd=ROOT,
                env=_env(args.dry_run),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=limit,
            )
            text, status = proc.stdout, "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"TIMEOUT ({limit:.0f} s)"
        log.write(text[-200_000:])
        log.flush()
        res_file = work / f"{step}.json"
        res = json.loads(res_file.read_text()) if res_file.exists() else {}
        if res.get("failed") and status == "ok":
            status = "FAILED"
        results.append(
            {
                "step": step,
                "status": status,
                "seconds": round(time.perf_counter() - t0, 1),
                "summary": res.get("summary", _tail(text)),
                "result": res,
            }
        )
        print(f"[gpu_check] {step}: {status} in {results[-1]['seconds']} s - {results[-1]['summary']}", flush=True)
    log.close()
    for name in ("bench_speed.md", "bench_speed.json", "train_results.json"):
        if (work / name).exists():
            shutil.copy(work / name, out / name)
    report(out, results, args, time.perf_counter() - t_start)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] in ("ok",) for r in results) else 1


def _tail(text: str, n: int = 160) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][-n:] if lines else ""


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    else:
        info["gpu"] = "none (dry run on CPU)"
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        info["commit"] = "unknown"
    return info


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(out: Path, results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    info = _machine()
    rows = [[r["step"], r["status"], r["seconds"], r["summary"]] for r in results]
    table = _md_table(["step", "status", "s", "summary"], rows)
    print("\n" + table, flush=True)
    md = [
        "# attnlib GPU check" + (" (DRY RUN on CPU: tiny sizes, Triton interpreter)" if args.dry_run else ""),
        "",
        f"{info['gpu']}; torch {info['torch']}, triton {info['triton']}, Python {info['python']}; "
        f"commit {info['commit']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall {wall:.0f} s.",
        "",
        table,
        "",
    ]
    for r in results:
        res = r.get("result") or {}
        if res.get("markdown"):
            md += [f"## {r['step']}", "", res["markdown"], ""]
    (out / "gpu_check.md").write_text("\n".join(md))
    (out / "gpu_check.json").write_text(json.dumps({"machine": info, "steps": results}, indent=1, default=str))


# ------------------------------------------------------------------------------------------
# steps (each runs in its own process: ``--step NAME``)
# ------------------------------------------------------------------------------------------


def _save(work: Path, step: str, res: dict[str, Any]) -> None:
    (work / f"{step}.json").write_text(json.dumps(res, indent=1, default=str))


def step_tests(work: Path, dry: bool) -> None:
    # correctness only: one tile config per kernel (no autotuning), compiles spread over 8 workers
    os.environ["ATTNLIB_TRITON_MAX_CONFIGS"] = "1"
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if not dry:
        py += ["-n", "8"]
    # one pytest run (8 workers): the gpu-marked tests of the kernels and of the conformance suite,
    # and the Triton property test (not gpu-marked: it runs through the interpreter on CPU too)
    runs = [
        [
            *py, "tests/test_block_sparse_triton.py", "tests/conformance/test_conformance.py",
            "tests/test_block_sparse_properties.py", "-k", "gpu or half_precision_on_cuda or triton_random",
        ]
    ]  # fmt: skip
    if dry:  # collection only: the tests exist, import and select
        runs = [[*r, "--collect-only"] for r in runs]
    summaries, failed = [], False
    for cmd in runs:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
        )
        print(proc.stdout[-20_000:], flush=True)
        summaries.append(_tail(proc.stdout, 100))
        failed |= proc.returncode not in (0, 5)  # 5: nothing selected (e.g. no gpu test collected)
    _save(work, "tests", {"summary": " ; ".join(summaries), "failed": failed})


def _rel(a: Any, b: Any) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _bench(fn: Any, dry: bool) -> float:
    """Median milliseconds of fn (do_bench on CUDA; a few wall-clock calls on the dry run)."""
    import torch

    if dry:
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * min(ts)
    from triton.testing import do_bench

    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100))


def _reference_rows(q: Any, k: Any, v: Any, bm: Any, rows: list[tuple[int, int]]) -> tuple[list[Any], list[Any]]:
    """fp32 attention output of the row ranges (computed from the BlockMask's dense rows)."""
    import torch

    outs, idx = [], []
    for a, b in rows:
        allowed = bm.dense_rows(a, b).to(q.device)  # (B', H', rows, M)
        s = torch.matmul(q[:, :, a:b].float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append(torch.matmul(p, v.float()))
        idx.append((a, b))
    return outs, idx


def step_kernels(work: Path, dry: bool) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from attnlib.kernels import block_sparse_attention
    from attnlib.masks import BlockMask

    dev = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 dots are wrong
    h, d, block = (2, 32, 32) if dry else (16, 128, 128)
    ns = [128, 160] if dry else [4096, 16384]
    long_n = 128 if dry else 4096  # above: errors on sampled rows (a full fp32 reference is too big)
    torch._dynamo.config.recompile_limit = 1000
    torch._dynamo.config.accumulated_recompile_limit = 1000
    flex = flex_attention if dry else torch.compile(flex_attention, dynamic=False)

    def sdpa(q, k, v, causal):
        if dry:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    rows: list[list[Any]] = []
    recs: list[dict[str, Any]] = []
    for n in ns:
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
        qkv = tuple(t.requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)
        nb = math.ceil(n / block)
        masks = {}
        for dens in (1.0, 0.5, 0.1):
            scores = torch.rand(1, h, nb, nb, device=dev, generator=g)
            masks[f"density {dens}"] = BlockMask.from_topk(
                scores, k=max(1, round(dens * nb)), block_size=block, seq_lengths=(n, n)
            )
        masks["causal"] = BlockMask.causal(n, block_size=block, device=dev)
        sample = [(0, 16), (n // 2, n // 2 + 16), (n - 16, n)] if dry and n > long_n else None
        if not dry and n > long_n:
            sample = [(0, 64), (n // 2, n // 2 + 64), (n - 64, n)]
        for name, bm in masks.items():
            fm = bm.to_flex()
            causal = name == "causal"
            impls = {
                "ours": lambda *t, bm=bm: block_sparse_attention(*t, bm, backend="triton"),
                "flex": lambda *t, fm=fm: flex(*t, block_mask=fm),
            }
            if name in ("density 1.0", "causal"):
                impls["sdpa"] = lambda *t, c=causal: sdpa(*t, c)
            rec: dict[str, Any] = {"n": n, "mask": name, "density": round(bm.density(), 3), "ms": {}, "err": {}}
            outs = {}
            for label, fn in impls.items():
                # Flex on the CPU refuses inputs that require grad (no CPU backward): plain ones there
                args = tuple(t.detach() for t in qkv) if dry and label == "flex" else qkv
                try:
                    with torch.no_grad():
                        outs[label] = fn(*args).detach()
                    rec["ms"][f"{label} fwd"] = _bench(lambda fn=fn, args=args: fn(*args), dry)
                    if not (dry and label == "flex"):  # Flex has no CPU backward

                        def fb(fn=fn, qkv=qkv, go=go):
                            out = fn(*qkv)
                            torch.autograd.grad(out, qkv, go)

                        rec["ms"][f"{label} fwd+bwd"] = _bench(fb, dry)
                except Exception as e:  # one implementation failing must not hide the others
                    rec["err"][f"{label} error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            # errors vs an fp32 reference (sampled rows at long N)
            if sample is None:
                qf, kf, vf = (t.detach().float().requires_grad_() for t in qkv)
                allowed = bm.to_dense().to(dev)
                s = torch.matmul(qf, kf.transpose(-1, -2)) * d**-0.5
                ref = torch.matmul(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0), vf)
                for label, o in outs.items():
                    rec["err"][label] = _rel(o, ref)
                if n <= long_n:  # gradients: ours and Flex vs the fp32 reference
                    gref = torch.autograd.grad(ref, (qf, kf, vf), go.float())
                    for label in ("ours", "flex"):
                        if label in outs and not (dry and label == "flex"):
                            x = tuple(t.detach().requires_grad_() for t in qkv)
                            gg = torch.autograd.grad(impls[label](*x), x, go)
                            rec["err"][f"{label} grads"] = max(_rel(a, b) for a, b in zip(gg, gref))
                del s, ref
            else:
                refs, idx = _reference_rows(q.detach(), k.detach(), v.detach(), bm, sample)
                for label, o in outs.items():
                    rec["err"][label] = max(_rel(o[:, :, a:b], r) for r, (a, b) in zip(refs, idx))
            recs.append(rec)
            ms, er = rec["ms"], rec["err"]

            def cell(key: str, ms=ms) -> str:
                return f"{ms[key]:.2f}" if key in ms else "-"

            def ratio(a: str, b: str, ms=ms) -> str:
                return f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "-"

            def e(key: str, er=er) -> str:
                return f"{er[key]:.1e}" if isinstance(er.get(key), float) else "-"

            rows.append(
                [n, name, rec["density"], cell("ours fwd"), cell("flex fwd"), cell("sdpa fwd"),
                 ratio("ours fwd", "flex fwd"), cell("ours fwd+bwd"), cell("flex fwd+bwd"), cell("sdpa fwd+bwd"),
                 ratio("ours fwd+bwd", "flex fwd+bwd"), e("ours"), e("flex"), e("ours grads"), e("flex grads")]
            )  # fmt: skip
            print(json.dumps(rec, default=str), flush=True)
            torch.cuda.empty_cache() if not dry else None
    header = ["N", "mask", "density", "ours fwd ms", "Flex fwd ms", "SDPA fwd ms", "ours/Flex fwd",
              "ours fwd+bwd ms", "Flex fwd+bwd ms", "SDPA fwd+bwd ms", "ours/Flex fwd+bwd",
              "err ours", "err Flex", "grad err ours", "grad err Flex"]  # fmt: skip
    md = (
        f"{'fp32 (dry run)' if dry else 'bf16'}, B=1, H={h}, d={d}, block {block}; same BlockMask for ours and Flex "
        "(`to_flex()`), SDPA = flash (dense / is_causal). Errors: relative L2 vs an fp32 reference "
        "(N > 4096: three sampled 64-row ranges, output only).\n\n" + _md_table(header, rows)
    )
    failures = [r for r in recs if any(k.endswith("error") for k in r["err"])]
    bad = [r for r in recs if isinstance(r["err"].get("ours"), float) and r["err"]["ours"] > 2e-2]
    summary = f"{len(recs)} cases; ours/Flex fwd " + ", ".join(
        f"{r['n']}:{r['mask'].replace('density ', 'd')}={r['ms']['ours fwd'] / r['ms']['flex fwd']:.2f}"
        for r in recs
        if "ours fwd" in r["ms"] and "flex fwd" in r["ms"]
    )
    _save(work, "kernels", {"summary": summary, "records": recs, "markdown": md, "failed": bool(failures or bad)})


def _edge_cases(dry: bool) -> list[tuple]:
    import torch

    half = torch.float16 if dry else torch.bfloat16  # the interpreter's bf16 dots are wrong
    s = 1 if dry else 8  # size multiplier
    cases = [
        # name, B, H, Hkv, N, M, D, block, dtype, kwargs
        ("GQA 16/4", 1, 16 // (4 if dry else 1), 4 // (4 if dry else 1), 64 * s, 64 * s, 64, 64, half, {}),
        ("ragged N/M + empty rows", 2, 4, 2, 61 * s + 3, 47 * s + 5, 64, 64, half, {}),
        ("D=80", 1, 4, 4, 48 * s, 48 * s, 80, 64, half, {}),
        ("D=96", 1, 4, 4, 48 * s, 48 * s, 96, 64, half, {}),
        ("D=256", 1, 2, 2, 32 * s, 32 * s, 256, 64, half, {}),
        ("non-contiguous", 2, 4, 4, 40 * s, 40 * s, 64, 64, half, {"strided": True}),
        ("causal + kv_lengths flags", 2, 4, 2, 50 * s, 70 * s, 64, 64, half, {"causal": True, "kvl": True}),
        ("fp32 (3xTF32)", 1, 4, 4, 40 * s, 40 * s, 64, 64, torch.float32, {}),
        ("fp32 (TF32 allowed)", 1, 4, 4, 40 * s, 40 * s, 64, 64, torch.float32, {"tf32": True}),
    ]
    if dry:
        cases = [(*c[:7], 32, *c[8:]) if c[7] == 64 else c for c in cases]
    return cases


def edge_case(index: int, dry: bool) -> list[Any]:
    """One edge case (its own process: the cases compile their kernels in parallel)."""
    import torch

    from attnlib.functional import reference_attention
    from attnlib.kernels import _triton_block_sparse as tri
    from attnlib.kernels import block_sparse_attention
    from attnlib.masks import BlockMask

    dev = "cpu" if dry else "cuda"
    calls = {"n": 0}
    real = tri.forward

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    tri.forward = counting
    name, b, h, hk, n, m, d, block, dtype, kw = _edge_cases(dry)[index]
    g = torch.Generator().manual_seed(n + d)
    dense = torch.rand(b, 1, n, m, generator=g) < 0.4
    dense[:, :, 1] = False  # an empty row
    if kw.get("causal"):
        dense &= torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    kvl = torch.tensor([m, m // 3])[:b] if kw.get("kvl") else None
    full = dense if kvl is None else dense & (torch.arange(m)[None, None, None, :] < kvl[:, None, None, None])
    q64 = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(b, hk, m, d, generator=g, dtype=torch.float64)
    v64 = torch.randn(b, hk, m, d, generator=g, dtype=torch.float64)
    qkv64 = tuple(t.requires_grad_() for t in (q64, k64, v64))
    ref = reference_attention(*qkv64, mask=full)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref = torch.autograd.grad(ref, qkv64, go)
    if kw.get("strided"):
        x = torch.stack([t.detach() for t in (q64, k64, v64)], 2).transpose(1, 3).to(dev, dtype)  # (B, N, 3, H, D)
        qkv = tuple(x[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    else:
        qkv = tuple(t.detach().to(dev, dtype).requires_grad_() for t in (q64, k64, v64))
    bm = BlockMask.from_dense(dense, block).to(dev)
    torch.set_float32_matmul_precision("high" if kw.get("tf32") else "highest")
    label = [name, str(dtype).split(".")[-1], f"{n}x{m}", d]
    try:
        out = block_sparse_attention(
            *qkv, bm, backend="triton", causal=bool(kw.get("causal")), kv_lengths=None if kvl is None else kvl.to(dev)
        )
        grads = torch.autograd.grad(out, qkv, go.to(dev, dtype))
        errs = [_rel(out.detach().cpu(), ref.detach())] + [_rel(a.cpu(), r) for a, r in zip(grads, gref)]
        tol = {torch.float32: 5e-3 if kw.get("tf32") else 1e-4}.get(dtype, 3e-2)
        ok = max(errs) <= tol and calls["n"] > 0
        return [*label, calls["n"] > 0, " / ".join(f"{x:.1e}" for x in errs), f"{tol:.0e}", "ok" if ok else "FAIL"]
    except Exception as e:
        return [*label, "-", f"{type(e).__name__}: {e}"[:160], "-", "FAIL"]


def step_edge(work: Path, dry: bool) -> None:
    """Every edge case in its own process, several at a time (their kernel compiles overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    os.environ["ATTNLIB_TRITON_MAX_CONFIGS"] = "1"  # correctness only: no autotuning

    def run(i: int) -> list[Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--edge-case", str(i), "--work", str(work)]
        proc = subprocess.run([*cmd, *(["--dry-run"] if dry else [])], cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-4000:] + proc.stderr[-4000:], flush=True)
        try:
            return json.loads((work / f"edge_{i}.json").read_text())
        except FileNotFoundError:
            case = _edge_cases(dry)[i]
            return [case[0], "-", "-", case[6], "-", f"crashed (exit {proc.returncode})", "-", "FAIL"]

    n_cases = len(_edge_cases(dry))
    if dry:  # the process path once, the rest in this process (cheaper on a small CPU machine)
        rows = [run(0), *(edge_case(i, dry) for i in range(1, n_cases))]
    else:
        with ThreadPoolExecutor(max_workers=8) as ex:
            rows = list(ex.map(run, range(n_cases)))
    md = _md_table(["case", "dtype", "N x M", "D", "Triton ran", "rel err out / dq / dk / dv", "tol", ""], rows)
    n_ok = sum(r[-1] == "ok" for r in rows)
    failed = n_ok < len(rows)
    _save(work, "edge", {"summary": f"{n_ok}/{len(rows)} ok", "markdown": md, "failed": failed, "rows": rows})


def step_bench(work: Path, dry: bool) -> None:
    cmd = [
        sys.executable, "-m", "attnlib.cli.bench", "bench=gpu_quick", "n=[4096,8192]", "speed.head_dim=[128]",
        "speed.time_budget_s=30", "progress=false", "plots=false", f"out_dir={work / 'bench'}", "name=gpu_quick",
    ]  # fmt: skip
    if dry:
        cmd.append("--cfg=job")  # compose and print the config only (the preset needs CUDA)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-30_000:], flush=True)
    for ext in ("md", "json"):
        src = work / "bench" / f"gpu_quick.{ext}"
        if src.exists():
            shutil.copy(src, work / f"bench_speed.{ext}")
    md = (work / "bench_speed.md").read_text() if (work / "bench_speed.md").exists() else ""
    _save(work, "bench", {"summary": _tail(proc.stdout, 120), "failed": proc.returncode != 0, "markdown": md[:20_000]})


def step_train(work: Path, dry: bool) -> None:
    run_dir = work / "lm"
    cmd = [
        sys.executable, "-m", "attnlib.cli.train", "experiment=lm_chars", "trainer=gpu", "trainer.max_steps=30",
        "trainer.eval_every=0", "trainer.eval_limit=2048", "trainer.checkpoint_every=1000", "trainer.log_every=10",
        "trainer.progress=false", "trainer.tensorboard=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    if dry:
        cmd.append("--cfg=job")
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-30_000:], flush=True)
    res_file = run_dir / "results.json"
    summary = _tail(proc.stdout, 120)
    if res_file.exists():
        shutil.copy(res_file, work / "train_results.json")
        res = json.loads(res_file.read_text())
        keys = [k for k in res if any(w in k for w in ("loss", "bpc", "step", "time", "throughput"))][:6]
        summary = ", ".join(f"{k}={res[k]}" for k in keys) or summary
    _save(work, "train", {"summary": summary, "failed": proc.returncode != 0})


def step_entmax(work: Path, dry: bool) -> None:
    """The fused entmax kernel: gpu-marked fp16 tests, then timings vs the PyTorch path and SDPA."""
    import torch

    from attnlib.testing import make_qkv

    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd = [*py, *(["--collect-only"] if dry else ["-n", "8"]), "tests/test_entmax_triton.py"]
    cmd += ["-k", "gpu and (fp16 or variant)"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout[-10_000:], flush=True)
    tests = _tail(proc.stdout, 100)
    failed = proc.returncode not in (0, 5)
    dev = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.float16  # the interpreter's half dots are slow, bf16 wrong
    h, d, n = (1, 16, 32) if dry else (16, 128, 4096)
    rows = []
    for causal in (False, True):
        label = ["causal" if causal else "plain", n]
        try:
            q, k, v = (t.to(dev, dtype) for t in make_qkv(1, h, n, d, logit_scale=3.0, seed=n))
            ms, err = _entmax_times(q, k, v, causal, dry)
            rows.append(
                [
                    *label,
                    *(f"{ms[key]:.2f}" for key in ("fused", "torch entmax", "sdpa")),
                    *(f"{ms[key + ' f+b']:.2f}" for key in ("fused", "torch entmax", "sdpa")),
                    f"{ms['fused'] / ms['sdpa']:.1f}x",
                    f"{err:.1e}",
                ]
            )
            failed |= not err < (1e-4 if dry else 2e-2)
        except Exception as e:  # one failing row does not hide the others
            rows.append([*label, f"{type(e).__name__}: {e}"[:160], "-", "-", "-", "-", "-", "-", "-"])
            failed = True
    header = ["mask", "N", "fused ms", "torch entmax ms", "sdpa ms", "fused f+b", "torch f+b", "sdpa f+b"]
    md = f"tests: {tests}\n\n" + _md_table([*header, "fused / sdpa", "rel err vs torch"], rows)
    _save(work, "entmax", {"summary": f"{len(rows)} rows; tests: {tests}", "markdown": md, "failed": failed})


def _entmax_times(q: Any, k: Any, v: Any, causal: bool, dry: bool) -> tuple[dict[str, float], float]:
    """Median ms of the fused kernel, the PyTorch entmax path and SDPA (forward; forward + backward),
    and the fused output's relative error vs the PyTorch path."""
    import torch
    import torch.nn.functional as F

    from attnlib.kernels import entmax_attention_fused

    fns = {
        "fused": lambda q, k, v: entmax_attention_fused(q, k, v, causal=causal),
        "torch entmax": lambda q, k, v: _torch_entmax(q, k, v, causal),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    go = torch.randn_like(q)
    ms: dict[str, float] = {}
    outs = {}
    for name, fn in fns.items():
        with torch.no_grad():
            outs[name] = fn(q, k, v)
            ms[name] = _bench(lambda fn=fn: fn(q, k, v), dry)
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]

        def fb(fn=fn, qkv=qkv) -> None:
            torch.autograd.grad(fn(*qkv), qkv, go)

        ms[name + " f+b"] = _bench(fb, dry)
    return ms, _rel(outs["fused"], outs["torch entmax"])


def _torch_entmax(q: Any, k: Any, v: Any, causal: bool) -> Any:
    """The PyTorch entmax path on CUDA (the policy that routes CUDA calls to the kernel turned off)."""
    from attnlib import dispatch
    from attnlib.functional.entmax import entmax_attention

    real = dispatch.entmax_fused
    dispatch.entmax_fused = lambda device: False  # type: ignore[assignment]
    try:
        return entmax_attention(q, k, v, causal=causal, chunk_size=1024)
    finally:
        dispatch.entmax_fused = real  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter, configs parsed only")
    ap.add_argument("--budget", type=float, default=None, help="overall seconds (500; dry run 1200)")
    ap.add_argument("--only", nargs="*", choices=STEPS, help="run only these steps")
    ap.add_argument("--print-run", action="store_true", help="print the device tool's command / carry / timeout")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--edge-case", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.edge_case is not None:
        row = edge_case(args.edge_case, args.dry_run)
        print(row, flush=True)
        (Path(args.work) / f"edge_{args.edge_case}.json").write_text(json.dumps(row, default=str))
        return 0
    if args.budget is None:
        args.budget = 1200.0 if args.dry_run else 500.0
    if args.print_run:
        print(json.dumps({"command": RUN_COMMAND, "carry": RUN_CARRY, "timeout_s": RUN_TIMEOUT_S}, indent=1))
        return 0
    if args.step:
        globals()[f"step_{args.step}"](Path(args.work), args.dry_run)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device here; use --dry-run on a CPU machine", flush=True)
            return 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
