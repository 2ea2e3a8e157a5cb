"""Conformance suite: every registered variant, checked against the contract.

Parametrised over ``attnlib.available()`` and driven by each variant's capabilities, so a
variant is tested the moment it is registered. Variant-specific constructor arguments for
these small inputs come from ``Core.conformance_kwargs()``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnlib
from attnlib.functional import reference_attention, softmax_attention
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow, normalize_mask
from attnlib.registry import get_variant
from attnlib.testing import assert_close, make_qkv, rel_error

VARIANTS = attnlib.available()
B, H, N, M, DIM = 2, 4, 16, 11, 32
HEAD = DIM // H


def caps(name: str) -> attnlib.Capabilities:
    return attnlib.variant_info(name)


def module(name: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> attnlib.Attention:
    torch.manual_seed(seed)
    kwargs = {**get_variant(name).conformance_kwargs(), **kw}
    return attnlib.Attention(DIM, H, variant=name, **kwargs).to(dtype).eval()


def core(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    c = get_variant(name)(num_heads=H, head_dim=HEAD, **get_variant(name).conformance_kwargs())
    return c.to(dtype).eval()


def inputs(n: int = N, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, DIM, generator=g, dtype=torch.float64).to(dtype)


def amask(mask=None, *, causal=False, n=N, m=N):
    return normalize_mask(mask, causal=causal, batch=B, heads=H, n=n, m=m, device=torch.device("cpu"))


def key_padding(m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(B, m, generator=g) > 0.35
    kp[:, 0] = True  # at least one real key per row
    return kp


def skip_unless(name: str, *fields: str) -> None:
    c = caps(name)
    missing = [f for f in fields if not getattr(c, f)]
    if missing:
        pytest.skip(f"{name} does not declare {', '.join(missing)}")


# ------------------------------------------------------------------------------------------
# shapes, dtypes, determinism
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    attn = module(name, dtype=dtype)
    y = attn(inputs(dtype=dtype))
    assert y.shape == (B, N, DIM)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_on_cpu_is_finite_and_close(name: str) -> None:
    attn = module(name, dtype=torch.float64, **get_variant(name).smooth_kwargs())
    x = inputs()
    ref = attn(x)
    y = copy.deepcopy(attn).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert rel_error(y, ref) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(name: str, dtype: torch.dtype) -> None:
    attn = module(name, dtype=torch.float64, **get_variant(name).smooth_kwargs())
    x = inputs()
    ref = attn(x)
    y = copy.deepcopy(attn).to("cuda", dtype)(x.to("cuda", dtype))
    assert torch.isfinite(y).all()
    assert rel_error(y.cpu(), ref) < 5e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_round_trip(name: str) -> None:
    a = module(name, seed=0)
    x = inputs()
    a(x)  # a forward may initialise lazily-learned state (e.g. hash functions)
    b = module(name, seed=123)
    b.load_state_dict(a.state_dict())
    b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------


def _exact_cases(name: str):
    c = caps(name)
    yield "none", None, False, N
    if c.causal:
        yield "causal", None, True, N
    if c.key_padding:
        yield "key_padding", KeyPadding(key_padding(N)), False, N
        if c.causal:
            yield "key_padding+causal", KeyPadding(key_padding(N)), True, N
    if c.full_mask:
        g = torch.Generator().manual_seed(3)
        yield "full", torch.rand(B, 1, N, N, generator=g) > 0.4, False, N
    if c.window:
        yield "window", SlidingWindow(2, 5), False, N
    if c.block_mask:
        g = torch.Generator().manual_seed(4)
        yield "block", BlockMask.from_dense(torch.rand(1, H, N, N, generator=g) > 0.5, 4), False, N
    if c.cross:
        yield "cross", None, False, M
        if c.key_padding:
            yield "cross+key_padding", KeyPadding(key_padding(M)), False, M
    if c.causal_cross:
        yield "causal_cross", None, True, M


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).exact])
def test_exact_core_equals_float64_reference(name: str) -> None:
    cr = core(name)
    for label, mask, causal, m in _exact_cases(name):
        q, k, v = make_qkv(B, H, N, HEAD, m=m, dtype=torch.float64, logit_scale=4.0, seed=7)
        am = amask(mask, causal=causal, m=m)
        res = cr(q, k, v, am, cross=m != N, need_weights=True, need_importance=True)
        ref, w = reference_attention(q, k, v, mask=[am, cr.implied_mask(N, m)], return_weights=True)
        assert_close(res.out, ref, name=f"{name}/{label} out")
        assert res.weights is not None, f"{name} declares has_weights but returned none"
        assert_close(res.weights, w, name=f"{name}/{label} weights")
        assert res.importance is not None
        assert_close(res.importance, w.mean(2), name=f"{name}/{label} importance")
        fast = cr(q, k, v, am, cross=m != N, need_importance=True)  # the fast path
        assert_close(fast.out, ref, name=f"{name}/{label} fast out")
        assert fast.importance is not None
        assert_close(fast.importance, w.mean(2), name=f"{name}/{label} fast importance")


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).exact])
def test_exact_fp32_within_flex_rule(name: str) -> None:
    """fp32 fast path error vs float64 <= 10x the error of plain fp32 eager attention."""
    cr = core(name, dtype=torch.float32)
    causal = caps(name).causal
    q, k, v = make_qkv(B, H, 64, HEAD, dtype=torch.float64, logit_scale=8.0, seed=2)
    golden = reference_attention(q, k, v, mask=[cr.implied_mask(64, 64)], causal=causal)
    qf, kf, vf = (t.float() for t in (q, k, v))
    eager = softmax_attention(qf, kf, vf, mask=[cr.implied_mask(64, 64)], causal=causal, backend="math")
    am = normalize_mask(None, causal=causal, batch=B, heads=H, n=64, m=64, device=torch.device("cpu"))
    assert_close(cr(qf, kf, vf, am).out, golden, eager, name=name)


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).has_weights])
def test_weights_explain_output(name: str) -> None:
    """``weights`` are the matrix the output averages v with: out == weights @ v."""
    cr = core(name)
    q, k, v = make_qkv(B, H, N, HEAD, dtype=torch.float64, logit_scale=2.0, seed=5)
    res = cr(q, k, v, amask(causal=caps(name).causal), need_weights=True, need_importance=True)
    assert res.weights is not None and res.weights.shape == (B, H, N, N)
    assert_close(res.out, res.weights @ v, name=f"{name} out vs weights @ v")
    if res.importance is not None:
        assert_close(res.importance, res.weights.mean(2), name=f"{name} importance vs weights")


# ------------------------------------------------------------------------------------------
# structural properties (all variants)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).causal])
def test_causal_no_future_leak(name: str) -> None:
    attn = module(name, causal=True)
    x = inputs()
    y = attn(x)
    for t in (0, N // 2, N - 1):
        x2 = x.clone()
        x2[:, t] += torch.randn_like(x2[:, t]) * 3
        y2 = attn(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-10)
        if t < N - 1:
            assert not torch.allclose(y2[:, t:], y[:, t:]), "perturbation had no effect at all"


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).key_padding])
def test_key_padding_honoured(name: str) -> None:
    """Changing the padded keys' inputs leaves every real query's output unchanged."""
    attn = module(name)
    c = caps(name)
    if c.cross:
        x, ctx = inputs(), inputs(M, seed=1)
        kp = key_padding(M)
        y = attn(x, ctx, key_padding_mask=kp)
        ctx2 = ctx.clone()
        ctx2[~kp] = torch.randn_like(ctx2[~kp]) * 5
        torch.testing.assert_close(attn(x, ctx2, key_padding_mask=kp), y, rtol=0, atol=1e-10)
    x = inputs()
    kp = key_padding(N)
    y = attn(x, key_padding_mask=kp)
    x2 = x.clone()
    x2[~kp] = torch.randn_like(x2[~kp]) * 5
    y2 = attn(x2, key_padding_mask=kp)
    torch.testing.assert_close(y2[kp], y[kp], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).key_padding])
def test_fully_masked_rows_are_zero(name: str) -> None:
    cr = core(name)
    q, k, v = make_qkv(B, H, N, HEAD, dtype=torch.float64, seed=9)
    kp = key_padding(N)
    kp[1] = False  # batch 1 may attend to nothing
    q.requires_grad_(True)
    res = cr(q, k, v, amask(KeyPadding(kp), causal=False), need_importance=True)
    assert torch.isfinite(res.out).all()
    assert torch.equal(res.out[1], torch.zeros_like(res.out[1]))
    assert torch.isfinite(res.out[0]).all() and res.out[0].abs().sum() > 0
    res.out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    if res.importance is not None:
        assert torch.equal(res.importance[1], torch.zeros_like(res.importance[1]))


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).full_mask])
def test_full_mask_empty_row_is_zero(name: str) -> None:
    cr = core(name)
    q, k, v = make_qkv(B, H, N, HEAD, dtype=torch.float64, seed=9)
    full = torch.ones(B, H, N, N, dtype=torch.bool)
    full[0, 1, 3] = False
    out = cr(q, k, v, amask(full)).out
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1, 3], torch.zeros_like(out[0, 1, 3]))


@pytest.mark.parametrize("name", VARIANTS)
def test_cross_attention(name: str) -> None:
    attn = module(name)
    x, ctx = inputs(), inputs(M, seed=1)
    if not caps(name).cross:
        with pytest.raises(attnlib.UnsupportedError, match=name):
            attn(x, ctx)
        return
    y = attn(x, ctx)
    assert y.shape == (B, N, DIM) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name: str) -> None:
    attn = module(name, dtype=torch.float64, causal=caps(name).causal).train()
    x = inputs().requires_grad_(True)
    y = attn(x)
    loss = y.square().mean() + attnlib.aux_loss(attn)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in attn.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


@pytest.mark.parametrize("name", VARIANTS)
def test_batch_order_invariance(name: str) -> None:
    attn = module(name)
    x = torch.cat([inputs(seed=s) for s in range(2)])  # B = 4
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(attn(x[perm]), attn(x)[perm], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).permutation_equivariant])
def test_token_permutation_equivariance(name: str) -> None:
    attn = module(name)
    x = inputs()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_large_logits_stay_finite(name: str, scale: float) -> None:
    cr = core(name, dtype=torch.float32).train()
    q, k, v = make_qkv(B, H, 64, HEAD, logit_scale=scale, seed=3)
    for causal in [False, True] if caps(name).causal else [False]:
        am = normalize_mask(None, causal=causal, batch=B, heads=H, n=64, m=64, device=torch.device("cpu"))
        res = cr(q, k, v, am, need_importance=True)
        assert torch.isfinite(res.out).all(), f"{name}: non-finite output at logit scale {scale}"
        if res.importance is not None:
            assert torch.isfinite(res.importance).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_extras_contract(name: str) -> None:
    attn = module(name)
    x = inputs()
    y, ex = attn(x, return_extras=True)
    torch.testing.assert_close(y, attn(x), rtol=0, atol=1e-12)
    c = caps(name)
    if c.has_weights:
        assert ex.weights is not None and ex.weights.shape == (B, H, N, N)
    else:
        assert ex.weights is None
    if ex.importance is not None:
        assert ex.importance.shape == (B, N)
        assert torch.isfinite(ex.importance).all()
    _, ex2 = attn(x, return_extras=True, need_weights=False)
    assert ex2.weights is None
    if ex.aux_loss is not None:
        assert ex.aux_loss.dim() == 0


@pytest.mark.parametrize("name", VARIANTS)
def test_weights_query_is_one_row_of_the_weights(name: str) -> None:
    """``weights_query=q`` reports row q of the full weights (B, H, 1, M) and the same output."""
    c = caps(name)
    attn = module(name, causal=c.causal)
    x = inputs()
    kp = key_padding(N) if c.key_padding else None
    if not c.has_weights:
        with pytest.raises(attnlib.UnsupportedError, match="has_weights=False"):
            attn(x, key_padding_mask=kp, return_extras=True, weights_query=0)
        return
    y, ex = attn(x, key_padding_mask=kp, return_extras=True, need_weights=True)
    assert ex.weights is not None
    for query in (0, 5, -1):
        y1, ex1 = attn(x, key_padding_mask=kp, return_extras=True, weights_query=query)
        assert ex1.weights is not None and ex1.weights.shape == (B, H, 1, N) and ex1.importance is None
        assert_close(ex1.weights, ex.weights[:, :, [query]], name=f"{name} row {query}")
        assert_close(y1, y, name=f"{name} output with weights_query")
    with pytest.raises(ValueError, match=r"weights_query must be an int in \[-16, 16\)"):
        attn(x, return_extras=True, weights_query=N)


@pytest.mark.parametrize("name", VARIANTS)
def test_grouped_query_and_rope(name: str) -> None:
    attn = module(name, num_kv_heads=2, rope=True, causal=caps(name).causal)
    y = attn(inputs())
    assert y.shape == (B, N, DIM) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_dropout_only_in_training(name: str) -> None:
    attn = module(name, dropout=0.5)
    x = inputs()
    torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)  # eval: deterministic
    attn.train()
    torch.manual_seed(0)
    y1 = attn(x)
    assert torch.isfinite(y1).all()
    assert not torch.allclose(y1, attn.eval()(x))


# ------------------------------------------------------------------------------------------
# unsupported requests raise
# ------------------------------------------------------------------------------------------


def _unsupported_requests(name: str):
    c = caps(name)
    if not c.key_padding:
        yield "key_padding", KeyPadding(key_padding(N)), False
    if not c.full_mask:
        yield "full_mask", torch.ones(B, 1, N, N, dtype=torch.bool), False
    if not c.window:
        yield "window", SlidingWindow(2, 2), False
    if not c.block_mask:
        yield "block_mask", BlockMask.from_dense(torch.ones(N, N, dtype=torch.bool), 4), False


@pytest.mark.parametrize("name", VARIANTS)
def test_unsupported_requests_raise(name: str) -> None:
    c = caps(name)
    if not c.causal:
        with pytest.raises(attnlib.UnsupportedError, match=name):
            module(name, causal=True)
    attn = module(name)
    for label, mask, _ in _unsupported_requests(name):
        with pytest.raises(attnlib.UnsupportedError, match=name):
            attn(inputs(), mask=mask)
        del label
    if c.causal and c.cross and not c.causal_cross:
        with pytest.raises(attnlib.UnsupportedError, match=name):
            module(name, causal=True)(inputs(), inputs(M, seed=1))
