"""AFT-full / local / simple / conv against the paper's per-channel definition, computed explicitly."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.errors import UnsupportedError
from attnlib.functional import aft_conv, aft_full, aft_local, aft_simple
from attnlib.functional._scan import prefix_sum
from attnlib.functional.aft import conv_offsets
from attnlib.masks import normalize_mask
from attnlib.testing import rel_error

ATOL = 1e-10


def ref_aft(q, k, v, w, *, causal=False, kp=None, gate=True):
    """Y_tc = σ(Q_tc) Σ_t' exp(K_t'c + w_tt') V_t'c / Σ_t' exp(K_t'c + w_tt'), with the (T, T', C) tensor.

    w: (T, T') or per-head (H, T, T') for (B, H, T, C) inputs. Returns (out, per-channel key mass).
    """
    t, tk = q.shape[-2], k.shape[-2]
    wb = w[..., :, :, None]  # (..., T, T', 1)
    logits = k[..., None, :, :] + wb  # (..., T, T', C)
    allowed = torch.ones(t, tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    al = allowed[..., None]
    if kp is not None:
        al = al & kp.reshape(kp.shape[0], *([1] * (q.dim() - 3)), 1, tk, 1)
    e = torch.where(al, torch.exp(logits), torch.zeros((), dtype=q.dtype))
    den = e.sum(-2)
    a = torch.nan_to_num(e / den[..., None, :])
    out = (a * v[..., None, :, :]).sum(-2)
    if gate:
        out = torch.sigmoid(q) * out
    return out, a.mean(-3)


def _inputs(t=23, tk=None, seed=0, kscale=3.0):
    g = torch.Generator().manual_seed(seed)
    tk = t if tk is None else tk
    q = torch.randn(2, 3, t, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, tk, 5, generator=g, dtype=torch.float64) * kscale
    v = torch.randn(2, 3, tk, 5, generator=g, dtype=torch.float64)
    w = torch.randn(t, tk, generator=g, dtype=torch.float64) * 2
    kp = torch.rand(2, tk, generator=g) > 0.3
    kp[1, :2] = False  # leading pads: the first causal rows see no real key
    return q, k, v, w, kp


def _band(w, window):
    t, tk = w.shape
    d = (torch.arange(t)[:, None] - torch.arange(tk)[None, :]).abs()
    return torch.where(d < window, w, torch.zeros((), dtype=w.dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_aft_full_local_simple_oracles(causal: bool, padded: bool) -> None:
    q, k, v, w, kp = _inputs()
    kp = kp if padded else None
    for c in (1, 4, 7, 64):
        for label, fn, wdef in (
            ("full", lambda **kw: aft_full(q, k, v, w, **kw), w),
            ("local", lambda **kw: aft_local(q, k, v, w, 4, **kw), _band(w, 4)),
            ("simple", lambda **kw: aft_simple(q, k, v, **kw), torch.zeros_like(w)),
        ):
            out, imp = fn(causal=causal, mask=kp, chunk_size=c, return_importance=True)
            ref, ref_imp = ref_aft(q, k, v, wdef, causal=causal, kp=kp)
            torch.testing.assert_close(out, ref, rtol=0, atol=ATOL, msg=f"{label} c={c}")
            torch.testing.assert_close(imp, ref_imp, rtol=0, atol=ATOL, msg=f"{label} importance c={c}")
            fast = fn(causal=causal, mask=kp, chunk_size=c)  # without importance (fast paths)
            torch.testing.assert_close(fast, ref, rtol=0, atol=ATOL, msg=f"{label} fast c={c}")


@pytest.mark.parametrize("causal", [False, True])
def test_aft_conv_equals_full_with_toeplitz_bias(causal: bool) -> None:
    q, k, v, _, kp = _inputs(t=19)
    g = torch.Generator().manual_seed(1)
    for size in (1, 4, 5):
        f = torch.randn(3, size, generator=g, dtype=torch.float64)
        d = torch.arange(19)[None, :] - torch.arange(19)[:, None]  # t' - t
        wt = torch.zeros(3, 19, 19, dtype=torch.float64)
        for j, off in enumerate(conv_offsets(size, causal).tolist()):
            wt = torch.where(d == off, f[:, j, None, None], wt)
        for c in (3, 64):
            out, imp = aft_conv(q, k, v, f, causal=causal, mask=kp, chunk_size=c, return_importance=True)
            ref, ref_imp = ref_aft(q, k, v, wt[None], causal=causal, kp=kp)
            torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
            torch.testing.assert_close(imp, ref_imp, rtol=0, atol=ATOL)
        tied = k.mean(-1, keepdim=True)  # key tied to the heads: broadcast over channels
        ref, _ = ref_aft(q, tied.expand_as(k), v, wt[None], causal=causal)
        torch.testing.assert_close(aft_conv(q, tied, v, f, causal=causal), ref, rtol=0, atol=ATOL)


def test_aft_cross_attention_and_factorised_bias() -> None:
    q, k, v, _, kp = _inputs(t=11, tk=17)
    g = torch.Generator().manual_seed(2)
    u, vv = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    w = u[:11] @ vv[:17].T
    torch.testing.assert_close(aft_full(q, k, v, (u, vv), mask=kp), ref_aft(q, k, v, w, kp=kp)[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(aft_full(q, k, v, w), aft_full(q, k, v, (u, vv)), rtol=0, atol=ATOL)
    torch.testing.assert_close(aft_simple(q, k, v), ref_aft(q, k, v, torch.zeros_like(w))[0], rtol=0, atol=ATOL)
    with pytest.raises(UnsupportedError, match="T == T'"):
        aft_full(q, k, v, w, causal=True)


def test_aft_named_special_cases() -> None:
    q, k, v, w, _ = _inputs(t=16)
    # simple = softmax-over-time pooling, the same vector for every t (before the gate)
    pooled = (torch.softmax(k, -2) * v).sum(-2, keepdim=True)
    torch.testing.assert_close(aft_simple(q, k, v, query_gate="none"), pooled.expand_as(q), rtol=0, atol=ATOL)
    # w = 0 and σ_q ≡ 1: every row identical, for full and local alike
    zero = torch.zeros_like(w)
    for out in (aft_full(q, k, v, zero, query_gate="none"), aft_local(q, k, v, zero, 3, query_gate="none")):
        torch.testing.assert_close(out, pooled.expand_as(out), rtol=0, atol=ATOL)
    # local with a window covering everything is full; window 1 keeps only the diagonal of w
    torch.testing.assert_close(aft_local(q, k, v, w, 16), aft_full(q, k, v, w), rtol=0, atol=ATOL)
    diag_only = torch.diag(torch.diagonal(w))
    torch.testing.assert_close(aft_local(q, k, v, w, 1), ref_aft(q, k, v, diag_only)[0], rtol=0, atol=ATOL)
    # outside the window the bias is 0, not -inf: far keys still contribute
    assert rel_error(aft_local(q, k, v, w, 2), ref_aft(q, k, v, torch.where(_band(w, 2) != 0, w, -1e9))[0]) > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_aft_stable_for_large_keys_and_bias_in_float32(causal: bool) -> None:
    """K ~ N(0, 12^2) and w ~ N(0, 10^2): e^{K + w} spans far beyond fp32; shifted sums stay accurate.

    (AFT-local/conv read the out-of-band sums from prefix/suffix sums; "total minus band" would
    lose ~1e-3 here to cancellation.)
    """
    q, k, v, w, _ = _inputs(kscale=12.0)
    w = w * 5
    for fn in (
        lambda a, b, c, ww, **kw: aft_full(a, b, c, ww, **kw),
        lambda a, b, c, ww, **kw: aft_local(a, b, c, ww, 5, **kw),
        lambda a, b, c, ww, **kw: aft_simple(a, b, c, **kw),
    ):
        ref = fn(q, k, v, w, causal=causal, chunk_size=8)
        out = fn(q.float(), k.float(), v.float(), w.float(), causal=causal, chunk_size=8)
        assert torch.isfinite(out).all()
        assert rel_error(out, ref) < 1e-5


def test_aft_causal_rows_keep_their_terms_when_a_later_key_is_huge() -> None:
    """A key of +120 after row t (same row block) must not flush row t's terms to zero in fp32.

    e^{K - 120} underflows for ordinary keys when the shift is shared with the later key; the
    causal row blocks are split instead (outputs and importance equal the float64 oracle).
    """
    q, k, v, w, kp = _inputs(t=23)
    k[:, :, 9] = 0.0
    k[0, 1, 9, 2] = 120.0
    k[1, 2, 14, 0] = 150.0
    for label, fn, wdef in (
        ("full", lambda a, b, c, ww, **kw: aft_full(a, b, c, ww, **kw), w),
        ("local", lambda a, b, c, ww, **kw: aft_local(a, b, c, ww, 4, **kw), _band(w, 4)),
        ("simple", lambda a, b, c, ww, **kw: aft_simple(a, b, c, **kw), torch.zeros_like(w)),
    ):
        ref, ref_imp = ref_aft(q, k, v, wdef, causal=True, kp=kp)
        for c in (8, 64):
            args = (q.float(), k.float(), v.float(), w.float())
            out, imp = fn(*args, causal=True, mask=kp, chunk_size=c, return_importance=True)
            assert rel_error(out, ref) < 1e-5, f"{label} c={c}"
            assert rel_error(imp, ref_imp) < 1e-5, f"{label} importance c={c}"
            assert rel_error(fn(*args, causal=True, mask=kp, chunk_size=c), ref) < 1e-5, f"{label} fast c={c}"


@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_prefix_sums_carry_the_running_total_over_many_blocks(reverse: bool) -> None:
    """prefix_sum's blocked form (> 64 rows: per-block triangular products + a scan of the block
    totals) equals cumsum at every length, with 3 and more blocks and ragged ends."""
    g = torch.Generator().manual_seed(0)
    for t, block in ((1, 64), (64, 64), (65, 64), (129, 64), (200, 64), (300, 64), (23, 4), (9, 2)):
        x = torch.randn(2, 3, t, 5, generator=g, dtype=torch.float64)
        want = x.flip(-2).cumsum(-2).flip(-2) if reverse else x.cumsum(-2)
        torch.testing.assert_close(prefix_sum(x, reverse=reverse, block=block), want, rtol=0, atol=1e-12)


def test_aft_local_over_several_prefix_blocks() -> None:
    """300 tokens: the out-of-band sums come from prefix / suffix sums over 5 blocks of 64 rows."""
    q, k, v, _, kp = _inputs(t=300, seed=4)
    w = torch.randn(300, 300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q, k, v = q[:1, :1], k[:1, :1], v[:1, :1]
    ref, ref_imp = ref_aft(q, k, v, _band(w, 6), kp=kp[:1])
    out, imp = aft_local(q, k, v, w, 6, mask=kp[:1], return_importance=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(imp, ref_imp, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_aft_half_precision_long_sequence() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 65536, 16, generator=g) for _ in range(3))
    for causal in (False, True):
        ref = aft_simple(q, k * 4, v, causal=causal)
        out = aft_simple(q.half(), (k * 4).half(), v.half(), causal=causal)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        assert rel_error(out, ref) < 1e-2


def test_aft_modules() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    conv = attnlib.Attention(32, 4, variant="aft_conv").double()  # γ = β = 0: starts as AFT-simple
    simple = attnlib.Attention(32, 4, variant="aft_simple").double()
    simple.load_state_dict(conv.state_dict(), strict=False)
    q, k, v = conv.project(x)
    am = normalize_mask(None, causal=False, batch=2, heads=4, n=12, m=12, device=x.device)
    tied = conv.core(q, k, v, am).out
    torch.testing.assert_close(
        tied, simple.core(q, k.mean(-1, keepdim=True).expand_as(k), v, am).out, rtol=0, atol=ATOL
    )
    with pytest.raises(ValueError, match="max_len"):
        attnlib.Attention(32, 4, variant="aft_full", max_len=8).double()(x)
    with pytest.raises(UnsupportedError, match="aft_local"):
        attnlib.Attention(32, 4, variant="aft_local").double()(x, context=x)
    with pytest.raises(ValueError, match="window"):
        attnlib.Attention(32, 4, variant="aft_local", window=0)
    _, ex = attnlib.Attention(32, 4, variant="aft_full", causal=True).double()(x, return_extras=True)
    assert ex.weights is None and ex.importance is not None and ex.importance.shape == (2, 12)
    torch.testing.assert_close(ex.importance.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=ATOL)


def test_functional_aft_takes_key_padding_as_a_tensor_or_keypadding() -> None:
    """The AFT functions take key padding as the (B, T') tensor or as masks.KeyPadding, like the other
    families; the two give the same result."""
    from attnlib.functional import aft_full, aft_local, aft_simple
    from attnlib.masks import KeyPadding

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(9, 9, generator=g, dtype=torch.float64)
    kp = torch.arange(9)[None, :] < torch.tensor([[5], [9]])
    for fn, args in ((aft_full, (q, k, v, w)), (aft_local, (q, k, v, w, 3)), (aft_simple, (q, k, v))):
        a = fn(*args, mask=kp)
        b = fn(*args, mask=KeyPadding(kp))
        assert torch.equal(a, b), fn.__name__
        assert not torch.allclose(a, fn(*args)), fn.__name__  # padding changes the result
