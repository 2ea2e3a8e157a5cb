"""The mask predicates (attnlib.masks.predicates) against direct constructions, and every form
derived from them: dense rows, block layouts (from_mask_mod, from_dense, the patterns) and Flex."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from attnlib.functional.grat import grat_permutation
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow, normalize_mask
from attnlib.masks.predicates import (
    and_mod,
    band_blocks,
    causal_mask,
    causal_mod,
    dense_mod,
    evaluate_rows,
    key_padding_mod,
    or_mod,
    permuted_mod,
    true_mod,
    window_mask,
    window_mod,
)

NM = [(1, 1), (5, 5), (4, 9), (9, 4), (13, 13), (1, 7), (7, 1)]
RADII = [None, 0, 1, 3]


def _dense(mod, n: int, m: int, **kw) -> torch.Tensor:
    return evaluate_rows(mod, 0, n, m, **kw)


def _loop_window(n: int, m: int, left: int | None, right: int | None) -> torch.Tensor:
    """The window rule written out pair by pair (bottom-right aligned)."""
    out = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        p = i + m - n
        for j in range(m):
            out[i, j] = (left is None or j >= p - left) and (right is None or j <= p + right)
    return out


@pytest.mark.parametrize(("n", "m"), NM)
def test_causal_predicate_is_the_offset_lower_triangle(n: int, m: int) -> None:
    want = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    assert torch.equal(_dense(causal_mod(n, m), n, m)[0, 0], want)
    assert torch.equal(causal_mask(n, m), want)
    if n == m:
        assert torch.equal(causal_mask(n), torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize(("n", "m"), NM)
@pytest.mark.parametrize(("left", "right"), list(itertools.product(RADII, RADII)))
def test_window_predicate_equals_the_pairwise_rule(n: int, m: int, left, right) -> None:
    want = _loop_window(n, m, left, right)
    got = _dense(window_mod(left, right, n, m), n, m)
    assert got.shape[-2:] == (n, m)
    assert torch.equal(got.expand(1, 1, n, m)[0, 0], want)
    assert torch.equal(window_mask(n, m, left=left, right=right), want)
    assert torch.equal(SlidingWindow(left, right).dense(n, m), want)


def test_bottom_right_alignment_of_a_decode_step() -> None:
    # one query after a cache of 6 keys sees all of them (causal) / the last 3 (window left=2)
    assert causal_mask(1, 7).tolist() == [[True] * 7]
    assert window_mask(1, 7, left=2, right=0).tolist() == [[False] * 4 + [True] * 3]
    # more queries than keys: the first N - M rows see nothing under causal
    assert causal_mask(4, 2).tolist() == [[False, False], [False, False], [True, False], [True, True]]


def test_key_padding_and_dense_lookups_broadcast() -> None:
    g = torch.Generator().manual_seed(0)
    kp = torch.rand(3, 6, generator=g) > 0.4
    got = _dense(key_padding_mod(kp), 5, 6, batch=3, heads=2)
    assert torch.equal(got.expand(3, 2, 5, 6), kp[:, None, None, :].expand(3, 2, 5, 6))
    full = torch.rand(1, 2, 5, 6, generator=g) > 0.5  # shared over the batch
    got = _dense(dense_mod(full), 5, 6, batch=3, heads=2, expand=True)
    assert torch.equal(got, full.expand(3, 2, 5, 6))
    assert torch.equal(_dense(dense_mod(full[0, 0]), 5, 6)[0, 0], full[0, 0])  # a 2-D (N, M) mask
    # block granularity: one entry per (query block, key block)
    blocks = torch.rand(2, 1, 3, 2, generator=g) > 0.5
    want = blocks.repeat_interleave(4, -2).repeat_interleave(3, -1)[..., :10, :5]
    got = _dense(dense_mod(blocks, (4, 3)), 10, 5, batch=2, heads=3, expand=True)
    assert torch.equal(got, want.expand(2, 3, 10, 5))
    with pytest.raises(ValueError, match="dense_mod"):
        dense_mod(torch.ones(2, 3, 4, dtype=torch.bool))


def test_combinators_and_permutation() -> None:
    n, m = 7, 9
    c, w = causal_mod(n, m), window_mod(2, 1, n, m)
    dc, dw = causal_mask(n, m), window_mask(n, m, left=2, right=1)
    assert torch.equal(_dense(and_mod(c, w), n, m)[0, 0], dc & dw)
    assert torch.equal(_dense(or_mod(c, w), n, m)[0, 0], dc | dw)
    assert and_mod(c) is c and or_mod(w) is w
    assert bool(_dense(and_mod(), n, m).all()) and bool(_dense(true_mod, n, m).all())
    with pytest.raises(ValueError, match="at least one"):
        or_mod()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    square = causal_mask(n)
    got = _dense(permuted_mod(causal_mod(n), perm), n, n)[0, 0]
    assert torch.equal(got, square[perm][:, perm])


def _brute_blocks(dense: torch.Tensor, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any allowed, all in-range allowed) per block, from the dense mask."""
    n, m = dense.shape
    nq, nk = -(-n // bq), -(-m // bk)
    some = torch.zeros(nq, nk, dtype=torch.bool)
    every = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            tile = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            some[i, j], every[i, j] = bool(tile.any()), bool(tile.all())
    return some, every


@pytest.mark.parametrize(("n", "m", "bs"), [(13, 13, (4, 4)), (9, 21, (4, 8)), (21, 9, (8, 4)), (5, 5, (8, 8))])
@pytest.mark.parametrize(("left", "right"), [(None, 0), (2, 2), (5, 0), (None, 3), (0, None), (None, None), (1, 6)])
def test_band_block_classification_is_exact(n: int, m: int, bs, left, right) -> None:
    maybe, sure = band_blocks(left, right, n, m, bs)
    some, every = _brute_blocks(_loop_window(n, m, left, right), *bs)
    assert torch.equal(maybe, some)
    assert torch.equal(sure, every)


def _same_layout(a: BlockMask, b: BlockMask) -> None:
    assert torch.equal(a.to_dense(), b.to_dense())
    pa, fa = a.block_states()
    pb, fb = b.block_states()
    assert torch.equal(pa, pb) and torch.equal(fa, fb), "same pairs but different block states"


@pytest.mark.parametrize(("n", "m", "bs"), [(37, 37, 8), (40, 53, (8, 16)), (53, 40, 16), (3, 70, 16)])
def test_layouts_from_the_predicate_equal_from_dense_and_the_patterns(n: int, m: int, bs) -> None:
    cases = [
        (causal_mod(n, m), causal_mask(n, m), BlockMask.causal(n, m, block_size=bs)),
        (
            window_mod(4, 4, n, m),
            window_mask(n, m, left=4, right=4),
            BlockMask.sliding_window(n, 4, M=m, block_size=bs),
        ),
        (
            window_mod(6, 0, n, m),
            window_mask(n, m, left=6, right=0),
            BlockMask.sliding_window(n, 6, M=m, causal=True, block_size=bs),
        ),
        (true_mod, torch.ones(n, m, dtype=torch.bool), BlockMask.all_blocks(n, m, block_size=bs)),
    ]
    for mod, dense, pattern in cases:
        from_mod = BlockMask.from_mask_mod(mod, None, None, n, m, bs)
        _same_layout(from_mod, BlockMask.from_dense(dense, bs))
        _same_layout(from_mod, pattern)


def test_all_blocks_is_every_block_full_and_shared() -> None:
    bm = BlockMask.all_blocks(30, 45, block_size=(8, 16))
    partial, full = bm.block_states()
    assert not partial.any() and full.all() and bm.all_full()
    assert BlockMask.all_blocks(30, 45, block_size=(8, 16)) is bm  # built once per shape


def test_longformer_is_window_or_global() -> None:
    n, bs = 50, 8
    want = window_mask(n, left=3, right=3) | (torch.arange(n)[:, None] < 2) | (torch.arange(n)[None, :] < 2)
    assert torch.equal(BlockMask.longformer(n, 3, 2, block_size=bs).to_dense()[0, 0], want)


def test_block_mask_to_flex_round_trips() -> None:
    for bm in (
        BlockMask.causal(40, 56, block_size=16),
        BlockMask.sliding_window(45, 5, block_size=8),
        BlockMask.from_key_padding(
            torch.rand(2, 30, generator=torch.Generator().manual_seed(2)) > 0.3, 20, block_size=8
        ),
        BlockMask.from_dense(torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(3)) > 0.5, 8),
        BlockMask.document(torch.tensor([0] * 7 + [1] * 12 + [2] * 5), causal=True, block_size=8),
    ):
        dense = bm.to_dense()
        flex = bm.to_flex()
        assert torch.equal(BlockMask.from_flex(flex).to_dense(), dense)
        assert torch.equal(create_mask(flex.mask_mod, *bm.shape), dense)


def test_attention_mask_rows_and_flex_come_from_the_predicates() -> None:
    g = torch.Generator().manual_seed(4)
    b, h, n, m = 2, 3, 11, 14
    kp = torch.rand(b, m, generator=g) > 0.2
    full = torch.rand(1, h, n, m, generator=g) > 0.3
    blk = BlockMask.from_dense(torch.rand(b, 1, n, m, generator=g) > 0.2, 4)
    am = normalize_mask(
        [KeyPadding(kp), full, SlidingWindow(4, 2), blk],
        causal=True,
        batch=b,
        heads=h,
        n=n,
        m=m,
        device=torch.device("cpu"),
    )
    want = causal_mask(n, m) & window_mask(n, m, left=4, right=2) & kp[:, None, None, :] & full & blk.to_dense()
    assert torch.equal(am.dense().expand(b, h, n, m), want)
    assert torch.equal(am.dense_rows(3, 8).expand(b, h, 5, m), want[..., 3:8, :])
    assert torch.equal(_dense(am.mask_mod(), n, m, batch=b, heads=h, expand=True), want)
    flex = am.to_flex()
    assert torch.equal(create_mask(flex.mask_mod, b, h, n, m), want)
    assert torch.equal(BlockMask.from_flex(flex).to_dense().expand(b, h, n, m), want)
    empty = normalize_mask(None, causal=False, batch=b, heads=h, n=n, m=m, device=torch.device("cpu"))
    assert empty.mask_mod() is None and empty.to_flex() is None and empty.dense_rows(0, n) is None


def test_grat_permutation_alias_is_deprecated() -> None:
    import attnlib.masks

    with pytest.warns(DeprecationWarning, match="attnlib.functional.grat"):
        alias = attnlib.masks.grat_permutation
    assert alias is grat_permutation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_name"):
            attnlib.masks.no_such_name  # noqa: B018
