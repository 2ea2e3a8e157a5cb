"""One mask vocabulary for every attention variant.

Convention everywhere in attnlib: masks are boolean and **True = may attend** (the SDPA
convention). The kinds of mask a caller can give:

* a plain bool tensor, broadcast to (B, H, N, M) as in SDPA: (N, M), (1, N, M) or
  (B|1, H|1, N, M) (N or M may also be 1); a 3-D tensor with a leading size > 1 is refused as
  ambiguous (SDPA reads (H, N, M), nn.MultiheadAttention (B·H, N, M));
* key padding (B, M) - key j of batch b is real (True) or padding: :class:`KeyPadding`, or the
  ``key_padding_mask=`` argument of :meth:`attnlib.Attention.forward` (never a plain tensor:
  a 2-D tensor is (N, M));
* ``causal=True`` (a flag of the module / functional call, not a tensor);
* sliding window: :class:`SlidingWindow` (``left`` / ``right`` radius);
* :class:`BlockMask`: a block-sparse layout whose partial blocks keep their element-wise mask.

A list of masks is their AND, in any order.

Causal and sliding-window masks with N != M are *bottom-right aligned* (the FlashAttention
convention): query row i sits at absolute position ``i + (M - N)``. So a decoder step with one
query and a cache of M keys sees all M keys under ``causal=True``.

Query rows that may attend to no key at all return zeros (never NaN) in every variant.

Every mask kind has ONE predicate, FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``
(:mod:`attnlib.masks.predicates`); dense rows, block layouts and FlexAttention block masks are
derived from it. Everything a variant receives is normalised into one :class:`AttentionMask`
by :func:`normalize_mask`, which validates shapes, dtypes and devices and raises a
`ValueError` saying what was expected and what was given.

Modules: ``predicates`` (the predicates and their dense forms), ``window`` (SlidingWindow),
``padding`` (KeyPadding), ``block`` (BlockMask: generic layout code), ``patterns`` (named
layouts, mixed into BlockMask), ``attention_mask`` (AttentionMask, MaskLike, normalize_mask).
"""

from __future__ import annotations

import warnings
from typing import Any

from attnlib.masks.attention_mask import AttentionMask, MaskLike, normalize_mask
from attnlib.masks.block import BlockMask
from attnlib.masks.padding import KeyPadding
from attnlib.masks.predicates import (
    MaskMod,
    and_mod,
    causal_mask,
    causal_mod,
    dense_mod,
    key_padding_mod,
    or_mod,
    window_mask,
    window_mod,
)
from attnlib.masks.window import SlidingWindow, sliding_window

__all__ = [
    "AttentionMask",
    "BlockMask",
    "KeyPadding",
    "MaskLike",
    "MaskMod",
    "SlidingWindow",
    "and_mod",
    "causal_mask",
    "causal_mod",
    "dense_mod",
    "key_padding_mod",
    "normalize_mask",
    "or_mod",
    "sliding_window",
    "window_mask",
    "window_mod",
]

_MOVED = {"grat_permutation": "attnlib.functional.grat"}


def __getattr__(name: str) -> Any:
    """Deprecated aliases of names that moved to a higher layer (imported lazily, with a warning)."""
    if name in _MOVED:
        import importlib

        where = _MOVED[name]
        warnings.warn(
            f"attnlib.masks.{name} moved to {where}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'attnlib.masks' has no attribute {name!r}")
