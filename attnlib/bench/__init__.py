"""Benchmark machinery behind ``attnlib-bench`` (see :mod:`attnlib.cli.bench`).

* :mod:`~attnlib.bench.speed` - time and memory of every variant beside SDPA / FlexAttention,
  correctness-gated (:mod:`~attnlib.bench.gate`), with crossover N;
* :mod:`~attnlib.bench.approx` - error of approximate variants vs exact softmax over N, logit
  scale and their approximation knobs;
* :mod:`~attnlib.bench.quality` - task quality by running ``attnlib-train``;
* :mod:`~attnlib.bench.compare` - regression gate against a saved run;
* :mod:`~attnlib.bench.methods`, :mod:`~attnlib.bench.timing`, :mod:`~attnlib.bench.isolate`
  (fresh-process memory), :mod:`~attnlib.bench.machine`, :mod:`~attnlib.bench.report`.

Imports point down: the bench layer sits beside the CLI, above ``attnlib.Attention`` and the variants.
"""
