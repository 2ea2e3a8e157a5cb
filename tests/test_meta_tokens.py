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
    with pytest.raises(ValueError, match="meta_rate must be a number in"):
        DecoderLM(attention={"variant": "softmax"}, vocab_size=V, meta_tokens=1, meta_rate=1.5)
    with pytest.raises(ValueError, match="meta_tokens=0"):
        DecoderLM(attention={"variant": "softmax"}, vocab_size=V, meta_rate=0.25)


def test_meta_rate_inserts_in_the_forward_and_keeps_one_row_per_real_token() -> None:
    """Row j = the inserted sequence's output at the last position before real token j + 1."""
    lm = _lm(meta_rate=0.25).train()  # no dropout: train only changes where the meta-tokens go
    tok = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    got = lm(tok)
    assert got.shape == (2, 12, V)
    torch.manual_seed(5)  # the same draw of places
    seq, is_meta = insert_meta_tokens(tok, V, 3)
    seq[is_meta] = V + torch.tensor([0, 1, 0]).repeat(2)  # meta ids cycle over the K = 2 ids
    full = lm.head(lm.features(seq))
    for b in range(2):
        real = [i for i in range(15) if not is_meta[b, i]]
        for j in range(12):
            last = (real[j + 1] if j + 1 < 12 else 15) - 1
            torch.testing.assert_close(got[b, j], full[b, last], rtol=0, atol=1e-12)
    lm.eval()  # evaluation: fixed places, so repeated calls agree, and later tokens never leak back
    a = lm(tok)
    torch.testing.assert_close(lm(tok), a, rtol=0, atol=0)
    tok2 = tok.clone()
    tok2[:, 7:] = (tok2[:, 7:] + 1) % V
    torch.testing.assert_close(lm(tok2)[:, :7], a[:, :7], rtol=0, atol=1e-12)


def test_meta_tokens_train_from_the_command_line(tmp_path) -> None:
    import math

    from hydra import compose, initialize_config_module

    from attnlib.training import train

    over = ["experiment=mqar", "model.meta_tokens=2", "model.meta_rate=0.125", "model.dim=16", "model.depth=1",
            "model.num_heads=2", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1", "data.batch_size=4",
            "data.seq_len=16", "data.num_kv_pairs=2", "data.vocab_size=32", "data.num_train=32", "data.num_val=8",
            "data.num_test=8", "data.eval_batch_size=8"]  # fmt: skip
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=over)
    res = train(cfg, tmp_path / "run")
    assert math.isfinite(res["test_loss"])
