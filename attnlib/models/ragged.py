"""Ragged batches after token pruning: regroup rows by length instead of padding them.

A pruner that keeps a different number of tokens per row (``ltp``, ``iared2``, any pruner on
a padded batch) leaves a padded batch (B, N, C) with a key-padding mask. Running the later
blocks on it costs the longest row for every row and needs a masked attention. Grouping the
rows by real length instead (:func:`group_by_length`) packs the real tokens into (T, C),
``T = sum_b len_b``: the token-wise layers (norms, projections, MLP) run once on the T real
tokens and the attention core once per distinct length on an unpadded batch
(:meth:`attnlib.Attention.forward_groups`, :meth:`attnlib.models.TransformerBlock.forward_groups`).
No padding is computed, and each row gets exactly what it would get alone (batch-independent
results; a padded batch's importance also averages over the padded queries).

Packed layout: rows sorted by length (stable: ties keep their batch order), each row's real
tokens in sequence order, rows one after another - so the rows of one length are a contiguous
(rows_g * length_g, C) slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LengthGroups", "group_by_length"]


@dataclass
class LengthGroups:
    """The packed layout of a padded batch (see the module docstring).

    Attributes:
        mask: (B, N) bool, True = real token (the padded batch's mask).
        order: (B,) long, the batch rows in packed order (sorted by length, stable).
        groups: ``[(rows_g, length_g), ...]`` per distinct length, ascending.
        flat_index: (T,) long, position ``b * N + j`` in the flattened padded batch of each packed token.
    """

    mask: Tensor
    order: Tensor
    groups: list[tuple[int, int]]
    flat_index: Tensor

    @property
    def tokens(self) -> int:
        """T, the number of real tokens."""
        return int(self.flat_index.shape[0])

    def pack(self, x: Tensor) -> Tensor:
        """x (B, N, ...) padded -> (T, ...) real tokens in packed order."""
        b, n = self.mask.shape
        if tuple(x.shape[:2]) != (b, n):
            raise ValueError(f"pack: x must be (B, N, ...) = ({b}, {n}, ...), got {tuple(x.shape)}")
        return x.reshape(b * n, *x.shape[2:]).index_select(0, self.flat_index)

    def unpack(self, xp: Tensor, fill: float = 0.0) -> Tensor:
        """xp (T, ...) packed -> (B, N, ...) padded, ``fill`` at the padding."""
        b, n = self.mask.shape
        if xp.shape[0] != self.tokens:
            raise ValueError(f"unpack: expected ({self.tokens}, ...) packed tokens, got {tuple(xp.shape)}")
        out = xp.new_full((b * n, *xp.shape[1:]), fill)
        return out.index_copy_(0, self.flat_index, xp).view(b, n, *xp.shape[1:])


def group_by_length(mask: Tensor) -> LengthGroups:
    """The packed layout of a padded batch with key-padding ``mask`` (B, N) bool (True = real).

    Real tokens need not be a prefix of their row (e.g. a fused EViT token after padding).
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"group_by_length: mask must be a (B, N) bool tensor, got {getattr(mask, 'shape', mask)!r}")
    n = mask.shape[1]
    lengths = mask.sum(1)
    lens_sorted, order = torch.sort(lengths, stable=True)
    flat = (order[:, None] * n + torch.arange(n, device=mask.device)[None, :])[mask[order]]
    vals, counts = torch.unique_consecutive(lens_sorted, return_counts=True)
    groups = [(int(c), int(v)) for v, c in zip(vals.tolist(), counts.tolist(), strict=True)]
    return LengthGroups(mask=mask, order=order, groups=groups, flat_index=flat)
