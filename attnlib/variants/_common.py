"""Plumbing shared by the linear-family cores (internal): result unpacking, chunk size,
explicit mode, and the checks and state allocation of recurrent decoding."""

from __future__ import annotations

import torch
from torch import Tensor

from attnlib._validation import positive_int
from attnlib.functional._common import acc_dtype
from attnlib.registry import Capabilities
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["KernelCore", "kernel_family_caps", "unpack"]


def unpack(res: Tensor | tuple[Tensor, ...], need_weights: bool, need_importance: bool) -> CoreOutput:
    """Functional result ``out`` / ``(out, weights?, importance?)`` -> :class:`CoreOutput`."""
    if isinstance(res, Tensor):
        return CoreOutput(res)
    items = list(res)
    out = items.pop(0)
    weights = items.pop(0) if need_weights else None
    importance = items.pop(0) if need_importance else None
    return CoreOutput(out, weights=weights, importance=importance)


class KernelCore(AttentionCore):
    """Shared plumbing of the linear family: chunk size, explicit mode, recurrent state checks."""

    def __init__(self, *, num_heads: int, head_dim: int, chunk_size: int = 64, explicit: bool = False) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.chunk_size = positive_int(chunk_size, f"{type(self).__name__}: chunk_size")
        self.explicit = bool(explicit)

    def _check_step(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[2] != 1 or t.shape[1] != self.num_heads:
                raise ValueError(
                    f"variant {self.name!r} step: {name} must be (B, H={self.num_heads}, 1, D), got {tuple(t.shape)}"
                )

    def _zeros(self, batch: int, *shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.zeros(batch, self.num_heads, *shape, dtype=acc_dtype(dtype), device=device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}" + (", explicit=True" if self.explicit else "")


def kernel_family_caps(
    paper: str,
    *,
    family: str,
    complexity: str = "O(N)",
    cross: bool = True,
    has_weights: bool = True,
    trainable: bool = False,
    permutation_equivariant: bool = True,
) -> Capabilities:
    """Capabilities shared by the linear / flow / AFT cores (all :class:`KernelCore`).

    They support causal (chunked parallel form + recurrent ``step``) and key padding, not full
    masks, BlockMasks, windows, causal cross-attention, attention dropout or native GQA.
    """
    return Capabilities(
        causal=True,
        cross=cross,
        key_padding=True,
        full_mask=False,
        block_mask=False,
        window=False,
        causal_cross=False,
        complexity=complexity,
        exact=False,
        has_weights=has_weights,
        trainable=trainable,
        attn_dropout=False,
        gqa=False,
        permutation_equivariant=permutation_equivariant,
        recurrent=True,
        importance=True,
        family=family,
        paper=paper,
    )
