"""Variant registry and capability declarations.

Every attention variant is an :class:`attnlib.variants.base.AttentionCore` subclass
registered under a name with :func:`register_variant`. Its :class:`Capabilities` say what it
supports; tests, configs, the capability matrix and the module's input checks all read them
instead of special-casing names.

This module sits below :mod:`attnlib.variants` and imports nothing from it: the variants
register themselves when :mod:`attnlib.variants` imports its family modules (``import attnlib``
does), and the registry only needs a class with a ``capabilities`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from attnlib._config import lookup_registered, register_named

__all__ = [
    "Capabilities",
    "available",
    "get_variant",
    "register_variant",
    "variant_info",
]


@dataclass(frozen=True)
class Capabilities:
    """What an attention variant supports.

    Attributes:
        causal: honours ``causal=True`` for self-attention (N == M).
        cross: supports cross-attention (keys/values from a context with M != N).
        key_padding: honours a (B, M) key-padding mask.
        full_mask: honours a full (B|1, H|1, N, M) boolean mask.
        block_mask: honours an :class:`attnlib.masks.BlockMask`.
        window: honours an :class:`attnlib.masks.SlidingWindow` mask.
        causal_cross: honours ``causal=True`` with N != M (bottom-right aligned; KV-cache decoding).
        complexity: time complexity in the sequence length, e.g. "O(N^2)", "O(N)", "O(N log N)".
        exact: output equals exact softmax attention under the same masks.
        has_weights: can return the (B, H, N, M) attention weights.
        trainable: the variant itself has trainable parameters (beyond the q/k/v/out projections).
        attn_dropout: applies ``dropout`` to attention probabilities (otherwise the module
            applies it to the variant's output).
        gqa: accepts k/v with fewer heads than q (the module repeats k/v otherwise).
        permutation_equivariant: without masks and ``causal``, permuting the tokens permutes
            the output (no positional structure inside the variant).
        recurrent: has a recurrent ``step`` form for causal decoding.
        decode: incremental causal decoding (:meth:`attnlib.Attention.init_cache`, a framework's
            cache) equals recomputing the whole causal sequence: the causal row of position i
            depends on positions <= i only, not on the total length N. Left unset it follows
            ``causal``; a causal variant whose rows depend on N declares ``decode=False``, and a
            core whose *options* make them depend on N says so in
            :meth:`AttentionCore.decoding_error` (decoding then raises UnsupportedError).
        importance: reports ``importance`` (attention mass each key receives) through
            ``return_extras`` - what token pruning (:mod:`attnlib.pruning`) ranks tokens by.
            False unless declared, like every capability.
        score_mod: applies a FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)`` to its
            pre-softmax logits (:class:`attnlib.variants.base.AttentionCore` passes it to ``attend``);
            what score modifiers (ALiBi, UltraViCo, :mod:`attnlib.modifiers`) need.
        family: the variant family ("dense", "sparse", "linear", ...).
        paper: short reference to the defining paper.
    """

    causal: bool = False
    cross: bool = False
    key_padding: bool = False
    full_mask: bool = False
    block_mask: bool = False
    window: bool = False
    causal_cross: bool = False
    complexity: str = "O(N^2)"
    exact: bool = False
    has_weights: bool = False
    trainable: bool = False
    attn_dropout: bool = False
    gqa: bool = False
    permutation_equivariant: bool = False
    recurrent: bool = False
    decode: bool | None = None  # None: same as ``causal`` (set in __post_init__)
    importance: bool = False
    score_mod: bool = False
    family: str = ""
    paper: str = ""

    def __post_init__(self) -> None:
        if self.decode is None:
            object.__setattr__(self, "decode", self.causal)
        if self.decode and not self.causal:
            raise ValueError("Capabilities(decode=True) needs causal=True")

    def supports(self, kind: str) -> bool:
        """Whether the mask kind (as in :meth:`AttentionMask.kinds`) is supported."""
        return bool(getattr(self, kind))

    def as_dict(self) -> dict[str, object]:
        """Field name -> value, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_REGISTRY: dict[str, type[Any]] = {}  # name -> AttentionCore subclass

C = TypeVar("C", bound=type)


def register_variant(name: str):
    """Class decorator registering an :class:`AttentionCore` subclass under ``name``.

    The class must define a ``capabilities`` class attribute. Registering a second class
    under a taken name raises ValueError.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"variant names must be identifiers, got {name!r}")

    def deco(cls: C) -> C:
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, Capabilities):
            raise TypeError(f"{cls.__qualname__} must define `capabilities = Capabilities(...)`")
        return register_named(_REGISTRY, name, cls, kind="variant")

    return deco


def available() -> list[str]:
    """Sorted names of the registered variants."""
    return sorted(_REGISTRY)


def get_variant(name: str) -> type[Any]:
    """The AttentionCore subclass registered as ``name``; unknown names raise ValueError with close matches."""
    return lookup_registered(_REGISTRY, name, kind="attention variant", plural="variants")


def variant_info(name: str) -> Capabilities:
    """Capabilities of the variant registered as ``name``."""
    return get_variant(name).capabilities
