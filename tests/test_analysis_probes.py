"""Attention sorting and the probes: document masses, the sort's fixed point and its effect on a
content-only toy model; random-feature attention (invariance, its special cases, equivalence with
one attnlib.Attention with frozen q/k, ridge == gradient descent, frozen features; freeze_qk on a
model); the induction
probe's scores on hand-made attention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnlib
from attnlib.analysis import (
    CaptureSink,
    RandomFeatureAttention,
    attention_sort,
    document_attention,
    freeze_qk,
    induction_probe,
)
from attnlib.analysis.sorting import layout

D64 = torch.float64


class _ContentOnly(nn.Module):
    """Embeddings + one causal softmax attention without positions: the last token's attention to a
    document depends on its content, not on where it sits."""

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = attnlib.Attention(dim, 2, causal=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attn(self.emb(tokens))


def test_document_attention_sums_each_documents_keys() -> None:
    model = _ContentOnly().double()
    docs = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6])]
    tokens, seg = layout(docs, [2, 0, 1], torch.tensor([7]), prefix=torch.tensor([0]))
    assert tokens.tolist() == [0, 4, 5, 6, 1, 2, 3, 7] and seg.tolist() == [-1, 2, 2, 2, 0, 0, 1, -1]
    mass = document_attention(model, tokens[None], seg, 3)
    with attnlib.analysis.capture(model) as rec:
        model(tokens[None])
    last = rec.weights()[0][0, :, -1].mean(0)  # (N,) heads averaged
    for d in range(3):
        assert mass[0, d].item() == pytest.approx(float(last[seg == d].sum()), abs=1e-12)
    assert mass.sum().item() + float(last[seg == -1].sum()) == pytest.approx(1.0, abs=1e-12)


def test_attention_sort_is_stable_and_moves_the_most_attended_document_last() -> None:
    torch.manual_seed(0)
    model = _ContentOnly().double()
    query = torch.tensor([11])
    with torch.no_grad():  # q = k = the embedding; document 2's token is the query's best match
        w = model.attn.in_proj.weight
        w[:16] = torch.eye(8, dtype=D64).repeat(2, 1)
        model.attn.in_proj.bias.zero_()
        model.emb.weight[11] = 2.0 * model.emb.weight[11] / model.emb.weight[11].norm()
        model.emb.weight[5] = 3.0 * model.emb.weight[11]
    docs = [torch.tensor([1]), torch.tensor([2]), torch.tensor([5]), torch.tensor([3])]
    res = attention_sort(model, docs, query, iterations=2)
    assert res.order[-1] == 2
    first_order, first_mass = res.history[0]
    assert first_order == [0, 1, 2, 3]
    assert res.history[1][0] == sorted(range(4), key=lambda d: float(first_mass[d]))
    # content only: the masses do not depend on the order, so the sorted order is a fixed point
    assert res.history[1][0] == res.order
    again = attention_sort(model, docs, query, order=res.order)
    assert again.order == res.order
    with pytest.raises(ValueError, match="permutation"):
        attention_sort(model, docs, query, order=[0, 0, 1, 2])


# -- random-feature attention ------------------------------------------------------------------------


def _rf_data(n: int = 40, keys: int = 6, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=D64) / math.sqrt(d)
    xs = torch.randn(n, keys, d, generator=g, dtype=D64) / math.sqrt(d)
    y = (torch.einsum("nd,nkd->nk", x0, xs) ** 2).mean(1)
    return x0, xs, y


def test_random_feature_attention_is_key_permutation_invariant_and_reduces_to_mean_pooling() -> None:
    x0, xs, _ = _rf_data()
    rf = RandomFeatureAttention(4, 8, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        rf.v.normal_()
    perm = torch.randperm(6)
    assert torch.allclose(rf(x0, xs), rf(x0, xs[:, perm]), atol=1e-13)
    one = RandomFeatureAttention(4, 1).double()
    with torch.no_grad():
        one.W.zero_()  # sigma(0) = exp(0) = 1 for every key: f = <v, mean_i x_i>
        one.v.normal_()
    assert torch.allclose(one(x0, xs), xs.mean(1) @ one.v[0], atol=1e-13)


def test_softmax_random_feature_attention_is_one_attention_layer_with_frozen_qk() -> None:
    d, m = 4, 3
    x0, xs, _ = _rf_data(n=5, d=d)
    rf = RandomFeatureAttention(d, m, sigma="softmax", qk_init="gaussian_biased", mu=0.5).double()
    with torch.no_grad():
        rf.v.normal_()
    # attnlib.Attention of width m*d, m heads of size d, on inputs padded to m*d: head h's query
    # projection is sqrt(d) W_h^T, keys and values the identity, the output row 0 concatenates v_h
    attn = attnlib.Attention(m * d, m, qkv_bias=False).double()
    with torch.no_grad():
        attn.in_proj.weight.zero_()
        attn.out_proj.weight.zero_()
        attn.out_proj.bias.zero_()
        c = m * d
        for h in range(m):
            rows = slice(h * d, (h + 1) * d)
            attn.in_proj.weight[rows, :d] = math.sqrt(d) * rf.W[h].T
            attn.in_proj.weight[c + h * d : c + (h + 1) * d, :d] = torch.eye(d)
            attn.in_proj.weight[2 * c + h * d : 2 * c + (h + 1) * d, :d] = torch.eye(d)
            attn.out_proj.weight[0, h * d : (h + 1) * d] = rf.v[h]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, m * d - d))

    out = attn(pad(x0)[:, None], context=pad(xs))[:, 0, 0]
    assert torch.allclose(out, rf(x0, xs), atol=1e-12)


def test_ridge_solution_equals_gradient_descent_and_features_stay_frozen() -> None:
    x0, xs, y = _rf_data(n=60)
    rf = RandomFeatureAttention(4, 5, generator=torch.Generator().manual_seed(2)).double()
    lam = 1e-2
    mse = rf.fit_ridge(x0, xs, y, lam)
    v_ridge = rf.v.detach().clone()
    assert mse.item() < float(y.var())
    gd = RandomFeatureAttention(4, 5, generator=torch.Generator().manual_seed(2)).double()
    assert torch.equal(gd.W, rf.W) and [n for n, _ in gd.named_parameters()] == ["v"]
    # gradient descent on the same features, to convergence: v <- v - lr (Phi^T (Phi v - y) / n + lam v)
    phi = gd.features(x0, xs).flatten(1)
    hess = phi.T @ phi / 60 + lam * torch.eye(phi.shape[1], dtype=D64)
    lr = 1.0 / float(torch.linalg.eigvalsh(hess).max())
    v = torch.zeros(phi.shape[1], dtype=D64)
    for _ in range(3000):  # condition number about 50: the error shrinks by 1e-25
        v = v - lr * (phi.T @ (phi @ v - y) / 60 + lam * v)
    assert torch.allclose(v.view_as(v_ridge), v_ridge, atol=1e-9)
    # one optimizer step trains v only: the random query-key features stay bit for bit
    w_before = gd.W.clone()
    opt = torch.optim.SGD(gd.parameters(), lr=0.1)
    ((gd(x0, xs) - y) ** 2).mean().backward()
    opt.step()
    assert torch.equal(gd.W, w_before) and float(gd.v.detach().abs().sum()) > 0
    with pytest.raises(ValueError, match="sigma"):
        RandomFeatureAttention(4, 2, sigma="tanh")


def test_freeze_qk_keeps_queries_and_keys_through_training_with_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(attnlib.Attention(16, 4, num_kv_heads=2), attnlib.Attention(16, 4, qkv_bias=False)).double()
    x = torch.randn(2, 6, 16, dtype=D64)
    before = model(x)
    weights = [a.in_proj.weight.detach().clone() for a in model]
    bias = model[0].in_proj.bias.detach().clone()
    assert freeze_qk(model) == ["0", "1"]
    assert torch.equal(model(x), before)  # the forward is unchanged
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for a, w in zip(model, weights):
        rows = 16 + a.num_kv_heads * 4  # q rows, then k rows
        now = a.in_proj.weight.detach()
        assert torch.equal(now[:rows], w[:rows]) and not torch.equal(now[rows:], w[rows:])
    assert torch.equal(model[0].in_proj.bias.detach()[:24], bias[:24])
    assert not torch.equal(model[0].in_proj.bias.detach()[24:], bias[24:])
    with pytest.raises(ValueError, match="parametrized already"):
        freeze_qk(model)
    with pytest.raises(ValueError, match="holds no attnlib.Attention"):
        freeze_qk(nn.Linear(2, 2))


# -- induction probe -----------------------------------------------------------------------------------


class _HandMade(nn.Module):
    """Reports hand-made attention through the capture protocol: head 0 an exact induction head, head 1
    an exact previous-token head; predicts the token after the earlier occurrence (perfect recall)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.sinks: list[CaptureSink] = []

    def attnlib_capture(self, sink: CaptureSink) -> list[object]:
        self.sinks.append(sink)
        return [type("Undo", (), {"remove": lambda _self: self.sinks.remove(sink)})()]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        t = n // 2
        w = torch.zeros(b, 2, n, n)
        for i in range(n):
            w[:, 0, i, i - t + 1 if i >= t else 0] = 1.0
            w[:, 1, i, max(i - 1, 0)] = 1.0
        for s in self.sinks:
            s.record(n=n, m=n, weights=w)
        logits = torch.zeros(b, n, self.vocab)
        logits[:, t:-1].scatter_(2, tokens[:, 1:t][:, :, None], 50.0)  # position i >= t predicts tokens[i - t + 1]
        return logits


def test_induction_probe_scores_hand_made_heads() -> None:
    model = _HandMade(10)
    rep = induction_probe(model, 10, length=6, batch=3, generator=torch.Generator().manual_seed(0))
    assert rep.induction.shape == rep.previous.shape == (1, 2)
    assert rep.induction[0, 0].item() == pytest.approx(1.0) and rep.previous[0, 1].item() == pytest.approx(1.0)
    assert rep.induction[0, 1].item() == pytest.approx(0.0) and rep.previous[0, 0].item() < 0.5
    assert rep.loss_repeat < 1e-6 < math.log(10) - 0.1 < rep.loss_first
