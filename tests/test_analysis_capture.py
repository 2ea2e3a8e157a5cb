"""attnlib.analysis capture, head masks / pruning, head importance and agreement between variants.

Capture records exactly the softmax of the projections (float64), leaves nothing behind when the
block ends (no hooks, no analysis code in the forward), samples rows, honours the capture protocol
for modules without a core; head masks equal removing the head; the gradient importance equals
the directional derivative; agreement of a variant with itself is zero."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from torch import nn

import attnlib
from attnlib.analysis import (
    CaptureSink,
    SupportsCapture,
    ablation_head_importance,
    attention_sites,
    capture,
    gradient_head_importance,
    head_mask,
    prune_heads,
    variant_agreement,
)
from attnlib.models import DecoderLM, ViT

D64 = torch.float64


def _attn(variant: str = "softmax", **kw: Any) -> attnlib.Attention:
    return attnlib.Attention(16, 4, variant=variant, **kw).to(D64)


def _x(b: int = 2, n: int = 7, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, n, 16, dtype=D64) * scale


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def test_capture_records_the_softmax_of_the_projections() -> None:
    attn = _attn(causal=True)
    x = _x(scale=3.0)
    with capture(attn, qkv=True) as rec:
        y = attn(x)
    (r,) = rec.records
    assert (r.name, r.layer, r.call, r.n, r.m) == ("", 0, 0, 7, 7)
    s = torch.einsum("bhnd,bhmd->bhnm", r.q, r.k) / math.sqrt(4)
    s = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(r.weights, s.softmax(-1), atol=1e-12)
    assert torch.allclose(r.importance, r.weights.mean(2), atol=1e-12)
    assert torch.allclose(y, attn(x), atol=1e-12)
    assert torch.equal(r.allowed()[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_capture_leaves_the_forward_as_it_was() -> None:
    model = ViT(attention={"variant": "softmax"}, img_size=8, patch_size=2, dim=16, depth=2, num_heads=2).to(D64)
    x = torch.randn(3, 1, 8, 8, dtype=D64)
    before = model(x)
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        model(x)
        raise RuntimeError("boom")
    assert _no_hooks(model)
    with capture(model) as rec:
        inside = model(x)
    assert _no_hooks(model) and len(rec.records) == 2
    assert torch.allclose(inside, before, atol=1e-12)
    # the forward outside the block runs no analysis code at all
    seen: list[str] = []

    def tracer(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and "attnlib/analysis" in frame.f_code.co_filename.replace("\\", "/"):
            seen.append(frame.f_code.co_name)

    sys.setprofile(tracer)
    try:
        after = model(x)
    finally:
        sys.setprofile(None)
    assert seen == [] and torch.equal(after, before)


def test_the_caller_gets_what_it_asked_for_inside_a_capture() -> None:
    attn = _attn()
    x = _x()
    with capture(attn) as rec:
        _, ex = attn(x, return_extras=True, need_weights=False)
        _, ex_full = attn(x, return_extras=True)
    assert ex.weights is None and ex.importance is not None
    assert torch.allclose(ex_full.weights, rec.records[1].weights)
    assert [r.call for r in rec.records] == [0, 1]


def test_capture_samples_rows() -> None:
    attn = _attn()
    x = _x(n=10)
    with capture(attn) as full:
        attn(x)
    with capture(attn, rows=3) as some, capture(attn, rows=[0, -1]) as ends:
        attn(x)
    r = some.records[0]
    assert r.rows.tolist() == [0, 4, 9] and r.weights.shape == (2, 4, 3, 10)
    assert torch.allclose(r.weights, full.records[0].weights[:, :, r.rows])
    assert ends.records[0].rows.tolist() == [0, 9]
    for bad in (0, -2, [10], [], True):
        with pytest.raises(ValueError, match="rows"):
            with capture(attn, rows=bad):
                attn(x)


def test_variants_without_weights_record_importance() -> None:
    attn = _attn("aft_simple")
    with capture(attn) as rec:
        attn(_x())
    assert rec.records[0].weights is None and rec.importance()[0].shape == (2, 4, 7)
    with pytest.raises(ValueError, match="no attention weights from"):
        rec.weights()


def test_sites_of_models_and_pre_rotary_projections() -> None:
    vit = ViT(attention={"variant": "softmax"}, img_size=8, patch_size=2, dim=16, depth=3, num_heads=2)
    assert [n for n, _ in attention_sites(vit)] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    lm = DecoderLM(attention={"variant": "softmax"}, vocab_size=11, dim=16, depth=2, num_heads=2).to(D64)
    tok = torch.randint(11, (2, 9))
    with capture(lm, qkv=True) as rec:
        lm(tok)
    r = rec.layers()[0]
    attn = lm.blocks[0].attn
    q, k, v = attn.project(lm.blocks[0].norm1(lm.tok_emb(tok)))
    assert torch.allclose(r.q, q) and torch.allclose(r.k, k) and torch.allclose(r.v, v)
    # before rotary positions: the recorded q, k do not reproduce the (rotated) weights
    s = torch.einsum("bhnd,bhmd->bhnm", r.q, r.k) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    assert not torch.allclose(s, r.weights, atol=1e-6)
    with pytest.raises(ValueError, match="contains no attention"):
        with capture(nn.Linear(2, 2)):
            pass


class _Undo:
    def __init__(self, fn: Any) -> None:
        self.remove = fn


class _FunctionalAttention(nn.Module):
    """Attention computed in a function (no core): supports capture through the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.sinks: list[CaptureSink] = []

    def attnlib_capture(self, sink: CaptureSink) -> list[_Undo]:
        self.sinks.append(sink)
        return [_Undo(lambda: self.sinks.remove(sink))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (x @ x.transpose(1, 2)).softmax(-1)[:, None]
        for s in self.sinks:
            s.record(n=x.shape[1], m=x.shape[1], weights=w if s.weights else None)
        return self.proj(w[:, 0] @ x)


def test_modules_without_a_core_capture_through_the_protocol() -> None:
    mod = nn.Sequential(_FunctionalAttention(), _FunctionalAttention())
    assert isinstance(mod[0], SupportsCapture)
    assert [n for n, _ in attention_sites(mod)] == ["0", "1"]
    x = torch.randn(2, 5, 4)
    with capture(mod, rows=2) as rec:
        mod(x)
    assert [r.name for r in rec.records] == ["0", "1"] and rec.records[0].weights.shape == (2, 1, 2, 5)
    assert mod[0].sinks == [] and mod[1].sinks == []


# -- head masks, pruning, importance ----------------------------------------------------------------


def test_head_mask_equals_removing_the_head_and_prune_heads_keeps_it_removed() -> None:
    attn = _attn()
    x = _x()
    q, k, v = attn.project(x)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    o[:, 2] = 0.0
    want = attn.out_proj(o.transpose(1, 2).flatten(2))
    with head_mask(attn, torch.tensor([[1.0, 1.0, 0.0, 1.0]])):
        masked = attn(x)
    assert torch.allclose(masked, want, atol=1e-12)
    assert _no_hooks(attn)
    prune_heads(attn, {"": [2]})
    assert torch.allclose(attn(x), want, atol=1e-12)
    opt = torch.optim.SGD(attn.parameters(), lr=0.1)
    attn(x).square().sum().backward()
    opt.step()
    assert bool((attn.out_proj.weight[:, 8:12] == 0).all())  # the mask survives training
    with pytest.raises(ValueError, match="heads"):
        prune_heads(attn, {"": [4]})
    with pytest.raises(ValueError, match=r"\(layers=1, heads\)"):
        with head_mask(attn, torch.ones(2, 4)):
            pass


def _tiny_lm() -> tuple[DecoderLM, list[torch.Tensor]]:
    lm = DecoderLM(attention={"variant": "softmax"}, vocab_size=13, dim=16, depth=2, num_heads=4).to(D64)
    g = torch.Generator().manual_seed(1)
    return lm, [torch.randint(13, (3, 10), generator=g) for _ in range(2)]


def _lm_loss(model: nn.Module, tok: torch.Tensor) -> torch.Tensor:
    logits = model(tok[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())


def test_gradient_importance_is_the_directional_derivative() -> None:
    lm, batches = _tiny_lm()
    imp = gradient_head_importance(lm, _lm_loss, batches, normalize_layers=False)
    assert imp.shape == (2, 4) and all(p.grad is None for p in lm.parameters())
    eps = 1e-6
    for layer, h in [(0, 1), (1, 3)]:
        want = 0.0
        for tok in batches:
            m_plus, m_minus = torch.ones(2, 4, dtype=D64), torch.ones(2, 4, dtype=D64)
            m_plus[layer, h] += eps
            m_minus[layer, h] -= eps
            with torch.no_grad(), head_mask(lm, m_plus):
                lp = float(_lm_loss(lm, tok))
            with torch.no_grad(), head_mask(lm, m_minus):
                lmn = float(_lm_loss(lm, tok))
            want += abs((lp - lmn) / (2 * eps)) / len(batches)
        assert imp[layer, h].item() == pytest.approx(want, rel=1e-5, abs=1e-9)
    normed = gradient_head_importance(lm, _lm_loss, batches)
    assert torch.allclose(normed.norm(dim=1), torch.ones(2, dtype=normed.dtype), atol=1e-6)


def test_ablation_importance_is_the_loss_change() -> None:
    lm, batches = _tiny_lm()
    abl = ablation_head_importance(lm, _lm_loss, batches)
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    with torch.no_grad():
        base = sum(float(_lm_loss(lm, t)) for t in batches) / 2
        with head_mask(lm, mask):
            off = sum(float(_lm_loss(lm, t)) for t in batches) / 2
    assert abl[1, 2].item() == pytest.approx(off - base, abs=1e-6)


# -- agreement between variants -------------------------------------------------------------------


def test_agreement_with_itself_is_zero_and_approximations_are_measured() -> None:
    lm, batches = _tiny_lm()
    res = variant_agreement(lm, lambda m: m(batches[0]), {"softmax": {}, "performer": {"num_features": 16}, "got": {}})
    same = res["softmax"]
    assert same.kl.shape == (2, 4)
    assert (
        float(same.kl.abs().max()) < 1e-12 and float(same.l1.max()) < 1e-12 and float(same.out_rel_error.max()) < 1e-12
    )
    perf = res["performer"]
    assert bool((perf.kl > 0).all()) and bool((perf.js <= math.log(2)).all()) and bool((perf.l1 <= 2).all())
    assert bool((perf.out_rel_error > 0).all())
    assert set(res["got"].skipped) == {"blocks.0.attn", "blocks.1.attn"}  # got is not causal
    assert "causal" in next(iter(res["got"].skipped.values())) and bool(torch.isnan(res["got"].kl).all())
    assert _no_hooks(lm)


def test_agreement_of_flow_weights_that_are_not_distributions() -> None:
    attn = _attn()
    res = variant_agreement(attn, lambda m: m(_x()), ["flow"])["flow"]
    assert bool(torch.isfinite(res.l1).all()) and bool(torch.isfinite(res.kl).all())


@pytest.mark.parametrize("variant", attnlib.available())
def test_capture_works_for_every_registered_variant(variant: str) -> None:
    cls = attnlib.registry.get_variant(variant)
    info = attnlib.variant_info(variant)
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, variant=variant, **cls.conformance_kwargs()).eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        outside = attn(x)
        with capture(attn, rows=[0, 7]) as rec:
            inside = attn(x)
    assert _no_hooks(attn)
    assert torch.allclose(inside, outside, atol=1e-5, rtol=1e-4)
    (r,) = rec.records
    if info.has_weights:
        assert r.weights is not None and r.weights.shape == (2, 2, 2, 8)
    else:
        assert r.weights is None
    if r.importance is not None:
        assert r.importance.shape == (2, 2, 8)


def test_agreement_equals_a_direct_computation_of_the_divergences() -> None:
    # softmax against an exact sliding window (|i - j| <= 2) on the model's own q, k, v
    torch.manual_seed(3)
    attn, x = _attn(), _x(n=7, scale=2.0)
    res = variant_agreement(attn, lambda m: m(x), {"local": {"window": 2}})["local"]
    q, k, v = attn.project(x)
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    i = torch.arange(7)
    band = (i[:, None] - i[None, :]).abs() <= 2
    p, w = s.softmax(-1), s.masked_fill(~band, -math.inf).softmax(-1)
    mid = (p + w) / 2
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, mid)).sum(-1) + 0.5 * (torch.xlogy(w, w) - torch.xlogy(w, mid)).sum(
        -1
    )
    assert torch.allclose(res.js[0], js.mean((0, 2)), atol=1e-12)
    assert torch.allclose(res.l1[0], (p - w).abs().sum(-1).mean((0, 2)), atol=1e-12)
    assert bool(torch.isinf(res.kl).all())  # the window gives no mass where softmax has some
    o_p, o_w = p @ v, w @ v
    assert torch.allclose(res.out_rel_error, ((o_w - o_p).norm() / o_p.norm()).reshape(1), atol=1e-12)


def test_capture_sees_multihead_attention_and_the_transformers_backend() -> None:
    """The drop-in modules are capture sites too: attnlib.MultiheadAttention, and every layer of a
    transformers model built with attn_implementation="attnlib" (weights equal to the softmax of
    the layer's own scores: rows sum to one, causal)."""
    transformers = pytest.importorskip("transformers")
    from attnlib.integrations.transformers import register, set_variant

    torch.manual_seed(0)
    mha = attnlib.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), capture(mha) as rec:
        _, ref = mha(x, x, x, average_attn_weights=False)
    (r,) = rec.records
    torch.testing.assert_close(r.weights, ref)
    assert _no_hooks(mha)

    register()
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="attnlib",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    set_variant(model, "softmax")
    with torch.no_grad(), capture(model) as rec:
        model(torch.randint(0, 50, (1, 6)))
    assert len(rec.records) == 2
    for r in rec.records:
        w = r.weights
        assert w.shape == (1, 4, 6, 6)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 6))
        assert float(w.triu(1).abs().max()) == 0.0  # causal
