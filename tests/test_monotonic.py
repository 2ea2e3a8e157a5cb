"""Monotonic attention: the expected-alignment recursion, hard decisions, MoChA / infinite lookback,
HeadDrop and the head-divergence loss, all against explicit float64 loops and named special cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.functional.monotonic import (
    chunkwise_weights,
    expected_alignment,
    hard_alignment,
    head_divergence,
    headdrop,
    preserve_mass,
)
from attnlib.variants.monotonic import MonotonicAttention


def _alignment_loop(p: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """alpha_ij = p_ij * sum_{k<=j} alpha_{i-1,k} prod_{l=k}^{j-1} (1 - p_il), alpha_{-1} = e_0, by explicit loops."""
    b, h, n, m = p.shape
    out = torch.zeros_like(p)
    for bb, hh in itertools.product(range(b), range(h)):
        prev = [1.0] + [0.0] * (m - 1)
        for i in range(n):
            if skip is not None and skip[bb, i]:
                continue
            row = []
            for j in range(m):
                total = 0.0
                for k in range(j + 1):
                    prod = 1.0
                    for l_ in range(k, j):
                        prod *= 1.0 - float(p[bb, hh, i, l_])
                    total += prev[k] * prod
                row.append(float(p[bb, hh, i, j]) * total)
            out[bb, hh, i] = torch.tensor(row, dtype=p.dtype)
            prev = row
    return out


def _p(seed: int, shape=(2, 2, 5, 7)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(n=st.integers(1, 5), m=st.integers(1, 8), seed=st.integers(0, 10_000), skip_any=st.booleans())
def test_expected_alignment_equals_the_recursion_by_loops(n: int, m: int, seed: int, skip_any: bool) -> None:
    p = _p(seed, (2, 2, n, m))
    skip = (torch.rand(2, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.6) if skip_any else None
    got = expected_alignment(p, skip=skip)
    torch.testing.assert_close(got, _alignment_loop(p, skip), rtol=0, atol=1e-12)


def test_expected_alignment_equals_the_cumprod_closed_form() -> None:
    """The parallel form of Raffel et al. (exact in float64 when the cumprod does not underflow):
    alpha_i = p_i cumprod_excl(1 - p_i) cumsum(alpha_{i-1} / cumprod_excl(1 - p_i))."""
    p = _p(3) * 0.8
    alpha = expected_alignment(p)
    prev = torch.zeros(2, 2, 7, dtype=torch.float64)
    prev[..., 0] = 1
    for i in range(p.shape[2]):
        cp = torch.cumprod(torch.cat([torch.ones(2, 2, 1, dtype=torch.float64), 1 - p[:, :, i, :-1]], -1), -1)
        row = p[:, :, i] * cp * torch.cumsum(prev / cp, -1)
        torch.testing.assert_close(alpha[:, :, i], row, rtol=1e-10, atol=1e-12)
        prev = row


def test_binary_p_makes_expected_equal_hard_and_p_one_attends_the_first_allowed_key() -> None:
    p = (_p(4) > 0.6).double()
    hard, stops = hard_alignment(p)
    torch.testing.assert_close(expected_alignment(p), hard, rtol=0, atol=0)
    assert torch.equal(hard.argmax(-1).where(stops >= 0, -1), stops)
    # p = 1 on every allowed key: every row stops at the first allowed key (keys 0, 1 masked)
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[..., :2] = False
    ones = torch.ones(2, 2, 5, 7, dtype=torch.float64) * allowed
    for alpha in (expected_alignment(ones), hard_alignment(ones)[0]):
        assert torch.equal(alpha.argmax(-1), torch.full((2, 2, 5), 2))
        torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64), rtol=0, atol=0)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000))
def test_hard_alignment_never_moves_backwards(seed: int) -> None:
    p = _p(seed, (2, 3, 9, 11))
    skip = torch.rand(2, 9, generator=torch.Generator().manual_seed(seed)) > 0.7
    alpha, stops = hard_alignment(p, skip=skip)
    for b, h in itertools.product(range(2), range(3)):
        s = [int(x) for x in stops[b, h] if x >= 0]
        assert s == sorted(s)
        start = 0
        for i in range(9):
            st_ = int(stops[b, h, i])
            if skip[b, i]:
                assert st_ == -1
                continue
            cand = [j for j in range(start, 11) if float(p[b, h, i, j]) >= 0.5]  # the first key at/after the last stop
            assert st_ == (cand[0] if cand else -1)
            start = st_ if cand else 11  # no stop: the head has read every key
    assert torch.equal(alpha.sum(-1), (stops >= 0).double())


def _beta_loop(alpha: torch.Tensor, u: torch.Tensor, w: int | None, allowed=None) -> torch.Tensor:
    """beta_ij = sum_{k >= j, j in window(k)} alpha_ik exp(u_ij) / sum_{l in window(k)} exp(u_il),
    j and l over the allowed keys only (allowed (B, M) bool or None)."""
    out = torch.zeros_like(alpha)
    b, h, n, m = alpha.shape
    for bb, hh, i in itertools.product(range(b), range(h), range(n)):
        ok = [True] * m if allowed is None else allowed[bb].tolist()
        for j in range(m):
            total = 0.0
            for k in range(j, m):
                lo = 0 if w is None else max(0, k - w + 1)
                if j < lo or alpha[bb, hh, i, k] == 0 or not ok[j]:
                    continue
                den = sum(torch.exp(u[bb, hh, i, l_]) for l_ in range(lo, k + 1) if ok[l_])
                total += alpha[bb, hh, i, k] * torch.exp(u[bb, hh, i, j]) / den
            out[bb, hh, i, j] = total
    return out


@pytest.mark.parametrize("w", [1, 3, None])
def test_chunkwise_weights_equal_the_mocha_definition(w: int | None) -> None:
    alpha = expected_alignment(_p(5))
    u = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    beta = chunkwise_weights(alpha, u, w)
    torch.testing.assert_close(beta, _beta_loop(alpha, u, w), rtol=0, atol=1e-12)
    torch.testing.assert_close(beta.sum(-1), alpha.sum(-1), rtol=0, atol=1e-12)  # every window has a key


@pytest.mark.parametrize("w", [2, 3, 6])
def test_chunkwise_weights_with_masked_keys_equal_the_mocha_definition(w: int) -> None:
    """The O(M·w) chunk path with padding and a hole of masked keys wider than the chunk: masked
    keys get no weight, a window without an allowed key drops its alignment mass, and the
    gradients stay finite."""
    alpha = expected_alignment(_p(9, (2, 2, 5, 9)))
    u = (torch.randn(alpha.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3).requires_grad_()
    allowed = torch.ones(2, 9, dtype=torch.bool)
    allowed[0, 2:5] = False  # a hole of three keys
    allowed[1, 6:] = False  # padding
    beta = chunkwise_weights(alpha, u, w, allowed[:, None, None, :])
    torch.testing.assert_close(beta, _beta_loop(alpha, u.detach(), w, allowed), rtol=0, atol=1e-12)
    assert not beta[~allowed[:, None, None, :].expand_as(beta)].any()
    beta.square().sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    assert not u.grad[~allowed[:, None, None, :].expand_as(u)].any()


def test_chunk_one_is_hard_monotonic_and_lookback_at_the_last_key_is_softmax() -> None:
    alpha, _ = hard_alignment(_p(7))
    torch.testing.assert_close(chunkwise_weights(alpha, None, 1), alpha, rtol=0, atol=0)
    last = torch.zeros(2, 2, 5, 7, dtype=torch.float64)
    last[..., -1] = 1
    u = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(chunkwise_weights(last, u, None), torch.softmax(u, -1), rtol=0, atol=1e-12)
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[1, ..., 4:] = False  # padded keys get no weight, even inside the window
    beta = chunkwise_weights(last, u, None, allowed)
    torch.testing.assert_close(beta[1], torch.softmax(u[1].masked_fill(~allowed[1], -torch.inf), -1))


def test_mass_preservation_headdrop_and_divergence() -> None:
    alpha = expected_alignment(_p(8) * 0.3)
    allowed = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allowed[0, ..., 5:] = False
    kept = preserve_mass(alpha * allowed, allowed)
    torch.testing.assert_close(kept.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(kept[0, ..., 5:], torch.zeros(2, 5, 2, dtype=torch.float64))
    assert torch.equal(headdrop(alpha, 0.0), alpha)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(2, generator=torch.Generator().manual_seed(0)) >= 0.5
    dropped = headdrop(alpha, 0.5, generator=g)
    scale = 2 / max(int(keep.sum()), 1) if keep.any() else 0.0
    for h in range(2):
        torch.testing.assert_close(dropped[:, h], alpha[:, h] * (scale if keep[h] else 0.0))
    same = alpha[:, :1].expand(2, 3, 5, 7)
    assert float(head_divergence(same)) == 0.0
    two = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    two[0, 0, 0, 0] = two[0, 1, 0, 2] = 1.0  # stops at 0 and 2: variance 1
    assert float(head_divergence(two)) == pytest.approx(1.0)


# -- the variant ------------------------------------------------------------------------------


def _cross(seed: int = 0, **kw) -> attnlib.Attention:
    torch.manual_seed(seed)
    return attnlib.Attention(8, 2, variant="monotonic", **kw).double().eval()


@torch.no_grad()
def test_variant_equals_its_defining_equations() -> None:
    attn = _cross(chunk_size=3, init_r=0.5, inference="expected")
    x, ctx = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    kp = torch.ones(2, 9, dtype=torch.bool)
    kp[1, 6:] = False
    _, ex = attn(x, ctx, key_padding_mask=kp, return_extras=True)
    q, k, _ = attn.project(x, ctx)
    c = attn.core
    p = torch.sigmoid(q @ k.transpose(-1, -2) / 2.0 + c.r[None, :, None, None]) * kp[:, None, None, :]
    alpha = _alignment_loop(p)
    u = torch.einsum("bhnd,hde,bhme->bhnm", q, c.w_chunk, k) / 2.0
    beta = _beta_loop(alpha, u.masked_fill(~kp[:, None, None, :], -torch.inf), 3)
    torch.testing.assert_close(ex.weights, beta, rtol=0, atol=1e-12)


def test_hard_inference_is_online() -> None:
    """In eval (hard decisions) query i's output depends only on keys up to its heads' stops: the
    keys after them can arrive later (streaming)."""
    attn = _cross(chunk_size=2, init_r=1.0)
    x, ctx = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 12, 8, dtype=torch.float64)
    y, ex = attn(x, ctx, return_extras=True)
    q, k, _ = attn.project(x, ctx)
    p = torch.sigmoid(q @ k.transpose(-1, -2) / 2.0 + attn.core.r[None, :, None, None])
    _, stops = hard_alignment(p)
    assert (stops >= 0).any()
    for i in range(5):
        read = int(stops[0, :, : i + 1].max())
        if read < 0 or read == 11:
            continue
        ctx2 = ctx.clone()
        ctx2[:, read + 1 :] = torch.randn_like(ctx2[:, read + 1 :]) * 5
        torch.testing.assert_close(attn(x[:, : i + 1], ctx2)[:, i], y[:, i], rtol=0, atol=1e-12)
    assert (ex.weights.sum(-1) <= 1 + 1e-12).all()


def test_training_uses_noise_and_auxiliary_loss() -> None:
    attn = _cross(chunk_size=1, init_r=0.0, divergence_weight=0.5)
    x, ctx = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    attn.train()
    y1 = attn(x, ctx)
    aux = attnlib.aux_loss(attn)
    assert aux.dim() == 0 and float(aux.detach()) > 0
    assert not torch.allclose(y1, attn(x, ctx))  # noise
    attn.core.noise_std = 0.0
    attn.core.divergence_weight = 0.0
    y_train = attn(x, ctx)  # training without noise: the expected alignment
    attn.eval()
    attn.core.inference = "expected"
    torch.testing.assert_close(y_train, attn(x, ctx), rtol=0, atol=1e-12)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="inference must be one of"):
        MonotonicAttention(num_heads=2, head_dim=4, inference="soft")
    with pytest.raises(ValueError, match="threshold must be in"):
        MonotonicAttention(num_heads=2, head_dim=4, threshold=1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        MonotonicAttention(num_heads=2, head_dim=4, chunk_size=0)
    with pytest.raises(attnlib.UnsupportedError, match="monotonic"):
        attnlib.Attention(8, 2, variant="monotonic", causal=True)
    with pytest.raises(ValueError, match="p_choose must be"):
        expected_alignment(torch.zeros(2, 3))
