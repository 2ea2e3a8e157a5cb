"""OT attention variants: ``sinkhorn`` (Sinkformers) and ``got`` (Graph Optimal Transport)."""

from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch

import attnlib
from attnlib import ot
from attnlib.functional import reference_attention, sinkhorn_attention
from attnlib.masks import KeyPadding, normalize_mask
from attnlib.testing import assert_close, make_qkv

F64 = torch.float64
B, H, N, M, D = 2, 3, 12, 9, 8


def amask(mask=None, *, n: int = N, m: int = N, causal: bool = False):
    return normalize_mask(mask, causal=causal, batch=B, heads=H, n=n, m=m, device=torch.device("cpu"))


def kpad(m: int, seed: int = 1) -> torch.Tensor:
    kp = torch.rand(B, m, generator=torch.Generator().manual_seed(seed)) > 0.3
    kp[:, 0] = True
    return kp


def explicit_sinkhorn(logits: torch.Tensor, n_iters: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The defining iteration in the probability domain (float64): rows to 1, columns to N/M, ..."""
    k = torch.exp(logits - logits.amax((-1, -2), keepdim=True))
    if allowed is not None:
        k = k * allowed
    n, m = k.shape[-2:]
    for it in range(n_iters):
        if it % 2 == 0:
            k = k / k.sum(-1, keepdim=True)
        else:
            k = k / k.sum(-2, keepdim=True) * (n / m)
    return k


# ------------------------------------------------------------------------------------------
# sinkhorn
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [N, M])
def test_sinkhorn_one_iteration_is_softmax(m: int) -> None:
    q, k, v = make_qkv(B, H, N, D, m=m, dtype=F64, logit_scale=3.0)
    cases = [None, KeyPadding(kpad(m))]
    if m == N:
        cases.append(torch.rand(B, 1, N, m, generator=torch.Generator().manual_seed(2)) > 0.4)
    for mask in cases:
        out, w = sinkhorn_attention(q, k, v, mask=mask, n_iters=1, return_weights=True)
        ref, w_ref = reference_attention(q, k, v, mask=mask, return_weights=True)
        assert_close(out, ref, atol=1e-13)
        assert_close(w, w_ref, atol=1e-14)
    core = attnlib.variants.ot.SinkhornAttention(num_heads=H, head_dim=D, n_iters=1)
    res = core(q, k, v, amask(KeyPadding(kpad(m)), m=m), cross=m != N, need_weights=True)
    ref = reference_attention(q, k, v, mask=KeyPadding(kpad(m)))
    if m == N:  # self-attention: padded positions are padded queries too (zero rows)
        ref = ref * kpad(m)[:, None, :, None]
    assert_close(res.out, ref, atol=1e-13)


@pytest.mark.parametrize("n_iters", [2, 3, 6])
@pytest.mark.parametrize("m", [N, M])
def test_sinkhorn_equals_explicit_alternating_normalisation(n_iters: int, m: int) -> None:
    q, k, v = make_qkv(B, H, N, D, m=m, dtype=F64, logit_scale=2.0, seed=n_iters)
    out, w = sinkhorn_attention(q, k, v, n_iters=n_iters, return_weights=True)
    ref_w = explicit_sinkhorn(q @ k.transpose(-1, -2) / D**0.5, n_iters)
    assert_close(w, ref_w, atol=1e-13)
    assert_close(out, ref_w @ v, atol=1e-12)


def test_sinkhorn_converges_to_doubly_stochastic_with_padding() -> None:
    q, k, v = make_qkv(B, H, N, D, m=M, dtype=F64, seed=3)
    kp = kpad(M)
    _, w = sinkhorn_attention(q, k, v, mask=KeyPadding(kp), n_iters=201, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, N, dtype=F64))
    m_real = kp.sum(-1).to(F64)[:, None, None]
    cols = w.sum(-2)
    real = kp[:, None].expand(B, H, M)
    torch.testing.assert_close(cols[real], (N / m_real).expand(B, H, M)[real], atol=1e-8, rtol=0)
    assert torch.equal(cols[~real], torch.zeros_like(cols[~real]))
    # it is the entropic OT plan (eps = sqrt(D)) between uniform measures, scaled by N
    cost = -(q @ k.transpose(-1, -2)) / D**0.5
    for bi in range(B):
        real = kp[bi]
        ref = pot.sinkhorn(
            np.full(N, 1 / N),
            np.full(int(real.sum()), 1 / int(real.sum())),
            cost[bi, 0][:, real].numpy(),
            1.0,
            method="sinkhorn_log",
            stopThr=1e-14,
            numItermax=10_000,
        )
        np.testing.assert_allclose(w[bi, 0][:, real].numpy() / N, ref, atol=1e-10)


def test_sinkhorn_self_attention_padding_is_query_padding_too() -> None:
    q, k, v = make_qkv(B, H, N, D, dtype=F64, seed=4)
    kp = kpad(N)
    core = attnlib.variants.ot.SinkhornAttention(num_heads=H, head_dim=D, n_iters=4)
    res = core(q, k, v, amask(KeyPadding(kp)), need_weights=True)
    real = [torch.nonzero(kp[b]).flatten() for b in range(B)]
    for b in range(B):
        r = real[b]
        sub = sinkhorn_attention(q[b : b + 1, :, r], k[b : b + 1, :, r], v[b : b + 1, :, r], n_iters=4)
        assert_close(res.out[b][:, r], sub[0], atol=1e-12)
        assert torch.equal(res.out[b][:, ~kp[b]], torch.zeros_like(res.out[b][:, ~kp[b]]))
    # cross-attention with the same sizes: the key padding pads keys only
    resx = core(q, k, v, amask(KeyPadding(kp)), cross=True)
    assert resx.out[:, :, ~kp[0]].abs().sum() > 0


def test_sinkhorn_float32_large_logits_and_bf16() -> None:
    q, k, v = make_qkv(B, H, 64, D, logit_scale=30.0, seed=5)
    out = sinkhorn_attention(q, k, v, n_iters=10, mask=KeyPadding(kpad(64)))
    assert torch.isfinite(out).all()
    ref = sinkhorn_attention(q.double(), k.double(), v.double(), n_iters=10, mask=KeyPadding(kpad(64)))
    assert (out.double() - ref).abs().max() < 1e-3
    out16 = sinkhorn_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), n_iters=10)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_sinkhorn_errors() -> None:
    with pytest.raises(ValueError, match="n_iters must be an int >= 1"):
        attnlib.Attention(16, 2, variant="sinkhorn", n_iters=0)
    with pytest.raises(attnlib.UnsupportedError, match="sinkhorn"):
        attnlib.Attention(16, 2, variant="sinkhorn", causal=True)
    q, k, v = make_qkv(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"query_mask must be a bool tensor \(B, N\)"):
        sinkhorn_attention(q, k, v, query_mask=torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
# got
# ------------------------------------------------------------------------------------------


def test_got_weights_are_row_normalised_ipot_plan() -> None:
    q, k, v = make_qkv(B, H, N, D, m=M, dtype=F64, seed=6)
    kp = kpad(M)
    core = attnlib.variants.ot.GOTAttention(num_heads=H, head_dim=D, n_iters=30).eval()
    res = core(q, k, v, amask(KeyPadding(kp), m=M), cross=True, need_weights=True, need_importance=True)
    plan = ot.ipot(ot.cosine_cost(q, k), n_iters=30, b_mask=kp[:, None, :].expand(B, H, M))
    w = plan / plan.sum(-1, keepdim=True)
    assert_close(res.weights, w, atol=1e-13)
    assert_close(res.out, w @ v, atol=1e-12)
    assert_close(res.importance, w.mean(2), atol=1e-13)
    assert torch.equal(res.weights[..., ~kp[0]][0], torch.zeros_like(res.weights[..., ~kp[0]][0]))
    assert res.aux_loss is None  # eval mode: no regulariser


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize(("cost", "beta"), [("cosine", 0.5), ("dot", 0.3), ("cosine", 1e-4)])
def test_got_column_potential_form_equals_the_log_domain_ipot(monkeypatch, blocked: bool, cost: str, beta: float):
    """OT attention runs IPOT through one column potential (a softmax per step); output and
    gradients equal the row-normalised log-domain IPOT plan (``ot.ipot``, differentiated through)
    in float64, under query and key padding, on the whole matrix and over blocks of rows. With
    beta = 1e-4 column masses underflow even in float64 and the log-sum-exp column step runs."""
    n, m, iters = 20, 17, 7
    q, k, v = make_qkv(B, H, n, D, m=m, dtype=F64, logit_scale=2.0, seed=41)
    kp, qp = kpad(m, seed=42), kpad(n, seed=43)
    qp[1] = False  # an example without a real query: zero output, no NaN
    calls = []
    real_log_softmax = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **kw: calls.append(1) or real_log_softmax(*a, **kw))

    def reference(q, k, v):
        c = ot.cosine_cost(q, k) if cost == "cosine" else -(q @ k.transpose(-1, -2)) * D**-0.5
        plan = ot.ipot(
            c, beta=beta, n_iters=iters, a_mask=qp[:, None].expand(B, H, n), b_mask=kp[:, None].expand(B, H, m)
        )
        return plan / plan.sum(-1, keepdim=True).clamp_min(1e-300) @ v

    def grads(fn):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return (out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=F64)).sum(), x))

    want = grads(reference)
    if blocked:
        monkeypatch.setattr("attnlib.dispatch.ROW_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr("attnlib.dispatch.OT_WHOLE_MATRIX_MAX", 0)
    got = grads(
        lambda q, k, v: ot.ot_attention(q, k, v, key_mask=kp, query_mask=qp, cost=cost, beta=beta, n_iters=iters)
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    with torch.no_grad():  # without autograd the blocks write into preallocated buffers
        out = ot.ot_attention(q, k, v, key_mask=kp, query_mask=qp, cost=cost, beta=beta, n_iters=iters)
    torch.testing.assert_close(out, want[0], atol=1e-10, rtol=1e-9)
    assert bool(calls) == (beta < 0.01)


def test_got_converged_plan_is_the_exact_ot_assignment() -> None:
    """IPOT -> exact OT: with N == M and uniform masses the weights become POT's emd permutation."""
    q, k, v = make_qkv(1, 1, 7, D, dtype=F64, seed=7)
    out, w = ot.ot_attention(q, k, v, n_iters=3000, return_weights=True)
    cost = ot.cosine_cost(q, k)[0, 0].numpy()
    ref = pot.emd(np.full(7, 1 / 7), np.full(7, 1 / 7), cost) * 7
    np.testing.assert_allclose(w[0, 0].numpy(), ref, atol=1e-6)
    assert_close(out, w @ v, atol=1e-12)


def test_got_aux_loss_is_the_got_regulariser_in_training_only() -> None:
    attn = attnlib.Attention(32, 4, variant="got").double()
    x, ctx = torch.randn(2, 10, 32, dtype=F64), torch.randn(2, 7, 32, dtype=F64)
    kp = torch.ones(2, 7, dtype=torch.bool)
    kp[1, 5:] = False
    attn.train()
    _, ex = attn(x, ctx, key_padding_mask=kp, return_extras=True)
    assert ex.aux_loss is not None and ex.aux_loss.dim() == 0
    with torch.no_grad():
        q, k, _ = attn.project(x, ctx)
        wd, gwd = ot.got_distance(q.flatten(0, 1), k.flatten(0, 1), y_mask=kp.repeat_interleave(4, 0))
    assert float(ex.aux_loss.detach()) == pytest.approx(float((0.1 * wd + 0.1 * gwd).mean()), abs=1e-12)
    assert attnlib.aux_loss(attn) is not None
    attn.eval()
    _, ex = attn(x, ctx, key_padding_mask=kp, return_extras=True)
    assert ex.aux_loss is None


def test_got_sinkhorn_solver_dot_cost_and_dtypes() -> None:
    q, k, v = make_qkv(B, H, N, D, m=M, seed=8)
    _, w = ot.ot_attention(q, k, v, solver="sinkhorn", cost="dot", eps=1.0, n_iters=200, return_weights=True)
    ref = ot.sinkhorn(-(q.double() @ k.double().transpose(-1, -2)) / D**0.5, eps=1.0, n_iters=200)
    assert (w.double() - ref / ref.sum(-1, keepdim=True)).abs().max() < 1e-5
    out16 = ot.ot_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    kp = torch.zeros(B, M, dtype=torch.bool)
    out0 = ot.ot_attention(q, k, v, key_mask=kp)
    assert torch.equal(out0, torch.zeros_like(out0))
    with pytest.raises(ValueError, match="cost must be 'cosine' or 'dot'"):
        attnlib.Attention(16, 2, variant="got", cost="l2")
    with pytest.raises(attnlib.UnsupportedError, match="got"):
        attnlib.Attention(16, 2, variant="got")(torch.randn(1, 4, 16), mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("what", ["sinkhorn", "ipot", "ot-sinkhorn"])
def test_blocked_path_equals_the_whole_matrix(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """Without weights the iterations run over blocks of query rows (16 rows each here, with the
    costs recomputed); output and gradients equal the whole-matrix path, under padding masks."""
    n, m = 40, 35
    q, k, v = make_qkv(B, H, n, D, m=m, dtype=F64, logit_scale=2.0, seed=31)
    kp, qp = kpad(m, seed=32), kpad(n, seed=33)
    qp[1] = False  # an example without a real query: zero output, no NaN

    def run(blocked: bool) -> tuple[torch.Tensor, ...]:
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        if what == "sinkhorn":
            res = sinkhorn_attention(*x, mask=KeyPadding(kp), query_mask=qp, n_iters=4, return_weights=not blocked)
        else:
            solver = "ipot" if what == "ipot" else "sinkhorn"
            res = ot.ot_attention(
                *x, key_mask=kp, query_mask=qp, solver=solver, eps=0.1, n_iters=6, return_weights=not blocked
            )
        out = res if blocked else res[0]
        return (out, *torch.autograd.grad(out.square().sum(), x))

    whole = run(False)
    monkeypatch.setattr("attnlib.dispatch.ROW_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr("attnlib.dispatch.OT_WHOLE_MATRIX_MAX", 0)
    for got, want in zip(run(True), whole, strict=True):
        assert_close(got, want, atol=1e-12)
    assert torch.equal(whole[0][1], torch.zeros_like(whole[0][1]))
