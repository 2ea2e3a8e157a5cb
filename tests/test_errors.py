"""Every malformed input raises ValueError / UnsupportedError with a message saying what was
expected and what was given."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.functional import local_attention, softmax_attention
from attnlib.masks import BlockMask, SlidingWindow


@pytest.fixture
def attn() -> attnlib.Attention:
    return attnlib.Attention(32, 4)


def test_wrong_rank(attn: attnlib.Attention) -> None:
    with pytest.raises(ValueError, match=r"x must be a \(B, N, dim=32\) tensor, got tensor of shape \(5, 32\)"):
        attn(torch.randn(5, 32))
    with pytest.raises(ValueError, match="4 dims"):
        softmax_attention(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def test_wrong_last_dim(attn: attnlib.Attention) -> None:
    with pytest.raises(ValueError, match=r"last dim 32, got shape \(2, 5, 16\)"):
        attn(torch.randn(2, 5, 16))


def test_dim_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="dim=30, num_heads=4"):
        attnlib.Attention(30, 4)


def test_heads_not_divisible_by_kv_heads() -> None:
    with pytest.raises(ValueError, match="num_heads=4, num_kv_heads=3"):
        attnlib.Attention(32, 4, num_kv_heads=3)
    q = torch.randn(1, 4, 5, 8)
    kv = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="H=4 must be a multiple of key/value heads H_kv=3"):
        softmax_attention(q, kv, kv)


def test_non_positive_sizes() -> None:
    for kw in ({"dim": 0, "num_heads": 1}, {"dim": 8, "num_heads": -2}):
        with pytest.raises(ValueError, match="positive int"):
            attnlib.Attention(**kw)


def test_batch_mismatch(attn: attnlib.Attention) -> None:
    with pytest.raises(ValueError, match="x has B=2 but context has B=3"):
        attn(torch.randn(2, 5, 32), torch.randn(3, 7, 32))
    with pytest.raises(ValueError, match="batch sizes differ"):
        softmax_attention(torch.randn(2, 4, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8))


def test_mask_shape_and_dtype(attn: attnlib.Attention) -> None:
    x = torch.randn(2, 5, 32)
    with pytest.raises(
        ValueError, match=r"key_padding_mask is key padding of shape \(B, M\) = \(2, 5\).*got shape \(2, 6\)"
    ):
        attn(x, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"2-D mask is read as \(N, M\) = \(5, 5\).*key padding \(B, M\) = \(2, 5\)"):
        attn(x, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor.*got dtype torch.float32"):
        attn(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\(B\|1, H\|1, N, M\)"):
        attn(x, mask=torch.ones(2, 4, 5, 4, dtype=torch.bool))


def test_unsupported_mask_names_variant_and_mask() -> None:
    local = attnlib.Attention(32, 4, variant="local", window=2)
    bm = BlockMask.from_dense(torch.ones(5, 5, dtype=torch.bool), 4)
    with pytest.raises(attnlib.UnsupportedError, match="variant 'local' does not support a BlockMask"):
        local(torch.randn(2, 5, 32), mask=bm)
    with pytest.raises(attnlib.UnsupportedError, match="'local' does not support a SlidingWindow"):
        local(torch.randn(2, 5, 32), mask=SlidingWindow(1, 1))
    assert issubclass(attnlib.UnsupportedError, ValueError)


def test_cross_attention_where_unsupported() -> None:
    local = attnlib.Attention(32, 4, variant="local", window=2)
    with pytest.raises(attnlib.UnsupportedError, match="'local' does not support cross-attention"):
        local(torch.randn(2, 5, 32), torch.randn(2, 7, 32))


def test_dtype_and_device_mismatch(attn: attnlib.Attention) -> None:
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the module's parameters are torch.float32"):
        attn(torch.randn(2, 5, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="x and context must share dtype"):
        attn.double()(torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32))
    attn.float()
    with pytest.raises(ValueError, match="mask is on meta but the inputs are on cpu"):
        attn(torch.randn(2, 5, 32), mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        softmax_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4).double(), torch.randn(1, 1, 2, 4))


def test_empty_sequence(attn: attnlib.Attention) -> None:
    with pytest.raises(ValueError, match=r"x is empty: shape \(2, 0, 32\)"):
        attn(torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="context is empty"):
        attn(torch.randn(2, 3, 32), torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="empty sequence: N=0"):
        softmax_attention(torch.randn(1, 1, 0, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))


def test_unknown_variant_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown attention variant 'sofmax'; did you mean 'softmax'"):
        attnlib.Attention(32, 4, variant="sofmax")
    with pytest.raises(ValueError, match="Registered variants: .*local"):
        attnlib.variant_info("nope")


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window(window) -> None:
    with pytest.raises(ValueError, match="window must be a positive int"):
        attnlib.Attention(32, 4, variant="local", window=window)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="window must be a positive int"):
        local_attention(q, q, q, window)


def test_local_rejects_cross_lengths() -> None:
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 6, 8)
    with pytest.raises(ValueError, match="N and M must be equal, got N=4, M=6"):
        local_attention(q, k, k, 2)


def test_bad_dropout_and_backend() -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        attnlib.Attention(32, 4, dropout=1.5)
    with pytest.raises(ValueError, match="backend must be"):
        attnlib.Attention(32, 4, backend="cuda")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(attnlib.UnsupportedError, match="cannot return weights"):
        softmax_attention(q, q, q, backend="sdpa", return_weights=True)


def test_unknown_variant_kwarg_lists_accepted_options() -> None:
    with pytest.raises(ValueError, match=r"'local' got unknown option\(s\) \['windw'\]; it accepts: window"):
        attnlib.Attention(32, 4, variant="local", windw=3)


def test_rope_with_context_is_unsupported() -> None:
    a = attnlib.Attention(32, 4, rope=True)
    with pytest.raises(attnlib.UnsupportedError, match="rope=True is for self-attention"):
        a(torch.randn(1, 3, 32), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="even head_dim"):
        attnlib.Attention(12, 4, rope=True)
