"""sigmaReparam: the spectral-norm estimate, the reparametrisation's defining properties, and
its wiring (fused q/k/v slices, model option, initialisation, state_dict, autocast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import attnlib
from attnlib.functional.modifiers import spectral_power_step, spectral_sigma
from attnlib.models import DecoderLM, ViT
from attnlib.models.blocks import init_weights
from attnlib.modifiers import SpectralReparam, apply_sigma_reparam


def _linear(out: int = 12, inp: int = 7, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out).double()


def test_sigma_from_svd_is_the_spectral_norm() -> None:
    lin = _linear()
    p = SpectralReparam(lin.weight)
    true = torch.linalg.matrix_norm(lin.weight.detach(), 2)
    assert abs(float(p.sigmas(lin.weight.detach())[0]) - float(true)) < 1e-12


def test_power_iteration_converges_from_below() -> None:
    w = torch.randn(20, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    true = float(torch.linalg.matrix_norm(w, 2))
    u = torch.nn.functional.normalize(torch.randn(9, dtype=torch.float64), dim=0)
    prev = 0.0
    errs = []
    for _ in range(12):
        u = spectral_power_step(w, u)
        est = float(spectral_sigma(w, u))
        assert prev - 1e-12 <= est <= true + 1e-12
        errs.append(true - est)
        prev = est
    assert errs[-1] < 1e-3 * max(errs[0], 1e-300) or errs[-1] < 1e-12


def test_identity_at_init_scale_invariance_and_orthogonal_gradient() -> None:
    lin = _linear()
    x = torch.randn(5, 7, dtype=torch.float64)
    plain = lin(x)
    parametrize.register_parametrization(lin, "weight", SpectralReparam(lin.weight), unsafe=True)
    lin.eval()
    torch.testing.assert_close(lin(x), plain, rtol=0, atol=1e-12)  # gamma_init="sigma": W_hat = W
    w_hat = lin.weight.detach().clone()
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(3.7)
    torch.testing.assert_close(lin.weight, w_hat, rtol=0, atol=1e-12)  # invariant to the scale of W
    lin.zero_grad()
    lin(x).square().sum().backward()
    orig = lin.parametrizations.weight.original
    assert abs(float((orig.grad * orig).sum())) < 1e-9 * float(orig.grad.norm() * orig.norm())  # d/dc f(cW) = 0


@pytest.mark.parametrize("splits", [None, [5, 4, 3]])
def test_weight_and_gradients_equal_the_exact_spectral_formula(splits: list[int] | None) -> None:
    """After enough power steps from a random u: W_hat_s = gamma_s W_s / ||W_s||_2 (the exact spectral
    norm), and the gradients reaching W and gamma equal autograd through that exact formula."""
    lin = _linear()
    p = SpectralReparam(lin.weight, splits)
    parametrize.register_parametrization(lin, "weight", p, unsafe=True)
    orig = lin.parametrizations.weight.original
    with torch.no_grad():
        p.u.copy_(torch.nn.functional.normalize(torch.randn(p.u.shape, dtype=torch.float64), dim=1))
        p.gamma.copy_(torch.tensor([0.7, 1.9, 1.3][: p.gamma.numel()], dtype=torch.float64))
    lin.train()
    for _ in range(200):  # one power step per change of the weight
        with torch.no_grad():
            orig.mul_(1.0)
        _ = lin.weight
    w = orig.detach().clone().requires_grad_(True)
    g = p.gamma.detach().clone().requires_grad_(True)
    parts = w.split(splits or [12], 0)
    exact = torch.cat([gi * part / torch.linalg.matrix_norm(part, 2) for gi, part in zip(g, parts)], 0)
    lin.eval()  # no further power step: the same u for the value and the gradient
    torch.testing.assert_close(lin.weight, exact, rtol=0, atol=1e-10)
    x = torch.randn(6, 7, dtype=torch.float64)
    target = torch.randn(6, 12, dtype=torch.float64)
    (torch.nn.functional.linear(x, exact, lin.bias) - target).square().sum().backward()
    lin.zero_grad()
    (lin(x) - target).square().sum().backward()
    assert orig.grad is not None and p.gamma.grad is not None and float(p.gamma.grad.abs().min()) > 0
    torch.testing.assert_close(orig.grad, w.grad, rtol=0, atol=1e-8)  # sigma keeps its gradient v u^T
    torch.testing.assert_close(p.gamma.grad, g.grad, rtol=0, atol=1e-10)


def test_fused_qkv_has_one_sigma_per_slice() -> None:
    torch.manual_seed(0)
    a = attnlib.Attention(16, 4, num_kv_heads=2, modifiers=[{"name": "sigma_reparam", "gamma_init": "one"}]).double()
    w = a.in_proj.weight.detach()
    for part in w.split([16, 8, 8], 0):  # gamma = 1: every slice has spectral norm 1
        assert abs(float(torch.linalg.matrix_norm(part, 2)) - 1.0) < 1e-9
    assert abs(float(torch.linalg.matrix_norm(a.out_proj.weight.detach(), 2)) - 1.0) < 1e-9
    assert a.in_proj.parametrizations.weight[0].gamma.shape == (3,)


def test_u_updates_once_per_weight_change_in_training_only() -> None:
    lin = _linear()
    p = SpectralReparam(lin.weight)
    parametrize.register_parametrization(lin, "weight", p, unsafe=True)
    with torch.no_grad():
        p.u.copy_(torch.nn.functional.normalize(torch.randn_like(p.u), dim=1))
    u0 = p.u.clone()
    lin.eval()
    _ = lin.weight
    assert torch.equal(p.u, u0)  # eval: fixed
    lin.train()
    w1 = lin.weight
    u1 = p.u.clone()
    assert not torch.equal(u1, u0)
    torch.testing.assert_close(lin.weight, w1, rtol=0, atol=0)  # a second read in the same step agrees
    assert torch.equal(p.u, u1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin.weight.sum().backward()
    opt.step()
    _ = lin.weight
    assert not torch.equal(p.u, u1)  # after an optimizer step: one more power-iteration step


def test_state_dict_round_trip_and_init_through_the_parametrization() -> None:
    torch.manual_seed(0)
    a = ViT(attention={"variant": "softmax"}, sigma_reparam=True).eval()
    sd = a.state_dict()
    assert any(k.endswith("parametrizations.weight.0.u") for k in sd) and any(k.endswith(".gamma") for k in sd)
    torch.manual_seed(1)
    b = ViT(attention={"variant": "softmax"}, sigma_reparam=True).eval()
    b.load_state_dict(sd)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # init_weights reaches the original weight of a parametrised Linear (and re-derives u, gamma)
    lin = nn.Linear(6, 6)
    parametrize.register_parametrization(lin, "weight", SpectralReparam(lin.weight), unsafe=True)
    before = lin.parametrizations.weight.original.detach().clone()
    init_weights(lin)
    after = lin.parametrizations.weight.original.detach()
    assert not torch.equal(before, after) and float(after.abs().max()) <= 0.04 + 1e-6
    torch.testing.assert_close(lin.weight, after, rtol=1e-5, atol=1e-6)  # gamma = sigma(W) again: W_hat = W


def test_model_options_cover_every_linear() -> None:
    vit = ViT(attention={"variant": "softmax"}, sigma_reparam=True)
    for name, mod in vit.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            assert parametrize.is_parametrized(mod, "weight"), name
    lm = DecoderLM(attention={"variant": "softmax"}, vocab_size=11, dim=16, depth=1, num_heads=2, sigma_reparam=True)
    assert not parametrize.is_parametrized(lm.head, "weight")  # tied with the embedding
    assert lm.head.weight is lm.tok_emb.weight
    assert parametrize.is_parametrized(lm.blocks[0].mlp.fc1, "weight")
    assert lm.blocks[0].attn.in_proj.parametrizations.weight[0].splits == [16, 16, 16]
    apply_sigma_reparam(lm)  # idempotent
    assert len(lm.blocks[0].attn.in_proj.parametrizations.weight) == 1


def test_estimate_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    a = attnlib.Attention(16, 2, modifiers=["sigma_reparam"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(torch.randn(2, 5, 16))
    assert torch.isfinite(y).all()
    assert a.in_proj.parametrizations.weight[0].u.dtype == torch.float32


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="gamma_init"):
        attnlib.Attention(16, 2, modifiers=[{"name": "sigma_reparam", "gamma_init": "two"}])
    with pytest.raises(ValueError, match="when must be 'always'"):
        attnlib.Attention(16, 2, modifiers=[{"name": "sigma_reparam", "when": "train"}])
    with pytest.raises(ValueError, match="splits"):
        SpectralReparam(torch.randn(6, 3), [2, 2])
