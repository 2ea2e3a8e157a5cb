"""Linear Transformer, Performer, cosFormer and linear self-attention against their quadratic definitions.

Every reference below is written from the papers' equations with the explicit (N, M) matrix,
independently of the library code, and compared in float64 at 1e-10.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.errors import UnsupportedError
from attnlib.functional import (
    cosformer_attention,
    linear_attention,
    linear_self_attention,
    performer_attention,
    performer_projection,
)
from attnlib.functional.linear import performer_feature_logits
from attnlib.masks import KeyPadding, SlidingWindow, normalize_mask
from attnlib.testing import make_qkv, rel_error

ATOL = 1e-10
SHAPES = [(37, 37, 4), (37, 37, 2), (19, 30, 4), (30, 11, 1)]  # (N, M, H_kv) with H = 4


def _pad_mask(b: int, m: int, seed: int = 3) -> torch.Tensor:
    kp = torch.rand(b, m, generator=torch.Generator().manual_seed(seed)) > 0.3
    kp[0, 0] = True
    kp[1] = False  # a batch row with no real key
    return kp


def _allowed(n: int, m: int, causal: bool, kp: torch.Tensor | None) -> torch.Tensor:
    a = torch.ones(1, 1, n, m, dtype=torch.bool)
    if causal:
        a = a & torch.ones(n, m, dtype=torch.bool).tril()
    if kp is not None:
        a = a & kp[:, None, None, :]
    return a


def _expand(k: torch.Tensor, h: int) -> torch.Tensor:
    return k.repeat_interleave(h // k.shape[1], 1)


def ref_kernel(qf, kf, v, allowed, norm):
    """W = norm(A) for A = qf kf^T on allowed pairs; returns (W @ v, W)."""
    a = (qf @ kf.transpose(-1, -2)) * allowed
    w = norm(a)
    w = torch.nan_to_num(w)
    return w @ v, w


def ref_linear(q, k, v, causal, kp, fm="elu", eps=1e-6):
    phi = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu}[fm]
    k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    return ref_kernel(
        phi(q), phi(k), v, _allowed(q.shape[2], k.shape[2], causal, kp), lambda a: a / (a.sum(-1, True) + eps)
    )


def ref_cosformer(q, k, v, causal, kp, eps=1e-6, length=None):
    """L = max(N, M), or max(N, 1 + the last real key) per example with key padding."""
    k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    n, m = q.shape[2], k.shape[2]
    if length is None:
        last = (
            m
            if kp is None
            else torch.tensor([max([j + 1 for j in range(m) if kp[b, j]], default=0) for b in range(len(kp))])
        )
        length = torch.clamp(torch.as_tensor(last, dtype=q.dtype), min=n).reshape(-1, 1, 1, 1)
    i = torch.arange(1, n + 1, dtype=q.dtype)[:, None]
    j = torch.arange(1, m + 1, dtype=q.dtype)[None, :]
    cos = torch.cos(math.pi / 2 * (i - j) / length)
    a = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * cos * _allowed(n, m, causal, kp)
    w = a / a.sum(-1, True).clamp_min(eps)
    return w @ v, w


def ref_lsa(q, k, v, causal, kp, normalize):
    k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    allowed = _allowed(q.shape[2], k.shape[2], causal, kp)
    a = (q @ k.transpose(-1, -2)) * allowed
    if normalize == "none":
        w = a
    elif normalize == "n":
        w = a / allowed.any(-2, keepdim=True).sum(-1, keepdim=True).clamp_min(1)  # real keys
    else:
        w = a / allowed.sum(-1, keepdim=True).clamp_min(1)
    return w @ v, w


def ref_performer(q, k, v, w_proj, causal, kp):
    """The FAVOR+ estimator computed with unstabilised features (float64)."""
    k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    scale = q.shape[-1] ** -0.5
    qf = performer_feature_logits(q, w_proj, scale).exp() / math.sqrt(w_proj.shape[0])
    kf = performer_feature_logits(k, w_proj, scale).exp() / math.sqrt(w_proj.shape[0])
    return ref_kernel(qf, kf, v, _allowed(q.shape[2], k.shape[2], causal, kp), lambda a: a / a.sum(-1, True))


def _cases():
    for n, m, hkv in SHAPES:
        for causal in [False, True] if n == m else [False]:
            for padded in (False, True):
                yield n, m, hkv, causal, padded


def _check(fn, ref, n, m, hkv, causal, padded, chunks=(1, 7, 16, 64)):
    q, k, v = make_qkv(2, 4, n, 8, m=m, h_kv=hkv, dtype=torch.float64, logit_scale=4.0, seed=n + m)
    kp = _pad_mask(2, m) if padded else None
    out_ref, w_ref = ref(q, k, v, causal, kp)
    imp_ref = w_ref.mean(-2)
    km = None if kp is None else KeyPadding(kp)
    for c in chunks if causal else chunks[:1]:
        out, imp = fn(q, k, v, causal=causal, mask=km, chunk_size=c, return_importance=True)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(imp, imp_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(fn(q, k, v, causal=causal, mask=km, chunk_size=c), out_ref, rtol=0, atol=ATOL)
    out_e, w, imp_e = fn(q, k, v, causal=causal, mask=km, return_weights=True, return_importance=True)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out_e, w @ _expand(v, 4), rtol=0, atol=ATOL)
    torch.testing.assert_close(imp_e, imp_ref, rtol=0, atol=ATOL)
    if padded:
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # the row with no real key


@pytest.mark.parametrize(("n", "m", "hkv", "causal", "padded"), list(_cases()))
@pytest.mark.usefixtures("block_size")
def test_linear_attention_oracle(n, m, hkv, causal, padded) -> None:
    _check(linear_attention, ref_linear, n, m, hkv, causal, padded)


@pytest.mark.usefixtures("block_size")
def test_linear_attention_relu_feature_map() -> None:
    def fn(*a, **kw):
        return linear_attention(*a, feature_map="relu", **kw)

    _check(fn, lambda *a: ref_linear(*a, fm="relu"), 37, 37, 4, True, True)


@pytest.mark.parametrize(("n", "m", "hkv", "causal", "padded"), list(_cases()))
@pytest.mark.usefixtures("block_size")
def test_cosformer_oracle(n, m, hkv, causal, padded) -> None:
    _check(cosformer_attention, ref_cosformer, n, m, hkv, causal, padded)


def test_cosformer_max_len_and_left_equals_right_product() -> None:
    q, k, v = make_qkv(2, 4, 20, 8, dtype=torch.float64, seed=1)
    out = cosformer_attention(q, k, v, causal=True, max_len=64, chunk_size=3)
    torch.testing.assert_close(out, ref_cosformer(q, k, v, True, None, length=64)[0], rtol=0, atol=ATOL)
    assert not torch.allclose(out, cosformer_attention(q, k, v, causal=True))  # L matters
    with pytest.raises(ValueError, match="max_len"):
        cosformer_attention(q, k, v, max_len=10)


@pytest.mark.parametrize("causal", [False, True])
def test_cosformer_padded_example_equals_the_example_alone(causal: bool) -> None:
    """L is each example's own length: with 30 of 40 tokens real the padded row equals the 30 tokens
    run alone (the padded length, L = 40, was 0.03 off in float64)."""
    q, k, v = make_qkv(3, 4, 40, 8, dtype=torch.float64, seed=3)
    kp = torch.arange(40)[None, :] < torch.tensor([30, 40, 7])[:, None]
    out = cosformer_attention(q, k, v, causal=causal, mask=KeyPadding(kp), query_padding=kp, chunk_size=16)
    for b, n in enumerate((30, 40, 7)):
        alone = cosformer_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal=causal)
        torch.testing.assert_close(out[b : b + 1, :, :n], alone, rtol=0, atol=ATOL)
    if not causal:  # cross-attention: 40 queries, keys padded; L = max(N, M_b)
        kc, vc = k[:, :, :33], v[:, :, :33]
        out = cosformer_attention(q, kc, vc, mask=KeyPadding(kp[:, :33]), chunk_size=16)
        for b, m in enumerate((30, 33, 7)):
            torch.testing.assert_close(
                out[b : b + 1],
                cosformer_attention(q[b : b + 1], kc[b : b + 1, :, :m], vc[b : b + 1, :, :m]),
                rtol=0,
                atol=ATOL,
            )


@pytest.mark.parametrize("normalize", ["n", "prefix_count", "none"])
@pytest.mark.parametrize(
    ("n", "m", "hkv", "causal", "padded"), [c for c in _cases() if c[0] == 37] + [(19, 30, 4, False, True)]
)
@pytest.mark.usefixtures("block_size")
def test_lsa_oracle(normalize, n, m, hkv, causal, padded) -> None:
    def fn(*a, **kw):
        return linear_self_attention(*a, normalize=normalize, **kw)

    _check(fn, lambda *a: ref_lsa(*a, normalize), n, m, hkv, causal, padded, chunks=(1, 16))


def test_lsa_hand_weights_equal_one_gd_step() -> None:
    """With W^KQ = diag(n η I, 0), W^PV = e_{d+1} e_{d+1}^T, LSA's prediction is GD-1: η x_q^T Σ y_i x_i."""
    g = torch.Generator().manual_seed(0)
    d, n, eta = 5, 24, 0.03
    x = torch.randn(n + 1, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w
    e = torch.cat([x, y[:, None]], 1)  # tokens (n + 1, d + 1); the last is the query
    e[-1, -1] = 0.0
    wkq = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    wkq[:d, :d] = n * eta * torch.eye(d, dtype=torch.float64)
    q = (e @ wkq.T)[None, None, -1:]  # the query token's projected query (B, H, 1, d + 1)
    k = e[None, None, :n]  # keys/values: the n examples (the query column is excluded)
    v = e[None, None, :n]  # W^PV picks the label coordinate below
    out = linear_self_attention(q, k, v, normalize="n")
    y_hat = out[0, 0, 0, -1]
    torch.testing.assert_close(y_hat, eta * x[-1] @ (x[:n].T @ y[:n]), rtol=0, atol=1e-12)


# ---- Performer ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "hkv", "causal", "padded"), list(_cases()))
@pytest.mark.usefixtures("block_size")
def test_performer_equals_favor_estimator(n, m, hkv, causal, padded) -> None:
    w_proj = performer_projection(24, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def fn(*a, **kw):
        return performer_attention(*a[:3], w_proj, **kw)

    _check(fn, lambda q, k, v, c, kp: ref_performer(q, k, v, w_proj, c, kp), n, m, hkv, causal, padded)


def test_performer_error_falls_with_num_features() -> None:
    q, k, v = make_qkv(2, 4, 48, 16, dtype=torch.float64, logit_scale=0.3, seed=3)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    errs = []
    for m in (16, 64, 256, 1024):
        e = []
        for s in range(6):
            proj = performer_projection(m, 16, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            e.append(rel_error(performer_attention(q, k, v, proj), exact))
        errs.append(sum(e) / len(e))
    assert all(b < 0.75 * a for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 0.25 * errs[0], errs


def test_performer_orthogonal_features_are_haar_and_unbiased() -> None:
    d = 6
    w = performer_projection(3 * d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for blk in w.split(d):  # rows of a block are orthogonal
        gram = blk @ blk.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-10)
    # sign fix: the Q factor is Haar, so E[Q_00] = 0 (without the fix it is biased positive)
    diag = torch.stack(
        [
            performer_projection(
                d, d, scaling="sqrt_d", generator=torch.Generator().manual_seed(s), dtype=torch.float64
            )[0, 0]
            / math.sqrt(d)
            for s in range(3000)
        ]
    )
    assert abs(float(diag.mean())) < 4 * float(diag.std()) / math.sqrt(3000)
    # unbiased kernel estimate of exp(x·y)
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(d, generator=g, dtype=torch.float64) * 0.4,
        torch.randn(d, generator=g, dtype=torch.float64) * 0.4,
    )
    est = []
    for s in range(400):
        wp = performer_projection(d, d, generator=torch.Generator().manual_seed(100 + s), dtype=torch.float64)
        est.append((performer_feature_logits(x, wp, 1.0).exp() * performer_feature_logits(y, wp, 1.0).exp()).mean())
    est_t = torch.stack(est)
    assert abs(float(est_t.mean()) - math.exp(float(x @ y))) < 4 * float(est_t.std()) / math.sqrt(400)


def test_performer_projection_deterministic_and_validated() -> None:
    a = performer_projection(10, 4, generator=torch.Generator().manual_seed(3))
    b = performer_projection(10, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (10, 4)
    assert not torch.equal(a, performer_projection(10, 4, generator=torch.Generator().manual_seed(4)))
    iid = performer_projection(10, 4, orthogonal=False, generator=torch.Generator().manual_seed(3))
    assert iid.shape == (10, 4)
    with pytest.raises(ValueError, match="num_features"):
        performer_projection(0, 4)
    with pytest.raises(ValueError, match="scaling"):
        performer_projection(4, 4, scaling="bad")  # type: ignore[arg-type]
    q, k, v = make_qkv(1, 1, 4, 4)
    with pytest.raises(ValueError, match="projection"):
        performer_attention(q, k, v, torch.zeros(8, 5))


def test_performer_module_seed_and_redraw() -> None:
    def make():
        torch.manual_seed(0)
        return attnlib.Attention(32, 4, variant="performer", redraw_interval=2, seed=7, num_features=None)

    a, b = make(), make()
    assert torch.equal(a.core.projection, b.core.projection)
    assert a.core.num_features == int(8 * math.log(8))
    x = torch.randn(2, 10, 32)
    w0 = a.core.projection.clone()
    a.eval()
    a(x)
    a(x)
    assert torch.equal(a.core.projection, w0)  # no redraw in eval
    a.train()
    a(x)
    assert torch.equal(a.core.projection, w0)
    a(x)  # 2nd training forward: redraw
    assert not torch.equal(a.core.projection, w0)
    b.train()
    b(x)
    b(x)
    assert torch.equal(a.core.projection, b.core.projection)  # deterministic redraws
    c = attnlib.Attention(32, 4, variant="performer", seed=7, num_features=None)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.core.projection, a.core.projection) and int(c.core.draws) == 1


def test_performer_stable_at_large_logits_in_float32() -> None:
    """Max-shift stabilisation: no overflow where exp(q·k/sqrt(D)) would overflow fp32."""
    q, k, v = make_qkv(1, 2, 64, 16, logit_scale=40.0, seed=1)  # exp(q·k/sqrt(D)) up to ~e^160
    w_proj = performer_projection(64, 16, generator=torch.Generator().manual_seed(0))
    for causal in (False, True):
        out = performer_attention(q, k, v, w_proj, causal=causal, chunk_size=8)
        assert torch.isfinite(out).all()
        ref = performer_attention(q.double(), k.double(), v.double(), w_proj.double(), causal=causal)
        assert rel_error(out, ref) < 1e-3


# ---- shared behaviour -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_at_64k_tokens_accumulate_in_fp32(dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 1, 65536, 16, seed=0)
    w_proj = performer_projection(16, 16, generator=torch.Generator().manual_seed(0))
    fns = {
        "linear": lambda *a, **kw: linear_attention(*a, **kw),
        "cosformer": lambda *a, **kw: cosformer_attention(*a, **kw),
        "performer": lambda *a, **kw: performer_attention(*a[:3], w_proj, **kw),
        "lsa": lambda *a, **kw: linear_self_attention(*a, **kw),
    }
    for name, fn in fns.items():
        for causal in (False, True):
            ref = fn(q, k, v, causal=causal, chunk_size=256)
            out = fn(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, chunk_size=256)
            assert out.dtype == dtype
            assert torch.isfinite(out).all(), (name, causal)
            assert rel_error(out, ref) < 2e-2, (name, causal, rel_error(out, ref))


def test_unsupported_masks_and_bad_arguments_raise() -> None:
    q, k, v = make_qkv(2, 2, 8, 4)
    full = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    for fn in (linear_attention, cosformer_attention, linear_self_attention):
        with pytest.raises(UnsupportedError, match="key-padding"):
            fn(q, k, v, mask=full)
        with pytest.raises(UnsupportedError, match="key-padding"):
            fn(q, k, v, mask=SlidingWindow(2, 2))
        q2, k2, v2 = make_qkv(2, 2, 8, 4, m=5)
        with pytest.raises(UnsupportedError, match="N == M"):
            fn(q2, k2, v2, causal=True)
        with pytest.raises(ValueError, match="chunk_size"):
            fn(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="softplus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize"):
        linear_self_attention(q, k, v, normalize="sqrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown option"):
        attnlib.Attention(32, 4, variant="linear", windw=3)


@pytest.mark.parametrize("name", ["linear", "performer", "cosformer", "lsa"])
def test_module_explicit_mode_matches_fast_path(name: str) -> None:
    torch.manual_seed(0)
    fast = attnlib.Attention(32, 4, variant=name, causal=True).double()
    slow = attnlib.Attention(32, 4, variant=name, causal=True, explicit=True).double()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y, ex = fast(x, return_extras=True, need_weights=False)
    y2, ex2 = slow(x, return_extras=True)
    torch.testing.assert_close(y, y2, rtol=0, atol=ATOL)
    torch.testing.assert_close(ex.importance, ex2.importance, rtol=0, atol=ATOL)
    assert ex.weights is None and ex2.weights is not None and ex2.weights.shape == (2, 4, 19, 19)


@pytest.mark.parametrize("block", [1, 300, 1000, 5000, 1 << 21])
@pytest.mark.parametrize("split_rows", [True, False])
def test_slabs_cover_every_batch_row_and_head_once(
    block: int, split_rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The non-causal work units partition (B, H) and their output slices are contiguous."""
    from attnlib.functional import _scan

    monkeypatch.setattr(_scan, "BLOCK_ELEMENTS", block)
    b, h, n, width = 3, 4, 37, 8
    units = _scan.slabs(b, h, n, width, 4, split_rows=split_rows)
    seen = torch.zeros(b, h, dtype=torch.long)
    out = torch.empty(b, h, n, 5)
    for bsl, hsl, rows in units:
        seen[bsl, hsl] += 1
        assert rows == n or (split_rows and rows % 4 == 0 and rows < n)
        assert out[bsl, hsl, :rows].is_contiguous()
    assert torch.equal(seen, torch.ones_like(seen))


def test_performer_defaults_are_the_official_favor_plus() -> None:
    """256 orthogonal features with chi row norms, redrawn for every training call, fixed in eval."""
    from attnlib.registry import get_variant

    core = get_variant("performer")(num_heads=2, head_dim=16)
    assert core.projection.shape == (256, 16) and core.orthogonal and core.scaling == "chi"
    assert core.redraw_interval == 1
    q, k, v = make_qkv(1, 2, 10, 16, dtype=torch.float32, seed=1)
    mask = normalize_mask(None, causal=False, batch=1, heads=2, n=10, m=10, device=torch.device("cpu"))
    core.train()
    w0 = core.projection.clone()
    core(q, k, v, mask)
    w1 = core.projection.clone()
    core(q, k, v, mask)
    assert not torch.equal(w0, w1) and not torch.equal(w1, core.projection)
    core.eval()
    w2 = core.projection.clone()
    out = core(q, k, v, mask).out
    assert torch.equal(core.projection, w2) and torch.equal(core(q, k, v, mask).out, out)
