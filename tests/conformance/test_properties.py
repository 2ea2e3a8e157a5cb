"""Property-based conformance over the registry (hypothesis, bounded, derandomized).

Each property draws sizes, positions, magnitudes, chunk sizes and paddings and is checked for
every registered variant that claims what it needs:

* causality: under ``causal=True`` scaling token t (up to 1e3, in float32; the whole token, or
  only its q and k) moves no output before t by more than fp32 rounding;
* padding invariance: a right-padded example (key padding) equals the example run alone;
  cross-attention with padded keys for the position-free variants;
* NaN in -> NaN out (or a clear error): a NaN token's own output is NaN, and other examples of
  the batch stay NaN-free in eval mode;
* batch-order invariance, with key padding where claimed.

The examples are derandomized (the same on every run); a failure prints the falsifying example.
Key padding is passed in one place, :func:`call`.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlib
from attnlib.masks import normalize_mask
from attnlib.registry import get_variant

VARIANTS = attnlib.available()
H, DIM = 2, 16
EPS32 = torch.finfo(torch.float32).eps
PROPERTY = settings(
    max_examples=4,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def caps(name: str) -> attnlib.Capabilities:
    return attnlib.variant_info(name)


def takes_chunk_size(name: str) -> bool:
    return "chunk_size" in inspect.signature(get_variant(name).__init__).parameters


def build(
    name: str, *, causal: bool = False, dtype: torch.dtype = torch.float64, chunk: int | None = None, seed: int = 0
) -> attnlib.Attention:
    """The variant with its small conformance options (and ``chunk_size`` where drawn), in eval mode."""
    kw = get_variant(name).conformance_kwargs()
    if chunk is not None and takes_chunk_size(name):
        kw = {**kw, "chunk_size": chunk}
    torch.manual_seed(seed)
    return attnlib.Attention(DIM, H, variant=name, causal=causal, **kw).to(dtype).eval()


def call(attn: attnlib.Attention, x: torch.Tensor, key_padding: torch.Tensor | None = None, context=None, **kw):
    """The module on x (B, N, dim) with key padding (B, M) bool (True = real key) or None."""
    return attn(x, context, key_padding_mask=key_padding, **kw)


def tokens(b: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=torch.float64).to(dtype)


chunks = st.sampled_from([None, 1, 3, 8])
scales = st.sampled_from([1e3, -1e3, 300.0, -30.0, 1e-3])


# ------------------------------------------------------------------------------------------
# causality: the past never depends on the future, numerically too
# ------------------------------------------------------------------------------------------


def _past_unchanged(y2: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """``y2 == y`` to fp32 rounding: |diff| <= 16 eps x the largest unperturbed output."""
    tol = 16 * EPS32 * float(y.abs().max().clamp_min(1e-30))
    err = float((y2 - y).abs().max()) if y.numel() else 0.0
    assert err <= tol, f"{what}: earlier outputs moved by {err:.3g} (rounding allows {tol:.3g})"


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).causal])
@settings(PROPERTY, max_examples=6)
@given(n=st.integers(2, 64), frac=st.floats(0.0, 1.0), scale=scales, chunk=chunks, seed=st.integers(0, 2**16))
def test_causal_no_future_influence_at_large_magnitudes(
    name: str, n: int, frac: float, scale: float, chunk: int | None, seed: int
) -> None:
    t = 1 + int(frac * (n - 2))  # 1 .. n-1
    attn = build(name, causal=True, dtype=torch.float32, chunk=chunk)
    x = tokens(2, n, seed, torch.float32)
    with torch.no_grad():
        y = attn(x)
        x2 = x.clone()
        x2[:, t] *= scale
        _past_unchanged(attn(x2)[:, :t], y[:, :t], f"{name}: token {t} of {n} scaled x{scale}")
        # large-magnitude q, k (and v) of token t, straight into the core
        g = torch.Generator().manual_seed(seed + 1)
        q, k, v = (torch.randn(2, H, n, DIM // H, generator=g) for _ in range(3))
        am = normalize_mask(None, causal=True, batch=2, heads=H, n=n, m=n, device=torch.device("cpu"))
        yc = attn.core(q, k, v, am).out
        for z in (q, k, v):
            z[:, :, t] *= scale
        _past_unchanged(attn.core(q, k, v, am).out[:, :, :t], yc[:, :, :t], f"{name} core: q, k, v of {t} x{scale}")


# ------------------------------------------------------------------------------------------
# padding invariance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).key_padding])
@PROPERTY
@given(
    lengths=st.lists(st.integers(1, 24), min_size=2, max_size=3),
    extra=st.integers(0, 6),
    causal=st.booleans(),
    chunk=chunks,
    seed=st.integers(0, 2**16),
)
def test_padded_example_equals_the_example_alone(
    name: str, lengths: list[int], extra: int, causal: bool, chunk: int | None, seed: int
) -> None:
    causal = causal and caps(name).causal
    attn = build(name, causal=causal, chunk=chunk)
    n = max(lengths) + extra
    x = tokens(len(lengths), n, seed)
    kp = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    y = call(attn, x, kp)
    for b, length in enumerate(lengths):
        alone = attn(x[b : b + 1, :length])
        torch.testing.assert_close(y[b : b + 1, :length], alone, rtol=0, atol=1e-9, msg=f"{name}: example {b}")


@pytest.mark.parametrize("name", [n for n in VARIANTS if caps(n).cross and caps(n).key_padding])
@PROPERTY
@given(n=st.integers(1, 12), lengths=st.lists(st.integers(1, 20), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_padded_keys_equal_the_keys_alone_in_cross_attention(name: str, n: int, lengths: list[int], seed: int) -> None:
    """Cross-attention with right-padded keys; for the position-free variants (a positional one
    aligns queries and keys by a convention of its own: from the start or from the end)."""
    if not caps(name).permutation_equivariant:
        pytest.skip(f"{name} is positional (permutation_equivariant=False)")
    attn = build(name)
    m = max(lengths)
    x, ctx = tokens(len(lengths), n, seed), tokens(len(lengths), m, seed + 1)
    kp = torch.arange(m)[None, :] < torch.tensor(lengths)[:, None]
    y = call(attn, x, kp, ctx)
    for b, length in enumerate(lengths):
        alone = attn(x[b : b + 1], ctx[b : b + 1, :length])
        torch.testing.assert_close(y[b : b + 1], alone, rtol=0, atol=1e-9, msg=f"{name}: example {b}")


# ------------------------------------------------------------------------------------------
# NaN in -> NaN out (or a clear error)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@PROPERTY
@given(
    n=st.integers(2, 24),
    frac=st.floats(0.0, 1.0),
    one_feature=st.booleans(),
    causal=st.booleans(),
    cross=st.booleans(),
    train=st.booleans(),
    extras=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nan_in_is_nan_out(
    name: str, n: int, frac: float, one_feature: bool, causal: bool, cross: bool, train: bool, extras: bool, seed: int
) -> None:
    """A NaN in token t's features: its own output is NaN; with ``cross`` the context is finite,
    so the NaN reaches the core through the query only."""
    c = caps(name)
    t = min(n - 1, int(frac * n))
    cross = cross and c.cross and not causal
    attn = build(name, causal=causal and c.causal, dtype=torch.float32).train(train)
    x = tokens(2, n, seed, torch.float32)
    ctx = tokens(2, 7, seed + 1, torch.float32) if cross else None
    x[0, t, seed % DIM if one_feature else slice(None)] = float("nan")
    try:
        with torch.no_grad():
            y = call(attn, x, context=ctx, return_extras=True)[0] if extras else call(attn, x, context=ctx)
    except (ValueError, attnlib.UnsupportedError) as e:  # a clear error is an answer too
        assert "nan" in str(e).lower(), f"{name}: unrelated error for a NaN input: {e}"
        return
    assert torch.isnan(y[0, t]).all(), f"{name}: a NaN token came out as {y[0, t].tolist()}"
    if not train:  # (training may share batch statistics, e.g. EcoFormer's learned hash)
        assert not torch.isnan(y[1]).any(), f"{name}: NaN crossed from one example to another"


# ------------------------------------------------------------------------------------------
# batch-order invariance
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@PROPERTY
@given(data=st.data())
def test_batch_order_invariance(name: str, data: st.DataObject) -> None:
    c = caps(name)
    b, n = data.draw(st.integers(2, 4), "batch"), data.draw(st.integers(1, 20), "tokens")
    attn = build(name, causal=data.draw(st.booleans(), "causal") and c.causal)
    x = tokens(b, n, data.draw(st.integers(0, 2**16), "seed"))
    kp = None
    if c.key_padding and data.draw(st.booleans(), "padded"):
        kp = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))
        kp[:, 0] = True
    perm = torch.tensor(data.draw(st.permutations(range(b)), "perm"))
    y = call(attn, x, kp)
    yp = call(attn, x[perm], None if kp is None else kp[perm])
    torch.testing.assert_close(yp, y[perm], rtol=0, atol=1e-10, msg=f"{name}: batch order changed the outputs")
