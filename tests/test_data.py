"""Data modules: deterministic splits and batches, DDP slices, generator semantics, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlib.data import CharsData, DigitsData, ListOpsData, MQARData, SpeechDigitsData, build_data
from attnlib.data.listops import VOCAB, evaluate_listops, generate_listops
from attnlib.data.mqar import multiquery_ar
from attnlib.data.speech_digits import espeak_available


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_digits_split_and_determinism() -> None:
    d = DigitsData(batch_size=32)
    d.ensure_setup()
    sizes = (d.num_train(), d.eval_examples("val"), d.eval_examples("test"))
    assert sizes == (1293, 144, 360) and sum(sizes) == 1797
    for s in ("val", "test"):  # stratified: every class present in held-out splits
        assert set(d.y[s].tolist()) == set(range(10))
    b1, b2 = d.train_batch(7), DigitsData(batch_size=32).train_batch(7)
    assert _same(b1, b2) and b1["x"].shape == (32, 1, 8, 8)
    assert not torch.equal(d.train_batch(8)["x"], b1["x"])
    # one epoch visits every training example exactly once
    idx = torch.cat([d.train_indices(s) for s in range(1293 // 32)])
    assert len(set(idx.tolist())) == len(idx)
    # augmentation only shifts: with shift=0 the batch is the stored images
    plain = DigitsData(batch_size=32, shift=0)
    torch.testing.assert_close(plain.train_batch(7)["x"], plain.x["train"][plain.train_indices(7)])


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_ranks_slice_the_global_batch(world: int) -> None:
    d = DigitsData(batch_size=32)
    full = d.train_batch(3)
    parts = [d.train_batch(3, rank=r, world=world) for r in range(world)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), full["x"])
    assert torch.equal(torch.cat([p["y"] for p in parts]), full["y"])
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        d.train_batch(0, rank=0, world=3)
    seen = [b["y"] for r in range(world) for b in d.eval_batches("test", rank=r, world=world)]
    assert sum(len(y) for y in seen) == 360


def test_mqar_matches_the_task_definition() -> None:
    x, y = multiquery_ar(200, vocab_size=128, seq_len=64, num_kv_pairs=8, seed=3)
    assert x.shape == y.shape == (200, 64)
    for e in range(200):
        keys, vals = x[e, 0:16:2], x[e, 1:16:2]
        assert len(set(keys.tolist())) == 8 and len(set(vals.tolist())) == 8
        assert bool((keys >= 1).all() and (keys < 64).all() and (vals >= 64).all())
        pos = torch.nonzero(y[e] != -100)[:, 0]
        assert len(pos) == 8 and bool((pos >= 16).all()) and bool((pos % 2 == 0).all())
        table = dict(zip(keys.tolist(), vals.tolist()))
        for p in pos.tolist():
            assert table[int(x[e, p])] == int(y[e, p])  # the label is the queried key's value
    x2, _ = multiquery_ar(200, vocab_size=128, seq_len=64, num_kv_pairs=8, seed=3)
    assert torch.equal(x, x2)
    # power law: small gaps are much more likely than large ones
    gaps = (torch.nonzero(y != -100)[:, 1] - 16) // 2
    assert (gaps < 4).float().mean() > (gaps >= 20).float().mean()
    with pytest.raises(ValueError, match="vocab_size"):
        multiquery_ar(1, vocab_size=32, seq_len=64, num_kv_pairs=4)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        multiquery_ar(1, vocab_size=256, seq_len=64, num_kv_pairs=17)


def test_listops_generator_and_evaluator(tmp_path) -> None:
    assert evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    assert evaluate_listops("[MED 1 9 2 ]".split()) == 2
    assert evaluate_listops("[MED 1 2 3 8 ]".split()) == 2  # int(median) = int(2.5)
    assert evaluate_listops("[SM 5 7 9 ]".split()) == 1
    ex = generate_listops(200, min_length=10, max_length=40, seed=1)
    assert len({tuple(t) for t, _ in ex}) == 200
    for toks, v in ex:
        assert 10 < len(toks) < 40 and evaluate_listops(toks) == v
    d = ListOpsData(
        min_length=10, max_length=40, num_train=64, num_val=16, num_test=16, batch_size=8, cache_dir=str(tmp_path)
    )
    b = d.train_batch(0)
    assert b["x"].shape[0] == 8 and torch.equal(b["mask"], b["x"] != 0)
    row = [VOCAB[int(t)] for t in b["x"][0][b["mask"][0]]]
    assert evaluate_listops(row) == int(b["y"][0])
    d2 = ListOpsData(
        min_length=10, max_length=40, num_train=64, num_val=16, num_test=16, batch_size=8, cache_dir=str(tmp_path)
    )
    assert _same(d2.train_batch(0), b)  # from the cache


def test_chars_split_by_path_hash(tmp_path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i + 5))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("SKIPPED\n")
    d = CharsData(
        root=str(root), seq_len=16, batch_size=4, val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c")
    )
    d.ensure_setup()
    text = {s: bytes(t.to(torch.uint8).tolist()).decode() for s, t in d.streams.items()}
    assert "SKIPPED" not in "".join(text.values())
    for i in range(40):
        assert sum(f"# module {i}\n" in t for t in text.values()) == 1  # each file in exactly one split
    b = d.train_batch(5)
    assert b["tokens"].shape == (4, 17) and b["tokens"].max() < 256
    assert torch.equal(
        b["tokens"],
        CharsData(
            root=str(root), seq_len=16, batch_size=4, val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c")
        ).train_batch(5)["tokens"],
    )
    ev = next(d.eval_batches("val"))["tokens"]
    assert torch.equal(ev[0, -1], ev[1, 0])  # consecutive windows share their boundary byte
    with pytest.raises(FileNotFoundError, match="no files matching"):
        CharsData(root=str(tmp_path / "c"), pattern="*.txt").ensure_setup()


def test_build_data_errors() -> None:
    with pytest.raises(ValueError, match="unknown data 'digitz'; did you mean 'digits'"):
        build_data({"name": "digitz"})
    with pytest.raises(TypeError):
        build_data({"name": "digits", "nope": 1})
    assert isinstance(build_data({"name": "mqar", "num_train": 10}), MQARData)


def test_speech_digits_missing_espeak_message(monkeypatch, tmp_path) -> None:
    import attnlib.data.speech_digits as sd

    monkeypatch.setattr(sd.shutil, "which", lambda _: None)
    d = SpeechDigitsData(num_train=2, num_val=1, num_test=1, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="espeak-ng, which was not found.*apt-get install espeak-ng"):
        d.ensure_setup()


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed (apt-get install espeak-ng; .ci/run does)")
def test_speech_digits_synthesis(tmp_path) -> None:
    d = SpeechDigitsData(num_train=6, num_val=2, num_test=3, batch_size=3, cache_dir=str(tmp_path), workers=2)
    d.ensure_setup()
    train_strings = set(d.data["train"]["text"])
    assert not train_strings & set(d.data["test"]["text"])  # test strings are held out
    b = d.train_batch(0)
    assert b["wave"].shape[0] == 3 and int(b["lengths"].max()) == b["wave"].shape[1]
    assert all(int(b["lengths"][i]) > 0.2 * d.sample_rate for i in range(3))  # at least 0.2 s of speech
    for i, t in enumerate(b["text"]):
        assert d.decode_labels(b["targets"][i, : b["target_lengths"][i]].tolist()) == t
    assert float(np.abs(d.data["test"]["waves"][0].numpy()).max()) > 0.05
    w = SpeechDigitsData(num_train=6, num_val=2, num_test=3, targets="words", cache_dir=str(tmp_path))
    w.ensure_setup()
    assert w.transcript("30") == "three zero" and w.model_kwargs()["vocab_size"] == 28
