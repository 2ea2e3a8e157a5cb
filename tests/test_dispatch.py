"""attnlib.dispatch: the machine / backend rules that pick a code path (never what is computed)."""

from __future__ import annotations

import pytest
import torch

from attnlib import dispatch
from attnlib.functional import reference_attention, softmax_attention
from attnlib.masks import BlockMask
from attnlib.testing import make_qkv

CPU, META = torch.device("cpu"), torch.device("meta")


def test_short_cpu_rules() -> None:
    assert dispatch.softmax_rows_explicit(dispatch.SHORT_ROW - 1, CPU)
    assert not dispatch.softmax_rows_explicit(dispatch.SHORT_ROW, CPU)
    assert not dispatch.softmax_rows_explicit(1, META)
    assert dispatch.few_keys_explicit(dispatch.FEW_KEYS - 1, CPU)
    assert not dispatch.few_keys_explicit(dispatch.FEW_KEYS, CPU)
    assert not dispatch.few_keys_explicit(1, META)
    assert dispatch.cpu_vector_width() in (4, 8, 16)


@pytest.mark.parametrize(
    ("backend", "weights", "block", "dropout", "want"),
    [
        ("auto", True, True, 0.0, "math"),
        ("auto", False, True, 0.0, "block_sparse"),
        ("auto", False, True, 0.1, "sdpa"),
        ("auto", False, False, 0.0, "sdpa"),
        ("flex", False, True, 0.0, "flex"),
        ("math", False, False, 0.1, "math"),
    ],
)
def test_softmax_backend_resolves_auto_only(
    backend: str, weights: bool, block: bool, dropout: float, want: str
) -> None:
    assert dispatch.softmax_backend(backend, return_weights=weights, block_mask=block, dropout_p=dropout) == want


def test_block_rules() -> None:
    assert dispatch.block_layout_as_dense(BlockMask.sliding_window(17, 256, block_size=128))
    assert not dispatch.block_layout_as_dense(BlockMask.sliding_window(40, 8, block_size=16))
    assert not dispatch.triton_preferred(CPU)
    assert dispatch.triton_preferred(torch.device("cuda", 0))
    assert dispatch.fused_cpu_block_parts(CPU, 16, 16)
    assert not dispatch.fused_cpu_block_parts(CPU, 16, 8)
    assert not dispatch.fused_cpu_block_parts(META, 16, 16)


@pytest.mark.parametrize("m", [dispatch.FEW_KEYS - 1, dispatch.SHORT_ROW - 1, 2 * dispatch.cpu_vector_width() - 2])
def test_every_rule_choice_gives_the_reference(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flipping the CPU rules changes the path, not the result."""
    q, k, v = make_qkv(2, 4, 5, 16, m=m, h_kv=2, logit_scale=3.0, dtype=torch.float32, seed=m)
    ref = reference_attention(q, k, v).float()
    for explicit in (True, False):
        monkeypatch.setattr(dispatch, "softmax_rows_explicit", lambda m, device, e=explicit: e)
        monkeypatch.setattr(dispatch, "cpu_key_padding", lambda m, device, dtype, e=explicit: 3 if e else 0)
        for backend in ("math", "sdpa"):
            out = softmax_attention(q, k, v, backend=backend)  # type: ignore[arg-type]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
