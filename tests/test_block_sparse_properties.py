"""Property tests (hypothesis, bounded and derandomized): random valid BlockMasks - random
dense masks, top-k block selections (incl. layouts whose key blocks go *down* from one query
block to the next), their AND / OR - through the block-sparse CPU path and the Triton kernels
(Triton's interpreter on CPU tensors) against the float64 dense reference, forward and gradients.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter: must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnlib.functional import reference_attention  # noqa: E402
from attnlib.kernels import block_sparse_attention, triton_available  # noqa: E402
from attnlib.masks import BlockMask  # noqa: E402
from attnlib.testing import make_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_SETTINGS = dict(
    derandomize=True,  # the same examples on every run (CI-stable); bump max_examples locally to explore
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@st.composite
def layouts(draw: st.DrawFn, block_sizes: tuple[int, ...]) -> dict:
    """A random problem: sizes, GQA, and a valid BlockMask built one of several ways."""
    bq = draw(st.sampled_from(block_sizes))
    bk = draw(st.sampled_from(block_sizes))
    nq = draw(st.integers(1, 4))
    nk = draw(st.integers(1, 4))
    n = nq * bq - draw(st.integers(0, bq - 1))
    m = nk * bk - draw(st.integers(0, bk - 1))
    b = draw(st.integers(1, 2))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 2))
    bp = draw(st.sampled_from((1, b)))
    hp = draw(st.sampled_from((1, h)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(("dense", "topk", "topk_and_dense", "topk_or_causal", "swapped")))
    shape = (bp, hp, n, m)
    if kind == "dense":
        dense = torch.rand(shape, generator=g) < draw(st.sampled_from((0.1, 0.4, 0.8)))
        bm = BlockMask.from_dense(dense, (bq, bk))
    elif kind == "swapped":  # key blocks go down from one query block to the next (anti-diagonal)
        qb = torch.arange(n)[:, None] // bq
        kb = torch.arange(m)[None, :] // bk
        dense = ((qb + kb) % max(nq, nk) == (nq - 1) % max(nq, nk)).expand(shape)
        bm = BlockMask.from_dense(dense.contiguous(), (bq, bk))
    else:
        scores = torch.rand(bp, hp, nq, nk, generator=g)
        if draw(st.booleans()):
            scores[..., 0, :] = float("-inf")  # an empty first query block
        bm = BlockMask.from_topk(scores, k=draw(st.integers(1, nk)), block_size=(bq, bk), seq_lengths=(n, m))
        if kind == "topk_and_dense":
            bm = bm & BlockMask.from_dense(torch.rand(shape, generator=g) < 0.6, (bq, bk))
        elif kind == "topk_or_causal":
            bm = bm | BlockMask.causal(n, m, block_size=(bq, bk))
        dense = bm.to_dense()
    return {"b": b, "h": h, "hk": hk, "n": n, "m": m, "bm": bm, "dense": dense, "seed": seed, "kind": kind}


def _check(case: dict, backend: str, dtype: torch.dtype, d: int, tol: float, device: str = "cpu") -> None:
    b, h, hk, n, m, bm = (case[k] for k in ("b", "h", "hk", "n", "m", "bm"))
    q, k, v = make_qkv(b, h, n, d, m=m, h_kv=hk, dtype=torch.float64, logit_scale=3.0, seed=case["seed"])
    qkv64 = tuple(t.requires_grad_() for t in (q, k, v))
    ref = reference_attention(*qkv64, mask=case["dense"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = (ref, *torch.autograd.grad(ref, qkv64, go))
    qkv = tuple(t.detach().to(device, dtype).requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, bm.to(device), backend=backend)
    got = (out, *torch.autograd.grad(out, qkv, go.to(device, dtype)))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = max(1.0, float(w.detach().abs().max()))
        err = float((a.detach().cpu().double() - w.detach()).abs().max())
        assert err <= tol * scale, f"{case['kind']} {backend} {dtype} {name}: max err {err:.2e} > {tol * scale:.2e}"


@settings(max_examples=60, **_SETTINGS)
@given(layouts(block_sizes=(2, 4, 8)))
def test_cpu_path_random_layouts_equal_float64_reference(case: dict) -> None:
    _check(case, "torch", torch.float64, 8, 1e-10)


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@settings(max_examples=12 if DEVICE == "cpu" else 8, **_SETTINGS)  # on a GPU each example compiles kernels
@given(layouts(block_sizes=(16, 32)), st.sampled_from((torch.float64, torch.float32, torch.float16)))
def test_triton_random_layouts_equal_float64_reference(case: dict, dtype: torch.dtype) -> None:
    if DEVICE == "cuda" and dtype == torch.float64:
        dtype = torch.float32  # float64 runs under the interpreter only
    tol = {torch.float64: 1e-10, torch.float32: 2e-5 if DEVICE == "cpu" else 2e-3, torch.float16: 2e-2}[dtype]
    _check(case, "triton", dtype, 16, tol, DEVICE)
