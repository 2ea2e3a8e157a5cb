"""GTA (geometric transform attention) against its dense definition and its named special cases."""

from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.functional import softmax_attention
from attnlib.functional.gta import (
    Geometry,
    RepBlock,
    angle_so2,
    grid_so2,
    gta_output,
    gta_reference,
    gta_transform,
    pose_blocks,
    rigid_inverse,
)
from attnlib.registry import get_variant
from attnlib.testing import make_qkv

ATOL = 1e-10
DT = torch.float64


def random_pose(b: int, v: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, V, n+1, n+1) random rigid transforms (rotation from a QR, translation ~ N(0, 1))."""
    a = torch.randn(b, v, n, n, generator=gen, dtype=DT)
    r, _ = torch.linalg.qr(a)
    r[..., :, 0] *= torch.linalg.det(r).sign()[..., None]  # a proper rotation (det +1)
    p = torch.zeros(b, v, n + 1, n + 1, dtype=DT)
    p[..., :n, :n] = r
    p[..., :n, n] = torch.randn(b, v, n, generator=gen, dtype=DT)
    p[..., n, n] = 1.0
    return p


def mixed_geometry(b: int, views: int, per_view: int, *, v_transform: bool = True, seed: int = 0) -> Geometry:
    """se3 (2 copies) + se2 (1) + grid so2 (1 frequency: 2 blocks) + angle so2 (2 frequencies): 19 channels."""
    gen = torch.Generator().manual_seed(seed)
    se3 = pose_blocks(random_pose(b, views, 3, gen), per_view, 2, trans_coeff=0.5)
    se2 = pose_blocks(random_pose(b, views, 2, gen), per_view, 1)
    side = math.isqrt(per_view)
    grid = grid_so2((side, side), 1, dtype=DT)
    grid = RepBlock(*(t.repeat(1, views, 1, 1, 1) for t in (grid.q, grid.q_inv, grid.k)), "so2")
    ang = angle_so2(torch.randn(b, views * per_view, generator=gen, dtype=DT), (1.0, 3.0))
    return Geometry((se3, se2, grid, ang), v_transform)


def pipeline(q, k, v, geometry, mask=None):
    qt, kt, vt = gta_transform(q, k, v, geometry)
    return gta_output(softmax_attention(qt, kt, vt, mask=mask, backend="math"), geometry)


@pytest.mark.parametrize("v_transform", [True, False])
def test_pre_post_transform_equals_dense_definition(v_transform: bool) -> None:
    b, h, views, per_view, d = 2, 2, 2, 4, 22  # 3 trivial channels
    geo = mixed_geometry(b, views, per_view, v_transform=v_transform)
    q, k, v = make_qkv(b, h, views * per_view, d, dtype=DT, logit_scale=3.0, seed=1)
    g = torch.Generator().manual_seed(2)
    allowed = torch.rand(b, 1, 8, 8, generator=g) > 0.3
    allowed[0, 0, 2] = False  # one query with no key
    out = pipeline(q, k, v, geo, mask=allowed)
    torch.testing.assert_close(out, gta_reference(q, k, v, geo, allowed=allowed), rtol=0, atol=ATOL)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


def test_relative_elements_are_group_differences() -> None:
    """rho is a homomorphism: rho(g_i)^-1 rho(g_j) is the block of g_i^-1 g_j - for poses the relative
    pose, for grid positions the rotation by the coordinate difference."""
    gen = torch.Generator().manual_seed(3)
    poses = random_pose(1, 3, 3, gen)
    blk = pose_blocks(poses, 1, 1, trans_coeff=0.7)
    rel = blk.q_inv[0, 0, 0] @ blk.k[0, 2, 0]
    direct = rigid_inverse(poses[0, 0]) @ poses[0, 2]
    direct[:3, 3] *= 0.7
    torch.testing.assert_close(rel, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(blk.q[0, 1, 0] @ blk.q_inv[0, 1, 0], torch.eye(4, dtype=DT), rtol=0, atol=1e-12)
    f = 3
    grid = grid_so2((4, 5), f, dtype=DT)
    i, j = 6, 13  # (1, 1) and (2, 3)
    rel = grid.q_inv[0, i] @ grid.k[0, j]  # (2F, 2, 2)
    for kf in range(f):
        freq = 2.0 ** (kf + 1) / 2.0**f
        for axis, delta in ((0, (2 - 1) / 4), (1, (3 - 1) / 5)):
            t = torch.tensor(2 * math.pi * freq * delta, dtype=DT)
            rot = torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
            torch.testing.assert_close(rel[2 * kf + axis], rot, rtol=0, atol=1e-12)


def identity_geometry(b: int, n: int, channels: int) -> Geometry:
    eye = torch.eye(2, dtype=DT).expand(1, n, channels // 2, 2, 2)
    return Geometry((RepBlock(eye, eye, eye, "identity"),))


@pytest.mark.parametrize("name", attnlib.available())
def test_identity_elements_give_plain_attention_for_every_variant(name: str) -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, variant=name, **get_variant(name).conformance_kwargs()).double().eval()
    x = torch.randn(2, 16, 16, dtype=DT)
    torch.testing.assert_close(attn(x, geometry=identity_geometry(2, 16, 8)), attn(x), rtol=0, atol=1e-12)


def _moved(geo: Geometry, gen: torch.Generator) -> Geometry:
    """Every element g_i replaced by h g_i for one random global h per block group."""
    out = []
    for blk in geo.blocks:
        s = blk.size
        if s == 2:
            t = torch.rand((), generator=gen, dtype=DT) * 6
            hm = torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
            hinv = hm.T
        else:
            hm = random_pose(1, 1, s - 1, gen)[0, 0]
            hinv = rigid_inverse(hm)
        out.append(RepBlock(hm @ blk.q, blk.q_inv @ hinv, hm @ blk.k, blk.name))
    return Geometry(tuple(out), geo.v_transform)


@pytest.mark.parametrize("name", [n for n in attnlib.available() if attnlib.variant_info(n).exact])
def test_invariance_under_a_global_transform(name: str) -> None:
    """Scores and outputs are expressed in each query's frame: moving every token by one h changes nothing."""
    geo = mixed_geometry(2, 2, 4, seed=4)
    torch.manual_seed(0)
    attn = attnlib.Attention(40, 2, variant=name, **get_variant(name).conformance_kwargs()).double().eval()
    x = torch.randn(2, 8, 40, dtype=DT)
    y, ex = attn(x, geometry=geo, return_extras=True)
    y2, ex2 = attn(x, geometry=_moved(geo, torch.Generator().manual_seed(5)), return_extras=True)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-9)
    torch.testing.assert_close(ex2.weights, ex.weights, rtol=0, atol=1e-9)
    assert not torch.allclose(attn(x), y)  # the geometry does change the attention


def rope2d_reference(q, k, v, grid, f):
    """2-D RoPE: channel pair (2m, 2m+1) of q and k rotated by its angle; plain softmax attention."""
    blk = grid_so2(grid, f, dtype=DT)
    theta = torch.atan2(blk.q[0, :, :, 1, 0], blk.q[0, :, :, 0, 0])  # (N, 2F) angles

    def rot(x):
        x2 = x.unflatten(-1, (-1, 2))
        c, s = theta.cos(), theta.sin()
        return torch.stack([x2[..., 0] * c - x2[..., 1] * s, x2[..., 0] * s + x2[..., 1] * c], -1).flatten(-2)

    return softmax_attention(rot(q), rot(k), v, backend="math")


def test_so2_grid_without_value_transform_is_2d_rope() -> None:
    q, k, v = make_qkv(2, 2, 12, 8, dtype=DT, logit_scale=3.0, seed=6)
    geo = Geometry((grid_so2((3, 4), 2, dtype=DT),), v_transform=False)
    torch.testing.assert_close(pipeline(q, k, v, geo), rope2d_reference(q, k, v, (3, 4), 2), rtol=0, atol=ATOL)


def test_gta_errors_are_clear() -> None:
    attn = attnlib.Attention(16, 2).double()
    x = torch.randn(1, 12, 16, dtype=DT)
    with pytest.raises(ValueError, match="transforms 16 channels per head .* head size is 8"):
        attn(x, geometry=Geometry((grid_so2((3, 4), 4, dtype=DT),)))
    with pytest.raises(ValueError, match=r"block 'so2' q must be \(B\|1=1, 12, c, s, s\)"):
        attn(x, geometry=Geometry((grid_so2((3, 3), 1, dtype=DT),)))
    with pytest.raises(ValueError, match="must be an attnlib.functional.gta.Geometry"):
        attn(x, geometry="so2")
    with pytest.raises(ValueError, match=r"poses must be \(B, V, 3, 3\)"):
        pose_blocks(torch.eye(5)[None, None], 1, 1)
    causal = attnlib.Attention(16, 2, causal=True).double()
    with pytest.raises(attnlib.UnsupportedError, match="geometry= .* not supported with incremental decoding"):
        causal(x[:, :1], cache=causal.init_cache(1), geometry=identity_geometry(1, 1, 8))


def test_cross_attention_uses_the_keys_elements() -> None:
    """Queries from one view, keys from two: equals the dense definition with separate elements."""
    gen = torch.Generator().manual_seed(7)
    qp, kp = random_pose(1, 1, 3, gen), random_pose(1, 2, 3, gen)
    blk = pose_blocks(qp, 3, 1, key_poses=kp)
    geo = Geometry((blk,))
    q, k, v = make_qkv(1, 2, 3, 6, m=6, dtype=DT, seed=8)
    torch.testing.assert_close(pipeline(q, k, v, geo), gta_reference(q, k, v, geo), rtol=0, atol=ATOL)
