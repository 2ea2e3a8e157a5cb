"""BlockMask patterns, block algebra, top-k, transposed layout and FlexAttention round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from attnlib.functional.grat import grat_permutation
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow, causal_mask, normalize_mask, window_mask

SHAPES = [(37, 37, 8), (40, 53, (8, 16)), (53, 40, 16), (64, 64, 16)]


def _ij(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n)[:, None], torch.arange(m)[None, :]


def _eq(bm: BlockMask, dense: torch.Tensor) -> None:
    got = bm.to_dense()
    assert torch.equal(got, dense.expand_as(got)), "layout differs from the dense rule"


@pytest.mark.parametrize(("n", "m", "bs"), SHAPES)
def test_causal_and_window_patterns(n: int, m: int, bs) -> None:
    _eq(BlockMask.causal(n, m, block_size=bs), causal_mask(n, m))
    _eq(BlockMask.sliding_window(n, 5, M=m, block_size=bs), window_mask(n, m, left=5, right=5))
    _eq(BlockMask.sliding_window(n, 5, 2, M=m, block_size=bs), window_mask(n, m, left=5, right=2))
    _eq(BlockMask.sliding_window(n, 7, M=m, causal=True, block_size=bs), window_mask(n, m, left=7, right=0))
    _eq(BlockMask.sliding_window(n, None, 3, M=m, block_size=bs), window_mask(n, m, left=None, right=3))
    i, j = _ij(n, m)
    glob = (i < 3) | (j < 3)
    _eq(BlockMask.global_tokens(n, 3, M=m, block_size=bs), glob)
    _eq(BlockMask.global_tokens(n, 3, M=m, causal=True, block_size=bs), glob & causal_mask(n, m))


def test_causal_block_states() -> None:
    partial, full = BlockMask.causal(64, block_size=16).block_states()
    assert torch.equal(partial[0, 0], torch.eye(4, dtype=torch.bool))
    assert torch.equal(full[0, 0], torch.ones(4, 4, dtype=torch.bool).tril(-1))


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_and_strided_at_block_granularity(causal: bool) -> None:
    n, bs = 96, 8
    i, j = _ij(n, n)
    d = i // bs - j // bs
    want_dil = (d.abs() <= 2 * 3) & (d % 3 == 0)
    want_str = (d.abs() < 2) | (d % 4 == 0)
    if causal:
        want_dil &= (d >= 0) & (j <= i)
        want_str &= (d >= 0) & (j <= i)
    _eq(BlockMask.dilated(n, 2, 3, causal=causal, block_size=bs), want_dil)
    _eq(BlockMask.strided(n, 4, local=2, causal=causal, block_size=bs), want_str)
    # block granularity: no partial blocks except on the causal diagonal
    partial, _ = BlockMask.dilated(n, 2, 3, causal=causal, block_size=bs).block_states()
    assert int(partial.sum()) == (n // bs if causal else 0)


def test_document_mask() -> None:
    ids = torch.tensor([0] * 10 + [1] * 17 + [2] * 5 + [3] * 20)
    same = ids[:, None] == ids[None, :]
    _eq(BlockMask.document(ids, block_size=8), same)
    _eq(BlockMask.document(ids, causal=True, block_size=8), same & causal_mask(52))
    two = torch.stack([ids, ids.flip(0)])
    bm = BlockMask.document(two, block_size=16)
    assert bm.shape[:2] == (2, 1)
    assert torch.equal(bm.to_dense()[1, 0], two[1][:, None] == two[1][None, :])


def _grat_oracle(grid, group, perm, mode, radius):
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    gc = (coords // torch.tensor(group))[perm]
    diff = gc[:, None, :] - gc[None, :, :]
    return (diff == 0).any(-1) if mode == "criss_cross" else (diff.abs() <= radius).all(-1)


@pytest.mark.parametrize(("grid", "group"), [((6, 8), (2, 4)), ((4, 6, 6), (2, 3, 2)), ((30,), (7,)), ((5, 7), (2, 3))])
@pytest.mark.parametrize("mode", ["criss_cross", "surrounding"])
def test_grat_layout_equals_group_rule(grid, group, mode: str) -> None:
    perm = grat_permutation(grid, group)
    assert torch.equal(torch.sort(perm).values, torch.arange(math.prod(grid)))  # a permutation
    inv = torch.argsort(perm)
    x = torch.randn(math.prod(grid), 3)
    assert torch.equal(x[perm][inv], x)
    allowed = _grat_oracle(grid, group, perm, mode, 1)
    t = math.prod(grid)
    want = torch.ones(t + 3, t + 3, dtype=torch.bool)  # 3 extra (text) tokens: global
    want[:t, :t] = allowed
    _eq(BlockMask.grat(grid, group, mode=mode, num_extra=3, block_size=8), want)


def test_grat_groups_are_contiguous_and_counting_formula() -> None:
    perm = grat_permutation((4, 8), (2, 4))
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    gid = ((coords // torch.tensor([2, 4])) * torch.tensor([2, 1])).sum(-1)[perm]
    assert torch.equal(gid, torch.arange(4).repeat_interleave(8))
    # 3D criss-cross: n_h n_w + n_t n_w + n_t n_h - n_w - n_h - n_t + 1 key groups of the n_t n_h n_w
    bm = BlockMask.grat((8, 12, 20), (2, 4, 4), block_size=32)  # group grid (4, 3, 5)
    nt, nh, nw = 4, 3, 5
    assert bm.density() == pytest.approx((nh * nw + nt * nw + nt * nh - nw - nh - nt + 1) / (nt * nh * nw))
    partial, _ = bm.block_states()
    assert int(partial.sum()) == 0  # groups of 32 tokens: every block full or empty


def test_from_topk_and_restrict() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 7, generator=g)
    scores[0, 0, 0, 2:] = float("-inf")
    bm = BlockMask.from_topk(scores, k=3, block_size=8, seq_lengths=(37, 53))
    _, full = bm.block_states()
    assert full.sum(-1)[0, 0, 0] == 2 and (full.sum(-1).flatten()[1:] == 3).all()
    top = scores.topk(3, -1).indices
    assert full.gather(-1, top)[0, 0, 1:].all()
    assert (
        BlockMask.from_topk(scores, density=0.5, block_size=8, seq_lengths=(37, 53)).block_states()[1].sum(-1).max()
        == 4
    )
    # restricting a causal layout keeps its element masks
    causal = BlockMask.causal(37, 53, block_size=8)
    r = causal.restrict(full)
    expand = full.repeat_interleave(8, -2).repeat_interleave(8, -1)[..., :37, :53]
    assert torch.equal(r.to_dense(), expand & causal_mask(37, 53))
    with pytest.raises(ValueError, match="exactly one"):
        BlockMask.from_topk(scores, k=2, density=0.5)
    with pytest.raises(ValueError, match="density"):
        BlockMask.from_topk(scores, density=1.5)
    with pytest.raises(ValueError, match="NaN"):
        BlockMask.from_topk(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="need"):
        BlockMask.from_topk(scores, k=2, block_size=8, seq_lengths=(100, 53))
    with pytest.raises(ValueError, match="restrict"):
        causal.restrict(torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize(("n", "m", "bs"), SHAPES)
def test_union_and_intersection(n: int, m: int, bs) -> None:
    a = BlockMask.sliding_window(n, 4, M=m, block_size=bs)
    b = BlockMask.global_tokens(n, 2, M=m, block_size=bs)
    c = BlockMask.causal(n, m, block_size=bs)
    da, db, dc = a.to_dense(), b.to_dense(), c.to_dense()
    _eq(a | b, da | db)
    _eq(a & c, da & dc)
    _eq((a | b) & c, (da | db) & dc)
    g = torch.Generator().manual_seed(n)
    rnd = torch.rand(2, 1, n, m, generator=g) > 0.5
    _eq(BlockMask.from_dense(rnd, bs) & a, rnd & da)
    with pytest.raises(ValueError, match="different layouts"):
        a & BlockMask.causal(n, m, block_size=4)


def test_transposed_layout() -> None:
    g = torch.Generator().manual_seed(1)
    bm = BlockMask.from_dense(torch.rand(2, 3, 50, 70, generator=g) > 0.7, 16)
    partial, full = bm.block_states()
    for b in range(2):
        for h in range(3):
            for j in range(bm.num_blocks[1]):
                listed = bm.q_indices[b, h, j, : bm.q_num_blocks[b, h, j]].tolist()
                assert listed == partial[b, h, :, j].nonzero().flatten().tolist()
                for t, i in enumerate(listed):
                    assert int(bm.kv_indices[b, h, i, bm.q_tile_slots[b, h, j, t]]) == j
                f = bm.full_q_indices[b, h, j, : bm.full_q_num_blocks[b, h, j]].tolist()
                assert f == full[b, h, :, j].nonzero().flatten().tolist()


def test_dense_rows_and_as_block_mask() -> None:
    bm = BlockMask.from_dense(torch.rand(2, 1, 45, 30) > 0.4, 8)
    d = bm.to_dense()
    for s, e in ((0, 45), (3, 11), (16, 17), (40, 45), (9, 9)):
        assert torch.equal(bm.dense_rows(s, e), d[..., s:e, :])
    kp = torch.rand(2, 30) > 0.3
    full = torch.rand(2, 3, 30, 30) > 0.2
    am = normalize_mask(
        [SlidingWindow(3, None), KeyPadding(kp), full],
        causal=True,
        batch=2,
        heads=3,
        n=30,
        m=30,
        device=torch.device("cpu"),
    )
    assert torch.equal(am.as_block_mask(8).to_dense(), am.dense().expand(2, 3, 30, 30))
    am2 = normalize_mask(bm.restrict(torch.ones(6, 4, dtype=torch.bool)), causal=False, batch=2, heads=3, n=45, m=30,
                         device=torch.device("cpu"))  # fmt: skip
    assert torch.equal(am2.as_block_mask(16).to_dense(), d)  # re-tiled to another block size
    assert (
        normalize_mask(None, causal=False, batch=1, heads=1, n=4, m=4, device=torch.device("cpu")).as_block_mask()
        is None
    )


def test_key_padding_layout() -> None:
    kp = torch.rand(2, 45) > 0.3
    kp[0, :8] = True
    bm = BlockMask.from_key_padding(kp, 30, block_size=8)
    _eq(bm, kp[:, None, None, :].expand(2, 1, 30, 45))


def test_patterns_round_trip_with_flex() -> None:
    for bm in (
        BlockMask.sliding_window(100, 10, block_size=16) | BlockMask.global_tokens(100, 4, block_size=16),
        BlockMask.causal(100, block_size=32).restrict(torch.rand(4, 4) > 0.3),
        BlockMask.grat((8, 8), (2, 4), block_size=16),
        BlockMask.dilated(96, 1, 2, causal=True, block_size=16),
        BlockMask.from_topk(torch.randn(2, 3, 4, 5), k=2, block_size=16, seq_lengths=(60, 70)),
    ):
        flex = bm.to_flex()
        assert torch.equal(BlockMask.from_flex(flex).to_dense(), bm.to_dense())
        assert bm.mask_mod is not None  # Flex gets a cheap mask_mod, not a dense lookup
        assert torch.equal(create_mask(flex.mask_mod, *bm.shape), bm.to_dense())


def test_pattern_errors() -> None:
    with pytest.raises(ValueError, match="positive int"):
        BlockMask.causal(0)
    with pytest.raises(ValueError, match="non-negative"):
        BlockMask.sliding_window(10, -1)
    with pytest.raises(ValueError, match="dilation"):
        BlockMask.dilated(10, 1, 0)
    with pytest.raises(ValueError, match="same rank"):
        BlockMask.grat((4, 4), (2,))
    with pytest.raises(ValueError, match="mode"):
        BlockMask.grat((4, 4), (2, 2), mode="diagonal")
    with pytest.raises(ValueError, match="int tensor"):
        BlockMask.document(torch.zeros(4))
