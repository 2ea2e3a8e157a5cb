"""Registry-wide numerics: default dtype float64, grouped-query heads, value width != head dim.

* Under ``torch.set_default_dtype(torch.float64)`` every variant runs every path it claims
  (causal, key padding, cross-attention, extras, backward, grouped-query heads with rotary
  positions, incremental decoding) in float32 and float64 and returns the module's dtype: no
  tensor the library creates may follow the default dtype into a mixed-dtype product.
* Grouped-query attention equals the same module with every key/value head repeated
  explicitly (``repeat_interleave``: query head h reads key/value head h // G).
* A value width Dv != D changes nothing but the output width: the weights do not depend on
  Dv, the output is ``weights @ v``, and exact variants equal the float64 reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attnlib
from attnlib.decoding import decode_mode
from attnlib.functional import reference_attention
from attnlib.masks import normalize_mask
from attnlib.registry import get_variant
from attnlib.testing import assert_close, make_qkv

VARIANTS = attnlib.available()
B, H, N, M, DIM = 2, 4, 12, 7, 32


def caps(name: str) -> attnlib.Capabilities:
    return attnlib.variant_info(name)


def module(name: str, dtype: torch.dtype, **kw) -> attnlib.Attention:
    torch.manual_seed(0)
    return attnlib.Attention(DIM, H, variant=name, **{**get_variant(name).conformance_kwargs(), **kw}).to(dtype)


@pytest.fixture
def default_float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.usefixtures("default_float64")
@pytest.mark.parametrize("name", VARIANTS)
def test_every_path_under_default_dtype_float64(name: str) -> None:
    c = caps(name)
    kp = torch.ones(B, N, dtype=torch.bool)
    kp[0, 8:] = False
    for dtype in (torch.float32, torch.float64):
        for causal in (False, True) if c.causal else (False,):
            attn = module(name, dtype, causal=causal).eval()
            x = torch.randn(B, N, DIM, dtype=dtype)
            outs = [attn(x), attn(x, return_extras=True)[0]]
            if c.key_padding:
                outs.append(attn(x, key_padding_mask=kp))
            if c.cross and (not causal or c.causal_cross):
                outs.append(attn(x, torch.randn(B, M, DIM, dtype=dtype)))
            gqa = module(name, dtype, causal=causal, num_kv_heads=2, rope=True).eval()
            outs.append(gqa(x))
            if causal and decode_mode(c) is not None:  # with the options that decode (cosformer: max_len)
                dec = module(name, dtype, causal=True, **get_variant(name).decoding_kwargs()).eval()
                cache = dec.init_cache(B)
                outs += [dec(x[:, :5], cache=cache), dec(x[:, 5:6], cache=cache)]
            attn.train()
            y = attn(x)
            (y.square().mean() + attnlib.aux_loss(attn)).backward()
            outs.append(y)
            for i, out in enumerate(outs):
                assert out.dtype == dtype, f"{name} {dtype} causal={causal}: output {i} is {out.dtype}"
                assert torch.isfinite(out).all(), f"{name} {dtype} causal={causal}: output {i} not finite"


@pytest.mark.parametrize("name", VARIANTS)
def test_grouped_query_heads_equal_explicitly_repeated_heads(name: str) -> None:
    """num_kv_heads=2 == num_kv_heads=H with the k/v projections of head h taken from head h // 2."""
    c = caps(name)
    grouped = module(name, torch.float64, num_kv_heads=2, causal=c.causal).eval()
    full = module(name, torch.float64, num_kv_heads=H, causal=c.causal).eval()
    full.core.load_state_dict(grouped.core.state_dict())
    full.out_proj.load_state_dict(grouped.out_proj.state_dict())
    hd = DIM // H
    with torch.no_grad():
        w, b = grouped.in_proj.weight, grouped.in_proj.bias
        wq, wk, wv = w[:DIM], w[DIM : DIM + 2 * hd], w[DIM + 2 * hd :]
        bq, bk, bv = b[:DIM], b[DIM : DIM + 2 * hd], b[DIM + 2 * hd :]

        def rep(t: torch.Tensor) -> torch.Tensor:  # per kv head -> per query head, h reads h // G
            return t.reshape(2, hd, *t.shape[1:]).repeat_interleave(H // 2, 0).reshape(DIM, *t.shape[1:])

        full.in_proj.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        full.in_proj.bias.copy_(torch.cat([bq, rep(bk), rep(bv)]))
    x = torch.randn(B, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(grouped(x), full(x), atol=1e-10, name=f"{name} GQA vs repeated heads")


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).has_weights])
def test_value_width_other_than_head_dim(name: str) -> None:
    cls = get_variant(name)
    torch.manual_seed(0)
    core = cls(num_heads=2, head_dim=8, **cls.conformance_kwargs()).double().eval()
    q, k, v8 = make_qkv(B, 2, N, 8, dtype=torch.float64, logit_scale=4.0, seed=3)
    v5 = v8[..., :5]
    am = normalize_mask(None, causal=False, batch=B, heads=2, n=N, m=N, device=torch.device("cpu"))
    r8 = core(q, k, v8, am, need_weights=True)
    r5 = core(q, k, v5, am, need_weights=True)
    assert r5.out.shape == (B, 2, N, 5) and r5.weights is not None and r8.weights is not None
    assert_close(r5.weights, r8.weights, atol=1e-12, name=f"{name}: weights depend on Dv")
    assert_close(r5.out, r5.weights @ v5, atol=1e-9, name=f"{name}: out vs weights @ v")
    assert_close(core(q, k, v5, am).out, r5.out, atol=1e-9, name=f"{name}: fast path with Dv != D")
    if caps(name).exact:
        ref = reference_attention(q, k, v5, mask=[am, core.implied_mask(N, N)])
        assert_close(r5.out, ref, name=f"{name}: Dv != D vs float64 reference")
