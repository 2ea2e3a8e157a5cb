"""Incremental decoding against the full forward: rotary positions after a KV-cache eviction."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.testing import assert_close


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decoding_after_eviction_keeps_the_original_rotary_positions(kv_heads: int) -> None:
    """Evicting cached keys leaves the next tokens at their true positions: decoding equals the
    full causal forward in which the later queries cannot see the evicted keys."""
    torch.manual_seed(0)
    attn = attnlib.Attention(32, 4, num_kv_heads=kv_heads, causal=True, rope=True).double().eval()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cache = attn.init_cache(2, mode="kv")
    attn(x[:, :8], cache=cache)
    keep = torch.tensor([[0, 2, 3, 5, 7], [1, 2, 4, 6, 7]])
    cache.evict(keep)
    assert (cache.length, cache.size) == (8, 5)
    steps = [attn(x[:, t : t + 1], cache=cache) for t in range(8, 11)]
    allowed = torch.ones(2, 1, 11, 11, dtype=torch.bool).tril()
    for b in range(2):
        gone = [j for j in range(8) if j not in keep[b].tolist()]
        allowed[b, :, 8:, gone] = False
    full = attn(x, mask=allowed)
    assert_close(torch.cat(steps, 1), full[:, 8:], name="decoded after eviction vs full forward")


def test_local_decoding_reads_a_constant_window() -> None:
    """A recompute cache of ``local`` runs its new row over the last window + 1 positions only (its
    causal reach), whatever the prefix length, and equals the full forward."""
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, variant="local", causal=True, window=3).double().eval()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    keys: list[int] = []
    attn.core.register_forward_pre_hook(lambda mod, args: keys.append(args[1].shape[2]))
    cache = attn.init_cache(2)
    with torch.no_grad():
        steps = [attn(x[:, t : t + 1], cache=cache) for t in range(12)]
    assert keys == [min(t + 1, 4) for t in range(12)]
    assert_close(torch.cat(steps, 1), attn(x), atol=1e-12, name="local decoded vs full")
