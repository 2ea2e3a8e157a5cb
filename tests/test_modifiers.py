"""Attention modifiers against their defining equations, computed the slow way in float64.

score_mod on every code path (SDPA bias, FlexAttention, chunked explicit, block-sparse kernel,
local), ALiBi, UltraViCo, relaxed attention, attention entropy and the registry.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.functional import softmax_attention
from attnlib.functional.modifiers import (
    ScoreMod,
    alibi_score_mod,
    alibi_slopes,
    attention_entropy,
    masked_value_mean,
    ultravico_score_mod,
)
from attnlib.kernels import block_sparse_attention
from attnlib.masks import BlockMask, KeyPadding, normalize_mask
from attnlib.modifiers import ALiBi, Relaxed, UltraViCo, available, build_modifier, get_modifier
from attnlib.testing import make_qkv

B, H, N, D = 2, 2, 12, 8


def loop_attention(q, k, v, allowed, edit):
    """softmax over allowed keys of edit(b, h, i, j, s_ij), written as explicit loops (float64)."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    b_, h_, n, _ = q.shape
    m = k.shape[2]
    out = torch.zeros(b_, h_, n, v.shape[-1], dtype=torch.float64)
    w = torch.zeros(b_, h_, n, m, dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                logits = {}
                for j in range(m):
                    if allowed is None or bool(
                        allowed[b if allowed.shape[0] > 1 else 0, h if allowed.shape[1] > 1 else 0, i, j]
                    ):
                        logits[j] = edit(b, h, i, j, float(q[b, h, i] @ k[b, h, j]) * scale)
                if not logits:
                    continue
                mx = max(logits.values())
                z = sum(math.exp(x - mx) for x in logits.values())
                for j, x in logits.items():
                    w[b, h, i, j] = math.exp(x - mx) / z
                out[b, h, i] = w[b, h, i] @ v[b, h]
    return out, w


def causal_pad(n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(B, m, generator=g) > 0.3
    kp[:, 0] = True
    causal = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    return (kp[:, None, None, :] & causal).expand(B, 1, n, m)


# ------------------------------------------------------------------------------------------
# score_mod on every path
# ------------------------------------------------------------------------------------------


def test_alibi_slopes_follow_the_paper() -> None:
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    s12 = alibi_slopes(12)  # 8 geometric + every other slope of the 16-head sequence
    assert s12[:8] == pytest.approx(alibi_slopes(8))
    assert s12[8:] == pytest.approx([2.0 ** -(0.5 + i) for i in range(4)])
    assert alibi_slopes(1) == [2.0**-8]


@pytest.mark.parametrize("backend", ["math", "auto", "chunked", "sdpa", "flex"])
def test_alibi_equals_its_equation(backend: str) -> None:
    q, k, v = make_qkv(B, H, N, D, logit_scale=4.0, dtype=torch.float64, seed=1)
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float64)
    allowed = causal_pad(N, N)
    ref, _ = loop_attention(q, k, v, allowed, lambda b, h, i, j, s: s - float(slopes[h]) * abs(i - j))
    out = softmax_attention(
        q, k, v, mask=allowed, backend=backend, score_mod=alibi_score_mod(slopes), compile_flex=False
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_flex_compiled_runs_a_score_mod() -> None:
    """One compiled FlexAttention call (slow to compile on CPU: one small case only)."""
    q, k, v = make_qkv(1, 2, 32, 16, logit_scale=2.0, seed=2)
    sm = ultravico_score_mod(0.5, 5)
    ref, _ = loop_attention(q, k, v, None, lambda b, h, i, j, s: 0.5 * s if abs(i - j) > 5 and s > 0 else s)
    out = softmax_attention(q, k, v, backend="flex", score_mod=sm, causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_sdpa_refuses_a_score_dependent_mod() -> None:
    q, k, v = make_qkv(B, H, N, D)
    with pytest.raises(attnlib.UnsupportedError, match="additive"):
        softmax_attention(q, k, v, backend="sdpa", score_mod=ultravico_score_mod(0.5, 2))


def test_block_sparse_kernel_applies_the_score_mod_with_gradients() -> None:
    q, k, v = make_qkv(B, H, 19, D, logit_scale=4.0, dtype=torch.float64, seed=3)
    dense = torch.rand(1, H, 19, 19, generator=torch.Generator().manual_seed(3)) > 0.4
    bm = BlockMask.from_dense(dense, 4)
    sm = ultravico_score_mod(0.3, 4)
    ref, _ = loop_attention(q, k, v, dense, lambda b, h, i, j, s: 0.3 * s if abs(i - j) > 4 and s > 0 else s)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = block_sparse_attention(*leaves, bm, score_mod=sm)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    out.square().sum().backward()
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    softmax_attention(*leaves2, mask=dense, backend="math", score_mod=sm).square().sum().backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)
    with pytest.raises(attnlib.UnsupportedError, match="score_mod"):
        block_sparse_attention(q, k, v, bm, score_mod=sm, backend="triton")


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    causal=st.booleans(),
    scale=st.sampled_from([0.5, 4.0, 16.0]),
    window=st.integers(0, 6),
    seed=st.integers(0, 99),
)
def test_score_mod_paths_agree(n: int, m: int, causal: bool, scale: float, window: int, seed: int) -> None:
    """The chunked explicit path, SDPA (additive bias) and the block-sparse kernel equal the math path."""
    if causal and n > m:
        n = m
    q, k, v = make_qkv(B, H, n, D, m=m, logit_scale=scale, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(B, m, generator=g) > 0.3
    am = normalize_mask(KeyPadding(kp), causal=causal, batch=B, heads=H, n=n, m=m, device=torch.device("cpu"))
    for sm in (alibi_score_mod(torch.tensor([0.25, 1.0], dtype=torch.float64)), ultravico_score_mod(0.5, window)):
        ref = softmax_attention(q, k, v, mask=am, backend="math", score_mod=sm)
        for backend in ("chunked", "auto"):
            out = softmax_attention(q, k, v, mask=am, backend=backend, score_mod=sm)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        bm = am.as_block_mask(4)
        if bm is not None:
            torch.testing.assert_close(block_sparse_attention(q, k, v, bm, score_mod=sm), ref, rtol=0, atol=1e-10)


def test_alibi_decoding_with_a_kv_cache_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, causal=True, modifiers=["alibi"]).double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = attn(x)
    cache = attn.init_cache(2)
    steps = [attn(x[:, :4], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-12)


def test_local_variant_takes_a_score_mod() -> None:
    torch.manual_seed(0)
    a = attnlib.Attention(16, 2, variant="local", window=3, modifiers=["alibi"]).double().eval()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    y, ex = a(x, return_extras=True)
    q, k, v = a.project(x)
    band = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs() <= 3
    slopes = a.modifiers.mods[0].slopes
    ref, w = loop_attention(q, k, v, band[None, None], lambda b, h, i, j, s: s - float(slopes[h]) * abs(i - j))
    torch.testing.assert_close(ex.weights, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(y, a._project_out(ref), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# UltraViCo
# ------------------------------------------------------------------------------------------


def _ultra(alpha: float, window: int, **kw) -> attnlib.Attention:
    torch.manual_seed(0)
    mod = UltraViCo(window=window, alpha=alpha, when="always", **kw)
    return attnlib.Attention(16, 2, modifiers=[mod]).double().eval()


def test_ultravico_equals_its_equation_with_bands_and_exempt_tokens() -> None:
    q, k, v = make_qkv(B, H, 16, D, logit_scale=4.0, dtype=torch.float64, seed=4)
    sm = ultravico_score_mod(0.8, 2, beta=0.3, bands=[(5, 6), (9, 9)], exempt_from=14)

    def edit(b, h, i, j, s):
        d = abs(i - j)
        f = 0.3 if (5 <= d <= 6 or d == 9) else 0.8 if d > 2 else 1.0
        if i >= 14 or j >= 14:
            f = 1.0
        return f * s if s > 0 else s

    ref, w = loop_attention(q, k, v, None, edit)
    out, w2 = softmax_attention(q, k, v, backend="math", return_weights=True, score_mod=sm)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(w2, w, rtol=0, atol=1e-12)


def test_ultravico_special_cases() -> None:
    x = torch.randn(2, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = _ultra(1.0, 0)
    ref = plain(x)
    torch.testing.assert_close(_ultra(1.0, 2)(x), ref, rtol=0, atol=0)  # alpha = 1: identical
    torch.testing.assert_close(_ultra(0.1, 11)(x), ref, rtol=0, atol=0)  # N <= W + 1: no pair is out of window
    assert not torch.allclose(_ultra(0.1, 2)(x), ref)
    # all scores negative (keys opposite the queries): nothing changes for any alpha
    q = torch.randn(1, 1, 8, D, dtype=torch.float64).abs()
    k = -q.flip(2)
    v = torch.randn(1, 1, 8, D, dtype=torch.float64)
    base = softmax_attention(q, k, v, backend="math")
    for alpha in (0.0, 0.5):
        torch.testing.assert_close(
            softmax_attention(q, k, v, backend="math", score_mod=ultravico_score_mod(alpha, 1)), base, rtol=0, atol=0
        )


def test_ultravico_out_of_window_mass_shrinks_with_alpha() -> None:
    q, k, v = make_qkv(1, 2, 24, D, logit_scale=4.0, dtype=torch.float64, seed=5)
    far = (torch.arange(24)[:, None] - torch.arange(24)[None, :]).abs() > 4
    masses = []
    for alpha in (1.0, 0.9, 0.5, 0.0):
        _, w = softmax_attention(q, k, v, backend="math", return_weights=True, score_mod=ultravico_score_mod(alpha, 4))
        masses.append((w * far).sum(-1))
    for a, b in itertools.pairwise(masses):
        assert bool((b <= a + 1e-12).all())
    # alpha = 0: positive far logits become 0 (weight exp(0)), they are not removed
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    expect = torch.softmax(torch.where(far & (s > 0), torch.zeros_like(s), s), -1)
    _, w0 = softmax_attention(q, k, v, backend="math", return_weights=True, score_mod=ultravico_score_mod(0.0, 4))
    torch.testing.assert_close(w0, expect, rtol=0, atol=1e-12)


def test_ultravico_is_inference_only_by_default() -> None:
    torch.manual_seed(0)
    a = attnlib.Attention(16, 2, modifiers=[{"name": "ultravico", "window": 1, "alpha": 0.2}]).double()
    torch.manual_seed(0)
    plain = attnlib.Attention(16, 2).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    torch.testing.assert_close(a.train()(x), plain.train()(x), rtol=0, atol=0)
    assert not torch.allclose(a.eval()(x), plain.eval()(x))


# ------------------------------------------------------------------------------------------
# relaxed attention
# ------------------------------------------------------------------------------------------


def _pair(**kw) -> tuple[attnlib.Attention, attnlib.Attention]:
    torch.manual_seed(0)
    plain = attnlib.Attention(16, 2, **kw).double().train()
    relaxed = attnlib.Attention(16, 2, **kw).double().train()
    relaxed.load_state_dict(plain.state_dict())
    return plain, relaxed


def test_relaxed_weights_and_output_follow_the_definition() -> None:
    plain, _ = _pair(causal=True)
    x = torch.randn(2, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kp = torch.ones(2, 10, dtype=torch.bool)
    kp[1, 6:] = False
    gamma = 0.3
    torch.manual_seed(0)
    relaxed = attnlib.Attention(16, 2, causal=True, modifiers=[Relaxed(gamma)]).double().train()
    relaxed.load_state_dict(plain.state_dict())
    y, ex = relaxed(x, key_padding_mask=kp, return_extras=True)
    _, ex0 = plain(x, key_padding_mask=kp, return_extras=True)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None] & kp[:, None, None, :]
    uniform = allowed.double() / allowed.sum(-1, keepdim=True)
    expect = (1 - gamma) * ex0.weights + gamma * uniform
    torch.testing.assert_close(ex.weights, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(ex.weights.sum(-1), torch.ones(2, 2, 10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool(
        (
            ex.weights[allowed.expand_as(ex.weights)]
            >= (gamma * uniform).expand_as(ex.weights)[allowed.expand_as(ex.weights)] - 1e-15
        ).all()
    )
    _, _, v = relaxed.project(x)
    torch.testing.assert_close(y, relaxed._project_out(ex.weights @ v), rtol=0, atol=1e-12)  # out == relaxed A @ V
    torch.testing.assert_close(ex.importance, ex.weights.mean((1, 2)), rtol=0, atol=1e-12)


def test_relaxed_special_cases() -> None:
    plain, relaxed = _pair()
    relaxed.modifiers = type(relaxed.modifiers).build([Relaxed(0.0)], variant="softmax", caps=relaxed.capabilities)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(relaxed(x), plain(x), rtol=0, atol=0)  # gamma = 0
    relaxed.modifiers = type(relaxed.modifiers).build([Relaxed(0.7)], variant="softmax", caps=relaxed.capabilities)
    torch.testing.assert_close(relaxed.eval()(x), plain.eval()(x), rtol=0, atol=0)  # eval: plain weights
    relaxed.modifiers = type(relaxed.modifiers).build([Relaxed(1.0)], variant="softmax", caps=relaxed.capabilities)
    _, _, v = relaxed.project(x)
    y = relaxed.train()(x)
    torch.testing.assert_close(
        y, relaxed._project_out(v.mean(2, keepdim=True).expand(-1, -1, 8, -1)), rtol=0, atol=1e-12
    )


def test_relaxed_padding_allowed_vs_all() -> None:
    torch.manual_seed(0)
    mods = {
        u: attnlib.Attention(16, 2, modifiers=[Relaxed(0.5, uniform_over=u)]).double().train()
        for u in ("allowed", "all")
    }
    mods["all"].load_state_dict(mods["allowed"].state_dict())
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    kp = torch.ones(2, 8, dtype=torch.bool)
    kp[:, 5:] = False
    x2 = x.clone()
    x2[:, 5:] = 1e6
    for u, a in mods.items():
        same = torch.allclose(a(x, key_padding_mask=kp)[:, :5], a(x2, key_padding_mask=kp)[:, :5], rtol=0, atol=1e-9)
        assert same == (u == "allowed"), u  # "all" leaks gamma / M onto the padded values
    with pytest.raises(ValueError, match="future keys"):
        attnlib.Attention(16, 2, causal=True, modifiers=[Relaxed(0.5, uniform_over="all")]).double().train()(x)


def test_relaxed_on_a_variant_without_softmax_and_on_cross_attention() -> None:
    torch.manual_seed(0)
    plain = attnlib.Attention(16, 2, variant="linear").double().train()
    relaxed = attnlib.Attention(16, 2, variant="linear", modifiers=[Relaxed(0.2, cross_gamma=0.6)]).double().train()
    relaxed.load_state_dict(plain.state_dict())
    x, c = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    for ctx, gamma in ((None, 0.2), (c, 0.6)):
        q, k, v = plain.project(x, ctx)
        core = plain.core(
            q,
            k,
            v,
            normalize_mask(None, causal=False, batch=2, heads=2, n=6, m=k.shape[2], device=x.device),
            cross=ctx is not None,
        )
        expect = plain._project_out((1 - gamma) * core.out + gamma * v.mean(2, keepdim=True))
        torch.testing.assert_close(relaxed(x, ctx), expect, rtol=0, atol=1e-12)


def test_masked_value_mean_paths() -> None:
    v = torch.randn(2, 1, 7, 3, dtype=torch.float64)  # one kv head serving two query heads
    for causal, mask in (
        (True, None),
        (False, KeyPadding(torch.rand(2, 7) > 0.4)),
        (True, torch.rand(2, 1, 5, 7) > 0.3),
    ):
        am = normalize_mask(mask, causal=causal, batch=2, heads=2, n=5, m=7, device=torch.device("cpu"))
        got = masked_value_mean(v, am, heads=2, chunk_size=2)
        allowed = am.dense().expand(2, 2, 5, 7)
        for b in range(2):
            for h in range(2):
                for i in range(5):
                    sel = v[b, 0][allowed[b, h, i]]
                    exp = sel.mean(0) if len(sel) else torch.zeros(3, dtype=torch.float64)
                    torch.testing.assert_close(got[b, h, i], exp, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# entropy, registry, errors
# ------------------------------------------------------------------------------------------


def test_attention_entropy_special_cases() -> None:
    uniform = torch.full((3, 5), 0.2, dtype=torch.float64)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), math.log(5), dtype=torch.float64))
    torch.testing.assert_close(
        attention_entropy(torch.eye(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64)
    )
    masked = torch.tensor([[0.5, 0.0, 0.5, 0.0]], dtype=torch.float64)  # two allowed keys
    torch.testing.assert_close(attention_entropy(masked), torch.tensor([math.log(2)], dtype=torch.float64))


def test_registry_and_specs() -> None:
    assert {"alibi", "relaxed", "score_mod", "sigma_reparam", "ultravico"} <= set(available())
    assert isinstance(build_modifier({"name": "relaxed", "gamma": 0.1}), Relaxed)
    assert isinstance(build_modifier("alibi"), ALiBi)
    mod = ALiBi()
    assert build_modifier(mod) is mod
    with pytest.raises(ValueError, match="did you mean 'relaxed'"):
        get_modifier("relaxd")
    with pytest.raises(ValueError, match="unknown option"):
        build_modifier({"name": "relaxed", "gamma": 0.1, "gama": 2})
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        Relaxed(1.5)
    with pytest.raises(ValueError, match="when must be one of"):
        Relaxed(0.1, when="sometimes")
    sm = ScoreMod(lambda s, b, h, i, j: s * 0.5, name="half")
    a = attnlib.Attention(16, 2, modifiers=[{"name": "score_mod", "fn": sm}])
    assert a(torch.randn(1, 4, 16)).shape == (1, 4, 16)
    dotted = build_modifier({"name": "score_mod", "fn": "attnlib.modifiers.score._tanh_cap"})
    assert dotted.score_mod() is not None


def test_variants_without_scores_refuse_score_modifiers() -> None:
    for name in ("linear", "tra"):
        with pytest.raises(
            attnlib.UnsupportedError, match=rf"modifier 'alibi' cannot be used with variant '{name}'.*softmax"
        ):
            attnlib.Attention(16, 2, variant=name, modifiers=["alibi"])
    attnlib.Attention(16, 2, variant="linear", modifiers=[Relaxed(0.1)])  # relaxed serves every variant
