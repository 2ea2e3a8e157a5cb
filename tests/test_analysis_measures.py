"""attnlib.analysis measures against direct computations: entropy of known distributions, divergences,
rollout on a hand-made 2-layer example and the authors' recursion, attention flow, distances, segments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlib.analysis import (
    attention_distance,
    attention_flow,
    entropy,
    js_divergence,
    kl_divergence,
    l1_distance,
    rollout,
    segment_mass,
)

D64 = torch.float64


def _softmax_rows(*shape: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D64) * scale).softmax(-1)


# -- entropy -----------------------------------------------------------------------------------------


def test_entropy_of_known_distributions() -> None:
    m = 7
    uniform = torch.full((2, 3, 4, m), 1.0 / m, dtype=D64)
    assert torch.allclose(entropy(uniform), torch.full((2, 3, 4), math.log(m), dtype=D64), atol=1e-12)
    onehot = torch.nn.functional.one_hot(torch.arange(4) % m, m).to(D64).expand(2, 3, 4, m)
    assert torch.equal(entropy(onehot), torch.zeros(2, 3, 4, dtype=D64))  # 0 log 0 = 0, 1 log 1 = 0


def test_entropy_equals_explicit_sum_and_excludes_masked_keys() -> None:
    p = _softmax_rows(2, 2, 5, 6)
    got = entropy(p)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(5)).tolist():
        b, h, i = idx
        want = -sum(float(x) * math.log(float(x)) for x in p[b, h, i])
        assert got[b, h, i].item() == pytest.approx(want, abs=1e-12)
    # uniform over the allowed keys, some mass left on masked keys: the masked keys are excluded
    allowed = torch.tensor([True, True, False, True, False, False])
    w = torch.where(allowed, torch.full((6,), 1 / 3, dtype=D64), torch.full((6,), 0.25, dtype=D64))
    assert entropy(w[None], allowed).item() == pytest.approx(math.log(3), abs=1e-12)
    fully_masked = torch.zeros(1, 6, dtype=D64)
    assert entropy(fully_masked).item() == 0.0


def test_entropy_rejects_non_distributions() -> None:
    unnorm = torch.full((1, 4), 0.5, dtype=D64)
    with pytest.raises(ValueError, match="normalize=True"):
        entropy(unnorm)
    assert entropy(unnorm, normalize=True).item() == pytest.approx(math.log(4), abs=1e-12)
    with pytest.raises(ValueError, match="negative"):
        entropy(torch.tensor([[1.5, -0.5]], dtype=D64))
    with pytest.raises(ValueError, match="bool"):
        entropy(unnorm, torch.ones(4))
    with pytest.raises(ValueError, match="broadcast"):
        entropy(unnorm, torch.ones(3, dtype=torch.bool))


# -- divergences -------------------------------------------------------------------------------------


def test_divergences_equal_their_formulas() -> None:
    p, q = _softmax_rows(3, 5, seed=1), _softmax_rows(3, 5, seed=2)
    kl, js, l1 = kl_divergence(p, q), js_divergence(p, q), l1_distance(p, q)
    for r in range(3):
        pr, qr = p[r].tolist(), q[r].tolist()
        mr = [(a + b) / 2 for a, b in zip(pr, qr)]
        want_kl = sum(a * math.log(a / b) for a, b in zip(pr, qr))
        want_js = 0.5 * sum(a * math.log(a / c) for a, c in zip(pr, mr)) + 0.5 * sum(
            b * math.log(b / c) for b, c in zip(qr, mr)
        )
        assert kl[r].item() == pytest.approx(want_kl, abs=1e-12)
        assert js[r].item() == pytest.approx(want_js, abs=1e-12)
        assert l1[r].item() == pytest.approx(sum(abs(a - b) for a, b in zip(pr, qr)), abs=1e-12)
    assert torch.equal(kl_divergence(p, p), torch.zeros(3, dtype=D64))


def test_kl_is_infinite_where_q_has_no_mass_and_js_stays_bounded() -> None:
    p = torch.tensor([[0.5, 0.5]], dtype=D64)
    q = torch.tensor([[1.0, 0.0]], dtype=D64)
    assert math.isinf(kl_divergence(p, q).item())
    assert kl_divergence(q, p).item() == pytest.approx(math.log(2), abs=1e-12)
    assert 0 < js_divergence(p, q).item() <= math.log(2)
    assert js_divergence(q, torch.tensor([[0.0, 1.0]], dtype=D64)).item() == pytest.approx(math.log(2), abs=1e-12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 9), st.floats(0.1, 8.0), st.integers(0, 1000))
def test_divergence_properties(m: int, scale: float, seed: int) -> None:
    p, q = _softmax_rows(4, m, scale=scale, seed=seed), _softmax_rows(4, m, scale=scale, seed=seed + 1)
    js = js_divergence(p, q)
    assert bool((kl_divergence(p, q) >= -1e-12).all()) and bool((js >= -1e-12).all())
    assert bool((js <= math.log(2) + 1e-12).all())
    assert torch.allclose(js, js_divergence(q, p), atol=1e-12)
    assert bool((l1_distance(p, q) <= 2 + 1e-12).all())


# -- rollout and flow ----------------------------------------------------------------------------------


def _hand_made() -> list[torch.Tensor]:
    """2 layers, 2 heads, N = 2. Layer 1: identity and swap heads (mean: uniform); layer 2: both heads
    send every token to token 0."""
    eye, swap = torch.eye(2, dtype=D64), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D64)
    to0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D64)
    return [torch.stack([eye, swap])[None], torch.stack([to0, to0])[None]]


def test_rollout_on_a_hand_made_two_layer_example() -> None:
    # A1 = [[.5,.5],[.5,.5]] -> (A1 + I)/2 = [[.75,.25],[.25,.75]];  A2 -> (A2 + I)/2 = [[1,0],[.5,.5]]
    # rollout = Â2 Â1 = [[.75, .25], [.5, .5]]
    want = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]], dtype=D64)
    assert torch.allclose(rollout(_hand_made()), want, atol=1e-15)
    # attention flow: from output token 0 everything passes through layer-1 token 0 (capacity .75 / .25);
    # output token 1 splits .5/.5 over layer-1 tokens 0 and 1: max flows .75 and .75 -> [.5, .5]
    assert torch.allclose(attention_flow(_hand_made()), want, atol=1e-12)


def test_rollout_equals_the_authors_recursion() -> None:
    layers = [_softmax_rows(2, 3, 5, 5, seed=s) for s in range(4)]
    aug = []
    for w in layers:  # joint attention of the authors' code: (A + I) row-normalised, joint_i = aug_i joint_{i-1}
        a = w.mean(1) + torch.eye(5, dtype=D64)
        aug.append(a / a.sum(-1, keepdim=True))
    joint = aug[0]
    for a in aug[1:]:
        joint = torch.einsum("bij,bjk->bik", a, joint)
    got = rollout(layers)
    assert torch.allclose(got, joint, atol=1e-13)
    assert torch.allclose(got.sum(-1), torch.ones(2, 5, dtype=D64), atol=1e-13)
    assert torch.allclose(rollout(layers, residual=0.0), layers[3].mean(1) @ layers[2].mean(1) @ layers[1].mean(1)
                          @ layers[0].mean(1), atol=1e-13)  # fmt: skip


def test_flow_of_one_layer_is_the_augmented_attention() -> None:
    w = _softmax_rows(1, 2, 4, 4, seed=3)
    a = 0.5 * w.mean(1) + 0.5 * torch.eye(4, dtype=D64)
    assert torch.allclose(attention_flow([w]), a, atol=1e-9)
    f = attention_flow([w, _softmax_rows(1, 2, 4, 4, seed=4)])
    assert torch.allclose(f.sum(-1), torch.ones(1, 4, dtype=D64)) and bool((f >= 0).all())


def test_rollout_and_flow_validate_their_input() -> None:
    with pytest.raises(ValueError, match="every query row"):
        rollout([torch.rand(1, 2, 3, 5)])
    with pytest.raises(ValueError, match="non-empty sequence"):
        rollout(torch.rand(1, 2, 3, 3))
    with pytest.raises(ValueError, match="differs from layer 0"):
        rollout([_softmax_rows(1, 2, 3, 3), _softmax_rows(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(_hand_made(), head_fusion="median")
    with pytest.raises(ValueError, match="max_tokens"):
        attention_flow([_softmax_rows(1, 1, 9, 9)], max_tokens=8)
    # max over heads: layer 1 becomes all ones -> (ones + I) row-normalised = [[2/3, 1/3], [1/3, 2/3]]
    want = torch.tensor([2 / 3, 1 / 3], dtype=D64)
    assert torch.allclose(rollout(_hand_made(), head_fusion="max")[0, 0], want, atol=1e-15)


# -- distances and segments ----------------------------------------------------------------------------


def test_attention_distance_1d_equals_explicit_sum() -> None:
    w = _softmax_rows(2, 3, 6, 6, seed=5)
    got = attention_distance(w)
    b, h, i = 1, 2, 4
    want = sum(float(w[b, h, i, j]) * abs(i - j) for j in range(6))
    assert got[b, h, i].item() == pytest.approx(want, abs=1e-12)
    rows = torch.tensor([1, 5])
    assert torch.allclose(attention_distance(w[:, :, rows], rows=rows), got[:, :, rows], atol=1e-12)


def test_attention_distance_on_an_image_grid_with_a_class_token() -> None:
    # 2x2 patches of 4 pixels behind a class token: patch 0 attends half to itself, half to patch 3
    # (diagonal: 4 * sqrt(2) pixels) and some mass to the class token, which is left out
    w = torch.zeros(1, 1, 5, 5, dtype=D64)
    w[0, 0, 1, [0, 1, 4]] = torch.tensor([0.2, 0.4, 0.4], dtype=D64)
    w[0, 0, 2, 3] = 1.0  # patch 1 -> patch 2: (0,1) -> (1,0)
    w[0, 0, 0, 1] = 1.0
    d = attention_distance(w, grid=(2, 2), num_prefix=1, patch_size=4)
    assert math.isnan(d[0, 0, 0].item())
    assert d[0, 0, 1].item() == pytest.approx(0.5 * 4 * math.sqrt(2), abs=1e-12)
    assert d[0, 0, 2].item() == pytest.approx(4 * math.sqrt(2), abs=1e-12)
    with pytest.raises(ValueError, match="needs N"):
        attention_distance(w, grid=(3, 3), num_prefix=1)


def test_segment_mass_equals_explicit_sums() -> None:
    w = _softmax_rows(2, 3, 1, 8, seed=6)
    seg = torch.tensor([-1, 0, 0, 1, 1, 1, 2, -1])
    got = segment_mass(w, seg)
    assert got.shape == (2, 3, 1, 3)
    for s in range(3):
        assert torch.allclose(got[..., s], w[..., seg == s].sum(-1), atol=1e-15)
    assert torch.allclose(got.sum(-1) + w[..., seg == -1].sum(-1), w.sum(-1), atol=1e-14)
    with pytest.raises(ValueError, match="segment ids"):
        segment_mass(w, torch.tensor([0, 0, 0, 5, 0, 0, 0, -2]), 3)
