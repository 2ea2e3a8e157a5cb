"""A table of bad and edge inputs run over every registered variant.

Every bad input must raise ValueError (or attnlib.UnsupportedError, a ValueError) whose message
names the argument at fault - never a TypeError / IndexError / RuntimeError from deep inside
torch, never a silent answer. Every valid edge input must run and give a finite answer of the
right shape (or an UnsupportedError naming the variant, where its capabilities say it cannot).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch

import attnlib
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow
from attnlib.registry import get_variant

B, H, N, M, DIM = 2, 4, 16, 11, 32
F64 = torch.float64


def _x(b: int = B, n: int = N, dim: int = DIM, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(b * 100 + n), dtype=F64).to(dtype)


def _bool(*shape: int, p: float = 0.3) -> torch.Tensor:
    t = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) > p
    return t


def _padding(b: int = B, m: int = N) -> torch.Tensor:
    kp = _bool(b, m)
    kp[:, 0] = True
    return kp


@dataclass(frozen=True)
class Case:
    """One input: ``call(attn)`` runs it; ``names`` (a regex) is what a bad input's message must
    name, None for a valid input; ``n`` is the output length of a valid input."""

    label: str
    call: Callable[[attnlib.Attention], Any]
    names: str | None
    n: int = N


BAD = [
    Case("x 2-D", lambda a: a(torch.randn(N, DIM, dtype=F64)), r"\bx\b"),
    Case("x 4-D", lambda a: a(torch.randn(B, 1, N, DIM, dtype=F64)), r"\bx\b"),
    Case("x last dim", lambda a: a(_x(dim=DIM // 2)), r"\bx\b.*last dim"),
    Case("x N=0", lambda a: a(_x(n=0)), r"\bx\b.*empty"),
    Case("x B=0", lambda a: a(_x(b=0)), r"\bx\b.*empty"),
    Case("x long", lambda a: a(torch.ones(B, N, DIM, dtype=torch.long)), r"\bx\b.*dtype"),
    Case("x float32", lambda a: a(_x(dtype=torch.float32)), r"\bx\b.*dtype"),
    Case("x list", lambda a: a([[0.0] * DIM] * N), r"\bx\b"),
    Case("x None", lambda a: a(None), r"\bx\b"),
    Case("context batch", lambda a: a(_x(), _x(b=3, n=M)), r"context"),
    Case("context dim", lambda a: a(_x(), _x(n=M, dim=DIM // 2)), r"context"),
    Case("context M=0", lambda a: a(_x(), _x(n=0)), r"context"),
    Case("context 2-D", lambda a: a(_x(), torch.randn(M, DIM, dtype=F64)), r"context"),
    Case("context str", lambda a: a(_x(), "context"), r"context"),
    Case("context float32", lambda a: a(_x(), _x(n=M, dtype=torch.float32)), r"context"),
    Case("mask float", lambda a: a(_x(), mask=torch.ones(N, N, dtype=F64)), r"\bmask\b.*bool"),
    Case("mask 0/1 int", lambda a: a(_x(), mask=torch.ones(N, N, dtype=torch.long)), r"\bmask\b.*bool"),
    Case("mask (B, M)", lambda a: a(_x(), mask=_padding()), r"\bmask\b.*key_padding_mask"),
    Case("mask (N, M+1)", lambda a: a(_x(), mask=_bool(N, N + 1)), r"\bmask\b.*\(N, M\)"),
    Case("mask (B, N, M)", lambda a: a(_x(), mask=_bool(B, N, N)), r"\bmask\b.*3-D"),
    Case("mask 5-D", lambda a: a(_x(), mask=_bool(1, 1, 1, N, N)), r"\bmask\b"),
    Case("mask (3, H, N, M)", lambda a: a(_x(), mask=_bool(3, H, N, N)), r"\bmask\b"),
    Case("mask (1, 3, N, M)", lambda a: a(_x(), mask=_bool(1, 3, N, N)), r"\bmask\b"),
    Case("mask str", lambda a: a(_x(), mask="causal"), r"\bmask\b"),
    Case("mask list with an int", lambda a: a(_x(), mask=[None, 3]), r"\bmask\b"),
    Case("mask on meta", lambda a: a(_x(), mask=torch.ones(N, N, dtype=torch.bool, device="meta")), r"\bmask\b"),
    Case("mask BlockMask N", lambda a: a(_x(), mask=BlockMask.causal(N + 4, block_size=4)), r"\bmask\b.*BlockMask"),
    Case("mask KeyPadding B", lambda a: a(_x(), mask=KeyPadding(_padding(b=3))), r"KeyPadding"),
    Case("key_padding_mask (B, N+1)", lambda a: a(_x(), key_padding_mask=_padding(m=N + 1)), r"key_padding_mask"),
    Case(
        "key_padding_mask float", lambda a: a(_x(), key_padding_mask=torch.ones(B, N, dtype=F64)), r"key_padding_mask"
    ),
    Case("key_padding_mask (N, N)", lambda a: a(_x(), key_padding_mask=_bool(N, N)), r"key_padding_mask"),
    Case(
        "key_padding_mask 1-D", lambda a: a(_x(), key_padding_mask=torch.ones(N, dtype=torch.bool)), r"key_padding_mask"
    ),
    Case("key_padding_mask list", lambda a: a(_x(), key_padding_mask=[[True] * N] * B), r"key_padding_mask"),
    Case("position_offset -1", lambda a: a(_x(), position_offset=-1), r"position_offset"),
    Case("position_offset str", lambda a: a(_x(), position_offset="3"), r"position_offset"),
    Case("positions without rope", lambda a: a(_x(), positions=torch.arange(N)), r"positions"),
    Case("weights_query N", lambda a: a(_x(), return_extras=True, weights_query=N), r"weights_query"),
    Case("weights_query str", lambda a: a(_x(), return_extras=True, weights_query="0"), r"weights_query"),
    Case("cache str", lambda a: a(_x(), cache="kv"), r"cache"),
]


def _same(base: Callable[[attnlib.Attention], Any]) -> Callable[[attnlib.Attention], Any]:
    """Run ``base`` and check it equals the unmasked call (for masks that allow every pair)."""

    def run(a: attnlib.Attention) -> torch.Tensor:
        y = base(a)
        torch.testing.assert_close(y, a(_x()), rtol=1e-7, atol=1e-9)
        return y

    return run


def _kp_empty_row() -> torch.Tensor:
    kp = _padding()
    kp[1] = False
    return kp


VALID = [
    Case("N=1", lambda a: a(_x(n=1)), None, n=1),
    Case("B=1", lambda a: a(_x(b=1)), None),
    Case("N=2", lambda a: a(_x(n=2)), None, n=2),
    Case("mask None list", _same(lambda a: a(_x(), mask=[None, [None]])), None),
    Case(
        "all-True key_padding_mask", _same(lambda a: a(_x(), key_padding_mask=torch.ones(B, N, dtype=torch.bool))), None
    ),
    Case("all-True (N, M) mask", _same(lambda a: a(_x(), mask=torch.ones(N, N, dtype=torch.bool))), None),
    Case("key_padding_mask", lambda a: a(_x(), key_padding_mask=_padding()), None),
    Case("key padding with an empty row", lambda a: a(_x(), key_padding_mask=_kp_empty_row()), None),
    Case("(B, 1, 1, M) mask", lambda a: a(_x(), mask=_padding()[:, None, None]), None),
    Case("(1, M) mask", lambda a: a(_x(), mask=_padding(b=1)), None),
    Case("(N, M) mask", lambda a: a(_x(), mask=_bool(N, N) | torch.eye(N, dtype=torch.bool)), None),
    Case("(1, N, M) mask", lambda a: a(_x(), mask=(_bool(N, N) | torch.eye(N, dtype=torch.bool))[None]), None),
    Case("window", lambda a: a(_x(), mask=SlidingWindow(3, 3)), None),
    Case("BlockMask", lambda a: a(_x(), mask=BlockMask.causal(N, block_size=4)), None),
    Case("context M=1", lambda a: a(_x(), _x(n=1)), None),
    Case("context + key padding", lambda a: a(_x(), _x(n=M), key_padding_mask=_padding(m=M)), None),
    Case("large inputs", lambda a: a(_x() * 30), None),
]


@cache
def _module(name: str) -> attnlib.Attention:
    torch.manual_seed(0)
    attn = attnlib.Attention(DIM, H, variant=name, **get_variant(name).conformance_kwargs())
    return attn.to(F64).eval()


def _outcome(name: str, case: Case) -> str | None:
    """None if the variant handled ``case`` as the contract says, else what went wrong."""
    attn = _module(name)
    try:
        with torch.no_grad():
            out = case.call(attn)
    except attnlib.UnsupportedError as err:
        if case.names is None and name not in str(err):
            return f"UnsupportedError without the variant's name: {err}"
        if case.names is not None and not re.search(case.names, str(err)):
            return f"UnsupportedError that does not name /{case.names}/: {err}"
        return None
    except ValueError as err:
        if case.names is None:
            return f"ValueError on a valid input: {err}"
        if not re.search(case.names, str(err)):
            return f"ValueError that does not name /{case.names}/: {err}"
        return None
    except Exception as err:  # any other exception is the finding
        return f"{type(err).__name__}: {str(err)[:200]}"
    if case.names is not None:
        return "ran without an error"
    y = out[0] if isinstance(out, tuple) else out
    if tuple(y.shape) != (B if "B=1" not in case.label else 1, case.n, DIM):
        return f"output shape {tuple(y.shape)}"
    if not torch.isfinite(y).all():
        return "non-finite output"
    return None


@pytest.mark.parametrize("name", attnlib.available())
def test_bad_and_edge_inputs(name: str) -> None:
    problems = [f"{c.label}: {p}" for c in BAD + VALID if (p := _outcome(name, c)) is not None]
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_the_table_is_large_enough() -> None:
    assert len(BAD) + len(VALID) >= 40
