"""Recurrent decoding: ``initial_state`` + ``step`` token by token equals the causal parallel form.

Parametrised over every registered variant that declares ``capabilities.recurrent``.
"""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.errors import UnsupportedError
from attnlib.masks import normalize_mask
from attnlib.registry import get_variant
from attnlib.testing import make_qkv, rel_error

RECURRENT = [n for n in attnlib.available() if attnlib.variant_info(n).recurrent]
B, H, N, D = 2, 3, 21, 8

# extra constructor arguments so that step and parallel forms are defined identically
STEP_KWARGS: dict[str, dict] = {"cosformer": {"max_len": 40}}


def _core(name: str, **kw):
    torch.manual_seed(0)
    cls = get_variant(name)
    kwargs = {**cls.conformance_kwargs(), **STEP_KWARGS.get(name, {}), **kw}
    return cls(num_heads=H, head_dim=D, **kwargs).double().eval()


def _run_steps(core, q, k, v):
    state = core.initial_state(B, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(q.shape[2]):
        o, state = core.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(o)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("name", RECURRENT)
def test_step_equals_causal_parallel(name: str) -> None:
    core = _core(name).eval()
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float64, logit_scale=3.0, seed=11)
    am = normalize_mask(None, causal=True, batch=B, heads=H, n=N, m=N, device=torch.device("cpu"))
    par = core(q, k, v, am).out
    seq = _run_steps(core, q, k, v)
    torch.testing.assert_close(seq, par, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "performer", "flow", "aft_simple", "aft_local"])
def test_step_in_float32_and_half_state(name: str) -> None:
    """bf16 inputs decode with an fp32 state and stay close to the float64 parallel output."""
    core = _core(name).eval()
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float64, logit_scale=3.0, seed=2)
    am = normalize_mask(None, causal=True, batch=B, heads=H, n=N, m=N, device=torch.device("cpu"))
    ref = core(q, k, v, am).out
    core = core.float()
    state = core.initial_state(B, dtype=torch.bfloat16, device=q.device)
    assert all(t.dtype in (torch.float32, torch.long, torch.bool) for t in state.values())
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    outs = []
    for t in range(N):
        o, state = core.step(qb[:, :, t : t + 1], kb[:, :, t : t + 1], vb[:, :, t : t + 1], state)
        outs.append(o)
    out = torch.cat(outs, 2)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 3e-2


def test_step_requirements_raise() -> None:
    with pytest.raises(UnsupportedError, match="max_len"):
        _core("cosformer", max_len=None).initial_state(1, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(UnsupportedError, match="prefix_count"):
        _core("lsa", normalize="n").initial_state(1, dtype=torch.float32, device=torch.device("cpu"))
    core = _core("linear")
    state = core.initial_state(1, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(B, H=3, 1, D\)"):
        core.step(torch.zeros(1, H, 2, D), torch.zeros(1, H, 2, D), torch.zeros(1, H, 2, D), state)
    with pytest.raises(UnsupportedError, match="no recurrent step"):
        _core("softmax").initial_state(1, dtype=torch.float32, device=torch.device("cpu"))


def test_step_flow_ablations_and_clamp() -> None:
    """The step follows the flags (clamp, competition/allocation off) like the parallel form."""
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float64, logit_scale=3.0, seed=4)
    am = normalize_mask(None, causal=True, batch=B, heads=H, n=N, m=N, device=torch.device("cpu"))
    for kw in ({"competition_clamp": 1.0}, {"competition": False}, {"allocation": False}, {"preset": "lra"}):
        core = _core("flow", **kw)
        torch.testing.assert_close(_run_steps(core, q, k, v), core(q, k, v, am).out, rtol=0, atol=1e-10)


def test_step_ecoformer_faithful_and_aft_conv_untied() -> None:
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float64, logit_scale=3.0, seed=5)
    am = normalize_mask(None, causal=True, batch=B, heads=H, n=N, m=N, device=torch.device("cpu"))
    for name, kw in (("ecoformer", {"bias_mode": "faithful"}), ("aft_conv", {"key_per_head": False})):
        core = _core(name, **kw)
        torch.testing.assert_close(_run_steps(core, q, k, v), core(q, k, v, am).out, rtol=0, atol=1e-10)
