"""Relaxed attention (Lohrenz, Schwarz, Li, Fingscheidt, ASRU 2021; Lohrenz, Möller, Li, Fingscheidt 2022).

Weights smoothed toward the uniform distribution over each row's allowed keys,
``(1 - gamma) · A + gamma / |allowed|``. On every variant it acts on the output as
``(1 - gamma) · out + gamma · mean of the allowed values``, which is exactly ``relaxed A @ V``
for any variant whose output is ``A V`` with rows of A summing to 1 (softmax and the other
normalised variants); the weights and importance a variant reports are relaxed the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from attnlib._validation import describe
from attnlib.functional.modifiers import masked_value_mean, relaxed_importance, relaxed_weights
from attnlib.masks import AttentionMask
from attnlib.modifiers.base import Modifier, register_modifier
from attnlib.variants.base import CoreOutput

__all__ = ["Relaxed"]


def _unit(value: object, what: str) -> float:
    """``float(value)`` for a number in [0, 1], else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {describe(value)}")
    return float(value)


@register_modifier("relaxed")
class Relaxed(Modifier):
    """Relaxed attention: ``(1 - gamma) · A + gamma · U``, U uniform over the allowed keys.

    Args:
        gamma: the relaxation coefficient in [0, 1] (0 = off). The papers tune it per task;
            the first author's ASR recipe uses 0.35 on cross-attention.
        cross_gamma: gamma for cross-attention calls (default: ``gamma``) - the 2022 paper
            relaxes encoder self-attention (regularisation) and decoder cross-attention
            (suppressing the internal language model) separately.
        uniform_over: "allowed" (default: 1 / #keys the masks allow) or "all" (1 / M over every
            key, padding included - the reference implementation's behaviour; not with causal).
        when: "train" (default, as the papers: inference uses the plain weights), "always" or "eval".

    Rows with no allowed key stay zero. Attention dropout (where the variant has it) applies to
    the ``(1 - gamma) · A`` part only.
    """

    default_when = "train"

    def __init__(
        self,
        gamma: float,
        *,
        cross_gamma: float | None = None,
        uniform_over: str = "allowed",
        when: str | None = None,
    ) -> None:
        super().__init__(when=when)
        self.gamma = _unit(gamma, "relaxed: gamma")
        self.cross_gamma = self.gamma if cross_gamma is None else _unit(cross_gamma, "relaxed: cross_gamma")
        if uniform_over not in ("allowed", "all"):
            raise ValueError(f"relaxed: uniform_over must be 'allowed' or 'all', got {uniform_over!r}")
        self.uniform_over = uniform_over

    def transform(self, res: CoreOutput, v: Tensor, mask: AttentionMask, *, cross: bool, heads: int) -> CoreOutput:
        gamma = self.cross_gamma if cross else self.gamma
        if gamma == 0.0:
            return res
        if self.uniform_over == "all":
            if mask.causal:
                raise ValueError(
                    "relaxed: uniform_over='all' would put weight on future keys under causal=True; use 'allowed'"
                )
            everything = AttentionMask(batch=mask.batch, heads=mask.heads, n=mask.n, m=mask.m, device=mask.device)
            mean = masked_value_mean(v, everything, heads=heads)
            allowed = mask.dense()
            if allowed is not None:
                mean = mean.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        else:
            mean = masked_value_mean(v, mask, heads=heads)
        out = (1.0 - gamma) * res.out + gamma * mean.to(res.out.dtype)
        w = None if res.weights is None else relaxed_weights(res.weights, mask, gamma, uniform_over=self.uniform_over)
        imp = (
            None
            if res.importance is None
            else relaxed_importance(res.importance, mask, gamma, uniform_over=self.uniform_over)
        )
        return replace(res, out=out, weights=w, importance=imp)

    @classmethod
    def identity_kwargs(cls) -> dict[str, Any]:
        return {"gamma": 0.0, "when": "always"}

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"gamma": 0.3, "when": "always"}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, cross_gamma={self.cross_gamma}"
