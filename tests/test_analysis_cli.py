"""attnlib-analyze on tiny trained vit_digits and lm_chars runs (figures + summary), entropy curves
logged by the trainer, and attnlib-train distill_from= with attention distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from attnlib.analysis.report import entropy_curves
from attnlib.cli.analyze import main as analyze
from attnlib.training import train

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1"]
TINY = [
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.checkpoint_every=4",
    "trainer.eval_limit=16",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
]
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(*overrides: str):
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return root


def _lm(corpus: Path, cache: Path) -> list[str]:
    return [
        "experiment=lm_chars",
        f"data.root={corpus}",
        f"data.cache_dir={cache}",
        "data.seq_len=24",
        "data.batch_size=4",
        "data.max_eval_tokens=256",
    ]


def _vit(cache: Path) -> list[str]:
    return ["experiment=vit_digits", "data.batch_size=16", f"data.cache_dir={cache}"]


def _figures(out: Path) -> set[str]:
    pngs = {p.name for p in out.glob("*.png")}
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, p
    return pngs


def test_analyze_a_vit_digits_run(tmp_path: Path) -> None:
    run = tmp_path / "vit"
    train(_cfg(*_vit(tmp_path / "cache"), *QUIET, *TINY), run)
    curves = entropy_curves(run / "metrics.csv")  # logged at steps 2 and 4 by the trainer
    assert sorted(curves) == [0, 1] and sorted(curves[0]) == [0, 1]
    steps, ent = curves[1][0]
    assert steps == [2, 4] and all(0 < e <= math.log(17) + 1e-6 for e in ent)  # 16 patches + class token
    assert analyze([str(run), "--examples", "3", "--batches", "2"]) == 0
    out = run / "analysis"
    assert _figures(out) == {
        "attention_maps.png",
        "rollout.png",
        "attention_distance.png",
        "head_entropy.png",
        "head_importance.png",
        "head_ablation.png",
    }
    summary = (out / "summary.md").read_text()
    assert "variant `softmax`" in summary and "(rollout.png)" in summary and "pixels" in summary
    assert "test_accuracy" in summary


def test_analyze_an_lm_chars_run(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "lm"
    train(_cfg(*_lm(corpus, tmp_path / "cache"), *QUIET, *TINY), run)
    out = tmp_path / "figs"
    assert analyze([str(run), "--out", str(out), "--examples", "2", "--batches", "1", "--split", "test"]) == 0
    assert {"attention_maps.png", "rollout.png", "head_entropy.png", "head_importance.png", "induction.png"} <= (
        _figures(out)
    )
    summary = (out / "summary.md").read_text()
    assert "Verbatim recall" in summary and "Induction score per head" in summary and "tokens)" in summary


def test_analyze_a_variant_without_weights_and_bad_input(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "aft"
    train(_cfg(*_lm(corpus, tmp_path / "cache"), *QUIET, *TINY, "attention=aft_simple"), run)
    assert analyze([str(run), "--examples", "2", "--batches", "1"]) == 0
    out = run / "analysis"
    assert _figures(out) == {"head_importance.png", "head_ablation.png"}
    summary = (out / "summary.md").read_text()
    assert "reports no attention weights" in summary and "no entropy curves" in summary
    assert analyze([str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["maps", "relations"])
def test_train_with_attention_distillation(tmp_path: Path, corpus: Path, kind: str) -> None:
    base = _lm(corpus, tmp_path / "cache")
    teacher = tmp_path / "teacher"
    train(_cfg(*base, *QUIET, *TINY, "model.dim=32", "model.num_heads=4", "model.depth=3"), teacher)
    student = tmp_path / "student"
    res = train(
        _cfg(
            *base,
            *QUIET,
            *TINY,
            f"distill_from={teacher}",
            f"trainer.distill_attention={kind}",
            "trainer.distill_relation_heads=4",
        ),
        student,
    )
    assert res["distill_from"] == str(teacher) and math.isfinite(res["test_bpc"])
    saved = json.loads((student / "results.json").read_text())
    assert saved["steps"] == 4


def test_vit_attention_maps_distillation_with_logit_kd(tmp_path: Path) -> None:
    base = _vit(tmp_path / "cache")
    teacher = tmp_path / "teacher"
    train(_cfg(*base, *QUIET, *TINY, "model.num_heads=4"), teacher)
    res = train(_cfg(*base, *QUIET, *TINY, f"distill_from={teacher}", "trainer.distill_attention=maps"), tmp_path / "s")
    assert math.isfinite(res["test_loss"])
    with pytest.raises(ValueError, match="distill_from"):
        train(_cfg(*base, *QUIET, *TINY, "trainer.distill_attention=maps"), tmp_path / "nope")
