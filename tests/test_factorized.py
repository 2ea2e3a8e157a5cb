"""CoaT conv-attention against its defining equations, computed the slow way in float64."""

from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.functional.factorized import conv_relative_position, crpe_head_split, factorized_attention
from attnlib.functional.grid import most_square_grid
from attnlib.masks import normalize_mask
from attnlib.testing import make_qkv
from attnlib.variants.factorized import CoaTAttention

ATOL = 1e-12


def ref_factorized(q, k, v, kp=None):
    """Loops: s_jc = exp(k_jc) / sum_j' exp(k_j'c) over the real keys; out_i = scale * sum_c q_ic sum_j s_jc v_j."""
    b, h, n, d = q.shape
    m = k.shape[2]
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        real = [j for j in range(m) if kp is None or bool(kp[bi, j])]
        for hi in range(h):
            s = torch.zeros(m, d, dtype=torch.float64)
            for c in range(d):
                den = sum(math.exp(float(k[bi, hi, j, c])) for j in real)
                for j in real:
                    s[j, c] = math.exp(float(k[bi, hi, j, c])) / den
            for i in range(n):
                acc = torch.zeros(v.shape[-1], dtype=torch.float64)
                for c in range(d):
                    for j in real:
                        acc += q[bi, hi, i, c] * s[j, c] * v[bi, hi, j]
                out[bi, hi, i] = acc * d**-0.5
    return out


def ref_crpe(q, v, kernels, biases, split, grid, prefix):
    """Per head and channel, the 2-D convolution with zero padding as explicit loops."""
    b, h, _, d = q.shape
    gh, gw = grid
    ev = torch.zeros_like(q)
    head_kernel = [k for k, heads in split.items() for _ in range(heads)]
    for bi in range(b):
        for hi in range(h):
            ks = head_kernel[hi]
            g = list(split).index(ks)
            first = sum(split[kk] for kk in list(split)[:g])
            for c in range(d):
                ch = (hi - first) * d + c  # channel inside the group's kernel
                w = kernels[g][ch, 0]
                for y in range(gh):
                    for x in range(gw):
                        acc = float(biases[g][ch])
                        for dy in range(ks):
                            for dx in range(ks):
                                yy, xx = y + dy - ks // 2, x + dx - ks // 2
                                if 0 <= yy < gh and 0 <= xx < gw:
                                    acc += float(w[dy, dx]) * float(v[bi, hi, prefix + yy * gw + xx, c])
                        t = prefix + y * gw + x
                        ev[bi, hi, t, c] = q[bi, hi, t, c] * acc
    return ev


def test_factorized_equals_loop_reference_and_associativity() -> None:
    q, k, v = make_qkv(2, 2, 5, 3, m=7, dtype=torch.float64, logit_scale=4.0, seed=1)
    out, w, imp = factorized_attention(q, k, v, return_weights=True, return_importance=True)
    torch.testing.assert_close(out, ref_factorized(q, k, v), rtol=0, atol=ATOL)
    # associativity: Q (softmax_N(K)^T V) == (Q softmax_N(K)^T) V, the explicit N x M path
    torch.testing.assert_close(w @ v, out, rtol=0, atol=ATOL)
    torch.testing.assert_close(imp, w.mean(2), rtol=0, atol=ATOL)


def test_factorized_key_padding_is_attention_over_the_real_keys() -> None:
    q, k, v = make_qkv(2, 2, 4, 3, m=6, dtype=torch.float64, logit_scale=4.0, seed=2)
    kp = torch.tensor([[True, False, True, True, False, True], [False, False, False, False, False, False]])
    out = factorized_attention(q, k, v, key_padding=kp)
    torch.testing.assert_close(out, ref_factorized(q, k, v, kp), rtol=0, atol=ATOL)
    real = kp[0]
    torch.testing.assert_close(out[:1], factorized_attention(q[:1], k[:1, :, real], v[:1, :, real]), rtol=0, atol=ATOL)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_factorized_permutations() -> None:
    """Equivariant in the query rows, invariant to permuting (K, V) rows together."""
    q, k, v = make_qkv(1, 2, 6, 4, m=6, dtype=torch.float64, seed=3)
    out = factorized_attention(q, k, v)
    p = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(factorized_attention(q[:, :, p], k, v), out[:, :, p], rtol=0, atol=ATOL)
    torch.testing.assert_close(factorized_attention(q, k[:, :, p], v[:, :, p]), out, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("heads", "expected"), [(8, {3: 2, 5: 3, 7: 3}), (4, {3: 1, 5: 1, 7: 2}), (1, {7: 1})])
def test_crpe_head_split(heads, expected) -> None:
    assert crpe_head_split(heads) == expected
    assert crpe_head_split(heads, 5) == {5: heads}
    with pytest.raises(ValueError, match="odd kernel sizes"):
        crpe_head_split(heads, {4: heads})
    with pytest.raises(ValueError, match="summing to num_heads"):
        crpe_head_split(heads, {3: heads + 1})


@pytest.mark.parametrize(("prefix", "grid"), [(1, (3, 3)), (0, (2, 4))])
def test_crpe_equals_per_channel_convolution_loops(prefix, grid) -> None:
    """The official 8-head split {3: 2, 5: 3, 7: 3}; prefix rows are 0; non-square grid given explicitly."""
    h, d = 8, 2
    n = prefix + grid[0] * grid[1]
    q, _, v = make_qkv(2, h, n, d, dtype=torch.float64, seed=4)
    split = crpe_head_split(h)
    g = torch.Generator().manual_seed(5)
    kernels = [torch.randn(heads * d, 1, ks, ks, generator=g, dtype=torch.float64) for ks, heads in split.items()]
    biases = [torch.randn(heads * d, generator=g, dtype=torch.float64) for ks, heads in split.items()]
    ev = conv_relative_position(q, v, kernels, biases, num_prefix_tokens=prefix, grid=grid)
    torch.testing.assert_close(ev, ref_crpe(q, v, kernels, biases, split, grid, prefix), rtol=0, atol=ATOL)
    assert torch.equal(ev[:, :, :prefix], torch.zeros_like(ev[:, :, :prefix]))
    # CRPE is positional: permuting the tokens does not permute its output
    p = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    moved = conv_relative_position(q[:, :, p], v[:, :, p], kernels, biases, num_prefix_tokens=prefix, grid=grid)
    assert not torch.allclose(moved, ev[:, :, p])


def _core(**kw) -> CoaTAttention:
    torch.manual_seed(0)
    return CoaTAttention(num_heads=4, head_dim=4, **kw).double()


def test_coat_is_factorized_plus_crpe_and_zero_kernels_leave_factorized() -> None:
    core = _core(num_prefix_tokens=1)
    q, k, v = make_qkv(2, 4, 10, 4, dtype=torch.float64, seed=6)
    am = normalize_mask(None, causal=False, batch=2, heads=4, n=10, m=10, device=torch.device("cpu"))
    out = core(q, k, v, am).out
    split = crpe_head_split(4)
    ref = ref_factorized(q, k, v) + ref_crpe(
        q, v, [c.weight.detach() for c in core.convs], [c.bias.detach() for c in core.convs], split, (3, 3), 1
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    for c in core.convs:
        torch.nn.init.zeros_(c.weight)
        torch.nn.init.zeros_(c.bias)
    torch.testing.assert_close(core(q, k, v, am).out, factorized_attention(q, k, v), rtol=0, atol=ATOL)


def test_coat_errors_are_clear() -> None:
    with pytest.raises(attnlib.UnsupportedError, match="'coat' does not support causal=True"):
        attnlib.Attention(16, 4, variant="coat", causal=True)
    with pytest.raises(attnlib.UnsupportedError, match="'factorized' does not support causal=True"):
        attnlib.Attention(16, 4, variant="factorized", causal=True)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) has 16 cells but the sequence has 15 grid tokens"):
        attnlib.Attention(16, 4, variant="coat", grid=(4, 4))(torch.randn(1, 15, 16))
    with pytest.raises(ValueError, match="grid must be None or a pair"):
        attnlib.Attention(16, 4, variant="coat", grid=(3, 0))
    # an explicit non-square grid and prefix tokens
    y = attnlib.Attention(16, 4, variant="coat", grid=(3, 5), num_prefix_tokens=2)(torch.randn(1, 17, 16))
    assert y.shape == (1, 17, 16)
    # without a grid: the most square factorisation of each call's length (3 x 5 for 15, 1 x 7 for 7)
    torch.manual_seed(0)
    auto = attnlib.Attention(16, 4, variant="coat").double()
    explicit = attnlib.Attention(16, 4, variant="coat").double()
    for n, grid in ((15, (3, 5)), (7, (1, 7)), (16, (4, 4))):
        explicit.load_state_dict(auto.state_dict())
        explicit.core.grid = grid
        x = torch.randn(2, n, 16, dtype=torch.float64)
        torch.testing.assert_close(auto(x), explicit(x), rtol=0, atol=0)
    assert most_square_grid(512) == (16, 32) and most_square_grid(13) == (1, 13)
