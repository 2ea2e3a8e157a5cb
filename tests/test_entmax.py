"""sparsemax / entmax15 / entmax_bisect vs the `entmax` package (values and gradients, float64),
their special cases, and entmax attention."""

from __future__ import annotations

import entmax as ref_pkg
import pytest
import torch

from attnlib.functional import entmax15, entmax_attention, entmax_bisect, reference_attention, sparsemax
from attnlib.masks import normalize_mask
from attnlib.testing import assert_close, make_qkv


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 2
    x[0, 1, :4] = float("-inf")  # masked entries (the package handles partial -inf rows)
    return x


@pytest.mark.parametrize(("ours", "theirs"), [(sparsemax, ref_pkg.sparsemax), (entmax15, ref_pkg.entmax15)])
@pytest.mark.parametrize("dim", [-1, 1])
def test_sort_based_maps_equal_entmax_package(ours, theirs, dim: int) -> None:
    x = _scores()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    pa, pb = ours(a, dim), theirs(b, dim)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)
    go = torch.randn(pa.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ga,) = torch.autograd.grad(pa, a, go)
    (gb,) = torch.autograd.grad(pb, b, go)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-13)
    assert (pa == 0).any(), "the maps must produce exact zeros here"


@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0, 2.7])
def test_bisection_equals_entmax_package_incl_alpha_gradient(alpha: float) -> None:
    x = _scores(2)
    x[0, 1, :4] = 0.0  # the package's bisection does not accept -inf
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    al = torch.full((3, 5, 1), alpha, dtype=torch.float64).requires_grad_()
    bl = al.detach().clone().requires_grad_()
    pa, pb = entmax_bisect(a, al), ref_pkg.entmax_bisect(b, bl)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12)
    go = torch.randn(pa.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ga, gal = torch.autograd.grad(pa, (a, al), go)
    gb, gbl = torch.autograd.grad(pb, (b, bl), go)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    torch.testing.assert_close(gal, gbl, rtol=0, atol=1e-11)


def test_gradcheck_and_special_cases() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.3, 1.7, 1.5], dtype=torch.float64).view(1, 3, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, a: entmax_bisect(z, a), (x, alpha))
    assert torch.autograd.gradcheck(entmax15, (x,))
    assert torch.autograd.gradcheck(sparsemax, (x,))
    assert_close(entmax_bisect(x, 2.0), sparsemax(x))
    assert_close(entmax_bisect(x, 1.5), entmax15(x))
    p = entmax_bisect(x, 1.7)
    assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    # alpha -> 1: converges to softmax, monotonically
    errs = [float((entmax_bisect(x, a) - torch.softmax(x, -1)).abs().max()) for a in (1.1, 1.05, 1.01)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-2, errs


def test_masked_rows_are_zero_and_half_precision() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    x[1] = float("-inf")
    x[2, :3] = float("-inf")
    for fn in (sparsemax, entmax15, lambda z: entmax_bisect(z, 1.3)):
        z = x.clone().requires_grad_()
        p = fn(z)
        assert torch.equal(p[1], torch.zeros(6, dtype=torch.float64))
        assert torch.equal(p[2, :3], torch.zeros(3, dtype=torch.float64))
        p.sum().backward()
        assert torch.isfinite(z.grad).all()
        pb = fn(x.to(torch.bfloat16))
        assert pb.dtype == torch.bfloat16
        assert (pb.double() - p.detach()).abs().max() < 2e-2
    with pytest.raises(ValueError, match="alpha"):
        entmax_bisect(x, 1.0)
    with pytest.raises(ValueError, match="size 1 along dim"):
        entmax_bisect(x, torch.full((4, 6), 1.5, dtype=torch.float64))


def test_entmax_attention_equals_defining_formula() -> None:
    q, k, v = make_qkv(2, 3, 20, 8, m=26, h_kv=1, dtype=torch.float64, logit_scale=4.0, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 3, 20, 26, generator=g) > 0.3
    mask[0, 0, 4] = False
    alpha = torch.tensor([1.2, 1.5, 2.0], dtype=torch.float64)
    out, w, imp = entmax_attention(
        q, k, v, alpha=alpha, mask=mask, return_weights=True, return_importance=True, chunk_size=7
    )
    s = (q @ k.transpose(-1, -2)) * 8**-0.5
    s = s.masked_fill(~mask, float("-inf"))
    want = torch.stack(
        [ref_pkg.entmax_bisect(s[:, h].nan_to_num(neginf=-1e30), float(alpha[h]), -1) for h in range(3)], 1
    )
    want = want.masked_fill(~mask, 0.0)
    assert_close(w, want)
    assert_close(out, want @ v)
    assert_close(imp, want.mean(2))
    assert torch.equal(out[0, 0, 4], torch.zeros(8, dtype=torch.float64))
    # alpha = 2 / 1.5 use the sort-based maps
    out2 = entmax_attention(q, k, v, alpha=2.0, causal=True)
    s2 = ((q @ k.transpose(-1, -2)) * 8**-0.5).masked_fill(~torch.ones(20, 26, dtype=torch.bool).tril(6), float("-inf"))
    assert_close(out2, ref_pkg.sparsemax(s2, -1) @ v)


def test_entmax_variant() -> None:
    from attnlib.registry import get_variant

    cls = get_variant("entmax")
    q, k, v = make_qkv(2, 4, 16, 8, dtype=torch.float64, logit_scale=4.0, seed=7)
    am = normalize_mask(None, causal=True, batch=2, heads=4, n=16, m=16, device=torch.device("cpu"))
    fixed = cls(num_heads=4, head_dim=8, alpha=1.5).double()
    res = fixed(q, k, v, am, need_weights=True)
    assert_close(res.out, entmax_attention(q, k, v, alpha=1.5, causal=True))
    assert (res.weights == 0).any()
    learned = cls(num_heads=4, head_dim=8, alpha=1.3, learn_alpha=True).double()
    torch.testing.assert_close(learned.alphas(), torch.full((4,), 1.3, dtype=torch.float64), rtol=0, atol=1e-7)
    out = learned(q, k, v, am).out
    out.square().sum().backward()
    assert learned.alpha_logit.grad is not None and learned.alpha_logit.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        cls(num_heads=4, head_dim=8, alpha=2.5, learn_alpha=True)
    # softmax limit: with alpha near 1 the variant approaches exact softmax attention
    near = cls(num_heads=4, head_dim=8, alpha=1.001).double()
    err = float((near(q, k, v, am).out - reference_attention(q, k, v, causal=True)).abs().max())
    assert err < 5e-3, err


@pytest.mark.parametrize(("block", "steps"), [(4, 30), (8, 1), (64, 30), (4, 0)])
def test_entmax15_sort_free_threshold_equals_sorted_formula(monkeypatch, block: int, steps: int) -> None:
    """The sort-free threshold (block-maxima bound, Newton steps, closed form on the support; rows
    left over are sorted) equals the package's sort-based 1.5-entmax: dense and sparse rows, tied,
    partly and fully masked rows, in float64 and float32."""
    import attnlib.functional.entmax as fe

    monkeypatch.setattr("attnlib.dispatch.ENTMAX_SORT_MAX_N", 0)  # short rows would be sorted
    monkeypatch.setattr(fe, "ENTMAX15_BLOCK", block)
    monkeypatch.setattr(fe, "ENTMAX15_NEWTON_STEPS", steps)
    g = torch.Generator().manual_seed(11)
    scale = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0, 1.0], dtype=torch.float64).view(6, 1, 1)
    x = torch.randn(6, 43, 17, generator=g, dtype=torch.float64) * scale
    x[5, :5, :9] = float("-inf")
    x[5, :, 7] = float("-inf")
    x[4, :, 3] = 0.25  # a row of ties
    x[4, :20, 4] = 2.0  # ties at the top
    z = x.clone().requires_grad_()
    p = entmax15(z, 1)
    want = ref_pkg.entmax15(x.nan_to_num(neginf=-1e30), 1)
    want[5, :, 7] = 0.0
    torch.testing.assert_close(p, want, rtol=0, atol=1e-14)
    assert torch.equal(p[5, :, 7], torch.zeros_like(p[5, :, 7]))
    assert torch.equal(p == 0, want == 0), "the same support"
    support = (want > 0).sum(1)
    assert support[:5].min() == 1 and support.max() == 43, "one-hot to dense rows"
    p.square().sum().backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(entmax15(x.float(), 1), want.float(), rtol=0, atol=2e-6)
