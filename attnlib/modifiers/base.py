"""The modifier base class and registry.

A modifier changes *how* an attention attends without replacing the variant: it edits the
pre-softmax scores (a FlexAttention-style ``score_mod``), transforms the core's output /
weights afterwards, or reparametrises the module's projections. Each modifier declares the
variant capabilities it needs (``needs``, fields of :class:`attnlib.Capabilities`) and when it
is active (``when``: always, training only, or evaluation only). :class:`attnlib.Attention`
checks every modifier against its variant at construction and raises
:class:`attnlib.UnsupportedError` naming both when the variant cannot serve it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor, nn

from attnlib._config import lookup_registered, register_named, to_plain_dict
from attnlib.errors import UnsupportedError
from attnlib.registry import Capabilities, variant_info
from attnlib.registry import available as available_variants

if TYPE_CHECKING:  # pragma: no cover
    from attnlib.functional.modifiers import ScoreModFn
    from attnlib.masks import AttentionMask
    from attnlib.variants.base import CoreOutput

__all__ = [
    "WHEN",
    "Modifier",
    "ModifierSpec",
    "available",
    "build_modifier",
    "get_modifier",
    "modifier_info",
    "register_modifier",
]

WHEN = ("always", "train", "eval")

ModifierSpec = Any  # a Modifier, a mapping {"name": ..., **options} (dict / DictConfig), or a name


class Modifier(nn.Module):
    """Base class of every attention modifier.

    Subclasses set ``needs`` (capability fields the variant must declare, e.g.
    ``frozenset({"score_mod"})``) and ``default_when``, and override the hooks they use:

    * :meth:`score_mod` - an edit of the scaled logits, ``fn(score, b, h, q_idx, kv_idx)``;
    * :meth:`transform` - a change of the core's :class:`attnlib.variants.CoreOutput`
      (output, weights, importance) after it ran;
    * :meth:`attach` - a one-time change of the :class:`attnlib.Attention` it belongs to
      (e.g. parametrising its projections), which also learns the head count there.

    Args:
        when: "always", "train" (active in training mode only) or "eval" (inference only);
            default ``default_when``.
    """

    name: ClassVar[str] = "?"
    needs: ClassVar[frozenset[str]] = frozenset()
    default_when: ClassVar[str] = "always"

    def __init__(self, *, when: str | None = None) -> None:
        super().__init__()
        when = self.default_when if when is None else when
        if when not in WHEN:
            raise ValueError(f"modifier {self.name!r}: when must be one of {WHEN}, got {when!r}")
        self.when = when

    def active(self, training: bool) -> bool:
        """Whether the modifier acts in a call made in training (True) or eval (False) mode."""
        return self.when == "always" or (self.when == "train") == training

    def check(self, variant: str, caps: Capabilities) -> None:
        """Raise :class:`attnlib.UnsupportedError` when ``variant`` (with ``caps``) cannot serve this modifier."""
        missing = sorted(f for f in self.needs if not getattr(caps, f))
        if missing:
            serving = [n for n in available_variants() if all(getattr(variant_info(n), f) for f in self.needs)]
            raise UnsupportedError(
                f"modifier {self.name!r} cannot be used with variant {variant!r}: it needs "
                + ", ".join(f"capabilities.{f}=True" for f in missing)
                + f", but {variant!r} has "
                + ", ".join(f"{f}=False" for f in missing)
                + f". Variants that can serve it: {', '.join(serving) or 'none'}"
            )

    def attach(self, attn: nn.Module) -> None:
        """Called once by :class:`attnlib.Attention` after it is built (default: nothing)."""

    def score_mod(self) -> ScoreModFn | None:
        """The score edit of this modifier, or None (default)."""
        return None

    def transform(self, res: CoreOutput, v: Tensor, mask: AttentionMask, *, cross: bool, heads: int) -> CoreOutput:
        """A changed core output (default: ``res`` unchanged). v (B, H_kv, M, Dv) are the call's values."""
        return res

    @property
    def changes_attention(self) -> bool:
        """Whether the modifier changes outputs / weights of a call (score edit or transform)."""
        return type(self).score_mod is not Modifier.score_mod or type(self).transform is not Modifier.transform

    @classmethod
    def identity_kwargs(cls) -> dict[str, Any] | None:
        """Options under which the modifier leaves every call unchanged, or None if it has none."""
        return None

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Options for the small inputs of the conformance suite (a setting that changes calls)."""
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, when={self.when!r}"


_REGISTRY: dict[str, type[Modifier]] = {}

M = TypeVar("M", bound=type[Modifier])


def register_modifier(name: str):
    """Class decorator registering a :class:`Modifier` subclass under ``name`` (an identifier)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"modifier names must be identifiers, got {name!r}")

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Modifier)):
            raise TypeError(f"register_modifier: {cls!r} is not a Modifier subclass")
        return register_named(_REGISTRY, name, cls, kind="modifier")

    return deco


def available() -> list[str]:
    """Sorted names of the registered modifiers."""
    return sorted(_REGISTRY)


def get_modifier(name: str) -> type[Modifier]:
    """The Modifier class registered as ``name``; unknown names raise ValueError with close matches."""
    return lookup_registered(_REGISTRY, name, kind="modifier", plural="modifiers")


def modifier_info(name: str) -> dict[str, Any]:
    """What the modifier ``name`` needs and when it acts: ``{"needs": [...], "when": ..., "doc": ...}``."""
    cls = get_modifier(name)
    doc = (inspect.getdoc(cls) or "").split("\n")[0]
    return {"needs": sorted(cls.needs), "when": cls.default_when, "doc": doc}


def build_modifier(spec: ModifierSpec) -> Modifier:
    """A :class:`Modifier` from a modifier object (returned as is), a name, or a mapping
    ``{"name": ..., **options}`` (a dict or an OmegaConf DictConfig, as in a Hydra attention config).

    Unknown names and options raise ValueError listing what is accepted.
    """
    if isinstance(spec, Modifier):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) and not hasattr(spec, "keys"):
        raise ValueError(
            "a modifier must be a Modifier object, a name or a mapping like {'name': 'relaxed', 'gamma': 0.1}, "
            f"got {type(spec).__name__}: {spec!r}"
        )
    data = to_plain_dict(spec, what="modifier config")
    if "name" not in data:
        raise ValueError(f"modifier config needs a 'name' (one of {available()}); got keys {sorted(data)}")
    cls = get_modifier(str(data.pop("name")))
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise ValueError(f"modifier {cls.name!r} got unknown option(s) {unknown}; it accepts: {', '.join(accepted)}")
    return cls(**data)
