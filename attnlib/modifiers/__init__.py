"""Attention modifiers: mechanisms that change how any variant attends, without replacing it.

>>> import attnlib, torch
>>> attn = attnlib.Attention(64, 4, variant="softmax", causal=True, modifiers=[{"name": "alibi"}])
>>> attn(torch.randn(2, 16, 64)).shape
torch.Size([2, 16, 64])

Registered modifiers (:func:`available`):

* ``score_mod`` - any FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)``;
* ``alibi`` - ALiBi's linear distance bias (Press et al. 2022);
* ``ultravico`` - UltraViCo's damping of positive out-of-window scores (Zhao et al. 2025);
* ``relaxed`` - relaxed attention, weights smoothed toward uniform (Lohrenz et al. 2021/2022);
* ``sigma_reparam`` - sigmaReparam on the projections (Zhai et al. 2023).

``Attention(..., modifiers=[...])`` takes modifier objects, names or mappings such as
``{"name": "relaxed", "gamma": 0.1}`` (the same list a Hydra attention config holds under
``modifiers:``). Each modifier declares what it needs from the variant (``needs``: capability
fields, e.g. ``score_mod``) and when it acts (``when``); a variant that cannot serve it raises
:class:`attnlib.UnsupportedError` naming both. :class:`EntropyProbe` tracks per-head attention
entropy during training.

A new modifier is a :class:`Modifier` subclass decorated with ``@register_modifier("name")`` in
any public module of this package: every one is imported here (no list to edit), so the
conformance suite runs it against every variant that can serve it.
"""

import importlib
import pkgutil

from attnlib.modifiers.base import (
    WHEN,
    Modifier,
    ModifierSpec,
    available,
    build_modifier,
    get_modifier,
    modifier_info,
    register_modifier,
)
from attnlib.modifiers.entropy import EntropyProbe
from attnlib.modifiers.relaxed import Relaxed
from attnlib.modifiers.score import ALiBi, ScoreModifier, UltraViCo
from attnlib.modifiers.sigma_reparam import (
    SigmaReparam,
    SpectralReparam,
    apply_sigma_reparam,
    init_weight_target,
    reparametrize_attention,
    reset_sigma_reparam,
)
from attnlib.modifiers.stack import ModifierStack

__all__ = [
    "WHEN",
    "ALiBi",
    "EntropyProbe",
    "Modifier",
    "ModifierSpec",
    "ModifierStack",
    "Relaxed",
    "ScoreModifier",
    "SigmaReparam",
    "SpectralReparam",
    "UltraViCo",
    "apply_sigma_reparam",
    "available",
    "build_modifier",
    "get_modifier",
    "init_weight_target",
    "modifier_info",
    "register_modifier",
    "reparametrize_attention",
    "reset_sigma_reparam",
]

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
