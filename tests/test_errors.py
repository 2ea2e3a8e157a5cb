"""Every malformed input raises ValueError / UnsupportedError with a message saying what was
expected and what was given."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import attnlib
from attnlib import ot
from attnlib.functional import local_attention, softmax_attention
from attnlib.masks import BlockMask, SlidingWindow
from attnlib.registry import get_variant


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


# -- each message names the argument, what was expected and what was given ------------------------

_ONES8 = torch.ones(8, 8, dtype=torch.bool)


def _raise(exc: type[Exception], match: str, fn) -> None:
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("offset", [-5, -1, 1.5, "3", None])
def test_position_offset_must_be_a_non_negative_int(offset) -> None:
    attn = attnlib.Attention(16, 2, rope=True)
    for n in (1, 4, 8):  # N <= |offset| silently wrapped the rotary tables, N > |offset| failed in a reshape
        _raise(
            ValueError,
            rf"position_offset must be a non-negative int.*got {re.escape(repr(offset))}",
            lambda n=n: attn(torch.randn(2, n, 16), position_offset=offset),
        )


@pytest.mark.parametrize("block_size", [2.5, (4,), "4", (4, 4, 4), True, 0, (4, 0), (4, 2.0), None])
def test_block_size_is_an_int_or_a_pair_of_ints(block_size) -> None:
    _raise(
        ValueError,
        rf"BlockMask.from_dense: block_size must be a positive int or a pair of positive ints.*"
        rf"got {re.escape(repr(block_size))}",
        lambda: BlockMask.from_dense(_ONES8, block_size),
    )


@pytest.mark.parametrize("flex_mask", [None, _ONES8, "causal"])
def test_from_flex_needs_a_flex_block_mask(flex_mask) -> None:
    _raise(
        ValueError,
        r"BlockMask.from_flex: flex_mask must be a torch.nn.attention.flex_attention.BlockMask.*got "
        + ("tensor" if isinstance(flex_mask, torch.Tensor) else type(flex_mask).__name__),
        lambda: BlockMask.from_flex(flex_mask),
    )


@pytest.mark.parametrize(
    ("mask_mod", "match"),
    [
        (lambda b, h, q, kv: torch.ones(3, dtype=torch.bool), r"\(1, 1, 4, 8\) here; calling it failed"),
        (lambda b, h, q, kv: None, r"\(1, 1, 4, 8\) here; calling it failed"),
        (lambda b, h, q, kv: (q >= kv)[None].expand(2, 1, 1, 4, 8), r"\(1, 1, 4, 8\) here"),
        (lambda b, h, q, kv: torch.ones(2, 1, 4, 8, dtype=torch.bool), r"\(1, 1, 4, 8\) here"),
        ("causal", "mask_mod must be a function"),
    ],
)
def test_from_mask_mod_result_of_the_wrong_shape(mask_mod, match: str) -> None:
    _raise(
        ValueError,
        "BlockMask.from_mask_mod: .*" + match,
        lambda: BlockMask.from_mask_mod(mask_mod, None, None, 8, 8, 4),
    )


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda: ot.gromov_wasserstein(torch.rand(2, 3, 3), torch.rand(4, 5, 5)), r"gromov_wasserstein: cx .* and cy"),
        (lambda: ot.gromov_wasserstein(torch.rand(3, 3), torch.rand(3, 4)), r"gromov_wasserstein: cy must be"),
        (lambda: ot.transport_cost(torch.rand(3, 4), torch.rand(4, 3)), r"cost \(3, 4\) and plan \(4, 3\)"),
        (lambda: ot.transport_cost(torch.rand(3, 4), torch.rand(1, 4)), r"cost \(3, 4\) and plan \(1, 4\)"),
        (lambda: ot.transport_cost(torch.rand(2, 3, 4), torch.rand(5, 3, 4)), r"cost \(2, 3, 4\) and plan \(5, 3, 4\)"),
        (lambda: ot.transport_cost(torch.rand(3, 4), torch.rand(4)), r"transport_cost: plan must be a tensor"),
    ],
)
def test_ot_shapes_that_do_not_match(fn, match: str) -> None:
    _raise(ValueError, match, fn)


def _cost_with(value: float) -> torch.Tensor:
    c = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    c[1, 0, 2] = value
    return c


@pytest.mark.parametrize("solver", ["sinkhorn", "ipot"])
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((_cost_with(float("inf")),), r"cost must be finite on the real pairs, got inf at index \(1, 0, 2\)"),
        ((_cost_with(float("-inf")),), r"cost must be finite on the real pairs, got -inf at index \(1, 0, 2\)"),
        ((_cost_with(float("nan")),), r"cost must be finite on the real pairs, got nan"),
        (
            (torch.rand(2, 3, 4), torch.zeros(2, 3), torch.full((2, 4), 0.25)),
            r"a has zero total mass.*\[\(0,\), \(1,\)\]",
        ),
        ((torch.rand(2, 3, 4), None, torch.tensor([[0.25] * 4, [0.0] * 4])), r"b has zero total mass.*\[\(1,\)\]"),
    ],
)
def test_ot_solvers_refuse_infinite_costs_and_massless_marginals(solver: str, args, match: str) -> None:
    _raise(ValueError, f"{solver}: {match}", lambda: getattr(ot, solver)(*args))


def test_ot_solvers_still_accept_masked_infinite_pairs_and_padded_examples() -> None:
    """Non-finite costs on padded points and examples padded through a_mask are fine."""
    c = _cost_with(float("inf"))
    a_mask = torch.ones(2, 3, dtype=torch.bool)
    a_mask[1, 0] = False
    plan = ot.sinkhorn(c, a_mask=a_mask)
    assert torch.isfinite(plan).all() and torch.equal(plan[1, 0], torch.zeros(4))
    a = torch.tensor([[0.0] * 3, [1 / 3] * 3])
    plan = ot.ipot(torch.rand(2, 3, 4), a, a_mask=torch.tensor([[False] * 3, [True] * 3]))
    assert torch.equal(plan[0], torch.zeros(3, 4)) and torch.isfinite(plan).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": 16}, r"grat: grid must be None \(1-D: the sequence itself\) or the token grid .* got 16"),
        ({"grid": "16x16"}, r"grat: grid must be None .* got '16x16'"),
        ({"grid": (4, 0), "group": (2, 2)}, r"grat: grid entry must be a positive int, got 0"),
        ({"group": "4"}, r"grat: group must be a positive int .* got '4'"),
        ({"group": (2, 2)}, "without a grid"),
    ],
)
def test_grat_grid_and_group(kwargs, match: str) -> None:
    _raise(ValueError, match, lambda: attnlib.Attention(16, 2, variant="grat", **kwargs))


_SCALED = [n for n in attnlib.available() if "scale" in inspect.signature(get_variant(n).__init__).parameters]


def test_every_variant_with_a_logit_scale_is_listed() -> None:
    assert {"softmax", "local", "entmax", "block_sparse", "grat", "seer", "sinkhorn", "lsa"} <= set(_SCALED)


@pytest.mark.parametrize("name", _SCALED)
@pytest.mark.parametrize("scale", ["a", -1.0, 0, float("nan"), True])
def test_scale_is_checked_at_construction(name: str, scale) -> None:
    kwargs = get_variant(name).conformance_kwargs()
    _raise(
        ValueError,
        rf"{name}: scale must be a positive number, got {re.escape(repr(scale))}",
        lambda: attnlib.Attention(16, 2, variant=name, scale=scale, **kwargs),
    )
    attnlib.Attention(16, 2, variant=name, scale=0.5, **kwargs)  # a valid scale is accepted
