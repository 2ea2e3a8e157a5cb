"""torch.compile: block_sparse splits a causal call into at most 2 graphs; compiled models equal eager."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.models import DecoderLM

BLOCK = {"pattern": "sliding_window", "block_size": 16, "window": 16}


def test_block_sparse_causal_call_has_at_most_two_graphs():
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 2, "block_sparse", causal=True, **BLOCK).eval()
    x = torch.randn(1, 48, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(attn)(x)
        assert ex.graph_count <= 2, [str(r.reason)[:80] for r in ex.break_reasons]


@pytest.mark.parametrize(("variant", "kwargs"), [("block_sparse", BLOCK), ("linear", {})])
def test_compiled_decoder_lm_equals_eager(variant, kwargs):
    torch.manual_seed(0)
    lm = DecoderLM(attention={"variant": variant, **kwargs}, vocab_size=20, dim=32, depth=1, num_heads=2).eval()
    ids = torch.randint(0, 20, (1, 40), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.allclose(torch.compile(lm, backend="eager")(ids), lm(ids), atol=1e-5)
