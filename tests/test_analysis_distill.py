"""Attention distillation losses equal their defining equations (float64 loops), and the trainer hook
adds them: MiniLMv2 relations (any head count), attention-map KL, activation attention transfer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.analysis import AttentionDistiller, capture
from attnlib.analysis.distill import layer_map
from attnlib.functional.relations import (
    activation_attention_map,
    activation_transfer_loss,
    attention_map_kl,
    minilm_relation_loss,
    relation_kl,
    relation_matrix,
)
from attnlib.models import DecoderLM
from attnlib.training import train_loss

D64 = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loop_relation(x: torch.Tensor, r: int) -> torch.Tensor:
    """Rel_r = softmax_row(X_r X_r^T / sqrt(d_r)) by explicit loops: x (N, C) -> (R, N, N)."""
    n, c = x.shape
    d = c // r
    out = torch.zeros(r, n, n, dtype=D64)
    for h in range(r):
        xr = x[:, h * d : (h + 1) * d]
        for i in range(n):
            logits = [float(xr[i] @ xr[j]) / math.sqrt(d) for j in range(n)]
            z = max(logits)
            e = [math.exp(v - z) for v in logits]
            for j in range(n):
                out[h, i, j] = e[j] / sum(e)
    return out


def _loop_kl(t: torch.Tensor, s: torch.Tensor) -> float:
    return sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(t, s) if float(a) > 0)


def test_relations_with_one_relation_head_per_attention_head_are_per_head_softmax() -> None:
    q = torch.randn(2, 3, 5, 4, generator=_g(0), dtype=D64) * 2  # (B, H, N, D)
    rel = relation_matrix(q, 3)
    for b in range(2):
        for h in range(3):
            want = (q[b, h] @ q[b, h].T / math.sqrt(4)).softmax(-1)
            assert torch.allclose(rel[b, h], want, atol=1e-14)
    # R != H: heads concatenated per token and re-split
    tokens = q.transpose(1, 2).flatten(2)  # (B, N, 12)
    assert torch.allclose(relation_matrix(q, 2)[1], _loop_relation(tokens[1], 2), atol=1e-14)
    assert torch.allclose(relation_matrix(tokens, 6), relation_matrix(q, 6))


def test_relation_kl_equals_its_formula_across_widths_and_head_counts() -> None:
    r = 4
    teacher = torch.randn(2, 6, 5, 8, generator=_g(1), dtype=D64)  # 6 heads x 8 = 48
    student = torch.randn(2, 2, 5, 8, generator=_g(2), dtype=D64)  # 2 heads x 8 = 16
    got = relation_kl(teacher, student, r)
    total = 0.0
    for b in range(2):
        rt = _loop_relation(teacher[b].transpose(0, 1).flatten(1), r)
        rs = _loop_relation(student[b].transpose(0, 1).flatten(1), r)
        total += sum(_loop_kl(rt[h, i], rs[h, i]) for h in range(r) for i in range(5)) / (r * 5)
    assert got.item() == pytest.approx(total / 2, abs=1e-12)
    assert relation_kl(teacher, teacher, r).item() == pytest.approx(0.0, abs=1e-14)


def test_relation_kl_with_key_padding() -> None:
    t = torch.randn(1, 6, 8, generator=_g(3), dtype=D64)
    s = torch.randn(1, 6, 4, generator=_g(4), dtype=D64)
    pad = torch.tensor([[True, True, True, True, False, False]])
    got = relation_kl(t, s, 2, pad)
    # the padded tokens are simply absent: equal to the loss on the 4 real tokens
    assert got.item() == pytest.approx(relation_kl(t[:, :4], s[:, :4], 2).item(), abs=1e-13)
    rel = relation_matrix(t, 2, pad)
    assert bool((rel[..., 4:] == 0).all()) and torch.allclose(rel.sum(-1), torch.ones(1, 2, 6, dtype=D64))


def test_minilm_loss_is_the_sum_of_three_relations_and_reaches_only_the_student() -> None:
    tq, tk, tv = (torch.randn(2, 4, 6, 4, generator=_g(i), dtype=D64) for i in range(3))
    sq, sk, sv = (torch.randn(2, 2, 6, 4, generator=_g(10 + i), dtype=D64, requires_grad=True) for i in range(3))
    tq.requires_grad_(True)
    loss = minilm_relation_loss((tq, tk, tv), (sq, sk, sv), 4)
    want = relation_kl(tq, sq, 4) + relation_kl(tk, sk, 4) + relation_kl(tv, sv, 4)
    assert loss.item() == pytest.approx(want.item(), abs=1e-13)
    loss.backward()
    assert tq.grad is None and sq.grad is not None and float(sq.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="divisible by num_relation_heads"):
        minilm_relation_loss((tq, tk, tv), (sq, sk, sv), 3)
    with pytest.raises(ValueError, match="same"):
        relation_kl(tq, sq[:, :, :5], 4)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(2, 7), st.floats(0.1, 4.0), st.integers(0, 10_000))
def test_relation_loss_is_non_negative_and_zero_for_identical_inputs(r: int, n: int, scale: float, seed: int) -> None:
    t = torch.randn(2, n, 4 * r, generator=_g(seed), dtype=D64) * scale
    s = torch.randn(2, n, 2 * r, generator=_g(seed + 1), dtype=D64) * scale
    assert relation_kl(t, s, r).item() >= -1e-12
    assert abs(relation_kl(t, t, r).item()) < 1e-12


def test_attention_map_kl_equals_its_formula() -> None:
    t = torch.randn(2, 3, 4, 5, generator=_g(5), dtype=D64).softmax(-1)
    s = torch.randn(2, 3, 4, 5, generator=_g(6), dtype=D64).softmax(-1)
    want = sum(_loop_kl(t[b, h, i], s[b, h, i]) for b in range(2) for h in range(3) for i in range(4)) / 24
    assert attention_map_kl(t, s).item() == pytest.approx(want, abs=1e-13)
    assert attention_map_kl(t, t).item() == pytest.approx(0.0, abs=1e-14)
    # different head counts: head-averaged maps
    s2 = s[:, :2]
    want2 = sum(_loop_kl(t[b].mean(0)[i], s2[b].mean(0)[i]) for b in range(2) for i in range(4)) / 8
    assert attention_map_kl(t, s2, average_heads=True).item() == pytest.approx(want2, abs=1e-13)
    with pytest.raises(ValueError, match="average_heads"):
        attention_map_kl(t, s2)
    # causal: the masked keys carry no mass; an all-zero (fully masked) row is left out
    causal = torch.ones(4, 5, dtype=torch.bool).tril()
    tc = (t * causal).div((t * causal).sum(-1, keepdim=True))
    sc = (s * causal).div((s * causal).sum(-1, keepdim=True))
    tc[:, :, 0] = 0.0
    want3 = sum(_loop_kl(tc[b, h, i], sc[b, h, i]) for b in range(2) for h in range(3) for i in range(1, 4)) / 18
    assert attention_map_kl(tc, sc, causal).item() == pytest.approx(want3, abs=1e-13)


def test_activation_attention_transfer() -> None:
    s = torch.randn(2, 5, 3, 4, generator=_g(7), dtype=D64)
    t = torch.randn(2, 8, 3, 4, generator=_g(8), dtype=D64)
    a = activation_attention_map(s)
    want = s.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, want / want.norm(dim=1, keepdim=True), atol=1e-15)
    loss = activation_transfer_loss(s, t)
    assert loss.item() == pytest.approx(float((a - activation_attention_map(t)).pow(2).mean()), abs=1e-15)
    # invariant to scaling the student's features and to permuting its channels
    assert activation_transfer_loss(3.7 * s, t).item() == pytest.approx(loss.item(), abs=1e-14)
    assert activation_transfer_loss(s[:, torch.randperm(5)], t).item() == pytest.approx(loss.item(), abs=1e-14)
    tokens = s.flatten(2).transpose(1, 2)  # (B, N, C) with channels last
    assert torch.allclose(activation_attention_map(tokens, channel_dim=-1), a)


# -- the trainer hook ---------------------------------------------------------------------------------


def test_layer_map_is_uniform() -> None:
    assert layer_map(2, 4) == [1, 3] and layer_map(4, 4) == [0, 1, 2, 3] and layer_map(3, 2) == [0, 0, 1]


@pytest.mark.parametrize("kind", ["maps", "relations"])
def test_distiller_adds_weight_times_the_loss(kind: str) -> None:
    teacher = DecoderLM(attention={"variant": "softmax"}, vocab_size=17, dim=32, depth=3, num_heads=4).to(D64).eval()
    student = DecoderLM(attention={"variant": "softmax"}, vocab_size=17, dim=16, depth=2, num_heads=2).to(D64)
    with torch.no_grad():  # sharp, different attention (the small default init is nearly uniform)
        for m in [*teacher.modules(), *student.modules()]:
            if isinstance(m, attnlib.Attention):
                m.in_proj.weight.normal_(0.0, 1.0, generator=_g(m.dim + m.num_heads))
    batch = {"tokens": torch.randint(17, (2, 9), generator=_g(9))}
    dist = AttentionDistiller(teacher, kind=kind, weight=0.3, relation_heads=4)
    total, items = dist.wrap(train_loss)(student, batch, "lm")
    base, _ = train_loss(student, batch, "lm")
    qkv = kind == "relations"
    with capture(student, qkv=qkv, weights=not qkv) as s_rec, capture(teacher, qkv=qkv, weights=not qkv) as t_rec:
        student(batch["tokens"][:, :-1])
        teacher(batch["tokens"][:, :-1])
    if qkv:
        s, t = s_rec.layers()[-1], t_rec.layers()[-1]
        extra = minilm_relation_loss((t.q, t.k, t.v), (s.q, s.k, s.v), 4)
    else:
        sw, tw = s_rec.weights(), t_rec.weights()
        kls = [attention_map_kl(tw[t], sw[s], average_heads=True) for s, t in enumerate(layer_map(2, 3))]
        extra = sum(kls) / 2
    assert items == 16 and 0.3 * extra.item() > 1e-3
    # the task loss is float32 (cross-entropy of float32 logits), the attention loss float64
    assert total.item() == pytest.approx(base.item() + 0.3 * extra.item(), rel=1e-6)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_explains_what_it_cannot_do() -> None:
    teacher = DecoderLM(attention={"variant": "aft_simple"}, vocab_size=7, dim=16, depth=1, num_heads=2).eval()
    student = DecoderLM(attention={"variant": "softmax"}, vocab_size=7, dim=16, depth=1, num_heads=2)
    batch = {"tokens": torch.randint(7, (2, 6))}
    with pytest.raises(ValueError, match="distill_attention=relations"):
        AttentionDistiller(teacher, kind="maps").wrap(train_loss)(student, batch, "lm")
    loss, _ = AttentionDistiller(teacher, kind="relations", relation_heads=2).wrap(train_loss)(student, batch, "lm")
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="kind"):
        AttentionDistiller(teacher, kind="logits")
    from attnlib.analysis import attention_distillation

    assert attention_distillation(train_loss, None, {"distill_attention": None}) is train_loss
    with pytest.raises(ValueError, match="distill_from"):
        attention_distillation(train_loss, None, {"distill_attention": "maps"})
    assert attnlib.analysis.AttentionDistiller is AttentionDistiller
