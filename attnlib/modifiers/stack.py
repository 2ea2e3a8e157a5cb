"""The one hook point between :class:`attnlib.Attention` and its variant core.

:class:`ModifierStack` holds an attention module's modifiers. ``Attention`` sends every core call
through :meth:`ModifierStack.attend`, which composes the active score edits into one
``score_mod`` for the core, applies the active output transforms in order, and feeds the
attention-entropy probe (:mod:`attnlib.modifiers.entropy`) when one is armed. With no modifier
and no probe it calls the core directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.functional.modifiers import ScoreModFn, attention_entropy, compose_score_mods, shift_queries
from attnlib.masks import AttentionMask
from attnlib.modifiers.base import Modifier, ModifierSpec, build_modifier
from attnlib.registry import Capabilities
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["ModifierStack", "ProbeHook"]

ProbeHook = Callable[[Tensor], None]
"""Receives the mean attention entropy of each head of one call: (H,) float32."""


class ModifierStack(nn.Module):
    """The modifiers of one :class:`attnlib.Attention`, applied around its core.

    Args:
        modifiers: the checked, attached modifiers (see :meth:`build`).

    Attributes:
        probe: an armed entropy hook (:class:`attnlib.modifiers.EntropyProbe`) or None.
        probe_rows: query rows per call the probe samples (evenly spaced).
    """

    def __init__(self, modifiers: Iterable[Modifier] = ()) -> None:
        super().__init__()
        self.mods = nn.ModuleList(modifiers)
        self.probe: ProbeHook | None = None
        self.probe_rows = 16

    @classmethod
    def build(cls, specs: Iterable[ModifierSpec] | None, *, variant: str, caps: Capabilities) -> ModifierStack:
        """Modifiers from specs (objects, names or ``{"name": ...}`` mappings), each checked against the variant."""
        if specs is None:
            return cls()
        if isinstance(specs, (str, Modifier)) or hasattr(specs, "keys"):
            specs = [specs]
        mods = [build_modifier(s) for s in specs]
        for m in mods:
            m.check(variant, caps)
        return cls(mods)

    def attach(self, attn: nn.Module) -> None:
        """Let every modifier adapt the module it belongs to (called once by ``Attention``)."""
        for m in self.mods:
            m.attach(attn)

    def __len__(self) -> int:
        return len(self.mods)

    def names(self) -> list[str]:
        """The modifiers' registry names, in order."""
        return [m.name for m in self.mods]

    def _active(self, training: bool) -> list[Modifier]:
        return [m for m in self.mods if m.active(training) and m.changes_attention]

    def changes_attention(self, training: bool) -> bool:
        """Whether a call in this mode is changed (score edits or output transforms active)."""
        return bool(self._active(training))

    def score_mod(self, training: bool, *, q_offset: int = 0) -> ScoreModFn | None:
        """The composition of the active score edits (queries at positions ``q_offset + i``), or None."""
        mods = [f for f in (m.score_mod() for m in self._active(training)) if f is not None]
        fn = compose_score_mods(mods)
        return None if fn is None else shift_queries(fn, q_offset)

    def attend(
        self,
        core: AttentionCore,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        am: AttentionMask,
        *,
        training: bool,
        **flags: Any,
    ) -> CoreOutput:
        """The core on q, k, v with the active modifiers around it (``flags``: the core's keywords)."""
        active = self._active(training)
        if not active and self.probe is None:
            return core(q, k, v, am, **flags)
        sm = self.score_mod(training, q_offset=am.m - am.n if am.causal else 0)
        res = core(q, k, v, am, score_mod=sm, **flags)
        res = self._transform(active, res, v, am, cross=bool(flags.get("cross", False)), heads=q.shape[1])
        if self.probe is not None:
            self._observe(core, active, q, k, v, am, sm, cross=bool(flags.get("cross", False)))
        return res

    @staticmethod
    def _transform(
        active: list[Modifier], res: CoreOutput, v: Tensor, am: AttentionMask, *, cross: bool, heads: int
    ) -> CoreOutput:
        for m in active:
            res = m.transform(res, v, am, cross=cross, heads=heads)
        return res

    @torch.no_grad()
    def _observe(
        self,
        core: AttentionCore,
        active: list[Modifier],
        q: Tensor,
        k: Tensor,
        v: Tensor,
        am: AttentionMask,
        sm: ScoreModFn | None,
        *,
        cross: bool,
    ) -> None:
        """Report the per-head entropy of ``probe_rows`` evenly spaced query rows to the probe."""
        if not core.capabilities.has_weights or self.probe is None:
            return
        n = q.shape[2]
        rows = torch.linspace(0, n - 1, min(self.probe_rows, n)).round().long().unique().tolist()
        w: Tensor | None = None
        if sm is None and not active:
            parts = [core.query_weights(q, k, am, r) for r in rows]
            if all(p is not None for p in parts):
                w = torch.cat(parts, 2)  # type: ignore[arg-type]
        if w is None:
            res = core(q, k, v, am, cross=cross, need_weights=True, score_mod=sm)
            res = self._transform(active, res, v, am, cross=cross, heads=q.shape[1])
            if res.weights is None:
                return
            w = res.weights[:, :, rows]
        ent = attention_entropy(w)  # (B, H, r)
        valid = (w.sum(-1) > 0).to(ent.dtype)  # rows with no allowed key have no distribution
        per_head = (ent * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1.0)
        self.probe(per_head.float())
