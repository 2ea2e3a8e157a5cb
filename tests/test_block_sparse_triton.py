"""Block-sparse Triton kernels: fp16 / causal / key lengths / strides / sub-tiles through Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``; bf16 ``tl.dot`` is wrong in the interpreter,
fp16 is not), dispatch and fallbacks, and GPU-marked tests that reach the kernel itself
(bf16 / fp16, 64- and 128-blocks, GQA, ragged N, head dims 64-256, strided inputs, B·H > 65535,
64-bit offsets, tensors on a non-current device, no host syncs)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernels run through the interpreter on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnlib.errors import UnsupportedError  # noqa: E402
from attnlib.functional import reference_attention  # noqa: E402
from attnlib.kernels import block_sparse_attention, triton_available  # noqa: E402
from attnlib.masks import BlockMask  # noqa: E402
from attnlib.testing import make_qkv  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def _tri():
    from attnlib.kernels import _triton_block_sparse as tri

    return tri


@pytest.fixture
def spy(count_calls) -> dict[str, int]:
    """Counts the Triton forward / backward launches (so a test knows the kernel ran)."""
    tri = _tri()
    return count_calls(tri, ("forward", "backward"))


def _dense(b: int, h: int, n: int, m: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, h, n, m, generator=g) < density
    dense[..., 1, :] = False  # an empty row
    return dense


def _full_mask(dense: torch.Tensor, causal: bool, kv_lengths: torch.Tensor | None) -> torch.Tensor:
    n, m = dense.shape[-2:]
    out = dense.clone()
    if causal:
        out = out & (torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n))
    if kv_lengths is not None:
        out = out & (torch.arange(m)[None, None, None, :] < kv_lengths.cpu()[:, None, None, None])
    return out


def _check_against_reference(qkv64, dense, bm, dtype, device, tol, **kw) -> None:
    """Output and gradients of the Triton kernel (at ``dtype`` on ``device``) vs float64."""
    ref = reference_attention(*qkv64, mask=dense)
    g = torch.Generator().manual_seed(7)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = (ref, *torch.autograd.grad(ref, qkv64, go))
    qkv = tuple(t.detach().to(device, dtype).requires_grad_() for t in qkv64)
    out = block_sparse_attention(*qkv, bm.to(device), backend="triton", **kw)
    got = (out, *torch.autograd.grad(out, qkv, go.to(device, dtype)))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = float((a.detach().cpu().double() - w.detach()).abs().max())
        bound = tol * max(1.0, float(w.detach().abs().max()))
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"


# ------------------------------------------------------------------------------------------
# interpreter (CPU)
# ------------------------------------------------------------------------------------------

INTERP = pytest.mark.skipif(CUDA, reason="interpreter tests run on machines without CUDA")


@INTERP
@pytest.mark.parametrize("tile", [None, (16, 16)])
@pytest.mark.parametrize(("causal", "kv"), [(False, False), (True, False), (False, True), (True, True)])
def test_interpreter_causal_and_key_lengths_in_kernel(tile, causal, kv, monkeypatch, spy) -> None:
    """The kernel flags equal the reference under mask AND causal AND key lengths, with tiles
    equal to the mask block and 16x16 sub-tiles of 32-blocks (the sub-tile loops), GQA, N != M."""
    monkeypatch.setattr(_tri(), "INTERPRET_TILE", tile)
    n, m = 70, 90
    q, k, v = make_qkv(2, 4, n, 16, m=m, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=1)
    dense = _dense(2, 1, n, m, 0.5, seed=2)
    kvl = torch.tensor([50, 7]) if kv else None
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    _check_against_reference(
        qkv, _full_mask(dense, causal, kvl), BlockMask.from_dense(dense, 32), torch.float64, "cpu", 1e-10,
        causal=causal, kv_lengths=kvl,
    )  # fmt: skip
    assert spy == {"forward": 1, "backward": 1}


@INTERP
@pytest.mark.parametrize(("d", "block", "tile"), [(16, 16, None), (32, 32, (16, 32)), (64, 32, (32, 16))])
def test_interpreter_fp16(d, block, tile, monkeypatch) -> None:
    """fp16 through the interpreter (its fp16 dots are right; bf16's are not): forward and
    gradients within half-precision error of the float64 reference."""
    monkeypatch.setattr(_tri(), "INTERPRET_TILE", tile)
    n, m = 45, 61
    q, k, v = make_qkv(2, 2, n, d, m=m, h_kv=1, dtype=torch.float64, logit_scale=2.0, seed=d)
    dense = _dense(1, 2, n, m, 0.4, seed=d)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    _check_against_reference(qkv, dense, BlockMask.from_dense(dense, block), torch.float16, "cpu", 2e-2)


@INTERP
def test_interpreter_strided_inputs_are_not_copied(monkeypatch) -> None:
    """q / k / v as (B, N, H, D) views transposed to (B, H, N, D): the kernels read the strides
    (no .contiguous() copy) and the result equals the contiguous call's."""
    tri = _tri()
    b, n, h, d = 2, 40, 4, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    assert tri._strided(q) is q
    bm = BlockMask.causal(n, block_size=16)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, bm, backend="triton")
    grads = torch.autograd.grad(out.sum(), qkv)
    qkv_c = tuple(t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = block_sparse_attention(*qkv_c, bm, backend="triton")
    grads_c = torch.autograd.grad(out_c.sum(), qkv_c)
    torch.testing.assert_close(out, out_c, rtol=0, atol=1e-12)
    for a, c in zip(grads, grads_c):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


@INTERP
def test_interpreter_grid_is_one_dimensional(monkeypatch) -> None:
    """One program per (batch, head, tile) on grid axis 0 (capped at 2^31 - 1, not 65535)."""
    tri = _tri()
    grids = []
    real = tri._kernels(True)

    class Rec:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            grids.append(grid)
            return self.fn[grid]

    monkeypatch.setattr(tri, "_kernels", lambda interpret: {k: Rec(f) for k, f in real.items()})
    monkeypatch.setattr(tri, "INTERPRET_TILE", (16, 16))
    q, k, v = make_qkv(3, 5, 64, 16, dtype=torch.float64)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(*qkv, BlockMask.causal(64, block_size=32), backend="triton")
    out.sum().backward()
    assert grids == [(3 * 5 * 2 * 2,), (3 * 5 * 2 * 2,), (3 * 5 * 2 * 2,)]


@INTERP
def test_interpreter_forward_has_no_host_sync(monkeypatch) -> None:
    """After the layout is cached on the BlockMask, the Triton forward (causal flag and key
    lengths included) calls no .item() / .tolist() / nonzero / bool(tensor) (nothing that waits
    for the GPU; torch.compile-friendly)."""
    q, k, v = make_qkv(2, 2, 64, 16, dtype=torch.float64)
    bm = BlockMask.sliding_window(64, 20, block_size=16)
    kvl = torch.tensor([60, 33])
    block_sparse_attention(q, k, v, bm, backend="triton", causal=True)  # caches the layout / causal counts

    def boom(*a, **kw):
        raise AssertionError("host sync in the Triton forward path")

    tri = _tri()
    real_forward = tri.forward

    def guarded(*a, **kw):
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "nonzero", "__bool__"):
                mp.setattr(torch.Tensor, name, boom)
            mp.setattr(torch, "nonzero", boom)
            return real_forward(*a, **kw)

    monkeypatch.setattr(tri, "forward", guarded)
    for causal, lengths in ((True, None), (True, kvl), (False, kvl), (False, None)):
        out = block_sparse_attention(q, k, v, bm, backend="triton", causal=causal, kv_lengths=lengths)
        assert out.shape == q.shape


@INTERP
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_interpreter_block_sparse_variant_right_padding_as_lengths(dtype, tol, causal, monkeypatch, spy) -> None:
    """The ``block_sparse`` variant with right padding runs the Triton kernel (interpreter, fp32 /
    fp16) on its cached pattern with ``kv_lengths=``: output and gradients within the dtype's error
    of the float64 reference under pattern AND padding (AND causal)."""
    from attnlib.masks import KeyPadding, normalize_mask, window_mask
    from attnlib.registry import get_variant

    monkeypatch.setattr("attnlib.dispatch.triton_preferred", lambda device: True)
    monkeypatch.setattr(_tri(), "INTERPRET_TILE", (16, 16))
    n, lengths = 50, torch.tensor([50, 21])
    core = get_variant("block_sparse")(num_heads=2, head_dim=16, pattern="sliding_window", window=9, block_size=16)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    qkv64 = tuple(t.requires_grad_() for t in make_qkv(2, 2, n, 16, dtype=torch.float64, logit_scale=2.0, seed=9))
    allowed = (window_mask(n, n, left=9, right=9)[None, None] & valid[:, None, None, :]).expand(2, 2, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    ref = reference_attention(*qkv64, mask=allowed)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = (ref, *torch.autograd.grad(ref, qkv64, go))
    qkv = tuple(t.detach().to(dtype).requires_grad_() for t in qkv64)
    am = normalize_mask(KeyPadding(valid), causal=causal, batch=2, heads=2, n=n, m=n, device=torch.device("cpu"))
    out = core(*qkv, am).out
    got = (out, *torch.autograd.grad(out, qkv, go.to(dtype)))
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float((a.detach().double() - w.detach()).abs().max())
        assert err <= tol * max(1.0, float(w.detach().abs().max())), f"{name}: max error {err:.2e}"
    assert spy == {"forward": 1, "backward": 1}


@INTERP
def test_kv_lengths_validation() -> None:
    q, k, v = make_qkv(2, 2, 32, 16)
    bm = BlockMask.causal(32, block_size=16)
    with pytest.raises(ValueError, match="kv_lengths must be an int tensor"):
        block_sparse_attention(q, k, v, bm, kv_lengths=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="kv_lengths must be an int tensor"):
        block_sparse_attention(q, k, v, bm, kv_lengths=torch.tensor([3]))


def test_torch_path_causal_and_key_lengths() -> None:
    """The PyTorch path folds causal / key lengths into the layout: equal to the reference."""
    n, m = 37, 53
    q, k, v = make_qkv(2, 4, n, 16, m=m, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=5)
    dense = _dense(2, 4, n, m, 0.4, seed=6)
    kvl = torch.tensor([20, 53])
    bm = BlockMask.from_dense(dense, 8)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    for causal, lengths in ((True, None), (False, kvl), (True, kvl)):
        out = block_sparse_attention(*qkv, bm, causal=causal, kv_lengths=lengths, backend="torch")
        ref = reference_attention(*qkv, mask=_full_mask(dense, causal, lengths))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        for a, r in zip(torch.autograd.grad(out.sum(), qkv), torch.autograd.grad(ref.sum(), qkv)):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_explicit_torch_path_accumulates_half_in_fp32(monkeypatch) -> None:
    """The non-CPU-flash PyTorch path (the fallback on CUDA): bf16 scores are not rounded to bf16
    before the softmax - the log-sum-exp is fp32-accurate, not ~1e-2 off."""
    import attnlib.kernels.block_sparse as bsk

    monkeypatch.setattr(bsk.dispatch, "fused_cpu_block_parts", lambda device, d, dv: False)
    q, k, v = make_qkv(1, 2, 64, 32, dtype=torch.float64, logit_scale=30.0, seed=3)
    dense = _dense(1, 1, 64, 64, 0.5, seed=4)
    bm = BlockMask.from_dense(dense, 16)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    _, lse = block_sparse_attention(qb, kb, vb, bm, backend="torch", return_lse=True)
    s = torch.matmul(qb.double(), kb.double().transpose(-1, -2)) * 32**-0.5
    want = torch.logsumexp(s.masked_fill(~dense, float("-inf")), -1)
    ok = torch.isfinite(want)
    assert float((lse.double() - want)[ok].abs().max()) < 1e-4


# ------------------------------------------------------------------------------------------
# dispatch: configs that do not fit fall back with a warning (checked on CPU with a fake device)
# ------------------------------------------------------------------------------------------


def test_no_fitting_config_routes_to_torch_with_a_warning(monkeypatch) -> None:
    from attnlib.kernels import _triton_configs as cfgs

    monkeypatch.setattr(cfgs, "device_smem_limit", lambda device=None: 32 * 1024)  # a (very) small card
    why = cfgs.unsupported(torch.bfloat16, 256, 256, (128, 128))
    assert why is not None and "tile configuration fits" in why and "32 KB" in why
    assert cfgs.unsupported(torch.bfloat16, 64, 64, (64, 64)) is None
    monkeypatch.setattr(cfgs, "device_smem_limit", lambda device=None: 166912)  # A100
    for d in (32, 64, 128, 256):
        assert cfgs.unsupported(torch.bfloat16, d, d, (128, 128)) is None, d
    monkeypatch.setattr(cfgs, "device_smem_limit", lambda device=None: 232448)  # H100
    for prec in ("tf32", "tf32x3"):
        monkeypatch.setenv("ATTNLIB_TRITON_FP32", prec)
        for d in (32, 64, 80, 96, 128, 256):
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                why = cfgs.unsupported(dt, d, d, (128, 128))
                if dt == torch.float32 and prec == "tf32x3" and d == 256:  # documented: no 3xTF32 dK/dV tile
                    assert why is not None and "no dkdv tile configuration fits" in why and "tf32x3" in why
                else:
                    assert why is None, (d, dt, prec, why)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_no_fitting_config_warns_and_runs_torch(monkeypatch, spy) -> None:
    from attnlib.kernels import _triton_configs as cfgs
    from attnlib.kernels import block_sparse as bsk

    monkeypatch.setattr(cfgs, "device_smem_limit", lambda device=None: 16 * 1024)
    monkeypatch.setattr(bsk, "_WARNED", set())
    q, k, v = make_qkv(1, 2, 256, 256, dtype=torch.bfloat16, device="cuda")
    bm = BlockMask.causal(256, block_size=128, device="cuda")
    with pytest.warns(RuntimeWarning, match="PyTorch path"):
        out = block_sparse_attention(q, k, v, bm)
    assert spy["forward"] == 0 and torch.isfinite(out).all()
    with pytest.raises(UnsupportedError, match="tile configuration fits"):
        block_sparse_attention(q, k, v, bm, backend="triton")


# ------------------------------------------------------------------------------------------
# GPU: the Triton kernel itself (bf16 / fp16 / fp32), not the PyTorch path
# ------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, H, H_kv, N, M, D, block, density, causal
    (2, 4, 2, 300, 300, 64, 64, 0.3, False),
    (1, 8, 8, 512, 512, 128, 128, 0.5, True),
    (2, 4, 1, 257, 383, 128, (64, 128), 0.25, False),
    (1, 4, 4, 200, 200, 80, 64, 0.5, False),
    (1, 4, 2, 256, 256, 96, 128, 0.4, True),
    (1, 2, 2, 384, 384, 256, 128, 0.3, False),
    (1, 4, 4, 256, 256, 32, 16, 0.5, False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "h", "hk", "n", "m", "d", "block", "dens", "causal"), GPU_CASES)
def test_gpu_kernel_vs_float64_reference(b, h, hk, n, m, d, block, dens, causal, dtype, spy) -> None:
    q, k, v = make_qkv(b, h, n, d, m=m, h_kv=hk, dtype=torch.float64, logit_scale=2.0, seed=n + d)
    dense = _dense(b, 1, n, m, dens, seed=d)
    qkv = tuple(t.requires_grad_() for t in (q, k, v))
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 2e-3}[dtype]
    bm = BlockMask.from_dense(dense, block)
    _check_against_reference(qkv, _full_mask(dense, causal, None), bm, dtype, "cuda", tol, causal=causal)
    assert spy == {"forward": 1, "backward": 1}, "the Triton kernel did not run"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_auto_dispatch_reaches_the_kernel_for_half_precision(spy) -> None:
    import attnlib

    for dtype in (torch.bfloat16, torch.float16):
        attn = attnlib.Attention(256, 4, variant="block_sparse", pattern="sliding_window", window=100, block_size=64)
        attn = attn.to("cuda", dtype)
        x = torch.randn(2, 500, 256, device="cuda", dtype=dtype, requires_grad=True)
        y = attn(x)
        y.float().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert spy["forward"] >= 2 and spy["backward"] >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_strided_inputs_and_key_lengths(spy) -> None:
    b, n, h, d = 2, 333, 4, 64
    x = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    kvl = torch.tensor([333, 100], device="cuda", dtype=torch.int32)
    bm = BlockMask.causal(n, block_size=64, device="cuda")
    out = block_sparse_attention(q, k, v, bm, kv_lengths=kvl)
    want = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), bm, kv_lengths=kvl, backend="torch")
    assert float((out.float() - want.float()).abs().max()) < 2e-2
    assert spy["forward"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_more_than_65535_batch_heads(spy) -> None:
    """B · H = 70000 programs' worth of (batch, head) pairs (grid axis 1 used to be capped)."""
    q, k, v = (torch.randn(1, 70000, 32, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bm = BlockMask.causal(32, block_size=16, device="cuda")
    out = block_sparse_attention(q, k, v, bm)
    want = block_sparse_attention(q[:, -8:], k[:, -8:], v[:, -8:], bm, backend="torch")
    assert float((out[:, -8:].float() - want.float()).abs().max()) < 2e-2
    assert spy["forward"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_offsets_beyond_two_to_the_31(spy) -> None:
    """Batch row 1 starts 2^31 elements after row 0 (a strided view over a 4 GB buffer): 32-bit
    offsets wrapped there."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~13 GB of GPU memory")
    n, h, d = 128, 2, 64
    base = torch.randn(2**31 + h * n * d, device="cuda", dtype=torch.bfloat16)
    view = base.as_strided((2, h, n, d), (2**31, n * d, d, 1))
    bm = BlockMask.causal(n, block_size=64, device="cuda")
    out = block_sparse_attention(view, view, view, bm)
    want = block_sparse_attention(*(view[1:].contiguous(),) * 3, bm, backend="torch")
    assert float((out[1:].float() - want.float()).abs().max()) < 2e-2
    assert spy["forward"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_non_current_device(spy) -> None:
    q, k, v = make_qkv(1, 2, 256, 64, dtype=torch.bfloat16, device="cuda:1")
    bm = BlockMask.causal(256, block_size=64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out = block_sparse_attention(q, k, v, bm)
    want = block_sparse_attention(q, k, v, bm, backend="torch")
    assert float((out.float() - want.float()).abs().max()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_forward_has_no_host_sync(spy) -> None:
    q, k, v = make_qkv(2, 4, 512, 64, dtype=torch.bfloat16, device="cuda")
    bm = BlockMask.sliding_window(512, 100, block_size=64, device="cuda")
    kvl = torch.tensor([512, 300], device="cuda")
    block_sparse_attention(q, k, v, bm, causal=True)  # warm: autotune, cached layouts
    block_sparse_attention(q, k, v, bm, causal=True, kv_lengths=kvl)
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.cuda.set_sync_debug_mode("error")
        try:
            block_sparse_attention(q, k, v, bm, causal=True)
            block_sparse_attention(q, k, v, bm, causal=True, kv_lengths=kvl)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_autotune_key_buckets_n() -> None:
    """The autotuner re-tunes per power of two of N (and per mask block, head dim, precision,
    flags), not once for every N, and not never."""
    tri = _tri()
    assert "N_BUCKET" in tri._KEY and {"BQ", "BK", "BLOCK_D", "PREC", "CAUSAL"} <= set(tri._KEY)
    assert [tri._n_bucket(n) for n in (1, 100, 4096, 4097, 16384)] == [16, 128, 4096, 8192, 16384]
