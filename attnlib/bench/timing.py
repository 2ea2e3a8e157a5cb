"""Timing: interleaved medians on CPU (``torch.utils.benchmark``), ``do_bench`` medians on CUDA.

CPU: each callable gets ``warmup`` untimed calls, then ``runs`` rounds; in every round each
callable is timed once by a :class:`torch.utils.benchmark.Timer` with a fixed thread count,
round-robin, so slow drift of a shared machine hits all of them alike. A round times ``number``
back-to-back calls (chosen so one block lasts >= ``block_s``) and records the per-call time.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flush before each call) with quantiles
(median, 25 %, 75 %); without Triton, CUDA events by hand.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.benchmark as tbench

__all__ = ["Timing", "interleaved_medians", "quantile", "time_cpu_interleaved", "time_cuda"]


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``xs`` (``q`` in [0, 1])."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    """Timing of one callable (seconds per call).

    Attributes:
        median_s, q25_s, q75_s: median and quartiles over the timed runs.
        runs: number of timed runs (rounds); number: calls per run.
        first_s: wall time of the first (warm-up) call: includes compilation / autotuning.
        times_s: per-call time of every run.
        timer: how it was timed.
    """

    median_s: float
    q25_s: float
    q75_s: float
    runs: int
    number: int = 1
    first_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    timer: str = ""

    @property
    def noise(self) -> float:
        """Relative spread of the runs: interquartile range / median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready dict (with ``noise``)."""
        d = asdict(self)
        d["noise"] = self.noise
        return d

    @classmethod
    def from_times(cls, times: Sequence[float], **kw: object) -> Timing:
        """Summarise per-call times ``times`` (>= 1 run)."""
        return cls(
            median_s=statistics.median(times),
            q25_s=quantile(times, 0.25),
            q75_s=quantile(times, 0.75),
            runs=len(times),
            times_s=list(times),
            **kw,  # type: ignore[arg-type]
        )


def _timed_block(timer: tbench.Timer, number: int) -> float:
    """Per-call seconds of ``number`` back-to-back calls timed by ``timer``.

    ``Timer.timeit(number)`` first runs ``max(number // 100, 2)`` untimed calls of its own; for
    calls of a second that triples the cost of every round, although the callables here are
    already warm. The timer's single timed block (``_timeit``, the same ``timeit.Timer`` under
    the same thread setting) is used where this torch has it.
    """
    block = getattr(timer, "_timeit", None)  # the caller has fixed the torch thread count
    if block is None:  # pragma: no cover - a torch without the private block timer
        return float(timer.timeit(number).times[0])
    return float(block(number)) / number


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    runs: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    block_s: float = 0.02,
    warm_s: dict[str, float] | None = None,
    shuffle: int | None = None,
    rewarm: bool = False,
) -> dict[str, Timing]:
    """Median per-call time of each callable, interleaved round-robin (CPU).

    Args:
        fns: label -> zero-argument callable.
        runs: timed rounds (>= 1; use >= 5 for published numbers).
        warmup: untimed calls per callable before timing (the last one's time decides
            ``number``, the calls per timed block), except for callables listed in ``warm_s``.
        threads: torch intra-op threads during timing (default: the current setting).
        block_s: minimum duration of one timed block; short calls are repeated ``number`` times.
        warm_s: label -> time of a warm call the caller already made: that callable gets no
            further warm-up and ``number`` follows from this time.
        shuffle: None (the same order every round) or a seed: each round visits the callables
            in a new random order, so no callable always runs first or after the same neighbour
            (on a VM the call after a different workload can pay for cold memory; a fixed order
            charges that to the same callable every round).
        rewarm: one untimed call before each timed block, so every round measures the callable
            warm, as a loop calling it would see it, rather than right after another callable
            (on this project's VMs the first call after a different large workload re-touches cold
            memory: up to 2x for a 50 ms call timed right after a 2-s SDPA call).
    """
    warm_s = warm_s or {}
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if warmup == 0 and set(fns) - set(warm_s):
        raise ValueError("warmup=0 needs warm_s (a warm call time) for every callable not warmed up")
    threads = torch.get_num_threads() if threads is None else int(threads)
    torch.set_num_threads(threads)
    timers: dict[str, tuple[tbench.Timer, int, float]] = {}
    for label, fn in fns.items():
        first = None
        last = warm_s.get(label, 0.0)
        for i in range(0 if label in warm_s else warmup):
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
            if i == 0:
                first = last
        number = max(1, math.ceil(block_s / max(last, 1e-9))) if last < block_s else 1
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
        timers[label] = (timer, number, first if first is not None else last)
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(shuffle)
    labels = list(timers)
    for _ in range(runs):
        if shuffle is not None:
            rng.shuffle(labels)
        for label in labels:
            timer, number, _first = timers[label]
            if rewarm:
                fns[label]()
            times[label].append(_timed_block(timer, number))
    return {
        k: Timing.from_times(
            v,
            number=timers[k][1],
            first_s=timers[k][2],
            timer=f"torch.utils.benchmark.Timer, {threads} threads, interleaved"
            + ("" if shuffle is None else f" (order shuffled each round, seed {shuffle})")
            + (", one untimed call before each timed block" if rewarm else ""),
        )
        for k, v in times.items()
    }


def time_cuda(
    fn: Callable[[], object],
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> Timing:
    """Median CUDA time of ``fn`` (``triton.testing.do_bench`` quantiles; CUDA events without Triton)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover - triton ships with CUDA torch
        do_bench = None
    if do_bench is not None:
        med, q25, q75 = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.25, 0.75]
        )
        # do_bench reports milliseconds
        return Timing(
            median_s=med * 1e-3,
            q25_s=q25 * 1e-3,
            q75_s=q75 * 1e-3,
            runs=max(5, int(rep_ms / max(med, 1e-3))),
            first_s=first,
            timer="triton.testing.do_bench (median, CUDA events, L2 flush)",
        )
    times = []  # pragma: no cover
    for _ in range(3):  # pragma: no cover
        fn()
    for _ in range(max(5, int(rep_ms / max(first * 1e3, 1e-3)))):  # pragma: no cover
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return Timing.from_times(times, first_s=first, timer="CUDA events (median)")  # pragma: no cover


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 9,
    warmup: int = 2,
    shuffle: int | None = 0,
    rewarm: bool = False,
) -> dict[str, float]:
    """Median wall time (s) of each callable, interleaved so drift hits all equally.

    Each round visits the callables in a new random order (``shuffle`` seed; None = the same
    order every round, which on a VM charges the cost of following another workload to the same
    callable - e.g. ~3% for the first of a pruning benchmark's models); ``rewarm``: see
    :func:`time_cpu_interleaved`.
    """
    res = time_cpu_interleaved(fns, runs=repeats, warmup=warmup, block_s=0.0, shuffle=shuffle, rewarm=rewarm)
    return {k: v.median_s for k, v in res.items()}


def aten_op_counts(fns: dict[str, Callable[[], object]]) -> dict[str, int]:
    """ATen operators each function runs in one call, counted by ``torch.profiler``.

    A load-independent cost measure beside the timings: on a busy machine every operator waits for
    the thread pool, so fewer operators per call is what still helps there. Runs each function once.
    """
    from torch.profiler import profile

    counts: dict[str, int] = {}
    for name, fn in fns.items():
        with profile() as p:
            fn()
        counts[name] = sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))
    return counts
