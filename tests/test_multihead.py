"""attnlib.MultiheadAttention against torch.nn.MultiheadAttention: outputs, weights, masks, state_dict, layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnlib
from attnlib import UnsupportedError

E, H, L, S, B = 16, 4, 6, 7, 3
TOL = 1e-6


def _pair(seed: int = 0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw)
    ours = attnlib.MultiheadAttention(E, H, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _inputs(batch_first: bool, n: int = L, m: int = S, kdim: int = E, vdim: int = E, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda t: (B, t)) if batch_first else (lambda t: (t, B))
    q = torch.randn(*shape(n), E, generator=g)
    k = torch.randn(*shape(m), kdim, generator=g)
    v = torch.randn(*shape(m), vdim, generator=g)
    return q, k, v


def _close(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()


def _padding(m: int = S) -> torch.Tensor:
    kp = torch.zeros(B, m, dtype=torch.bool)
    kp[0, -3:] = True
    kp[2, -1:] = True
    return kp


MASK_CASES = {
    "none": lambda n, m: {},
    "padding": lambda n, m: {"key_padding_mask": _padding(m)},
    "float_padding": lambda n, m: {
        "key_padding_mask": torch.zeros(B, m).masked_fill(_padding(m), float("-inf")),
        "attn_mask": torch.zeros(n, m),
    },
    "bool_2d": lambda n, m: {"attn_mask": torch.rand(n, m, generator=torch.Generator().manual_seed(3)) < 0.3},
    "additive_2d": lambda n, m: {"attn_mask": torch.randn(n, m, generator=torch.Generator().manual_seed(4))},
    "additive_inf_3d": lambda n, m: {
        "attn_mask": torch.randn(B * H, n, m, generator=torch.Generator().manual_seed(5)).masked_fill(
            torch.rand(B * H, n, m, generator=torch.Generator().manual_seed(6)) < 0.3, float("-inf")
        )
    },
    "bool_3d_and_padding": lambda n, m: {
        "attn_mask": torch.rand(B * H, n, m, generator=torch.Generator().manual_seed(7)) < 0.2,
        "key_padding_mask": _padding(m),
    },
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
@pytest.mark.parametrize("average", [True, False])
def test_softmax_equals_nn_multihead_attention(batch_first, case, average):
    ref, ours = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first)
    kw = MASK_CASES[case](L, S)
    out_r, w_r = ref(q, k, v, average_attn_weights=average, **kw)
    out_o, w_o = ours(q, k, v, average_attn_weights=average, **kw)
    _close(out_o, out_r)
    _close(w_o, w_r)
    out_o2, w_o2 = ours(q, k, v, need_weights=False, **kw)
    assert w_o2 is None
    _close(out_o2, out_r)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_self_attention(with_mask):
    ref, ours = _pair(batch_first=True)
    x = _inputs(True, n=L, m=L)[0]
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    kw = {"attn_mask": causal, "is_causal": True} if with_mask else {"attn_mask": causal}
    out_r, w_r = ref(x, x, x, key_padding_mask=_padding(L), **kw)
    out_o, w_o = ours(x, x, x, key_padding_mask=_padding(L), **kw)
    _close(out_o, out_r)
    _close(w_o, w_r)


def test_unbatched_and_kdim_vdim():
    ref, ours = _pair(kdim=5, vdim=3)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert "q_proj_weight" in ours.state_dict() and ours.in_proj_weight is None
    q, k, v = _inputs(False, kdim=5, vdim=3)
    _close(ours(q, k, v)[0], ref(q, k, v)[0])
    out_r, w_r = ref(q[:, 0], k[:, 0], v[:, 0], key_padding_mask=_padding()[0])
    out_o, w_o = ours(q[:, 0], k[:, 0], v[:, 0], key_padding_mask=_padding()[0])
    _close(out_o, out_r)
    _close(w_o, w_r)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    torch.manual_seed(0)
    ours = attnlib.MultiheadAttention(E, H, bias=bias)
    ref = nn.MultiheadAttention(E, H, bias=bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # ours -> torch
    q, k, v = _inputs(False)
    _close(ours.eval()(q, k, v)[0], ref.eval()(q, k, v)[0])


def test_encoder_and_decoder_layers_train_and_eval():
    torch.manual_seed(0)
    enc_ref = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    enc = copy.deepcopy(enc_ref)
    enc.self_attn = attnlib.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    enc.self_attn.load_state_dict(enc_ref.self_attn.state_dict())
    dec_ref = nn.TransformerDecoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    dec = copy.deepcopy(dec_ref)
    dec.self_attn = attnlib.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    dec.multihead_attn = attnlib.MultiheadAttention(E, H, dropout=0.1, batch_first=True)
    dec.load_state_dict(dec_ref.state_dict())
    src, tgt = _inputs(True, n=S, m=L)[:2]
    kp = _padding(S)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for mode in ("eval", "train"):
        for m in (enc_ref, enc, dec_ref, dec):
            getattr(m, mode)()
        mem = enc(src, src_key_padding_mask=kp)
        y = dec(tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kp)
        y.sum().backward()
        assert enc.self_attn.in_proj_weight.grad is not None
        if mode == "eval":  # torch's fused fast path is skipped for ours; the result is the same
            mem_r = enc_ref(src, src_key_padding_mask=kp)
            real = ~kp[:, :, None]
            assert torch.allclose(mem * real, mem_r * real, atol=1e-5)
            y_r = dec_ref(tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kp)
            assert torch.allclose(y, y_r, atol=1e-5)


def test_encoder_stack_with_another_variant():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True)
    layer.self_attn = attnlib.MultiheadAttention(E, H, "linear", batch_first=True)
    with pytest.warns(UserWarning, match="_qkv_same_embed_dim"):
        stack = nn.TransformerEncoder(layer, 2)
    x = torch.randn(B, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    y = stack.eval()(x, mask=causal, is_causal=True)
    # no future leak: changing the last token leaves earlier rows alone
    x2 = x.clone()
    x2[:, -1] += 5.0
    assert torch.allclose(stack(x2, mask=causal, is_causal=True)[:, :-1], y[:, :-1], atol=1e-6)
    assert not torch.allclose(stack(x2, mask=causal, is_causal=True)[:, -1], y[:, -1])


def test_unsupported_masks_and_weights_raise():
    mha = attnlib.MultiheadAttention(E, H, "linear")
    q = _inputs(False, n=L, m=L)[0]
    with pytest.raises(UnsupportedError, match="full"):
        mha(q, q, q, attn_mask=torch.rand(L, L) < 0.5, need_weights=False)
    with pytest.raises(UnsupportedError, match="additive"):
        mha(q, q, q, attn_mask=torch.randn(L, L), need_weights=False)
    aft = attnlib.MultiheadAttention(E, H, "aft_simple")
    with pytest.raises(UnsupportedError, match="need_weights=False"):
        aft(q, q, q)
    assert aft(q, q, q, need_weights=False)[0].shape == q.shape
    with pytest.raises(UnsupportedError, match="add_bias_kv"):
        attnlib.MultiheadAttention(E, H, add_bias_kv=True)


def test_bad_shapes_raise_value_error():
    mha = attnlib.MultiheadAttention(E, H)
    q, k, v = _inputs(False)
    with pytest.raises(ValueError, match="attn_mask must be"):
        mha(q, k, v, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        mha(q, k, v, key_padding_mask=torch.zeros(B, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must be"):
        mha(q, k[..., :3], v)
    with pytest.raises(ValueError, match="divisible"):
        attnlib.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="keyword-only"):
        attnlib.MultiheadAttention(E, H, 0.1)
