"""Deformable convolution (DCNv1) with bilinear sampling by ``torch.nn.functional.grid_sample``.

Dai et al., "Deformable Convolutional Networks" (ICCV 2017): every kernel tap of every output
position reads the input at its regular place plus a learned offset,

    y[o, p0] = b[o] + sum_{c, taps n} w[o, c, n] * X[c](p0 * stride - padding + p_n * dilation + delta_n(p0)),

with ``X(p)`` bilinear between the four neighbouring pixels and 0 outside the map (torchvision's
``deform_conv2d`` convention, so a sample within one pixel of the border mixes the border with
zeros). Offsets are (B, 2 * kh * kw, H_out, W_out), the (dy, dx) pair of tap n = i * kw + j at
channels (2n, 2n + 1). LIT's deformable token merging (:mod:`attnlib.pruning.dtm`) is a 2x2,
stride-2 deformable convolution; with zero offsets it is that plain convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import describe

__all__ = ["deform_conv2d", "deform_sample"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def deform_sample(
    x: Tensor,
    offset: Tensor,
    kernel_size: tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """The bilinear samples a deformable convolution multiplies its kernel with.

    Args:
        x: (B, C, H, W).
        offset: (B, 2 * kh * kw, H_out, W_out), (dy, dx) per tap, taps row-major.
        kernel_size: (kh, kw); stride, padding, dilation: as in ``Conv2d``.

    Returns:
        (B, C, kh * kw, H_out, W_out): ``X(p0 * stride - padding + p_n * dilation + delta_n(p0))``,
        0 outside the map.
    """
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if offset.dim() != 4 or tuple(offset.shape) != (b, 2 * kh * kw, ho, wo):
        raise ValueError(
            f"deform_sample: offset must be (B, 2*kh*kw, H_out, W_out) = {(b, 2 * kh * kw, ho, wo)}, "
            f"got {describe(offset)}"
        )
    k = kh * kw
    ti = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh  # tap rows, row-major taps
    tj = torch.arange(kw, device=x.device).repeat(kh) * dw
    oy = torch.arange(ho, device=x.device) * sh - ph
    ox = torch.arange(wo, device=x.device) * sw - pw
    off = offset.reshape(b, k, 2, ho, wo)
    y = oy[None, None, :, None] + ti[None, :, None, None] + off[:, :, 0]  # (B, K, H_out, W_out)
    xx = ox[None, None, None, :] + tj[None, :, None, None] + off[:, :, 1]
    # one pixel of zeros around the map: bilinear reads beyond the border are 0 and maps of side 1
    # still have two corners to normalise between (align_corners=True maps pixel centres to +-1)
    xp = F.pad(x, (1, 1, 1, 1))
    gy = (y + 1) * (2.0 / (h + 1)) - 1
    gx = (xx + 1) * (2.0 / (w + 1)) - 1
    grid = torch.stack([gx, gy], -1).to(x.dtype).reshape(b, k * ho, wo, 2)
    out = F.grid_sample(xp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(b, c, k, ho, wo)


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Deformable convolution (DCNv1, no modulation): x (B, C, H, W), offset (B, 2*kh*kw, H_out, W_out),
    weight (O, C, kh, kw), bias (O,) -> (B, O, H_out, W_out). Zero offsets give ``F.conv2d``."""
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"deform_conv2d: weight must be (O, C={x.shape[1]}, kh, kw), got {describe(weight)}")
    kh, kw = weight.shape[-2:]
    cols = deform_sample(x, offset, (kh, kw), stride=stride, padding=padding, dilation=dilation)
    out = torch.einsum("bckhw,ock->bohw", cols, weight.flatten(2))
    return out if bias is None else out + bias[None, :, None, None]
