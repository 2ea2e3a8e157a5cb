"""attnlib-train: every experiment runs end to end (tiny), results/metrics/checkpoints, non-finite stop,
exact resume after SIGKILL, 2-process DDP == 1 process, multirun sweep, Slurm launcher config."""

from __future__ import annotations

import json
import math
import os
import random
import re
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
TINY_DATA["tabular_icl"] = [
    "data.num_train=8",
    "data.num_test=4",
    "data.num_val=4",
    "data.num_test_tables=4",
    "data.batch_size=2",
    "data.eval_batch_size=4",
]
# models without a single ``depth`` (the tabular learner has one per axis)
TINY_MODEL_OF = {"tabular_icl": ["model.dim=16", "model.num_heads=2", "model.row_blocks=1", "model.icl_blocks=1"]}
TINY_DATA["asr_digits_aed"] = [*TINY_DATA["asr_digits"], "model.decoder_depth=1"]
TINY_DATA["asr_digits_aed_relaxed"] = TINY_DATA["asr_digits_aed"]
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
    tiny_model = TINY_MODEL_OF.get(experiment, TINY_MODEL)
    cfg = _cfg(f"experiment={experiment}", *QUIET, *TINY_TRAIN, *tiny_model, *extra)
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
    assert "eval val" in out.err and "eval test" in out.err  # the final evaluation shows its progress too


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_mod.train_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, n = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    monkeypatch.setattr(loop_mod, "train_loss", poisoned)
    cfg = _cfg("experiment=vit_digits", *QUIET, *TINY_TRAIN, *TINY_MODEL, *TINY_DATA["vit_digits"])
    # the step-2 checkpoint is written once step 3 has shown a finite loss and gradients at its state
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4.*last.pt \(step 2"):
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


# ------------------------------------------------------------------------------------------
# run directories, resume, non-finite stops, trainer settings
# ------------------------------------------------------------------------------------------


def _tiny_vit(*extra: str) -> list[str]:
    """A few-step vit_digits run on a 1-block dim-16 model."""
    return ["experiment=vit_digits", *QUIET, *TINY_TRAIN, *TINY_MODEL, *TINY_DATA["vit_digits"], *extra]


def _metric_rows(run: Path) -> list[str]:
    return [r for r in (run / "metrics.csv").read_text().splitlines() if ",items_per_s," not in r]


def test_default_run_dirs_are_distinct_within_one_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs started in the same second get a directory each (claimed atomically), not a shared one."""
    from datetime import datetime

    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    runs, sweeps = [], []
    try:
        for _ in range(2):  # the configs of two processes started in the same second
            with initialize_config_module("attnlib.configs", version_base="1.3"):
                cfg = compose("train", overrides=["experiment=vit_digits"], return_hydra_config=True)
                OmegaConf.register_new_resolver("now", lambda pattern: "2030-01-01_00-00-00", replace=True)
                runs.append(str(cfg.hydra.run.dir))
                sweeps.append(str(cfg.hydra.sweep.dir))
    finally:
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.now().strftime(pattern), use_cache=True, replace=True
        )
    for a, b in (runs, sweeps):
        assert a != b and (tmp_path / a).is_dir() and (tmp_path / b).is_dir(), (a, b)
    assert runs[0].startswith("outputs/vit-digits-softmax/2030-01-01_00-00-00")
    assert str(cfg.hydra.run.dir) == runs[1]  # resolved once per config: every reader sees the same dir


def test_a_run_never_writes_into_another_runs_directory(tmp_path: Path) -> None:
    base = _tiny_vit("trainer.max_steps=2")
    train(_cfg(*base), tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "results.json", tmp_path / "metrics.csv")}
    with pytest.raises(RuntimeError, match=r"already holds a run .*results\.json.*resume=true"):
        train(_cfg(*base, "seed=1"), tmp_path)
    assert {p: p.read_bytes() for p in before} == before
    from attnlib.training.rundir import lock_run_dir

    busy = tmp_path / "busy"
    with lock_run_dir(busy), pytest.raises(RuntimeError, match="in use by another process"):
        train(_cfg(*base, "resume=true"), busy)


def test_resume_applies_changed_optimizer_and_schedule_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = _tiny_vit("trainer.log_every=1", "trainer.warmup_steps=1", "trainer.eval_every=0")
    train(_cfg(*base, "trainer.max_steps=2", "trainer.lr=1e-3"), tmp_path)
    changed = ["trainer.lr=1e-4", "trainer.weight_decay=0.2", "trainer.betas=[0.8,0.99]", "trainer.min_lr_ratio=0.5"]
    with caplog.at_level("INFO", logger="attnlib.train"):
        train(_cfg(*base, "trainer.max_steps=4", *changed, "resume=true"), tmp_path)
    lrs = {int(r.split(",")[0]): float(r.split(",")[3]) for r in _metric_rows(tmp_path) if ",train,lr," in r}
    for step in (3, 4):  # the lr logged after step k is the one of step k + 1: new peak, new floor, new length
        assert lrs[step] == pytest.approx(1e-4 * loop_mod.lr_lambda(step, warmup=1, total=4, min_ratio=0.5), rel=1e-12)
    groups = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    assert "lr: 0.001 -> 0.0001" in caplog.text and "max_steps: 2 -> 4" in caplog.text
    with pytest.raises(ValueError, match=r"trainer\.max_steps=3 is below the checkpoint's step 4"):
        train(_cfg(*base, "trainer.max_steps=3", "resume=true"), tmp_path)


def test_non_finite_stop_keeps_a_trainable_checkpoint_and_its_advice_works(tmp_path: Path) -> None:
    """lr=30 blows the weights up within a few steps; the checkpoint the message names is a state
    whose loss and gradients were finite, and resuming it with the advised lr trains to the end."""
    run = _tiny_vit(
        "trainer.max_steps=10", "trainer.warmup_steps=0", "trainer.min_lr_ratio=1.0",
        "trainer.checkpoint_every=1", "trainer.log_every=1", "trainer.eval_every=0",
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        train(_cfg(*run, "trainer.lr=30"), tmp_path / "blown")
    msg = str(err.value)
    advice = re.search(r"resume=(\S+) trainer\.lr=(\S+)", msg)
    assert advice, msg
    ck = load_checkpoint(advice.group(1))
    assert 0 < ck["step"] < 10 and f"(step {ck['step']};" in msg
    state = [*ck["model"].values(), *(v for s in ck["optimizer"]["state"].values() for v in s.values())]
    assert all(torch.isfinite(v).all() for v in state if torch.is_tensor(v))
    res = train(_cfg(*run, f"resume={advice.group(1)}", f"trainer.lr={advice.group(2)}"), tmp_path / "resumed")
    assert res["steps"] == 10 and math.isfinite(res["test_loss"]) and math.isfinite(res["val_loss"])


@pytest.mark.parametrize("kind", ["missing", "missing_dir", "empty", "random", "foreign"])
def test_resume_from_a_missing_or_unreadable_checkpoint_is_an_error(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    problem = {
        "missing": "no checkpoint",
        "missing_dir": "no checkpoint",
        "empty": "empty file",
        "random": "not a readable checkpoint",
        "foreign": "no 'config', 'model'",
    }[kind]
    if kind == "missing_dir":
        path = tmp_path / "a_run_dir"
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(512))
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        train(_cfg(*_tiny_vit(), f"resume={path}"), tmp_path / "run")
    assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


def test_trainer_group_from_the_command_line_wins_over_the_experiment() -> None:
    smoke = _cfg("trainer=smoke", "experiment=vit_digits")
    assert smoke.trainer.max_steps == 10 and smoke.trainer.checkpoint_every == 5  # the chosen group's settings
    assert smoke.trainer.lr == 2e-3 and smoke.trainer.label_smoothing == 0.1  # the experiment's other settings
    assert _cfg("experiment=vit_digits").trainer.max_steps == 2500
    assert _cfg("experiment=vit_digits", "trainer=smoke", "trainer.max_steps=3").trainer.max_steps == 3
    gpu = _cfg("experiment=lm_chars", "trainer=gpu")
    assert gpu.trainer.precision == "bf16" and gpu.trainer.compile and gpu.trainer.max_steps == 2000
    for experiment in EXPERIMENTS:
        assert _cfg(f"experiment={experiment}", "trainer=smoke", "init_from=x").trainer.max_steps == 10, experiment


def test_trainer_defaults_yaml_mirrors_the_code() -> None:
    from attnlib.training import TRAINER_DEFAULTS

    assert dict(_cfg().trainer) == TRAINER_DEFAULTS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=-5", "trainer.max_steps must be an integer >= 1, got -5"),
        ("trainer.max_steps=2.5", "trainer.max_steps must be an integer >= 1, got 2.5"),
        ("trainer.lr=1e39", "trainer.lr must be a finite number > 0"),
        ("trainer.lr=0", "trainer.lr must be a finite number > 0"),
        ("trainer.lr=nan", "trainer.lr must be a finite number > 0"),
        ("trainer.warmup_steps=-1", "trainer.warmup_steps must be an integer >= 0"),
        ("trainer.checkpoint_every=-1", "trainer.checkpoint_every must be an integer >= 0"),
        ("trainer.log_every=0", "trainer.log_every must be an integer >= 1"),
        ("trainer.attention_entropy=-1", "trainer.attention_entropy must be an integer >= 0"),
        ("trainer.eval_limit=0", "trainer.eval_limit must be null or an integer >= 1"),
        ("trainer.betas=[0.9]", "trainer.betas must be two numbers in [0, 1)"),
        ("trainer.min_lr_ratio=2", "trainer.min_lr_ratio must be a number in [0, 1]"),
        ("trainer.grad_clip=-1", "trainer.grad_clip must be a finite number >= 0"),
        ("trainer.precision=fp8", "trainer.precision must be one of fp32, bf16, fp16"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
    ],
)
def test_invalid_trainer_settings_are_refused_before_anything_runs(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_cfg(*_tiny_vit(), override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_with_dropout_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after its step-2 checkpoint and resumed equals the run that did not stop, bit for bit:
    with dropout on, the RNG streams must be restored too."""
    run = _tiny_vit("model.dropout=0.3", "trainer.eval_every=0", "trainer.log_every=1")
    train(_cfg(*run), tmp_path / "ref")

    class StopError(Exception):
        pass

    real, calls = loop_mod.train_loss, {"n": 0}

    def stop_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise StopError
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "train_loss", stop_at_step_4)
    with pytest.raises(StopError):
        train(_cfg(*run), tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 2
    monkeypatch.setattr(loop_mod, "train_loss", real)
    train(_cfg(*run, "resume=true"), tmp_path / "cut")
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metric_rows(tmp_path / "ref") == _metric_rows(tmp_path / "cut")


def test_cli_runs_started_in_the_same_second_keep_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Hydra app itself, twice with the clock stopped: two run dirs, each with its own results and
    metrics; and a bad trainer setting exits non-zero with the message."""
    import datetime as dt

    import hydra.core.utils

    from attnlib.cli import train as cli

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 1, 0, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    args = ["attnlib-train", *_tiny_vit("trainer.max_steps=2"), "hydra/job_logging=disabled"]
    for seed in (0, 1):
        monkeypatch.setattr(sys, "argv", [*args, f"seed={seed}"])
        cli.main()
    runs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/results.json"))
    assert [r.name for r in runs] == ["2030-01-01_00-00-00", "2030-01-01_00-00-00-2"]
    assert [json.loads((r / "results.json").read_text())["seed"] for r in runs] == [0, 1]
    for r in runs:
        rows = _metric_rows(r)
        assert len(rows) == len(set(rows)) and sum(",train,loss," in x for x in rows) == 1  # this run's rows only
        assert (r / ".hydra" / "overrides.yaml").exists()
    monkeypatch.setattr(sys, "argv", [*args, "trainer.max_steps=-5"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    assert "trainer.max_steps must be an integer >= 1, got -5" in capsys.readouterr().err
