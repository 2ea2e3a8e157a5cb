"""attnlib.ot against POT (float64 oracles), masks, dtypes, gradients (gradcheck) and errors."""

from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch

from attnlib import ot
from attnlib.ot import (
    GOTRegularizer,
    cosine_cost,
    got_distance,
    gromov_wasserstein,
    gw_cost,
    ipot,
    prune_cost,
    sinkhorn,
    transport_cost,
)


def problem(n: int, m: int, seed: int, *, uniform: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared-Euclidean cost between Gaussian point clouds (normalised to max 1), random marginals."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    cost /= cost.max()
    if uniform:
        return cost, np.full(n, 1 / n), np.full(m, 1 / m)
    a, b = rng.uniform(0.2, 1.0, n), rng.uniform(0.2, 1.0, m)
    return cost, a / a.sum(), b / b.sum()


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


# ------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "n", "m", "seed"), [(1.0, 7, 5, 0), (0.1, 6, 9, 1), (0.01, 8, 5, 2), (1e-3, 5, 7, 3)])
def test_sinkhorn_equals_pot(eps: float, n: int, m: int, seed: int) -> None:
    cost, a, b = problem(n, m, seed)
    ref = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    ref_cost = pot.sinkhorn2(a, b, cost, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    plan = sinkhorn(t(cost), t(a), t(b), eps=eps, n_iters=100_000, tol=1e-12)
    assert plan.dtype == torch.float64
    np.testing.assert_allclose(plan.numpy(), ref, rtol=0, atol=1e-10)
    assert float(transport_cost(t(cost), plan)) == pytest.approx(float(ref_cost), abs=1e-10)
    np.testing.assert_allclose(plan.sum(-1).numpy(), a, atol=1e-12)
    np.testing.assert_allclose(plan.sum(-2).numpy(), b, atol=1e-12)


def test_sinkhorn_batched_uniform_default_equals_pot() -> None:
    probs = [problem(6, 4, s, uniform=True) for s in range(3)]
    cost = torch.stack([t(c) for c, _, _ in probs])
    plans = sinkhorn(cost, eps=0.05, n_iters=5000, tol=1e-12)
    for i, (c, a, b) in enumerate(probs):
        ref = pot.sinkhorn(a, b, c, 0.05, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
        np.testing.assert_allclose(plans[i].numpy(), ref, rtol=0, atol=1e-10)


def test_sinkhorn_padding_equals_unpadded_problem() -> None:
    cost, a, b = problem(5, 4, 7)
    big = torch.rand(2, 7, 6, dtype=torch.float64) * 10  # junk everywhere
    big[0, :5, :4] = t(cost)
    am = torch.zeros(2, 7, dtype=torch.bool)
    bm = torch.zeros(2, 6, dtype=torch.bool)
    am[0, :5], bm[0, :4] = True, True  # example 1 is all padding
    aa = torch.zeros(2, 7, dtype=torch.float64)
    aa[0, :5] = t(a)
    bb = torch.rand(2, 6, dtype=torch.float64)  # junk on padded entries is ignored
    bb[0, :4] = t(b)
    big.requires_grad_(True)
    plan = sinkhorn(big, aa, bb, eps=0.1, n_iters=3000, tol=1e-12, a_mask=am, b_mask=bm)
    ref = pot.sinkhorn(a, b, cost, 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    np.testing.assert_allclose(plan[0, :5, :4].detach().numpy(), ref, atol=1e-10)
    assert torch.equal(plan[0, 5:], torch.zeros_like(plan[0, 5:])) and torch.equal(plan[0, :, 4:], plan.new_zeros(7, 2))
    assert torch.equal(plan[1], torch.zeros_like(plan[1]))
    transport_cost(big, plan).sum().backward()
    assert big.grad is not None and torch.isfinite(big.grad).all()
    assert torch.equal(big.grad[1], torch.zeros_like(big.grad[1]))


def test_sinkhorn_uniform_default_respects_mask_counts() -> None:
    cost = torch.rand(2, 5, 4, dtype=torch.float64)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = sinkhorn(cost, eps=0.1, n_iters=2000, tol=1e-12, a_mask=am)
    torch.testing.assert_close(plan.sum(-1)[0, :3], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 4), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_sinkhorn_float32_small_eps_is_finite_and_accurate(eps: float) -> None:
    cost, a, b = problem(12, 9, 11)
    ref = sinkhorn(t(cost), t(a), t(b), eps=eps, n_iters=20_000, tol=1e-12)
    plan = sinkhorn(t(cost).float(), t(a).float(), t(b).float(), eps=eps, n_iters=3000)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    assert (plan.double() - ref).abs().max() < 2e-4
    assert float(transport_cost(t(cost), plan.double())) == pytest.approx(float(transport_cost(t(cost), ref)), abs=1e-4)


def test_sinkhorn_bf16_input_computes_in_float32() -> None:
    cost, _, _ = problem(6, 5, 4)
    c16 = t(cost).to(torch.bfloat16)
    plan = sinkhorn(c16, eps=1e-3, n_iters=300)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    ref = sinkhorn(c16.double(), eps=1e-3, n_iters=300)
    assert (plan.double() - ref).abs().max() < 1e-4


def test_sinkhorn_gradcheck() -> None:
    cost, a, b = problem(4, 3, 5)
    args = (t(cost).requires_grad_(True), t(a).requires_grad_(True), t(b).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda c, x, y: sinkhorn(c, x, y, eps=0.3, n_iters=15), args)
    # the transport cost, the quantity a loss uses
    assert torch.autograd.gradcheck(lambda c: transport_cost(c, sinkhorn(c, eps=0.1, n_iters=30)), args[:1])


# ------------------------------------------------------------------------------------------
# IPOT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "seed"), [(8, 8, 0), (10, 6, 1), (5, 9, 2)])
def test_ipot_converges_to_emd(n: int, m: int, seed: int) -> None:
    cost, a, b = problem(n, m, seed)
    exact = pot.emd2(a, b, cost)
    gaps = []
    for iters in (20, 200, 2000):
        plan = ipot(t(cost), t(a), t(b), n_iters=iters)
        np.testing.assert_allclose(plan.sum(-2).numpy(), b, atol=1e-12)  # columns exact
        gaps.append(abs(float(transport_cost(t(cost), plan)) - exact))
    assert gaps[1] < 5e-3 and gaps[2] < 1e-5
    assert gaps[2] < gaps[0]


def test_ipot_plan_is_shift_invariant_and_masked() -> None:
    cost, a, b = problem(6, 5, 3)
    c = t(cost)
    shifted = c + torch.rand(6, 1, dtype=torch.float64) + torch.rand(1, 5, dtype=torch.float64)
    p1, p2 = ipot(c, t(a), t(b), n_iters=3000), ipot(shifted, t(a), t(b), n_iters=3000)
    assert (p1 - p2).abs().max() < 1e-6
    padded = torch.full((8, 7), 5.0, dtype=torch.float64)
    padded[:6, :5] = c
    pa, pb = torch.zeros(8, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    pa[:6], pb[:5] = t(a), t(b)
    pp = ipot(padded, pa, pb, n_iters=3000)  # zero mass = padding
    torch.testing.assert_close(pp[:6, :5], p1, rtol=0, atol=1e-12)
    assert pp[6:].abs().sum() == 0 and pp[:, 5:].abs().sum() == 0


def test_ipot_float32_small_beta_no_underflow() -> None:
    cost, _, _ = problem(9, 7, 8)
    plan = ipot(t(cost).float() * 50, beta=0.01, n_iters=100)  # exp(-C/beta) would underflow
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-2), torch.full((7,), 1 / 7), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Gromov-Wasserstein
# ------------------------------------------------------------------------------------------


def spaces(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 2))
    cx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    cy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    return cx / cx.max(), cy / cy.max()


@pytest.mark.parametrize(("n", "m"), [(6, 4), (5, 7)])
def test_gw_value_at_fixed_plan_equals_pot_gwloss(n: int, m: int) -> None:
    cx, cy = spaces(n, m, n)
    cost, a, b = problem(n, m, m)
    plan = pot.sinkhorn(a, b, cost, 0.05)
    p, q = plan.sum(1), plan.sum(0)
    const, h1, h2 = pot.gromov.init_matrix(cx, cy, p, q, "square_loss")
    ref = pot.gromov.gwloss(const, h1, h2, plan)
    assert float(gw_cost(t(cx), t(cy), t(plan))) == pytest.approx(float(ref), abs=1e-14)
    brute = np.einsum("ik,jl,ij,kl->", np.ones((n, n)), np.ones((m, m)), plan, plan) * 0  # shape check
    brute = sum(
        ((cx[i, k] - cy[j, l]) ** 2) * plan[i, j] * plan[k, l]
        for i in range(n)
        for j in range(m)
        for k in range(n)
        for l in range(m)
    )
    assert float(gw_cost(t(cx), t(cy), t(plan))) == pytest.approx(brute, abs=1e-14)
    # given (prescribed) marginals: POT's formula with those a, b
    const, h1, h2 = pot.gromov.init_matrix(cx, cy, a, b, "square_loss")
    assert float(gw_cost(t(cx), t(cy), t(plan), t(a), t(b))) == pytest.approx(
        float(pot.gromov.gwloss(const, h1, h2, plan)), abs=1e-14
    )


def test_gromov_wasserstein_solver() -> None:
    cx, cy = spaces(7, 6, 1)
    a, b = np.full(7, 1 / 7), np.full(6, 1 / 6)
    plan, value = gromov_wasserstein(t(cx), t(cy), solver="ipot", outer_iters=10, inner_iters=50)
    assert float(value) == pytest.approx(float(gw_cost(t(cx), t(cy), plan, t(a), t(b))), abs=1e-14)
    np.testing.assert_allclose(plan.sum(-2).numpy(), b, atol=1e-12)
    independent = float(gw_cost(t(cx), t(cy), t(np.outer(a, b))))
    pot_cg = float(pot.gromov.gromov_wasserstein2(cx, cy, a, b))
    assert float(value) < independent
    assert float(value) == pytest.approx(pot_cg, rel=0.25)  # non-convex: local optima differ a little
    _, value_s = gromov_wasserstein(t(cx), t(cy), solver="sinkhorn", eps=0.01, outer_iters=10, inner_iters=200)
    assert float(value_s) < independent


def test_gromov_wasserstein_isometric_spaces_align() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2))
    cx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    perm = rng.permutation(6)
    cy = cx[perm][:, perm]
    plan, value = gromov_wasserstein(t(cx), t(cy), outer_iters=20, inner_iters=100, beta=0.05)
    assert float(value) < 1e-6
    assert torch.equal(plan.argmax(-1), torch.from_numpy(np.argsort(perm)))  # y_j = x_perm[j]


def test_gromov_wasserstein_padding_and_envelope() -> None:
    cx, cy = spaces(5, 4, 2)
    big_x, big_y = torch.rand(7, 7, dtype=torch.float64), torch.rand(6, 6, dtype=torch.float64)
    big_x[:5, :5], big_y[:4, :4] = t(cx), t(cy)
    am, bm = torch.arange(7) < 5, torch.arange(6) < 4
    p_ref, v_ref = gromov_wasserstein(t(cx), t(cy))
    p, v = gromov_wasserstein(big_x, big_y, a_mask=am, b_mask=bm)
    torch.testing.assert_close(p[:5, :4], p_ref, rtol=0, atol=1e-12)
    assert float(v) == pytest.approx(float(v_ref), abs=1e-12)
    cx_t = t(cx).requires_grad_(True)
    _, ve = gromov_wasserstein(cx_t, t(cy), plan_grad="envelope")
    assert float(ve.detach()) == pytest.approx(float(v_ref), abs=1e-12)
    ve.backward()
    assert cx_t.grad is not None and torch.isfinite(cx_t.grad).all()


# ------------------------------------------------------------------------------------------
# GOT
# ------------------------------------------------------------------------------------------


def feats(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cosine_cost_and_prune_cost() -> None:
    x, y = feats(1, 4, 3, 0)[0], feats(1, 5, 3, 1)[0]
    c = cosine_cost(x, y)
    ref = 1 - torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1)
    torch.testing.assert_close(c, ref)
    p = prune_cost(c, 0.25)
    thr = c.min() + 0.25 * (c.max() - c.min())
    torch.testing.assert_close(p, torch.clamp(c - thr, min=0))
    assert int((p == 0).sum()) >= 1
    # per example, over real pairs only: junk in padding does not move the threshold
    cb = torch.stack([c, c * 3])
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    junk = cb.clone()
    junk[1, 2:] = 100.0
    pb = prune_cost(junk, 0.25, rm, None)
    torch.testing.assert_close(pb[0], p)
    sub = c[:2] * 3
    torch.testing.assert_close(pb[1, :2], prune_cost(sub, 0.25))
    assert torch.equal(pb[1, 2:], torch.zeros(2, 5, dtype=torch.float64))


def test_got_distance_matches_its_definition() -> None:
    x, y = feats(2, 5, 4, 2), feats(2, 6, 4, 3)
    wd, gwd, t_w, t_g = got_distance(x, y, prune=0.1, prune_cross=0.2, n_iters=80, return_plans=True)
    assert wd.shape == gwd.shape == (2,)
    for i in range(2):
        cxy = prune_cost(cosine_cost(x[i], y[i]), 0.2)
        cx, cy = prune_cost(cosine_cost(x[i], x[i]), 0.1), prune_cost(cosine_cost(y[i], y[i]), 0.1)
        plan = ipot(cxy, n_iters=80)
        torch.testing.assert_close(t_w[i], plan, rtol=0, atol=1e-12)
        assert float(wd[i]) == pytest.approx(float(transport_cost(cxy, plan)), abs=1e-12)
        plan_g, val = gromov_wasserstein(cx, cy)
        torch.testing.assert_close(t_g[i], plan_g, rtol=0, atol=1e-12)
        assert float(gwd[i]) == pytest.approx(float(val), abs=1e-12)
        # IPOT -> exact OT: WD approaches POT's emd2 on the same pruned cost
        exact = pot.emd2(np.full(5, 0.2), np.full(6, 1 / 6), cxy.numpy())
        assert float(transport_cost(cxy, ipot(cxy, n_iters=2000))) == pytest.approx(exact, abs=1e-5)


def test_got_distance_per_example_over_real_tokens_only() -> None:
    x, y = feats(2, 6, 4, 4), feats(2, 5, 4, 5)
    xm = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    ym = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    x_junk, y_junk = x.clone(), y.clone()
    x_junk[1, 4:] *= 100
    y_junk[0, 3:] = -y_junk[0, 3:] * 7
    for shared in (False, True):
        wd, gwd = got_distance(x_junk, y_junk, x_mask=xm, y_mask=ym, shared_plan=shared)
        for i in range(2):
            wi, gi = got_distance(x[i, xm[i]][None], y[i, ym[i]][None], shared_plan=shared)
            assert float(wd[i]) == pytest.approx(float(wi), abs=1e-12)
            assert float(gwd[i]) == pytest.approx(float(gi), abs=1e-12)


def test_got_distance_identical_sets_is_zero_and_padded_example_is_zero() -> None:
    x = feats(1, 5, 4, 6)
    wd, gwd = got_distance(x, x.clone(), n_iters=300, gw_inner_iters=100, gw_outer_iters=10)
    assert float(wd) < 1e-6 and float(gwd) < 1e-6
    y = feats(2, 4, 4, 7)
    xm = torch.tensor([[True] * 5, [False] * 5])
    x2 = torch.cat([x, x])
    wd, gwd = got_distance(x2, y, x_mask=xm)
    assert torch.isfinite(wd).all() and float(wd[1]) == 0 and float(gwd[1]) == 0


def test_got_distance_gradcheck() -> None:
    x = feats(2, 4, 3, 8).requires_grad_(True)
    y = feats(2, 3, 3, 9).requires_grad_(True)
    ym = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    kw = {"n_iters": 15, "gw_outer_iters": 2, "gw_inner_iters": 6, "y_mask": ym}
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(got_distance(a, b, **kw)), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(got_distance(a, b, shared_plan=True, **kw)), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(got_distance(a, b, solver="sinkhorn", **kw)), (x, y))


def test_got_float32_bf16_and_regularizer() -> None:
    x, y = feats(3, 6, 8, 10), feats(3, 5, 8, 11)
    ref = torch.stack(got_distance(x, y))
    out32 = torch.stack(got_distance(x.float(), y.float()))
    out16 = torch.stack(got_distance(x.bfloat16(), y.bfloat16()))
    assert out32.dtype == out16.dtype == torch.float32
    assert (out32[0].double() - ref[0]).abs().max() < 1e-5  # WD: convex, stable
    # GWD: non-convex; GOT's 5 x IPOT(beta=0.1) outer loop amplifies round-off (1e-6 -> ~1e-3 here)
    assert (out32[1].double() - ref[1]).abs().max() < 2e-2
    assert torch.isfinite(out16).all() and (out16.double() - ref).abs().max() < 5e-2
    reg = GOTRegularizer(0.1, 0.2, prune=0.1)
    xg = x.clone().requires_grad_(True)
    loss = reg(xg, y)
    wd, gwd = got_distance(x, y, wd_weight=0.1, gwd_weight=0.2, prune=0.1)
    assert float(loss.detach()) == pytest.approx(float((0.1 * wd + 0.2 * gwd).mean()), abs=1e-12)
    loss.backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert reg.last_plans is not None and reg.last_plans[0].shape == (3, 6, 5)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    c = torch.rand(4, 3)
    with pytest.raises(ValueError, match="eps must be a positive"):
        sinkhorn(c, eps=0.0)
    with pytest.raises(ValueError, match=r"cost must be a floating tensor \(\.\.\., N, M\)"):
        sinkhorn(torch.rand(4))
    with pytest.raises(ValueError, match=r"a must have shape \(4,\)"):
        sinkhorn(c, torch.rand(5))
    with pytest.raises(ValueError, match="non-negative"):
        ipot(c, -torch.rand(4))
    with pytest.raises(ValueError, match="a_mask must be a bool tensor"):
        ipot(c, a_mask=torch.ones(4))
    with pytest.raises(ValueError, match="n_iters must be an int >= 1"):
        ipot(c, n_iters=0)
    with pytest.raises(ValueError, match="solver must be 'ipot' or 'sinkhorn'"):
        gromov_wasserstein(torch.rand(3, 3), torch.rand(2, 2), solver="emd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cy must be a floating tensor \(\.\.\., n, n\)"):
        gromov_wasserstein(torch.rand(3, 3), torch.rand(2, 3))
    with pytest.raises(ValueError, match="feature dims differ"):
        got_distance(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="frac must be in"):
        prune_cost(c, 1.5)
    with pytest.raises(ValueError, match="not a got_distance option"):
        GOTRegularizer(x_mask=None)
    assert ot.__all__  # the public names are documented


def test_numpy_inputs_are_accepted() -> None:
    cost, a, b = problem(5, 4, 12)
    plan = sinkhorn(cost, a, b, eps=0.1, n_iters=3000, tol=1e-12)
    assert isinstance(plan, torch.Tensor) and plan.dtype == torch.float64
    ref = pot.sinkhorn(a, b, cost, 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-10)
    cx, cy = spaces(5, 4, 3)
    _, value = gromov_wasserstein(cx, cy, a, b)
    assert float(value) == pytest.approx(float(gw_cost(cx, cy, _.numpy(), a, b)), abs=1e-14)


def test_unbalanced_marginals_and_wrong_mask_shapes_raise() -> None:
    c = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn(c, torch.full((4,), 0.25, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="same total mass"):
        ipot(c, torch.full((4,), 0.5, dtype=torch.float64))  # b defaults to uniform (mass 1)
    with pytest.raises(ValueError, match=r"a_mask must have shape \(4,\)"):
        sinkhorn(c, a_mask=torch.ones(2, 4, dtype=torch.bool))


def test_exp_domain_ipot_equals_log_domain_and_falls_back_on_underflow() -> None:
    """IPOT's exp-domain steps (GOT's code; the solver of the whole-matrix paths) give the
    log-domain plan and gradients, under padding masks; where exp(-C / beta) would lose a whole
    row to underflow the log domain takes over."""
    from attnlib.functional.ot import _ipot_exp, _ipot_log, _Problem, _solve

    g = torch.Generator().manual_seed(5)
    cost = (torch.rand(3, 9, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    am = torch.ones(3, 9, dtype=torch.bool)
    bm = torch.ones(3, 7, dtype=torch.bool)
    am[1, 6:] = False
    bm[2, :2] = False
    pb = _Problem(cost, None, None, am, bm, "test")
    fast = _ipot_exp(pb, pb.cost, 0.5, 30)
    assert fast is not None
    slow = pb.plan(_ipot_log(pb, pb.cost, 0.5, 30, 1))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-14)
    w = torch.randn(3, 9, 7, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((fast * w).sum(), cost)
    (gb,) = torch.autograd.grad((slow * w).sum(), cost)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)
    assert fast[1, 6:].abs().sum() == 0 and fast[2, :, :2].abs().sum() == 0
    # float32, costs x 50 and beta 0.01: exp(-C / beta) underflows, the log domain answers
    c32, _, _ = problem(9, 7, 8)
    pb32 = _Problem(t(c32).float() * 50, None, None, None, None, "test")
    assert _ipot_exp(pb32, pb32.cost, 0.01, 100) is None
    plan = _solve(pb32, pb32.cost, "ipot", 0.01, 0.05, 100)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan, pb32.plan(_ipot_log(pb32, pb32.cost, 0.01, 100, 1)), rtol=0, atol=0)


def test_got_loss_solved_a_few_examples_at_a_time_equals_all_at_once(monkeypatch) -> None:
    """Long sequences solve the regulariser's examples in groups (peak memory); loss, plans and
    gradients equal the single batched solve, with padding and two leading dims."""
    from attnlib.functional.ot import got_loss

    x, y = feats(6, 7, 5, 20).reshape(2, 3, 7, 5), feats(6, 6, 5, 21).reshape(2, 3, 6, 5)
    xm = torch.ones(2, 3, 7, dtype=torch.bool)
    xm[1, 2, 5:] = False

    def run() -> tuple[torch.Tensor, ...]:
        xg = x.clone().requires_grad_(True)
        loss, t_w, t_g = got_loss(xg, y, x_mask=xm, return_plans=True)
        (grad,) = torch.autograd.grad(loss, xg)
        return loss, t_w, t_g, grad

    def run_loss_only() -> tuple[torch.Tensor, ...]:  # groups recomputed in the backward pass
        xg = x.clone().requires_grad_(True)
        loss = got_loss(xg, y, x_mask=xm)
        return loss, *torch.autograd.grad(loss, xg)

    whole = run()
    monkeypatch.setattr("attnlib.dispatch.ROW_BLOCK_ELEMENTS", 2 * 7 * 6)  # two examples per group
    for got, want in zip(run(), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    for got, want in zip(run_loss_only(), (whole[0], whole[3]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
