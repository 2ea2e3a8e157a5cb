"""attnlib.pruning: interface, pruner equations, keep-all exactness (ViT, DecoderLM), configs, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import attnlib
import attnlib.pruning as P
from attnlib.models import ConformerCTC, DecoderLM, TransformerBlock, ViT, build_model
from attnlib.registry import get_variant

CONFIGS = Path(attnlib.__file__).parent / "configs" / "pruning"
INF = float("-inf")


def _vit(pruning=None, variant: str = "softmax", **kw) -> ViT:
    torch.manual_seed(0)
    return ViT(attention={"variant": variant, **kw}, pruning=pruning, dim=16, depth=3, num_heads=2)


def _lm(pruning=None, variant: str = "softmax") -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(attention={"variant": variant}, vocab_size=13, dim=16, depth=3, num_heads=2, pruning=pruning)


def _pair(factory, pruning):
    """An unpruned model and a pruned one holding the same backbone weights (float64, eval)."""
    base, pruned = factory(None).double().eval(), factory(pruning).double().eval()
    missing = pruned.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pruning.") for k in missing)
    return base, pruned


KEEP_ALL = [
    {"name": "topk", "keep_ratio": 1.0, "layers": [0, 1]},
    {"name": "ltp", "final_threshold": INF, "layers": [0, 1]},
    {"name": "iared2", "threshold": 0.0, "layers": [0, 1]},
]


# -- keep-all settings equal the unpruned model exactly -------------------------------------------


@pytest.mark.parametrize("cfg", KEEP_ALL, ids=lambda c: c["name"])
def test_keep_all_vit_equals_unpruned_exactly(cfg) -> None:
    base, pruned = _pair(_vit, cfg)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(base(x), pruned(x))
    assert pruned.last_kept_index.shape == (3, 17)


@pytest.mark.parametrize(
    "cfg", [*KEEP_ALL, {"name": "namm", "delay": 8, "n_fft": 8, "hop": 4}], ids=lambda c: c["name"]
)
def test_keep_all_lm_equals_unpruned_exactly(cfg) -> None:
    base, pruned = _pair(_lm, cfg)
    tok = torch.randint(0, 13, (2, 20))
    assert torch.equal(base(tok), pruned(tok))
    cb, cp = base.init_cache(2), pruned.init_cache(2)
    for t in range(20):  # cached decoding, incl. namm invocations (every 8 tokens) that evict nothing
        assert torch.equal(base(tok[:, t : t + 1], cache=cb), pruned(tok[:, t : t + 1], cache=cp))
    assert all(c.size == 20 for c in cp.layers)


def _variant_kwargs(name: str) -> dict:
    return dict(get_variant(name).conformance_kwargs())


@pytest.mark.parametrize("name", attnlib.available())
def test_every_variant_with_importance_prunes_in_vit(name: str) -> None:
    caps = attnlib.variant_info(name)
    kw = _variant_kwargs(name)
    if not caps.importance:
        with pytest.raises(attnlib.UnsupportedError, match="importance"):
            _vit({"name": "topk"}, name, **kw)
        return
    base, pruned = (
        _vit(None, name, **kw).double().eval(),
        _vit({"name": "topk", "keep_ratio": 1.0, "layers": [0]}, name, **kw).double().eval(),
    )
    pruned.load_state_dict(base.state_dict())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    ref = base(x)
    torch.manual_seed(1)
    # equal up to float64 rounding: asking a variant for importance may route it through its
    # weights path (softmax: bit-identical, see the tests above)
    torch.testing.assert_close(pruned(x), ref, rtol=0, atol=1e-12)
    half = _vit({"name": "topk", "keep_ratio": 0.5, "layers": [0]}, name, **kw).eval()
    y = half(x.float())
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert half.last_kept_index.shape == (2, 9) and (half.last_kept_index[:, 0] == 0).all()


def test_contract_importance_capability_matches_variants() -> None:
    x = torch.randn(2, 16, 16)
    for name in attnlib.available():
        attn = attnlib.Attention(16, 2, name, **_variant_kwargs(name))
        _, ex = attn(x, return_extras=True, need_weights=False)
        assert (ex.importance is not None) == attnlib.variant_info(name).importance, name


# -- interface: physical removal == masking ---------------------------------------------------------


def test_select_tokens_keeps_order_and_pads() -> None:
    x = torch.arange(2 * 5 * 1, dtype=torch.float64).view(2, 5, 1)
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    xk, idx, mask = P.select_tokens(x, keep)
    assert idx[0].tolist() == [0, 2, 3] and idx[1, 0].item() == 1
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(xk[..., 0][mask], x[..., 0][keep])
    same, idx, mask = P.select_tokens(x, torch.ones(2, 5, dtype=torch.bool))
    assert same is x and mask is None and idx[1].tolist() == [0, 1, 2, 3, 4]


def test_removed_tokens_equal_masked_keys_in_the_next_block() -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, {"variant": "softmax"}).double().eval()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    keep = torch.rand(3, 9) > 0.4
    keep[:, 0] = True
    xk, idx, mask = P.select_tokens(x, keep)
    got = blk(xk, key_padding_mask=mask)
    ref = blk(x, key_padding_mask=keep)
    valid = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask
    ref_kept = ref.gather(1, idx[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(got[valid], ref_kept[valid], rtol=0, atol=1e-12)


# -- topk ----------------------------------------------------------------------------------------


def test_topk_keeps_ceil_ratio_of_most_important_and_protected() -> None:
    pr = P.build_pruning({"name": "topk", "keep_ratio": 0.3, "layers": [0]}, dim=4, depth=2).get(0)
    x = torch.randn(2, 8, 4)
    imp = torch.rand(2, 8)
    prot = torch.zeros(2, 8, dtype=torch.bool)
    prot[:, 0] = True
    out = pr(x, imp, None, prot)
    k = math.ceil(0.3 * 7)
    assert out.x.shape == (2, 1 + k, 4) and out.mask is None
    for b in range(2):
        top = set((torch.argsort(imp[b, 1:], descending=True)[:k] + 1).tolist())
        assert set(out.index[b].tolist()) == {0} | top
        assert out.index[b].tolist() == sorted(out.index[b].tolist())
        assert torch.equal(out.x[b], x[b, out.index[b]])


def test_topk_respects_padding_and_fuses_dropped_tokens() -> None:
    pr = P.TopKPruner(dim=3, layer=0, depth=2, keep_ratio=0.5, fuse=True)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    imp = torch.rand(2, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = pr(x, imp, mask)
    # row 0: 3 kept + fused; row 1: 2 kept, padding, fused
    assert out.x.shape == (2, 4, 3) and (out.index[:, -1] == -1).all()
    kept0 = out.index[0, :3]
    dropped = sorted(set(range(6)) - set(kept0.tolist()))
    w = imp[0, dropped]
    torch.testing.assert_close(out.x[0, -1], (w[:, None] * x[0, dropped]).sum(0) / w.sum(), rtol=0, atol=1e-14)
    assert out.mask[1].tolist() == [True, True, False, True]
    assert set(out.index[1, :2].tolist()) <= {0, 1, 2, 3}


# -- ltp -----------------------------------------------------------------------------------------


def test_ltp_thresholds_rise_with_depth_and_hard_rule() -> None:
    plan = P.build_pruning({"name": "ltp", "final_threshold": 0.2}, dim=4, depth=5)
    assert plan.layers == [1, 2, 3]
    assert [round(float(plan.get(i).threshold()), 6) for i in plan.layers] == [0.04, 0.08, 0.12]
    pr = plan.get(2).eval()
    x = torch.randn(2, 6, 4)
    imp = torch.tensor([[0.5, 0.01, 0.09, 0.07, 0.3, 0.03], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    out = pr(x, imp)
    assert out.mask[0].tolist() == [True, True, True, False, False, False]
    assert out.index[0, :3].tolist() == [0, 2, 4]
    assert out.index[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_ltp_soft_mask_formula_aux_loss_and_zero_temperature_limit() -> None:
    pr = P.LTPPruner(dim=4, layer=1, depth=4, final_threshold=0.2, temperature=0.01, lam=0.3).double().train()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    imp = torch.rand(2, 5, dtype=torch.float64) * 0.2
    prot = torch.zeros(2, 5, dtype=torch.bool)
    prot[:, 0] = True
    out = pr(x, imp, None, prot)
    mu = torch.sigmoid((imp - 0.05) / 0.01)
    mu[:, 0] = 1.0
    torch.testing.assert_close(out.x, x * mu[..., None], rtol=0, atol=1e-14)
    torch.testing.assert_close(out.aux_loss, 0.3 * mu[:, 1:].mean(), rtol=0, atol=1e-14)
    assert attnlib.aux_loss(pr) is not None and pr.pending_aux_loss is None
    out.aux_loss.backward()
    assert pr.delta.grad is not None and pr.delta.grad.item() < 0  # raising theta lowers the kept ratio
    pr.temperature = 1e-9  # T -> 0: the soft mask becomes the hard keep rule
    soft = pr(x, imp, None, prot).x
    hard_keep = (imp >= 0.05) | prot
    torch.testing.assert_close(soft, x * hard_keep[..., None], rtol=0, atol=1e-12)


def test_ltp_keep_target_is_per_sample_ratio_loss() -> None:
    pr = P.LTPPruner(dim=4, layer=1, depth=4, final_threshold=0.2, temperature=0.01, lam=0.3, keep_target=0.25)
    pr = pr.double().train()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    imp = torch.rand(2, 5, dtype=torch.float64) * 0.2
    prot = torch.zeros(2, 5, dtype=torch.bool)
    prot[:, 0] = True
    mu = torch.sigmoid((imp - 0.05) / 0.01)[:, 1:]
    out = pr(x, imp, None, prot)
    torch.testing.assert_close(out.aux_loss, 0.3 * ((mu.mean(1) - 0.25) ** 2).mean(), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="keep_target"):
        P.LTPPruner(dim=4, layer=1, depth=4, keep_target=1.5)


def test_ltp_straight_through_forward_is_hard_with_soft_gradients() -> None:
    kw = {"final_threshold": 0.2, "temperature": 0.01, "lam": 0.3}
    ste = P.LTPPruner(dim=4, layer=1, depth=4, mode="straight_through", **kw).double().train()
    hard = P.LTPPruner(dim=4, layer=1, depth=4, mode="hard", **kw).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    imp = torch.tensor([[0.5, 0.01, 0.09, 0.07, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    prot = torch.zeros(2, 6, dtype=torch.bool)
    prot[:, 0] = True
    out, ref = ste(x, imp, None, prot), hard(x, imp, None, prot)
    assert torch.equal(out.x, ref.x) and torch.equal(out.index, ref.index) and torch.equal(out.mask, ref.mask)
    assert out.aux_loss is not None and ref.aux_loss is None
    (out.x.sum() + out.aux_loss).backward()
    assert torch.isfinite(ste.delta.grad) and ste.delta.grad.item() != 0  # the threshold learns
    ste.eval()
    assert ste(x, imp, None, prot).aux_loss is None  # eval: plain hard pruning


def test_ltp_in_vit_trains_soft_and_prunes_hard() -> None:
    model = _vit({"name": "ltp", "final_threshold": 0.5, "normalize": True, "layers": [0, 1]})
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x).sum().backward()
    assert float(attnlib.aux_loss(model)) > 0
    model.eval()
    model(x)
    kept = model.last_kept_index
    assert (kept[:, 0] == 0).all() and kept.shape[1] <= 17


def test_ltp_hard_stage_freezes_thresholds_and_trains_hard() -> None:
    """The paper's stage 2: thresholds frozen, hard pruning in training exactly as in eval, no regulariser."""
    torch.manual_seed(0)
    model = _vit({"name": "ltp", "final_threshold": 0.5, "normalize": True, "layers": [0, 1]})
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x).sum().backward()  # stage 1: soft mask, the thresholds learn
    pruners = P.ltp_hard_stage(model)
    assert len(pruners) == 2 and all(p.mode == "hard" and not p.delta.requires_grad for p in pruners)
    with torch.no_grad():
        for p in pruners:
            p.delta.fill_(0.1)
    deltas = [float(p.delta) for p in pruners]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.zero_grad()
    y = model(x)
    assert attnlib.aux_loss(model).item() == 0.0  # no regulariser
    train_kept = model.last_kept_index.clone()
    y.sum().backward()
    opt.step()
    assert [float(p.delta) for p in pruners] == deltas
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(model.last_kept_index, train_kept)  # the trained model saw what inference runs
    frozen = P.LTPPruner(dim=8, layer=1, depth=2, freeze_threshold=True)
    assert isinstance(frozen.delta, torch.nn.Parameter) and not frozen.delta.requires_grad
    with pytest.raises(ValueError, match="no LTP"):
        P.ltp_hard_stage(torch.nn.Linear(2, 2))


# -- tokenlearner / tokenfuser ---------------------------------------------------------------------


def test_tokenlearner_maps_are_softmax_and_uniform_gives_mean() -> None:
    tl = P.TokenLearnerPruner(dim=8, layer=0, depth=2, num_tokens=3).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    prot = torch.zeros(2, 7, dtype=torch.bool)
    prot[:, 0] = True
    out = tl(x, None, None, prot)
    assert out.x.shape == (2, 4, 8) and out.index[:, 1:].eq(-1).all() and out.index[:, 0].eq(0).all()
    torch.testing.assert_close(tl.last_maps.sum(-1), torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=1e-14)
    assert tl.last_maps[..., 0].abs().max() == 0  # the class token is not pooled
    torch.testing.assert_close(out.x[:, 1:], tl.last_maps @ x, rtol=0, atol=1e-14)
    torch.nn.init.zeros_(tl.fc2.weight)
    torch.nn.init.zeros_(tl.fc2.bias)
    out = tl(x, None, None, prot)
    torch.testing.assert_close(out.x[:, 1], x[:, 1:].mean(1), rtol=0, atol=1e-14)


def test_tokenfuser_is_identity_at_init() -> None:
    fuser = P.TokenFuser(8, num_tokens=3).double()
    res = torch.randn(2, 7, 8, dtype=torch.float64)
    assert torch.equal(fuser(torch.randn(2, 3, 8, dtype=torch.float64), res), res)


def test_tokenlearner_in_vit_runs_on_learned_tokens() -> None:
    model = _vit({"name": "tokenlearner", "num_tokens": 4, "layers": [0]}).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.last_kept_index.tolist() == [[0, -1, -1, -1, -1]] * 2


# -- iared2 ----------------------------------------------------------------------------------------


def test_iared2_policy_log_prob_and_reinforce() -> None:
    model = _vit({"name": "iared2", "layers": [0]})
    pol = model.pruning.get(0)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    model(x)
    pi = pol.last_keep_prob
    assert pi.shape == (4, 17) and ((pi > 0) & (pi < 1)).all()
    kept = model.last_kept_index
    assert (kept[:, 0] == 0).all()
    correct = torch.tensor([True, False, True, True])
    reward = P.iared2_reward(correct, torch.tensor([0.5, 0.5, 0.9, 0.2]), tau=0.5)
    torch.testing.assert_close(reward, torch.tensor([0.75, -0.5, 1 - 0.81, 0.96]))
    loss = P.reinforce_loss(model, reward)
    loss.backward()
    assert pol.k.weight.grad is not None and pol.k.weight.grad.abs().sum() > 0
    # inference: deterministic pi > threshold, the class token kept
    model.eval()
    model(x[:1])  # one row: no padding in the kept set
    chosen = set((pol.last_keep_prob[0] > 0.5).nonzero().flatten().tolist()) - {0}
    assert set(model.last_kept_index[0].tolist()) - {0} == chosen
    with pytest.raises(ValueError, match="no IA-RED2 policy sampled"):
        P.reinforce_loss(model, reward)


def test_iared2_log_prob_matches_bernoulli() -> None:
    pol = P.IARed2Pruner(dim=8, layer=0, depth=2).double().train()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    torch.manual_seed(3)
    out = pol(x, None)
    pi = pol.last_keep_prob
    u = torch.zeros(3, 6, dtype=torch.bool)
    for b in range(3):
        u[b, out.index[b][out.mask[b] if out.mask is not None else slice(None)]] = True
    ref = torch.distributions.Bernoulli(probs=pi).log_prob(u.double()).sum(1)
    torch.testing.assert_close(pol.last_log_prob.detach(), ref, rtol=0, atol=1e-10)


# -- namm / evolve ---------------------------------------------------------------------------------


def test_stft_magnitudes_equal_naive_dft() -> None:
    sig = torch.randn(2, 3, 40, dtype=torch.float64)
    spec = P.stft_magnitudes(sig, 8, 4)
    win = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(8, dtype=torch.float64) / 8)
    f = torch.arange(5, dtype=torch.float64)[:, None]
    t = torch.arange(8, dtype=torch.float64)[None]
    basis = torch.exp(-2j * math.pi * f * t / 8)
    for i in range(spec.shape[2]):
        frame = sig[..., 4 * i : 4 * i + 8] * win
        torch.testing.assert_close(spec[:, :, i], (frame.to(basis.dtype) @ basis.T).abs(), rtol=0, atol=1e-12)


def test_namm_ema_equals_per_frame_loop() -> None:
    pol = P.NAMMEviction(dim=4, layer=0, depth=1, n_fft=8, hop=4, delay=8, ema=0.9)
    cache = attnlib.Attention(8, 2, causal=True).init_cache(1)
    cache.size = cache.length = 0
    state = pol.init_state(1, dtype=torch.float64)
    series = []
    for _ in range(16):  # one token arrives per step; the importance rows are random
        cache.length += 1
        cache.size += 1
        imp = torch.rand(1, cache.size, dtype=torch.float64)
        series.append(imp)
        pol.observe(cache, imp, state)
    # token 0's series: 4 prefix zeros then 16 values; frames every 4, EMA c = 0.9^4 per frame
    sig = torch.cat([torch.zeros(4, dtype=torch.float64), torch.stack([s[0, 0] for s in series])])
    spec = P.stft_magnitudes(sig, 8, 4)
    c, e = 0.9**4, torch.zeros(5, dtype=torch.float64)
    for i in range(4):
        e = c * e + (1 - c) * spec[i]
    torch.testing.assert_close(state.ema[0, 0, 0], e, rtol=0, atol=1e-12)


def test_namm_prefill_records_each_query_row_per_kv_head() -> None:
    """A prompt chunk adds one value per query (its own row, 0 before the token existed), per KV
    head: prefilling n tokens at once leaves the same history as feeding them one by one."""
    torch.manual_seed(0)
    cfg = {"name": "namm", "delay": 64, "n_fft": 8, "hop": 4}
    model = _lm(cfg).double().eval()
    tok = torch.randint(0, 13, (2, 11))
    chunk, single = model.init_cache(2), model.init_cache(2)
    with torch.no_grad():
        model(tok, cache=chunk)
        for t in range(11):
            model(tok[:, t : t + 1], cache=single)
    for i, a in chunk.eviction.items():
        torch.testing.assert_close(a.hist, single.eviction[i].hist, rtol=0, atol=1e-12)
        assert a.hist.shape[1] == model.blocks[0].attn.num_kv_heads
    hist = chunk.eviction[0].hist[..., 4:]  # after the n_fft - hop leading zeros: [b, kv, token j, query t]
    assert (hist.tril(-1) == 0).all()  # token j gets 0 from the queries t < j before it existed
    assert (hist.diagonal(dim1=-2, dim2=-1) > 0).all()  # and its own query's weight at t = j
    pol = P.NAMMEviction(dim=4, layer=0, depth=1, n_fft=8, hop=4, delay=64)
    state = pol.init_state(1, dtype=torch.float64, kv_heads=2)
    cache = attnlib.Attention(8, 4, causal=True, num_kv_heads=2).init_cache(1)
    cache.size = cache.length = 3
    w = torch.rand(1, 4, 3, 3, dtype=torch.float64)
    pol.observe(cache, w, state)
    torch.testing.assert_close(state.hist[0, :, :, 4:], w[0].view(2, 2, 3, 3).mean(1).transpose(-1, -2))


def test_namm_eviction_keeps_cache_and_state_aligned() -> None:
    cfg = {"name": "namm", "delay": 8, "n_fft": 8, "hop": 4, "scorer_bias": -1.0, "protect_last": 3, "cache_size": 5}
    model = _lm(cfg).double().eval()
    tok = torch.randint(0, 13, (2, 21))
    cache = model.init_cache(2)
    k_full = []
    for t in range(21):
        model(tok[:, t : t + 1], cache=cache)
        k_full.append(cache.layers[0].k[:, :, cache.layers[0].size - 1].clone())
    for i, c in enumerate(cache.layers):
        st = cache.eviction[i]
        assert c.length == 21 and c.size <= 5 + 5  # at most cache_size after the last eviction + new tokens
        assert st.pos.shape == (2, c.size) and st.ema.shape[0] == 2 and st.ema.shape[2] == c.size
        assert (st.pos[:, -3:] == torch.arange(18, 21)).all()  # newest tokens protected
    # the keys still held are exactly the keys of the positions the state says they are
    c0, st0 = cache.layers[0], cache.eviction[0]
    for b in range(2):
        for j in range(c0.size):
            assert torch.equal(c0.k[b, :, j], k_full[int(st0.pos[b, j])][b])
    assert model.generate(tok[:, :4], 12).shape == (2, 16)


def test_evolve_maximises_a_quadratic() -> None:
    target = torch.tensor([0.5, -0.3, 0.2])
    lin = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)

    def fitness() -> float:
        return -float(((lin.weight[0] - target) ** 2).sum())

    res = P.evolve(lin, fitness, generations=30, population=16, sigma=0.1, seed=0)
    assert -fitness() < 0.02 and res.history[-1]["best"] > res.history[0]["best"]
    with pytest.raises(ValueError, match="population"):
        P.evolve(lin, fitness, population=1)


def test_evolve_cma_es_solves_an_ill_conditioned_quadratic() -> None:
    """The NAMM paper's CMA-ES (the 'cma' package) adapts its covariance: it reaches a stretched
    optimum that the isotropic elite ES with the same budget does not."""
    pytest.importorskip("cma")
    target = torch.tensor([0.5, -0.3, 0.2, 0.1])
    scale = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    lin = torch.nn.Linear(4, 1, bias=False)

    def fitness() -> float:
        return -float((scale * (lin.weight[0] - target) ** 2).sum())

    errs = {}
    for method in ("cma", "elite"):
        torch.nn.init.zeros_(lin.weight)
        res = P.evolve(lin, fitness, generations=60, population=12, sigma=0.1, seed=0, method=method)
        errs[method] = -fitness()
        assert len(res.history) == 60
    assert errs["cma"] < 1e-3 and errs["cma"] < errs["elite"] / 10, errs
    with pytest.raises(ValueError, match="method"):
        P.evolve(lin, fitness, method="pso")


# -- configs and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", P.available())
def test_every_pruner_has_a_config_that_builds(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert path.exists(), f"missing configs/pruning/{name}.yaml"
    assert path.read_text().startswith("# @package model.pruning")
    cfg = OmegaConf.load(path)
    assert cfg.name == name
    plan = P.build_pruning(cfg, dim=16, depth=4)
    assert plan.layers and plan.name == name


def test_hydra_pruning_group_fills_model_pruning() -> None:
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vit_digits", "pruning=topk", "model.pruning.keep_ratio=0.5"])
        plain = compose("train", overrides=["experiment=vit_digits"])
    assert cfg.model.pruning.name == "topk" and cfg.model.pruning.keep_ratio == 0.5
    assert plain.model.pruning is None
    model = build_model(cfg.model, cfg.attention, img_size=8, in_chans=1, num_classes=10)
    assert model.pruning.name == "topk"


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="did you mean 'topk'"):
        P.build_pruning({"name": "top_k"}, dim=8, depth=4)
    with pytest.raises(ValueError, match="did you mean 'keep_ratio'"):
        P.build_pruning({"name": "topk", "keep_rate": 0.5}, dim=8, depth=4)
    with pytest.raises(ValueError, match="block indices"):
        P.build_pruning({"name": "topk", "layers": [4]}, dim=8, depth=4)
    with pytest.raises(ValueError, match="keep_ratio"):
        P.build_pruning({"name": "topk", "keep_ratio": 1.5}, dim=8, depth=4)
    with pytest.raises(ValueError, match="importance"):
        P.TopKPruner(dim=4, layer=0, depth=2)(torch.randn(1, 3, 4), None)
    with pytest.raises(ValueError, match=r"importance must be \(B, N\)"):
        P.TopKPruner(dim=4, layer=0, depth=2)(torch.randn(1, 3, 4), torch.rand(1, 4))
    with pytest.raises(attnlib.UnsupportedError, match="synthesises"):
        _lm({"name": "tokenlearner"})
    with pytest.raises(attnlib.UnsupportedError, match="kind 'kv_cache'"):
        _vit({"name": "namm"})
    with pytest.raises(attnlib.UnsupportedError, match="causal_cross"):
        _lm({"name": "namm"}, variant="local")
    with pytest.raises(attnlib.UnsupportedError, match="CTC"):
        ConformerCTC(attention={"variant": "softmax"}, vocab_size=5, pruning={"name": "topk"})
    with pytest.raises(ValueError, match="multiple of hop"):
        P.build_pruning({"name": "namm", "delay": 10}, dim=8, depth=2)
