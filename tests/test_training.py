"""attnlib-train: every experiment runs end to end (tiny), results/metrics/checkpoints, non-finite stop,
exact resume after SIGKILL, 2-process DDP == 1 process, multirun sweep, Slurm launcher config."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import attnlib
from attnlib.data.speech_digits import espeak_available
from attnlib.training import NonFiniteLossError, load_checkpoint, train
from attnlib.training import loop as loop_mod

CONFIGS = Path(attnlib.__file__).parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1"]
TINY_TRAIN = [
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.checkpoint_every=2",
    "trainer.eval_limit=16",
]
TINY_MODEL = ["model.dim=16", "model.depth=1", "model.num_heads=2"]
TINY_DATA = {
    "vit_digits": ["data.batch_size=16"],
    "vit_digits_topk": ["data.batch_size=16"],
    "vit_digits_ltp": ["data.batch_size=16"],
    "vit_digits_finetune": ["data.batch_size=16"],
    "vit_digits_topk_ft": ["data.batch_size=16"],
    "vit_digits_ltp_ft": ["data.batch_size=16"],
    "vit_digits_ltp_hard": ["data.batch_size=16"],
    "vit_digits_px1": ["data.batch_size=16"],
    "vit_digits_px1_finetune": ["data.batch_size=16"],
    "vit_digits_px1_topk_ft": ["data.batch_size=16"],
    "vit_digits_px1_ltp_ft": ["data.batch_size=16"],
    "lm_chars": ["data.seq_len=16", "data.batch_size=4", "data.max_eval_tokens=256"],
    "mqar": [
        "data.num_train=64",
        "data.num_val=16",
        "data.num_test=16",
        "data.batch_size=8",
        "data.vocab_size=64",
        "data.seq_len=32",
        "data.num_kv_pairs=4",
    ],
    "listops": [
        "data.num_train=32",
        "data.num_val=8",
        "data.num_test=8",
        "data.batch_size=8",
        "data.min_length=8",
        "data.max_length=24",
    ],
    "asr_digits": [
        "data.num_train=8",
        "data.num_val=4",
        "data.num_test=4",
        "data.batch_size=4",
        "data.max_digits=2",
        "model.n_mels=20",
        "data.workers=2",
    ],
}
TINY_DATA["asr_digits_branchformer"] = TINY_DATA["asr_digits"]
MAIN_METRIC = {"classify": "accuracy", "lm": "bpc", "recall": "accuracy", "ctc": "cer"}


def _cfg(*overrides: str):
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def chars_root(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_tiny(experiment: str, tmp_path: Path, chars_root: Path) -> None:
    if experiment.startswith("asr") and not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng; .ci/run does)")
    extra = TINY_DATA[experiment] + [f"data.cache_dir={tmp_path / 'cache'}"]
    if experiment == "lm_chars":
        extra.append(f"data.root={chars_root}")
    if experiment.endswith(("_ft", "_finetune")):  # warm start from (and distil) a tiny trained dense model
        dense = tmp_path / "dense"
        base = "vit_digits_px1" if experiment.startswith("vit_digits_px1") else "vit_digits"  # same patch size
        train(_cfg(f"experiment={base}", *QUIET, *TINY_TRAIN, *TINY_MODEL, *extra, "trainer.max_steps=2"), dense)
        extra.append(f"init_from={dense}")
    if experiment == "vit_digits_ltp_hard":  # LTP stage 2 starts from a (tiny) stage-1 run
        stage1 = tmp_path / "stage1"
        stage1_cfg = _cfg("experiment=vit_digits_ltp", *QUIET, *TINY_TRAIN, *TINY_MODEL, *extra, "trainer.max_steps=2")
        train(stage1_cfg, stage1)
        extra.append(f"init_from={stage1}")
    cfg = _cfg(f"experiment={experiment}", *QUIET, *TINY_TRAIN, *TINY_MODEL, *extra)
    res = train(cfg, tmp_path / "run")
    if experiment.endswith(("_ft", "_finetune")):
        assert res["init_from"] == res["distill_from"] == str(tmp_path / "dense")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == pytest.approx(res)
    from attnlib.data import DATASETS

    task = DATASETS[cfg.data.name].task
    for split in ("val", "test"):
        assert math.isfinite(saved[f"{split}_{MAIN_METRIC[task]}"]) and math.isfinite(saved[f"{split}_loss"])
    assert saved["steps"] == 4 and saved["train_seconds"] > 0 and saved["variant"] == "softmax"
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,split,metric,value" and any(r.startswith("2,val,") for r in rows)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 4 and set(ck) >= {"model", "optimizer", "scheduler", "rng", "data_position", "config"}


def test_tensorboard_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg("experiment=vit_digits", "trainer.threads=1", *TINY_TRAIN, *TINY_MODEL, *TINY_DATA["vit_digits"])
    train(cfg, tmp_path)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    out = capsys.readouterr()
    assert "test_accuracy" in out.out and "vit/softmax" in out.err  # results table; progress bar


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_mod.train_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, n = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    monkeypatch.setattr(loop_mod, "train_loss", poisoned)
    cfg = _cfg("experiment=vit_digits", *QUIET, *TINY_TRAIN, *TINY_MODEL, *TINY_DATA["vit_digits"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3.*last.pt \(step 2\)"):
        train(cfg, tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (tmp_path / "results.json").exists()


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    base = ["experiment=vit_digits", *QUIET, *TINY_TRAIN, *TINY_MODEL, *TINY_DATA["vit_digits"]]
    train(_cfg(*base, "trainer.max_steps=2"), tmp_path)
    with pytest.raises(ValueError, match="cannot resume.*model"):
        train(_cfg(*base, "model.dim=32", "resume=true"), tmp_path)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnlib.cli.train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


RESUME_RUN = [
    "experiment=vit_digits",
    *QUIET,
    "trainer.max_steps=150",
    "trainer.warmup_steps=10",
    "trainer.eval_every=50",
    "trainer.log_every=10",
    "trainer.checkpoint_every=5",
    *TINY_MODEL,
    "model.drop_path=0.2",
    "data.batch_size=16",
]


@pytest.mark.slow
def test_sigkill_and_resume_reach_identical_metrics(tmp_path: Path) -> None:
    """An uninterrupted run and a run killed with SIGKILL mid-training, then resumed, end identical."""
    ref = subprocess.run(
        _cli(*RESUME_RUN, f"hydra.run.dir={tmp_path / 'ref'}"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*RESUME_RUN, f"hydra.run.dir={run}"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = run / "checkpoints" / "last.pt"
    metrics = run / "metrics.csv"

    def logged(step: int) -> bool:  # the run has logged step `step` (it logs every 10 steps)
        return metrics.exists() and f"\n{step},train,loss," in metrics.read_text()

    deadline = time.time() + 240
    # kill once step 30 is logged (not after a fixed sleep: on a fast, idle machine 150 tiny
    # steps can finish within a fixed delay); checkpoints every 5 steps, so the kill lands at
    # a varying point of later steps / checkpoint writes
    while not (ckpt.exists() and logged(30)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists(), "the run finished before it could be killed"
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 150
    res = subprocess.run(
        _cli(*RESUME_RUN, f"hydra.run.dir={run}", "resume=true"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpt} at step {killed_at}" in res.stdout + res.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    for k in a:
        if k.startswith(("val_", "test_")) or k in ("steps", "params"):
            assert a[k] == b[k], (k, a[k], b[k])  # exactly equal, not approximately
    ma = [r for r in (tmp_path / "ref" / "metrics.csv").read_text().splitlines() if ",items_per_s," not in r]
    mb = [r for r in (run / "metrics.csv").read_text().splitlines() if ",items_per_s," not in r]
    assert ma == mb  # same logged curve, no duplicated rows from before the kill


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 (gloo on CPU): same data, averaged gradients -> the 1-process result."""
    args = [
        "experiment=vit_digits",
        *QUIET,
        "trainer.max_steps=6",
        "trainer.warmup_steps=1",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
        "trainer.eval_limit=64",
        *TINY_MODEL,
        "model.drop_path=0",
        "data.batch_size=16",
    ]
    one = subprocess.run(
        _cli(*args, f"hydra.run.dir={tmp_path / 'one'}"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "attnlib.cli.train",
        *args,
        f"hydra.run.dir={tmp_path / 'two'}",
    ]
    two = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for k in ("val_loss", "test_loss", "test_accuracy"):
        assert b[k] == pytest.approx(a[k], abs=2e-5), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 left no stray run dir


@pytest.mark.slow
def test_multirun_sweep_over_attention(tmp_path: Path) -> None:
    args = [
        "-m",
        "experiment=vit_digits",
        "attention=softmax,local",
        *QUIET,
        *TINY_TRAIN,
        *TINY_MODEL,
        *TINY_DATA["vit_digits"],
        f"hydra.sweep.dir={tmp_path}",
    ]
    r = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = {json.loads(p.read_text())["variant"]: p.parent.name for p in tmp_path.glob("*/results.json")}
    assert found == {"softmax": "0_softmax", "local": "1_local"}


def test_slurm_launcher_config_composes() -> None:
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.max_num_timeout == 3


def test_configs_ship_in_the_package() -> None:
    """pyproject's package-data pattern covers every config file (so a non-editable install has them)."""
    import tomllib

    pyproject = tomllib.loads((CONFIGS.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["attnlib"]
    pkg = CONFIGS.parent
    shipped = {p for pat in patterns for p in pkg.glob(pat)}
    files = {p for p in CONFIGS.rglob("*") if p.is_file() and p.suffix == ".yaml"}
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)
    assert (CONFIGS / "__init__.py").exists()  # Hydra finds the configs as the package attnlib.configs
