"""Score modifiers: a user ``score_mod``, ALiBi and UltraViCo.

All three edit the scaled logits ``s = q·k / sqrt(D)`` before the softmax through the variant's
``score_mod`` support (``capabilities.score_mod``: ``softmax`` on SDPA / Flex / the chunked
explicit path, ``local``, ``block_sparse`` through the block-sparse kernel). Query and key
indices are token positions: in cached decoding the new queries sit at positions
``cache.length ..`` (bottom-right aligned with the keys), exactly as in the full forward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnlib._validation import non_negative_int
from attnlib.functional.modifiers import ScoreMod, ScoreModFn, alibi_score_mod, alibi_slopes, ultravico_score_mod
from attnlib.modifiers.base import Modifier, register_modifier

__all__ = ["ALiBi", "ScoreModifier", "UltraViCo"]

_SCORES = frozenset({"score_mod"})


def _resolve(fn: Callable[..., Any] | str) -> Callable[..., Any]:
    """A callable, or one named by a dotted path ``"package.module.function"`` (Hydra configs)."""
    if callable(fn):
        return fn
    if not isinstance(fn, str) or "." not in fn:
        raise ValueError(f"score_mod fn must be a callable or a dotted path 'module.function', got {fn!r}")
    mod, _, attr = fn.rpartition(".")
    try:
        out = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"score_mod fn: cannot import {fn!r} ({e})") from e
    if not callable(out):
        raise ValueError(f"score_mod fn: {fn!r} is not callable")
    return out


@register_modifier("score_mod")
class ScoreModifier(Modifier):
    """Any FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` on the pre-softmax logits.

    Args:
        fn: the function (or a dotted path to it). It must be elementwise and written with tensor
            ops, so it runs on broadcast index tensors as well as inside FlexAttention.
        additive: declare ``fn(s, ...) == s + fn(0, ...)`` (a score-independent bias): SDPA then
            runs it as an additive float mask instead of the explicit chunked path.
        when: "always" (default), "train" or "eval".
    """

    needs = _SCORES

    def __init__(self, fn: ScoreModFn | str, *, additive: bool = False, when: str | None = None) -> None:
        super().__init__(when=when)
        self._fn = ScoreMod(_resolve(fn), additive=bool(additive), name="score_mod")

    def score_mod(self) -> ScoreModFn:
        return self._fn

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"fn": _tanh_cap}


def _tanh_cap(s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """A logit soft-cap, ``4 tanh(s / 4)`` (a score-dependent edit used by the conformance suite)."""
    return 4.0 * torch.tanh(s / 4.0)


@register_modifier("alibi")
class ALiBi(Modifier):
    """ALiBi (Press, Smith, Lewis, ICLR 2022): ``s - m_h · |i - j|`` with fixed per-head slopes.

    Args:
        slopes: per-head slopes (length H); default the paper's geometric sequence
            (:func:`attnlib.functional.modifiers.alibi_slopes`).
        slope_scale: multiplies every slope (1 = the paper; 0 = no bias).
        when: "always" (default), "train" or "eval".

    Use it without other positions (``rope=False``, no learned absolute positions) to follow the
    paper. Under ``causal=True`` the bias is the paper's ``-m (i - j)``; without a causal mask it
    is the symmetric ``-m |i - j|``. An additive bias: on SDPA it is a materialised float mask.
    """

    needs = _SCORES

    def __init__(
        self, *, slopes: Sequence[float] | None = None, slope_scale: float = 1.0, when: str | None = None
    ) -> None:
        super().__init__(when=when)
        self._given = None if slopes is None else [float(s) for s in slopes]
        self.slope_scale = float(slope_scale)
        self.register_buffer("slopes", torch.zeros(0), persistent=False)

    def attach(self, attn: nn.Module) -> None:
        heads = int(attn.num_heads)  # type: ignore[arg-type]
        values = alibi_slopes(heads) if self._given is None else self._given
        if len(values) != heads:
            raise ValueError(f"alibi: got {len(values)} slopes for {heads} heads")
        ref = attn.out_proj.bias  # type: ignore[union-attr]
        self.slopes = torch.tensor(values, dtype=torch.float64, device=ref.device).mul(self.slope_scale).to(ref.dtype)

    def score_mod(self) -> ScoreModFn:
        return alibi_score_mod(self.slopes)

    @classmethod
    def identity_kwargs(cls) -> dict[str, Any]:
        return {"slope_scale": 0.0}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", slope_scale={self.slope_scale}"


@register_modifier("ultravico")
class UltraViCo(Modifier):
    """UltraViCo (Zhao et al. 2025): positive scores of pairs beyond ``window`` tokens times ``alpha``.

    Training-free length extrapolation for video diffusion transformers: attention to tokens
    farther than the training window is damped by a constant factor, as in the official kernels
    (:func:`attnlib.functional.modifiers.ultravico_score_mod`).

    Args:
        window: W in tokens (flattened frame-major). The official code uses half the training
            length for bidirectional video DiTs (a window of the training length centred on the
            query); for a causal model trained at length L use L - 1.
        alpha: the factor on positive out-of-window scores (official default 0.9; 1 = off).
        beta: optional second factor for ``bands`` (HunyuanVideo's damping near harmonic
            distances; official default there 0.6).
        bands: inclusive distance ranges ``[[lo, hi], ...]`` in tokens where ``beta`` applies.
        exempt_from: tokens at index >= this (as query or key) are never damped (appended text tokens).
        when: "eval" (default: inference only, as the paper), "always" or "train".
    """

    needs = _SCORES
    default_when = "eval"

    def __init__(
        self,
        *,
        window: int,
        alpha: float = 0.9,
        beta: float | None = None,
        bands: Sequence[Sequence[int]] = (),
        exempt_from: int | None = None,
        when: str | None = None,
    ) -> None:
        super().__init__(when=when)
        self.window = non_negative_int(window, "ultravico: window")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"ultravico: alpha must be in [0, 1], got {alpha!r}")
        if beta is not None and not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"ultravico: beta must be in [0, 1], got {beta!r}")
        pairs = [tuple(int(x) for x in b) for b in bands]
        if any(len(p) != 2 or p[0] > p[1] or p[0] < 0 for p in pairs):
            raise ValueError(f"ultravico: bands must be [[lo, hi], ...] with 0 <= lo <= hi, got {bands!r}")
        if pairs and beta is None:
            raise ValueError("ultravico: bands need a beta factor")
        self.alpha, self.beta = float(alpha), None if beta is None else float(beta)
        self.bands = [(p[0], p[1]) for p in pairs]
        self.exempt_from = None if exempt_from is None else non_negative_int(exempt_from, "ultravico: exempt_from")
        self._fn = ultravico_score_mod(
            self.alpha, self.window, beta=self.beta, bands=self.bands, exempt_from=self.exempt_from
        )

    def score_mod(self) -> ScoreModFn:
        return self._fn

    @classmethod
    def identity_kwargs(cls) -> dict[str, Any]:
        return {"window": 3, "alpha": 1.0, "when": "always"}

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"window": 3, "alpha": 0.5, "when": "always"}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}, alpha={self.alpha}"
