"""Mask vocabulary: dense helpers, BlockMask conversions (dense, mask_mod, FlexAttention), validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import attnlib
from attnlib.functional import reference_attention
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow, causal_mask, normalize_mask, window_mask
from attnlib.testing import assert_close


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
    am = _norm([KeyPadding(kp), full, SlidingWindow(3, 0)], causal=True)
    assert am.kinds() == ["causal", "key_padding", "full_mask", "window"]
    d = am.dense()
    want = causal_mask(5, 7) & window_mask(5, 7, left=3, right=0) & kp[:, None, None] & full
    assert torch.equal(d, want)
    assert torch.equal(am.dense_rows(2, 4), want[..., 2:4, :])
    assert am.without("causal", "window").kinds() == ["key_padding", "full_mask"]
    # the key_padding_mask argument is the same constraint as a KeyPadding item
    am2 = _norm([full, SlidingWindow(3, 0)], causal=True, key_padding_mask=kp)
    assert am2.kinds() == am.kinds() and torch.equal(am2.dense(), want)


_G = torch.Generator().manual_seed(3)


@pytest.mark.parametrize(
    ("shape", "kind"),
    [
        ((5, 7), "full_mask"),  # (N, M), as in SDPA
        ((1, 5, 7), "full_mask"),
        ((2, 1, 5, 7), "full_mask"),
        ((1, 4, 5, 7), "full_mask"),
        ((2, 4, 5, 7), "full_mask"),
        ((1, 1, 5, 1), "full_mask"),  # size-1 M broadcasts: whole query rows
        ((5, 1), "full_mask"),
        ((2, 1, 1, 7), "key_padding"),  # (B, 1, 1, M) is key padding
        ((1, 7), "key_padding"),  # (1, M): one key row for every example
    ],
)
def test_plain_tensor_masks_broadcast_to_bhnm_as_in_sdpa(shape: tuple[int, ...], kind: str) -> None:
    """A plain bool tensor means what SDPA's attn_mask means: broadcast to (B, H, N, M)."""
    t = torch.rand(shape, generator=_G) > 0.4
    am = _norm(t)
    assert am.kinds() == [kind]
    assert torch.equal(am.dense().expand(2, 4, 5, 7), t.expand(2, 4, 5, 7))


def test_two_d_mask_is_queries_by_keys_even_when_batch_equals_n() -> None:
    """B == N: a 2-D mask (N, M) is read as (N, M) as in SDPA, never as key padding (B, M)."""
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2).double()
    x = torch.randn(8, 8, 16, dtype=torch.float64)
    m = (torch.rand(8, 8) > 0.5) | torch.eye(8, dtype=torch.bool)
    q, k, v = attn.project(x)
    want = attn.out_proj(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).flatten(2)
    )
    assert_close(attn(x, mask=m), want)
    assert_close(attn(x, mask=m[None, None]), want)


def test_key_padding_argument_item_and_broadcast_tensor_agree() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    kp = torch.rand(3, 6) > 0.3
    kp[:, 0] = True
    y = attn(x, key_padding_mask=kp)
    assert torch.equal(attn(x, mask=KeyPadding(kp)), y)
    assert torch.equal(attn(x, mask=kp[:, None, None, :]), y)
    q, k, v = attn.project(x)
    ref = reference_attention(q, k, v, mask=kp[:, None, None, :])
    assert_close(y, attn.out_proj(ref.transpose(1, 2).flatten(2)))


@pytest.mark.parametrize(
    ("mask", "kw", "match"),
    [
        (
            torch.ones(2, 7, dtype=torch.bool),
            {},
            r"2-D mask is read as \(N, M\) = \(5, 7\).*key_padding_mask=.*"
            r"KeyPadding.*got shape \(2, 7\), which fits the key-padding reading only",
        ),
        (
            torch.ones(3, 3, dtype=torch.bool),
            {},
            r"2-D mask is read as \(N, M\).*key padding \(B, M\) = \(2, 7\).*"
            r"got shape \(3, 3\), which fits neither",
        ),
        (torch.ones(2, 7), {}, "mask must be a bool tensor.*got dtype torch.float32"),
        (
            torch.ones(3, 4, 5, 7, dtype=torch.bool),
            {},
            r"\(B\|1, H\|1, N, M\) = \(2\|1, 4\|1, 5, 7\).*got shape \(3, 4, 5, 7\)",
        ),
        (torch.ones(2, 5, 7, dtype=torch.bool), {}, r"3-D mask must be \(1, N, M\).*ambiguous.*\(B, 1, N, M\)"),
        (torch.ones(5, 7, 1, 1, 1, dtype=torch.bool), {}, "5-D"),
        ("causal", {}, "got str"),
        (torch.ones(5, 7, dtype=torch.bool, device="meta"), {}, "mask is on meta"),
        (BlockMask.from_dense(torch.ones(6, 7, dtype=torch.bool), 4), {}, "BlockMask shape .* does not match"),
        (KeyPadding(torch.ones(2, 6, dtype=torch.bool)), {}, r"KeyPadding.valid is key padding .* \(2, 7\).*\(2, 6\)"),
        (None, {"key_padding_mask": torch.ones(2, 6, dtype=torch.bool)}, r"key_padding_mask is key padding.*\(2, 6\)"),
        (None, {"key_padding_mask": torch.ones(2, 7)}, "key_padding_mask must be a bool tensor"),
        (None, {"key_padding_mask": [[True] * 7] * 2}, r"key_padding_mask must be a bool tensor \(B, M\)"),
    ],
)
def test_normalize_mask_errors(mask, kw, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _norm(mask, **kw)
    with pytest.raises(ValueError, match="KeyPadding.valid must be a bool tensor"):
        KeyPadding(torch.ones(2, 3, 4, dtype=torch.bool))


def _am(*items, n=8, m=8, causal=False):
    return normalize_mask(list(items), causal=causal, batch=2, heads=2, n=n, m=m, device=torch.device("cpu"))


def test_attention_masks_in_a_list_intersect_in_any_order() -> None:
    """An AttentionMask inside a list ANDs with the rest: it never replaces a window or a BlockMask."""
    am5 = _am(SlidingWindow(5, 5))
    assert _am(SlidingWindow(1, 1), am5).window == SlidingWindow(1, 1)
    assert _am(am5, SlidingWindow(1, 1)).window == SlidingWindow(1, 1)
    causal_blocks = BlockMask.causal(8, block_size=4)
    all_blocks = _am(BlockMask.from_dense(torch.ones(8, 8, dtype=torch.bool), 4))
    for items in ((causal_blocks, all_blocks), (all_blocks, causal_blocks)):
        assert torch.equal(_am(*items).dense()[0, 0], causal_mask(8))
    g = torch.Generator().manual_seed(0)
    parts = [
        _am(KeyPadding(torch.rand(2, 8, generator=g) > 0.3), causal=True),
        _am(torch.rand(2, 1, 8, 8, generator=g) > 0.3, SlidingWindow(3, 2)),
        _am(BlockMask.from_dense(torch.rand(8, 8, generator=g) > 0.3, 4)),
        BlockMask.from_dense(torch.rand(1, 2, 8, 8, generator=g) > 0.2, 2),
        SlidingWindow(None, 4),
        KeyPadding(torch.rand(2, 8, generator=g) > 0.2),
    ]
    want = torch.ones(2, 2, 8, 8, dtype=torch.bool)
    for p in parts:
        want = want & _am(p).dense()
    want = want & causal_mask(8)
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        got = _am(*[parts[i] for i in order]).dense()
        assert torch.equal(got.expand(2, 2, 8, 8), want), order
    with pytest.raises(ValueError, match="AttentionMask built for"):
        _am(_am(n=8, m=7))


def test_normalize_mask_intersects_repeated_windows_and_block_masks() -> None:
    am = _norm([SlidingWindow(3, None), SlidingWindow(None, 1), SlidingWindow(2, 4)], n=7, m=7)
    assert am.window == SlidingWindow(2, 1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 7, generator=g) > 0.4, torch.rand(7, 7, generator=g) > 0.4
    am = _norm([BlockMask.from_dense(a, 4), BlockMask.from_dense(b, 2)], n=7, m=7)
    assert torch.equal(am.dense()[0, 0], a & b)


def test_prefix_lengths_reads_right_padding_once_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Right padding (real keys a prefix) gives its lengths, any other padding None; the answer is
    remembered for the same unchanged tensor (no second read) and recomputed after an in-place edit."""
    from attnlib.masks import padding

    lengths = torch.tensor([7, 0, 3])
    right = torch.arange(7)[None, :] < lengths[:, None]
    assert torch.equal(padding.prefix_lengths(right), lengths)
    holes = right.clone()
    holes[0, 2] = False
    assert padding.prefix_lengths(holes) is None
    assert padding.prefix_lengths(torch.ones(2, 5, dtype=torch.bool)).tolist() == [5, 5]
    reads: list[int] = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **kw: reads.append(1) or real_sum(self, *a, **kw))
    assert torch.equal(padding.prefix_lengths(right), lengths) and reads == []
    right[2, 3] = True  # in place: a new version, read again
    assert torch.equal(padding.prefix_lengths(right), torch.tensor([7, 0, 4])) and reads == [1]
    with torch.inference_mode():  # no version counter: read every time, still right
        inf = torch.arange(4)[None, :] < torch.tensor([[2]])
        assert padding.prefix_lengths(inf).tolist() == [2]
    assert _norm(KeyPadding(holes[:2])).key_lengths() is None
    assert _norm([KeyPadding(right[:2]), KeyPadding(right[:2])], causal=True).key_lengths().tolist() == [7, 0]
    assert _norm(None).key_lengths() is None
