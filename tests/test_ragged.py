"""Ragged batches after token pruning (attnlib.models.ragged, Attention/TransformerBlock.forward_groups,
ViT ragged="groups"): packed inference equals per-image inference in float64; warm start and distillation
in attnlib-train (init_weights_from, load_teacher, distill_loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlib import Attention
from attnlib.errors import UnsupportedError
from attnlib.models import TransformerBlock, ViT
from attnlib.models.ragged import group_by_length
from attnlib.training import init_weights_from
from attnlib.training.loop import load_teacher
from attnlib.training.tasks import distill_loss, train_loss

LTP2 = {"name": "ltp", "layers": [0, 2], "normalize": True, "final_threshold": 1.0, "mode": "hard"}


def _ragged_mask(b: int = 6, n: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) > 0.45
    mask[0] = False  # an empty row
    mask[1, 0] = False  # real tokens need not be a prefix
    mask[1, 1:] = True
    return mask


def test_group_by_length_layout_and_roundtrip() -> None:
    mask = _ragged_mask()
    g = group_by_length(mask)
    lengths = mask.sum(1)
    assert g.order.tolist() == sorted(range(6), key=lambda r: (int(lengths[r]), r))
    assert g.groups == [(int((lengths == v).sum()), int(v)) for v in sorted(set(lengths.tolist()))]
    assert g.tokens == int(mask.sum()) == sum(r * n for r, n in g.groups)
    x = torch.randn(6, 7, 3, dtype=torch.float64)
    xp = g.pack(x)
    # packed order: rows by (length, batch index), each row's real tokens in sequence order
    expect = torch.cat([x[r][mask[r]] for r in g.order.tolist()])
    assert torch.equal(xp, expect)
    back = g.unpack(xp, fill=-7.0)
    assert torch.equal(back[mask], x[mask]) and bool((back[~mask] == -7.0).all())
    with pytest.raises(ValueError, match="bool"):
        group_by_length(mask.long())
    with pytest.raises(ValueError, match=r"\(B, N, ...\)"):
        g.pack(x[:, :5])
    with pytest.raises(ValueError, match="packed tokens"):
        g.unpack(xp[:-1])


@pytest.mark.parametrize(
    "kw", [{}, {"rope": True, "num_kv_heads": 1}, {"causal": True}], ids=["plain", "rope_gqa", "causal"]
)
def test_attention_forward_groups_equals_each_sequence_alone(kw) -> None:
    torch.manual_seed(0)
    attn = Attention(16, 4, **kw).double().eval()
    lengths = [3, 3, 5, 1, 5, 5]
    xs = [torch.randn(n, 16, dtype=torch.float64) for n in lengths]
    pos = [torch.randperm(12)[:n].sort().values for n in lengths]  # pruned tokens keep their positions
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups = [(lengths.count(n), n) for n in sorted(set(lengths))]
    xp = torch.cat([xs[i] for i in order])
    pp = torch.cat([pos[i] for i in order]) if "rope" in kw else None
    y, imp = attn.forward_groups(xp, groups, positions=pp, return_importance=True)
    off = 0
    for i in order:
        extra = {"positions": pos[i][None]} if "rope" in kw else {}
        ref, ex = attn(xs[i][None], return_extras=True, need_weights=False, **extra)
        n = lengths[i]
        torch.testing.assert_close(y[off : off + n], ref[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(imp[off : off + n], ex.importance[0], rtol=0, atol=1e-13)
        off += n
    assert torch.equal(attn.forward_groups(xp, groups, positions=pp), y)
    # gradients through the merged output buffer == through each sequence alone
    xg = xp.clone().requires_grad_(True)
    attn.forward_groups(xg, groups, positions=pp).square().sum().backward()
    xr = [xs[i].clone().requires_grad_(True) for i in order]
    refs = [
        attn(t[None], **({"positions": pos[i][None]} if "rope" in kw else {})) for t, i in zip(xr, order, strict=True)
    ]
    sum(r.square().sum() for r in refs).backward()
    torch.testing.assert_close(xg.grad, torch.cat([t.grad for t in xr]), rtol=0, atol=1e-12)


def test_attention_forward_groups_errors() -> None:
    attn = Attention(16, 4)
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match="cover the T=10"):
        attn.forward_groups(x, [(2, 4)])
    with pytest.raises(ValueError, match=r"\(T, dim=16\)"):
        attn.forward_groups(x[None], [(1, 10)])
    with pytest.raises(ValueError, match="int pairs"):
        attn.forward_groups(x, [5, 5])
    with pytest.raises(ValueError, match="rope=False"):
        attn.forward_groups(x, [(2, 5)], positions=torch.arange(10))
    with pytest.raises(ValueError, match="positions must be"):
        Attention(16, 4, rope=True).forward_groups(x, [(2, 5)], positions=torch.arange(9))
    blk = TransformerBlock(16, 4, {"variant": "softmax"}, drop_path=0.1).train()
    with pytest.raises(UnsupportedError, match="drop_path"):
        blk.forward_groups(x, [(2, 5)])


def _vit(pruning, **kw) -> ViT:
    torch.manual_seed(0)
    return ViT(attention={"variant": "softmax"}, pruning=pruning, dim=16, depth=4, num_heads=2, **kw).double().eval()


@pytest.mark.parametrize("rope", [False, True], ids=["abs", "rope"])
def test_vit_groups_equal_per_image_inference(rope: bool) -> None:
    m = _vit(LTP2, rope=rope)
    with torch.no_grad():
        m.pruning.get(0).delta.fill_(0.9)
        m.pruning.get(2).delta.fill_(0.4)
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    pm = torch.rand(10, 16, generator=torch.Generator().manual_seed(1)) > 0.2
    with torch.no_grad():
        y = m(x, pm)
        one = torch.cat([m(x[i : i + 1], pm[i : i + 1]) for i in range(10)])
    torch.testing.assert_close(y, one, rtol=0, atol=1e-13)
    m.pruning.get(0).register_forward_hook(lambda mod, i, o: setattr(m, "_kept", o.mask))
    with torch.no_grad():
        m(x, pm)
    assert m._kept is not None and len(set(m._kept.sum(1).tolist())) > 2  # really ragged


def test_vit_groups_equal_padded_batch_with_one_pruner_and_keep_all_is_exact() -> None:
    cfg = {**LTP2, "layers": [0]}
    m = _vit(cfg)
    with torch.no_grad():
        m.pruning.get(0).delta.fill_(0.9)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        m.ragged = "pad"
        yp = m(x)
    torch.testing.assert_close(y, yp, rtol=0, atol=1e-13)
    base, keep_all = _vit(None), _vit({**cfg, "final_threshold": -math.inf})
    keep_all.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(base(x), keep_all(x))
    with pytest.raises(ValueError, match="ragged must be"):
        _vit(cfg, ragged="nested")


def test_init_weights_from_dense_checkpoint_and_teacher(tmp_path) -> None:
    dense, pruned = _vit(None).float(), _vit({**LTP2, "layers": [0]}).float()
    for p in dense.parameters():
        torch.nn.init.normal_(p)
    cfg = {"model": {"name": "vit", "dim": 16, "depth": 4, "num_heads": 2}, "attention": {"variant": "softmax"}}
    torch.save({"model": dense.state_dict(), "config": cfg}, tmp_path / "last.pt")
    fresh = init_weights_from(pruned, tmp_path / "last.pt")
    assert fresh == ["pruning.pruners.0.delta"]
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in dense.state_dict().items())
    with pytest.raises(ValueError, match="model keys not in it"):
        init_weights_from(ViT(attention={"variant": "softmax"}, dim=16, depth=5, num_heads=2), tmp_path / "last.pt")
    with pytest.raises(ValueError, match="shape"):
        init_weights_from(_vit(None, pool="mean").float(), tmp_path / "last.pt")
    with pytest.raises(ValueError, match="keys not in the model"):
        torch.save({"model": pruned.state_dict()}, tmp_path / "p.pt")
        init_weights_from(dense, tmp_path / "p.pt")
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights_from(dense, tmp_path / "nope.pt")

    class Data:
        @staticmethod
        def model_kwargs():
            return {"img_size": 8, "in_chans": 1, "num_classes": 10}

    teacher = load_teacher(tmp_path / "last.pt", Data())
    x = torch.randn(4, 1, 8, 8)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher(x), dense.eval()(x))


def test_distill_loss_is_scaled_kl_and_mixes_with_ce() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for temp in (1.0, 2.5):
        p, q = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
        kl = (q * (q.log() - p.log())).sum(-1).mean() * temp**2
        torch.testing.assert_close(distill_loss(s, t, temp).double(), kl, rtol=1e-6, atol=0)
    assert float(distill_loss(s, s)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, 0.0)
    model, teacher = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    batch = {"x": torch.randn(6, 3), "y": torch.randint(0, 4, (6,))}
    loss, n = train_loss(model, batch, "classify", teacher=teacher, distill_weight=0.25, distill_temperature=2.0)
    ce = F.cross_entropy(model(batch["x"]), batch["y"])
    expect = 0.75 * ce + 0.25 * distill_loss(model(batch["x"]), teacher(batch["x"]), 2.0)
    torch.testing.assert_close(loss, expect)
    assert n == 6
    loss.backward()
    assert teacher.weight.grad is None and model.weight.grad is not None
    with pytest.raises(ValueError, match="classify"):
        train_loss(model, {"tokens": torch.zeros(2, 3, dtype=torch.long)}, "lm", teacher=teacher)


def test_cls_score_ranks_by_the_class_token_attention_row() -> None:
    m = _vit({"name": "topk", "layers": [0], "keep_ratio": 0.25, "score": "cls"})
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        m(x)
        kept = m.last_kept_index
        h = m.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([m.cls_token.expand(5, -1, -1), h], 1) + m.pos_embed
        blk = m.blocks[0]
        _, ex = blk.attn(blk.norm1(h), return_extras=True, need_weights=True)
        row = ex.weights[:, :, 0, 1:].mean(1)  # class token's attention to the 16 patches, head mean
    expect = torch.cat([torch.zeros(5, 1, dtype=torch.long), 1 + row.topk(4, 1).indices.sort(1).values], 1)
    assert torch.equal(kept, expect)
    # the mean-received importance ranks differently on these inputs (the option changes something)
    mean = _vit({"name": "topk", "layers": [0], "keep_ratio": 0.25})
    with torch.no_grad():
        mean(x)
    assert not torch.equal(mean.last_kept_index, kept)
    with pytest.raises(UnsupportedError, match="no class token"):
        _vit({"name": "ltp", "layers": [0], "score": "cls"}, pool="mean")
    with pytest.raises(UnsupportedError, match="has_weights"):
        ViT(attention={"variant": "aft_full"}, pruning={"name": "topk", "score": "cls"}, dim=16, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="score must be one of"):
        _vit({"name": "topk", "score": "max"})


def test_ltp_straight_through_ratio_loss_takes_the_hard_ratio_with_soft_gradient() -> None:
    kw = {"final_threshold": 0.2, "temperature": 0.05, "lam": 0.3, "keep_target": 0.5}
    ste = __import__("attnlib.pruning", fromlist=["LTPPruner"]).LTPPruner(
        dim=4, layer=1, depth=4, mode="straight_through", **kw
    )
    ste = ste.double().train()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    imp = torch.tensor([[0.5, 0.01, 0.09, 0.07, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    prot = torch.zeros(2, 6, dtype=torch.bool)
    prot[:, 0] = True
    out = ste(x, imp, None, prot)
    hard = (imp[:, 1:] >= 0.05).double()  # theta = 0.2 * 1 / 4
    torch.testing.assert_close(out.aux_loss, 0.3 * ((hard.mean(1) - 0.5) ** 2).mean(), rtol=0, atol=1e-14)
    out.aux_loss.backward()
    mu = torch.sigmoid((imp[:, 1:] - 0.05) / 0.05)
    # d aux / d delta = 0.3 * mean_b 2 (ratio_b - 0.5) * mean_j d mu_bj / d delta, d mu / d delta = -mu (1 - mu) / T
    dmu = -(mu * (1 - mu) / 0.05).mean(1)
    expect = 0.3 * (2 * (hard.mean(1) - 0.5) * dmu).mean()
    torch.testing.assert_close(ste.delta.grad, expect, rtol=1e-12, atol=0)
