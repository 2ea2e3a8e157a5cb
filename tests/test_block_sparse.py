"""Block-sparse kernel: PyTorch path vs float64 dense oracle, Triton (interpreter) vs PyTorch path,
dispatch and errors, softmax routing, memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attnlib.errors import UnsupportedError
from attnlib.functional import reference_attention, softmax_attention
from attnlib.kernels import block_sparse_attention, triton_available
from attnlib.masks import BlockMask, causal_mask
from attnlib.testing import assert_close, make_qkv

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(shape, generator=g) < density
    # some block structure too: a band of full blocks
    n, m = shape[-2:]
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    dense |= ((i // 8) == (j // 8)) & (torch.rand(shape, generator=g) < 0.9)
    dense[..., 1, :] = False  # an empty row
    return dense


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, go)


CASES = [
    # B, H, H_kv, N, M, D, Dv, block, per_batch_head, density
    (2, 4, 2, 37, 53, 16, 16, 8, True, 0.25),
    (1, 4, 4, 64, 64, 8, 8, 16, False, 0.5),
    (2, 2, 1, 29, 70, 16, 24, (8, 16), True, 0.1),
    (1, 3, 3, 50, 21, 8, 8, 32, False, 0.6),
    (2, 2, 2, 16, 16, 8, 8, 4, True, 1.0),
]


@pytest.mark.parametrize(("b", "h", "hk", "n", "m", "d", "dv", "bs", "per", "dens"), CASES)
def test_torch_path_equals_float64_reference(b, h, hk, n, m, d, dv, bs, per, dens) -> None:
    q, k, v = make_qkv(b, h, n, d, m=m, h_kv=hk, dv=dv, dtype=torch.float64, logit_scale=4.0, seed=n + m)
    dense = _random_mask((b if per else 1, h if per else 1, n, m), dens, seed=n * m)
    bm = BlockMask.from_dense(dense, bs)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(*qkv, bm, backend="torch", return_lse=True)
    ref = reference_attention(*qkv, mask=dense)
    assert_close(out, ref, name="out")
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :])), "empty row must be zero"
    assert torch.isneginf(lse[..., 1]).all()
    s = torch.matmul(q, k.repeat_interleave(h // hk, 1).transpose(-1, -2)) * d**-0.5
    want_lse = torch.logsumexp(s.masked_fill(~dense, float("-inf")), -1)
    ok = dense.any(-1).expand_as(want_lse)
    assert_close(lse[ok], want_lse[ok], name="lse")
    for got, want, name in zip(_grads(out, qkv), _grads(ref, qkv), ("dq", "dk", "dv")):
        assert_close(got, want, name=name)


def test_torch_path_fp32_within_flex_rule() -> None:
    q, k, v = make_qkv(2, 4, 100, 32, m=90, h_kv=2, dtype=torch.float64, logit_scale=8.0, seed=1)
    dense = _random_mask((1, 4, 100, 90), 0.3, seed=2)
    bm = BlockMask.from_dense(dense, 16)
    golden = reference_attention(q, k, v, mask=dense)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    eager = softmax_attention(qf, kf, vf, mask=dense, backend="math")
    out = block_sparse_attention(qf, kf, vf, bm)
    assert_close(out, golden, eager, name="fp32 out")
    qd, kd, vd = (t.requires_grad_() for t in (q, k, v))
    g_gold = _grads(reference_attention(qd, kd, vd, mask=dense), (qd, kd, vd))
    g_eager = _grads(eager, (qf, kf, vf))
    g_out = _grads(out, (qf, kf, vf))
    for got, gold, ea, name in zip(g_out, g_gold, g_eager, ("dq", "dk", "dv")):
        assert_close(got, gold, ea, name=f"fp32 {name}")


def test_explicit_torch_path_matches_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-CPU fallback (explicit matmul per part) equals the reference too."""
    from attnlib import dispatch

    monkeypatch.setattr(dispatch, "fused_cpu_block_parts", lambda device, d, dv: False)
    q, k, v = make_qkv(2, 4, 37, 16, m=45, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=4)
    dense = _random_mask((2, 1, 37, 45), 0.3, seed=5)
    bm = BlockMask.from_dense(dense, 8)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, bm, backend="torch")
    ref = reference_attention(*qkv, mask=dense)
    assert_close(out, ref)
    for got, want in zip(_grads(out, qkv), _grads(ref, qkv)):
        assert_close(got, want)


def test_torch_path_reuses_gather_buffers_across_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small gather groups of different sizes (the buffers are reused, and grown): forward and
    gradients still equal the float64 reference; a NaN in one query row reaches that row only."""
    from attnlib.kernels import block_sparse as bs_mod

    monkeypatch.setattr(bs_mod, "_GATHER_ELEMS", 3 * 8 * 16)  # a few rows per group
    q, k, v = make_qkv(2, 4, 61, 16, m=75, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=7)
    g = torch.Generator().manual_seed(8)
    blocks = torch.rand(2, 4, 8, 10, generator=g) < 0.35  # scattered key blocks: they are gathered
    dense = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :61, :75]
    dense &= torch.rand(dense.shape, generator=g) < 0.8
    bm = BlockMask.from_dense(dense, 8)
    groups, _ = bs_mod._groups(bm, 2, 4, 2, 16, 8)
    sizes = {g.k_gather.numel() for g in groups if g.k_gather is not None}
    assert len(groups) > 4 and len(sizes) > 1, "the test needs several gather groups of different sizes"
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, bm, backend="torch")
    ref = reference_attention(*qkv, mask=dense)
    assert_close(out, ref, name="out")
    for got, want, name in zip(_grads(out, qkv), _grads(ref, qkv), ("dq", "dk", "dv"), strict=True):
        assert_close(got, want, name=name)
    q_nan = q.detach().clone()
    q_nan[1, 2, 5, 3] = float("nan")
    out_nan = block_sparse_attention(q_nan, k.detach(), v.detach(), bm, backend="torch")
    assert out_nan[1, 2, 5].isnan().all(), "a NaN query must give a NaN output row"
    rest = torch.ones(out_nan.shape[:3], dtype=torch.bool)
    rest[1, 2, 5] = False
    assert_close(out_nan[rest], ref.detach()[rest], name="rows without NaN")


def test_all_blocks_equals_sdpa_and_patterns() -> None:
    q, k, v = make_qkv(1, 2, 70, 16, dtype=torch.float64, seed=3)
    for bm, dense in (
        (BlockMask.causal(70, block_size=16), causal_mask(70)),
        (BlockMask.sliding_window(70, 9, block_size=16), BlockMask.sliding_window(70, 9, block_size=16).to_dense()),
        (BlockMask.from_topk(torch.zeros(5, 5), k=5, block_size=16, seq_lengths=(70, 70)), None),
    ):
        ref = reference_attention(q, k, v, mask=None if dense is None else dense.view(1, 1, 70, 70))
        assert_close(block_sparse_attention(q, k, v, bm), ref)


# ------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter on CPU) vs the PyTorch path
# ------------------------------------------------------------------------------------------

TRITON_CASES = [
    # B, H, H_kv, N, M, D, Dv, block, per_batch_head, density
    (1, 2, 1, 45, 61, 16, 16, 16, True, 0.3),
    (2, 2, 2, 64, 64, 32, 16, (16, 32), False, 0.5),
    (1, 4, 2, 33, 17, 16, 16, 16, False, 1.0),
    (2, 2, 1, 70, 40, 16, 32, 32, True, 0.15),
    (1, 2, 2, 96, 96, 64, 64, 32, False, 0.4),
]


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize(("b", "h", "hk", "n", "m", "d", "dv", "bs", "per", "dens"), TRITON_CASES)
def test_triton_equals_torch_path(b, h, hk, n, m, d, dv, bs, per, dens) -> None:
    dtype = torch.float64 if TRITON_DEVICE == "cpu" and n % 2 == 0 else torch.float32  # interpreter: fp64 too
    q, k, v = make_qkv(b, h, n, d, m=m, h_kv=hk, dv=dv, dtype=dtype, logit_scale=3.0, seed=n, device=TRITON_DEVICE)
    dense = _random_mask((b if per else 1, h if per else 1, n, m), dens, seed=m).to(TRITON_DEVICE)
    bm = BlockMask.from_dense(dense, bs)
    res = {}
    for backend in ("torch", "triton"):
        qkv = tuple(t.clone().requires_grad_() for t in (q, k, v))
        out, lse = block_sparse_attention(*qkv, bm, backend=backend, return_lse=True)
        res[backend] = (out, lse, *_grads(out, qkv))
    for name, a, t in zip(("out", "lse", "dq", "dk", "dv"), res["torch"], res["triton"]):
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(t)), f"{name}: -inf pattern differs"
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(t[fin], a[fin], rtol=tol * 10, atol=tol, msg=lambda s, nm=name: f"{nm}: {s}")
    assert torch.equal(res["triton"][0][..., 1, :], torch.zeros_like(res["triton"][0][..., 1, :]))


# ------------------------------------------------------------------------------------------
# dispatch and errors
# ------------------------------------------------------------------------------------------


def test_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 2, 32, 16)
    bm = BlockMask.causal(32, block_size=16)
    import attnlib.kernels.block_sparse as bsk

    monkeypatch.setattr(bsk, "triton_available", lambda: False)
    with pytest.raises(UnsupportedError, match="triton.*not installed"):
        block_sparse_attention(q, k, v, bm, backend="triton")
    monkeypatch.undo()
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(UnsupportedError, match="TRITON_INTERPRET=1"):
            block_sparse_attention(q, k, v, bm, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(UnsupportedError, match="block sizes"):
            block_sparse_attention(q, k, v, BlockMask.causal(32, block_size=8), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, bm, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, M\) = \(32, 32\).*N=31"):
        block_sparse_attention(q[:, :, :31], k, v, bm)
    with pytest.raises(ValueError, match="BlockMask"):
        block_sparse_attention(q, k, v, torch.ones(32, 32, dtype=torch.bool))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention(q, k[:, :1].expand(1, 3, 32, 16), v[:, :1].expand(1, 3, 32, 16), bm)
    per_b = BlockMask.from_dense(torch.ones(3, 1, 32, 32, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="B' in"):
        block_sparse_attention(q, k, v, per_b)


def test_auto_uses_torch_on_cpu_and_caches_the_plan() -> None:
    q, k, v = make_qkv(1, 2, 40, 8)
    bm = BlockMask.sliding_window(40, 5, block_size=8)
    block_sparse_attention(q, k, v, bm)
    assert any(key.startswith("torch_plan") for key in bm._cache)


def test_softmax_auto_routes_block_masks_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import attnlib.kernels as kernels
    from attnlib.masks import AttentionMask

    calls = []
    real = kernels.block_sparse_attention

    def spy(*a, **kw):
        calls.append(a[3])
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "block_sparse_attention", spy)
    monkeypatch.setattr(AttentionMask, "dense", lambda self: pytest.fail("a BlockMask call was densified"))
    q, k, v = make_qkv(2, 4, 48, 8, h_kv=2, dtype=torch.float64, seed=8)
    bm = BlockMask.sliding_window(48, 6, block_size=16)
    out = softmax_attention(q, k, v, mask=bm)
    out_c = softmax_attention(q, k, v, mask=bm, causal=True)
    assert len(calls) == 2
    monkeypatch.undo()
    assert_close(out, reference_attention(q, k, v, mask=bm))
    assert_close(out_c, reference_attention(q, k, v, mask=bm, causal=True))
    assert_close(
        softmax_attention(q, k, v, causal=True, backend="block_sparse"), reference_attention(q, k, v, causal=True)
    )


def test_cpu_path_memory_is_linear_in_active_blocks() -> None:
    """N=16384, H=8, D=64 sliding window (density ~3%), forward + backward: peak RSS growth < 1 GiB
    (a dense N x N score matrix alone would be 8 GiB)."""
    code = r"""
import resource, torch
from attnlib.kernels import block_sparse_attention
from attnlib.masks import BlockMask
torch.set_num_threads(2)
q, k, v = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
bm = BlockMask.sliding_window(16384, 128, block_size=128)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = block_sparse_attention(q, k, v, bm)
out.sum().backward()
assert torch.isfinite(q.grad).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mib = float(res.stdout.strip().splitlines()[-1])
    assert growth_mib < 1024, f"peak memory grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockMask.causal(70, 90, block_size=16),
        lambda: BlockMask.sliding_window(70, 20, M=90, block_size=16),
        lambda: (
            BlockMask.document(torch.tensor([0] * 30 + [1] * 25 + [2] * 15), block_size=8)
            & BlockMask.causal(70, block_size=8)
        ),
        lambda: (
            BlockMask.sliding_window(70, 9, block_size=(16, 8)) | BlockMask.global_tokens(70, 5, block_size=(16, 8))
        ),
    ],
)
def test_structured_patterns_forward_and_gradients(make) -> None:
    """Patterns whose key blocks are contiguous runs take the strided-view (no-copy) path."""
    bm = make()
    n, m = bm.seq_lengths
    q, k, v = make_qkv(2, 4, n, 16, m=m, h_kv=2, dtype=torch.float64, logit_scale=4.0, seed=n + m)
    dense = bm.to_dense()
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, bm)
    ref = reference_attention(*qkv, mask=dense)
    assert_close(out, ref)
    for got, want, name in zip(_grads(out, qkv), _grads(ref, qkv), ("dq", "dk", "dv")):
        assert_close(got, want, name=name)


def test_cpu_path_key_blocks_going_down_and_multi_query() -> None:
    """Key blocks visited by one query block lying *before* the previous one's (a negative step:
    no strided view, ``as_strided`` rejects it), and query heads sharing one key/value head
    (a zero step: the dK/dV scatter sums the heads first)."""
    import attnlib

    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:4, 4:] = True
    m[4:, :4] = True
    out = attnlib.Attention(16, 2)(torch.randn(1, 8, 16), mask=BlockMask.from_dense(m, 4))
    assert out.shape == (1, 8, 16)
    q, k, v = make_qkv(1, 2, 8, 8, h_kv=1, dtype=torch.float64, seed=3)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    for dense in (m, torch.tril(torch.ones(8, 8, dtype=torch.bool))):
        out = block_sparse_attention(*qkv, BlockMask.from_dense(dense, 4))
        ref = reference_attention(*qkv, mask=dense[None, None])
        assert_close(out, ref)
        for got, want in zip(_grads(out, qkv), _grads(ref, qkv)):
            assert_close(got, want)


def test_score_mod_path_keeps_causal_and_key_lengths() -> None:
    """The PyTorch score_mod path applies ``causal`` and ``kv_lengths`` like the plain path."""
    from attnlib.testing import make_qkv

    q, k, v = make_qkv(2, 2, 40, 16, m=40, dtype=torch.float64, logit_scale=2.0, seed=11)
    bm = BlockMask.from_dense(torch.ones(1, 1, 40, 40, dtype=torch.bool), 16)
    kvl = torch.tensor([40, 23])
    plain = block_sparse_attention(q, k, v, bm, causal=True, kv_lengths=kvl, backend="torch")
    modded = block_sparse_attention(
        q, k, v, bm, causal=True, kv_lengths=kvl, backend="torch", score_mod=lambda s, b, h, i, j: s
    )
    torch.testing.assert_close(modded, plain, rtol=0, atol=1e-12)
