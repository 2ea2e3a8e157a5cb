"""Sparse variants against their defining equations (float64) and their keep-all special cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.functional import reference_attention
from attnlib.functional.grat import grat_permutation
from attnlib.functional.sparse import block_max_attention, mosa_router, mosa_select
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


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_right_padding_reaches_the_kernel_as_lengths(
    causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right padding (each example's real keys a prefix) goes to the kernel as ``kv_lengths=`` with the
    cached pattern itself (no new BlockMask per call; the PyTorch path builds one layout per set of
    lengths and reuses it); other padding is ANDed into the layout. Output and gradients equal the
    float64 reference."""
    import attnlib.variants.sparse as sp

    seen: list[tuple] = []
    kernel = sp.block_sparse_attention

    def spy(q, k, v, bm, **kw):
        seen.append((bm, kw.get("kv_lengths"), kw.get("causal", False)))
        return kernel(q, k, v, bm, **kw)

    builds: list[int] = []
    real = BlockMask.from_key_padding.__func__
    monkeypatch.setattr(sp, "block_sparse_attention", spy)
    monkeypatch.setattr(
        BlockMask, "from_key_padding", classmethod(lambda c, *a, **kw: builds.append(1) or real(c, *a, **kw))
    )
    cr = core("block_sparse", pattern="sliding_window", window=6, block_size=8)
    n = 45
    lengths = torch.tensor([n, 19])
    right = torch.arange(n)[None, :] < lengths[:, None]
    holes = right.clone()
    holes[0, 3] = False
    pattern = cr.block_mask(n, n, "cpu")
    allowed = window_mask(n, n, left=6, right=6)[None, None]
    for kp, want, new_layouts in ((right, lengths, 1), (holes, None, 1), (right, lengths, 0)):
        seen.clear()
        builds.clear()
        qkv = tuple(
            t.requires_grad_() for t in make_qkv(B, H, n, D, h_kv=2, dtype=torch.float64, logit_scale=4.0, seed=31)
        )
        out = cr(*qkv, am(n, mask=KeyPadding(kp), causal=causal)).out
        ref = reference_attention(*qkv, mask=[KeyPadding(kp), allowed], causal=causal)
        assert_close(out, ref)
        go = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, qkv, go), torch.autograd.grad(ref, qkv, go), strict=True):
            assert_close(a, r)
        ((bm, kvl, c),) = seen
        if want is None:
            assert kvl is None and bm is not pattern
        else:
            assert bm is pattern and torch.equal(kvl, want) and c == causal
        assert len(builds) == new_layouts


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
    attention: the kernel is skipped and the result equals the float64 reference; a layout of one
    partial block (a real window, or key padding) runs as one SDPA call with its cached mask on CPU
    (:func:`attnlib.dispatch.block_layout_as_masked_dense`), also without the kernel."""
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
    assert calls == []
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
    cr = core("seer", block_size=8, density=0.4, gate_dim=16, last_block_dense=False)
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
    cr = core("seer", block_size=4, density=0.3, gate_dim=8, last_block_dense=False)
    n = 256
    q, k, _ = make_qkv(1, H, n, D, dtype=torch.float64, seed=9)
    nb = n // 4
    allowed = torch.ones(nb, nb, dtype=torch.bool).tril()
    sel = cr.select(cr.gate_logits(q, k, allowed), allowed, True, n, n)
    dens = sel.sum().item() / (H * allowed.sum().item())
    assert abs(dens - 0.3) < 2 / nb, dens


@pytest.mark.parametrize("causal", [False, True])
def test_seer_last_block_dense_by_default(causal: bool) -> None:
    """The official default keeps every allowed block of the last two query-block rows; the other
    rows keep the top-k budget (per row: the same count as without the option)."""
    n, bs = 48, 4
    q, k, _ = make_qkv(B, H, n, D, dtype=torch.float64, seed=10)
    nb = n // bs
    allowed = torch.ones(nb, nb, dtype=torch.bool)
    allowed = allowed.tril() if causal else allowed
    dense, sparse = (
        core("seer", block_size=bs, density=0.3, gate_dim=8),
        core("seer", block_size=bs, density=0.3, gate_dim=8, last_block_dense=False),
    )
    sparse.load_state_dict(dense.state_dict())
    sel = dense.select(dense.gate_logits(q, k, allowed, causal=causal), allowed, causal, n, n)
    ref = sparse.select(sparse.gate_logits(q, k, allowed, causal=causal), allowed, causal, n, n)
    assert torch.equal(sel[..., -2:, :], allowed[-2:].expand_as(sel[..., -2:, :]))
    assert torch.equal(sel[..., :-2, :], ref[..., :-2, :])
    assert (ref[..., -2:, :].sum(-1) < allowed[-2:].sum(-1)).any()


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


def _official_gate_logits(q, k, qw, kw, bs, base, pos):
    """The official prefill AttnGate, written from its equations in the official BSHD layout.

    q (B, N, H, D), k (B, N, H_kv, D) pre-rotary; Q avg-pooled, K max/min/avg-pooled per block
    (ceil mode), per-head maps (K per KV head), RoPE (rotate-half) on the gate vectors at the
    positions of each block's first token, K repeated to the query heads, S = Q K^T / sqrt(d_g),
    key blocks after the query block at -inf (the diagonal block is scored).
    """

    def pool(x, op):
        y = x.permute(0, 2, 3, 1)  # (B, H, D, N) -> pool over N with ceil mode
        b, h, d, n = y.shape
        y = y.reshape(b * h * d, 1, n)
        if op == "avg":
            r = F.avg_pool1d(y, bs, bs, ceil_mode=True)
        elif op == "max":
            r = F.max_pool1d(y, bs, bs, ceil_mode=True)
        else:
            r = -F.max_pool1d(-y, bs, bs, ceil_mode=True)
        return r.reshape(b, h, d, -1).permute(0, 3, 1, 2)  # (B, n, H, D)

    qp = pool(q, "avg")
    kp = torch.cat([pool(k, o) for o in ("max", "min", "avg")], -1)
    qg = torch.einsum("bshi,hio->bsho", qp, qw)
    kg = torch.einsum("bshi,hio->bsho", kp, kw)
    dg = qg.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dg, 2, dtype=torch.float64) / dg)
    ang = pos[::bs].double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rot(x):
        x1, x2 = x[..., : dg // 2], x[..., dg // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    qg, kg = rot(qg).transpose(1, 2), rot(kg).transpose(1, 2)
    kg = kg.repeat_interleave(qg.shape[1] // kg.shape[1], 1)
    s = qg @ kg.transpose(-1, -2) * dg**-0.5
    nb = s.shape[-1]
    return s.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))


def test_seer_loads_official_gate_and_gives_its_logits_with_rope() -> None:
    """Official-layout gate weights (Q map per query head, K map per KV head) load and give the
    official gate's logits from the pre-rotary q/k, while the module hands the core rotated ones."""
    torch.manual_seed(0)
    bs, n, dg, h, h_kv = 4, 22, 16, 4, 2
    attn = (
        attnlib.Attention(
            32, h, variant="seer", causal=True, rope=True, num_kv_heads=h_kv, block_size=bs, gate_dim=dg, density=0.5
        )
        .double()
        .eval()
    )
    d = 32 // h
    official = {
        "mask_linear_q.weight": torch.randn(h, d, dg, dtype=torch.float64) / d**0.5,
        "mask_linear_k.weight": torch.randn(h_kv, 3 * d, dg, dtype=torch.float64) / (3 * d) ** 0.5,
    }
    attn.core.load_official_gate(official)
    x = torch.randn(2, n, 32, dtype=torch.float64)
    q, k, v = attn.project(x)  # pre-rotary
    pos = torch.arange(n)
    ref = _official_gate_logits(
        q.transpose(1, 2),
        k.transpose(1, 2),
        official["mask_linear_q.weight"],
        official["mask_linear_k.weight"],
        bs,
        10000.0,
        pos,
    )
    qr, kr, _ = attn._project_rotated(x)
    nb = ref.shape[-1]
    allowed = torch.ones(nb, nb, dtype=torch.bool).tril()
    rot = attnlib.positional.RotaryCall(10000.0, pos, pos)
    got = attn.core.gate_logits(qr, kr, allowed, causal=True, rotary=rot)
    fin = allowed.expand_as(got)
    assert torch.equal(got > float("-inf"), fin)
    assert_close(got[fin], ref[fin])
    # the module's forward selects from these logits: top-k (official nz_ratio rule), last two rows dense
    sel = attn.core.select(ref, allowed.expand_as(ref), True, n, n)
    kk = max(1, math.floor((1 - math.sqrt(0.5)) * nb))
    assert (sel[..., :-2, :].sum(-1) == torch.clamp(torch.arange(nb - 2) + 1, max=kk)).all()
    assert torch.equal(sel[..., -2:, :], allowed[-2:].expand_as(sel[..., -2:, :]))
    kk_v = v.repeat_interleave(h // h_kv, 1)
    want = reference_attention(
        qr, kr.repeat_interleave(h // h_kv, 1), kk_v, mask=expand_blocks(sel, bs, n, n), causal=True
    )
    assert_close(attn(x), attn.out_proj(want.transpose(1, 2).reshape(2, n, 32)))
    with pytest.raises(ValueError, match="Q map"):
        core("seer", block_size=bs, gate_dim=D).load_official_gate(official)


def test_seer_gate_scores_the_diagonal_block_by_default() -> None:
    """The official prefill gate scores key blocks J <= I (diagonal included); causal_gate=True drops it."""
    q, k, _ = make_qkv(1, H, 32, D, dtype=torch.float64, seed=3)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    official = core("seer", block_size=8, gate_dim=16).gate_logits(q, k, allowed, causal=True)
    assert torch.equal(official[0, 0] > float("-inf"), allowed)
    strict = core("seer", block_size=8, gate_dim=16, causal_gate=True).gate_logits(q, k, allowed, causal=True)
    assert torch.equal(strict[0, 0, 1:] > float("-inf"), allowed.tril(-1)[1:])


@pytest.mark.parametrize("causal", [False, True])
def test_seer_official_gate_padded_example_equals_the_example_alone(causal: bool) -> None:
    """The default (official) gate with its dense last block rows: a right-padded example keeps
    the blocks, and so the outputs, it has alone (the conformance suite runs the strict gate)."""
    torch.manual_seed(8)
    attn = attnlib.Attention(32, 4, variant="seer", causal=causal, rope=True, block_size=4, gate_dim=8)
    attn = attn.double().eval()
    lengths, n = [9, 14, 22], 24
    x = torch.randn(len(lengths), n, 32, dtype=torch.float64)
    kp = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    y = attn(x, key_padding_mask=kp)
    for b, length in enumerate(lengths):
        assert_close(y[b : b + 1, :length], attn(x[b : b + 1, :length]))


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
    for routing in ("expert_choice", "causal_expert_choice"):
        cr = core("mosa", sparsity=1.0, routing=routing, router_bias=True, num_dense_heads=0)
        with torch.no_grad():
            cr.router.weight.zero_()
            cr.router.bias.zero_()
        ref = reference_attention(q, k, v, causal=causal)
        assert_close(cr(q, k, v, am(20, causal=causal)).out, 0.5 * ref)  # constant router: c = sigmoid(0)
        with torch.no_grad():
            cr.router.bias.fill_(50.0)  # sigmoid(50) == 1.0 in float64
        assert_close(cr(q, k, v, am(20, causal=causal)).out, ref)


def _mosa_picks_slow(r: torch.Tensor, routing: str, rho: float, tau: float = 0.5) -> torch.Tensor:
    """Which tokens each head picks, (B, E, N) bool, by the definitions (loops)."""
    b, e, n = r.shape
    picked = torch.zeros(b, e, n, dtype=torch.bool)

    def k_of(length: int) -> int:
        return min(length, max(2, math.floor(length / rho)))

    for bi in range(b):
        for ei in range(e):
            row = r[bi, ei]
            if routing == "expert_choice":
                picked[bi, ei, row.topk(k_of(n)).indices] = True
            elif routing == "threshold":
                picked[bi, ei] = row > tau
            else:  # causal expert choice: prefix top-k(t+1) membership and a running budget
                held = 0
                for t in range(n):
                    prefix = row[: t + 1]
                    rank = int(((prefix[:t] > row[t]) | (prefix[:t] == row[t])).sum())
                    if rank < k_of(t + 1) and held < k_of(t + 1):
                        picked[bi, ei, t] = True
                        held += 1
    return picked


@pytest.mark.parametrize("routing", ["expert_choice", "causal_expert_choice", "threshold"])
def test_mosa_equals_dense_masked_oracle(routing: str) -> None:
    n = 24
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=12)
    cr = core("mosa", sparsity=3.0, routing=routing, threshold=0.5, num_dense_heads=0)
    x = q.transpose(1, 2).reshape(B, n, H * D)
    r = torch.sigmoid(x @ cr.router.weight.T).transpose(1, 2)  # (B, H, N)
    picked = _mosa_picks_slow(r, routing, 3.0)
    if routing != "threshold":
        assert (picked.sum(-1) <= 8).all()
    for causal in (False, True):
        mask = picked[..., :, None] & picked[..., None, :]
        ref = reference_attention(q, k, v, mask=mask, causal=causal) * r[..., None]
        res = cr(q, k, v, am(n, causal=causal), need_weights=True, need_importance=True)
        assert_close(res.out, ref)
        assert_close(res.out, res.weights @ v)
        assert_close(res.importance, res.weights.mean(2))
    x_out = cr(q, k, v, am(n)).out
    assert torch.equal(x_out[~picked], torch.zeros_like(x_out[~picked]))


def _rot_half(x: torch.Tensor, pos: torch.Tensor, n_rot: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on the first n_rot dims of x (..., T, D) at positions pos (..., T)."""
    inv = 1.0 / base ** (torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    ang = pos.double()[..., None] * inv
    emb = torch.cat([ang, ang], -1)
    xr = x[..., :n_rot]
    half = torch.cat([-xr[..., n_rot // 2 :], xr[..., : n_rot // 2]], -1)
    return torch.cat([xr * emb.cos() + half * emb.sin(), x[..., n_rot:]], -1)


@pytest.mark.parametrize("causal", [False, True])
def test_mosa_module_is_the_papers_layer(causal: bool) -> None:
    """Attention(variant="mosa") from tokens = the paper's equations: router on x, per-head
    projection of the picked tokens, RoPE on half the dims at their original positions, mask
    I_i >= I_j, times r, per-head output map scatter-added; plus a dense hybrid head."""
    torch.manual_seed(3)
    n, c, h, rho = 21, 32, 4, 3.0
    attn = attnlib.Attention(c, h, variant="mosa", causal=causal, rope=True, sparsity=rho, num_dense_heads=1)
    attn = attn.double().eval()
    x = torch.randn(B, n, c, dtype=torch.float64)
    d, n_rot = c // h, 2 * int(0.5 * (c // h) / 2)
    w, bias = attn.in_proj.weight, attn.in_proj.bias
    wo = attn.out_proj.weight
    r = torch.sigmoid(x @ attn.core.router.weight.T).transpose(1, 2)  # (B, E, N)
    routing = "causal_expert_choice" if causal else "expert_choice"
    picked = _mosa_picks_slow(r, routing, rho)
    y = attn.out_proj.bias.expand(B, n, c).clone()
    pos = torch.arange(n)
    for hh in range(h):
        wq, wk, wv = (w[o * c + hh * d : o * c + (hh + 1) * d] for o in range(3))
        bq, bk, bv = (bias[o * c + hh * d : o * c + (hh + 1) * d] for o in range(3))
        for bi in range(B):
            sel = torch.arange(n) if hh == 0 else picked[bi, hh - 1].nonzero().flatten()
            xs = x[bi, sel]
            qs, ks, vs = xs @ wq.T + bq, xs @ wk.T + bk, xs @ wv.T + bv
            qs, ks = _rot_half(qs, pos[sel], n_rot), _rot_half(ks, pos[sel], n_rot)
            s = qs @ ks.T / d**0.5
            if causal:
                s = s.masked_fill(sel[None, :] > sel[:, None], float("-inf"))
            a = torch.softmax(s, -1) @ vs
            if hh > 0:
                a = a * r[bi, hh - 1, sel, None]
            y[bi, sel] += a @ wo[:, hh * d : (hh + 1) * d].T
    assert_close(attn(x), y)


def test_mosa_causal_expert_choice_reads_no_future_and_keeps_the_budget() -> None:
    torch.manual_seed(4)
    attn = attnlib.Attention(32, 4, variant="mosa", causal=True, rope=True, sparsity=4.0).double().eval()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    y = attn(x)
    for t in (5, 17, 33):
        assert_close(attn(x[:, :t]), y[:, :t])
    r = mosa_router(x, attn.core.router.weight)
    idx, valid = mosa_select(r, routing="causal_expert_choice", sparsity=4.0)
    assert idx.shape[-1] <= 10 and valid.sum(-1).max() <= 10  # k(N) = floor(40 / 4)
    # expert choice reads later tokens: perturbing the last token changes earlier outputs
    ec = attnlib.Attention(32, 4, variant="mosa", causal=True, rope=True, sparsity=4.0, routing="expert_choice")
    ec.load_state_dict(attn.state_dict())
    ec = ec.double().eval()
    x2 = x.clone()
    x2[:, -1] = 10 * torch.randn(2, 32, dtype=torch.float64)
    assert not torch.allclose(ec(x2)[:, :-1], ec(x)[:, :-1])


def test_mosa_projects_only_the_picked_tokens() -> None:
    """With sparsity 8 and no dense heads the layer's FLOPs are a fraction of dense attention's."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(5)
    x = torch.randn(1, 256, 64)
    counts = {}
    for variant, kw in (("softmax", {}), ("mosa", {"sparsity": 8.0})):
        attn = attnlib.Attention(64, 4, variant=variant, causal=True, rope=True, **kw).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            attn(x)
        counts[variant] = fc.get_total_flops()
    # dense: 2·N·C·4C (projections) + 4·N^2·C (scores, values); MoSA: k = N/8 picked tokens per head
    n, c, k = 256, 64, 32
    assert counts["softmax"] >= 2 * n * c * 4 * c
    assert counts["mosa"] <= 2 * n * c * 4 + 2 * k * c * 4 * c + 4 * k * k * c + 4 * n * c * 4
    assert counts["mosa"] < counts["softmax"] / 4


def test_mosa_router_gets_gradient_and_padding_is_never_picked() -> None:
    n = 16
    torch.manual_seed(6)
    attn = attnlib.Attention(32, 4, variant="mosa", sparsity=2.0, rope=True).double()
    x = torch.randn(B, n, 32, dtype=torch.float64)
    kp = key_padding(n)
    _, idx, valid = attn.core.route(x, am(n, mask=kp))
    assert kp.valid.gather(1, idx.flatten(1)).view_as(idx)[valid].all()
    attn(x, key_padding_mask=kp.valid).square().sum().backward()
    assert attn.core.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="routing"):
        core("mosa", routing="top_k")


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
def test_sparsifiner_block_selection_follows_its_definition(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """selection="blocks": query block I keeps its ceil(keep_rate · #visible key blocks) key blocks with
    the highest mean of A^ (computed here from the whole A^, the slow way), the CLS row stays dense;
    the kernel path and the weights path equal the float64 reference under that mask."""
    n, bs = 45, 8
    q, k, v = make_qkv(B, H, n, D, dtype=torch.float64, logit_scale=4.0, seed=22)
    cr = core(
        "sparsifiner", num_tokens=48, keep_rate=0.3, reduce_n_factor=4, basis_topk=4, selection="blocks", block_size=bs
    )
    with torch.no_grad():
        cr.up.normal_(0, 0.1)
    kp = key_padding(n) if causal else None
    mask = am(n, mask=kp, causal=causal)
    a = cr.approx_attention(q, k, sparse_basis=True, causal=causal, key_valid=None if kp is None else kp.valid)
    nb = math.ceil(n / bs)
    tok = mask.dense()
    tok = torch.ones(1, 1, n, n, dtype=torch.bool) if tok is None else tok
    tok = tok.expand(B, H, n, n)
    keep = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nb):
                rows = slice(i * bs, (i + 1) * bs)
                blocks = [slice(j * bs, (j + 1) * bs) for j in range(nb)]
                score = torch.stack([a[b, h, rows, c].mean() for c in blocks])
                visible = torch.tensor([bool(tok[b, h, rows, c].any()) for c in blocks])
                count = max(1, math.ceil(0.3 * int(visible.sum())))
                for j in score.masked_fill(~visible, float("-inf")).topk(count).indices.tolist():
                    if visible[j]:
                        keep[b, h, rows, blocks[j]] = True
    keep = keep & tok
    keep[:, :, 0] = tok[:, :, 0]  # the CLS row
    ref, w = reference_attention(q, k, v, mask=keep, return_weights=True)
    assert_close(cr(q, k, v, mask).out, ref)
    res = cr(q, k, v, mask, need_weights=True)
    assert_close(res.out, ref)
    assert_close(res.weights, w)
    monkeypatch.setattr("attnlib.dispatch.ROW_BLOCK_ELEMENTS", 1)  # block scores over chunks of 16 rows
    assert_close(cr(q, k, v, mask).out, ref)


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


def test_all_active_layout_runs_as_one_masked_sdpa_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout that visits every block (e.g. a binarised learned element mask) runs on CPU as SDPA with
    its dense additive mask cached on the layout: output and gradients equal the float64 reference (an
    empty row gives 0, GQA); a layout that skips a block still runs the block-sparse kernel."""
    import attnlib.variants.sparse as sp
    from attnlib import dispatch

    cpu = torch.device("cpu")
    n = 40
    dense = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(5)) < 0.5
    dense[..., 3, :] = False  # an empty row
    bm = BlockMask.from_dense(dense, 8)
    assert dispatch.block_layout_as_masked_dense(bm, cpu)
    kernel_calls: list[int] = []
    kernel = sp.block_sparse_attention
    monkeypatch.setattr(sp, "block_sparse_attention", lambda *a, **kw: kernel_calls.append(1) or kernel(*a, **kw))
    qkv = tuple(t.requires_grad_() for t in make_qkv(B, H, n, D, h_kv=2, dtype=torch.float64, logit_scale=3.0, seed=6))
    for _ in range(2):  # the second call reuses the cached mask
        out = sp._run_block(*qkv, bm, None, False, False).out
        ref = reference_attention(*qkv, mask=dense)
        assert_close(out, ref)
        go = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, qkv, go), torch.autograd.grad(ref, qkv, go), strict=True):
            assert_close(a, r)
    assert kernel_calls == [] and "masked_dense/torch.float64" in bm._cache
    skipped = dense.clone()
    skipped[..., :8, 16:24] = False
    bm2 = BlockMask.from_dense(skipped, 8)
    assert not dispatch.block_layout_as_masked_dense(bm2, cpu)
    assert_close(sp._run_block(*qkv, bm2, None, False, False).out, reference_attention(*qkv, mask=skipped))
    assert kernel_calls == [1]


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


def test_top_k_earliest_is_a_stable_sort_prefix() -> None:
    """Sparsifiner's key choice keeps the first K of a stable descending sort (ties to the earlier
    key, NaN first), per row K, on rows full of ties - and a prefix of a row keeps the same keys as
    the row's own prefix ranking (what makes causal decoding equal the full forward)."""
    from attnlib.functional.sparse import top_k_earliest

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (2, 3, 5, 17), generator=g).double()  # many ties
    a[0, 0, 0, 3] = float("nan")
    a[1, 2, 4, 5:] = float("-inf")
    k_row = torch.randint(1, 9, (2, 3, 5, 1), generator=g)
    got = top_k_earliest(a, 8, k_row)
    order = torch.nan_to_num(a, nan=float("inf")).sort(dim=-1, descending=True, stable=True).indices
    want = torch.zeros_like(got).scatter_(-1, order, torch.arange(17).expand_as(order) < k_row)
    assert torch.equal(got, want)
    gauss = torch.randn(2, 3, 5, 17, generator=g, dtype=torch.float64)  # no ties: the fast path
    for rows in (a, gauss):
        order = torch.nan_to_num(rows, nan=float("inf")).sort(dim=-1, descending=True, stable=True).indices
        for kk in range(1, 18):  # one k for every row, with and without a tie across the cut
            want = torch.zeros_like(got).scatter_(-1, order, torch.arange(17).expand_as(order) < kk)
            assert torch.equal(top_k_earliest(rows, kk), want), kk
    row = torch.zeros(1, 12, dtype=torch.float64)  # all tied: every prefix keeps its first keys
    for n in range(1, 13):
        assert torch.equal(top_k_earliest(row[:, :n], min(3, n)), torch.arange(n)[None] < min(3, n))


def test_top_k_earliest_fill_writes_the_same_choice() -> None:
    """The scattered form (bool, or a 0 / -inf additive bias) keeps exactly top_k_earliest's keys:
    one k and per-row k, rows with and without ties across the cut, NaN, -inf, every key kept."""
    from attnlib.functional.sparse import top_k_earliest, top_k_earliest_fill

    g = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 4, (2, 3, 6, 17), generator=g).double()
    tied[0, 0, 0, 3] = float("nan")
    tied[1, 2, 4, 5:] = float("-inf")
    gauss = torch.randn(2, 3, 6, 17, generator=g, dtype=torch.float64)
    gauss[0, 1, 2, :4] = gauss[0, 1, 2, 4]  # one row tied at some cuts
    k_row = torch.randint(1, 9, (2, 3, 6, 1), generator=g)
    for a in (tied, gauss, gauss.float()):
        for kk, kr in [(kk, None) for kk in range(1, 18)] + [(8, k_row), (17, k_row.clamp(min=5) * 2 - 1)]:
            want = top_k_earliest(a, kk, kr)
            assert torch.equal(top_k_earliest_fill(a, kk, kr), want), kk
            bias = top_k_earliest_fill(a, kk, kr, hit=0.0, miss=float("-inf"))
            assert bias.dtype == a.dtype
            assert torch.equal(bias == 0, want) and bool((bias[~want] == float("-inf")).all()), kk
