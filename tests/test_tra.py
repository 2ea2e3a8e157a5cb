"""TRA (Threshold Relative Attention) against its defining equation, written as loops in float64."""

from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.functional.tra import rms_normalize, tra_attention
from attnlib.masks import KeyPadding
from attnlib.models import DecoderLM

B, H, N, D = 2, 2, 10, 8


def loop_tra(q, k, v, gate, allowed, *, gate_on="query", threshold=0.0):
    """keep, n_ij (kept keys between j and i, both included), logits s + gate term, masked softmax."""
    q, k = rms_normalize(q.double()), rms_normalize(k.double())
    v, gate = v.double(), gate.double()
    b_, h_, n, _ = q.shape
    m = k.shape[2]
    off = m - n
    out = torch.zeros(b_, h_, n, v.shape[-1], dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                p = i + off
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(q.shape[-1]) for j in range(m)]
                keep = [bool(allowed[b, i, j]) and s[j] > threshold for j in range(m)]
                logits = {}
                for j in range(m):
                    if not keep[j]:
                        continue
                    lo, hi = min(j, p), max(j, p)
                    between = [t for t in range(lo, hi + 1) if keep[t]]
                    if gate_on == "query":
                        bias = float(gate[b, h, i]) * len(between)
                    else:
                        bias = sum(float(gate[b, h, t]) for t in between)
                    logits[j] = s[j] + bias
                if not logits:
                    continue
                mx = max(logits.values())
                z = sum(math.exp(x - mx) for x in logits.values())
                for j, x in logits.items():
                    out[b, h, i] += math.exp(x - mx) / z * v[b, h, j]
    return out


def _inputs(n=N, m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, m, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, m, D, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("gate_on", ["query", "key"])
@pytest.mark.parametrize("causal", [True, False])
def test_tra_equals_its_definition(gate_on: str, causal: bool) -> None:
    q, k, v = _inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, H, N, generator=g, dtype=torch.float64))
    kp = torch.rand(B, N, generator=g) > 0.25
    allowed = kp[:, None, :] & (
        torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    )
    out = tra_attention(q, k, v, gate, mask=KeyPadding(kp), causal=causal, gate_on=gate_on, chunk_size=3)
    torch.testing.assert_close(out, loop_tra(q, k, v, gate, allowed, gate_on=gate_on), rtol=0, atol=1e-12)


def test_tra_bottom_right_aligned_decoding_rows() -> None:
    q, k, v = _inputs(n=4, m=9, seed=3)
    gate = -torch.rand(B, H, 4, dtype=torch.float64)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()[5:].expand(B, 4, 9)
    out = tra_attention(q, k, v, gate, causal=True)
    torch.testing.assert_close(out, loop_tra(q, k, v, gate, allowed), rtol=0, atol=1e-12)


def test_zero_gate_is_softmax_over_the_kept_keys() -> None:
    q, k, v = _inputs(seed=4)
    out, w = tra_attention(q, k, v, torch.zeros(B, H, N, dtype=torch.float64), causal=True, return_weights=True)
    s = rms_normalize(q) @ rms_normalize(k).transpose(-1, -2) / math.sqrt(D)
    keep = (s > 0) & torch.ones(N, N, dtype=torch.bool).tril()
    expect = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(w, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, expect @ v, rtol=0, atol=1e-12)


def test_all_positive_scores_give_a_linear_recency_bias() -> None:
    """Every key kept and a constant gate g: n_ij = i - j + 1, the bias g (i - j + 1) (ALiBi-like)."""
    u = torch.randn(D, dtype=torch.float64).abs() + 0.1
    q = u.expand(1, 1, N, D) * torch.rand(1, 1, N, 1, dtype=torch.float64).add(0.5)
    k = u.expand(1, 1, N, D) * torch.rand(1, 1, N, 1, dtype=torch.float64).add(0.5)
    v = torch.randn(1, 1, N, D, dtype=torch.float64)
    g = -0.3
    _, w = tra_attention(q, k, v, torch.full((1, 1, N), g, dtype=torch.float64), causal=True, return_weights=True)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    s = rms_normalize(q) @ rms_normalize(k).transpose(-1, -2) / math.sqrt(D)
    expect = torch.softmax((s + g * (i - j + 1).double()).masked_fill(j > i, float("-inf")), -1)
    torch.testing.assert_close(w[0, 0], expect[0, 0], rtol=0, atol=1e-12)


def test_inserted_irrelevant_keys_change_nothing() -> None:
    """Contextualised distance: past tokens whose keys score below the threshold are invisible."""
    u = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    q = u.expand(1, 1, 6, D).clone()
    k = u.expand(1, 1, 6, D) * torch.rand(1, 1, 6, 1, dtype=torch.float64).add(0.5) + 0.05 * torch.randn(
        1, 1, 6, D, dtype=torch.float64
    )
    v = torch.randn(1, 1, 6, D, dtype=torch.float64)
    gate = torch.full((1, 1, 6), -0.4, dtype=torch.float64)
    base = tra_attention(q, k, v, gate, causal=True)
    slots = [1, 2, 4, 6]  # insert irrelevant tokens (key -u) before these original positions
    pos = [t + sum(1 for s in slots if s <= t) for t in range(6)]
    n2 = 6 + len(slots)
    q2 = u.expand(1, 1, n2, D).clone()
    k2 = -u.expand(1, 1, n2, D).clone()
    v2 = torch.randn(1, 1, n2, D, dtype=torch.float64) * 100
    g2 = torch.full((1, 1, n2), -0.4, dtype=torch.float64)
    q2[:, :, pos], k2[:, :, pos], v2[:, :, pos] = q, k, v
    out2 = tra_attention(q2, k2, v2, g2, causal=True)
    torch.testing.assert_close(out2[:, :, pos], base, rtol=0, atol=1e-12)


def test_rows_with_no_kept_key_are_exactly_zero_with_finite_grads() -> None:
    u = torch.randn(D, dtype=torch.float64)
    q = u.expand(1, 1, 5, D).clone().requires_grad_(True)
    k = (-u).expand(1, 1, 5, D).clone()
    v = torch.randn(1, 1, 5, D, dtype=torch.float64)
    out = tra_attention(q, k, v, torch.zeros(1, 1, 5, dtype=torch.float64), causal=True)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_gradients_equal_the_notebook_form() -> None:
    """Gradients as in the authors' code: the keep pattern and the counts n_ij are constants, the kept
    scores and the gate carry gradient, a dropped key gets none through its score."""
    q, k, v = _inputs(seed=3)
    g = torch.Generator().manual_seed(4)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, H, N, generator=g, dtype=torch.float64))
    w = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, gate)]
    (tra_attention(*ins, causal=True, chunk_size=4) * w).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (q, k, v, gate)]
    qn, kn = rms_normalize(ref[0]), rms_normalize(ref[1])
    s = qn @ kn.transpose(-1, -2) / math.sqrt(D)
    keep = (s > 0) & torch.ones(N, N, dtype=torch.bool).tril()
    n = torch.zeros(B, H, N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(i + 1):
            n[:, :, i, j] = keep[:, :, i, j : i + 1].sum(-1)
    logits = (s + ref[3][..., None] * n).masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    ((p @ ref[2]) * w).sum().backward()
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)
    assert float(ins[3].grad.abs().sum()) > 0  # the gate learns


def test_gates_are_log_sigmoids_and_bad_inputs_raise() -> None:
    a = attnlib.Attention(16, 2, variant="tra")
    g = a.core.gates(torch.randn(2, 2, 7, 8))
    assert g.shape == (2, 2, 7) and bool((g <= 0).all())
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"gate must be \(B, H, N\)"):
        tra_attention(q, k, v, torch.zeros(B, H, N + 1))
    with pytest.raises(ValueError, match="gate_on"):
        attnlib.Attention(16, 2, variant="tra", gate_on="value")


@pytest.mark.parametrize("mode", ["kv", "recompute"])
def test_decoder_lm_with_tra_decodes_like_the_full_forward(mode: str) -> None:
    torch.manual_seed(0)
    lm = (
        DecoderLM(attention={"variant": "tra"}, vocab_size=13, dim=32, depth=2, num_heads=2, positions="none")
        .double()
        .eval()
    )
    tok = torch.randint(0, 13, (2, 11))
    full = lm(tok)
    cache = lm.init_cache(2, mode=mode)
    steps = [lm(tok[:, :4], cache=cache)] + [lm(tok[:, t : t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
