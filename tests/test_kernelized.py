"""kernelized_rpe (FFT path vs dense Toeplitz form, special cases) and fnet (vs explicit DFT matrices)."""

from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.functional.kernelized import (
    clipped_offset_bias,
    draw_random_features,
    fourier_mixing,
    kernelized_rpe_attention,
    kernelized_rpe_attention_2d,
    kernelized_rpe_reference,
    kernelized_rpe_reference_2d,
    positive_random_features,
    toeplitz_matmul,
    toeplitz_matrix,
)
from attnlib.masks import normalize_mask
from attnlib.testing import assert_close, make_qkv, max_error
from attnlib.variants.kernelized import share_rpe_bias

F64 = torch.float64


@pytest.fixture(autouse=True, params=["fft", "dense"])
def kernelized_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both forms of the 1-D kernelized product: the FFT (Toeplitz by FFT)
    and the dense row-blocked one that :func:`attnlib.dispatch.kernelized_dense` picks for short
    sequences (the threshold forced to 0 / to a huge length)."""
    from attnlib import dispatch

    monkeypatch.setattr(dispatch, "KERNELIZED_DENSE_MAX_N", 0 if request.param == "fft" else 1 << 30)
    return request.param


def rpe_inputs(b: int, h: int, n: int, d: int, *, m: int = 16, bias_scale: float = 0.5, seed: int = 0, dtype=F64):
    q, k, v = make_qkv(b, h, n, d, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    bias = (torch.randn(h, 2 * n - 1, generator=g, dtype=F64) * bias_scale).to(dtype)
    w = draw_random_features(m, d, generator=g, dtype=dtype)
    return q, k, v, bias, w


def key_padding(b: int, n: int, seed: int = 3) -> torch.Tensor:
    kp = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    kp[:, 0] = True
    return kp


# ------------------------------------------------------------------------------------------
# Toeplitz products
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_toeplitz_matmul_equals_dense(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    c = torch.randn(3, 2 * n - 1, generator=g, dtype=F64)
    x = torch.randn(3, n, 5, generator=g, dtype=F64)
    dense = toeplitz_matrix(c)
    i, j = 0, n - 1
    assert dense[0, i, j] == c[0, (j - i) + n - 1]  # T_ij = c_{j-i}
    torch.testing.assert_close(toeplitz_matmul(c, x), dense @ x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# kernelized_rpe: FFT path == dense Toeplitz form
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 33, 300])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fft_equals_dense_toeplitz_form_float64(n: int, causal: bool, padded: bool) -> None:
    q, k, v, bias, w = rpe_inputs(2, 3, n, 8, seed=n)
    kp = key_padding(2, n) if padded else None
    out, imp = kernelized_rpe_attention(q, k, v, bias, w, causal=causal, key_padding=kp, return_importance=True)
    ref, weights = kernelized_rpe_reference(q, k, v, bias, w, causal=causal, key_padding=kp)
    assert_close(out, ref, atol=1e-12, name="out")
    assert_close(imp, weights.mean(2), atol=1e-13, name="importance")
    if causal:
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # exp(-inf) on future offsets


def test_fft_path_variants_match_dense() -> None:
    """Per-head projection, one shared bias, small feature chunks, large bias range."""
    q, k, v, bias, _ = rpe_inputs(2, 3, 40, 8, bias_scale=2.0)
    w = torch.stack(
        [draw_random_features(12, 8, generator=torch.Generator().manual_seed(s), dtype=F64) for s in range(3)]
    )
    for b in (bias, bias[0]):
        for causal in (False, True):
            out = kernelized_rpe_attention(q, k, v, b, w, causal=causal, feature_chunk=5)
            ref, _ = kernelized_rpe_reference(q, k, v, b, w, causal=causal)
            assert_close(out, ref, atol=1e-11, name="per-head projection")


def test_float32_error_within_flex_rule_long_causal() -> None:
    """fp32 FFT vs float64 <= 10x the plain fp32 dense computation's error (the causal first rows
    would be ~1000x without the prefix refinement)."""
    q, k, v, bias, w = rpe_inputs(1, 2, 2048, 16, m=32, seed=5)
    for causal in (True, False):
        golden, _ = kernelized_rpe_reference(q, k, v, bias, w, causal=causal)
        f32 = [x.float() for x in (q, k, v, bias, w)]
        eager, _ = kernelized_rpe_reference(*f32, causal=causal, dtype=torch.float32)
        out = kernelized_rpe_attention(*f32, causal=causal)
        assert out.dtype == torch.float32
        assert_close(out, golden, eager, name=f"fp32 causal={causal}")


def test_causal_fft_is_exact_and_never_reads_later_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dyadic causal product (blocks of 4 rows, segments 4..32 at N = 45) equals the dense
    form, and a key scaled x1000 moves no earlier row by a single bit (one FFT over the whole
    sequence would spread its round-off, eps x 1000, over every row)."""
    from attnlib.functional import kernelized as kz

    monkeypatch.setattr(kz, "_CAUSAL_BLOCK", 4)
    q, k, v, bias, w = rpe_inputs(2, 3, 45, 8, bias_scale=1.0)
    kp = key_padding(2, 45)
    out = kernelized_rpe_attention(q, k, v, bias, w, causal=True, key_padding=kp)
    ref, _ = kernelized_rpe_reference(q, k, v, bias, w, causal=True, key_padding=kp)
    assert_close(out, ref, atol=1e-12, name="dyadic causal")
    f32 = [x.float() for x in (q, k, v, bias, w)]
    y = kernelized_rpe_attention(*f32, causal=True)
    for t in (3, 17, 30):
        v2 = f32[2].clone()
        v2[:, :, t] *= 1000
        y2 = kernelized_rpe_attention(f32[0], f32[1], v2, f32[3], f32[4], causal=True)
        assert torch.equal(y2[:, :, :t], y[:, :, :t]), f"row < {t} moved"
        assert not torch.equal(y2[:, :, t], y[:, :, t])


def test_zero_bias_is_normalised_performer() -> None:
    """b == 0: phi(q)(phi(k)^T v) / phi(q)·sum phi(k) (non-causal) and its prefix-sum form (causal)."""
    q, k, v, _, w = rpe_inputs(2, 2, 50, 8)
    zero = torch.zeros(2, 99, dtype=F64)
    pq = positive_random_features(q / q.norm(dim=-1, keepdim=True), w)
    pk = positive_random_features(k / k.norm(dim=-1, keepdim=True), w)
    lin = (pq @ (pk.transpose(-1, -2) @ v)) / (pq @ pk.sum(-2, keepdim=True).transpose(-1, -2))
    assert_close(kernelized_rpe_attention(q, k, v, zero, w), lin, atol=1e-12)
    kv = torch.cumsum(pk[..., :, None] * v[..., None, :], 2)  # (B, H, N, m, Dv)
    z = torch.cumsum(pk, 2)
    lin_c = torch.einsum("bhnm,bhnmd->bhnd", pq, kv) / (pq * z).sum(-1, keepdim=True)
    assert_close(kernelized_rpe_attention(q, k, v, zero, w, causal=True), lin_c, atol=1e-12)


def test_random_features_estimate_exp_kernel_and_softmax_with_rpe() -> None:
    """m -> inf: output -> softmax(q̂·k̂ + b_{j-i}) v, with Monte Carlo error ~ m^-1/2."""
    q, k, v, bias, _ = rpe_inputs(1, 2, 24, 8, bias_scale=1.0, seed=2)
    qh, kh = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    logits = qh @ kh.transpose(-1, -2) + toeplitz_matrix(bias)[None]
    exact = torch.softmax(logits, -1) @ v
    errs = []
    for m in (16, 4096):
        w = draw_random_features(m, 8, orthogonal=True, generator=torch.Generator().manual_seed(m), dtype=F64)
        errs.append(float((kernelized_rpe_attention(q, k, v, bias, w) - exact).square().mean().sqrt()))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 4  # RMS error: 0.11 (m=16), 0.01 (m=4096)
    w = draw_random_features(20000, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    est = positive_random_features(qh, w) @ positive_random_features(kh, w).transpose(-1, -2)
    assert (est / torch.exp(qh @ kh.transpose(-1, -2)) - 1).abs().max() < 0.1


def test_orthogonal_features_have_gaussian_row_norms_and_orthogonal_blocks() -> None:
    w = draw_random_features(20, 8, orthogonal=True, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert w.shape == (20, 8)
    block = w[:8] / w[:8].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)


def test_causal_prefix_unchanged_by_future_and_padding_rows_zero() -> None:
    q, k, v, bias, w = rpe_inputs(2, 2, 300, 8, seed=4)
    out = kernelized_rpe_attention(q, k, v, bias, w, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 150:] = torch.randn_like(k2[:, :, 150:]) * 5
    v2[:, :, 150:] = torch.randn_like(v2[:, :, 150:]) * 5
    out2 = kernelized_rpe_attention(q, k2, v2, bias, w, causal=True)
    torch.testing.assert_close(out2[:, :, :150], out[:, :, :150], rtol=0, atol=1e-12)
    kp = torch.ones(2, 300, dtype=torch.bool)
    kp[1] = False
    kp[0, :10] = False  # causal: the first 10 queries of example 0 see no real key
    qg = q.clone().requires_grad_(True)
    out, imp = kernelized_rpe_attention(qg, k, v, bias, w, causal=True, key_padding=kp, return_importance=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(
        out[0, :, :10], torch.zeros_like(out[0, :, :10])
    )
    assert torch.equal(imp[1], torch.zeros_like(imp[1]))
    (out.sum() + imp.sum()).backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_bf16_inputs_compute_in_float32() -> None:
    q, k, v, bias, w = rpe_inputs(1, 2, 100, 8)
    ref, _ = kernelized_rpe_reference(q, k, v, bias, w, causal=True)
    out = kernelized_rpe_attention(*(x.bfloat16() for x in (q, k, v, bias, w)), causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max_error(out, ref) < 5e-2


def test_functional_errors() -> None:
    q, k, v, bias, w = rpe_inputs(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"rpe_bias must be \(2N - 1,\) or \(H, 2N - 1\)"):
        kernelized_rpe_attention(q, k, v, bias[:, :5], w)
    with pytest.raises(ValueError, match="self-attention"):
        kernelized_rpe_attention(q, k[:, :, :5], v[:, :, :5], bias, w)
    with pytest.raises(ValueError, match=r"projection must be \(m, D=8\)"):
        kernelized_rpe_attention(q, k, v, bias, w[:, :4])
    with pytest.raises(ValueError, match=r"key_padding must be a bool tensor \(B, N\)"):
        kernelized_rpe_attention(q, k, v, bias, w, key_padding=torch.ones(1, 10))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        draw_random_features(0, 8)


# ------------------------------------------------------------------------------------------
# kernelized_rpe: the module
# ------------------------------------------------------------------------------------------


def test_module_bias_table_clips_offsets_and_learns_per_head() -> None:
    attn = attnlib.Attention(32, 4, variant="kernelized_rpe", num_features=8, max_distance=3, causal=True)
    core = attn.core
    with torch.no_grad():
        core.rpe_bias.copy_(torch.arange(7.0).expand(4, 7) + torch.arange(4.0)[:, None] * 10)
    table = core.bias_table(6)  # offsets -5..5, clipped to -3..3
    assert table.shape == (4, 11)
    assert table[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 6]
    assert table[2, 5] == 23  # offset 0 of head 2
    x = torch.randn(2, 20, 32)
    attn(x).square().mean().backward()
    g = core.rpe_bias.grad
    assert g is not None and (g[:, :4].abs().sum(-1) > 0).all()  # every head learns its past offsets
    assert torch.equal(g[:, 4:], torch.zeros_like(g[:, 4:]))  # future offsets unused when causal


def test_module_matches_functional_and_weights_are_dense_form() -> None:
    attn = attnlib.Attention(32, 4, variant="kernelized_rpe", num_features=16, max_distance=40).double()
    with torch.no_grad():
        attn.core.rpe_bias.normal_(0, 0.5)
    x = torch.randn(2, 30, 32, dtype=F64)
    q, k, v = attn.project(x)
    am = normalize_mask(None, causal=False, batch=2, heads=4, n=30, m=30, device=torch.device("cpu"))
    res = attn.core(q, k, v, am, need_weights=True, need_importance=True)
    ref, w = kernelized_rpe_reference(q, k, v, attn.core.bias_table(30), attn.core.projection)
    assert_close(res.out, ref, atol=1e-12)
    assert_close(res.weights, w, atol=1e-12)
    assert_close(res.importance, w.mean(2), atol=1e-12)
    old = attn.core.projection.clone()
    attn.core.redraw_features(torch.Generator().manual_seed(9))
    assert not torch.equal(old, attn.core.projection) and attn.core.projection.dtype == F64


# ------------------------------------------------------------------------------------------
# fnet
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_2d_fft_equals_the_2d_relative_position_equation(prefix: int, padded: bool) -> None:
    """out_i = sum_j exp(b[r_j - r_i, c_j - c_i]) phi(q_i)·phi(k_j) v_j / (same without v), by loops."""
    gh, gw, h = 3, 5, 2
    n = gh * gw + prefix
    q, k, v = make_qkv(2, h, n, 8, dtype=F64, logit_scale=2.0, seed=4)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(h, 2 * gh - 1, 2 * gw - 1, generator=g, dtype=F64)
    proj = draw_random_features(16, 8, generator=g).to(F64)
    kp = key_padding(2, n) if padded else None
    out, imp = kernelized_rpe_attention_2d(q, k, v, bias, proj, (gh, gw), key_padding=kp, return_importance=True)
    phi = lambda x: positive_random_features(torch.nn.functional.normalize(x, dim=-1), proj)  # noqa: E731
    pq, pk = phi(q), phi(k)

    w = torch.zeros(2, h, n, n, dtype=F64)
    for i in range(n):
        for j in range(n):
            if i >= prefix and j >= prefix:
                (ri, ci), (rj, cj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
                cw = bias[:, rj - ri + gh - 1, cj - ci + gw - 1].exp()
            else:
                cw = torch.ones(h, dtype=F64)
            real = 1.0 if kp is None else kp[:, j].to(F64)[:, None]
            w[:, :, i, j] = cw * (pq[:, :, i] * pk[:, :, j]).sum(-1) * real
    w = w / w.sum(-1, keepdim=True)
    assert_close(out, w @ v)
    assert_close(imp, w.mean(2))
    ref, wr = kernelized_rpe_reference_2d(q, k, v, bias, proj, (gh, gw), key_padding=kp)
    assert_close(ref, w @ v)
    assert_close(wr, w)


def test_2d_module_uses_the_grid_and_shares_the_bias_across_layers() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, variant="kernelized_rpe", grid=(4, 4), num_features=8).double()
    assert attn.core.rpe_bias.shape == (2, 7, 7)
    x = torch.randn(2, 17, 16, dtype=torch.float64)  # a class token + 4 x 4 patches
    y, ex = attn(x, return_extras=True)
    q, k, v = attn.project(x)
    ref, w = kernelized_rpe_reference_2d(q, k, v, attn.core.rpe_bias, attn.core.projection, (4, 4))
    assert_close(ex.weights, w)
    assert_close(y, attn.out_proj(ref.transpose(1, 2).reshape(2, 17, 16)))
    # a cell's right neighbour is one column away, its raster successor at a row end is not
    with torch.no_grad():
        attn.core.rpe_bias.zero_()
        attn.core.rpe_bias[:, 3, 4] = 5.0  # offset (0, +1)
    _, ex = attn(x, return_extras=True)
    assert ex.weights[0, 0, 1 + 3, 1 + 4] < ex.weights[0, 0, 1 + 2, 1 + 3] / 10  # (0, 3) -> (1, 0) wraps: no bias
    with pytest.raises(attnlib.UnsupportedError, match="non-causal"):
        attnlib.Attention(16, 2, variant="kernelized_rpe", grid=(4, 4), causal=True).double()(x)
    model = torch.nn.Sequential(*[attnlib.Attention(16, 2, variant="kernelized_rpe", grid=(4, 4)) for _ in range(3)])
    shared = share_rpe_bias(model)
    assert all(m.core.rpe_bias is shared for m in model)
    assert sum(p.numel() for p in model.parameters() if p is shared) == shared.numel()
    with pytest.raises(ValueError, match="differ"):
        share_rpe_bias(torch.nn.Sequential(model[0], attnlib.Attention(16, 2, variant="kernelized_rpe")))


def dft(n: int) -> torch.Tensor:
    idx = torch.arange(n, dtype=F64)
    return torch.exp(-2j * math.pi * idx[:, None] * idx[None, :] / n)


@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_fourier_mixing_equals_dft_matrices(norm: str) -> None:
    x = torch.randn(3, 10, 6, dtype=F64)
    y = (dft(10) @ x.to(torch.complex128) @ dft(6)).real
    if norm == "ortho":
        y = y / math.sqrt(60)
    out = fourier_mixing(x, norm=norm)
    assert out.dtype == F64 and out.shape == x.shape
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)
    # linearity, and a circular shift along the sequence keeps the complex magnitudes
    x2 = torch.randn_like(x)
    torch.testing.assert_close(fourier_mixing(2 * x - x2, norm=norm), 2 * out - fourier_mixing(x2, norm=norm))
    mag = torch.fft.fft2(x).abs()
    torch.testing.assert_close(torch.fft.fft2(torch.roll(x, 3, dims=1)).abs(), mag)


def test_fnet_variant_mixes_all_heads_values() -> None:
    attn = attnlib.Attention(24, 3, variant="fnet", norm="backward").double()
    x = torch.randn(2, 9, 24, dtype=F64)
    _, _, v = attn.project(x)
    mixed = fourier_mixing(v.transpose(1, 2).reshape(2, 9, 24))  # hidden = all heads' values
    expected = attn.out_proj(mixed)
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-10)
    y16 = attn.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    with pytest.raises(attnlib.UnsupportedError, match="fnet"):
        attnlib.Attention(24, 3, variant="fnet", causal=True)
    with pytest.raises(attnlib.UnsupportedError, match="fnet"):
        attn.double()(x, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm must be"):
        attnlib.Attention(24, 3, variant="fnet", norm="forward")


def test_dense_and_fft_forms_agree_and_auto_picks_dense_for_short_sequences() -> None:
    """The two forms give the same output and importance (float64), causal or not, with padding;
    "auto" equals the form the dispatch rule names; a bad method is refused."""
    from attnlib import dispatch

    q, k, v, bias, w = rpe_inputs(2, 3, 40, 8)
    kp = key_padding(2, 40)
    for causal in (False, True):
        fft = kernelized_rpe_attention(
            q, k, v, bias, w, causal=causal, key_padding=kp, return_importance=True, method="fft"
        )
        dense = kernelized_rpe_attention(
            q, k, v, bias, w, causal=causal, key_padding=kp, return_importance=True, method="dense"
        )
        for a, b in zip(fft, dense):
            assert_close(a, b, atol=1e-10)
        auto = kernelized_rpe_attention(q, k, v, bias, w, causal=causal, key_padding=kp, return_importance=True)
        want = dense if dispatch.kernelized_dense(40) else fft
        assert all(torch.equal(a, b) for a, b in zip(auto, want))
    with pytest.raises(ValueError, match="method"):
        kernelized_rpe_attention(q, k, v, bias, w, method="direct")  # type: ignore[arg-type]


@pytest.mark.parametrize("reach", [0, 3, 20, 150])
@pytest.mark.parametrize("causal", [False, True])
def test_clipped_bias_windows_and_running_sums_equal_dense_form(reach: int, causal: bool) -> None:
    """A bias clipped beyond ±R: row blocks read their window of keys densely and the rest through
    running sums at the constant weight; equal to the dense Toeplitz form (values and importance),
    with key padding and per-head biases."""
    from attnlib.functional.kernelized import _constant_reach

    n = 100
    q, k, v, _, w = rpe_inputs(2, 3, n, 8, seed=reach)
    table = torch.randn(3, 2 * reach + 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    bias = clipped_offset_bias(table, n, reach)
    assert _constant_reach(bias) == (min(reach, n - 1), min(reach, n - 1))
    kp = key_padding(2, n)
    out, imp = kernelized_rpe_attention(q, k, v, bias, w, causal=causal, key_padding=kp, return_importance=True)
    ref, weights = kernelized_rpe_reference(q, k, v, bias, w, causal=causal, key_padding=kp)
    assert_close(out, ref, atol=1e-12, name="out")
    assert_close(imp, weights.mean(2), atol=1e-13, name="importance")
