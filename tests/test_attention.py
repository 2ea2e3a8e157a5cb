"""The Attention module: projections, heads, GQA, rotary positions, extras, config building."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from omegaconf import OmegaConf

import attnlib
from attnlib.functional import reference_attention
from attnlib.masks import KeyPadding
from attnlib.positional import RotaryEmbedding
from attnlib.testing import assert_close


def _by_hand(attn: attnlib.Attention, x, context=None, mask=None, causal=False, positions=None):
    """Projections (+ head-major rotary positions) + float64 reference attention + output projection, written out."""
    w, b = attn.in_proj.weight.double(), attn.in_proj.bias.double()
    dq, dkv = attn.dim, attn.num_kv_heads * attn.head_dim
    src = x if context is None else context
    q = x.double() @ w[:dq].T + b[:dq]
    k = src.double() @ w[dq : dq + dkv].T + b[dq : dq + dkv]
    v = src.double() @ w[dq + dkv :].T + b[dq + dkv :]
    q = rearrange(q, "b n (h d) -> b h n d", h=attn.num_heads)
    k = rearrange(k, "b n (h d) -> b h n d", h=attn.num_kv_heads)
    v = rearrange(v, "b n (h d) -> b h n d", h=attn.num_kv_heads)
    if attn.rope is not None:
        q, k = attn.rope(q, 0, positions), attn.rope(k, 0, positions)
    o = reference_attention(q, k, v, mask=mask, causal=causal)
    o = rearrange(o, "b h n d -> b n (h d)")
    return o @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_module_equals_hand_written(kv_heads: int, causal: bool) -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, num_kv_heads=kv_heads, causal=causal).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    ctx = torch.randn(2, 6, 32, dtype=torch.float64)
    kp = torch.rand(2, 6) > 0.3
    assert_close(attn(x), _by_hand(attn, x, causal=causal))
    assert_close(attn(x, ctx, key_padding_mask=kp), _by_hand(attn, x, ctx, mask=KeyPadding(kp), causal=causal))


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_rotary_module_equals_hand_written(kv_heads: int) -> None:
    """The token-major q/k rotation inside the module == rotating head-major q and k in float64."""
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, num_kv_heads=kv_heads, rope=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.randint(0, 50, (2, 9))
    assert_close(attn(x), _by_hand(attn, x))
    assert_close(attn(x, positions=pos), _by_hand(attn, x, positions=pos))


def test_rotary_matches_complex_rotation() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    got = rope(x, offset=3)
    z = torch.complex(x[..., :4], x[..., 4:])
    inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.arange(3, 8, dtype=torch.float64)[:, None] * inv
    zr = z * torch.polar(torch.ones_like(ang), ang)
    assert_close(got, torch.cat([zr.real, zr.imag], -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_token_major_equals_head_major_bit_for_bit(dtype: torch.dtype) -> None:
    """rotate_tokens on (B, N, G, D) == forward on the (B, G, N, D) view: offsets, (B, N) and (N,) positions."""
    rope = RotaryEmbedding(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5 * 8, generator=g, dtype=torch.float64).to(dtype)[..., :32].unflatten(-1, (4, 8))
    head_major = x.transpose(1, 2)  # (B, G, N, D) view of the same numbers
    pos2 = torch.randint(0, 90, (3, 7), generator=g)
    pos1 = torch.randint(0, 90, (7,), generator=g)
    for offset, pos in ((0, None), (5, None), (0, pos2), (3, pos1)):
        got = rope.rotate_tokens(x, offset, pos)
        assert got.is_contiguous() and got.shape == x.shape
        assert torch.equal(got, rope(head_major, offset, pos).transpose(1, 2))
    packed = x.reshape(21, 4, 8)  # (T, G, D) with per-token positions, as forward_groups uses it
    assert torch.equal(
        rope.rotate_tokens(packed, 0, pos2.reshape(-1)), rope.rotate_tokens(x, 0, pos2).reshape(21, 4, 8)
    )
    with pytest.raises(ValueError, match="positions must be"):
        rope.rotate_tokens(x, 0, pos2[:, :5])
    with pytest.raises(ValueError, match=r"\(B, N\) with B=3"):
        rope.rotate_tokens(x, 0, pos2[:2])
    with pytest.raises(ValueError, match=r"must be \(N,\)"):  # packed (T, G, D) takes (T,) only
        rope.rotate_tokens(packed, 0, pos2.reshape(1, -1))
    with pytest.raises(ValueError, match="D=8"):
        rope.rotate_tokens(torch.randn(3, 7, 4, 6))


def test_rotary_positions_share_one_gather_and_equal_plain_positions() -> None:
    """A RotaryPositions object gives the plain-tensor result, gathers its tables once, and is a frozen copy."""
    from attnlib.positional import RotaryPositions

    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, num_kv_heads=2, rope=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.randint(0, 50, (2, 9))
    shared = RotaryPositions(pos)
    assert torch.equal(attn(x, positions=shared), attn(x, positions=pos))
    tables = dict(shared._tables)
    assert len(tables) == 1
    attn(x, positions=shared)
    assert all(shared._tables[k] is v for k, v in tables.items())  # reused, not rebuilt
    pos += 7  # the object copied its positions: no stale tables
    assert torch.equal(attn(x, positions=shared), attn(x, positions=pos - 7))
    packed = RotaryPositions(pos.reshape(-1))
    y = attn.forward_groups(x.reshape(18, 32), [(2, 9)], positions=packed)
    torch.testing.assert_close(y, attn(x, positions=pos).reshape(18, 32), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="integer tensor"):
        RotaryPositions(pos.double())
    with pytest.raises(ValueError, match="must be >= 0"):
        attn(x, positions=pos - 100)
    with pytest.raises(ValueError, match="rope=False"):  # positions would be silently ignored
        attnlib.Attention(32, 4).double()(x, positions=pos)
    with pytest.raises(ValueError, match="must be >= 0"):  # the head-major path too (it wrapped around)
        attn.rope(torch.randn(2, 4, 9, 8), 0, pos - 100)


def test_rotary_attention_depends_on_relative_positions_only() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, rope=True, causal=True).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    assert_close(attn(x, position_offset=0), attn(x, position_offset=1000))
    plain = attnlib.Attention(32, 4, causal=True).double()
    plain.load_state_dict(attn.state_dict())
    assert (plain(x) - attn(x)).abs().max() > 1e-3  # rope does change the output


def test_extras_importance_sums_to_one_per_row() -> None:
    attn = attnlib.Attention(32, 4).double()
    _y, ex = attn(torch.randn(3, 10, 32, dtype=torch.float64), return_extras=True, need_weights=False)
    assert ex.weights is None
    assert_close(ex.importance.sum(-1), torch.ones(3, dtype=torch.float64))


def test_build_attention_from_dict_and_dictconfig() -> None:
    a = attnlib.build_attention({"variant": "local", "window": 5}, dim=32, num_heads=4, causal=True)
    assert isinstance(a.core, attnlib.variants.dense.LocalAttention) and a.core.window == 5 and a.causal
    cfg = OmegaConf.create({"name": "softmax", "dim": 16, "num_heads": 2, "backend": "math"})
    b = attnlib.build_attention(cfg)
    assert b.variant == "softmax" and b.core.backend == "math"
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['num_heads'\]"):
        attnlib.build_attention({"dim": 8})
    with pytest.raises(ValueError, match="mapping"):
        attnlib.build_attention(["softmax"])


def test_aux_loss_sums_pending_and_clears() -> None:
    model = torch.nn.Sequential(attnlib.Attention(8, 2), attnlib.Attention(8, 2))
    assert attnlib.aux_loss(model).item() == 0.0
    model[0].pending_aux_loss = torch.tensor(1.5)
    model[1].pending_aux_loss = torch.tensor(2.0)
    assert attnlib.aux_loss(model, clear=False).item() == 3.5
    assert attnlib.aux_loss(model).item() == 3.5
    assert attnlib.aux_loss(model).item() == 0.0


def test_decoding_names_keep_their_old_import_paths() -> None:
    """AttentionCache and decode_mode live in attnlib.decoding; attnlib and attnlib.attention re-export them."""
    from attnlib import attention, decoding

    assert attnlib.AttentionCache is attention.AttentionCache is decoding.AttentionCache
    assert attention.decode_mode is decoding.decode_mode


def test_capabilities_are_frozen_and_listed() -> None:
    info = attnlib.variant_info("softmax")
    assert info.exact and info.causal and info.complexity == "O(N^2)"
    with pytest.raises(AttributeError):
        info.exact = False  # type: ignore[misc]
    assert attnlib.available() == sorted(attnlib.available())
    assert {"softmax", "local"} <= set(attnlib.available())


def test_register_variant_rejects_duplicates_and_missing_capabilities() -> None:
    from attnlib.variants.base import AttentionCore

    with pytest.raises(ValueError, match="already registered"):
        attnlib.register_variant("softmax")(type("X", (AttentionCore,), {"capabilities": attnlib.Capabilities()}))
    with pytest.raises(TypeError, match="capabilities"):
        attnlib.register_variant("zzz_test")(type("Y", (torch.nn.Module,), {}))
