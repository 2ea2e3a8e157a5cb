"""Speed mode: every chosen variant beside SDPA and FlexAttention, gated by correctness.

For each device x dtype x head_dim x causal x N x pass, every method is (1) checked against
float64 attention (:mod:`attnlib.bench.gate`; an exact variant that fails is FAILED and not
timed), (2) measured for peak memory (CPU: RSS growth in a fresh process per configuration;
CUDA: ``max_memory_allocated``) and (3) timed (CPU: interleaved ``torch.utils.benchmark``
medians of >= 5 runs after warm-up with fixed threads; CUDA: ``do_bench`` medians). The
result rows carry time, ratio to SDPA, effective GFLOP/s (FlashAttention FLOP convention),
peak memory and error; :func:`crossovers` finds the N from which each method beats SDPA.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlib.bench.gate import exactness_gate, row_errors
from attnlib.bench.isolate import IsolatedError, peak_rss_growth, run_isolated
from attnlib.bench.methods import (
    BASELINES,
    FLEX_DYNAMIC,
    Case,
    Inputs,
    MethodSpec,
    Runner,
    set_flex_dynamic,
    spec_for_child,
)
from attnlib.bench.timing import Timing, time_cpu_interleaved, time_cuda
from attnlib.errors import UnsupportedError
from attnlib.registry import available

__all__ = ["SpeedConfig", "crossover", "crossovers", "measure_case", "resolve_methods", "run_speed"]


@dataclass
class SpeedConfig:
    """Settings of the speed mode (the ``speed:`` section of the Hydra config).

    ``n`` is the grid for every method; ``long_n`` adds points for sub-quadratic methods only
    (no SDPA ratio there). Quadratic methods (and the baselines) run ``fwd_bwd`` only up to
    ``fwd_bwd_max_n``, every method only at the N in ``fwd_bwd_n`` (None: every N). With
    ``isolate`` (default) every CPU configuration runs in a fresh process (check, peak RSS
    growth, timing); with ``pair_sdpa`` SDPA is timed in the same process, interleaved with the
    method, and ``ratio_sdpa`` comes from those paired runs (robust to load changes between
    configurations); above ``pair_sdpa_max_n`` (None: no limit) the ratio uses the SDPA row of
    the same point instead (half the cost where SDPA calls take seconds). CUDA configurations
    run in-process. A method whose single call exceeds ``max_call_s`` is not run at larger N;
    no new configuration starts after ``time_budget_s``. With ``checkpoint`` (a JSON-lines path)
    every finished row is appended there and a rerun with the same settings reuses those rows, so
    an interrupted long run resumes where it stopped.
    """

    n: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    long_n: list[int] = field(default_factory=list)
    device: list[str] = field(default_factory=lambda: ["cpu"])
    dtype: list[str] = field(default_factory=lambda: ["float32"])
    batch: int = 1
    heads: int = 8
    head_dim: list[int] = field(default_factory=lambda: [64])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwd_bwd"])
    fwd_bwd_max_n: int | None = 4096
    fwd_bwd_n: list[int] | None = None
    runs: int = 5
    warmup: int = 1
    block_s: float = 0.02
    threads: int | None = 2
    memory: bool = True
    isolate: bool = True
    pair_sdpa: bool = True
    pair_sdpa_max_n: int | None = None
    case_timeout_s: float = 900.0
    max_call_s: float = 60.0
    time_budget_s: float | None = None
    gate_n: int = 256
    gate_heads: int = 2
    error_rows: int = 32
    seed: int = 0
    progress: bool = True
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.runs < 5:
            print(f"[attnlib-bench] note: runs={self.runs} < 5; published tables use >= 5 timed runs")
        bad = [p for p in self.passes if p not in ("fwd", "fwd_bwd")]
        if bad:
            raise ValueError(f"passes must be among 'fwd', 'fwd_bwd', got {bad}")
        if not self.n and not self.long_n:
            raise ValueError("speed mode needs at least one N (n=[...])")


def resolve_methods(
    names: Sequence[str] | None,
    *,
    baselines: Sequence[str] = ("sdpa", "flex"),
    extra_variants: dict[str, dict[str, Any]] | None = None,
    variant_kwargs: dict[str, dict[str, Any]] | None = None,
    flex_same_mask: bool = True,
    block_densities: Sequence[float] = (),
    block_density_methods: Sequence[str] = ("flex",),
    head_dim: int = 64,
) -> tuple[list[MethodSpec], dict[str, str]]:
    """Methods for the given table names (None = every registered variant) plus the baselines.

    Returns (methods, skipped): names that are not registered (another branch may add them) are
    skipped with a message instead of failing the run. ``variant_kwargs[name]`` overrides the
    YAML defaults of a variant. With ``flex_same_mask``, a variant that imposes its own mask
    (``implied_mask()``, e.g. a sliding window) also gets a ``flex[<label>]`` baseline row.
    For every density in ``block_densities``, each of ``block_density_methods`` ("flex" or a
    variant taking a BlockMask) gets a ``<name>[d=<density>]`` row under a block-sparse mask.
    Those rows must all time the same mask: a variant's density rows take
    ``variant_kwargs[name]`` updated by ``variant_kwargs["<name>[density]"]`` (e.g.
    ``block_sparse[density]: {pattern: dense}``), and a variant that still imposes a mask of its
    own there reports n/a instead of timing another mask than ``flex[d=...]``.
    """
    extra = dict(extra_variants or {})
    overrides = dict(variant_kwargs or {})
    skipped: dict[str, str] = {}
    methods: list[MethodSpec] = []
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; expected some of {sorted(BASELINES)}")
        methods.append(MethodSpec(label=b, kind=b))
    wanted = list(available()) if names is None else list(names)
    for name in wanted:
        if name in BASELINES or str(name).endswith("[density]"):
            continue
        try:
            spec = MethodSpec.parse(str(name), extra)
        except ValueError as e:
            skipped[str(name)] = str(e)
            print(f"[attnlib-bench] skipping {name!r}: {e}")
            continue
        spec.kwargs = {**overrides.get(spec.variant or "", {}), **spec.kwargs, **overrides.get(spec.label, {})}
        methods.append(spec)
        if flex_same_mask and "flex" in baselines:
            try:
                core = spec.build_core(Case("cpu", "float32", 1, 1, head_dim, 1024, False))
                has_mask = core.implied_mask(1024, 1024) is not None
            except Exception as e:  # bad kwargs show up in the variant's own rows
                has_mask = False
                print(f"[attnlib-bench] {spec.label}: could not build at N=1024 ({type(e).__name__}: {e})")
            if has_mask:
                methods.append(MethodSpec(label=f"flex[{spec.label}]", kind="flex", mask_from=spec))
    for d in block_densities:
        for name in block_density_methods:
            label = f"{name}[d={d:g}]"
            if name == "flex":
                methods.append(MethodSpec(label=label, kind="flex", block_density=float(d)))
            elif name in available():
                kw = {**overrides.get(name, {}), **overrides.get(f"{name}[density]", {})}
                methods.append(MethodSpec(label=label, variant=name, kwargs=kw, block_density=float(d)))
            else:
                skipped[label] = f"{name!r} is not registered"
                print(f"[attnlib-bench] skipping {label!r}: {name!r} is not registered")
    return methods, skipped


def _case_from_dict(d: dict[str, Any]) -> Case:
    d = dict(d)
    d["pass_"] = d.pop("pass")
    return Case(**d)


def _cuda_peak(runner: Runner) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner.call()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _grid(cfg: SpeedConfig) -> list[int]:
    return sorted(set(cfg.n) | set(cfg.long_n))


def _applicable(spec: MethodSpec, n: int, pass_: str, cfg: SpeedConfig) -> str | None:
    """None if ``spec`` runs at (n, pass), else the reason it does not."""
    if n not in cfg.n and not spec.subquadratic:
        return "quadratic: long-N points are for sub-quadratic methods"
    if pass_ == "fwd_bwd" and not spec.subquadratic and cfg.fwd_bwd_max_n is not None and n > cfg.fwd_bwd_max_n:
        return f"quadratic: fwd+bwd only up to N={cfg.fwd_bwd_max_n}"
    if pass_ == "fwd_bwd" and cfg.fwd_bwd_n is not None and n not in cfg.fwd_bwd_n:
        return f"fwd+bwd only at N in {list(cfg.fwd_bwd_n)}"
    return None


def _fingerprint(cfg: SpeedConfig, methods: Sequence[MethodSpec]) -> str:
    """What a checkpointed row depends on: the settings (minus bookkeeping) and the methods."""
    skip = {"checkpoint", "progress", "time_budget_s", "case_timeout_s"}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return json.dumps({"settings": settings, "methods": [m.describe() for m in methods]}, sort_keys=True, default=str)


def _row_key(label: str, case: Case) -> tuple:
    return (label, case.device, case.dtype, case.head_dim, case.n, case.causal, case.pass_)


def _load_checkpoint(path: str | None, fingerprint: str) -> dict[tuple, dict[str, Any]]:
    """Rows of an earlier run with the same fingerprint (a new checkpoint is started otherwise)."""
    if path is None:
        return {}
    p = Path(path)
    done: dict[tuple, dict[str, Any]] = {}
    if p.exists():
        lines = p.read_text().splitlines()
        if lines and json.loads(lines[0]).get("fingerprint") == fingerprint:
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                key = (r["method"], r["device"], r["dtype"], r["head_dim"], r["n"], r["causal"], r["pass"])
                done[key] = r
            return done
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return done


def _append_checkpoint(path: str | None, row: dict[str, Any]) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _known_unavailable(spec: MethodSpec, case: Case) -> str | None:
    """Why ``spec`` cannot run ``case`` when that is known without running it, else None.

    Saves a process start per row (and keeps the n/a row in the table): FlexAttention has no
    CPU backward in torch 2.x.
    """
    if spec.kind == "flex" and case.pass_ == "fwd_bwd" and case.device == "cpu":
        return "FlexAttention does not support backward on CPU"
    return None


def _row(spec: MethodSpec, case: Case, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "method": spec.label,
        "kind": "baseline" if spec.is_baseline else ("exact" if spec.exact else "approx"),
        **case.as_dict(),
        "flops": case.flops(),
        "status": "ok",
        "reason": "",
    }
    r.update(kw)
    return r


def run_speed(
    cfg: SpeedConfig,
    methods: Sequence[MethodSpec],
    *,
    log: Any = print,
) -> dict[str, Any]:
    """Run the speed grid. Returns ``{"rows", "gates", "crossovers", "wall_s"}`` (JSON-ready)."""
    return _SpeedRun(cfg, list(methods), log).run()


class _SpeedRun:
    """One run of the speed grid (state: rows, gate verdicts, methods found too slow)."""

    def __init__(self, cfg: SpeedConfig, methods: list[MethodSpec], log: Any) -> None:
        self.cfg, self.methods, self.log = cfg, methods, log
        self.rows: list[dict[str, Any]] = []
        self.gates: list[dict[str, Any]] = []
        self.t_start = time.perf_counter()
        self.done = _load_checkpoint(cfg.checkpoint, _fingerprint(cfg, methods))

    def run(self) -> dict[str, Any]:
        from attnlib.bench.progress import progress_bar

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        grid = _grid(cfg)
        per_device = len(cfg.dtype) * len(cfg.head_dim) * len(cfg.causal) * len(grid) * len(cfg.passes)
        self.bar = progress_bar(
            total=per_device * len(cfg.device) * len(self.methods), desc="speed", enabled=cfg.progress
        )
        for device in cfg.device:
            if device.startswith("cuda") and not torch.cuda.is_available():
                self.log(f"[attnlib-bench] skipping device {device!r}: CUDA is not available on this machine")
                self.bar.update(per_device * len(self.methods))
                continue
            for dtype in cfg.dtype:
                for head_dim in cfg.head_dim:
                    for causal in cfg.causal:
                        self._sweep(device, dtype, head_dim, causal, grid)
        self.bar.close()
        return {
            "rows": self.rows,
            "gates": self.gates,
            "crossovers": crossovers(self.rows),
            "wall_s": time.perf_counter() - self.t_start,
        }

    # -- one (device, dtype, head_dim, causal) sweep over N and passes ---------------------------

    def _gate(self, device: str, head_dim: int, causal: bool) -> dict[str, str]:
        failed: dict[str, str] = {}
        for spec in self.methods:
            if spec.is_baseline or not spec.exact or (causal and not spec.capabilities.causal):
                continue
            g = exactness_gate(
                spec,
                causal=causal,
                head_dim=head_dim,
                device=device,
                n=self.cfg.gate_n,
                heads=self.cfg.gate_heads,
                seed=self.cfg.seed,
            )
            self.gates.append(
                {"method": spec.label, "device": device, "head_dim": head_dim, "causal": causal, **g.as_dict()}
            )
            if g.ok is False:
                failed[spec.label] = f"float64 gate: {g.message}"
                self.log(f"[attnlib-bench] {spec.label} FAILED the exactness gate: {g.message}")
        return failed

    def _sweep(self, device: str, dtype: str, head_dim: int, causal: bool, grid: list[int]) -> None:
        cfg = self.cfg
        failed = self._gate(device, head_dim, causal)
        too_slow: dict[tuple[str, str], int] = {}
        for n in grid:
            for pass_ in cfg.passes:
                case = Case(device, dtype, cfg.batch, cfg.heads, head_dim, n, causal, pass_)
                self.bar.set_description(f"speed {device} {dtype} d{head_dim} N={n} causal={causal} {pass_}")
                group: dict[str, dict[str, Any]] = {}
                for spec in self.methods:
                    self.bar.update(1)
                    if _applicable(spec, n, pass_, cfg) is not None:
                        continue
                    na = _known_unavailable(spec, case)
                    if na is not None:
                        self.rows.append(_row(spec, case, status="n/a", reason=na))
                        continue
                    if spec.label in failed:
                        self.rows.append(_row(spec, case, status="FAILED", reason=failed[spec.label]))
                        continue
                    if (spec.label, pass_) in too_slow:
                        why = f"a call took > max_call_s={cfg.max_call_s}s at N={too_slow[(spec.label, pass_)]}"
                        self.rows.append(_row(spec, case, status="skipped", reason=why))
                        continue
                    if cfg.time_budget_s is not None and time.perf_counter() - self.t_start > cfg.time_budget_s:
                        self.rows.append(_row(spec, case, status="skipped", reason="time budget exhausted"))
                        continue
                    row = self.done.get(_row_key(spec.label, case))
                    if row is None:
                        t_case = time.perf_counter()
                        row = self._measure(spec, case)
                        row["case_wall_s"] = time.perf_counter() - t_case
                        _append_checkpoint(cfg.checkpoint, row)
                    if (row.get("median_s") or row.get("first_s") or 0.0) > cfg.max_call_s:
                        too_slow[(spec.label, pass_)] = n
                    if row["status"] == "ok":
                        group[spec.label] = row
                    self.rows.append(row)
                sd = group.get("sdpa")
                if sd is not None:
                    for r in group.values():
                        r.setdefault("ratio_sdpa", r["median_s"] / sd["median_s"])
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()

    def _measure(self, spec: MethodSpec, case: Case) -> dict[str, Any]:
        cfg = self.cfg
        opts = {
            "error_rows": cfg.error_rows,
            "runs": cfg.runs,
            "warmup": cfg.warmup,
            "block_s": cfg.block_s,
            "threads": cfg.threads,
            "memory": cfg.memory,
            "max_call_s": cfg.max_call_s,
            "seed": cfg.seed,
            "cuda_warmup_ms": cfg.cuda_warmup_ms,
            "cuda_rep_ms": cfg.cuda_rep_ms,
            "flex_dynamic": FLEX_DYNAMIC["value"],
            "isolated": False,
            "pair_sdpa": cfg.pair_sdpa
            and case.n in cfg.n
            and (cfg.pair_sdpa_max_n is None or case.n <= cfg.pair_sdpa_max_n)
            and any(m.kind == "sdpa" for m in self.methods),
        }
        if case.device.startswith("cuda") or not cfg.isolate:
            return measure_case(spec, case.as_dict(), opts)
        opts["isolated"] = True
        try:
            return run_isolated(measure_case, spec_for_child(spec), case.as_dict(), opts, timeout=cfg.case_timeout_s)
        except IsolatedError as e:
            return _row(spec, case, status="error", reason=f"fresh-process run: {_short(e)}")


def measure_case(spec: MethodSpec, case_d: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Everything about one (method, case), meant for a fresh process: check, memory, timing.

    1. one call (the warm-up; includes ``torch.compile`` for Flex, reported as ``first_s``) whose
       forward output is checked against float64 attention on sampled rows (FAILED: stop here);
    2. peak memory of one more call (CPU: RSS growth, only when ``opts["isolated"]`` - the peak
       counter is process-wide; CUDA: ``max_memory_allocated``);
    3. timing: ``opts["runs"]`` runs (CPU ``torch.utils.benchmark``; CUDA ``do_bench``), unless one
       call exceeded ``max_call_s``.
    Returns the result row.
    """
    case = _case_from_dict(case_d)
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    set_flex_dynamic(bool(opts.get("flex_dynamic", False)))
    cuda = case.device.startswith("cuda")
    row = _row(spec, case)
    try:
        torch.manual_seed(int(opts.get("seed", 0)))
        runner = Runner(spec, case, Inputs.make(case, seed=int(opts.get("seed", 0))))
        row.update(runner.info)
        t0 = time.perf_counter()
        out = runner.call()
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
    except (UnsupportedError, NotImplementedError) as e:
        return _row(spec, case, status="n/a", reason=_short(e))
    except Exception as e:
        return _row(spec, case, status="error", reason=_short(e))
    row["first_s"] = first
    warm: dict[str, float] = {}
    row.update(row_errors(runner, out, rows=int(opts.get("error_rows", 32))))
    del out
    if row.get("gate") == "FAILED":
        row.update(status="FAILED", reason=row.get("gate_msg", ""))
        return row
    if opts.get("memory", True):
        if cuda:
            t0 = time.perf_counter()
            row["mem_peak_mb"] = _cuda_peak(runner) / 2**20  # synchronizes: a warm call's wall time
            warm["call"] = time.perf_counter() - t0
            row["mem_method"] = "torch.cuda.max_memory_allocated - allocated before the call"
        elif opts.get("isolated"):
            t0 = time.perf_counter()
            mem = peak_rss_growth(runner.call, warmup=False)
            warm["call"] = time.perf_counter() - t0  # a warm call: no further warm-up needed
            row["mem_peak_mb"] = mem["peak_bytes"] / 2**20
            row["mem_method"] = "peak RSS growth of one warm call, fresh process per configuration"
    max_call = float(opts.get("max_call_s", 60.0))
    # the first call may include one-time work (Flex compilation, Triton autotuning, ecoformer's
    # hash learning): judge by a warm call - the memory measurement's where there was one, else
    # one more call when the first was over the limit
    if first > max_call and "call" not in warm:
        t0 = time.perf_counter()
        runner.call()
        if cuda:
            torch.cuda.synchronize()
        warm["call"] = time.perf_counter() - t0
    probe = warm.get("call", first)
    if probe > max_call:
        row.update(Timing.from_times([probe], timer="single call (> max_call_s)").as_dict())
        row["first_s"] = first
        row["reason"] = f"one warm call only: {probe:.1f}s > max_call_s (first call {first:.1f}s)"
    else:
        if cuda:
            t = time_cuda(
                runner.call,
                grad_to_none=runner.grad_to_none or None,
                warmup_ms=int(opts.get("cuda_warmup_ms", 25)),
                rep_ms=int(opts.get("cuda_rep_ms", 100)),
            )
        else:
            threads = opts.get("threads") or torch.get_num_threads()
            fns = {spec.label: runner.call}
            if opts.get("pair_sdpa") and spec.kind != "sdpa":
                # SDPA on the same inputs, interleaved with the method: a ratio robust to machine drift
                fns["__sdpa__"] = Runner(MethodSpec(label="sdpa", kind="sdpa"), case, runner.inputs).call
            ts = time_cpu_interleaved(
                fns,
                runs=int(opts.get("runs", 5)),
                warmup=int(opts.get("warmup", 1)),
                threads=int(threads),
                block_s=float(opts.get("block_s", 0.02)),
                warm_s={spec.label: warm["call"]} if "call" in warm else None,
                shuffle=0 if len(fns) > 1 else None,
            )
            t = ts[spec.label]
            where = "fresh process per configuration" if opts.get("isolated") else "in-process"
            t.timer = f"torch.utils.benchmark.Timer, {threads} threads, {where}"
            if "__sdpa__" in ts:
                t.timer += ", interleaved with SDPA"
                row["sdpa_median_s"] = ts["__sdpa__"].median_s
                row["ratio_sdpa"] = t.median_s / ts["__sdpa__"].median_s
        row.update(t.as_dict())
        row["first_s"] = first
    row["gflops_eff"] = case.flops() / row["median_s"] / 1e9
    return row


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(e).__name__}: {first}" if not isinstance(e, IsolatedError) else first
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def crossover(ns: Sequence[int], ratios: Sequence[float], *, win_below: float = 0.95) -> dict[str, Any]:
    """Where a method starts beating the baseline, from its time ratios (method / baseline) over N.

    A point is a win when the ratio is below ``win_below`` (default 0.95: a 5 % margin so that
    timing noise between equal kernels is not reported as a crossover). The crossover is the
    smallest grid N from which every larger grid N is a win.
    Returns ``{"status": "always" | "never" | "at", "n": grid N or None, "n_interp": N or None}``;
    ``n_interp`` interpolates log(ratio / win_below) linearly in log(N) between the last losing
    and the first winning grid point ("always": faster at every N; "never": not faster at the
    largest N).
    """
    if len(ns) != len(ratios) or not ns:
        raise ValueError(f"need equally many N and ratios (>= 1), got {len(ns)} and {len(ratios)}")
    pts = sorted(zip(ns, ratios))
    ns_s = [p[0] for p in pts]
    rs = [p[1] for p in pts]
    i = len(rs)
    while i > 0 and rs[i - 1] < win_below:
        i -= 1
    if i == len(rs):
        return {"status": "never", "n": None, "n_interp": None}
    if i == 0:
        return {"status": "always", "n": ns_s[0], "n_interp": None}
    n0, n1, r0, r1 = ns_s[i - 1], ns_s[i], rs[i - 1], rs[i]
    l0, l1 = math.log(r0 / win_below), math.log(r1 / win_below)
    frac = l0 / (l0 - l1) if l0 != l1 else 1.0
    n_interp = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    return {"status": "at", "n": n1, "n_interp": n_interp}


def crossovers(rows: Iterable[dict[str, Any]], baseline: str = "sdpa", win_below: float = 0.95) -> list[dict[str, Any]]:
    """:func:`crossover` for every method and (device, dtype, head_dim, causal, pass) with timed rows.

    Uses a row's own ``ratio_sdpa`` (paired, interleaved runs) when present, else the ratio of the
    medians of the two rows.
    """
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_s")]
    base = {
        (r["device"], r["dtype"], r["head_dim"], r["causal"], r["pass"], r["n"]): r["median_s"]
        for r in ok
        if r["method"] == baseline
    }
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in ok:
        if r["method"] == baseline:
            continue
        key = (r["method"], r["device"], r["dtype"], r["head_dim"], r["causal"], r["pass"])
        b = base.get((*key[1:], r["n"]))
        ratio = r.get("ratio_sdpa") if baseline == "sdpa" else None
        if ratio is None and b:
            ratio = r["median_s"] / b
        if ratio is not None and b:
            series.setdefault(key, []).append((r["n"], ratio))
    out = []
    for key, pts in series.items():
        c = crossover([p[0] for p in pts], [p[1] for p in pts], win_below=win_below)
        out.append(
            dict(
                zip(("method", "device", "dtype", "head_dim", "causal", "pass"), key),
                baseline=baseline,
                win_below=win_below,
                ns=[p[0] for p in sorted(pts)],
                ratios=[p[1] for p in sorted(pts)],
                **c,
            )
        )
    return out
