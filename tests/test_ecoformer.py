"""EcoFormer: Hamming identity, linear = quadratic for both bias modes, hash learning and persistence."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.errors import UnsupportedError
from attnlib.functional import binarize, ecoformer_attention, kernelized_hash, learn_ksh_hash
from attnlib.functional.ecoformer import _supervision
from attnlib.masks import KeyPadding, normalize_mask
from attnlib.testing import make_qkv

ATOL = 1e-10


def _codes(b: int, h: int, n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(b, h, n, bits, generator=g) > 0.5, 1.0, -1.0).double()


def ref_eco(hq, hk, v, *, causal, kp, mode):
    """Quadratic form: consistent s_ij = b - Hamming(h_i, h_j); faithful (h_i·h_j + c δ_ij) / (h_i·Σh_j + c n)."""
    b = hq.shape[-1]
    n, m = hq.shape[2], hk.shape[2]
    allowed = torch.ones(1, 1, n, m, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, m, dtype=torch.bool).tril()
    if kp is not None:
        allowed = allowed & kp[:, None, None, :]
    hamming = (hq[..., :, None, :] != hk[..., None, :, :]).sum(-1).double()
    if mode == "consistent":
        s = (b - hamming) * allowed
        w = torch.nan_to_num(s / s.sum(-1, keepdim=True))
    else:
        dot = (hq @ hk.transpose(-1, -2)) * allowed
        c = b + 1
        count = allowed.sum(-1, keepdim=True)
        diag = torch.diag_embed(torch.diagonal(allowed.expand(hq.shape[0], 1, n, m), dim1=-2, dim2=-1).double())
        w = torch.nan_to_num((dot + c * diag) / (dot.sum(-1, keepdim=True) + c * count))
    return w @ v, w


def test_hamming_identity() -> None:
    h = _codes(1, 1, 30, 16, 0)[0, 0]
    hamming = (h[:, None, :] != h[None, :, :]).sum(-1).double()
    torch.testing.assert_close(h @ h.T, 16 - 2 * hamming, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["consistent", "faithful"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_time_equals_quadratic(mode: str, causal: bool, padded: bool) -> None:
    n = 29
    hq, hk = _codes(2, 3, n, 16, 1), _codes(2, 3, n, 16, 2)
    _, _, v = make_qkv(2, 3, n, 8, dtype=torch.float64, seed=3)
    kp = None
    if padded:
        kp = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.3
        kp[1, :3] = False
    out_ref, w_ref = ref_eco(hq, hk, v, causal=causal, kp=kp, mode=mode)
    km = None if kp is None else KeyPadding(kp)
    for c in (1, 8, 64):
        out, imp = ecoformer_attention(
            hq, hk, v, causal=causal, bias_mode=mode, mask=km, chunk_size=c, return_importance=True
        )
        torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(imp, w_ref.mean(-2), rtol=0, atol=ATOL)
    out_e, w = ecoformer_attention(hq, hk, v, causal=causal, bias_mode=mode, mask=km, return_weights=True)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out_e, w @ v, rtol=0, atol=ATOL)
    real_rows = w_ref.sum(-1) != 0
    if mode == "consistent":  # weights >= 0 summing to 1
        assert bool((w >= 0).all())
        torch.testing.assert_close(w.sum(-1)[real_rows], torch.ones_like(w.sum(-1)[real_rows]), rtol=0, atol=ATOL)
    else:  # the released code's weighting does not sum to 1 (spec §2b)
        assert float((w.sum(-1)[real_rows] - 1).abs().max()) > 0.1


@pytest.mark.parametrize("padded", [False, True])
def test_one_product_form_equals_quadratic_with_gradients(padded: bool) -> None:
    """The non-causal "consistent" form (numerator and denominator from one product with [v, 1])
    equals the Hamming weights the slow way, and so do its gradients; an example without keys gives
    0 with finite gradients."""
    n, m = 11, 13
    hq, hk = _codes(3, 2, n, 8, 5), _codes(3, 2, m, 8, 6)
    v = make_qkv(3, 2, m, 4, dtype=torch.float64, seed=7)[2].requires_grad_()
    kp = None
    if padded:
        kp = torch.rand(3, m, generator=torch.Generator().manual_seed(8)) > 0.4
        kp[2] = False  # no key at all
    out_ref, _ = ref_eco(hq, hk, v, causal=False, kp=kp, mode="consistent")
    out = ecoformer_attention(hq, hk, v, mask=None if kp is None else KeyPadding(kp))
    torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (got,) = torch.autograd.grad(out, v, g)
    (want,) = torch.autograd.grad(out_ref, v, g)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    if padded:
        assert bool((out[2] == 0).all()) and bool(got.isfinite().all())


@pytest.mark.parametrize("centred", [False, True])
def test_sample_hash_written_out_gradient_equals_autograd(centred: bool) -> None:
    """Codes with the sample bandwidth and a fixed hash (one autograd node, gradient written out) equal
    the composed path (an all-True padding mask takes it) bit for bit, and so do their straight-through
    gradients (float64; a zero token included)."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 3, 9, 5, dtype=torch.float64, generator=g) * 2).requires_grad_()
    with torch.no_grad():
        x[0, 1, 2] = 0.0
    anchors = torch.nn.functional.normalize(torch.randn(3, 7, 5, dtype=torch.float64, generator=g), dim=-1)
    proj = torch.randn(3, 6, 7, dtype=torch.float64, generator=g) * 3
    center = torch.randn(3, 7, dtype=torch.float64, generator=g) * 0.1 if centred else None
    fast = kernelized_hash(x, anchors, proj, center)
    slow = kernelized_hash(x, anchors, proj, center, valid=torch.ones(2, 9, dtype=torch.bool))
    assert torch.equal(fast, slow)
    assert fast.grad_fn is not None and slow.grad_fn is not None
    assert type(fast.grad_fn).__name__ != type(slow.grad_fn).__name__  # the two paths ran
    gr = torch.randn(fast.shape, dtype=torch.float64, generator=g)
    (got,) = torch.autograd.grad(fast, x, gr)
    (want,) = torch.autograd.grad(slow, x, gr)
    assert float((want != 0).double().mean()) > 0.5  # most gradients pass the straight-through window
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


def test_cross_attention_consistent_only() -> None:
    hq, hk = _codes(2, 3, 7, 8, 1), _codes(2, 3, 12, 8, 2)
    _, _, v = make_qkv(2, 3, 12, 4, dtype=torch.float64)
    out_ref, _ = ref_eco(hq, hk, v, causal=False, kp=None, mode="consistent")
    torch.testing.assert_close(ecoformer_attention(hq, hk, v), out_ref, rtol=0, atol=ATOL)
    with pytest.raises(UnsupportedError, match="N == M"):
        ecoformer_attention(hq, hk, v, bias_mode="faithful")
    attn = attnlib.Attention(32, 4, variant="ecoformer", bias_mode="faithful")
    with pytest.raises(UnsupportedError, match="self-attention"):
        attn(torch.randn(2, 5, 32), context=torch.randn(2, 7, 32))


def test_sign_and_straight_through_gradient() -> None:
    y = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    h = binarize(y)
    assert h.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]  # sign(0) = +1, never a zero bit
    h.sum().backward()
    assert y.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # gradient only where |y| < 1
    odd = binarize(torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")]))
    assert odd[[0, 2, 3]].tolist() == [1.0, 1.0, -1.0] and bool(odd[1].isnan())  # NaN stays NaN


def test_causal_codes_ignore_future_tokens() -> None:
    """The bandwidth is a prefix mean under causal=True: a token's code never depends on later tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64)
    anchors = torch.nn.functional.normalize(torch.randn(3, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    proj = torch.randn(3, 16, 6, generator=g, dtype=torch.float64)
    h = kernelized_hash(x, anchors, proj, causal=True)
    x2 = x.clone()
    x2[:, :, 12:] = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * 5
    assert torch.equal(kernelized_hash(x2, anchors, proj, causal=True)[:, :, :12], h[:, :, :12])
    h_nc = kernelized_hash(x, anchors, proj)  # per-sample bandwidth (official): depends on all tokens
    assert not torch.equal(kernelized_hash(x2, anchors, proj)[:, :, :12], h_nc[:, :, :12])


def _agreement(h_q, h_k, s0):
    """Fraction of labelled pairs whose code affinity sign matches the supervision."""
    sim = torch.sign(h_q @ h_k.transpose(-1, -2))
    lab = s0 != 0
    return float((sim[lab] == s0[lab]).double().mean())


def test_ksh_learning_accepts_only_improvements_and_fits_the_supervision() -> None:
    q, k, _ = make_qkv(2, 2, 48, 8, dtype=torch.float64, logit_scale=2.0, seed=7)
    proj0 = torch.randn(2, 12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = learn_ksh_hash(
        q, k, proj0, num_anchors=10, topk=5, lr=0.05, iters=60, generator=torch.Generator().manual_seed(2)
    )
    assert bool((res["loss_after"] <= res["loss_before"]).all())  # a bit is kept only if it improved
    assert bool((res["loss_after"] < res["loss_before"]).any())
    s0 = _supervision(q, k, None, 5)

    def codes(p):
        return (
            kernelized_hash(q, res["anchors"], p, res["center"]),
            kernelized_hash(k, res["anchors"], p, res["center"]),
        )

    learned = _agreement(*codes(res["projection"]), s0)
    random = _agreement(*codes(proj0), s0)
    assert learned > random + 0.02, (learned, random)
    # official defaults (lr 5e-4) also never accept a worse bit
    res2 = learn_ksh_hash(q, k, proj0, num_anchors=10, topk=5, iters=5, generator=torch.Generator().manual_seed(2))
    assert bool((res2["loss_after"] <= res2["loss_before"]).all())


def test_hash_is_learned_once_and_survives_state_dict() -> None:
    def make(seed: int) -> attnlib.Attention:
        torch.manual_seed(seed)
        return attnlib.Attention(32, 4, variant="ecoformer", num_bits=8, num_anchors=6, topk=3, ksh_iters=5)

    a = make(0)
    x = torch.randn(2, 24, 32)
    assert not bool(a.core.hash_learned)
    a.eval()(x)
    assert not bool(a.core.hash_learned)  # eval never learns
    before = a.core.anchors.clone()
    a.train()(x)
    assert bool(a.core.hash_learned) and not torch.equal(a.core.anchors, before)
    learned = {n: b.clone() for n, b in a.core.named_buffers()}
    a(torch.randn(2, 24, 32))  # a second training batch does not re-learn
    for n, b in a.core.named_buffers():
        assert torch.equal(b, learned[n]), n
    sd = a.state_dict()
    assert {"core.anchors", "core.center", "core.hash_projection", "core.hash_learned"} <= set(sd)
    b = make(1)
    b.load_state_dict(sd)
    assert bool(b.core.hash_learned)
    b.train()(torch.randn(2, 24, 32))  # reloaded with the flag: no re-learning even in training
    for n, buf in b.core.named_buffers():
        assert torch.equal(buf, learned[n]), n
    torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=0, atol=0)
    b.core.reset_hash()
    b.train()(x)
    assert bool(b.core.hash_learned)


def test_module_weights_importance_and_padding() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, variant="ecoformer", causal=True).double().eval()
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    y, ex = attn(x, return_extras=True)
    assert ex.weights is not None and ex.weights.shape == (2, 4, 15, 15)
    torch.testing.assert_close(ex.weights.sum(-1), torch.ones(2, 4, 15, dtype=torch.float64), rtol=0, atol=ATOL)
    torch.testing.assert_close(ex.importance.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=ATOL)
    q, k, v = attn.project(x)
    am = normalize_mask(None, causal=True, batch=2, heads=4, n=15, m=15, device=x.device)
    fast = attn.core(q, k, v, am, need_importance=True)
    torch.testing.assert_close(fast.importance, ex.weights.mean(-2), rtol=0, atol=ATOL)
    del y


def test_ksh_written_out_gradient_and_nesterov_steps_equal_autograd_and_torch_sgd() -> None:
    """The hash learner's relaxed-loss gradient and its SGD loop equal autograd + torch.optim.SGD."""
    from attnlib.functional.ecoformer import _ksh_grad, _ksh_loss, _nesterov_sgd

    g = torch.Generator().manual_seed(5)
    kq = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    kk = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    resid = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    a0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    a = a0.clone().requires_grad_()
    (want,) = torch.autograd.grad(_ksh_loss(kq, kk, resid, a, 0.1, False).sum(), a)
    torch.testing.assert_close(_ksh_grad(kq, kk, resid, a0, 0.1), want, rtol=1e-12, atol=1e-14)
    a = a0.clone().requires_grad_()
    opt = torch.optim.SGD([a], lr=0.3, momentum=0.9, nesterov=True)
    for _ in range(7):
        opt.zero_grad()
        _ksh_loss(kq, kk, resid, a, 0.1, False).sum().backward()
        opt.step()
    got = _nesterov_sgd(lambda x: _ksh_grad(kq, kk, resid, x, 0.1), a0, 0.3, 0.9, 7)
    torch.testing.assert_close(got, a.detach(), rtol=1e-12, atol=1e-14)
