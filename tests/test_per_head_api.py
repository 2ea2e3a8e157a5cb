"""The per-head entry points (attnlib.build_core, attnlib.functional.attention) and decoding on a
cache held elsewhere (attnlib.decoding.attend_new_queries)."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import UnsupportedError
from attnlib.decoding import attend_new_queries, kv_decode_exact
from attnlib.functional import reference_attention
from attnlib.masks import normalize_mask
from attnlib.testing import make_qkv


def _qkv(hkv=2, seed=0):
    return make_qkv(2, 4, 12, 8, h_kv=hkv, dtype=torch.float64, seed=seed)


def test_functional_attention_softmax_equals_reference_with_gqa_and_masks():
    q, k, v = _qkv()
    kp = torch.ones(2, 12, dtype=torch.bool)
    kp[0, 9:] = False
    out = attnlib.functional.attention(q, k, v, causal=True, key_padding_mask=kp)
    ref = reference_attention(q, k, v, causal=True, mask=attnlib.KeyPadding(kp))
    assert torch.allclose(out, ref, atol=1e-12)


def test_functional_attention_equals_the_module_core():
    q, k, v = _qkv(hkv=4)
    core = attnlib.build_core("linear", 4, 8).double()
    am = normalize_mask(None, causal=True, batch=2, heads=4, n=12, m=12, device=q.device)
    want = core(q, k, v, am).out
    got = attnlib.functional.attention(q, k, v, variant="linear", causal=True)
    assert torch.allclose(got, want, atol=1e-12)
    # grouped-query k/v are repeated for a variant without gqa support
    got_gqa = attnlib.functional.attention(q, k[:, ::2], v[:, ::2], variant="linear", causal=True)
    want_gqa = core(q, k[:, ::2].repeat_interleave(2, 1), v[:, ::2].repeat_interleave(2, 1), am).out
    assert torch.allclose(got_gqa, want_gqa, atol=1e-12)


def test_build_core_and_functional_attention_errors():
    with pytest.raises(ValueError, match="unknown option"):
        attnlib.build_core("linear", 4, 8, windw=3)
    with pytest.raises(ValueError, match="unknown attention variant"):
        attnlib.build_core("softmx", 4, 8)
    with pytest.raises(ValueError, match="num_heads"):
        attnlib.build_core("softmax", 0, 8)
    q, k, v = _qkv()
    with pytest.raises(UnsupportedError, match="dropout"):
        attnlib.functional.attention(q, k, v, variant="linear", dropout_p=0.1)
    with pytest.raises(UnsupportedError, match="full"):
        attnlib.functional.attention(q, k, v, variant="linear", mask=torch.rand(12, 12) < 0.5)


@pytest.mark.parametrize("variant", ["softmax", "linear", "flow", "local", "aft_simple"])
def test_attend_new_queries_equals_the_causal_forward(variant):
    kw = attnlib.registry.get_variant(variant).conformance_kwargs()
    core = attnlib.build_core(variant, 4, 8, **kw).double()
    q, k, v = make_qkv(2, 4, 12, 8, dtype=torch.float64, seed=3)
    kp = torch.ones(2, 12, dtype=torch.bool)
    kp[1, :3] = False  # left padding
    am = normalize_mask(None, causal=True, batch=2, heads=4, n=12, m=12, device=q.device, key_padding_mask=kp)
    full = core(q, k, v, am).out
    prefix = None if kv_decode_exact(core) else q[:, :, :9]
    res = attend_new_queries(core, q[:, :, 9:], k, v, key_padding_mask=kp, prefix_queries=prefix)
    assert torch.allclose(res.out, full[:, :, 9:], atol=1e-10)
    assert kv_decode_exact(core) == (variant == "softmax")
    if core.causal_reach() is not None:  # a window (local): the last keys suffice, without prefix queries
        res = attend_new_queries(core, q[:, :, 9:], k, v, key_padding_mask=kp)
        assert torch.allclose(res.out, full[:, :, 9:], atol=1e-10)
    elif not kv_decode_exact(core):
        with pytest.raises(UnsupportedError, match="prefix_queries"):
            attend_new_queries(core, q[:, :, 9:], k, v)
