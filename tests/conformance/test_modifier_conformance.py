"""Conformance of every modifier with every variant that can serve it (from the registries).

For each (modifier, variant) pair whose needs the variant's capabilities meet: identity
settings leave the module unchanged, gradients are finite and reach every parameter, causality
and key padding are kept; score modifiers on exact variants equal a float64 reference. Pairs the
variant cannot serve raise UnsupportedError naming both.
"""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.masks import KeyPadding, normalize_mask
from attnlib.modifiers import available as modifiers
from attnlib.modifiers import get_modifier
from attnlib.registry import get_variant
from attnlib.testing import assert_close, make_qkv

B, H, N, DIM = 2, 4, 16, 32
HEAD = DIM // H


def serves(mod: str, variant: str) -> bool:
    caps = attnlib.variant_info(variant)
    return all(getattr(caps, f) for f in get_modifier(mod).needs)


PAIRS = [(m, v) for m in modifiers() for v in attnlib.available() if serves(m, v)]


def module(variant: str, spec: dict | None, *, causal: bool = False, seed: int = 0) -> attnlib.Attention:
    torch.manual_seed(seed)
    kw = get_variant(variant).conformance_kwargs()
    mods = [] if spec is None else [spec]
    return attnlib.Attention(DIM, H, variant=variant, causal=causal, modifiers=mods, **kw).double().eval()


def spec(mod: str, kwargs: dict) -> dict:
    return {"name": mod, **kwargs}


def inputs(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("mod", "variant"), PAIRS)
def test_modifier_keeps_the_contract(mod: str, variant: str) -> None:
    cls = get_modifier(mod)
    caps = attnlib.variant_info(variant)
    on = spec(mod, cls.conformance_kwargs())
    x = inputs()
    ident = cls.identity_kwargs()
    if ident is not None:  # identity settings == unmodified
        torch.testing.assert_close(module(variant, spec(mod, ident))(x), module(variant, None)(x), rtol=0, atol=1e-12)
    # gradients finite and reaching every parameter (training mode)
    attn = module(variant, on, causal=caps.causal).train()
    xg = x.clone().requires_grad_(True)
    (attn(xg).square().mean() + attnlib.aux_loss(attn)).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    for pname, p in attn.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{mod}+{variant}: {pname}"
    if caps.causal:  # no future leak
        attn = module(variant, on, causal=True)
        y = attn(x)
        for t in (0, N // 2):
            x2 = x.clone()
            x2[:, t] += torch.randn_like(x2[:, t]) * 3
            torch.testing.assert_close(attn(x2)[:, :t], y[:, :t], rtol=0, atol=1e-10)
    if caps.key_padding:  # padded keys' inputs do not reach real queries
        attn = module(variant, on)
        kp = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) > 0.35
        kp[:, 0] = True
        y = attn(x, key_padding_mask=kp)
        x2 = x.clone()
        x2[~kp] = torch.randn_like(x2[~kp]) * 5
        torch.testing.assert_close(attn(x2, key_padding_mask=kp)[kp], y[kp], rtol=0, atol=1e-10)


SCORE_PAIRS = [(m, v) for m, v in PAIRS if "score_mod" in get_modifier(m).needs and attnlib.variant_info(v).exact]


@pytest.mark.parametrize(("mod", "variant"), SCORE_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
def test_score_modifier_on_an_exact_variant_equals_float64_reference(mod: str, variant: str, causal: bool) -> None:
    attn = module(variant, spec(mod, get_modifier(mod).conformance_kwargs()), causal=causal)
    core = attn.core
    q, k, v = make_qkv(B, H, N, HEAD, dtype=torch.float64, logit_scale=4.0, seed=7)
    kp = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) > 0.3
    am = normalize_mask(KeyPadding(kp), causal=causal, batch=B, heads=H, n=N, m=N, device=torch.device("cpu"))
    res = attn.modifiers.attend(core, q, k, v, am, training=False, need_weights=True, need_importance=True)
    fast = attn.modifiers.attend(core, q, k, v, am, training=False, need_importance=True)
    # reference: explicit float64 scores, the score mod on meshgrid indices, masked softmax
    fn = attn.modifiers.score_mod(False)
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * HEAD**-0.5
    bi, hi, ii, jj = torch.meshgrid(torch.arange(B), torch.arange(H), torch.arange(N), torch.arange(N), indexing="ij")
    s = fn(s, bi, hi, ii, jj)
    allowed = am.dense().expand(B, H, N, N)
    implied = core.implied_mask(N, N, "cpu")
    if implied is not None:
        allowed = (
            allowed
            & normalize_mask(implied, causal=False, batch=B, heads=H, n=N, m=N, device=torch.device("cpu")).dense()
        )
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    assert_close(res.weights, w, name=f"{mod}+{variant} weights")
    assert_close(res.out, w @ v, name=f"{mod}+{variant} out")
    assert_close(fast.out, w @ v, name=f"{mod}+{variant} fast out")
    assert_close(fast.importance, w.mean(2), name=f"{mod}+{variant} importance")


@pytest.mark.parametrize("mod", modifiers())
def test_variants_that_cannot_serve_a_modifier_refuse_it(mod: str) -> None:
    kwargs = get_modifier(mod).conformance_kwargs()
    for variant in attnlib.available():
        if serves(mod, variant):
            continue
        with pytest.raises(
            attnlib.UnsupportedError, match=rf"modifier '{mod}' cannot be used with variant '{variant}'"
        ):
            module(variant, spec(mod, kwargs))
