"""Token grids: tokens <-> 2-D maps, and the depthwise convolutions that run on them.

A vision transformer's sequence is ``P`` prefix tokens (a class token, ...) followed by an
``H x W`` grid of patch tokens in row-major order (the order ``Conv2d(...).flatten(2)`` of a
patch embedding produces). The functions here split such a sequence (B, P + H*W, C) into its
prefix (B, P, C) and its map (B, C, H, W), put them back together, and run the depthwise
convolutions of the positional schemes that live on the grid:

* :func:`peg` - the Positional Encoding Generator of Conditional Positional Encodings
  (Chu et al., "Conditional Positional Encodings for Vision Transformers", ICLR 2023,
  arXiv:2102.10882): ``PEG(X) = X + DWConv_kxk(X)`` on the patch tokens, zero padding
  ``k // 2``, prefix tokens unchanged.
* :func:`grouped_depthwise_conv` - a depthwise convolution whose kernel size changes from one
  channel group to the next (CoaT's convolutional relative position encoding,
  :mod:`attnlib.functional.factorized`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import describe, non_negative_int

__all__ = [
    "grid_to_tokens",
    "grouped_depthwise_conv",
    "infer_grid",
    "most_square_grid",
    "peg",
    "tokens_to_grid",
]


def most_square_grid(t: int) -> tuple[int, int]:
    """The most square factorisation (H, W) of ``t`` grid tokens: H <= W, H * W == t, H largest.

    (side, side) for a perfect square; (1, t) for a prime ``t`` (the sequence as one row).
    """
    h = max(d for d in range(1, math.isqrt(t) + 1) if t % d == 0)
    return h, t // h


def infer_grid(
    n: int,
    num_prefix_tokens: int = 0,
    grid: Sequence[int] | None = None,
    *,
    where: str = "grid",
    square_only: bool = True,
) -> tuple[int, int]:
    """The (H, W) grid of a sequence of ``n`` tokens with ``num_prefix_tokens`` in front.

    With ``grid`` given it is checked (``H * W == n - num_prefix_tokens``); without, the grid
    is square and ``n - num_prefix_tokens`` must be a perfect square, or, with
    ``square_only=False``, the most square factorisation (:func:`most_square_grid`). Raises
    ValueError naming ``where`` and saying what to pass otherwise.
    """
    p = non_negative_int(num_prefix_tokens, f"{where}: num_prefix_tokens")
    t = n - p
    if t <= 0:
        raise ValueError(f"{where}: {n} tokens leave no grid after num_prefix_tokens={p}")
    if grid is not None:
        if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
            raise ValueError(f"{where}: grid must be a pair of positive ints (H, W), got {grid!r}")
        h, w = int(grid[0]), int(grid[1])
        if h * w != t:
            raise ValueError(
                f"{where}: grid {(h, w)} has {h * w} cells but the sequence has {t} grid tokens "
                f"({n} tokens - {p} prefix tokens)"
            )
        return h, w
    if not square_only:
        return most_square_grid(t)
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(
            f"{where}: {t} grid tokens ({n} tokens - {p} prefix tokens) do not form a square grid; pass grid=(H, W)"
        )
    return side, side


def tokens_to_grid(x: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Split x (B, P + H*W, C) into its prefix (B, P, C) and its grid map (B, C, H, W) (row-major)."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"tokens_to_grid: x must be (B, N, C), got {describe(x)}")
    h, w = grid
    p = num_prefix_tokens
    if x.shape[1] != p + h * w:
        raise ValueError(f"tokens_to_grid: x has {x.shape[1]} tokens, expected {p} prefix + {h}x{w} grid = {p + h * w}")
    img = x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    return x[:, :p], img


def grid_to_tokens(prefix: Tensor, img: Tensor) -> Tensor:
    """Inverse of :func:`tokens_to_grid`: prefix (B, P, C), img (B, C, H, W) -> (B, P + H*W, C)."""
    return torch.cat([prefix, img.flatten(2).transpose(1, 2)], 1)


def peg(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    *,
    residual: bool = True,
) -> Tensor:
    """Positional Encoding Generator: the patch tokens plus a depthwise convolution of them.

    Args:
        x: (B, P + H*W, C) tokens, P prefix tokens first, then the grid row by row.
        weight: (C, 1, k, k) depthwise kernel (k odd); bias: (C,) or None.
        grid: (H, W).
        num_prefix_tokens: P; these tokens are returned unchanged (not convolved).
        residual: ``X + DWConv(X)`` (the paper's PEG); False returns ``DWConv(X)`` alone.

    Returns:
        (B, P + H*W, C). Zero padding of ``k // 2``: the zeros outside the map are what lets
        the translation-equivariant convolution tell where the border is (the paper's argument).
    """
    c = x.shape[-1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"peg: weight must be a depthwise kernel (C={c}, 1, k, k), got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"peg: kernel size must be odd (same-size output), got {k}")
    prefix, img = tokens_to_grid(x, grid, num_prefix_tokens)
    out = F.conv2d(img, weight, bias, padding=k // 2, groups=c)
    return grid_to_tokens(prefix, img + out if residual else out)


def grouped_depthwise_conv(img: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> Tensor:
    """Depthwise convolutions with one kernel size per channel group, "same" zero padding.

    Args:
        img: (B, C, H, W).
        weights: per group g a (C_g, 1, k_g, k_g) kernel (k_g odd), sum of C_g = C, groups in
            channel order.
        biases: per group (C_g,) or None.

    Returns:
        (B, C, H, W): group g's channels convolved with its own kernel.
    """
    sizes = [w.shape[0] for w in weights]
    if sum(sizes) != img.shape[1]:
        raise ValueError(f"grouped_depthwise_conv: the groups cover {sum(sizes)} channels, the map has {img.shape[1]}")
    outs = []
    for part, w, b in zip(img.split(sizes, 1), weights, biases, strict=True):
        outs.append(F.conv2d(part, w, b, padding=w.shape[-1] // 2, groups=w.shape[0]))
    return torch.cat(outs, 1)
