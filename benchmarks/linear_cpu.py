"""Linear / flow / AFT attention vs SDPA on the CPU: forward time and peak memory over N.

B=1, H=8, D=64, fp32, 2 threads (defaults), non-causal and causal, N = 1k .. 64k. Each variant
runs as its registered core (``attnlib.registry.get_variant(name)``, what ``attnlib.Attention``
calls after its projections) under ``torch.no_grad()``; the baseline is
``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` for causal).

* time: median of interleaved runs (all implementations per (N, causal), in a new random order
  each round, so load drift on a shared machine hits all of them alike and none always runs
  first; one untimed call before each timed one, so none is timed right after another's 2-s
  SDPA call, which on this project's VMs made the next call re-touch cold memory and run up to
  2x slower); speed-up = SDPA time / variant time.
* memory: each (implementation, N, causal) runs once in a fresh subprocess; "peak" is the
  process's peak RSS during the call (VmHWM, reset just before it) minus its RSS just before
  (inputs and warm-up excluded), i.e. the attention's own working memory + output.

Writes ``benchmarks/results/linear_cpu.{md,json}`` and checks the targets (speed-ups at
N=16384, memory ratio N=65536 / N=8192). Usage::

    python benchmarks/linear_cpu.py                 # full run (~15 min, SDPA at 64k dominates)
    python benchmarks/linear_cpu.py --quick         # N in {1k, 8k, 16k}, no 64k SDPA
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, machine_info, markdown_table

VARIANTS = ["linear", "flow", "cosformer", "performer", "lsa", "ecoformer", "aft_simple", "aft_local", "aft_conv"]
NS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
B, H, D = 1, 8, 64
BAR_TIME = {("linear", False): 30, ("flow", False): 30, ("cosformer", False): 30,
            ("linear", True): 8, ("flow", True): 4, ("cosformer", True): 4}  # fmt: skip
BAR_MEMORY = 9.0


def make_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, n, D), standard normal, seeded."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, n, D, generator=g) for _ in range(3))  # type: ignore[return-value]


def make_impl(name: str, n: int, causal: bool, qkv: tuple[torch.Tensor, ...] | None = None):
    """A zero-argument callable running ``name`` ('sdpa' or a variant) on inputs of length n."""
    import attnlib
    from attnlib.masks import normalize_mask
    from attnlib.registry import get_variant

    q, k, v = make_inputs(n) if qkv is None else qkv
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    kwargs = {"max_len": n} if name in ("aft_local", "aft_full") else {}
    core = get_variant(name)(num_heads=H, head_dim=D, **kwargs).eval()
    am = normalize_mask(None, causal=causal, batch=B, heads=H, n=n, m=n, device=q.device)
    assert attnlib.variant_info(name).causal or not causal
    return lambda: core(q, k, v, am).out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, n: int, causal: bool, threads: int) -> None:
    """Subprocess entry: print the peak-RSS growth (KiB) of one call over the RSS just before it.

    The kernel's peak-RSS mark (VmHWM) is reset right before the call (``/proc/self/clear_refs``),
    so earlier transients (imports, input creation) do not hide the call's own peak.
    """
    torch.set_num_threads(threads)
    with torch.no_grad():
        make_impl(name, 256, causal)()  # load kernels, allocator warm-up
        fn = make_impl(name, n, causal)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
    del out
    print(json.dumps({"peak_kib": peak - before}))


def measure_memory(name: str, n: int, causal: bool, threads: int) -> float:
    """Peak extra memory (MiB) of one call, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-child", name, str(n), str(int(causal)), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_kib"] / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="*", default=NS)
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats (3 above N=16384)")
    ap.add_argument("--sdpa-max-n", type=int, default=65536, help="skip SDPA timing above this N")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-time", action="store_true", help="memory only")
    ap.add_argument("--quick", action="store_true", help="N in {1024, 8192, 16384}")
    ap.add_argument("--out", default="linear_cpu")
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        name, n, causal, threads = args.memory_child
        memory_child(name, int(n), bool(int(causal)), int(threads))
        return
    torch.set_num_threads(args.threads)
    ns = [1024, 8192, 16384] if args.quick else args.ns
    info = machine_info()
    info.update({"B": B, "H": H, "D": D, "dtype": "float32", "threads": args.threads})
    info["loadavg_start"] = "/".join(f"{x:.1f}" for x in os.getloadavg())
    records: list[dict[str, object]] = []
    t_start = time.time()
    for causal in (False, True):
        for n in ns:
            names = (["sdpa"] if n <= args.sdpa_max_n else []) + list(args.variants)
            med: dict[str, float | None] = dict.fromkeys(names)
            if not args.no_time:
                with torch.no_grad():
                    qkv = make_inputs(n)  # shared by every implementation
                    fns = {nm: make_impl(nm, n, causal, qkv) for nm in names}
                    reps = args.repeats if n <= 16384 else 3
                    med.update(interleaved_medians(fns, repeats=reps, warmup=2 if n <= 16384 else 1, rewarm=True))
                    del fns, qkv
            for nm in names:
                rec: dict[str, object] = {"impl": nm, "n": n, "causal": causal, "time_s": med[nm]}
                if not args.no_memory and (nm != "sdpa" or n <= args.sdpa_max_n):
                    rec["peak_mib"] = measure_memory(nm, n, causal, args.threads)
                records.append(rec)
            print(
                f"[{time.time() - t_start:6.0f}s] causal={causal} N={n}: "
                + ", ".join(
                    f"{nm} {(med[nm] or 0) * 1e3:.1f} ms / {_get(records, nm, n, causal, 'peak_mib') or 0:.0f} MiB"
                    for nm in names
                ),
                flush=True,
            )
    info["loadavg_end"] = "/".join(f"{x:.1f}" for x in os.getloadavg())
    write(records, info, ns, args)


def _get(records, impl, n, causal, key="time_s"):
    for r in records:
        if r["impl"] == impl and r["n"] == n and r["causal"] == causal:
            return r.get(key)
    return None


def write(records, info, ns, args) -> None:
    impls = ["sdpa", *args.variants]
    lines = [
        "# Linear / flow / AFT attention vs SDPA on the CPU",
        "",
        f"`python benchmarks/linear_cpu.py` - B={B}, H={H}, D={D}, fp32, {info['threads']} threads, forward "
        "only (no grad). Times are medians of interleaved runs (a new random order each round, one untimed call "
        "before each timed one); speed-up = "
        "SDPA time / variant time. "
        "Peak = max-RSS growth of one call in a fresh process (working memory + output).",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        "**Measured on a shared, busy machine (other jobs running; see the load averages above, 2 cores):"
        " quote ratios, and rerun on a quiet one. Under oversubscription the blocked linear-family paths"
        " (many short parallel regions) slow down far more than SDPA's single fused kernel.**",
        "",
    ]
    for causal in (False, True):
        rows = []
        for n in ns:
            sd = _get(records, "sdpa", n, causal)
            if sd is None and all(_get(records, nm, n, causal) is None for nm in args.variants):
                continue
            row: list[object] = [n, f"{sd * 1e3:.1f}" if sd else "-"]
            for nm in args.variants:
                tv = _get(records, nm, n, causal)
                row.append("-" if tv is None else f"{tv * 1e3:.1f}" + (f" ({sd / tv:.1f}x)" if sd else ""))
            rows.append(row)
        if rows:
            lines.append(f"## {'Causal' if causal else 'Non-causal'}: time (ms) and speed-up vs SDPA")
            lines += ["", markdown_table(["N", "sdpa", *args.variants], rows), ""]
        if not args.no_memory:
            lines.append(f"## {'Causal' if causal else 'Non-causal'}: peak memory (MiB)")
            lines.append("")
            rows = []
            for n in ns:
                row = [n]
                for nm in impls:
                    pk = _get(records, nm, n, causal, "peak_mib")
                    row.append("-" if pk is None else f"{pk:.1f}")
                rows.append(row)
            lines += [markdown_table(["N", *impls], rows), ""]
    lines.append("## Targets")
    lines.append("")
    checks = []
    if 16384 in ns:
        for (nm, causal), need in BAR_TIME.items():
            sd, tv = _get(records, "sdpa", 16384, causal), _get(records, nm, 16384, causal)
            if sd and tv and nm in args.variants:
                sp = sd / tv
                checks.append([f"{nm} {'causal' if causal else 'non-causal'} N=16384", f">= {need}x", f"{sp:.1f}x",
                               "PASS" if sp >= need else "FAIL"])  # fmt: skip
    if not args.no_memory and 8192 in ns and 65536 in ns:
        for nm in args.variants:
            for causal in (False, True):
                a, b = _get(records, nm, 8192, causal, "peak_mib"), _get(records, nm, 65536, causal, "peak_mib")
                if a and b:
                    r = b / a
                    checks.append([f"{nm} {'causal' if causal else 'non-causal'} peak 64k / 8k", f"<= {BAR_MEMORY}",
                                   f"{r:.2f}", "PASS" if r <= BAR_MEMORY else "FAIL"])  # fmt: skip
    lines += [markdown_table(["check", "bar", "measured", ""], checks), ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": info, "records": records}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
