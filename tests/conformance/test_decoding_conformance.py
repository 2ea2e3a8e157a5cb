"""Decoding conformance: for every registered variant that decodes (``capabilities.decode``),
feeding a sequence through a cache (token by token, prefill then tokens, prefill then chunks)
equals running the whole causal sequence at once, in float64, for every cache mode the variant
claims; and a variant or option set that cannot decode refuses with UnsupportedError instead
of giving a different answer."""

from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.decoding import decode_mode
from attnlib.registry import get_variant
from attnlib.testing import assert_close

B, H, DIM, N = 2, 4, 32, 13
# (first chunk, later chunk sizes): token by token from the start, prefill then single tokens,
# prefill then a chunk of 3 then single tokens
SCHEDULES = {"tokens": [1] * N, "prefill": [5] + [1] * (N - 5), "chunks": [5, 3] + [1] * (N - 8)}
CAUSAL = [n for n in attnlib.available() if attnlib.variant_info(n).causal]
DECODERS = [n for n in CAUSAL if attnlib.variant_info(n).decode]


def claimed_modes(name: str) -> list[str]:
    """The cache modes the capabilities claim: the recurrent step, the key/value cache
    (``causal_cross``) and recomputation (any variant that decodes)."""
    c = attnlib.variant_info(name)
    return [m for m, ok in (("recurrent", c.recurrent), ("kv", c.causal_cross), ("recompute", c.decode)) if ok]


def build(name: str, kwargs: dict, *, gqa: bool = False) -> attnlib.Attention:
    torch.manual_seed(0)
    extra = {"num_kv_heads": 2, "rope": True} if gqa else {}
    return attnlib.Attention(DIM, H, variant=name, causal=True, **extra, **kwargs).double().eval()


def decode(attn: attnlib.Attention, x: torch.Tensor, mode: str, schedule: list[int]) -> torch.Tensor:
    cache = attn.init_cache(x.shape[0], mode=mode)
    outs, t = [], 0
    for size in schedule:
        outs.append(attn(x[:, t : t + size], cache=cache))
        t += size
    assert cache.length == t == x.shape[1]
    return torch.cat(outs, 1)


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in DECODERS for m in claimed_modes(n)], ids=lambda v: str(v))
def test_cached_decoding_equals_the_full_causal_forward(name: str, mode: str) -> None:
    x = inputs()
    for gqa in (False, True):
        attn = build(name, get_variant(name).decoding_kwargs(), gqa=gqa)
        with torch.no_grad():
            full = attn(x)
            for label, schedule in SCHEDULES.items():
                got = decode(attn, x, mode, schedule)
                assert_close(got, full, atol=1e-9, name=f"{name} {mode} cache, {label}, gqa={gqa}")


@pytest.mark.parametrize("name", DECODERS)
def test_default_decode_mode_is_the_first_claimed(name: str) -> None:
    assert decode_mode(attnlib.variant_info(name)) == claimed_modes(name)[0]


@pytest.mark.parametrize("name", CAUSAL)
def test_decoding_refuses_rather_than_differs(name: str) -> None:
    """With its conformance options and with its defaults, every causal variant either refuses
    to decode (UnsupportedError at init_cache) or decodes exactly; variants declaring
    ``decode=False`` always refuse."""
    x = inputs(1)
    cls = get_variant(name)
    decodes = attnlib.variant_info(name).decode
    for label, kwargs in (("conformance", cls.conformance_kwargs()), ("defaults", {})):
        attn = build(name, kwargs)
        for mode in ("recurrent", "kv", "recompute", None):
            try:
                attn.init_cache(B, mode=mode)
            except attnlib.UnsupportedError:
                continue
            assert decodes, f"{name} declares decode=False but init_cache(mode={mode!r}) accepted"
            with torch.no_grad():
                got = decode(attn, x, mode, SCHEDULES["prefill"])
                assert_close(got, attn(x), atol=1e-9, name=f"{name} ({label} options) {mode} cache")
    if not decodes:
        attn = build(name, cls.decoding_kwargs())
        with pytest.raises(attnlib.UnsupportedError, match="decode"):
            attn.init_cache(B)


@pytest.mark.parametrize("name", [n for n in DECODERS if attnlib.variant_info(n).causal_cross])
def test_kv_step_attends_to_the_cache_alone(name: str) -> None:
    """causal N < M (the key/value decoding step) equals the last N rows of the causal forward
    over all M positions, at the core level (what a framework-held cache calls)."""
    from attnlib.decoding import attend_new_queries, kv_decode_exact
    from attnlib.testing import make_qkv

    torch.manual_seed(0)
    cls = get_variant(name)
    core = cls(num_heads=H, head_dim=DIM // H, **cls.decoding_kwargs()).double().eval()
    assert kv_decode_exact(core)
    q, k, v = make_qkv(B, H, N, DIM // H, dtype=torch.float64, logit_scale=3.0, seed=2)
    from attnlib.masks import normalize_mask

    am = normalize_mask(None, causal=True, batch=B, heads=H, n=N, m=N, device=q.device)
    with torch.no_grad():
        full = core(q, k, v, am).out
        for n_new in (1, 4):
            res = attend_new_queries(core, q[:, :, N - n_new :], k, v)
            assert_close(res.out, full[:, :, N - n_new :], atol=1e-9, name=f"{name} last {n_new} rows")


@pytest.mark.parametrize(
    ("name", "mode"),
    [(n, m) for n in DECODERS if attnlib.variant_info(n).key_padding for m in claimed_modes(n) if m != "recurrent"],
    ids=lambda v: str(v),
)
def test_cached_decoding_with_left_padding_equals_the_full_forward(name: str, mode: str) -> None:
    """A left-padded sequence decoded with key_padding_mask over the tokens so far gives the full
    forward's rows at its real positions (the recurrent step takes no mask and refuses it)."""
    x = inputs(2)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, :3] = False
    attn = build(name, get_variant(name).decoding_kwargs())
    cache = attn.init_cache(B, mode=mode)
    with torch.no_grad():
        full = attn(x, key_padding_mask=keep)
        got = [attn(x[:, :5], cache=cache, key_padding_mask=keep[:, :5])]
        got += [attn(x[:, t : t + 1], cache=cache, key_padding_mask=keep[:, : t + 1]) for t in range(5, N)]
    got_t = torch.cat(got, 1)
    assert_close(got_t[1], full[1], atol=1e-9, name=f"{name} {mode} unpadded row")
    assert_close(got_t[0, 3:], full[0, 3:], atol=1e-9, name=f"{name} {mode} left-padded row")


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in DECODERS for m in claimed_modes(n)], ids=lambda v: str(v))
def test_reordered_cache_decodes_the_selected_sequences(name: str, mode: str) -> None:
    """Beam search's batch edit: after 6 tokens of 3 sequences, ``cache.reorder([2, 0, 0])`` and 7 more
    tokens equal the full causal forward of sequences 2, 0, 0 (their last 7 rows), in float64. For a
    recurrent state this checks its layout rule (each entry batch-first or shared; see
    :func:`attnlib.decoding.select_state_rows`)."""
    x = torch.randn(3, N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    index = torch.tensor([2, 0, 0])
    attn = build(name, get_variant(name).decoding_kwargs())
    with torch.no_grad():
        cache = attn.init_cache(3, mode=mode)
        attn(x[:, :6], cache=cache)
        cache.reorder(index)
        got = attn(x[index, 6:], cache=cache)
        want = attn(x[index])[:, 6:]
    assert_close(got, want, atol=1e-9, name=f"{name} ({mode}) after a reorder")
