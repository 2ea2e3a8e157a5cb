"""Backbones: every attention YAML composed into every backbone it can serve, build-time capability
errors, padding invariance, KV-cache / recurrent decoding == full forward, generate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import attnlib
from attnlib import registry
from attnlib.decoding import decode_mode
from attnlib.models import (
    MODEL_NEEDS,
    MODELS,
    BranchformerCTC,
    ConformerCTC,
    DecoderLM,
    EncoderClassifier,
    ViT,
    build_model,
    check_attention,
)
from attnlib.registry import Capabilities
from attnlib.variants.base import AttentionCore, CoreOutput

CONFIGS = Path(attnlib.__file__).parent / "configs"
ATTENTION_YAMLS = sorted(p.stem for p in (CONFIGS / "attention").glob("*.yaml"))
MODEL_YAMLS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))

# tiny sizes: what the data would give the model, and small widths
DATA_KW = {
    "vit": {"img_size": 8, "in_chans": 1, "num_classes": 10},
    "lm": {"vocab_size": 37},
    "encoder": {"vocab_size": 16, "num_classes": 10},
    "conformer": {"vocab_size": 11, "sample_rate": 8000},
    "branchformer": {"vocab_size": 11, "sample_rate": 8000},
    "tabular": {"num_features": 5, "max_classes": 3},
    "asr_attention": {"vocab_size": 11, "sample_rate": 8000},
}
TINY = {"dim": 16, "depth": 1, "num_heads": 2}
TINY_ASR = {**TINY, "n_mels": 16, "specaugment": None}
TINY_BY_MODEL = {
    "conformer": TINY_ASR,
    "branchformer": TINY_ASR,
    "asr_attention": TINY_ASR,
    "tabular": {"dim": 16, "num_heads": 2},
}
ASR_MODELS = ("conformer", "branchformer", "asr_attention")


@pytest.fixture(scope="module")
def hydra_configs():
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        yield


def _inputs(model_name: str, b: int = 2) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    if model_name == "vit":
        return (torch.randn(b, 1, 8, 8, generator=g),), {}
    if model_name == "lm":
        return (torch.randint(0, 37, (b, 12), generator=g),), {}
    if model_name == "encoder":
        x = torch.randint(1, 16, (b, 12), generator=g)
        mask = torch.ones(b, 12, dtype=torch.bool)
        mask[0, 9:] = False
        return (x, mask), {}
    if model_name == "tabular":
        tok = torch.randn(b, 9, 6, generator=g)
        tok[..., -1] = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, -1.0, -1.0, -1.0, -1.0])
        return (tok,), {}
    wave = torch.randn(b, 4000, generator=g) * 0.1
    return (wave, torch.tensor([4000, 2500][:b])), {}


def test_every_model_yaml_is_a_known_model() -> None:
    assert set(MODEL_YAMLS) == set(MODELS), (MODEL_YAMLS, sorted(MODELS))
    assert {"vit", "lm", "conformer", "branchformer"} <= set(MODEL_YAMLS)


def test_every_registered_variant_has_an_attention_yaml() -> None:
    assert set(attnlib.available()) <= set(ATTENTION_YAMLS)


@pytest.mark.parametrize("model_name", MODEL_YAMLS)
@pytest.mark.parametrize("variant", ATTENTION_YAMLS)
def test_attention_config_composes_into_backbone(hydra_configs, variant: str, model_name: str) -> None:
    """Compose attention=<variant> model=<model> with Hydra; build and run a forward pass, or get a
    build-time UnsupportedError naming the variant and the missing capability."""
    cfg = compose("train", overrides=[f"attention={variant}", f"model={model_name}"])
    assert cfg.attention.variant == variant
    tiny = TINY_BY_MODEL.get(model_name, TINY)
    needs = MODEL_NEEDS[model_name]
    caps = attnlib.variant_info(variant)
    missing = [f for f in needs if not getattr(caps, f)]
    torch.manual_seed(0)
    if missing:
        with pytest.raises(attnlib.UnsupportedError) as e:
            build_model(cfg.model, cfg.attention, **DATA_KW[model_name], **tiny)
        msg = str(e.value)
        assert repr(variant) in msg and all(f"capabilities.{f}" in msg for f in missing), msg
        return
    model = build_model(cfg.model, cfg.attention, **DATA_KW[model_name], **tiny).eval()
    args, kw = _inputs(model_name)
    with torch.no_grad():
        out = model(*args, **kw)
    if model_name in ASR_MODELS:
        log_probs, frames = out
        assert log_probs.shape[0] == 2 and log_probs.shape[-1] == 11
        assert frames.tolist() == [int(f) for f in frames] and int(frames.max()) == log_probs.shape[1]
        out = log_probs[0, : int(frames[0])]
    elif model_name == "lm":
        assert out.shape == (2, 12, 37)
    elif model_name == "tabular":
        assert out.shape == (2, 9, 3)
    else:
        assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


# -- build-time capability errors ------------------------------------------------------------


class _Bare(AttentionCore):
    """A made-up variant with no capabilities (non-causal, no masks)."""

    capabilities = Capabilities(family="test")

    def attend(self, q, k, v, mask, *, cross, need_weights, need_importance, dropout_p):
        return CoreOutput(v.mean(2, keepdim=True).expand_as(q).contiguous())


@pytest.fixture
def bare_variant(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(registry._REGISTRY, "bare_test", _Bare)
    monkeypatch.setattr(_Bare, "name", "bare_test", raising=False)
    return "bare_test"


@pytest.mark.parametrize("model_name", sorted(m for m in MODEL_NEEDS if MODEL_NEEDS[m]))
def test_missing_capability_error_names_variant_and_capability(bare_variant: str, model_name: str) -> None:
    kw = {**DATA_KW[model_name], **TINY_BY_MODEL.get(model_name, TINY)}
    with pytest.raises(attnlib.UnsupportedError) as e:
        build_model({"name": model_name}, {"variant": bare_variant}, **kw)
    msg = str(e.value)
    for field, reason in MODEL_NEEDS[model_name].items():
        assert f"'{bare_variant}'" in msg and f"capabilities.{field}=True" in msg and reason in msg, msg
    assert MODELS[model_name].__name__ in msg
    assert "softmax" in msg  # lists the variants that can serve the model


def test_vit_serves_a_variant_without_masks(bare_variant: str) -> None:
    m = ViT(attention={"variant": bare_variant}, **TINY)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(attnlib.UnsupportedError, match="key-padding"):
        m(torch.randn(2, 1, 8, 8), patch_mask=torch.ones(2, 16, dtype=torch.bool))


def test_check_attention_and_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown attention variant 'sofmax'.*did you mean 'softmax'"):
        check_attention({"variant": "sofmax"}, {}, model="X")
    with pytest.raises(ValueError, match="names no variant"):
        check_attention({"window": 3}, {}, model="X")
    with pytest.raises(ValueError, match="which the model decides"):
        DecoderLM(attention={"variant": "softmax", "causal": False}, vocab_size=10, **TINY)
    with pytest.raises(ValueError, match="got unknown option"):
        ViT(attention={"variant": "softmax", "windw": 3}, **TINY)
    with pytest.raises(ValueError, match="unknown model 'vitt'; did you mean 'vit'"):
        build_model({"name": "vitt"}, {"variant": "softmax"})
    with pytest.raises(ValueError, match=r"ViT expects images of shape \(B, 1, 8, 8\)"):
        ViT(attention={"variant": "softmax"}, **TINY)(torch.randn(2, 1, 9, 9))


def test_init_schemes() -> None:
    """gpt2: std 0.02 everywhere; fan_in: Linear U(+-1/sqrt(fan_in)), embeddings std 1/sqrt(dim)."""
    torch.manual_seed(0)
    dim, vocab = 64, 512
    kw = {"attention": {"variant": "softmax"}, "vocab_size": vocab, "dim": dim, "depth": 1, "num_heads": 1}
    gpt2 = DecoderLM(**kw)
    fan = DecoderLM(**kw, init="fan_in", tie_embeddings=False)
    assert abs(gpt2.tok_emb.weight.std().item() - 0.02 * 0.88) < 0.001  # trunc at 2 std: std * 0.88
    assert abs(fan.tok_emb.weight.std().item() - dim**-0.5) < 0.003
    qkv = [m for n, m in fan.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features == dim]
    assert qkv
    for m in qkv:
        w = m.weight
        assert w.abs().max().item() <= dim**-0.5
        assert abs(w.std().item() - (3 * dim) ** -0.5) < 0.01  # uniform(-b, b) has std b / sqrt(3)
    fc2 = fan.blocks[0].mlp.fc2  # fan_in = hidden width, not dim
    assert fc2.weight.abs().max().item() <= fc2.in_features**-0.5 < dim**-0.5
    assert fc2.weight.abs().max().item() > 0.9 * fc2.in_features**-0.5
    with pytest.raises(ValueError, match="init scheme must be one of"):
        DecoderLM(**kw, init="xavier")


# -- padding: a padded batch gives each sequence the output it gets alone -----------------------


@pytest.mark.parametrize("cls", [ConformerCTC, BranchformerCTC])
def test_asr_padding_invariance(cls) -> None:
    torch.manual_seed(0)
    m = cls(attention={"variant": "softmax"}, vocab_size=11, sample_rate=8000, **TINY_ASR).double().eval()
    w = torch.randn(3, 4000, dtype=torch.float64) * 0.1
    lens = torch.tensor([4000, 2300, 1111])
    lp, fr = m(w, lens)
    assert fr.tolist() == [
        int(m.subsample._shrink(m.subsample._shrink(m.frontend.frames(lens[i : i + 1])))) for i in range(3)
    ]
    for i in range(3):
        alone, fa = m(w[i : i + 1, : lens[i]])
        assert int(fa) == int(fr[i])
        torch.testing.assert_close(lp[i, : fr[i]], alone[0], rtol=0, atol=1e-5)


def test_encoder_padding_invariance() -> None:
    torch.manual_seed(0)
    m = EncoderClassifier(attention={"variant": "softmax"}, vocab_size=16, num_classes=10, **TINY).double().eval()
    x = torch.randint(1, 16, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    out = m(x, mask)
    torch.testing.assert_close(out[1], m(x[1:, :6])[0], rtol=0, atol=1e-12)


def test_frontend_matches_dft_definition() -> None:
    """Log-mel of a pure tone: energy peaks in the mel band containing the tone's frequency."""
    fe = ConformerCTC(attention={"variant": "softmax"}, vocab_size=5, sample_rate=8000, **TINY_ASR).frontend
    t = torch.arange(8000) / 8000
    feats, frames = fe(torch.sin(2 * torch.pi * 1000 * t)[None], None)
    assert int(frames) == 1 + 8000 // fe.hop == feats.shape[1]
    centers = fe.fbank.argmax(0).double() * (4000 / (fe.n_fft // 2))  # Hz of each filter's peak
    peak = feats[0, 10:-10].mean(0).argmax()
    assert abs(float(centers[peak]) - 1000) < 120


# -- incremental decoding ------------------------------------------------------------------------

CAUSAL_VARIANTS = [n for n in attnlib.available() if attnlib.variant_info(n).decode]  # causal and decodes


def _decode_equals_full(variant: str, kwargs: dict | None = None, *, gqa: int | None = None) -> str:
    torch.manual_seed(0)
    lm = (
        DecoderLM(
            attention={"variant": variant, **(kwargs or {})},
            vocab_size=37,
            dim=16,
            depth=2,
            num_heads=2,
            num_kv_heads=gqa,
        )
        .double()
        .eval()
    )
    x = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        full = lm(x)
        try:
            cache = lm.init_cache(2)
        except attnlib.UnsupportedError as e:  # the variant says why it cannot decode (e.g. needs max_len)
            pytest.skip(str(e))
        parts = [lm(x[:, :5], cache=cache)] + [lm(x[:, t : t + 1], cache=cache) for t in range(5, 13)]
    inc = torch.cat(parts, 1)
    assert cache.length == 13
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-9)
    return cache.modes[0]


@pytest.mark.parametrize("variant", CAUSAL_VARIANTS)
def test_incremental_decoding_equals_full_forward(variant: str) -> None:
    mode = _decode_equals_full(variant)
    assert mode == decode_mode(attnlib.variant_info(variant))


@pytest.mark.parametrize("mode", ["kv", "recompute"])
def test_softmax_decoding_modes_and_gqa(mode: str) -> None:
    torch.manual_seed(0)
    lm = (
        DecoderLM(attention={"variant": "softmax"}, vocab_size=37, dim=32, depth=2, num_heads=4, num_kv_heads=2)
        .double()
        .eval()
    )
    x = torch.randint(0, 37, (2, 9))
    cache = lm.init_cache(2, mode=mode)
    inc = torch.cat([lm(x[:, :1], cache=cache)] + [lm(x[:, t : t + 1], cache=cache) for t in range(1, 9)], 1)
    torch.testing.assert_close(inc, lm(x), rtol=0, atol=1e-10)
    assert cache.layers[0].k.shape[1] == 2  # the cache keeps the 2 key/value heads, not 4


def test_learned_positions_decoding() -> None:
    torch.manual_seed(0)
    lm = DecoderLM(attention={"variant": "softmax"}, vocab_size=37, positions="learned", max_len=16, **TINY).double()
    x = torch.randint(0, 37, (1, 10))
    cache = lm.init_cache(1)
    inc = torch.cat([lm(x[:, :4], cache=cache), lm(x[:, 4:], cache=cache)], 1)
    torch.testing.assert_close(inc, lm(x), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        lm(torch.zeros(1, 17, dtype=torch.long))


class _RecurrentLinear(AttentionCore):
    """Causal linear attention (Katharopoulos et al.) with a recurrent step, to exercise the recurrent path."""

    capabilities = Capabilities(causal=True, recurrent=True, family="test")

    @staticmethod
    def _phi(x):
        return torch.nn.functional.elu(x) + 1

    def attend(self, q, k, v, mask, *, cross, need_weights, need_importance, dropout_p):
        qf, kf = self._phi(q), self._phi(k)
        a = qf @ kf.transpose(-1, -2)
        if mask.causal:
            a = a.tril()
        return CoreOutput((a @ v) / a.sum(-1, keepdim=True))

    def initial_state(self, batch, *, dtype, device):
        d = self.head_dim
        return {
            "S": torch.zeros(batch, self.num_heads, d, d, dtype=dtype, device=device),
            "z": torch.zeros(batch, self.num_heads, d, dtype=dtype, device=device),
        }

    def step(self, q, k, v, state):
        qf, kf = self._phi(q[:, :, 0]), self._phi(k[:, :, 0])
        s = state["S"] + kf[..., :, None] * v[:, :, 0, None, :]
        z = state["z"] + kf
        out = (qf[..., :, None] * s).sum(-2) / (qf * z).sum(-1, keepdim=True)
        return out[:, :, None], {"S": s, "z": z}


def test_recurrent_step_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, "recurrent_test", _RecurrentLinear)
    monkeypatch.setattr(_RecurrentLinear, "name", "recurrent_test", raising=False)
    assert _decode_equals_full("recurrent_test") == "recurrent"
    assert _decode_equals_full("recurrent_test", gqa=1) == "recurrent"
    lm = DecoderLM(attention={"variant": "recurrent_test"}, vocab_size=37, **TINY)
    cache = lm.init_cache(2)
    with pytest.raises(attnlib.UnsupportedError, match="recurrent step, which takes no mask"):
        lm(torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.bool), cache=cache)


def test_cache_errors() -> None:
    attn = attnlib.Attention(16, 2)
    with pytest.raises(ValueError, match="needs a causal Attention"):
        attn.init_cache(1)
    causal = attnlib.Attention(16, 2, variant="local", causal=True, window=4)
    with pytest.raises(attnlib.UnsupportedError, match="causal_cross=False"):
        causal.init_cache(1, mode="kv")
    with pytest.raises(attnlib.UnsupportedError, match="no recurrent step"):
        causal.init_cache(1, mode="recurrent")
    cache = causal.init_cache(2)
    with pytest.raises(ValueError, match="batch mismatch"):
        causal(torch.randn(3, 1, 16), cache=cache)
    with pytest.raises(ValueError, match="return_extras is not available"):
        causal(torch.randn(2, 1, 16), cache=cache, return_extras=True)


def test_kv_cache_key_padding_and_reorder() -> None:
    torch.manual_seed(0)
    attn = attnlib.Attention(16, 2, causal=True, rope=True).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False  # left padding of sequence 0
    full = attn(x, key_padding_mask=keep)
    cache = attn.init_cache(2)
    inc = torch.cat(
        [attn(x[:, :3], cache=cache, key_padding_mask=keep[:, :3])]
        + [attn(x[:, t : t + 1], cache=cache, key_padding_mask=keep[:, : t + 1]) for t in range(3, 6)],
        1,
    )
    torch.testing.assert_close(inc[:, 2:], full[:, 2:], rtol=0, atol=1e-12)
    cache.reorder(torch.tensor([1]))
    assert cache.batch == 1 and cache.k.shape[0] == 1


def test_generate_greedy_matches_argmax_of_full_forward() -> None:
    torch.manual_seed(0)
    lm = DecoderLM(attention={"variant": "softmax"}, vocab_size=37, **TINY).double()
    prompt = torch.randint(0, 37, (2, 4))
    out = lm.generate(prompt, 6, greedy=True)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        for t in range(4, 10):
            assert torch.equal(lm(out[:, :t])[:, -1].argmax(-1), out[:, t])
    assert lm.training  # mode restored
    g = torch.Generator().manual_seed(1)
    s1 = lm.generate(prompt, 5, temperature=0.8, top_k=5, generator=g)
    s2 = lm.generate(prompt, 5, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)
    eos = int(out[0, 4])
    stopped = lm.generate(prompt[:1], 6, greedy=True, eos_token_id=eos)
    assert stopped.shape[1] == 5 and int(stopped[0, -1]) == eos


def test_drop_path_and_vit_pooling() -> None:
    torch.manual_seed(0)
    m = ViT(attention={"variant": "softmax"}, pool="mean", drop_path=0.5, **{**TINY, "depth": 2})
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))  # stochastic depth is active in training
    m.eval()
    pm = torch.ones(4, 16, dtype=torch.bool)
    pm[:, 8:] = False
    assert m(x, patch_mask=pm).shape == (4, 10)


def test_branchformer_merges_follow_the_equations() -> None:
    """learned_ave: per-utterance softmax weights from attention-pooled branch logits (padding ignored);
    fixed_ave: a fixed convex combination; both then one linear map."""
    from attnlib.models.asr import BranchMerge

    torch.manual_seed(0)
    a, m = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    merge = BranchMerge(8, "learned_ave").double()
    y = merge(a, m, valid)
    logits = []
    for x, score, logit in zip((a, m), merge.pool_score, merge.weight_logit):
        rows = []
        for b in range(2):
            n = int(valid[b].sum())
            p = torch.softmax(score(x[b, :n]).squeeze(-1) / 8**0.5, 0)
            rows.append(logit(p @ x[b, :n]))
        logits.append(torch.stack(rows))
    w = torch.softmax(torch.cat(logits, -1), -1)
    torch.testing.assert_close(y, merge.proj(w[:, :1, None] * a + w[:, 1:, None] * m), rtol=0, atol=1e-12)
    torch.testing.assert_close(merge.last_weights.sum(-1), torch.ones(2, dtype=torch.float64))
    a2 = a.clone()
    a2[1, 5:] += 100.0  # padded frames do not move the weights
    merge(a2, m, valid)
    torch.testing.assert_close(merge.last_weights, w, rtol=0, atol=1e-12)
    fixed = BranchMerge(8, "fixed_ave", cgmlp_weight=0.25).double()
    torch.testing.assert_close(fixed(a, m, valid), fixed.proj(0.75 * a + 0.25 * m))
    with pytest.raises(ValueError, match="merge"):
        BranchMerge(8, "sum")
    model = BranchformerCTC(attention={"variant": "softmax"}, vocab_size=5, sample_rate=8000, dim=16, depth=1,
                            num_heads=2, n_mels=16, merge="learned_ave")  # fmt: skip
    assert model.blocks[0].merge.method == "learned_ave"
