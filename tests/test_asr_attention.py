"""The attention-decoder ASR model: CTC prefix scores against brute force and torch's CTC loss,
step-by-step decoding == the teacher-forced forward (every cross-attention kind), joint beam
search against exhaustive search, joint loss, build-time capability errors and the Hydra config."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import Tensor

import attnlib
from attnlib.models import ConformerAED, build_model
from attnlib.models.asr_attention import ctc_frames, ctc_prefix_extend, ctc_prefix_init
from attnlib.training.tasks import train_loss

TINY = {"dim": 16, "depth": 1, "num_heads": 2, "n_mels": 16, "specaugment": None, "subsample_channels": 4}


def _collapse(path: tuple[int, ...], blank: int) -> list[int]:
    out, prev = [], None
    for s in path:
        if s != prev and s != blank:
            out.append(s)
        prev = s
    return out


def test_ctc_prefix_scores_equal_brute_force_sums_over_alignments() -> None:
    """psi(g + c) = log of the total probability of the alignments whose labels start with g + c;
    the blank column (end of prefix) = log p(labels == g) = -CTC loss of g."""
    t_len, v, blank = 4, 3, 0
    lp = torch.log_softmax(torch.randn(t_len, v, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    probs: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t_len):
        lab = tuple(_collapse(path, blank))
        probs[lab] = probs.get(lab, 0.0) + math.exp(sum(float(lp[t, s]) for t, s in enumerate(path)))
    x = ctc_frames(lp[None], torch.tensor([t_len]), blank)
    for prefix in [(), (1,), (2,), (1, 1), (1, 2), (2, 1, 2)]:
        r = ctc_prefix_init(x, blank)
        last = torch.tensor([-1])
        for c in prefix:  # walk the scorer along the prefix
            _, r_ext = ctc_prefix_extend(x, r, last, blank)
            r, last = r_ext[:, :, c], torch.tensor([c])
        psi, _ = ctc_prefix_extend(x, r, last, blank)
        for c in range(1, v):
            want = sum(p for lab, p in probs.items() if lab[: len(prefix) + 1] == (*prefix, c))
            got = float(psi[0, c].exp())
            assert got == pytest.approx(want, rel=1e-10, abs=1e-300), (prefix, c)
        end = float(psi[0, blank])
        target = torch.tensor([list(prefix)]) if prefix else torch.zeros(1, 0, dtype=torch.long)
        nll = F.ctc_loss(lp[:, None], target, torch.tensor([t_len]), torch.tensor([len(prefix)]), reduction="sum")
        assert end == pytest.approx(-float(nll), rel=1e-10)


def test_padded_frames_do_not_change_prefix_scores() -> None:
    lp = torch.log_softmax(torch.randn(2, 6, 4, dtype=torch.float64), -1)
    lengths = torch.tensor([6, 4])
    x = ctc_frames(lp, lengths, 0)
    x_alone = ctc_frames(lp[1:, :4], lengths[1:], 0)
    r, r1 = ctc_prefix_init(x, 0), ctc_prefix_init(x_alone, 0)
    psi, _ = ctc_prefix_extend(x, r, torch.tensor([-1, -1]), 0)
    psi1, _ = ctc_prefix_extend(x_alone, r1, torch.tensor([-1]), 0)
    torch.testing.assert_close(psi[1], psi1[0], rtol=0, atol=1e-12)


def _model(cross: dict | None = None, self_attn: dict | None = None, **kw) -> ConformerAED:
    torch.manual_seed(0)
    return ConformerAED(
        attention={"variant": "softmax"},
        decoder_attention=self_attn,
        cross_attention=cross,
        vocab_size=5,
        sample_rate=8000,
        decoder_depth=2,
        **TINY,
        **kw,
    ).double()


CROSS = [
    {"variant": "softmax"},
    {"variant": "additive"},
    {"variant": "additive", "hard": True},
    {"variant": "monotonic", "chunk_size": 2, "init_r": 0.5},
    {"variant": "monotonic", "chunk_size": None, "init_r": 0.0, "inference": "expected"},
]


CASES = [({"variant": "softmax"}, c) for c in CROSS] + [({"variant": "linear"}, CROSS[3])]  # linear: recurrent


@pytest.mark.parametrize(("self_attn", "cross"), CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_step_by_step_decoding_equals_the_teacher_forced_forward(self_attn: dict, cross: dict) -> None:
    m = _model(cross, self_attn).eval()
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(3, 9, 16, dtype=torch.float64, generator=g)
    valid = torch.arange(9)[None] < torch.tensor([9, 6, 4])[:, None]
    tokens = torch.randint(0, 5, (3, 6), generator=g)
    full = F.log_softmax(m.decoder(tokens, memory, valid), -1)
    state = m.decoder.init_state(3)
    for t in range(6):
        step = m.decoder.step(tokens[:, t], memory, valid, state)
        torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
    # the beam search reorders hypotheses: reordered states continue as the selected rows would
    perm = torch.tensor([2, 2, 0])
    state = m.decoder.init_state(3)
    for t in range(3):
        m.decoder.step(tokens[:, t], memory, valid, state)
    state.reorder(perm)
    step = m.decoder.step(tokens[perm, 3], memory[perm], valid[perm], state)
    torch.testing.assert_close(step, full[perm, 3], rtol=0, atol=1e-10)


@torch.no_grad()
def _joint_score(m: ConformerAED, memory, valid, ctc_lp, frames, seq: list[int], lam: float) -> float:
    ys_in = torch.tensor([[m.eos, *seq]])
    att = F.log_softmax(m.decoder(ys_in, memory, valid), -1)[0]
    target = [*seq, m.eos]
    a = sum(float(att[i, c]) for i, c in enumerate(target))
    nll = F.ctc_loss(ctc_lp[0, :, None], torch.tensor([seq]) if seq else torch.zeros(1, 0, dtype=torch.long),
                     frames, torch.tensor([len(seq)]), reduction="sum")  # fmt: skip
    return (1 - lam) * a + lam * -float(nll)


@pytest.mark.parametrize(("lam", "normalize"), [(0.0, False), (0.3, True), (1.0, False)])
def test_beam_search_with_a_wide_beam_is_exhaustive(lam: float, normalize: bool) -> None:
    """Vocabulary {eos, 1, 2}, 3 frames: every hypothesis (at most 3 labels) fits in a beam of 64, so
    the search returns the argmax of the joint score (over labels + 1 with length normalisation)."""
    torch.manual_seed(0)
    m = ConformerAED(attention={"variant": "softmax"}, vocab_size=3, sample_rate=8000, **TINY).double().eval()
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(1, 3, 16, dtype=torch.float64, generator=g) * 3
    frames = torch.tensor([3])
    valid = torch.ones(1, 3, dtype=torch.bool)
    ctc_lp = torch.log_softmax(torch.randn(1, 3, 3, dtype=torch.float64, generator=g) * 2, -1)
    hyps = [list(s) for n in range(4) for s in itertools.product([1, 2], repeat=n)]
    scores = {tuple(h): _joint_score(m, memory, valid, ctc_lp, frames, h, lam) for h in hyps}
    if normalize:
        scores = {h: s / (len(h) + 1) for h, s in scores.items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    got = m.beam_search(memory, frames, ctc_lp, beam_size=64, ctc_weight=lam,
                        length_normalize=normalize)  # fmt: skip
    assert tuple(got[0]) == best, (got, best, scores)


def test_beam_one_without_ctc_is_greedy_decoding() -> None:
    m = _model({"variant": "softmax"}).eval()
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(2, 7, 16, dtype=torch.float64, generator=g) * 3
    frames = torch.tensor([7, 5])
    valid = torch.arange(7)[None] < frames[:, None]
    got = m.beam_search(memory, frames, torch.zeros(2, 7, 5), beam_size=1, ctc_weight=0.0, length_normalize=False)
    for b in range(2):
        seq: list[int] = []
        while len(seq) < int(frames[b]):
            logits = m.decoder(torch.tensor([[m.eos, *seq]]), memory[b : b + 1], valid[b : b + 1])
            c = int(logits[0, -1].argmax())
            if c == m.eos:
                break
            seq.append(c)
        assert got[b] == seq


def test_joint_loss_and_training_hook() -> None:
    m = _model({"variant": "additive", "hard": True, "semi_sampling_p": 1.0}, ctc_weight=0.4).train()
    wave = torch.randn(2, 4000, dtype=torch.float64) * 0.1
    lengths = torch.tensor([4000, 3000])
    targets = torch.tensor([[1, 2, 3], [4, 1, 0]])
    tl = torch.tensor([3, 2])
    batch = {"wave": wave, "lengths": lengths, "targets": targets, "target_lengths": tl}
    torch.manual_seed(5)
    loss, n = train_loss(m, batch, "ctc")
    assert n == 2 and loss.dim() == 0
    loss.backward()
    cross = m.decoder.layers[1].cross_attn.core
    assert cross.w_q.grad is not None and cross.w_q.grad.abs().sum() > 0  # REINFORCE reached the scores
    assert float(cross.baseline) != 0.0
    m.eval()  # eval: no sampling; the loss is the weighted sum of the two terms
    with torch.no_grad():
        lp, frames = m(wave, lengths)
        ctc = m.ctc_loss(lp, frames, targets, tl)
        x, _ = m.encode(wave, lengths)
        ys_in, ys_out = m._teacher_forcing(targets, tl)
        assert ys_in.tolist() == [[0, 1, 2, 3], [0, 4, 1, 0]] and ys_out.tolist() == [[1, 2, 3, 0], [4, 1, 0, -100]]
        logits = m.decoder(ys_in, x, torch.arange(x.shape[1])[None] < frames[:, None])
        att = F.cross_entropy(logits.flatten(0, 1), ys_out.flatten(), ignore_index=-100, label_smoothing=0.1)
        torch.testing.assert_close(m(wave, lengths, targets, tl), 0.4 * ctc + 0.6 * att)
    assert all(isinstance(h, list) for h in m.transcribe(wave, lengths))


def test_build_errors_name_the_variant_and_capability() -> None:
    with pytest.raises(attnlib.UnsupportedError, match=r"'local'.*capabilities\.cross=True"):
        _model({"variant": "local"})
    with pytest.raises(attnlib.UnsupportedError, match=r"'monotonic'.*capabilities\.causal=True"):
        _model(None, {"variant": "monotonic"})
    with pytest.raises(ValueError, match="no_cross_layers=2 leaves no layer"):
        _model(no_cross_layers=2)
    with pytest.raises(ValueError, match="ctc_weight must be a number in"):
        _model(ctc_weight=1.5)
    pruned = _model(no_cross_layers=1)
    assert pruned.decoder.layers[0].cross_attn is None and pruned.decoder.layers[1].cross_attn is not None


def test_hydra_config_picks_each_attention() -> None:
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=asr_digits_aed",
                "attention=local",
                "attention@model.decoder_attention=linear",
                "attention@model.cross_attention=monotonic",
                "model.cross_attention.chunk_size=1",
            ],
        )
    assert cfg.model.name == "asr_attention" and cfg.data.name == "speech_digits"
    tiny = {k: v for k, v in TINY.items()}
    m = build_model(cfg.model, cfg.attention, vocab_size=11, sample_rate=8000, **tiny)
    assert m.variant == "local"
    assert m.decoder.layers[0].self_attn.variant == "linear"
    assert m.decoder.layers[0].cross_attn.variant == "monotonic" and m.decoder.layers[0].cross_attn.core.chunk_size == 1


def test_padded_batch_transcribes_as_each_utterance_alone() -> None:
    m = _model({"variant": "monotonic", "chunk_size": 2, "init_r": 0.5}).eval()
    g = torch.Generator().manual_seed(4)
    wave = torch.randn(2, 4000, dtype=torch.float64, generator=g) * 0.1
    lengths = torch.tensor([4000, 2600])
    both = m.transcribe(wave, lengths, beam_size=3)
    alone = [m.transcribe(wave[i : i + 1, : int(lengths[i])], beam_size=3)[0] for i in range(2)]
    assert both == alone and all(both)  # non-empty, different hypotheses


def _relaxed_cross_reference(attn: attnlib.Attention, x: Tensor, memory: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """Relaxed cross-attention the slow way (float64): O = W_o [((1 - gamma) A + gamma U) V] per head,
    A = softmax(q k^T / sqrt(D)) over the valid frames, U_ij = 1 / #valid frames of the utterance."""
    dim, h = attn.dim, attn.num_heads
    d = dim // h
    w, bias = attn.in_proj.weight, attn.in_proj.bias
    q = x @ w[:dim].T + bias[:dim]
    k = memory @ w[dim : 2 * dim].T + bias[dim : 2 * dim]
    v = memory @ w[2 * dim :].T + bias[2 * dim :]
    out = torch.zeros_like(q)
    for b in range(x.shape[0]):
        keep = valid[b]
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            s = q[b, :, sl] @ k[b, keep, sl].T / math.sqrt(d)
            a = torch.softmax(s, -1)
            u = torch.full_like(a, 1.0 / int(keep.sum()))
            out[b, :, sl] = ((1 - gamma) * a + gamma * u) @ v[b, keep, sl]
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def test_relaxed_cross_attention_config_reaches_the_cross_attention_only() -> None:
    """experiment=asr_digits_aed_relaxed puts the relaxed modifier (gamma 0.35, training only) on every
    decoder cross-attention and on no other attention of the model."""
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=asr_digits_aed_relaxed"])
        plain = compose("train", overrides=["experiment=asr_digits_aed"])
    m = build_model(cfg.model, cfg.attention, vocab_size=11, sample_rate=8000, **TINY)
    assert list(plain.model.cross_attention.modifiers) == [] and list(plain.attention.modifiers) == []
    cross = {id(layer.cross_attn) for layer in m.decoder.layers}
    attns = [mod for mod in m.modules() if isinstance(mod, attnlib.Attention)]
    assert len(attns) == len(m.blocks) + 2 * len(m.decoder.layers)
    for a in attns:
        if id(a) in cross:
            assert a.modifiers.names() == ["relaxed"]
            (r,) = a.modifiers.mods
            assert (r.gamma, r.when) == (0.35, "train")
        else:
            assert len(a.modifiers) == 0


def test_relaxed_cross_attention_equals_its_definition_in_training_only() -> None:
    """In training each decoder cross-attention computes (1 - gamma) A + gamma U over the valid encoder
    frames (checked against the explicit weights on the inputs it received); in eval the relaxed model
    equals the plain one (the papers relax in training only)."""
    gamma = 0.35
    relaxed_cfg = {"variant": "softmax", "modifiers": [{"name": "relaxed", "gamma": gamma}]}
    relaxed = _model(relaxed_cfg, decoder_dropout=0.0)
    plain = _model({"variant": "softmax"}, decoder_dropout=0.0)
    plain.load_state_dict(relaxed.state_dict())
    g = torch.Generator().manual_seed(6)
    memory = torch.randn(3, 9, 16, dtype=torch.float64, generator=g) * 2
    valid = torch.arange(9)[None] < torch.tensor([9, 6, 4])[:, None]
    tokens = torch.randint(0, 5, (3, 5), generator=g)
    seen: list[tuple] = []

    def record(mod, args, kwargs, out):  # the cross-attention's query input, memory, padding and output
        seen.append((mod, args[0], args[1], kwargs["key_padding_mask"], out))

    hooks = [layer.cross_attn.register_forward_hook(record, with_kwargs=True) for layer in relaxed.decoder.layers]
    relaxed.decoder.train()
    logits = relaxed.decoder(tokens, memory, valid)
    for hk in hooks:
        hk.remove()
    assert len(seen) == len(relaxed.decoder.layers)
    for mod, x, mem, keep, out in seen:
        torch.testing.assert_close(out, _relaxed_cross_reference(mod, x, mem, keep, gamma), rtol=0, atol=1e-12)
    plain.decoder.train()
    assert (logits - plain.decoder(tokens, memory, valid)).abs().max() > 1e-5  # relaxation changed the training pass
    relaxed.eval()
    plain.eval()
    torch.testing.assert_close(
        relaxed.decoder(tokens, memory, valid), plain.decoder(tokens, memory, valid), rtol=0, atol=0
    )
