"""Additive (Bahdanau) attention and hard stochastic attention with REINFORCE (Show, Attend and Tell).

Oracles: the defining equation ``e_ij = v^T tanh(W q_i + U k_j + b)`` by explicit loops in
float64; the score-function estimator against the exact gradient of an expectation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlib
from attnlib.functional.additive import (
    additive_attention,
    additive_scores,
    attention_entropy,
    hard_attention,
    reinforce_surrogate,
    sample_attention,
    update_baseline,
)
from attnlib.masks import KeyPadding, normalize_mask
from attnlib.testing import make_qkv
from attnlib.variants.additive import AdditiveAttention, reinforce_loss

B, H, N, M, D, A = 2, 2, 5, 6, 4, 3


def _params(seed: int = 0, a: int = A) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(H, D, a, generator=g, dtype=torch.float64)
    w_k = torch.randn(H, D, a, generator=g, dtype=torch.float64)
    v = torch.randn(H, a, generator=g, dtype=torch.float64)
    bias = torch.randn(H, a, generator=g, dtype=torch.float64)
    return w_q, w_k, v, bias


def test_scores_equal_the_defining_equation_by_loops() -> None:
    q, k, _ = make_qkv(B, H, N, D, m=M, dtype=torch.float64, logit_scale=2.0, seed=1)
    w_q, w_k, v, bias = _params()
    got = additive_scores(q, k, w_q, w_k, v, bias)
    ref = torch.empty(B, H, N, M, dtype=torch.float64)
    for b, h, i, j in itertools.product(range(B), range(H), range(N), range(M)):
        hidden = torch.tanh(q[b, h, i] @ w_q[h] + k[b, h, j] @ w_k[h] + bias[h])
        ref[b, h, i, j] = v[h] @ hidden
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["none", "causal", "key_padding", "full"])
def test_soft_output_is_alpha_times_values(case: str) -> None:
    """alpha = softmax over the allowed keys of e / T (explicit), out = sum_j alpha_ij v_j; chunking is invisible."""
    m = N if case == "causal" else M
    q, k, val = make_qkv(B, H, N, D, m=m, dtype=torch.float64, logit_scale=2.0, seed=2)
    w_q, w_k, v, bias = _params(1)
    g = torch.Generator().manual_seed(3)
    mask = {
        "none": None,
        "causal": None,
        "key_padding": KeyPadding(torch.rand(B, m, generator=g) > 0.4),
        "full": torch.rand(B, 1, N, m, generator=g) > 0.4,
    }[case]
    causal = case == "causal"
    out, w = additive_attention(q, k, val, w_q, w_k, v, bias, mask=mask, causal=causal, temperature=0.7, chunk_size=2)
    allowed = normalize_mask(mask, causal=causal, batch=B, heads=H, n=N, m=m, device=torch.device("cpu")).dense()
    e = additive_scores(q, k, w_q, w_k, v, bias) / 0.7
    ref_w = torch.zeros_like(e)
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        ok = torch.ones(m, dtype=torch.bool) if allowed is None else allowed.expand(B, H, N, m)[b, h, i]
        if ok.any():
            ex = torch.exp(e[b, h, i][ok] - e[b, h, i][ok].max())
            ref_w[b, h, i, ok] = ex / ex.sum()
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, torch.einsum("bhnm,bhmd->bhnd", ref_w, val), rtol=0, atol=1e-12)


def test_variant_through_attention_equals_functional() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(8, 2, variant="additive", attn_dim=5).double().eval()
    x, ctx = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    kp = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y, ex = attn(x, ctx, key_padding_mask=kp, return_extras=True)
    q, k, val = attn.project(x, ctx)
    c = attn.core
    out, w = additive_attention(q, k, val, c.w_q, c.w_k, c.v, c.bias, mask=KeyPadding(kp))
    torch.testing.assert_close(ex.weights, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(y, attn.out_proj(out.transpose(1, 2).reshape(2, 4, 8)), rtol=0, atol=1e-12)
    assert torch.equal(ex.weights[1, :, :, 4:], torch.zeros(2, 4, 3, dtype=torch.float64))


# -- hard stochastic attention ----------------------------------------------------------------


def test_one_hot_alpha_makes_hard_equal_soft() -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, M, (B, H, N), generator=g)
    alpha = torch.nn.functional.one_hot(idx, M).double()
    val = torch.randn(B, H, M, D, dtype=torch.float64, generator=g)
    soft = alpha @ val
    for mode in ("sample", "argmax", "expected"):
        out, used, _ = hard_attention(alpha, val, mode)
        torch.testing.assert_close(out, soft, rtol=0, atol=0)
        torch.testing.assert_close(used, alpha, rtol=0, atol=0)


def test_semi_sampling_zero_is_soft_attention_and_eval_modes() -> None:
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    soft = attnlib.Attention(8, 2, variant="additive").double()
    hard = attnlib.Attention(8, 2, variant="additive", hard=True, semi_sampling_p=0.0).double()
    hard.load_state_dict(soft.state_dict())
    soft.train()
    hard.train()
    torch.testing.assert_close(hard(x, ctx), soft(x, ctx), rtol=0, atol=1e-12)
    assert hard.core.pending_log_prob is None and hard.core.pending_entropy is not None
    soft.eval()
    hard.eval()
    _, ex = soft(x, ctx, return_extras=True)
    _, hx = hard(x, ctx, return_extras=True)  # argmax: one-hot at alpha's mode
    assert torch.equal(hx.weights.argmax(-1), ex.weights.argmax(-1))
    assert torch.equal(hx.weights.sum(-1), torch.ones_like(hx.weights.sum(-1)))
    hard.core.hard_eval = "expected"
    torch.testing.assert_close(hard(x, ctx), soft(x, ctx), rtol=0, atol=1e-12)


def test_samples_follow_alpha_and_never_hit_masked_keys() -> None:
    alpha = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0], dtype=torch.float64).expand(1, 1, 20000, 5).contiguous()
    alpha[0, 0, :10] = 0.0  # rows with no allowed key: zero rows, log-prob 0
    one_hot, log_prob = sample_attention(alpha, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one_hot[0, 0, :10], torch.zeros(10, 5, dtype=torch.float64))
    assert torch.equal(log_prob[0, 0, :10], torch.zeros(10, dtype=torch.float64))
    freq = one_hot[0, 0, 10:].mean(0)
    assert freq[1] == 0 and freq[4] == 0
    n = 19990
    sigma = (alpha[0, 0, -1] * (1 - alpha[0, 0, -1]) / n).sqrt()
    assert ((freq - alpha[0, 0, -1]).abs() <= 4 * sigma + 1e-12).all(), freq
    picked = (alpha * one_hot).sum(-1)[0, 0, 10:]
    torch.testing.assert_close(log_prob[0, 0, 10:], picked.log(), rtol=0, atol=0)


def test_reinforce_gradient_is_unbiased_and_the_baseline_lowers_its_variance() -> None:
    """Toy objective f(s) with alpha = softmax(z) (L = 4): the surrogate's gradient over 2e5 samples
    matches the exact gradient of E_alpha[f] within 3 sigma, with and without a constant baseline;
    the baseline keeps the mean and lowers the per-sample variance."""
    z = torch.tensor([0.3, -0.5, 1.0, 0.1], dtype=torch.float64)
    f = torch.tensor([2.0, 5.0, 1.0, 3.0], dtype=torch.float64)
    alpha = torch.softmax(z, 0)
    exact = alpha * (f - (alpha * f).sum())  # d/dz sum_s alpha_s f_s
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    stats = {}
    for baseline in (0.0, float((alpha * f).sum())):
        zz = z.clone().requires_grad_(True)
        w = torch.softmax(zz, 0).expand(n, 1, 1, 4)
        one_hot, log_prob = sample_attention(w, generator=gen)
        cost = (one_hot[:, 0, 0] * f).sum(-1)
        loss = reinforce_surrogate(
            log_prob[:, :, :], torch.zeros_like(log_prob), cost, baseline, reward_scale=1.0, entropy_weight=0.0
        )
        (grad,) = torch.autograd.grad(loss, zz)
        per_sample = (cost - baseline)[:, None] * (one_hot[:, 0, 0] - alpha)  # d log p(s) / dz = e_s - alpha
        torch.testing.assert_close(grad, per_sample.mean(0), rtol=0, atol=1e-12)
        sigma = per_sample.std(0) / n**0.5
        assert ((grad - exact).abs() <= 3 * sigma).all(), (grad, exact, sigma)
        stats[baseline] = per_sample.var(0).sum()
    assert stats[float((alpha * f).sum())] < 0.5 * stats[0.0]


def test_entropy_term_gradient_and_baseline_update() -> None:
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.softmax(z, -1)
    ent = attention_entropy(alpha)
    ref = -(alpha * alpha.log()).sum(-1)
    torch.testing.assert_close(ent, ref, rtol=0, atol=1e-12)
    assert attention_entropy(torch.tensor([1.0, 0.0, 0.0])) == 0  # 0 log 0 = 0
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss = reinforce_surrogate(None, ent, torch.ones(2, dtype=torch.float64), 0.0, valid=valid, entropy_weight=0.5)
    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    target = -0.5 * (ref * valid[:, None]).sum((1, 2)).mean()
    (g_ref,) = torch.autograd.grad(target, z)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    b = update_baseline(torch.tensor(2.0), torch.tensor([1.0, 3.0, 5.0]))
    assert float(b) == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)


def test_reinforce_loss_reaches_every_score_parameter_and_updates_the_baseline() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(8, 2, variant="additive", hard=True, semi_sampling_p=1.0, entropy_weight=0.01).double()
    attn.train()
    x, ctx = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    y = attn(x, ctx)
    core = attn.core
    assert core.pending_log_prob is not None and core.pending_log_prob.shape == (3, 2, 4)
    cost = y.square().sum((1, 2)).detach()
    loss = reinforce_loss(attn, cost, torch.ones(3, 4, dtype=torch.bool))
    loss.backward()
    for name in ("w_q", "w_k", "v", "bias"):
        grad = getattr(core, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert float(core.baseline) == pytest.approx(0.1 * float(cost.mean()))
    assert core.pending_log_prob is None and core.pending_entropy is None
    assert float(reinforce_loss(attn, cost)) == 0.0  # nothing pending


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="hard_eval must be one of"):
        AdditiveAttention(num_heads=2, head_dim=4, hard_eval="mode")
    with pytest.raises(ValueError, match="semi_sampling_p must be a number in"):
        AdditiveAttention(num_heads=2, head_dim=4, semi_sampling_p=1.5)
    with pytest.raises(ValueError, match="w_q must be"):
        q, k, v = make_qkv(1, 2, 3, 4, dtype=torch.float64)
        additive_attention(q, k, v, torch.zeros(2, 3, 3), torch.zeros(2, 4, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cost"):
        reinforce_surrogate(None, torch.zeros(2, 1, 3), torch.zeros(3), 0.0)
