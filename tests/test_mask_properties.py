"""Property-based tests of the mask vocabulary (hypothesis, bounded, derandomized).

A random list of masks - dense (N, M) and (B|1, H|1, N, M) tensors, key padding (the
``KeyPadding`` item, the ``key_padding_mask`` argument and a (B, 1, 1, M) tensor), sliding
windows, BlockMasks (from dense masks and from top-k block scores), already normalised
``AttentionMask`` s and the causal flag - normalised in a random order equals the AND of the
dense forms of its items; exact softmax attention under the list equals a float64 softmax
computed here under that AND.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlib.functional import softmax_attention
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow, causal_mask, normalize_mask, window_mask
from attnlib.testing import make_qkv

CPU = torch.device("cpu")
SETTINGS = settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _bools(gen: torch.Generator, *shape: int) -> torch.Tensor:
    p = float(torch.rand((), generator=gen)) * 0.8  # density from 0.2 to 1
    return torch.rand(shape, generator=gen) > p


@st.composite
def mask_item(draw: st.DrawFn, b: int, h: int, n: int, m: int, nested: bool = True) -> tuple[object, torch.Tensor]:
    """One mask item and its dense form (B, H, N, M), computed without normalize_mask."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kinds = ["nm", "bhnm", "key_padding", "b11m", "window", "block_dense", "block_topk"]
    kind = draw(st.sampled_from([*kinds, "attention_mask"] if nested else kinds))
    full = (b, h, n, m)
    if kind == "nm":
        t = _bools(gen, n, m)
        return t, t.expand(full)
    if kind == "bhnm":
        t = _bools(gen, draw(st.sampled_from([1, b])), draw(st.sampled_from([1, h])), n, m)
        return t, t.expand(full)
    if kind in ("key_padding", "b11m"):
        kp = _bools(gen, b, m)
        item = KeyPadding(kp) if kind == "key_padding" else kp[:, None, None, :]
        return item, kp[:, None, None, :].expand(full)
    if kind == "window":
        left = draw(st.one_of(st.none(), st.integers(0, n)))
        right = draw(st.one_of(st.none(), st.integers(0, n)))
        return SlidingWindow(left, right), window_mask(n, m, left=left, right=right).expand(full)
    bs = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    bb, hh = draw(st.sampled_from([1, b])), draw(st.sampled_from([1, h]))
    if kind == "block_dense":
        bm = BlockMask.from_dense(_bools(gen, bb, hh, n, m), bs)
        return bm, bm.to_dense().expand(full)
    if kind == "block_topk":
        nq, nk = math.ceil(n / bs[0]), math.ceil(m / bs[1])
        scores = torch.randn(bb, hh, nq, nk, generator=gen)
        bm = BlockMask.from_topk(scores, draw(st.integers(1, nk)), block_size=bs, seq_lengths=(n, m))
        return bm, bm.to_dense().expand(full)
    # an AttentionMask normalised from a few items of its own (and its own causal flag)
    parts = draw(st.lists(mask_item(b, h, n, m, nested=False), min_size=1, max_size=3))
    causal = draw(st.booleans())
    am = normalize_mask([p for p, _ in parts], causal=causal, batch=b, heads=h, n=n, m=m, device=CPU)
    dense = torch.ones(full, dtype=torch.bool)
    for _, d in parts:
        dense = dense & d
    return am, dense & causal_mask(n, m) if causal else dense


@st.composite
def mask_case(draw: st.DrawFn) -> dict:
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, m = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    items = draw(st.lists(mask_item(b, h, n, m), min_size=0, max_size=5))
    order = draw(st.permutations(range(len(items))))
    causal = draw(st.booleans())
    kp_arg = draw(st.booleans())
    want = torch.ones(b, h, n, m, dtype=torch.bool)
    for _, d in items:
        want = want & d
    if causal:
        want = want & causal_mask(n, m)
    key_padding_mask = None
    if kp_arg:
        key_padding_mask = _bools(torch.Generator().manual_seed(draw(st.integers(0, 999))), b, m)
        want = want & key_padding_mask[:, None, None, :]
    return {
        "size": {"batch": b, "heads": h, "n": n, "m": m, "device": CPU},
        "mask": [items[i][0] for i in order],
        "causal": causal,
        "key_padding_mask": key_padding_mask,
        "want": want,
    }


def _normalize(case: dict):
    return normalize_mask(
        case["mask"], causal=case["causal"], key_padding_mask=case["key_padding_mask"], **case["size"]
    )


@SETTINGS
@given(mask_case())
def test_a_mask_list_in_any_order_is_the_and_of_its_dense_forms(case: dict) -> None:
    am = _normalize(case)
    s = case["size"]
    full = (s["batch"], s["heads"], s["n"], s["m"])
    dense = am.dense()
    got = torch.ones(full, dtype=torch.bool) if dense is None else dense.expand(full)
    assert torch.equal(got, case["want"])
    bm = am.as_block_mask((3, 5))  # the layout the block-sparse route runs on
    assert torch.equal(torch.ones(full, dtype=torch.bool) if bm is None else bm.to_dense().expand(full), case["want"])
    rows = am.dense_rows(s["n"] // 3, s["n"])  # the rows chunked paths read
    if rows is not None:
        assert torch.equal(rows.expand(*full[:2], *rows.shape[2:]), case["want"][:, :, s["n"] // 3 :])


def _softmax_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the allowed pairs, rows with none -> 0 (float64, by hand)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0))
    den = w.sum(-1, keepdim=True)
    return torch.where(den > 0, w / torch.where(den > 0, den, 1.0), 0.0) @ v


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@SETTINGS
@given(case=mask_case())
def test_softmax_under_a_mask_list_equals_float64_softmax_under_the_and(backend: str, case: dict) -> None:
    s = case["size"]
    q, k, v = make_qkv(s["batch"], s["heads"], s["n"], 8, m=s["m"], dtype=torch.float64, logit_scale=3.0, seed=1)
    mask = case["mask"]
    if case["key_padding_mask"] is not None:
        mask = [*mask, KeyPadding(case["key_padding_mask"])]
    out = softmax_attention(q, k, v, mask=mask, causal=case["causal"], backend=backend)
    torch.testing.assert_close(out, _softmax_float64(q, k, v, case["want"]), rtol=0, atol=1e-12)
