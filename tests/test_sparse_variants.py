"""Sparse variants against their defining equations (float64) and their keep-all special cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.functional import reference_attention
from attnlib.functional.grat import grat_permutation
from attnlib.functional.sparse import block_max_attention
from attnlib.masks import BlockMask, KeyPadding, causal_mask, normalize_mask, window_mask
from attnlib.registry import get_variant
from attnlib.testing import assert_close, make_qkv
from attnlib.variants.sparse import freeze_all_but_gates

B, H, D = 2, 4, 8


def am(n: int, m: int | None = None, mask=None, causal: bool = False):
    return normalize_mask(mask, causal=causal, batch=B, heads=H, n=n, m=m or n, device=torch.device("cpu"))


def core(name: str, **kw):
    torch.manual_seed(0)
    return get_variant(name)(num_heads=H, head_dim=D, **kw).double().eval()


def key_padding(n: int, seed: int = 1) -> KeyPadding:
    kp = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    kp[:, 0] = True
    return KeyPadding(kp)


def expand_blocks(sel: torch.Tensor, bs: int, n: int, m: int) -> torch.Tensor:
    return sel.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n, :m]


# ------------------------------------------------------------------------------------------
# block_sparse
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "kw", "rule"),
    [
        ("sliding_window", {"window": 5}, lambda n, m: window_mask(n, m, left=5, right=5)),
        (
            "longformer",
            {"window": 3, "num_global": 2},
            lambda n, m: (
                window_mask(n, m, left=3, right=3) | (torch.arange(n)[:, None] < 2) | (torch.arange(m)[None, :] < 2)
            ),
        ),
        ("dilated", {"window_blocks": 1, "dilation": 2}, None),
        ("strided", {"stride": 3}, None),
        ("causal", {}, lambda n, m: causal_mask(n, m)),
        ("dense", {}, lambda n, m: torch.ones(n, m, dtype=torch.bool)),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_equals_reference_under_pattern(pattern: str, kw: dict, rule, causal: bool) -> None:
    cr = core("block_sparse", pattern=pattern, block_size=8, **kw)
    n = m = 45
    dense = rule(n, m) if rule is not None else cr.block_mask(n, m, "cpu").to_dense()[0, 0]
    kp = key_padding(m)
    q, k, v = make_qkv(B, H, n, D, m=m, h_kv=2, dtype=torch.float64, logit_scale=4.0, seed=3)
    res = cr(q, k, v, am(n, m, kp, causal), need_weights=True, need_importance=True)
    ref, w = reference_attention(q, k, v, mask=[kp, dense[None, None]], causal=causal, return_weights=True)
    assert_close(res.out, ref)
    assert_close(res.weights, w)
    assert_close(res.importance, w.mean(2))


def test_block_sparse_cross_attention_and_block_masks() -> None:
    cr = core("block_sparse", pattern="sliding_window", window=4, block_size=8)
    q, k, v = make_qkv(B, H, 20, D, m=33, dtype=torch.float64, seed=4)
    ref = reference_attention(q, k, v, mask=window_mask(20, 33, left=4, right=4)[None, None], causal=True)
    assert_close(cr(q, k, v, am(20, 33, causal=True), cross=True).out, ref)
    extra = BlockMask.from_dense(torch.rand(1, H, 20, 33) > 0.5, 4)  # a caller BlockMask with another block size
    ref2 = reference_attention(q, k, v, mask=[extra, window_mask(20, 33, left=4, right=4)[None, None]])
    assert_close(cr(q, k, v, am(20, 33, extra), cross=True).out, ref2)


# ------------------------------------------------------------------------------------------
# GRAT
# ------------------------------------------------------------------------------------------


def _grat_allowed(grid, group, mode, radius, extra):
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    gc = coords // torch.tensor(group)
    diff = gc[:, None] - gc[None, :]
    a = (diff == 0).any(-1) if mode == "criss_cross" else (diff.abs() <= radius).all(-1)
    t = coords.shape[0]
    out = torch.ones(t + extra, t + extra, dtype=torch.bool)
    out[:t, :t] = a
    return out


@pytest.mark.parametrize(("n", "window", "padded"), [(17, 256, False), (40, 8, False), (17, 256, True)])
def test_block_sparse_all_full_layout_takes_the_dense_path(
    n: int, window: int, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layout with every block full (window wider than the sequence, one block) is dense
    attention: the kernel is skipped and the result equals the float64 reference; otherwise
    (a real window, or key padding making blocks partial) the kernel runs."""
    import attnlib.variants.sparse as sp

    calls: list[int] = []
    kernel = sp.block_sparse_attention

    def counting(*a, **kw):
        calls.append(1)
        return kernel(*a, **kw)

    monkeypatch.setattr(sp, "block_sparse_attention", counting)
    q, k, v = make_qkv(2, 4, n, 16, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=n)  # GQA on both paths
    core = get_variant("block_sparse")(
        num_heads=4, head_dim=16, pattern="sliding_window", window=window, block_size=128
    )
    kp = torch.ones(2, n, dtype=torch.bool)
    if padded:
        kp[1, -5:] = False
    am = normalize_mask(KeyPadding(kp) if padded else None, causal=False, batch=2, heads=4, n=n, m=n, device=q.device)
    out = core(q, k, v, am).out
    allowed = window_mask(n, n, left=window, right=window) & kp[:, None, None, :]
    assert_close(out, reference_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask=allowed))
    dense = window >= n and not padded
    assert calls == ([] if dense else [1])
    bm = BlockMask.sliding_window(n, window, window, block_size=128)
    assert bm.all_full() == (window >= n)


@pytest.mark.parametrize("mode", ["criss_cross", "surrounding"])
def test_grat_equals_reference_with_the_group_mask(mode: str) -> None:
    grid, group, extra = (4, 6), (2, 3), 3
    n = 4 * 6 + extra
    cr = core("grat", grid=grid, group=group, mode=mode, radius=1, block_size=4)
    q, k, v = make_qkv(B, H, n, D, h_kv=2, dtype=torch.float64, logit_scale=4.0, seed=5)
    allowed = _grat_allowed(grid, group, mode, 1, extra)
    kp = key_padding(n)
    for mask, causal in ((None, False), (kp, False), (kp, True)):
        res = cr(q, k, v, am(n, mask=mask, causal=causal), need_weights=True, need_importance=True)
        ref, w = reference_attention(q, k, v, mask=[mask, allowed[None, None]], causal=causal, return_weights=True)
        assert_close(res.out, ref)
        assert_close(res.weights, w)
        assert_close(res.importance, w.mean(2))
    # the layout is built in grouped order: groups are contiguous runs
    bm, perm = cr.layout(n, "cpu")
    assert torch.equal(perm[:-extra], grat_permutation(grid, group))
    assert torch.equal(bm.to_dense()[0, 0], allowed[perm][:, perm])


def test_grat_all_groups_is_dense_and_1d() -> None:
    q, k, v = make_qkv(B, H, 30, D, dtype=torch.float64, seed=6)
    everything = core("grat", grid=(5, 6), group=(2, 2), mode="surrounding", radius=3, block_size=4)
    assert_close(everything(q, k, v, am(30)).out, reference_attention(q, k, v))
    one_d = core("grat", group=8, mode="surrounding", radius=1, block_size=8)
    i = torch.arange(30)
    band = ((i[:, None] // 8) - (i[None, :] // 8)).abs() <= 1
    assert_close(one_d(q, k, v, am(30)).out, reference_attention(q, k, v, mask=band[None, None]))
    with pytest.raises(ValueError, match="only N=30"):
        core("grat", grid=(6, 6), group=(2, 2))(q, k, v, am(30))


# ------------------------------------------------------------------------------------------
# SeerAttention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_seer_density_one_equals_dense(causal: bool, h_kv: int) -> None:
    cr = core("seer", block_size=8, density=1.0, gate_dim=16)
    q, k, v = make_qkv(B, H, 50, D, h_kv=h_kv, dtype=torch.float64, logit_scale=4.0, seed=7)
    kp = key_padding(50)
    for mask in (None, kp):
        res = cr(q, k, v, am(50, mask=mask, causal=causal))
        assert_close(res.out, reference_attention(q, k, v, mask=mask, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_seer_sparse_output_equals_reference_under_selected_blocks(causal: bool) -> None:
    cr = core("seer", block_size=8, density=0.4, gate_dim=16)
    n = 64
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=8)
    a = am(n, causal=causal)
    base = a.as_block_mask(8) or BlockMask.from_topk(torch.zeros(8, 8), k=8, block_size=8)
    p, f = base.block_states()
    allowed = (p | f).expand(B, H, -1, -1)
    sel = cr.select(cr.gate_logits(q, k, allowed, causal=causal), allowed, causal, n, n)
    kk = max(1, math.floor((1 - math.sqrt(0.6)) * 8)) if causal else round(0.4 * 8)
    if not causal:
        assert (sel.sum(-1) == kk).all()
    res = cr(q, k, v, a, need_weights=True)
    ref, w = reference_attention(q, k, v, mask=expand_blocks(sel, 8, n, n), causal=causal, return_weights=True)
    assert_close(res.out, ref)
    assert_close(res.weights, w)
    assert res.aux_loss is None


def test_seer_topk_density_over_the_causal_triangle() -> None:
    cr = core("seer", block_size=4, density=0.3, gate_dim=8, causal_gate=False)
    n = 256
    q, k, _ = make_qkv(1, H, n, D, dtype=torch.float64, seed=9)
    nb = n // 4
    allowed = torch.ones(nb, nb, dtype=torch.bool).tril()
    sel = cr.select(cr.gate_logits(q, k, allowed), allowed, True, n, n)
    dens = sel.sum().item() / (H * allowed.sum().item())
    assert abs(dens - 0.3) < 2 / nb, dens


def test_seer_block_max_target_and_training_mode() -> None:
    n, bs = 37, 8
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=3.0, seed=10)
    a = am(n, causal=True)
    gt = block_max_attention(q, k, a, D**-0.5, bs, bs, chunk_blocks=2)
    _, attn = reference_attention(q, k, v, causal=True, return_weights=True)
    naive = F.max_pool2d(attn, bs, ceil_mode=True)
    naive = naive / naive.sum(-1, keepdim=True)
    assert_close(gt, naive)
    # training: dense output, aux = loss_scale * KL(GT || softmax(S)) on rows I >= n_q / 4 (mean reduction)
    cr = core("seer", block_size=bs, density=0.3, gate_dim=16, causal_gate=False).train()
    res = cr(q, k, v, a)
    assert_close(res.out, reference_attention(q, k, v, causal=True))
    logits = cr.gate_logits(q, k, torch.ones(5, 5, dtype=torch.bool).tril())
    t, lg = naive[:, :, 1:], logits[:, :, 1:]
    kl = torch.where(t > 0, t * (t.clamp_min(1e-300).log() - torch.log_softmax(lg, -1)), torch.zeros_like(t))
    assert_close(res.aux_loss, 10.0 * kl.sum() / kl.numel())


def test_seer_freeze_all_but_gates() -> None:
    attn = attnlib.Attention(32, 4, variant="seer", causal=True, block_size=4, gate_dim=16).double().train()
    gates = freeze_all_but_gates(attn)
    assert {id(p) for p in gates} == {id(attn.core.q_gate), id(attn.core.k_gate)}
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y = attn(x)
    (y.square().mean() + attnlib.aux_loss(attn)).backward()
    assert attn.in_proj.weight.grad is None and attn.core.k_gate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no 'seer'"):
        freeze_all_but_gates(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------
# MoSA
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_mosa_keep_all_equals_scaled_dense(causal: bool) -> None:
    q, k, v = make_qkv(B, H, 20, D, dtype=torch.float64, logit_scale=4.0, seed=11)
    cr = core("mosa", sparsity=1.0, causal_routing=False, router_bias=True)
    with torch.no_grad():
        cr.router.weight.zero_()
        cr.router.bias.zero_()
    ref = reference_attention(q, k, v, causal=causal)
    assert_close(cr(q, k, v, am(20, causal=causal)).out, 0.5 * ref)  # constant router: c = sigmoid(0)
    with torch.no_grad():
        cr.router.bias.fill_(50.0)  # sigmoid(50) == 1.0 in float64
    assert_close(cr(q, k, v, am(20, causal=causal)).out, ref)


@pytest.mark.parametrize("causal_routing", [False, True])
def test_mosa_equals_dense_masked_oracle(causal_routing: bool) -> None:
    n = 24
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=12)
    cr = core("mosa", sparsity=3.0, causal_routing=causal_routing, threshold=0.5)
    x = q.transpose(1, 2).reshape(B, n, H * D)
    r = torch.sigmoid(x @ cr.router.weight.T).transpose(1, 2)  # (B, H, N)
    if causal_routing:
        picked = r > 0.5
    else:
        picked = torch.zeros_like(r, dtype=torch.bool).scatter(-1, r.topk(8, -1).indices, True)
    for causal in (False, True):
        mask = picked[..., :, None] & picked[..., None, :]
        ref = reference_attention(q, k, v, mask=mask, causal=causal) * r[..., None]
        res = cr(q, k, v, am(n, causal=causal), need_weights=True, need_importance=True)
        assert_close(res.out, ref)
        assert_close(res.out, res.weights @ v)
        assert_close(res.importance, res.weights.mean(2))
    x_out = cr(q, k, v, am(n)).out
    assert torch.equal(x_out[~picked], torch.zeros_like(x_out[~picked]))


def test_mosa_router_gets_gradient_and_padding_is_never_picked() -> None:
    n = 16
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, seed=13)
    cr = core("mosa", sparsity=2.0)
    kp = key_padding(n)
    _, idx, valid = cr.route(q, am(n, mask=kp))
    assert kp.valid.gather(1, idx.flatten(1)).view_as(idx)[valid].all()
    cr(q, k, v, am(n, mask=kp)).out.square().sum().backward()
    assert cr.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# Sparsifiner
# ------------------------------------------------------------------------------------------


def test_sparsifiner_keep_all_equals_dense() -> None:
    q, k, v = make_qkv(B, H, 30, D, dtype=torch.float64, logit_scale=4.0, seed=14)
    cr = core("sparsifiner", num_tokens=40, keep_rate=1.0, reduce_n_factor=4)
    kp = key_padding(30)
    for mask, causal in ((None, False), (kp, True)):
        assert_close(
            cr(q, k, v, am(30, mask=mask, causal=causal)).out, reference_attention(q, k, v, mask=mask, causal=causal)
        )


@pytest.mark.parametrize("causal", [False, True])
def test_sparsifiner_gather_equals_masked_dense(causal: bool) -> None:
    n = 30
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=15)
    cr = core("sparsifiner", num_tokens=40, keep_rate=0.25, reduce_n_factor=4, basis_topk=4)
    with torch.no_grad():
        cr.up.normal_(0, 0.1)  # a predictor with some structure
    a_hat = cr.approx_attention(q, k, sparse_basis=True, causal=causal)
    if causal:
        a_hat = a_hat.masked_fill(~causal_mask(n), float("-inf"))
    kk = math.ceil(0.25 * n)
    sel = torch.zeros(B, H, n, n, dtype=torch.bool)
    for i in range(n):  # causal: row i keeps ceil(0.25 * (i + 1)) of the i + 1 keys it may see
        k_i = math.ceil(0.25 * (i + 1)) if causal else kk
        sel[:, :, i].scatter_(-1, a_hat[:, :, i].topk(k_i, -1).indices, True)
    sel[:, :, 0] = True  # CLS row dense
    res = cr(q, k, v, am(n, causal=causal), need_weights=True)
    ref, w = reference_attention(q, k, v, mask=sel, causal=causal, return_weights=True)
    assert_close(res.out, ref)
    assert_close(res.weights, w)
    kept = (res.weights[:, :, 1:] != 0).sum(-1)
    expect = torch.tensor([math.ceil(0.25 * (i + 1)) if causal else kk for i in range(1, n)])
    assert (kept == expect).all()


def test_sparsifiner_reconstruction_loss() -> None:
    n = 20
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, seed=16)
    cr = core("sparsifiner", num_tokens=32, reduce_n_factor=4).train()
    res = cr(q, k, v, am(n))
    teacher = reference_attention(q, k, v, return_weights=True)[1]
    a_raw = (
        torch.softmax(
            torch.einsum("bhnc,bhcd->bhnd", cr.q_reduce(q), torch.einsum("bhnc,nd->bhcd", cr.k_reduce(k), cr.down[:n]))
            * H**-0.5,
            -1,
        )
        @ cr.up[:n].T
    )
    assert_close(res.aux_loss, 0.01 * (a_raw[:, :, 1:] - teacher[:, :, 1:]).square().sum())
    recon = core("sparsifiner", num_tokens=32, reduce_n_factor=4, reconstruct=True)
    assert_close(recon(q, k, v, am(n)).out, reference_attention(q, k, v))
    with pytest.raises(ValueError, match="num_tokens"):
        recon(*make_qkv(B, H, 40, D, dtype=torch.float64), am(40))


@pytest.mark.parametrize("causal", [False, True])
def test_sparsifiner_blocked_paths_equal_the_whole_matrix(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """Row blocks (16 rows each here), the additive-bias fused path and the explicit path agree with
    one whole-matrix computation: output, predictor, and the reconstruction loss and its gradients."""
    n = 40
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=21)
    cr = core("sparsifiner", num_tokens=48, keep_rate=0.3, reduce_n_factor=4, basis_topk=4)
    with torch.no_grad():
        cr.up.normal_(0, 0.1)
    kp = key_padding(n)
    mask = am(n, mask=kp, causal=causal)
    whole = cr(q, k, v, mask, need_weights=True)  # explicit path, one block (n * n * B * H < 2**22)
    a_whole = cr.approx_attention(q, k, sparse_basis=True, causal=causal, key_valid=kp.valid)
    cr.train()
    loss_whole = cr(q, k, v, mask).aux_loss
    g_whole = torch.autograd.grad(loss_whole, [cr.up, cr.down, cr.q_reduce.weight])
    monkeypatch.setattr("attnlib.dispatch.ROW_BLOCK_ELEMENTS", 1)
    cr.eval()
    fused = cr(q, k, v, mask)  # additive bias through SDPA, blocks of 16 rows
    assert_close(fused.out, whole.out)
    rows = cr.predictor(q, k, sparse_basis=True, causal=causal, key_valid=kp.valid)
    assert_close(torch.cat([rows(0, 16), rows(16, 33), rows(33, n)], 2), a_whole)
    cr.train()
    loss = cr(q, k, v, mask).aux_loss
    assert_close(loss, loss_whole)
    for got, want in zip(torch.autograd.grad(loss, [cr.up, cr.down, cr.q_reduce.weight]), g_whole, strict=True):
        assert_close(got, want)


# ------------------------------------------------------------------------------------------
# SwinBERT mask
# ------------------------------------------------------------------------------------------


def test_swinbert_saturated_mask_equals_dense() -> None:
    q, k, v = make_qkv(B, H, 24, D, dtype=torch.float64, logit_scale=4.0, seed=17)
    cr = core("swinbert_mask", num_tokens=16, block_size=8)
    with torch.no_grad():
        cr.mask_logits.fill_(40.0)  # sigmoid(40) == 1.0 in float64: S == 1
    kp = key_padding(24)
    for training in (False, True):
        cr.train(training)
        assert_close(cr(q, k, v, am(24, mask=kp, causal=True)).out, reference_attention(q, k, v, mask=kp, causal=True))


def test_swinbert_soft_and_hard_masks_follow_the_definition() -> None:
    n, t = 24, 16
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=3.0, seed=18)
    cr = core("swinbert_mask", num_tokens=t, block_size=8)
    g = torch.Generator().manual_seed(19)
    with torch.no_grad():  # near-1 entries give finite biases (1 - sigmoid(10) ~ 5e-5), negatives drop edges
        v_init = 7 + 5 * torch.rand(t, t, generator=g, dtype=torch.float64)
        v_init[torch.rand(t, t, generator=g) < 0.4] = -3.0
        cr.mask_logits.copy_(v_init)
    eye = torch.eye(t, dtype=torch.float64)
    soft = eye + (1 - eye) * torch.sigmoid(cr.mask_logits)
    # training: additive -1e4 (1 - S) on the video-video block only
    cr.train()
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    bias = torch.zeros(n, n, dtype=torch.float64)
    bias[n - t :, n - t :] = -1e4 * (1 - soft)
    res = cr(q, k, v, am(n), need_weights=True)
    assert_close(res.out, torch.softmax(s + bias, -1) @ v)
    assert_close(res.aux_loss, 0.5 * ((1 - eye) * torch.sigmoid(cr.mask_logits)).mean())
    # inference: S >= 0.5 as a BlockMask (text rows/cols untouched)
    cr.eval()
    hard = torch.ones(n, n, dtype=torch.bool)
    hard[n - t :, n - t :] = soft >= 0.5
    assert_close(cr(q, k, v, am(n)).out, reference_attention(q, k, v, mask=hard[None, None]))
    assert cr(q, k, v, am(n)).aux_loss is None
