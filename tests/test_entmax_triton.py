"""The fused alpha-entmax Triton kernel: output and gradients vs the float64 PyTorch entmax
(fp32 / fp16 through Triton's interpreter on CPU tensors, ``TRITON_INTERPRET=1``; bf16 ``tl.dot`` is
wrong in the interpreter), causal and key lengths, GQA, rows with no key, single-key supports,
ties, routing from :func:`attnlib.functional.entmax_attention`, errors; GPU-marked tests run the
compiled kernel on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernels run through the interpreter on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnlib import dispatch  # noqa: E402
from attnlib.errors import UnsupportedError  # noqa: E402
from attnlib.functional.entmax import entmax_attention  # noqa: E402
from attnlib.kernels import entmax_attention_fused, fused_entmax_supports, triton_available  # noqa: E402
from attnlib.masks import KeyPadding  # noqa: E402
from attnlib.testing import make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture
def spy(count_calls) -> dict[str, int]:
    """Counts the kernel's forward / backward launches (so a test knows the kernel ran)."""
    from attnlib.kernels import _triton_entmax as tri

    return count_calls(tri, ("forward", "backward"))


def _reference(qkv64, alpha, causal, lengths, scale=None):
    mask = None
    if lengths is not None:
        m = qkv64[1].shape[2]
        mask = KeyPadding(torch.arange(m)[None, :] < lengths[:, None])
    return entmax_attention(*qkv64, alpha=alpha, causal=causal, mask=mask, n_iter=80, scale=scale)


def _check(qkv64, alpha, causal, lengths, dtype, tol, grads=True, **kw):
    """Output (and gradients) of the kernel at ``dtype`` vs the float64 PyTorch entmax."""
    qkv64 = tuple(t.detach().requires_grad_() for t in qkv64)
    ref = _reference(qkv64, alpha, causal, lengths, kw.get("scale"))
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = (ref, *torch.autograd.grad(ref, qkv64, go)) if grads else (ref,)
    qkv = tuple(t.detach().to(DEV, dtype).requires_grad_(grads) for t in qkv64)
    kvl = None if lengths is None else lengths.to(DEV)
    out = entmax_attention_fused(*qkv, alpha=alpha, causal=causal, kv_lengths=kvl, **kw)
    got = (out, *torch.autograd.grad(out, qkv, go.to(DEV, dtype))) if grads else (out,)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        err = float((a.detach().cpu().double() - w.detach()).abs().max())
        bound = tol * max(1.0, float(w.detach().abs().max()))
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"


CASES = [
    # alpha, causal, B, H, H_kv, N, M, D, Dv, key lengths
    (1.5, False, 1, 2, 2, 20, 24, 16, 16, None),
    (1.5, True, 2, 2, 1, 24, 18, 16, 24, [18, 5]),  # N > M: the first causal rows see no key
    (1.5, False, 2, 1, 1, 17, 33, 32, 16, [0, 20]),  # an example with no key at all
    (2.0, True, 1, 2, 2, 20, 20, 16, 16, None),
    (1.3, False, 2, 2, 1, 19, 21, 16, 16, [21, 7]),
    (1.75, True, 1, 2, 2, 18, 26, 16, 16, None),
]


@pytest.mark.parametrize(("alpha", "causal", "b", "h", "hk", "n", "m", "d", "dv", "lengths"), CASES)
def test_kernel_vs_float64_reference(alpha, causal, b, h, hk, n, m, d, dv, lengths, spy) -> None:
    qkv = make_qkv(b, h, n, d, m=m, h_kv=hk, dv=dv, dtype=torch.float64, logit_scale=3.0, seed=n + m)
    lens = None if lengths is None else torch.tensor(lengths)
    _check(qkv, alpha, causal, lens, torch.float32, 2e-5)
    assert spy == {"forward": 1, "backward": 1}


def test_fp16_kernel_vs_float64_reference() -> None:
    qkv = make_qkv(2, 2, 20, 16, m=24, h_kv=1, dtype=torch.float64, logit_scale=3.0, seed=5)
    _check(qkv, 1.5, True, torch.tensor([24, 11]), torch.float16, 1e-2, scale=0.3)


def test_rows_with_no_key_are_zero_and_weights_are_sparse() -> None:
    q, k, v = make_qkv(2, 1, 20, 16, m=12, dtype=torch.float32, logit_scale=4.0, seed=1)
    out = entmax_attention_fused(q, k, v, causal=True, kv_lengths=torch.tensor([12, 0]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no key in the example
    assert torch.equal(out[0, :, :8], torch.zeros_like(out[0, :, :8]))  # causal, N - M = 8 rows see no key
    assert out[0, :, 8:].abs().amax(-1).gt(0).all()


def test_single_key_support_and_ties() -> None:
    # row 0: one key far above the rest -> its value exactly; row 1: two identical best keys -> half each
    d, m = 16, 20
    k = torch.randn(1, 1, m, d, generator=torch.Generator().manual_seed(0)) * 0.1
    k[0, 0, 7] = 0
    k[0, 0, 7, 0] = 1.0
    k[0, 0, 12] = 0
    k[0, 0, 12, 1] = 1.0
    k[0, 0, 13] = k[0, 0, 12]
    q = torch.zeros(1, 1, 2, d)
    q[0, 0, 0, 0] = 40.0
    q[0, 0, 1, 1] = 40.0
    v = torch.randn(1, 1, m, 16, generator=torch.Generator().manual_seed(1))
    for alpha in (1.5, 2.0, 1.4):
        out = entmax_attention_fused(q, k, v, alpha=alpha, scale=1.0)
        ref = entmax_attention(q.double(), k.double(), v.double(), alpha=alpha, scale=1.0, n_iter=80)
        torch.testing.assert_close(out[0, 0, 0], v[0, 0, 7], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[0, 0, 1], (v[0, 0, 12] + v[0, 0, 13]) / 2, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)


def test_functional_routes_to_the_kernel_where_the_policy_says(monkeypatch, spy) -> None:
    monkeypatch.setattr(dispatch, "entmax_fused", lambda device: True)
    q, k, v = make_qkv(2, 2, 18, 16, m=18, dtype=torch.float32, logit_scale=3.0, seed=2)
    valid = torch.arange(18)[None, :] < torch.tensor([18, 9])[:, None]
    out = entmax_attention(q, k, v, causal=True, mask=KeyPadding(valid))
    assert spy["forward"] == 1
    monkeypatch.setattr(dispatch, "entmax_fused", lambda device: False)
    ref = entmax_attention(q, k, v, causal=True, mask=KeyPadding(valid))
    assert spy["forward"] == 1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # not right padding / weights requested / a per-head alpha: the PyTorch path
    monkeypatch.setattr(dispatch, "entmax_fused", lambda device: True)
    holes = valid.clone()
    holes[0, 3] = False
    entmax_attention(q, k, v, mask=KeyPadding(holes))
    entmax_attention(q, k, v, return_weights=True)
    entmax_attention(q, k, v, alpha=torch.full((2,), 1.5))
    assert spy["forward"] == 1


def test_bad_input_and_unsupported_calls(monkeypatch) -> None:
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q \(B, H, N, D\)"):
        entmax_attention_fused(q, k[..., :8], v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        entmax_attention_fused(q[:, :1].expand(1, 3, 8, 16), k, v)
    with pytest.raises(ValueError, match="kv_lengths"):
        entmax_attention_fused(q, k, v, kv_lengths=torch.tensor([1.0]))
    with pytest.raises(UnsupportedError, match="one fixed float alpha"):
        entmax_attention_fused(q, k, v, alpha=torch.tensor(1.5))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="head dims up to 128"):
        entmax_attention_fused(*make_qkv(1, 1, 8, 256))
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in str(fused_entmax_supports(q, k, v, 1.5))


# ------------------------------------------------------------------------------------------
# GPU: the compiled kernel (fp16 / bf16 / fp32), head dims 16-128, routing from the variant
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(
    ("alpha", "causal", "b", "h", "hk", "n", "m", "d", "lengths"),
    [
        (1.5, False, 2, 4, 2, 300, 300, 64, None),
        (1.5, True, 1, 4, 4, 257, 383, 128, None),
        (2.0, True, 2, 2, 1, 200, 200, 16, [200, 77]),
        (1.25, False, 1, 2, 2, 256, 256, 80, [256]),
    ],
)
def test_gpu_kernel_vs_float64_reference(alpha, causal, b, h, hk, n, m, d, lengths, dtype, spy) -> None:
    qkv = make_qkv(b, h, n, d, m=m, h_kv=hk, dtype=torch.float64, logit_scale=3.0, seed=n + d)
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}[dtype]
    _check(qkv, alpha, causal, None if lengths is None else torch.tensor(lengths), dtype, tol)
    assert spy == {"forward": 1, "backward": 1}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_entmax_variant_reaches_the_kernel(spy) -> None:
    import attnlib

    attn = attnlib.Attention(256, 4, variant="entmax").to("cuda", torch.float16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    y = attn(x, causal=True)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert spy == {"forward": 1, "backward": 1}
