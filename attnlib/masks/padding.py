"""The key-padding mask kind as a mask item: :class:`KeyPadding`."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlib._validation import describe
from attnlib.masks.predicates import MaskMod, key_padding_mod

__all__ = ["KeyPadding", "prefix_lengths"]


@dataclass(frozen=True, eq=False)
class KeyPadding:
    """Key padding: key j of example b is real (``valid[b, j]`` True) or padding (False).

    ``valid``: bool (B, M). Use it inside a mask list (``mask=[KeyPadding(valid), SlidingWindow(8, 8)]``)
    and with the functional entry points; :meth:`attnlib.Attention.forward` also takes the tensor
    itself as ``key_padding_mask=valid``. A plain tensor mask is never read as key padding: it
    broadcasts to (B, H, N, M) as in SDPA, so a 2-D tensor is (N, M).
    """

    valid: Tensor

    def __post_init__(self) -> None:
        v = self.valid
        if not isinstance(v, Tensor) or v.dtype != torch.bool or v.dim() != 2:
            raise ValueError(f"KeyPadding.valid must be a bool tensor (B, M) (True = real key), got {describe(v)}")

    def mask_mod(self) -> MaskMod:
        """The predicate (:func:`attnlib.masks.predicates.key_padding_mod`)."""
        return key_padding_mod(self.valid)


_PREFIX_CACHE: OrderedDict[int, tuple[Any, int, Tensor | None]] = OrderedDict()
_PREFIX_CACHE_SIZE = 32


def prefix_lengths(valid: Tensor) -> Tensor | None:
    """The per-row lengths (B,) int64 when key padding ``valid`` (B, M) is right padding, else None.

    Right padding: row b is ``lengths[b]`` True entries followed by False only (the real keys
    are a contiguous prefix), so ``valid[b, j] == (j < lengths[b])``. Kernels take such padding
    as lengths (:func:`attnlib.kernels.block_sparse_attention`'s ``kv_lengths=``) instead of a
    mask. Deciding it reads the tensor once (one host synchronisation on an accelerator); the
    answer is remembered for the same tensor object until it is modified or freed, so the
    layers of one model that share a padding mask pay it once per forward pass.
    """
    key = id(valid)
    try:
        version = valid._version
    except RuntimeError:  # inference-mode tensors keep no version counter: not cached
        version = None
    hit = _PREFIX_CACHE.get(key)
    if version is not None and hit is not None and hit[0]() is valid and hit[1] == version:
        _PREFIX_CACHE.move_to_end(key)
        return hit[2]
    lengths = valid.sum(-1)
    prefix = torch.arange(valid.shape[-1], device=valid.device) < lengths[:, None]
    out = lengths if bool(torch.equal(prefix, valid)) else None
    if version is not None:
        _PREFIX_CACHE[key] = (weakref.ref(valid), version, out)
        while len(_PREFIX_CACHE) > _PREFIX_CACHE_SIZE:
            _PREFIX_CACHE.popitem(last=False)
    return out
