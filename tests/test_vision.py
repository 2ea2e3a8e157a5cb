"""Vision options of the ViT against their defining equations in float64: PEG (conditional positional
encodings), class-attention (CaiT / PatchConvNet), gated class-attention (GCAB), LIT's MLP-only blocks,
GTA positions, grid-aware variants, other image sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.functional.gating import (
    gate_gradient_factor,
    gate_linear,
    gate_regularizer,
    gate_scale,
    hat_embedding_grad,
)
from attnlib.functional.grid import infer_grid, peg
from attnlib.models import ViT
from attnlib.models.vision import PEG, ClassAttentionBlock, GatedClassAttention, MLPBlock

DT = torch.float64
SOFTMAX = {"variant": "softmax"}


def _vit(**kw) -> ViT:
    torch.manual_seed(0)
    kw.setdefault("attention", SOFTMAX)
    return ViT(dim=16, depth=2, num_heads=2, **kw).double().eval()


# -- PEG ------------------------------------------------------------------------------------------


def ref_peg(x, w, b, grid, prefix):
    """out = x_in + b_c + sum_{dy,dx} w_c[dy,dx] x_in[c, y+dy, x+dx] (0 outside the grid); prefix unchanged."""
    gh, gw = grid
    k = w.shape[-1]
    out = x.clone()
    for bi in range(x.shape[0]):
        for c in range(x.shape[2]):
            for y in range(gh):
                for xx in range(gw):
                    acc = float(b[c])
                    for dy in range(k):
                        for dx in range(k):
                            yy, xs = y + dy - k // 2, xx + dx - k // 2
                            if 0 <= yy < gh and 0 <= xs < gw:
                                acc += float(w[c, 0, dy, dx]) * float(x[bi, prefix + yy * gw + xs, c])
                    out[bi, prefix + y * gw + xx, c] += acc
    return out


@pytest.mark.parametrize(("grid", "prefix"), [((3, 3), 1), ((2, 5), 0)])
def test_peg_equals_the_per_pixel_sum(grid, prefix) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, prefix + grid[0] * grid[1], 3, generator=g, dtype=DT)
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=DT)
    b = torch.randn(3, generator=g, dtype=DT)
    torch.testing.assert_close(peg(x, w, b, grid, prefix), ref_peg(x, w, b, grid, prefix), rtol=0, atol=1e-12)


def test_peg_zero_conv_is_identity_and_runs_at_any_resolution() -> None:
    m = PEG(4).double()
    torch.nn.init.zeros_(m.proj.weight)
    for side in (14, 20):
        x = torch.randn(2, 1 + side * side, 4, dtype=DT)
        assert torch.equal(m(x, (side, side), 1), x)
    assert infer_grid(197, 1) == (14, 14)
    with pytest.raises(ValueError, match="pass grid="):
        infer_grid(17, 0)


def test_peg_is_translation_equivariant_inside_and_not_at_the_border() -> None:
    """Shifting the map by one pixel shifts the output, except next to the border: zero padding
    is what leaks absolute position."""
    torch.manual_seed(1)
    m = PEG(2).double()
    side = 8
    img = torch.zeros(1, 2, side, side, dtype=DT)
    img[:, :, 2:6, 2:6] = torch.randn(1, 2, 4, 4, dtype=DT)  # content away from the border
    img = img + 0.5  # a constant background, so the border is visible to the convolution

    def run(im):
        x = im.flatten(2).transpose(1, 2)
        return m(x, (side, side)).transpose(1, 2).reshape(1, 2, side, side)

    out, shifted = run(img), run(torch.roll(img, 1, dims=3))
    interior = (slice(None), slice(None), slice(1, side - 1), slice(2, side - 1))
    torch.testing.assert_close(shifted[interior], torch.roll(out, 1, dims=3)[interior], rtol=0, atol=1e-12)
    assert not torch.allclose(shifted[..., 0], torch.roll(out, 1, dims=3)[..., 0])  # the border column differs


def test_vit_peg_replaces_absolute_positions_and_takes_larger_images() -> None:
    m = _vit(pos="peg", dynamic_img_size=True)
    assert m.pos_embed is None and set(m.pos_emb_generator) == {"0"}
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    assert m(x).shape == (2, 10)
    assert m(torch.randn(2, 1, 16, 12, dtype=DT)).shape == (2, 10)
    # zero PEG kernels: the model is the position-free ViT
    torch.nn.init.zeros_(m.pos_emb_generator["0"].proj.weight)
    nopos = _vit(pos="none")
    nopos.load_state_dict({k: v for k, v in m.state_dict().items() if "pos_emb_generator" not in k})
    torch.testing.assert_close(m(x), nopos(x), rtol=0, atol=1e-12)


def test_learned_positions_at_other_sizes() -> None:
    m = _vit(dynamic_img_size=True)
    assert m.position_embedding((4, 4)) is m.pos_embed
    table = m.position_embedding((8, 6))
    assert table.shape == (1, 1 + 48, 16)
    torch.testing.assert_close(table[:, :1], m.pos_embed[:, :1])
    assert m(torch.randn(1, 1, 16, 12, dtype=DT)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"ViT expects images of shape \(B, 1, 8, 8\).*dynamic_img_size=True"):
        _vit()(torch.randn(1, 1, 16, 16, dtype=DT))


# -- class-attention ---------------------------------------------------------------------------------


def test_class_attention_is_the_class_row_of_self_attention() -> None:
    """CA(cls, patches) == row 0 of full self-attention on LN([cls; patches]) with the same weights."""
    torch.manual_seed(2)
    blk = ClassAttentionBlock(16, 2, SOFTMAX, init_values=0.3).double().eval()
    cls, patches = torch.randn(3, 1, 16, dtype=DT), torch.randn(3, 7, 16, dtype=DT)
    z = blk.norm1(torch.cat([cls, patches], 1))
    row = blk.attn(z)[:, :1]
    torch.testing.assert_close(blk.attn(blk.norm1(cls), z), row, rtol=0, atol=1e-12)
    x1 = cls + blk.gamma1 * row
    expected = x1 + blk.gamma2 * blk.mlp(blk.norm2(x1))
    torch.testing.assert_close(blk(cls, patches), expected, rtol=0, atol=1e-12)


def test_class_attention_keeps_its_map_for_visualisation() -> None:
    torch.manual_seed(7)
    blk = ClassAttentionBlock(16, 2, SOFTMAX).double().eval()
    blk.keep_weights = True
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    blk(torch.randn(3, 1, 16, dtype=DT), torch.randn(3, 7, 16, dtype=DT), mask)
    w = blk.last_weights
    assert w.shape == (3, 2, 1, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 1, dtype=DT))
    assert torch.equal(w[0, :, :, 6:], torch.zeros(2, 1, 2, dtype=DT))  # padded patches get no weight


def test_class_attention_with_no_patches_attends_only_to_itself() -> None:
    torch.manual_seed(3)
    blk = ClassAttentionBlock(8, 1, SOFTMAX).double().eval()
    cls = torch.randn(2, 1, 8, dtype=DT)
    a = blk.attn
    v = F.linear(blk.norm1(cls), a.in_proj.weight[16:], a.in_proj.bias[16:])
    expected_attn = a.out_proj(v)
    ctx, _ = blk.context(cls, cls[:, :0], None)
    torch.testing.assert_close(a(blk.norm1(cls), ctx), expected_attn, rtol=0, atol=1e-12)


def test_multiclass_tokens_attend_to_patches_only() -> None:
    torch.manual_seed(4)
    blk = ClassAttentionBlock(8, 2, SOFTMAX, include_cls=False).double().eval()
    cls, patches = torch.randn(2, 3, 8, dtype=DT), torch.randn(2, 5, 8, dtype=DT)
    out = blk(cls, patches)
    cls2 = cls.clone()
    cls2[:, 1:] += 3.0  # other class tokens change: token 0's output does not
    torch.testing.assert_close(blk(cls2, patches)[:, 0], out[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in attnlib.available() if attnlib.variant_info(n).cross])
def test_every_cross_attention_variant_serves_class_attention(name: str) -> None:
    from attnlib.registry import get_variant

    att = {"variant": name, **get_variant(name).conformance_kwargs()}
    m = _vit(pool="cait", class_attention={"attention": att}).float()
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_class_attention_needs_cross_attention_and_pool_options() -> None:
    with pytest.raises(attnlib.UnsupportedError, match="'coat'.*capabilities.cross=True"):
        _vit(attention={"variant": "coat"}, pool="cait")
    m = _vit(attention={"variant": "coat"}, pool="attn", class_attention={"attention": SOFTMAX})
    assert m.blocks[0].attn.core.num_prefix_tokens == 0  # no class token in the trunk
    assert _vit(attention={"variant": "coat"}).blocks[0].attn.core.num_prefix_tokens == 1
    assert m.class_attention["num_heads"] == 1 and m.class_attention["mlp_ratio"] == 3.0
    c = _vit(pool="cait")
    assert len(c.ca_blocks) == 2 and float(c.ca_blocks[0].gamma1[0].detach()) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="unknown option"):
        _vit(pool="cait", class_attention={"dpeth": 2})
    with pytest.raises(ValueError, match="class_attention options are for pool"):
        _vit(pool="cls", class_attention={"depth": 2})
    multi = _vit(pool="attn", class_attention={"multiclass": True})
    assert multi.features(torch.randn(2, 1, 8, 8, dtype=DT)).shape == (2, 10, 16)


# -- gated class-attention ------------------------------------------------------------------------------


def _gcab(**kw) -> GatedClassAttention:
    torch.manual_seed(5)
    return GatedClassAttention(8, 2, SOFTMAX, classes_per_task=[3, 3], mlp_ratio=2.0, **kw).double().eval()


def official_gated_ca(g: GatedClassAttention, t: int, patches: torch.Tensor) -> torch.Tensor:
    """The official order of gates: q = (W_q (x_cls g0)) g0, k = (W_k (z g0)) g0, v = W_v (z g0),
    (A v) g0, (W_o . + b_o) g0; MLP gated at input, hidden (after the activation) and output."""
    blk, a = g.block, g.block.attn
    g0, g2 = g.gates(t)
    cls = g.cls_tokens[t].expand(patches.shape[0], 1, -1)
    z = blk.norm1(torch.cat([cls, patches], 1))
    w, b = a.in_proj.weight, a.in_proj.bias
    q = F.linear(z[:, :1] * g0, w[:8], b[:8]) * g0
    k = F.linear(z * g0, w[8:16], b[8:16]) * g0
    v = F.linear(z * g0, w[16:], b[16:])
    heads = lambda t_: t_.unflatten(-1, (2, 4)).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, -1)
    o = (att @ heads(v)).transpose(1, 2).flatten(2) * g0
    x = cls + a.out_proj(o) * g0
    h = F.gelu(blk.mlp.fc1(blk.norm2(x) * g0)) * g2
    x = x + blk.mlp.fc2(h) * g0
    return g.heads[t](g.norm(x[:, 0]))


def test_gated_class_attention_equals_the_official_gating_order() -> None:
    g = _gcab()
    g.next_task()  # task 0 now binary, task 1 soft
    g.scale = 3.0
    patches = torch.randn(2, 5, 8, dtype=DT)
    out = g(patches)
    assert out.shape == (2, 6)
    expected = torch.cat([official_gated_ca(g, 0, patches), official_gated_ca(g, 1, patches)], -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_gates_one_is_plain_class_attention_and_gate_zero_silences_it() -> None:
    g = _gcab()
    patches = torch.randn(2, 5, 8, dtype=DT)
    with torch.no_grad():
        g.e0.fill_(6.0)
        g.e2.fill_(6.0)  # sigmoid(800 * 6) == 1 exactly
    cls = g.cls_tokens[0].expand(2, 1, -1)
    torch.testing.assert_close(g(patches), g.heads[0](g.norm(g.block(cls, patches)[:, 0])), rtol=0, atol=1e-12)
    with torch.no_grad():
        g.e0.fill_(-6.0)  # g0 == 0: attention and MLP outputs are exactly 0
    torch.testing.assert_close(g(patches), g.heads[0](g.norm(cls[:, 0])), rtol=0, atol=0)


def test_gating_math() -> None:
    assert gate_scale(0, 10, 800.0) == pytest.approx(1 / 800)
    assert gate_scale(10, 10, 800.0) == pytest.approx(800.0)
    g = [torch.tensor([0.2, 0.8, 0.5], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT)]
    zeros = [torch.zeros(3, dtype=DT), torch.zeros(2, dtype=DT)]
    ones = [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT)]
    assert float(gate_regularizer(g, zeros)) == pytest.approx(2.5 / 5)  # the mean gate value
    assert float(gate_regularizer(g, ones)) == 0.0  # every channel taken: 0/0 -> 0
    half = [torch.tensor([1.0, 0.0, 0.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)]
    assert float(gate_regularizer(g, half)) == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    w, b = torch.randn(4, 3, dtype=DT), torch.randn(4, dtype=DT)
    go, gi, x = torch.rand(4, dtype=DT), torch.rand(3, dtype=DT), torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(F.linear(x, *gate_linear(w, b, go, gi)), go * F.linear(gi * x, w, b), rtol=0, atol=1e-12)
    m_out, m_in = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    assert gate_gradient_factor(m_out, m_in).tolist() == (1 - m_out[:, None] * m_in[None]).tolist()
    e, grad = torch.tensor([0.5, -2.0], dtype=DT), torch.tensor([1.0, 1.0], dtype=DT)
    expected = (800 / 4) * (torch.cosh(torch.clamp(4 * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    torch.testing.assert_close(hat_embedding_grad(e, grad, 4.0, 800.0), expected)


def test_gradient_masking_freezes_what_earlier_tasks_took() -> None:
    g = _gcab().train()
    g.next_task()
    with torch.no_grad():
        g.taken0.fill_(1.0)  # every channel belongs to task 0
    g.scale = 10.0
    (g(torch.randn(2, 5, 8, dtype=DT)).square().sum() + g.regularizer()).backward()
    g.mask_gradients()
    a = g.block.attn
    assert torch.equal(a.in_proj.weight.grad, torch.zeros_like(a.in_proj.weight))
    assert torch.equal(a.out_proj.weight.grad, torch.zeros_like(a.out_proj.weight))
    assert g.cls_tokens.grad[0].abs().sum() == 0 and g.cls_tokens.grad[1].abs().sum() > 0
    assert all(p.grad.abs().sum() == 0 for p in g.heads[0].parameters())
    with pytest.raises(ValueError, match="all 2 tasks are already active"):
        g.next_task()


def test_vit_gated_pool_grows_with_the_tasks() -> None:
    m = _vit(pool="gated", class_attention={"num_tasks": 5})
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    assert m(x).shape == (2, 2)
    m.pool_head.next_task()
    assert m(x).shape == (2, 4)
    sd = m.state_dict()
    assert int(sd["pool_head.current_task"]) == 1
    with pytest.raises(ValueError, match="num_tasks must divide"):
        _vit(pool="gated", class_attention={"num_tasks": 3})


# -- LIT: MLP-only blocks ---------------------------------------------------------------------------------


def test_mlp_only_blocks_mix_no_tokens() -> None:
    torch.manual_seed(6)
    blk = MLPBlock(8, mlp_ratio=2.0).double()
    x = torch.randn(2, 9, 8, dtype=DT)
    p = torch.randperm(9)
    torch.testing.assert_close(blk(x[:, p]), blk(x)[:, p], rtol=0, atol=1e-14)
    x2 = x.clone()
    x2[:, 1:] += 1.0  # the other tokens change: token 0's output does not
    torch.testing.assert_close(blk(x2)[:, 0], blk(x)[:, 0], rtol=0, atol=0)
    m = _vit(mlp_only_blocks=1)
    assert isinstance(m.blocks[0], MLPBlock) and not hasattr(m.blocks[0], "attn")
    with pytest.raises(attnlib.UnsupportedError, match="MLP-only block"):
        _vit(mlp_only_blocks=1, pruning={"name": "topk", "keep_ratio": 0.5, "layers": [0]})


# -- GTA positions and pruning checks ------------------------------------------------------------------


def test_vit_gta_positions() -> None:
    m = _vit(pos="gta")
    assert m.pos_embed is None
    geo = m.geometry((4, 4), DT, torch.device("cpu"))
    assert geo.channels == 8 and geo.blocks[0].q.shape == (1, 17, 4, 2, 2)
    assert torch.equal(geo.blocks[0].q[0, 0], torch.eye(2, dtype=DT).expand(4, 2, 2))  # the class token
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    nopos = _vit(pos="none")
    nopos.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x), nopos(x))
    with pytest.raises(ValueError, match="4 \\* num_freqs <= head_dim"):
        _vit(pos="gta", pos_options={"num_freqs": 3})
    with pytest.raises(attnlib.UnsupportedError, match="pos='gta' with token pruning"):
        _vit(pos="gta", pruning={"name": "topk", "keep_ratio": 0.5, "layers": [0]})
    with pytest.raises(attnlib.UnsupportedError, match="PEG after block 1 needs the full patch grid"):
        _vit(pos="peg", pos_options={"layers": [1]}, pruning={"name": "topk", "keep_ratio": 0.5, "layers": [0]})
