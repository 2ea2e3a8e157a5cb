"""Meta-tokens and meta-attention in DecoderLM: the properties the working definition names."""

from __future__ import annotations

import pytest
import torch

from attnlib.models import DecoderLM
from attnlib.models.lm import MetaAttention, insert_meta_tokens

V = 11


def _lm(**kw) -> DecoderLM:
    torch.manual_seed(0)
    return (
        DecoderLM(attention={"variant": "softmax"}, vocab_size=V, dim=32, depth=2, num_heads=2, meta_tokens=2, **kw)
        .double()
        .eval()
    )


def _tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, V, (2, 12), generator=g)
    return insert_meta_tokens(tok, V + 1, 3, generator=g)


def test_insert_meta_tokens() -> None:
    tok = torch.arange(8).view(2, 4)
    out, is_meta = insert_meta_tokens(tok, 99, 2, positions=torch.tensor([[0, 3], [5, 1]]))
    assert out.tolist() == [[99, 0, 1, 99, 2, 3], [4, 99, 5, 6, 7, 99]]
    assert is_meta.sum().item() == 4
    with pytest.raises(ValueError, match="distinct"):
        insert_meta_tokens(tok, 99, 2, positions=torch.tensor([[0, 0], [1, 2]]))


def test_without_meta_tokens_the_model_is_the_plain_one() -> None:
    lm = _lm()
    tok = torch.randint(0, V, (2, 10))
    with_meta_layers = lm(tok)
    for blk in lm.blocks:
        blk.meta_attn = None
    torch.testing.assert_close(lm(tok), with_meta_layers, rtol=0, atol=0)


def test_meta_attention_is_zero_off_meta_and_reads_only_meta_tokens() -> None:
    torch.manual_seed(0)
    ma = MetaAttention(16, 2, rope=True, rope_base=10000.0).double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    is_meta = torch.zeros(2, 9, dtype=torch.bool)
    is_meta[:, [1, 4, 7]] = True
    y = ma(x, is_meta)
    assert torch.equal(y[~is_meta], torch.zeros_like(y[~is_meta]))
    assert y[is_meta].abs().sum() > 0
    x2 = x.clone()
    x2[~is_meta] = torch.randn_like(x2[~is_meta]) * 5  # other tokens' inputs do not reach it
    torch.testing.assert_close(ma(x2, is_meta), y, rtol=0, atol=1e-12)
    x3 = x.clone()
    x3[:, 7] += 1.0  # nor do later meta-tokens (causal)
    torch.testing.assert_close(ma(x3, is_meta)[:, :7], y[:, :7], rtol=0, atol=1e-12)


def test_whole_model_is_causal_and_decodes_like_the_full_forward() -> None:
    lm = _lm()
    tok, _ = _tokens()
    full = lm(tok)
    for t in (0, 6, 14):
        tok2 = tok.clone()
        tok2[:, t] = (tok2[:, t] + 1) % (V + 2)
        torch.testing.assert_close(lm(tok2)[:, :t], full[:, :t], rtol=0, atol=1e-12)
    cache = lm.init_cache(2)
    steps = [lm(tok[:, :5], cache=cache)] + [lm(tok[:, t : t + 1], cache=cache) for t in range(5, tok.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert full.shape[-1] == V  # meta-tokens are inputs only


def test_bad_ids_and_options_raise() -> None:
    lm = _lm()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 13\)"):
        lm(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match="meta_tokens must be"):
        DecoderLM(attention={"variant": "softmax"}, vocab_size=V, meta_tokens=-1)
