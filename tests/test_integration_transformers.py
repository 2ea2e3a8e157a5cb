"""The transformers backend on random-init tiny models (no downloads): equals "sdpa" with softmax,
every causal variant decodes with transformers' cache exactly as without it."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import attnlib
from attnlib import UnsupportedError

transformers = pytest.importorskip("transformers")  # installed by the dev / hf extras
hfa = pytest.importorskip("attnlib.integrations.transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

hfa.register()
VOCAB = 64
CAUSAL = [v for v in attnlib.available() if attnlib.variant_info(v).causal]


def _fast(variant: str) -> bool:
    """Whether the variant decodes on transformers' cache in O(1) per token: a recurrent state, or a window."""
    cls = attnlib.registry.get_variant(variant)
    core = cls(num_heads=4, head_dim=8, **cls.decoding_kwargs())
    return cls.capabilities.decode and (cls.capabilities.recurrent or core.causal_reach() is not None)


FAST = [v for v in CAUSAL if _fast(v)]


def _pair(cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="attnlib").eval()
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == "attnlib"
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _model(variant: str, layers: int = 2, **kwargs):
    """A random-init Llama (GQA) on the attnlib backend with ``variant`` in every layer (no sdpa twin)."""
    torch.manual_seed(0)
    cfg = _llama_cfg(layers)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="attnlib").eval()
    return hfa.set_variant(model, variant, **kwargs)


def _llama_cfg(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=64,
        pad_token_id=0,
    )


def _ids(b: int = 2, n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _padding(side: str, b: int = 2, n: int = 9, pad: int = 3) -> torch.Tensor:
    am = torch.ones(b, n, dtype=torch.long)
    if side == "left":
        am[0, :pad] = 0
    else:
        am[0, n - pad :] = 0
    return am


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_softmax_equals_sdpa_decoders(arch):
    if arch == "llama":
        ref, ours = _pair(LlamaForCausalLM, _llama_cfg())
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
        ref, ours = _pair(GPT2LMHeadModel, cfg)
    ids = _ids()
    for side in ("left", "right"):
        am = _padding(side)
        with torch.no_grad():
            a, b = ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
        real = am.bool()[..., None]
        assert torch.allclose(a * real, b * real, atol=2e-6), side


def test_softmax_equals_sdpa_bert_and_vit():
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ref, ours = _pair(BertModel, cfg)
    ids, am = _ids(), _padding("right")
    with torch.no_grad():
        a = ref(ids, attention_mask=am).last_hidden_state
        b = ours(ids, attention_mask=am).last_hidden_state
    assert torch.allclose(a, b, atol=2e-6)
    vcfg = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    ref, ours = _pair(ViTForImageClassification, vcfg)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, ours(x).logits, atol=2e-6)
    hfa.set_variant(ours, "linear")
    assert ours(x).logits.shape == (2, 3)


@pytest.mark.parametrize("variant", CAUSAL)
def test_causal_variant_in_llama(variant):
    model = _model(variant, **attnlib.registry.get_variant(variant).decoding_kwargs())
    ids = _ids()
    with torch.no_grad():
        full = model(ids).logits

        # no future leak: changing the last tokens leaves the earlier logits alone
        ids2 = ids.clone()
        ids2[:, 6:] = (ids2[:, 6:] + 7) % (VOCAB - 1) + 1
        assert torch.allclose(model(ids2).logits[:, :6], full[:, :6], atol=1e-5)
        # a right-padded row equals the sequence alone
        am = _padding("right")
        padded = model(ids, attention_mask=am).logits
        alone = model(ids[:1, :6]).logits
        assert torch.allclose(padded[0, :6], alone[0], atol=1e-5)
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    if not attnlib.variant_info(variant).decode:  # rows depend on the sequence length: the cache refuses
        with pytest.raises(UnsupportedError, match="decode"):
            model.generate(ids, use_cache=True, **kw)
        return
    # generate with transformers' cache equals recomputing the prefix: one forward over the generated
    # sequence gives every step's logits (what generate(use_cache=False) computes, at a quarter of the cost)
    g1 = model.generate(ids, use_cache=True, **kw)
    with torch.no_grad():
        recomputed = model(g1.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    assert torch.equal(g1.sequences[:, ids.shape[1] :], recomputed.argmax(-1))
    for i, x in enumerate(g1.logits):
        assert torch.allclose(x, recomputed[:, i], atol=1e-5)
    if variant in FAST:  # the O(1) step (recurrent state / window) against recomputing over the prefix
        _fast_decode(model, False)
        g3 = model.generate(ids, use_cache=True, **kw)
        assert torch.equal(g1.sequences, g3.sequences)
        for x, y in zip(g1.logits, g3.logits):
            assert torch.allclose(x, y, atol=1e-5)


def _fast_decode(model, on: bool) -> None:
    for layer in hfa.attention_layers(model):
        layer.attnlib_fast_decode = on


@pytest.mark.parametrize("variant", FAST)
def test_decoding_step_cost_does_not_grow_with_the_prefix(variant):
    """On transformers' cache a decoding step of a recurrent variant makes one recurrent step per layer
    and no parallel call, local attends over window + 1 keys: the same work (FLOPs, step calls, keys
    read) after 6 and after 14 tokens; switched off, the step recomputes over the prefix."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(variant, layers=1, **attnlib.registry.get_variant(variant).decoding_kwargs())
    layers = hfa.attention_layers(model)
    seen: dict[str, list[int]] = {"steps": [], "keys": []}
    for layer in layers:
        core = layer.attnlib_core
        core.register_forward_pre_hook(lambda mod, args: seen["keys"].append(args[1].shape[2]))
        if core.capabilities.recurrent:
            step = core.step
            core.step = lambda *a, _s=step: seen["steps"].append(1) or _s(*a)

    def step_cost(prefix: int, count_flops: bool = True) -> dict:
        ids = _ids(n=prefix + 2)
        with torch.no_grad():
            cache = model(ids[:, :prefix], use_cache=True).past_key_values
            model(ids[:, prefix : prefix + 1], past_key_values=cache, use_cache=True)  # first step (builds the state)
            seen["steps"].clear(), seen["keys"].clear()
            with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as flops:
                model(ids[:, prefix + 1 :], past_key_values=cache, use_cache=True)
        held = layers[0].__dict__.get("_attnlib_state")
        return {
            "flops": flops.get_total_flops() if count_flops else None,
            "steps": len(seen["steps"]),
            "keys read": list(seen["keys"]),
            "state size": 0 if held is None else sum(t.numel() for t in held.state.values()),
        }

    short, long = step_cost(6), step_cost(14)
    if short["state size"] != long["state size"]:  # a state that grows by design (aft_full keeps every key)
        for cost in (short, long):
            del cost["flops"], cost["state size"]
    assert short == long, f"{variant}: a step after 6 tokens costs {short}, after 14 {long}"
    if attnlib.variant_info(variant).recurrent:
        assert short["steps"] == len(layers) and short["keys read"] == []  # one step per layer, no parallel call
    else:
        assert short["steps"] == 0 and len(short["keys read"]) == len(layers)
    _fast_decode(model, False)
    assert step_cost(6, False)["keys read"] != step_cost(14, False)["keys read"]  # recomputation reads the prefix


@pytest.mark.parametrize("variant", ["softmax", "linear", "local"])
def test_generate_left_padded_batch(variant):
    """Left padding: exact attention (softmax), a recurrent variant (recomputes: its step takes no
    mask) and a window (the padding mask sliced with the keys)."""
    ref, model = _pair(LlamaForCausalLM, _llama_cfg())
    hfa.set_variant(model, variant, **attnlib.registry.get_variant(variant).decoding_kwargs())  # local: window 3
    ids, am = _ids(), _padding("left")
    kw = {"max_new_tokens": 3, "do_sample": False, "attention_mask": am}
    seq = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(seq, model.generate(ids, use_cache=False, **kw))
    if variant == "softmax":
        assert torch.equal(seq, ref.generate(ids, **kw))


def test_mask_split():
    n = m = 5
    causal = torch.ones(n, m, dtype=torch.bool).tril()
    kp = torch.tensor([[False, False, True, True, True], [True] * 5])
    mask = (causal & kp[:, None, :])[:, None]
    assert hfa.split_mask(mask, True)[0] is True
    assert torch.equal(hfa.split_mask(mask, True)[1], kp)
    causal_flag, padding = hfa.split_mask(kp[:, None, None, :].expand(2, 1, n, m), False)
    assert causal_flag is False and torch.equal(padding, kp)
    band = causal & ~torch.ones(n, m, dtype=torch.bool).tril(-2)  # a sliding window does not split
    assert hfa.split_mask(band[None, None], True) is None
    additive = torch.zeros(1, 1, n, m).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert hfa.split_mask(additive, True) == (True, None)


def test_unsplittable_mask_raises_for_linear_and_runs_for_softmax():
    _, model = _pair(LlamaForCausalLM, _llama_cfg())
    layer = hfa.attention_layers(model)[0]
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    band = torch.ones(5, 5, dtype=torch.bool).tril() & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)
    out, _ = hfa.attention_forward(layer, q, k, k, band[None, None], scaling=8**-0.5)
    ref = attnlib.functional.attention(q, k, k, mask=band)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    hfa.set_variant(model, "linear")
    with pytest.raises(UnsupportedError, match="causal \\+ key-padding"):
        hfa.attention_forward(layer, q, k, k, band[None, None])


def test_scaling_autocast_mixed_dtypes_and_dropout():
    _, model = _pair(LlamaForCausalLM, _llama_cfg())
    layer = hfa.attention_layers(model)[0]
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = hfa.attention_forward(layer, q, k, v, None, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = hfa.attention_forward(layer, q, k, v.bfloat16(), None, scaling=8**-0.5)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float().transpose(1, 2), ref * 0 + out.float().transpose(1, 2))
    model.train()
    torch.manual_seed(0)
    o1, _ = hfa.attention_forward(layer, q, k, v, None, dropout=0.5, scaling=8**-0.5)
    model.eval()
    o2, _ = hfa.attention_forward(layer, q, k, v, None, dropout=0.0, scaling=8**-0.5)
    assert not torch.allclose(o1, o2)


def test_aux_loss_reaches_the_training_loop():
    _, model = _pair(LlamaForCausalLM, _llama_cfg())
    hfa.set_variant(model, "seer", **attnlib.registry.get_variant("seer").conformance_kwargs(), layers=[1])
    model.train()
    ids = _ids(n=16)
    loss = model(ids, labels=ids).loss
    aux = attnlib.aux_loss(model)
    assert aux.ndim == 0 and float(aux.detach()) > 0
    (loss + aux).backward()
    gate = hfa.attention_layers(model)[1].attnlib_core
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_set_variant_needs_the_backend():
    ref, _ = _pair(LlamaForCausalLM, _llama_cfg())
    with pytest.raises(ValueError, match="register"):
        hfa.set_variant(ref, "linear")


@pytest.mark.parametrize("variant", ["linear", "local", "grat", "softmax"])
def test_beam_search_follows_the_cache_reorder(variant, monkeypatch):
    """generate(num_beams=3) on transformers' cache equals beam search that recomputes every step
    (use_cache=False): the layers' recurrent state (linear), window (local) and kept prefix queries
    (grat) are re-indexed with the cache at every reorder, and the reorders really permute beams."""
    model = _model(variant, **attnlib.registry.get_variant(variant).decoding_kwargs())
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "output_scores": True}
    kw |= {"return_dict_in_generate": True, "early_stopping": False}
    edits: list[tuple[str, torch.Tensor]] = []
    select_rows = hfa._select_rows
    monkeypatch.setattr(
        hfa, "_select_rows", lambda m, method, arg: (edits.append((method, arg)), select_rows(m, method, arg))
    )
    cached = model.generate(_ids(), use_cache=True, **kw)
    monkeypatch.undo()
    recomputed = model.generate(_ids(), use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.allclose(cached.sequences_scores, recomputed.sequences_scores, atol=1e-5)
    # the cache's reorders reached the layers, and at least one was not the identity
    assert edits and all(method == "reorder_cache" for method, _ in edits)
    assert any(not torch.equal(idx.cpu(), torch.arange(idx.numel())) for _, idx in edits)


@pytest.mark.parametrize(("variant", "kwargs"), [("cosformer", {}), ("seer", {"block_size": 4, "gate_dim": 8})])
def test_options_that_cannot_decode_refuse_on_the_framework_cache(variant, kwargs):
    """cosformer without max_len and seer's official (length-dependent) selection raise on a cached
    decoding step instead of giving a result that differs from recomputation."""
    _, model = _pair(LlamaForCausalLM, _llama_cfg())
    hfa.set_variant(model, variant, **kwargs)
    with pytest.raises(UnsupportedError, match="decode"):
        model.generate(_ids(), use_cache=True, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("variant", ["linear", "grat"])
def test_batch_edits_of_the_cache_follow_into_the_layers(variant):
    """batch_repeat_interleave and batch_select_indices on the cache (contrastive search, assisted
    decoding) re-index the layers' state too: the next cached step equals recomputing its rows."""
    from transformers import DynamicCache

    model = _model(variant, **attnlib.registry.get_variant(variant).decoding_kwargs())
    ids = _ids(b=2, n=7)
    nxt = torch.randint(1, VOCAB, (2, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        index = torch.tensor([3, 0, 1])
        cache.batch_select_indices(index)  # rows 1, 0, 0
        rows = torch.arange(2).repeat_interleave(2)[index]
        keep = torch.tensor([True, False, True])  # a bool selection: rows 1, 0
        cache.batch_select_indices(keep)
        rows = rows[keep]
        step = model(nxt[rows], cache=cache, use_cache=True).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1)[rows]).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-5)
