"""softmax_attention backends and local attention against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.functional import (
    local_attention,
    local_importance,
    reference_attention,
    softmax_attention,
    softmax_attention_importance,
    softmax_importance,
)
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow
from attnlib.testing import assert_close, make_qkv


def _masks(b: int, h: int, n: int, m: int):
    g = torch.Generator().manual_seed(n + m)
    kp = torch.rand(b, m, generator=g) > 0.3
    kp[1] = False  # an empty batch row
    full = torch.rand(b, h, n, m, generator=g) > 0.5
    yield "none", None
    yield "key_padding", KeyPadding(kp)
    yield "full", full
    yield "window", SlidingWindow(3, 1)
    yield "block", BlockMask.from_dense(torch.rand(1, h, n, m, generator=g) > 0.5, 8)
    yield "all", [KeyPadding(kp), full, SlidingWindow(5, 5)]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize(("n", "m", "h_kv"), [(17, 17, 4), (9, 30, 2), (30, 9, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_backends_equal_reference(backend: str, n: int, m: int, h_kv: int, causal: bool) -> None:
    for dtype in (torch.float64, torch.float32):
        q, k, v = make_qkv(2, 4, n, 16, m=m, h_kv=h_kv, dtype=dtype, logit_scale=5.0)
        for label, mask in _masks(2, 4, n, m):
            ref = reference_attention(q, k, v, mask=mask, causal=causal)
            out = softmax_attention(q, k, v, mask=mask, causal=causal, backend=backend)
            eager = softmax_attention(q, k, v, mask=mask, causal=causal, backend="math")
            assert_close(out, ref, eager, name=f"{backend}/{label}/{dtype}")


def test_softmax_weights_and_importance() -> None:
    q, k, v = make_qkv(2, 4, 20, 8, m=13, dtype=torch.float64, logit_scale=3.0)
    kp = torch.rand(2, 13) > 0.4
    out, w = softmax_attention(q, k, v, mask=KeyPadding(kp), causal=True, return_weights=True)
    ref, wr = reference_attention(q, k, v, mask=KeyPadding(kp), causal=True, return_weights=True)
    assert_close(out, ref)
    assert_close(w, wr)
    assert_close(softmax_importance(q, k, mask=KeyPadding(kp), causal=True, chunk_size=3), wr.mean(2))
    assert not (w[..., ~kp[0]][0] != 0).any()  # masked keys get zero weight


@pytest.mark.parametrize("chunk", [3, 512])
def test_one_pass_output_and_importance_equal_reference(chunk: int) -> None:
    """One Q K^T pass gives out and importance == the float64 oracle (GQA, masks, empty rows)."""
    q, k, v = make_qkv(2, 4, 20, 8, m=13, h_kv=2, dtype=torch.float64, logit_scale=3.0)
    kp = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.4
    kp[1] = False  # a row with no allowed key: zeros, never NaN
    out, imp = softmax_attention_importance(q, k, v, mask=KeyPadding(kp), causal=True, chunk_size=chunk)
    ref, wr = reference_attention(q, k, v, mask=KeyPadding(kp), causal=True, return_weights=True)
    assert_close(out, ref)
    assert_close(imp, wr.mean(2))
    assert out[1].abs().max() == 0 and imp[1].abs().max() == 0
    # float32, no mask: the same as SDPA + the separate importance pass
    q, k, v = make_qkv(3, 2, 17, 16, logit_scale=2.0)
    out, imp = softmax_attention_importance(q, k, v, chunk_size=chunk)
    ref, wr = reference_attention(q, k, v, return_weights=True)
    assert_close(out, ref, softmax_attention(q, k, v, backend="math"))
    torch.testing.assert_close(imp, softmax_importance(q, k), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_size"):
        softmax_attention_importance(q, k, v, chunk_size=0)


def test_short_row_softmax_equals_torch_softmax() -> None:
    """The explicit softmax used on CPU for rows shorter than SHORT_ROW keys (masked entries included)."""
    from attnlib.dispatch import SHORT_ROW
    from attnlib.functional.softmax import _softmax_rows

    g = torch.Generator().manual_seed(0)
    for m in (1, 9, SHORT_ROW - 1, SHORT_ROW):
        x = 4 * torch.randn(3, 5, m, dtype=torch.float64, generator=g)
        x[..., 0] = float("-inf") if m > 1 else x[..., 0]
        torch.testing.assert_close(_softmax_rows(x), torch.softmax(x, -1), rtol=0, atol=1e-15)
        x32 = x.float()
        torch.testing.assert_close(_softmax_rows(x32), torch.softmax(x32, -1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m", [1, 9, 31, 32, 40])
def test_masked_row_softmax_zeros_masked_and_empty_rows(m: int) -> None:
    """``_softmax_rows(x, allowed)``: equal to softmax over the allowed entries (float64 reference),
    exact zeros where masked and on rows with nothing allowed, also when logits span more
    than the float32 exponent range (the short-row path floors exponents to skip subnormals)."""
    from attnlib.functional.softmax import _softmax_rows

    g = torch.Generator().manual_seed(m)
    x = 30 * torch.randn(4, 6, m, dtype=torch.float64, generator=g)  # exp(x - max) down to e^-200
    allowed = torch.rand(4, 1, m, generator=g) > 0.4
    allowed[0] = False  # a batch row with no allowed key
    allowed[1, 0, 0] = True
    ref = torch.softmax(x.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    for dt, tol in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        p = _softmax_rows(x.to(dt), allowed)
        torch.testing.assert_close(p.double(), ref, rtol=0, atol=tol)
        assert torch.all(p.masked_select(~allowed.expand_as(p)) == 0)
        assert torch.all(p[0] == 0)


def test_softmax_core_importance_comes_from_the_output_pass() -> None:
    """The softmax core asked for importance only returns the one-pass result (backend auto), exactly."""
    attn = attnlib.Attention(16, 2).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    kp = torch.ones(2, 9, dtype=torch.bool)
    kp[0, 6:] = False
    y, ex = attn(x, key_padding_mask=kp, return_extras=True, need_weights=False)
    y_w, ex_w = attn(
        x, key_padding_mask=kp, return_extras=True, need_weights=True
    )  # explicit weights: the reference path
    torch.testing.assert_close(y, y_w, rtol=0, atol=1e-14)
    torch.testing.assert_close(ex.importance, ex_w.weights.mean((1, 2)), rtol=0, atol=1e-14)
    torch.testing.assert_close(
        y, attn(x, key_padding_mask=kp), rtol=1e-12, atol=1e-12
    )  # SDPA output without importance


def test_softmax_causal_cross_is_bottom_right() -> None:
    """One decoding query over a cache of M keys sees all of them."""
    q, k, v = make_qkv(1, 2, 1, 8, m=6, dtype=torch.float64)
    assert_close(softmax_attention(q, k, v, causal=True), softmax_attention(q, k, v))


def test_softmax_empty_rows_have_zero_output_and_finite_grads() -> None:
    q, k, v = make_qkv(2, 2, 5, 8, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    kp = torch.ones(2, 5, dtype=torch.bool)
    kp[0] = False
    out = softmax_attention(q, k, v, mask=KeyPadding(kp))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.slow
def test_softmax_flex_backend_equals_reference() -> None:
    q, k, v = make_qkv(2, 4, 40, 16, m=24, h_kv=2, logit_scale=3.0)
    kp = torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    ref = reference_attention(q, k, v, mask=KeyPadding(kp), causal=True)
    out = softmax_attention(q, k, v, mask=KeyPadding(kp), causal=True, backend="flex", compile_flex=False)
    eager = softmax_attention(q, k, v, mask=KeyPadding(kp), causal=True, backend="math")
    assert_close(out, ref, eager)
    bm = BlockMask.from_dense(torch.rand(1, 4, 40, 24, generator=torch.Generator().manual_seed(2)) > 0.5, 16)
    ref = reference_attention(q, k, v, mask=bm)
    out = softmax_attention(q, k, v, mask=bm, backend="flex", compile_flex=False)
    assert_close(out, ref, softmax_attention(q, k, v, mask=bm, backend="math"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("n", "window", "chunk"), [(1, 1, None), (7, 2, 4), (50, 3, 8), (100, 20, None), (33, 64, 16), (64, 1, 1)]
)
def test_local_equals_banded_softmax(causal: bool, n: int, window: int, chunk: int | None) -> None:
    q, k, v = make_qkv(2, 4, n, 8, h_kv=2, dtype=torch.float64, logit_scale=4.0)
    g = torch.Generator().manual_seed(n)
    kp = torch.rand(2, n, generator=g) > 0.3
    full = torch.rand(2, 1, n, n, generator=g) > 0.3
    for mask in (None, KeyPadding(kp), [KeyPadding(kp), full]):
        ref, w = reference_attention(
            q, k, v, mask=[mask, SlidingWindow(window, window)], causal=causal, return_weights=True
        )
        out = local_attention(q, k, v, window, mask=mask, causal=causal, chunk_size=chunk)
        assert_close(out, ref)
        imp = local_importance(q, k, window, mask=mask, causal=causal, chunk_size=chunk)
        assert_close(imp, w.mean(2))


def test_local_window_at_least_n_is_dense() -> None:
    q, k, v = make_qkv(1, 2, 30, 8, dtype=torch.float64)
    assert_close(local_attention(q, k, v, 30), reference_attention(q, k, v))
    assert_close(local_attention(q, k, v, 29, causal=True), reference_attention(q, k, v, causal=True))


def test_local_fp32_within_flex_rule() -> None:
    q, k, v = make_qkv(1, 4, 300, 32, dtype=torch.float64, logit_scale=10.0)
    ref = reference_attention(q, k, v, mask=SlidingWindow(17, 17))
    qf, kf, vf = q.float(), k.float(), v.float()
    eager = softmax_attention(qf, kf, vf, mask=SlidingWindow(17, 17), backend="math")
    assert_close(local_attention(qf, kf, vf, 17), ref, eager)


def test_local_gradients_match_reference() -> None:
    q, k, v = make_qkv(1, 2, 40, 8, dtype=torch.float64)
    kp = torch.rand(1, 40) > 0.2
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    local_attention(*ins, 5, mask=KeyPadding(kp), causal=True).square().sum().backward()
    reference_attention(*refs, mask=[KeyPadding(kp), SlidingWindow(5, 5)], causal=True).square().sum().backward()
    for a, r in zip(ins, refs):
        assert_close(a.grad, r.grad)


@pytest.mark.slow
def test_local_memory_is_linear_at_16k() -> None:
    """N=16384, H=8, D=64: peak memory growth under 1 GiB (never an N x N tensor)."""
    import subprocess
    import sys

    code = r"""
import resource, torch
from attnlib.functional import local_attention
torch.set_num_threads(2)
q, k, v = (torch.randn(1, 8, 16384, 64) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for causal in (False, True):
    out = local_attention(q, k, v, 256, causal=causal)
    assert torch.isfinite(out).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = float(res.stdout.strip().splitlines()[-1])
    assert growth_mib < 1024, f"peak memory grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize("m", [9, 40])  # short rows (explicit CPU softmax) and long ones
def test_softmax_query_weights_equal_the_row_of_the_float64_weights(m: int) -> None:
    """One query's weights under causal / key-padding / window / block masks and GQA == the oracle's row."""
    from attnlib.functional import softmax_query_weights

    n = 12
    q, k, v = make_qkv(2, 4, n, 8, m=m, h_kv=2, logit_scale=3.0, dtype=torch.float64, seed=3)
    kp = torch.rand(2, m, generator=torch.Generator().manual_seed(0)) > 0.3
    kp[1] = False  # a batch row with no key: its weights are zeros
    band = BlockMask.from_mask_mod(lambda b, h, i, j: j <= i + 4, None, None, n, m, block_size=4)
    masks = [None, KeyPadding(kp), SlidingWindow(3, 3), [KeyPadding(kp), SlidingWindow(2, 5)], band]
    for mask in masks:
        for causal in (False, True):
            _, w = reference_attention(q, k, v, mask=mask, causal=causal, return_weights=True)
            for query in (0, 7, -1):
                row = softmax_query_weights(q, k, query, mask=mask, causal=causal)
                assert row.shape == (2, 4, 1, m)
                torch.testing.assert_close(row, w[:, :, [query]].nan_to_num(0.0), rtol=0, atol=1e-14)
    assert torch.equal(
        softmax_query_weights(q, k, 0, mask=KeyPadding(kp))[1], torch.zeros(4, 1, m, dtype=torch.float64)
    )
    row32 = softmax_query_weights(q.float(), k.float(), 3, mask=KeyPadding(kp))
    ref32 = reference_attention(q, k, v, mask=KeyPadding(kp), return_weights=True)[1][:, :, [3]]
    torch.testing.assert_close(row32.double(), ref32, rtol=0, atol=1e-6)
    for bad in (n, -n - 1, 1.0, True):
        with pytest.raises(ValueError, match=rf"query must be an int in \[-{n}, {n}\)"):
            softmax_query_weights(q, k, bad)  # type: ignore[arg-type]


def test_weights_query_keeps_the_fast_output_path() -> None:
    """The class-token row alone leaves the output on SDPA: bit-identical to a call without extras."""
    attn = attnlib.Attention(16, 2, rope=True).eval()
    x = torch.randn(3, 40, 16)
    kp = torch.ones(3, 40, dtype=torch.bool)
    kp[0, 30:] = False
    y, ex = attn(x, key_padding_mask=kp, return_extras=True, weights_query=0)
    assert torch.equal(y, attn(x, key_padding_mask=kp))
    _, full = attn(x, key_padding_mask=kp, return_extras=True, need_weights=True)
    torch.testing.assert_close(ex.weights, full.weights[:, :, :1], rtol=0, atol=1e-6)
    dec = attnlib.Attention(16, 2, causal=True)
    with pytest.raises(ValueError, match="weights_query= is not supported with cache="):
        dec(x[:, :2], cache=dec.init_cache(3), return_extras=True, weights_query=0)


def test_cpu_key_padding_rule_and_padded_sdpa_equals_the_reference() -> None:
    """Keys padded to the CPU vector width (masked) give the reference softmax (masks, empty rows, GQA, grads)."""
    from attnlib.dispatch import cpu_key_padding, cpu_vector_width

    w = cpu_vector_width()
    cpu = torch.device("cpu")
    assert cpu_key_padding(2 * w - 1, cpu, torch.float32) == 1
    assert cpu_key_padding(2 * w, cpu, torch.float32) == 0
    assert cpu_key_padding(2 * w + 1, cpu, torch.float32) == 0
    assert cpu_key_padding(2 * w - 1, cpu, torch.float64) == 0
    assert cpu_key_padding(2 * w - 1, torch.device("meta"), torch.float32) == 0
    m = 2 * w - 2  # a padded length
    assert cpu_key_padding(m, cpu, torch.float32) == 2
    q, k, v = make_qkv(3, 4, 7, 16, m=m, h_kv=2, logit_scale=3.0, dtype=torch.float64, seed=4)
    kp = torch.rand(3, m, generator=torch.Generator().manual_seed(1)) > 0.3
    kp[2] = False  # a row with no key: zeros
    for mask in (None, KeyPadding(kp)):
        ref = reference_attention(q, k, v, mask=mask).nan_to_num(0.0)
        q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, k, v))
        out = softmax_attention(q32, k32, v32, mask=mask, backend="sdpa")
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
        out.square().sum().backward()
        qd, kd, vd = (t.clone().requires_grad_(True) for t in (q, k, v))
        reference_attention(qd, kd, vd, mask=mask).nan_to_num(0.0).square().sum().backward()
        for got, want in ((q32, qd), (k32, kd), (v32, vd)):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=1e-4)
