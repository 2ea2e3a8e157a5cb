"""attnlib-bench machinery: correctness gate, crossover, regression gate, memory runner, quality runner, CLI.

Everything here is tiny (N <= 128, one or two timed runs): these tests check the machinery,
never speed. No test variant is registered globally (specs carry their core class).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnlib.bench.approx import ApproxConfig, approx_error, approx_markdown, approx_plots, discover_knobs, run_approx
from attnlib.bench.compare import compare_rows, load_rows, row_noise
from attnlib.bench.isolate import IsolatedError, alloc_probe, crash_probe, run_isolated
from attnlib.bench.machine import machine_info, machine_slug
from attnlib.bench.methods import Case, Inputs, MethodSpec, Runner, density_block_mask, is_subquadratic
from attnlib.bench.quality import QualityConfig, TrainAppNotFoundError, quality_markdown, run_quality
from attnlib.bench.speed import SpeedConfig, crossover, crossovers, resolve_methods, run_speed
from attnlib.bench.timing import time_cpu_interleaved
from attnlib.cli.bench import CONFIG_ROOT, _translate_argv, run
from attnlib.functional import softmax_attention
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, available
from attnlib.variants.base import AttentionCore, CoreOutput

# ------------------------------------------------------------------------------------------
# toy cores (not registered)
# ------------------------------------------------------------------------------------------


class _Exactish(AttentionCore):
    capabilities = Capabilities(causal=True, exact=True, family="test", complexity="O(N^2)")

    def attend(self, q, k, v, mask: AttentionMask, *, cross, need_weights, need_importance, dropout_p) -> CoreOutput:
        return CoreOutput(self.compute(q, k, v, mask))

    def compute(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        return softmax_attention(q, k, v, mask=mask, backend="math")


class BrokenExact(_Exactish):
    """Claims to be exact, but its logit scale is off by 1 %."""

    def compute(self, q, k, v, mask):
        return softmax_attention(q, k, v, mask=mask, backend="math", scale=1.01 * q.shape[-1] ** -0.5)


class LowPrecisionExact(_Exactish):
    """Exact in float64, but computes float32 inputs in bfloat16: fails the per-row rule only."""

    def compute(self, q, k, v, mask):
        if q.dtype == torch.float32:
            return softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=mask, backend="math").float()
        return super().compute(q, k, v, mask)


class Tempered(AttentionCore):
    """Softmax at temperature t: an 'approximation' that is exact at t = 1."""

    capabilities = Capabilities(causal=True, exact=False, family="test", complexity="O(N^2)")

    def __init__(self, *, num_heads: int, head_dim: int, temperature: float = 0.5) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.temperature = temperature

    @classmethod
    def approximation_knobs(cls) -> dict[str, list]:
        return {"temperature": [0.5, 1.0]}

    def attend(self, q, k, v, mask, *, cross, need_weights, need_importance, dropout_p) -> CoreOutput:
        scale = q.shape[-1] ** -0.5 / self.temperature
        return CoreOutput(softmax_attention(q, k, v, mask=mask, backend="math", scale=scale))


def _tiny_speed(**kw) -> SpeedConfig:
    base = dict(
        n=[64, 128],
        heads=1,
        head_dim=[16],
        causal=[False],
        passes=["fwd"],
        runs=2,
        block_s=0.0,
        memory=False,
        isolate=False,
        progress=False,
        gate_n=64,
        gate_heads=1,
        error_rows=8,
    )
    base.update(kw)
    return SpeedConfig(**base)


# ------------------------------------------------------------------------------------------
# correctness gate
# ------------------------------------------------------------------------------------------


def test_gate_fails_broken_exact_variant_and_does_not_time_it() -> None:
    methods = [
        MethodSpec(label="sdpa", kind="sdpa"),
        MethodSpec(label="softmax", variant="softmax"),
        MethodSpec(label="broken", core_cls=BrokenExact),
        MethodSpec(label="lowprec", core_cls=LowPrecisionExact),
    ]
    res = run_speed(_tiny_speed(causal=[False, True]), methods, log=lambda *_: None)
    rows = {(r["method"], r["n"], r["causal"]): r for r in res["rows"]}
    for n in (64, 128):
        for causal in (False, True):
            broken = rows[("broken", n, causal)]
            assert broken["status"] == "FAILED" and "float64 gate" in broken["reason"]
            assert "median_s" not in broken
            low = rows[("lowprec", n, causal)]  # passes the float64 gate, fails the fp32 row rule
            assert low["status"] == "FAILED" and "eager error" in low["reason"]
            assert "median_s" not in low
            good = rows[("softmax", n, causal)]
            assert good["status"] == "ok" and good["median_s"] > 0 and good["runs"] == 2
            assert good["error_rel"] < 1e-5 and good["gate"] == "pass"
            assert rows[("sdpa", n, causal)]["ratio_sdpa"] == 1.0
    gates = {(g["method"], g["causal"]): g for g in res["gates"]}
    assert gates[("broken", False)]["ok"] is False and gates[("broken", False)]["error_max"] > 1e-6
    assert gates[("lowprec", True)]["ok"] is True and gates[("softmax", True)]["error_max"] < 1e-12


def test_approximate_rows_report_error_and_are_timed() -> None:
    methods = [MethodSpec(label="sdpa", kind="sdpa"), MethodSpec(label="tempered", core_cls=Tempered)]
    res = run_speed(_tiny_speed(n=[64]), methods, log=lambda *_: None)
    row = next(r for r in res["rows"] if r["method"] == "tempered")
    assert row["kind"] == "approx" and row["status"] == "ok" and row["median_s"] > 0
    assert 1e-3 < row["error_rel"] < 2.0  # temperature 0.5 is visibly off softmax
    assert math.isclose(row["ratio_sdpa"], row["median_s"] / row["sdpa_median_s"])  # paired, interleaved SDPA runs
    assert "interleaved with SDPA" in row["timer"]
    assert not res["gates"]  # approximate variants have no exactness gate


def test_flex_backward_on_cpu_is_na_without_running() -> None:
    methods = [MethodSpec(label="flex", kind="flex")]
    res = run_speed(_tiny_speed(n=[64], passes=["fwd_bwd"], isolate=True), methods, log=lambda *_: None)
    (row,) = res["rows"]
    assert row["status"] == "n/a" and "backward on CPU" in row["reason"]
    assert "case_wall_s" not in row and "median_s" not in row  # decided without a process or a call


def test_fwd_bwd_and_pairing_limits() -> None:
    methods = [MethodSpec(label="sdpa", kind="sdpa"), MethodSpec(label="linear", variant="linear")]
    cfg = _tiny_speed(n=[64, 128], passes=["fwd", "fwd_bwd"], fwd_bwd_n=[64], pair_sdpa_max_n=64)
    res = run_speed(cfg, methods, log=lambda *_: None)
    got = {(r["method"], r["n"], r["pass"]) for r in res["rows"]}
    assert ("linear", 64, "fwd_bwd") in got and ("linear", 128, "fwd_bwd") not in got  # sub-quadratic capped too
    assert ("linear", 128, "fwd") in got
    rows = {(r["method"], r["n"], r["pass"]): r for r in res["rows"]}
    assert "sdpa_median_s" in rows[("linear", 64, "fwd")]  # paired at 64
    far = rows[("linear", 128, "fwd")]
    assert "sdpa_median_s" not in far and "interleaved with SDPA" not in far["timer"]
    assert math.isclose(far["ratio_sdpa"], far["median_s"] / rows[("sdpa", 128, "fwd")]["median_s"])


def test_speed_checkpoint_resumes_and_ignores_other_settings(tmp_path: Path) -> None:
    ck = tmp_path / "speed.partial.jsonl"
    methods = [MethodSpec(label="sdpa", kind="sdpa"), MethodSpec(label="softmax", variant="softmax")]
    first = run_speed(_tiny_speed(n=[64], checkpoint=str(ck)), methods, log=lambda *_: None)
    assert len(ck.read_text().splitlines()) == 1 + len(first["rows"])  # fingerprint + one line per row
    with open(ck, "a") as f:
        f.write('{"method": "cut by a kill')  # a torn last line is skipped
    again = run_speed(_tiny_speed(n=[64], checkpoint=str(ck)), methods, log=lambda *_: None)
    assert again["rows"] == first["rows"]  # reused, not re-measured (timings would differ)
    more = run_speed(_tiny_speed(n=[64, 128], checkpoint=str(ck)), methods, log=lambda *_: None)
    assert {r["n"] for r in more["rows"]} == {64, 128}
    assert [r for r in more["rows"] if r["n"] == 64] != first["rows"]  # other settings: measured afresh


@pytest.mark.parametrize("variant", available())
def test_every_variant_builds_for_benchmark_lengths(variant: str) -> None:
    # N beyond every default size (AFT max_len 1024, sparsifiner num_tokens 197/784): the
    # benchmark_kwargs hook must size the variant, not leave an error row in the speed table
    spec = MethodSpec(label=variant, variant=variant)
    case = Case("cpu", "float32", 1, 1, 8, 1100, False, "fwd")
    runner = Runner(spec, case, Inputs.make(case, seed=0))
    out = runner.call()
    assert out.shape == (1, 1, 1100, 8) and torch.isfinite(out).all()


def test_interleaved_timer_makes_no_hidden_calls() -> None:
    calls = {"a": 0, "b": 0}

    def make(label: str) -> Callable[[], None]:
        def fn() -> None:
            calls[label] += 1

        return fn

    res = time_cpu_interleaved({"a": make("a"), "b": make("b")}, runs=3, warmup=1, block_s=0.0)
    # one warm-up call + one call per timed run: torch's Timer.timeit would add 2 per run
    assert calls == {"a": 4, "b": 4}
    assert res["a"].runs == 3 and res["a"].number == 1 and all(t > 0 for t in res["a"].times_s)
    calls.update(a=0, b=0)
    time_cpu_interleaved({"a": make("a"), "b": make("b")}, runs=2, warmup=0, warm_s={"a": 0.0, "b": 1.0}, block_s=0.0)
    assert calls == {"a": 2, "b": 2}
    # shuffled rounds: every callable still timed once per round, and not always in the same slot
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abcd"}
    res = time_cpu_interleaved(fns, runs=12, warmup=0, warm_s=dict.fromkeys("abcd", 0.0), block_s=0.0, shuffle=0)
    rounds = [order[i : i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(rounds) == 12
    assert len({r[0] for r in rounds}) > 1 and all(res[k].runs == 12 for k in "abcd")
    assert "shuffled" in res["a"].timer
    order.clear()
    res = time_cpu_interleaved(fns, runs=3, warmup=0, warm_s=dict.fromkeys("abcd", 0.0), block_s=0.0, rewarm=True)
    assert [order[i] for i in range(0, 24, 2)] == [order[i] for i in range(1, 24, 2)] and len(order) == 24
    assert "untimed call before each" in res["a"].timer


def test_resolve_methods_skips_unregistered_and_adds_flex_same_mask() -> None:
    methods, skipped = resolve_methods(["softmax", "local", "no_such_variant"], baselines=["sdpa", "flex"])
    labels = [m.label for m in methods]
    assert labels == ["sdpa", "flex", "softmax", "local", "flex[local]"]
    assert "no_such_variant" in skipped and "unknown attention variant" in skipped["no_such_variant"]
    extra = {"local_w8": {"variant": "local", "window": 8}}
    methods, _ = resolve_methods(["local_w8"], baselines=[], extra_variants=extra, block_densities=[0.5])
    assert [m.label for m in methods] == ["local_w8", "flex[d=0.5]"]
    assert methods[0].kwargs == {"window": 8} and methods[0].ctor_kwargs(64)["window"] == 8
    with pytest.raises(ValueError, match="unknown baseline"):
        resolve_methods([], baselines=["cudnn"])


def test_case_flops_and_complexity() -> None:
    c = Case("cpu", "float32", 2, 4, 64, 1024, False, "fwd")
    assert c.flops() == 4 * 2 * 4 * 1024**2 * 64
    assert Case("cpu", "float32", 2, 4, 64, 1024, True, "fwd_bwd").flops() == c.flops() * 0.5 * 3.5
    assert is_subquadratic("O(N)") and is_subquadratic("O(N·w)") and not is_subquadratic("O(N^2)")
    with pytest.raises(ValueError, match="pass must be"):
        Case("cpu", "float32", 1, 1, 8, 8, False, "bwd")


def test_density_mask_and_runner_under_it() -> None:
    bm = density_block_mask(512, 0.25, block=64)
    dense = bm.to_dense()[0, 0]
    for i in range(0, 512, 64):  # diagonal blocks are kept: no empty rows
        assert dense[i : i + 64, i : i + 64].all()
    assert 0.2 < bm.density() < 0.5
    spec = MethodSpec(label="softmax[d=0.25]", variant="softmax", block_density=0.25)
    case = Case("cpu", "float32", 1, 1, 16, 256, True, "fwd")
    from attnlib.bench.gate import row_errors

    r = Runner(spec, case, Inputs.make(case))
    err = row_errors(r, r.forward_output(), rows=16)
    assert err["gate"] == "pass" and err["error_rel"] < 1e-5 and r.info["density"] < 1.0


# ------------------------------------------------------------------------------------------
# crossover
# ------------------------------------------------------------------------------------------


def test_crossover() -> None:
    c = crossover([1000, 4000], [2.0, 0.5], win_below=1.0)  # log-log midpoint of 1000 and 4000
    assert c["status"] == "at" and c["n"] == 4000 and math.isclose(c["n_interp"], 2000.0, rel_tol=1e-12)
    assert crossover([4096, 1024, 2048], [0.5, 2.0, 1.2])["n"] == 4096  # unsorted input
    assert crossover([1024, 2048], [0.5, 0.6])["status"] == "always"
    assert crossover([1024, 2048], [0.5, 1.5])["status"] == "never"  # must stay faster at every larger N
    assert crossover([1024, 2048], [1.5, 0.97])["status"] == "never"  # within the 5 % margin: no win
    assert crossover([1024, 2048], [1.5, 0.97], win_below=1.0)["status"] == "at"
    rows = [
        {"method": m, "device": "cpu", "dtype": "float32", "head_dim": 64, "causal": False, "pass": "fwd", "n": n}
        | {"status": "ok", "median_s": t}
        for m, n, t in [("sdpa", 1024, 1.0), ("sdpa", 2048, 4.0), ("lin", 1024, 1.5), ("lin", 2048, 2.0)]
    ]
    (c,) = crossovers(rows)
    assert c["method"] == "lin" and c["ratios"] == [1.5, 0.5] and c["n"] == 2048
    with pytest.raises(ValueError):
        crossover([1, 2], [1.0])


# ------------------------------------------------------------------------------------------
# regression gate
# ------------------------------------------------------------------------------------------


def _row(t: float, noise: float = 0.01, method: str = "m", n: int = 1024, status: str = "ok") -> dict:
    return {
        "method": method,
        "device": "cpu",
        "dtype": "float32",
        "batch": 1,
        "heads": 8,
        "head_dim": 64,
        "n": n,
        "causal": False,
        "pass": "fwd",
        "status": status,
        "median_s": t if status == "ok" else None,
        "noise": noise,
    }


def test_regression_gate_logic(tmp_path: Path) -> None:
    old = [
        _row(0.010),
        _row(0.010, n=2),
        _row(0.010, n=3),
        _row(0.010, noise=0.2, n=4),
        _row(1e-5, n=5),
        _row(0.01, n=6),
    ]
    old.append(_row(0.01, n=7))
    new = [
        _row(0.0104),  # +4 %: within 5 % + 1 % noise
        _row(0.0110, n=2),  # +10 %: regression
        _row(0.0090, n=3),  # -10 %: faster
        _row(0.0110, noise=0.2, n=4),  # +10 % but the runs spread 20 %: not flagged
        _row(3.5e-5, n=5),  # +250 % of 10 µs = 25 µs < the 30 µs floor
        _row(0.01, n=6, status="FAILED"),  # was timed, now fails its gate
        _row(0.01, n=8),  # new row
    ]
    v = {r["n"]: r for r in compare_rows(old, new)}
    assert [v[i]["verdict"] for i in (1024, 2, 3, 4, 5, 6, 7, 8)] == [
        "same",
        "REGRESSION",
        "faster",
        "same",
        "same",
        "REGRESSION",
        "missing",
        "new",
    ]
    assert math.isclose(v[2]["ratio"], 1.1) and math.isclose(v[2]["limit_s"], 0.010 * 1.06 + 30e-6)
    assert compare_rows([_row(1e-5, n=5)], [_row(3.5e-5, n=5)], abs_floor_s=0.0)[0]["verdict"] == "REGRESSION"
    assert math.isclose(row_noise({"times_s": [1.0, 2.0, 3.0, 4.0, 5.0], "median_s": 3.0}), 2.0 / 3.0)
    with pytest.raises(FileNotFoundError, match="no such results file"):
        load_rows(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="no 'rows'"):
        load_rows(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------
# memory runner (fresh process per measurement)
# ------------------------------------------------------------------------------------------


def test_memory_runner_measures_allocation_in_fresh_process() -> None:
    mib = 2**20
    big = run_isolated(alloc_probe, 64 * mib)
    small = run_isolated(alloc_probe, 8 * mib)
    assert 62 * mib <= big["peak_bytes"] <= 72 * mib, big  # page-level accounting: within a few pages
    assert 7 * mib <= small["peak_bytes"] <= 16 * mib, small  # not inflated by the earlier 64 MiB child
    with pytest.raises(IsolatedError, match="died"):
        run_isolated(crash_probe)
    with pytest.raises(IsolatedError, match="ValueError"):
        run_isolated(int, "not a number")
    with pytest.raises(IsolatedError, match="timed out"):
        run_isolated(__import__("time").sleep, 30, timeout=0.5)


class _AllocatedBytes(TorchDispatchMode):
    """Bytes of the new tensors every op of a call creates (views and in-place results excluded): a
    deterministic stand-in for a memory measurement (RSS depends on the allocator, threads and load)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.total += t.untyped_storage().nbytes()
        return out


def _allocated_bytes(fn: Callable[[], object], *, warmup: bool = True) -> dict:
    with _AllocatedBytes() as mode:
        fn()
    return {"peak_bytes": mode.total, "method": "test: bytes of new tensors"}


def test_speed_memory_column_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every (method, pass) row carries the measurement of that method's call in that pass.

    The fresh-process RSS measurement itself is checked on a known allocation above; here the
    measurement is a deterministic count (so no number depends on the machine or its load) and
    the fresh process runs in-process."""
    import attnlib.bench.speed as speed_mod

    monkeypatch.setattr(speed_mod, "run_isolated", lambda target, *a, timeout=None, **k: target(*a, **k))
    monkeypatch.setattr(speed_mod, "peak_rss_growth", _allocated_bytes)
    res = run_speed(
        _tiny_speed(n=[512], heads=2, head_dim=[64], memory=True, isolate=True, passes=["fwd", "fwd_bwd"]),
        [MethodSpec(label="sdpa", kind="sdpa"), MethodSpec(label="math", kind="math")],
        log=lambda *_: None,
    )
    mem = {(r["method"], r["pass"]): r["mem_peak_mb"] for r in res["rows"]}
    scores_mib = 2 * 512 * 512 * 4 / 2**20  # (1, 2, 512, 512) fp32: 2 MiB
    grads_mib = 3 * 2 * 512 * 64 * 4 / 2**20  # dq, dk, dv: 0.75 MiB
    assert mem[("math", "fwd")] >= 2 * scores_mib > mem[("sdpa", "fwd")]  # math keeps scores and weights
    assert mem[("sdpa", "fwd_bwd")] >= mem[("sdpa", "fwd")] + grads_mib
    assert all("fresh process" in r["mem_method"] and "fresh process" in r["timer"] for r in res["rows"])
    assert all(r["status"] == "ok" and r["runs"] == 2 and r["error_rel"] < 1e-5 for r in res["rows"])


def test_speed_memory_column_from_a_fresh_process() -> None:
    """The real path: the row is measured in a fresh process and carries a memory figure (its value
    is the machine's, so only its form is checked)."""
    res = run_speed(_tiny_speed(n=[64], memory=True, isolate=True), [MethodSpec(label="sdpa", kind="sdpa")],
                    log=lambda *_: None)  # fmt: skip
    (row,) = res["rows"]
    assert row["status"] == "ok" and "fresh process" in row["mem_method"] and "fresh process" in row["timer"]
    assert isinstance(row["mem_peak_mb"], float) and math.isfinite(row["mem_peak_mb"]) and row["mem_peak_mb"] >= 0


# ------------------------------------------------------------------------------------------
# approx mode
# ------------------------------------------------------------------------------------------


def test_approx_mode_errors_and_knobs(tmp_path: Path) -> None:
    spec = MethodSpec(label="tempered", core_cls=Tempered)
    knobs, notes = discover_knobs(spec)
    assert knobs == {"temperature": [0.5, 1.0]} and not notes
    _, notes = discover_knobs(spec, {"num_features": [1, 2]})
    assert "not a constructor argument" in notes[0]
    assert discover_knobs(spec, None, {"temperature": [9.0]})[0] == {"temperature": [0.5, 1.0]}  # declared wins
    plain = MethodSpec(label="softmax", variant="softmax")  # declares no knob: the config fallback applies
    assert discover_knobs(plain, None, {"scale": [0.1]})[0] == {"scale": [0.1]}
    cfg = ApproxConfig(n=[32, 64], logit_scale=[1.0, 4.0], knob_n=32, heads=1, head_dim=8, seeds=[0], progress=False)
    res = run_approx(cfg, [spec, MethodSpec(label="softmax", variant="softmax")], log=lambda *_: None)
    pts = res["points"]
    assert {p["method"] for p in pts} == {"tempered"}  # exact variants are not approximations
    exact_pt = [p for p in pts if p["knob"] == "temperature" and p["value"] == 1.0]
    assert exact_pt and all(p["err_out"] < 1e-13 and p["err_grad"] < 1e-13 for p in exact_pt)
    off = [p for p in pts if p["knob"] is None]
    assert len(off) == 4 and all(p["err_out"] > 1e-3 and p["err_dq"] > 1e-3 for p in off)
    by = {(p["n"], p["logit_scale"]): p["err_out"] for p in off}
    assert by[(64, 4.0)] != by[(64, 1.0)]  # each logit scale is its own point
    assert [(p["knob"], p["n"], p["logit_scale"]) for p in off] == [
        (None, 32, 1.0),
        (None, 32, 4.0),
        (None, 64, 1.0),
        (None, 64, 4.0),
    ]
    cache: dict = {}  # the shared float64 reference gives exactly the uncached errors, per seed
    point = {"n": 32, "causal": True, "logit_scale": 2.0, "cfg": cfg}
    first = approx_error(spec, seed=1, ref_cache=cache, **point)
    assert approx_error(spec, seed=1, ref_cache=cache, **point) == first == approx_error(spec, seed=1, **point)
    other = approx_error(spec, seed=2, ref_cache=cache, **point)
    assert len(cache) == 2 and other != first
    res["machine"] = machine_info(1)
    res["settings"] = {"batch": 1, "heads": 1, "head_dim": 8, "dtype": "float64", "seeds": [0], "knob_n": 32}
    md = approx_markdown(res, title="t", command="attnlib-bench mode=approx")
    assert "`tempered`" in md and "temperature=1.0" in md
    paths = approx_plots(res, tmp_path, "approx")
    assert {p.name for p in paths} == {
        "approx_error_vs_n.png",
        "approx_grad_error_vs_n.png",
        "approx_error_vs_knob.png",
    }


# ------------------------------------------------------------------------------------------
# quality mode (attnlib-train is stubbed)
# ------------------------------------------------------------------------------------------

_STUB = """
import json, sys, pathlib
args = dict(a.split("=", 1) for a in sys.argv[1:])
run = pathlib.Path(args["hydra.run.dir"])
run.mkdir(parents=True, exist_ok=True)
with open(run.parent.parent.parent / "calls.txt", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if args["attention"] == "local" and args["experiment"] == "lm_chars":
    print("boom: diverged"); sys.exit(3)
res = {"train_seconds": 1.5, "params": 12345}
if args["experiment"] == "lm_chars":
    res["test_bpc"] = 2.0 + int(args["seed"])
else:
    res["test_accuracy"] = 0.5 if args["attention"] == "softmax" else 0.25
(run / "results.json").write_text(json.dumps(res))
"""


def test_quality_runner_with_stub(tmp_path: Path) -> None:
    stub = tmp_path / "stub_train.py"
    stub.write_text(_STUB)
    tasks = {
        "mqar": {"experiment": "mqar", "metric": "test_accuracy"},
        "lm_chars": {"experiment": "lm_chars", "metric": "test_bpc", "overrides": ["data.seq_len=64"]},
    }
    cfg = QualityConfig(train_command=[sys.executable, str(stub)], tasks=tasks, steps=7, seeds=[0, 1], progress=False)
    runs_dir = tmp_path / "runs"
    res = run_quality(
        cfg, ["softmax", "local", "ghost"], runs_dir, registered=["softmax", "local"], log=lambda *_: None
    )
    assert res["skipped_variants"].keys() == {"ghost"}
    calls = (runs_dir / "calls.txt").read_text().splitlines()
    assert len(calls) == 8
    assert "experiment=lm_chars attention=softmax trainer.max_steps=7 seed=1" in calls[-3]
    assert any("data.seq_len=64" in c for c in calls)
    table = {(r["task"], r["variant"]): r for r in res["table"]}
    assert table[("mqar", "softmax")]["mean"] == 0.5 and table[("mqar", "local")]["mean"] == 0.25
    assert table[("lm_chars", "softmax")]["mean"] == 2.5 and math.isclose(
        table[("lm_chars", "softmax")]["std"], 2**0.5 / 2
    )
    assert table[("lm_chars", "local")]["mean"] is None and table[("lm_chars", "local")]["failed"] == 2
    assert table[("mqar", "softmax")]["params"] == 12345 and table[("mqar", "softmax")]["train_seconds"] == 1.5
    failed = [r for r in res["runs"] if r["status"] != "ok"]
    assert failed and "exit 3" in failed[0]["reason"] and "boom: diverged" in failed[0]["reason"]
    res.update(machine=machine_info(1), settings={"steps": 7, "seeds": [0, 1]})
    md = quality_markdown(res, title="q", command="attnlib-bench mode=quality")
    assert "50.0 %" in md and "2.500 ± 0.707" in md and "FAILED" in md and "test_bpc ↓" in md
    # resume: finished runs are read back, failed ones are retried
    run_quality(cfg, ["softmax", "local"], runs_dir, log=lambda *_: None)
    assert len((runs_dir / "calls.txt").read_text().splitlines()) == 8 + 2
    # a per-task budget: its own run directories (never a run of another budget) and the header says so
    cfg.tasks["mqar"]["steps"] = 11
    res = run_quality(cfg, ["softmax"], runs_dir, log=lambda *_: None)
    calls = (runs_dir / "calls.txt").read_text().splitlines()
    assert len(calls) == 10 + 2 and "experiment=mqar attention=softmax trainer.max_steps=11 seed=0" in calls[-2]
    assert (runs_dir / "mqar" / "softmax" / "steps11-seed0" / "results.json").exists()
    res.update(machine=machine_info(1), settings={"steps": 7, "seeds": [0, 1], "tasks": cfg.tasks})
    assert "a fixed number of steps per task (mqar: 11, lm_chars: 7)" in quality_markdown(res, title="q", command="c")


def test_quality_runner_reports_missing_train_app(tmp_path: Path) -> None:
    cfg = QualityConfig(train_command=["attnlib-train-does-not-exist"], tasks={"mqar": {}}, progress=False)
    with pytest.raises(TrainAppNotFoundError, match="attnlib-train experiment=<task> attention=<variant>"):
        run_quality(cfg, ["softmax"], tmp_path)


# ------------------------------------------------------------------------------------------
# CLI / configs
# ------------------------------------------------------------------------------------------


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT), version_base=None):
        return compose(config_name="bench/config", overrides=list(overrides))


@pytest.mark.parametrize("preset", ["smoke", "cpu_full", "cpu_structured", "approx_full", "quality_cpu", "gpu_quick"])
def test_presets_compose(preset: str) -> None:
    cfg = _cfg(f"bench={preset}")
    assert cfg.mode in ("speed", "approx", "quality")
    if preset == "gpu_quick":
        s = cfg.speed
        assert list(s.device) == ["cuda"] and list(s.dtype) == ["bfloat16"]
        assert sorted(s.head_dim) == [64, 128] and min(s.n) == 4096 and max(s.n) == 32768
        assert s.time_budget_s <= 8 * 60 and list(s.block_densities) and "linear" in cfg.variants
    if preset == "cpu_full":
        assert max(cfg.speed.long_n) == 65536 and max(cfg.speed.n) == 16384
    if preset == "cpu_structured":
        from attnlib import registry

        assert set(cfg.variants) <= set(registry.available()), "a preset names an unregistered variant"
        assert list(cfg.speed.fwd_bwd_n) == [4096] and cfg.speed.memory


def test_cli_speed_end_to_end_and_compare(tmp_path: Path) -> None:
    common = [
        "mode=speed",
        "variants=[softmax,local,not_registered_yet]",
        "n=[64]",
        "speed.heads=1",
        "speed.head_dim=[16]",
        "speed.causal=[false]",
        "speed.passes=[fwd]",
        "speed.runs=2",
        "speed.memory=false",
        "speed.isolate=false",
        "speed.baselines=[sdpa]",
        "speed.gate_n=64",
        "progress=false",
        f"out_dir={tmp_path}",
    ]
    res = run(_cfg(*common), overrides=common)
    md = (tmp_path / "speed.md").read_text()
    data = json.loads((tmp_path / "speed.json").read_text())
    for key in ("cpu", "threads", "torch", "triton", "commit", "loadavg", "gpu"):
        assert key in data["machine"]
    assert data["skipped_variants"].keys() == {"not_registered_yet"}
    assert (tmp_path / "speed_time.png").exists()
    assert "`local`" in md and "`not_registered_yet`" in md and "Correctness gate" in md
    assert {r["method"] for r in data["rows"]} == {"sdpa", "softmax", "local"}
    assert all(r["status"] == "ok" and r["error_rel"] < 1e-5 for r in data["rows"])
    assert res["paths"] and not (tmp_path / "speed.partial.jsonl").exists()  # removed once the run ends
    # regression gate against the saved run: every row is present, nothing missing
    res2 = run(_cfg(*common, f"compare={tmp_path / 'speed.json'}", "name=again"))
    verdicts = {v["verdict"] for v in res2["compare_verdicts"]}
    assert verdicts <= {"same", "faster", "REGRESSION"} and isinstance(res2["regressions"], int)
    assert (tmp_path / "again_compare.md").exists()
    # mode=compare on two saved files: fixed times, not this machine's (a 3x slowdown of a 10 µs call
    # is within the 30 µs floor, of a 1 ms call it is not)
    base = json.loads((tmp_path / "speed.json").read_text())
    for r in base["rows"]:
        r["median_s"], r["noise"] = 1e-3, 0.0
    (tmp_path / "base.json").write_text(json.dumps(base))
    for name, factor in (("slow", 3.0), ("same", 1.02), ("fast", 0.5)):
        for r in base["rows"]:
            r["median_s"] = 1e-3 * factor
        (tmp_path / f"{name}.json").write_text(json.dumps(base))
    verdicts = {}
    for name in ("slow", "same", "fast"):
        res3 = run(_cfg("mode=compare", f"compare={tmp_path / 'base.json'}", f"current={tmp_path / f'{name}.json'}"))
        verdicts[name] = (res3["regressions"], sorted({v["verdict"] for v in res3["compare_verdicts"]}))
    assert verdicts == {"slow": (3, ["REGRESSION"]), "same": (0, ["same"]), "fast": (0, ["faster"])}
    (tmp_path / "speed.md").unlink()
    run(_cfg("mode=render", f"current={tmp_path / 'speed.json'}"))
    assert (tmp_path / "speed.md").read_text() == md  # the markdown is a function of the JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_preset_without_cuda_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(_cfg("bench=gpu_quick", f"out_dir={tmp_path}"))
    assert not list(tmp_path.iterdir())


def test_translate_argv_and_slug() -> None:
    assert _translate_argv(["--compare", "a.json", "n=[1]"]) == ["compare=a.json", "n=[1]"]
    assert _translate_argv(["--compare=b.json"]) == ["compare=b.json"]
    with pytest.raises(SystemExit):
        _translate_argv(["--compare"])
    slug = machine_slug("cpu", 3)
    assert slug.endswith("-3t") and " " not in slug


def test_base_class_hooks_default_empty() -> None:
    assert AttentionCore.approximation_knobs() == {} and AttentionCore.benchmark_kwargs(4096) == {}


def test_compare_example_runs_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """`make compare`'s script at small sizes (N=256: above sparsifiner's default num_tokens=197, so every
    variant must be sized by its benchmark_kwargs): a row for every registered variant, errors finite."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "examples" / "compare_variants.py"
    main = runpy.run_path(str(script))["main"]
    threads = torch.get_num_threads()
    try:
        main(["--smoke", f"--threads={threads}"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "## Capability matrix" in out and "N=256" in out
    table = out.split("## CPU comparison")[1]
    rows = {r.split("|")[1].strip().strip("`"): r.split("|") for r in table.splitlines() if r.startswith("| `")}
    assert set(rows) == set(available())
    errors = {name: (float(r[6]), float(r[7])) for name, r in rows.items()}
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in errors.values()), errors
    assert errors["softmax"][0] < 1e-5


def test_aten_op_counts_counts_each_functions_operators() -> None:
    """One call of each function is profiled: a chain of three tensor ops counts more than one op."""
    from attnlib.bench.timing import aten_op_counts

    x = torch.randn(4, 4)
    counts = aten_op_counts({"three": lambda: torch.mul(torch.add(x, x), x).neg(), "one": lambda: x.neg()})
    assert counts["one"] == 1 and counts["three"] == 3, counts
