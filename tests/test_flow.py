"""Flowformer against its quadratic definition, its conservation identities and its ablations."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.errors import UnsupportedError
from attnlib.functional import flow_attention, linear_attention
from attnlib.functional.flow import flow_quantities
from attnlib.masks import KeyPadding
from attnlib.testing import make_qkv, rel_error

ATOL = 1e-10


def ref_flow(q, k, v, *, causal=False, clamp=None, kp=None, qp=None, comp_on=True, alloc_on=True):
    """Flowformer from the explicit N x M capacity matrix A = σ(Q) σ(K)^T (spec §1b/§1c)."""
    qt, kt = torch.sigmoid(q), torch.sigmoid(k)
    if qp is not None:
        qt = qt * qp[:, None, :, None]
    if kp is not None:
        kt = kt * kp[:, None, :, None]
    a_full = qt @ kt.transpose(-1, -2)
    n, m = a_full.shape[-2:]
    kval = torch.ones(q.shape[0], m, dtype=torch.bool) if kp is None else kp
    if not causal:
        a = a_full
        n_q = float(n) if qp is None else qp.sum(-1)[:, None, None].to(q.dtype)
        m_k = kval.sum(-1)[:, None, None].to(q.dtype)
        i_flow, o_flow = a.sum(-1), a.sum(-2)
        i_hat = (a / o_flow[..., None, :].clamp_min(1e-300)).sum(-1)
        o_hat = (a / i_flow[..., :, None].clamp_min(1e-300)).sum(-2)
        if clamp is not None:
            o_hat = o_hat.clamp(-clamp, clamp)
        e = torch.exp(o_hat) * kval[:, None, :]
        comp = m_k * e / e.sum(-1, keepdim=True)
        alloc = torch.sigmoid(i_hat * n_q / m_k)
    else:
        tri = torch.ones(n, n, dtype=torch.bool).tril()
        a = a_full * tri
        t = kval.to(q.dtype).cumsum(-1)[:, None, :]  # 1-based positions among real tokens
        i_flow = a.sum(-1)
        o_flow = (a_full * tri.T).sum(-2)  # k_j · Σ_{i<=j} q_i
        i_hat = (a * (t / o_flow.clamp_min(1e-300))[..., None, :]).sum(-1) / t.clamp_min(1)
        o_hat = (a_full * tri.T * (t / i_flow.clamp_min(1e-300))[..., :, None]).sum(-2) / t.clamp_min(1)
        if clamp is not None:
            o_hat = o_hat.clamp(-clamp, clamp)
        e = torch.exp(o_hat) * kval[:, None, :]
        comp = t * e / e.cumsum(-1).clamp_min(1e-300)
        alloc = torch.sigmoid(i_hat)
    if not comp_on:
        comp = torch.ones_like(comp) * kval[:, None, :]
    if not alloc_on:
        alloc = torch.ones_like(alloc)
    w = alloc[..., None] * a / i_flow[..., None].clamp_min(1e-300) * comp[..., None, :]
    return w @ v, w, {"I_hat": i_hat, "O_hat": o_hat}


CASES = [(33, 33, False), (33, 33, True), (20, 13, False), (13, 27, False)]


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize(("n", "m", "causal"), CASES)
@pytest.mark.parametrize("clamp", [None, 1.0])
def test_flow_equals_quadratic_definition(n: int, m: int, causal: bool, clamp: float | None) -> None:
    q, k, v = make_qkv(2, 3, n, 8, m=m, dtype=torch.float64, logit_scale=4.0, seed=n + m)
    out_ref, w_ref, _ = ref_flow(q, k, v, causal=causal, clamp=clamp)
    for c in (1, 5, 16, 64) if causal else (64,):
        out, imp = flow_attention(q, k, v, causal=causal, competition_clamp=clamp, chunk_size=c, return_importance=True)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(imp, w_ref.mean(-2), rtol=0, atol=ATOL)
        fast = flow_attention(q, k, v, causal=causal, competition_clamp=clamp, chunk_size=c)
        torch.testing.assert_close(fast, out_ref, rtol=0, atol=ATOL)
    out_e, w = flow_attention(q, k, v, causal=causal, competition_clamp=clamp, return_weights=True)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out_e, w @ v, rtol=0, atol=ATOL)


@pytest.mark.usefixtures("block_size")
@pytest.mark.parametrize("causal", [False, True])
def test_flow_padding_removes_tokens_from_every_flow(causal: bool) -> None:
    n = 25
    q, k, v = make_qkv(2, 3, n, 8, dtype=torch.float64, logit_scale=3.0, seed=4)
    kp = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.3
    kp[:, 0] = False  # a leading pad
    kp[0, 1] = True
    out_ref, w_ref, _ = ref_flow(q, k, v, causal=causal, kp=kp, qp=kp)
    out, imp = flow_attention(
        q, k, v, causal=causal, mask=KeyPadding(kp), query_padding=kp, chunk_size=4, return_importance=True
    )
    torch.testing.assert_close(out, out_ref, rtol=0, atol=ATOL)
    fast = flow_attention(q, k, v, causal=causal, mask=KeyPadding(kp), query_padding=kp, chunk_size=4)
    torch.testing.assert_close(fast, out_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(imp, w_ref.mean(-2), rtol=0, atol=ATOL)
    # the same as running on the real tokens only (batch row 0)
    idx = torch.nonzero(kp[0]).squeeze(1)
    sub = flow_attention(q[:1, :, idx], k[:1, :, idx], v[:1, :, idx], causal=causal)
    torch.testing.assert_close(out[:1, :, idx], sub, rtol=0, atol=ATOL)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))  # padded query -> 0


@pytest.mark.parametrize("block", [1, 1 << 21])
@pytest.mark.parametrize(("n", "m", "dv"), [(24, 24, 5), (24, 24, 8), (19, 30, 8), (30, 19, 11)])
def test_flow_fast_noncausal_buffers(n: int, m: int, dv: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-grad path reuses feature buffers (and the output as φ(K)'s buffer when M == N, Dv == D):
    equal to the definition for every shape relation, one or many slabs, with and without
    autograd, and the inputs are left untouched."""
    from attnlib.functional import _scan

    monkeypatch.setattr(_scan, "BLOCK_ELEMENTS", block)
    q, k, v = make_qkv(3, 2, n, 8, m=m, dv=dv, dtype=torch.float64, logit_scale=3.0, seed=n + dv)
    kp = torch.rand(3, m, generator=torch.Generator().manual_seed(3)) > 0.3
    kp[:, 0] = True
    qp = torch.rand(3, n, generator=torch.Generator().manual_seed(4)) > 0.3
    copies = [x.clone() for x in (q, k, v)]
    for kpad, qpad in ((None, None), (kp, None), (kp, qp)):
        out_ref, _, _ = ref_flow(q, k, v, kp=kpad, qp=qpad)
        kmask = None if kpad is None else KeyPadding(kpad)
        with torch.no_grad():
            fast = flow_attention(q, k, v, mask=kmask, query_padding=qpad)
        torch.testing.assert_close(fast, out_ref, rtol=0, atol=ATOL)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        slow = flow_attention(qg, kg, vg, mask=kmask, query_padding=qpad)
        torch.testing.assert_close(slow.detach(), out_ref, rtol=0, atol=ATOL)
    for x, c in zip((q, k, v), copies, strict=True):
        assert torch.equal(x, c)


def test_flow_cross_attention_key_padding_only() -> None:
    q, k, v = make_qkv(2, 3, 9, 8, m=14, dtype=torch.float64, seed=6)
    kp = torch.rand(2, 14, generator=torch.Generator().manual_seed(1)) > 0.4
    kp[:, 0] = True
    out_ref, _, _ = ref_flow(q, k, v, kp=kp)
    torch.testing.assert_close(flow_attention(q, k, v, mask=KeyPadding(kp)), out_ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("n", "m"), [(40, 40), (50, 17), (12, 31)])
def test_conservation_identities(n: int, m: int) -> None:
    """Σ_j Ô_j = N and Σ_i Î_i = M (eps -> 0, no clamp), also with padding (real counts)."""
    q, k, _ = make_qkv(2, 3, n, 16, m=m, dtype=torch.float64, logit_scale=5.0, seed=n)
    fl = flow_quantities(
        torch.sigmoid(q), torch.sigmoid(k), causal=False, eps=1e-300, competition_clamp=None, q_valid=None, k_valid=None
    )
    torch.testing.assert_close(
        fl["O_hat"].sum(-1), torch.full((2, 3), float(n), dtype=torch.float64), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        fl["I_hat"].sum(-1), torch.full((2, 3), float(m), dtype=torch.float64), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(fl["comp"].mean(-1), torch.ones(2, 3, dtype=torch.float64), rtol=1e-13, atol=0)
    qp = torch.ones(2, n, dtype=torch.bool)
    qp[1, : n // 3] = False
    kp = torch.ones(2, m, dtype=torch.bool)
    kp[0, m // 2 :] = False
    qf = torch.sigmoid(q) * qp[:, None, :, None]
    kf = torch.sigmoid(k) * kp[:, None, :, None]
    fl = flow_quantities(qf, kf, causal=False, eps=1e-300, competition_clamp=None, q_valid=qp, k_valid=kp)
    torch.testing.assert_close(fl["O_hat"].sum(-1), qp.sum(-1, keepdim=True).double().expand(2, 3), rtol=1e-13, atol=0)
    torch.testing.assert_close(fl["I_hat"].sum(-1), kp.sum(-1, keepdim=True).double().expand(2, 3), rtol=1e-13, atol=0)


def test_ablations_reduce_to_sigmoid_linear_attention() -> None:
    q, k, v = make_qkv(2, 3, 21, 8, m=15, dtype=torch.float64, seed=8)
    both_off = flow_attention(q, k, v, competition=False, allocation=False)
    lin = linear_attention(q, k, v, feature_map=torch.sigmoid, eps=0.0)
    torch.testing.assert_close(both_off, lin, rtol=0, atol=ATOL)
    for comp_on, alloc_on in ((False, True), (True, False)):
        out = flow_attention(q, k, v, competition=comp_on, allocation=alloc_on)
        ref, _, _ = ref_flow(q, k, v, comp_on=comp_on, alloc_on=alloc_on)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
        assert rel_error(out, flow_attention(q, k, v)) > 1e-3  # the ablation changes something


def test_official_clamp_saturates_competition() -> None:
    """Ô >= 0 has mean N/M: ±1 clips about half the sources for N = M and all when N > M (spec §1f)."""
    q, k, v = make_qkv(1, 2, 256, 64, dtype=torch.float64, seed=0)
    fl = flow_quantities(
        torch.sigmoid(q), torch.sigmoid(k), causal=False, eps=1e-6, competition_clamp=None, q_valid=None, k_valid=None
    )
    frac = float((fl["O_hat"] > 1).double().mean())
    assert 0.3 < frac < 0.7, frac
    q2, _, _ = make_qkv(1, 2, 1024, 64, dtype=torch.float64, seed=1)
    fl = flow_quantities(
        torch.sigmoid(q2), torch.sigmoid(k), causal=False, eps=1e-6, competition_clamp=None, q_valid=None, k_valid=None
    )
    assert bool((fl["O_hat"] > 1).all())
    clamped = flow_attention(q2, k, v, competition_clamp=1.0)
    torch.testing.assert_close(clamped, flow_attention(q2, k, v, competition=False), rtol=0, atol=ATOL)
    assert rel_error(flow_attention(q2, k, v), clamped) > 1e-4  # the paper's form does compete


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_flows_do_not_overflow_at_64k_tokens(dtype: torch.dtype, causal: bool) -> None:
    """I ≈ M·D/4 = 2^20 at M = 65536, D = 64: far beyond fp16's 65504, so flows run in fp32."""
    q, k, v = make_qkv(1, 1, 65536, 64, seed=0)
    ref = flow_attention(q, k, v, causal=causal, chunk_size=256)
    out = flow_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, chunk_size=256)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(out, ref) < 2e-2


def test_flow_gradcheck() -> None:
    q, k, v = make_qkv(1, 2, 6, 3, dtype=torch.float64, seed=2)
    for causal in (False, True):
        args = tuple(t.clone().requires_grad_(True) for t in (q, k, v))

        def fn(a, b, c, causal=causal):
            return flow_attention(a, b, c, causal=causal, chunk_size=4)

        assert torch.autograd.gradcheck(fn, args)


def test_flow_module_presets_and_errors() -> None:
    default = attnlib.Attention(32, 4, variant="flow").core  # the official core file: sigmoid, clamp ±1
    assert default.competition_clamp == 1.0 and default.feature_map == "sigmoid"
    assert attnlib.Attention(32, 4, variant="flow", preset="paper").core.competition_clamp is None
    assert attnlib.Attention(32, 4, variant="flow", preset="nlp_causal").core.competition_clamp == 5.0
    assert attnlib.Attention(32, 4, variant="flow", preset="timeseries").core.competition_clamp is None
    attn = attnlib.Attention(32, 4, variant="flow", preset="core")
    assert attn.core.competition_clamp == 1.0 and attn.core.feature_map == "sigmoid"
    assert attnlib.Attention(32, 4, variant="flow", preset="lra").core.feature_map == "relu"
    with pytest.raises(ValueError, match="preset"):
        attnlib.Attention(32, 4, variant="flow", preset="nope")
    with pytest.raises(ValueError, match="competition_clamp"):
        attnlib.Attention(32, 4, variant="flow", competition_clamp=-1.0)
    q, k, v = make_qkv(2, 2, 8, 4)
    with pytest.raises(UnsupportedError, match="key-padding"):
        flow_attention(q, k, v, mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_padding"):
        flow_attention(q, k, v, query_padding=torch.ones(2, 7, dtype=torch.bool))


def test_flow_module_self_attention_padding_drops_padded_queries() -> None:
    """In self-attention the module removes padded tokens as queries too (they feed O and Ô)."""
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, variant="flow").double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    kp = torch.ones(2, 12, dtype=torch.bool)
    kp[:, 9:] = False
    y = attn(x, key_padding_mask=kp)
    torch.testing.assert_close(y[:, :9], attn(x[:, :9]), rtol=0, atol=ATOL)
