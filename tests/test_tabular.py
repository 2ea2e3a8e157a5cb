"""Bi-axial (Orion-BiX) tabular attention: the row patterns against their definitions, the in-context
rule (rows read only labelled rows), the prefix-keys BlockMask, and the synthetic tables."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.data import TablesData
from attnlib.masks import BlockMask
from attnlib.models import BiAxialRowBlock, TabularICL, TransformerBlock
from attnlib.training.tasks import train_loss

DT = torch.float64
SOFTMAX = {"variant": "softmax"}


def _block(**kw) -> BiAxialRowBlock:
    """A row block; the pattern definitions are checked without the rotary feature positions (rope=False)."""
    torch.manual_seed(0)
    kw.setdefault("rope", False)
    return BiAxialRowBlock(8, 2, SOFTMAX, **kw).double().eval()


def _block_with_mask(blk: TransformerBlock, x: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """The (eval-mode) pre-norm block with an attention mask: x + attn(LN x), then x + mlp(LN x)."""
    x = x + blk.attn(blk.norm1(x), mask=mask)
    return x + blk.mlp(blk.norm2(x))


def test_grouped_pattern_is_independent_attention_per_group() -> None:
    blk = _block(patterns=("grouped",), num_groups=3)
    x = torch.randn(4, 7, 8, dtype=DT)  # 3 groups of 2 features, 1 leftover
    out = blk.grouped(x)
    layer, proj = blk.layers["grouped"], blk.projs["grouped"]
    for g in range(3):  # explicit loop over the groups
        torch.testing.assert_close(out[:, 2 * g : 2 * g + 2], layer(proj(x[:, 2 * g : 2 * g + 2])), rtol=0, atol=1e-12)
    assert torch.equal(out[:, 6], x[:, 6])  # the leftover feature passes unchanged
    # the same as one attention call over the 6 grouped features with a document (block-diagonal) mask
    doc = BlockMask.document(torch.arange(6) // 2, block_size=2)
    torch.testing.assert_close(_block_with_mask(layer, proj(x[:, :6]), doc), out[:, :6], rtol=0, atol=1e-12)
    # equivariant within a group, no mixing across groups
    p = torch.tensor([1, 0, 2, 3, 4, 5, 6])
    torch.testing.assert_close(blk.grouped(x[:, p]), out[:, p], rtol=0, atol=1e-12)
    x2 = x.clone()
    x2[:, 0] += 1.0
    torch.testing.assert_close(blk.grouped(x2)[:, 2:], out[:, 2:], rtol=0, atol=0)
    assert torch.equal(_block(patterns=("grouped",), num_groups=8).grouped(x), x)  # F < G: skipped


def test_hierarchical_pattern_reads_the_updated_first_half() -> None:
    blk = _block(patterns=("hierarchical",))
    x = torch.randn(3, 5, 8, dtype=DT)
    layer, proj = blk.layers["hierarchical"], blk.projs["hierarchical"]
    a = layer(proj(x[:, :2]), x[:, 2:])
    b = layer(proj(x[:, 2:]), a)
    torch.testing.assert_close(blk.hierarchical(x), torch.cat([a, b], 1), rtol=0, atol=1e-12)
    one = torch.randn(3, 1, 8, dtype=DT)
    assert torch.equal(blk.hierarchical(one), one)  # F = 1: empty half, skipped


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(
    ("patterns", "invariant"),
    [(("standard",), True), (("relational",), True), (("grouped",), False), (("hierarchical",), False)],
)
def test_feature_permutation_invariance_of_the_cls_output(patterns, invariant, rope) -> None:
    """Without feature positions the standard / relational patterns cannot tell the features apart
    (a row is a set of values); the rotary feature positions make every pattern order-aware."""
    blk = _block(patterns=patterns, num_groups=2, rope=rope)
    x = torch.randn(3, 6, 8, dtype=DT)
    p = torch.tensor([3, 0, 5, 1, 4, 2])
    assert blk(x).shape == (3, 4, 8)
    same = torch.allclose(blk(x[:, p]), blk(x), rtol=0, atol=1e-12)
    assert same == (invariant and not rope)


@pytest.mark.parametrize("row_mode", ["biaxial", "standard"])
def test_a_row_knows_which_feature_holds_which_value(row_mode: str) -> None:
    """Two columns with the same labelled values look alike to the column blocks; swapping their values in
    a row to predict must still change its prediction (the row blocks' rotary feature positions), else
    the model sees each row as a set of values and cannot learn which feature predicts the class."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(12, generator=g, dtype=DT)
    x = torch.randn(13, 5, generator=g, dtype=DT)
    x[:12, 0], x[:12, 1] = v, v[torch.randperm(12, generator=g)]
    labels = torch.cat([torch.arange(12, dtype=DT) % 3, torch.tensor([-1.0], dtype=DT)])
    tok = torch.cat([x, labels[:, None]], 1)[None]
    swapped = tok.clone()
    swapped[0, 12, [0, 1]] = tok[0, 12, [1, 0]]
    for rope in (False, True):
        m = _model(row_mode=row_mode, row_rope=rope)
        moved = (m(swapped)[0, 12] - m(tok)[0, 12]).abs().max()
        assert (moved > 1e-6) == rope, (rope, float(moved))


def _model(**kw) -> TabularICL:
    torch.manual_seed(1)
    return TabularICL(attention=SOFTMAX, num_features=5, max_classes=3, dim=8, num_heads=2, **kw).double().eval()


@pytest.mark.parametrize("row_mode", ["biaxial", "standard"])
def test_a_test_row_is_never_a_key(row_mode: str) -> None:
    """Changing one row to predict changes no other row's output (no label leakage between test rows)."""
    m = _model(row_mode=row_mode)
    tok = torch.randn(2, 10, 6, dtype=DT)
    tok[..., -1] = torch.tensor([0, 1, 2, 0, 1, 2, -1, -1, -1, -1], dtype=DT)
    out = m(tok)
    tok2 = tok.clone()
    tok2[:, 7, :-1] += torch.randn(2, 5, dtype=DT) * 3
    out2 = m(tok2)
    keep = [i for i in range(10) if i != 7]
    torch.testing.assert_close(out2[:, keep], out[:, keep], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[:, 7], out[:, 7])
    tok3 = tok.clone()
    tok3[:, 2, 0] += 1.0  # a labelled row is a key: it moves every prediction
    assert not torch.allclose(m(tok3)[:, 8], out[:, 8])
    assert m(tok, select=tok[..., -1] < 0).shape == (8, 3)


def test_in_context_key_padding_equals_the_prefix_keys_block_mask() -> None:
    torch.manual_seed(2)
    blk = TransformerBlock(8, 2, SOFTMAX).double().eval()
    x = torch.randn(2, 12, 8, dtype=DT)
    train = torch.arange(12)[None].expand(2, 12) < 7
    pk = BlockMask.prefix_keys(12, 7, block_size=4)
    dense = pk.to_dense()
    assert dense.shape[-2:] == (12, 12) and torch.equal(dense.reshape(12, 12), (torch.arange(12) < 7).expand(12, 12))
    torch.testing.assert_close(blk.attn(x, key_padding_mask=train), blk.attn(x, mask=pk), rtol=0, atol=1e-12)


def test_model_errors() -> None:
    m = _model()
    with pytest.raises(ValueError, match=r"tokens \(B, S, num_features \+ 1 = 6\)"):
        m(torch.randn(1, 4, 5, dtype=DT))
    tok = torch.randn(1, 4, 6, dtype=DT)
    tok[..., -1] = -1
    with pytest.raises(ValueError, match="at least one labelled row"):
        m(tok)
    with pytest.raises(ValueError, match="row_mode"):
        TabularICL(attention=SOFTMAX, num_features=5, max_classes=3, row_mode="columns")
    with pytest.raises(attnlib.UnsupportedError, match="capabilities.cross"):
        attnlib.models.build_model({"name": "tabular"}, {"variant": "coat"}, num_features=5, max_classes=3)


def test_tables_are_deterministic_episodes_without_test_labels() -> None:
    data = TablesData(
        num_features=5, num_train=12, num_test=6, num_tables=10, num_val=3, num_test_tables=3, batch_size=4
    )
    b = data.train_batch(0)
    assert b["tokens"].shape == (4, 18, 6) and b["labels"].shape == (4, 18)
    assert (b["tokens"][:, 12:, -1] == -1).all() and (b["labels"][:, :12] == -100).all()
    assert (b["labels"][:, 12:] >= 0).all() and (b["labels"][:, 12:] < 4).all()
    assert (b["tokens"][:, :12, -1] >= 0).all()
    torch.testing.assert_close(b["tokens"][:, :12, :-1].mean(1), torch.zeros(4, 5), rtol=0, atol=1e-5)
    again = TablesData(
        num_features=5, num_train=12, num_test=6, num_tables=10, num_val=3, num_test_tables=3, batch_size=4
    )
    assert torch.equal(again.train_batch(0)["tokens"], b["tokens"])
    assert not torch.equal(data.table("val", 0)[0], data.table("test", 0)[0])
    model = TabularICL(attention=SOFTMAX, **data.model_kwargs(), dim=8)
    loss, n = train_loss(model, b, data.task)
    assert n == 4 * 6 and torch.isfinite(loss)
