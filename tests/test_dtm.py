"""Deformable token merging (LIT) and the grid_sample deformable convolution against a bilinear loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.functional.deformable import deform_conv2d
from attnlib.models import ViT
from attnlib.pruning import DeformableTokenMerging

DT = torch.float64


def close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def bilinear(img, y, x):
    """X(y, x) of one channel map (H, W): bilinear between the 4 neighbours, 0 outside the map."""
    h, w = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * float(img[yy, xx])
    return out


def ref_deform_conv(x, offset, weight, bias, stride):
    """y[o, p0] = b[o] + sum_{c, n} w[o, c, n] X[c](p0 * stride + p_n + delta_n(p0)), explicit loops."""
    b, c, _, _ = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    out = torch.zeros(b, o, ho, wo, dtype=DT)
    for bi in range(b):
        for oy in range(ho):
            for ox in range(wo):
                for i in range(kh):
                    for j in range(kw):
                        n = i * kw + j
                        dy, dx = float(offset[bi, 2 * n, oy, ox]), float(offset[bi, 2 * n + 1, oy, ox])
                        for ci in range(c):
                            s = bilinear(x[bi, ci], oy * stride + i + dy, ox * stride + j + dx)
                            out[bi, :, oy, ox] += weight[:, ci, i, j] * s
                out[bi, :, oy, ox] += bias
    return out


def _conv(c=3, o=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o, c, 2, 2, generator=g, dtype=DT), torch.randn(o, generator=g, dtype=DT)


def test_zero_offsets_are_the_strided_convolution() -> None:
    x = torch.randn(2, 3, 6, 4, dtype=DT)
    w, b = _conv()
    off = torch.zeros(2, 8, 3, 2, dtype=DT)
    torch.testing.assert_close(deform_conv2d(x, off, w, b, stride=2), F.conv2d(x, w, b, stride=2), rtol=0, atol=1e-12)


def test_integer_offsets_shift_the_input() -> None:
    """All offsets (0, 1): the convolution of the input shifted one pixel left, zero fill at the border."""
    x = torch.randn(2, 3, 4, 6, dtype=DT)
    w, b = _conv(seed=1)
    off = torch.zeros(2, 8, 2, 3, dtype=DT)
    off[:, 1::2] = 1.0
    shifted = F.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(
        deform_conv2d(x, off, w, b, stride=2), F.conv2d(shifted, w, b, stride=2), rtol=0, atol=1e-12
    )


def test_fractional_offsets_equal_the_bilinear_loop() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=DT)
    w, b = _conv(c=2, o=3, seed=3)
    off = torch.randn(2, 8, 2, 2, generator=g, dtype=DT) * 1.5  # some samples leave the map
    torch.testing.assert_close(
        deform_conv2d(x, off, w, b, stride=2), ref_deform_conv(x, off, w, b, 2), rtol=0, atol=1e-12
    )
    # one-pixel maps: still bilinear against the zeros around them
    x1 = torch.randn(1, 2, 2, 2, generator=g, dtype=DT)
    off1 = torch.rand(1, 8, 1, 1, generator=g, dtype=DT) - 0.5
    torch.testing.assert_close(
        deform_conv2d(x1, off1, w, b, stride=2), ref_deform_conv(x1, off1, w, b, 2), rtol=0, atol=1e-12
    )


def test_dtm_pruner_merges_the_grid_and_keeps_the_class_token() -> None:
    torch.manual_seed(4)
    dtm = DeformableTokenMerging(dim=4, layer=0, depth=2, norm="none").double()
    x = torch.randn(2, 1 + 16, 4, dtype=DT)
    prot = torch.zeros(2, 17, dtype=torch.bool)
    prot[:, 0] = True
    out = dtm(x, None, None, prot)
    assert out.x.shape == (2, 5, 4) and out.index.tolist() == [[0, -1, -1, -1, -1]] * 2 and out.mask is None
    assert torch.equal(out.x[:, 0], x[:, 0])
    img = x[:, 1:].transpose(1, 2).reshape(2, 4, 4, 4)
    conv = F.conv2d(img, dtm.proj.weight, dtm.proj.bias, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.x[:, 1:], conv, rtol=0, atol=1e-12)  # zero offsets at init
    with pytest.raises(ValueError, match="even sides"):
        dtm(torch.randn(1, 9, 4, dtype=DT), None)
    with pytest.raises(attnlib.UnsupportedError, match="cannot follow padding"):
        dtm(x, None, torch.ones(2, 17, dtype=torch.bool).index_fill_(1, torch.tensor([3]), False))


def test_vit_with_dtm_and_mlp_only_blocks_trains() -> None:
    torch.manual_seed(5)
    m = ViT(
        attention={"variant": "softmax"},
        dim=16,
        depth=3,
        num_heads=2,
        mlp_only_blocks=1,
        pruning={"name": "dtm", "layers": [0]},
    )
    x = torch.randn(4, 1, 8, 8)
    loss = F.cross_entropy(m(x), torch.arange(4))
    loss.backward()
    assert m.pruning.get(0).offset.weight.grad.abs().sum() > 0  # the offset branch learns
    assert m.last_kept_index.shape == (4, 5)
