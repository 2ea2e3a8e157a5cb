"""Attention-entropy tracking during training (the quantity sigmaReparam keeps from collapsing).

:class:`EntropyProbe` finds every :class:`attnlib.Attention` of a model whose variant reports
weights. While armed (:meth:`EntropyProbe.armed`), each of their forward calls also computes the
entropy ``-sum_j A_ij log A_ij`` of a few evenly spaced query rows per head (no gradient; one row
of weights each for exact softmax, the variant's weights otherwise); :meth:`EntropyProbe.collect`
returns the means per layer and head since the last collect. The training loop arms it on the
steps it logs, so it costs one small no-grad pass on those steps only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from attnlib.modifiers.stack import ModifierStack

__all__ = ["EntropyProbe"]


class EntropyProbe:
    """Per-head attention entropy of a model's attention modules, on sampled query rows.

    Args:
        model: any module; its attention modules are found by their :class:`ModifierStack`.
        rows: query rows sampled per call (evenly spaced over the sequence).

    Metric names: ``attn_entropy`` (mean over layers and heads), ``attn_entropy/L{i}`` (layer i,
    in module order) and ``attn_entropy/L{i}H{h}``. Modules whose variant has no weights are
    left out (:attr:`layers` lists the tracked ones).
    """

    def __init__(self, model: nn.Module, *, rows: int = 16) -> None:
        if rows < 1:
            raise ValueError(f"EntropyProbe: rows must be >= 1, got {rows}")
        self.rows = int(rows)
        self.layers: list[tuple[str, ModifierStack]] = []
        for name, mod in model.named_modules():
            stack = getattr(mod, "modifiers", None)
            caps = getattr(mod, "capabilities", None)
            if isinstance(stack, ModifierStack) and caps is not None and caps.has_weights:
                self.layers.append((name, stack))
        self._sums: list[Tensor | None] = [None] * len(self.layers)
        self._counts = [0] * len(self.layers)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def _hook(self, i: int):
        def record(per_head: Tensor) -> None:
            prev = self._sums[i]
            self._sums[i] = per_head.detach().cpu() if prev is None else prev + per_head.detach().cpu()
            self._counts[i] += 1

        return record

    @contextlib.contextmanager
    def armed(self, on: bool = True) -> Iterator[None]:
        """Record the entropy of every forward call inside the block (nothing when ``on`` is False)."""
        if not on or not self.layers:
            yield
            return
        for i, (_, stack) in enumerate(self.layers):
            stack.probe, stack.probe_rows = self._hook(i), self.rows
        try:
            yield
        finally:
            for _, stack in self.layers:
                stack.probe = None

    def collect(self) -> dict[str, float]:
        """Mean entropies since the last collect (empty when nothing was recorded), then reset."""
        out: dict[str, float] = {}
        layer_means = []
        for i, (s, c) in enumerate(zip(self._sums, self._counts)):
            if s is None or c == 0:
                continue
            per_head = s / c
            layer_means.append(float(per_head.mean()))
            out[f"attn_entropy/L{i}"] = layer_means[-1]
            for h, value in enumerate(per_head.tolist()):
                out[f"attn_entropy/L{i}H{h}"] = value
        if layer_means:
            out = {"attn_entropy": float(torch.tensor(layer_means).mean()), **out}
        self._sums = [None] * len(self.layers)
        self._counts = [0] * len(self.layers)
        return out
