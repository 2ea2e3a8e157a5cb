"""The key-padding mask kind as a mask item: :class:`KeyPadding`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlib._validation import describe
from attnlib.masks.predicates import MaskMod, key_padding_mod

__all__ = ["KeyPadding"]


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
