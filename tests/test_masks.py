"""Mask vocabulary: dense helpers, BlockMask conversions (dense, mask_mod, FlexAttention), validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from attnlib.masks import BlockMask, SlidingWindow, causal_mask, normalize_mask, window_mask


def test_causal_mask_bottom_right() -> None:
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_window_mask() -> None:
    m = window_mask(6, left=1, right=2)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(m, (j >= i - 1) & (j <= i + 2))
    assert torch.equal(SlidingWindow(1, 2).dense(6, 6), m)
    with pytest.raises(ValueError, match="non-negative"):
        SlidingWindow(-1, 2)


@pytest.mark.parametrize(("n", "m", "bs"), [(10, 13, 4), (130, 70, 64), (5, 5, 8), (64, 64, 16), (33, 100, (8, 16))])
def test_block_mask_dense_round_trip(n: int, m: int, bs) -> None:
    g = torch.Generator().manual_seed(n * m)
    dense = torch.rand(2, 3, n, m, generator=g) > 0.6
    dense[:, :, :4, :4] = True
    dense[0, 0, -1] = False  # an empty row
    bm = BlockMask.from_dense(dense, bs)
    assert torch.equal(bm.to_dense(), dense)
    assert 0.0 < bm.density() <= 1.0


def test_block_mask_full_and_partial_split() -> None:
    dense = causal_mask(8)
    bm = BlockMask.from_dense(dense, 4)
    partial, full = bm.block_states()
    # diagonal blocks partial, lower block full, upper empty
    assert partial[0, 0].tolist() == [[True, False], [False, True]]
    assert full[0, 0].tolist() == [[False, False], [True, False]]
    assert bm.density() == pytest.approx(3 / 4)


def _doc_mask(b, h, q, kv):
    return (q // 20) == (kv // 20)


@pytest.mark.parametrize("mask_mod", [lambda b, h, q, kv: q >= kv, _doc_mask, lambda b, h, q, kv: (q - kv).abs() <= 5])
@pytest.mark.parametrize(("n", "m", "bs"), [(70, 70, 16), (50, 90, 32)])
def test_block_mask_mask_mod_and_flex_round_trip(mask_mod, n: int, m: int, bs: int) -> None:
    want = create_mask(mask_mod, 1, 1, n, m)
    ours = BlockMask.from_mask_mod(mask_mod, None, None, n, m, bs)
    assert torch.equal(ours.to_dense(), want)
    # to Flex and back
    flex = ours.to_flex()
    assert torch.equal(BlockMask.from_flex(flex).to_dense(), want)
    # a Flex-built mask converts to the same layout
    fb = create_block_mask(mask_mod, 1, 1, n, m, device="cpu", BLOCK_SIZE=bs)
    theirs = BlockMask.from_flex(fb)
    assert torch.equal(theirs.to_dense(), want)
    # same visited blocks; Flex may call a tail block partial where we call it full
    tp, tf = theirs.block_states()
    op, of = ours.block_states()
    assert torch.equal(tp | tf, op | of)
    assert not (of & ~tf & ~tp).any()
    assert theirs.density() == pytest.approx(ours.density())


def test_block_mask_per_head_to_flex_without_mask_mod() -> None:
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 3, 40, 24, generator=g) > 0.5
    bm = BlockMask.from_dense(dense, 8)
    back = BlockMask.from_flex(bm.to_flex())
    assert torch.equal(back.to_dense(), dense)


def test_block_mask_from_dense_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bool"):
        BlockMask.from_dense(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="shape"):
        BlockMask.from_dense(torch.ones(2, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="block_size"):
        BlockMask.from_dense(torch.ones(4, 4, dtype=torch.bool), 0)


def _norm(mask, **kw):
    args = {"causal": False, "batch": 2, "heads": 4, "n": 5, "m": 7, "device": torch.device("cpu")}
    args.update(kw)
    return normalize_mask(mask, **args)


def test_normalize_mask_kinds_and_dense() -> None:
    kp = torch.ones(2, 7, dtype=torch.bool)
    kp[1, 3:] = False
    full = torch.rand(1, 4, 5, 7) > 0.3
    am = _norm([kp, full, SlidingWindow(3, 0)], causal=True)
    assert am.kinds() == ["causal", "key_padding", "full_mask", "window"]
    d = am.dense()
    want = causal_mask(5, 7) & window_mask(5, 7, left=3, right=0) & kp[:, None, None] & full
    assert torch.equal(d, want)
    assert torch.equal(am.dense_rows(2, 4), want[..., 2:4, :])
    assert am.without("causal", "window").kinds() == ["key_padding", "full_mask"]


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(2, 6, dtype=torch.bool), r"key padding of shape \(B, M\) = \(2, 7\)"),
        (torch.ones(2, 7), "bool"),
        (torch.ones(3, 4, 5, 7, dtype=torch.bool), r"\(B\|1, H\|1, N, M\)"),
        (torch.ones(5, 7, 1, dtype=torch.bool), "3-D"),
        ("causal", "got str"),
        (torch.ones(2, 7, dtype=torch.bool, device="meta"), "meta"),
        (BlockMask.from_dense(torch.ones(6, 7, dtype=torch.bool), 4), "does not match"),
    ],
)
def test_normalize_mask_errors(mask, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _norm(mask)


def test_normalize_mask_intersects_repeated_windows_and_block_masks() -> None:
    am = _norm([SlidingWindow(3, None), SlidingWindow(None, 1), SlidingWindow(2, 4)], n=7, m=7)
    assert am.window == SlidingWindow(2, 1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 7, generator=g) > 0.4, torch.rand(7, 7, generator=g) > 0.4
    am = _norm([BlockMask.from_dense(a, 4), BlockMask.from_dense(b, 2)], n=7, m=7)
    assert torch.equal(am.dense()[0, 0], a & b)
