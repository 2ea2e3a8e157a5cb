"""The training loop behind ``attnlib-train`` (usable directly: :func:`train`).

One loop serves every backbone/data pair: AdamW with linear warmup and cosine decay,
gradient clipping, optional mixed precision, evaluation every ``eval_every`` steps,
metrics to CSV and TensorBoard, progress bars (training and evaluation), atomic checkpoints
every ``checkpoint_every`` steps (model, optimizer, scheduler, RNG states of every rank, data
position), exact resume, DDP under torchrun/Slurm, one run per directory (locked while it
trains), and a stop with a clear message on a non-finite loss or gradient.

A checkpoint due after step s is written during step s + 1, once the state of step s has
shown a finite loss and finite gradients (and its parameters and optimizer state are finite),
before that step's update: every checkpoint holds a state that trains on, so the advice of a
non-finite stop (resume from the last checkpoint with a lower lr) works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from attnlib.analysis.distill import attention_distillation
from attnlib.analysis.summary import entropy_metrics
from attnlib.attention import Attention, aux_loss
from attnlib.data import build_data
from attnlib.data.base import stable_hash
from attnlib.models import build_model
from attnlib.training import tasks
from attnlib.training.checkpoint import (
    CHECKPOINT_KEYS,
    atomic_save,
    capture_rng,
    checkpoint_path,
    load_checkpoint,
    restore_rng,
)
from attnlib.training.distributed import DistInfo, init_distributed
from attnlib.training.metrics import MetricLogger, format_table
from attnlib.training.rundir import RunDirError, check_fresh, lock_run_dir
from attnlib.training.tasks import _to, evaluate, train_loss

__all__ = [
    "TRAINER_DEFAULTS",
    "NonFiniteLossError",
    "build_optimizer",
    "init_weights_from",
    "load_teacher",
    "lr_lambda",
    "train",
    "validate_trainer",
]

log = logging.getLogger("attnlib.train")

#: Defaults of the ``trainer`` config group (configs/trainer/default.yaml mirrors them).
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 1000,
    "lr": 1e-3,
    "min_lr_ratio": 0.0,
    "warmup_steps": 100,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "grad_clip": 1.0,
    "label_smoothing": 0.0,
    "aux_loss_weight": 1.0,
    "eval_every": 500,
    "eval_limit": None,
    "log_every": 20,
    "checkpoint_every": 500,
    "precision": "fp32",
    "device": "auto",
    "threads": None,
    "compile": False,
    "find_unused_parameters": False,
    "progress": True,
    "tensorboard": True,
    "deterministic": False,
    "distill_weight": 0.5,
    "distill_temperature": 1.0,
    "distill_attention": None,
    "distill_attention_weight": 1.0,
    "distill_relation_heads": 8,
    "log_attention_entropy": True,
}

# config sections that must match for a resume to continue the same run
_RESUME_KEYS = ("attention", "model", "data", "seed")
_F32_MAX = float(torch.finfo(torch.float32).max)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_int(x: Any) -> int | None:
    """``x`` as an int if it is one (an integral float too: Hydra reads 1e3 as a float), else None."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    return int(x) if isinstance(x, float) and x.is_integer() else None


def validate_trainer(t: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check the ``trainer`` settings (and ``data``'s batch sizes); return them with integer fields as ints.

    Raises ValueError listing every bad setting with what was expected and what was given.
    """
    out = dict(t)
    problems: list[str] = []

    def need(ok: bool, key: str, expected: str, prefix: str = "trainer") -> None:
        if not ok:
            value = (data or {}).get(key) if prefix == "data" else t.get(key)
            problems.append(f"{prefix}.{key} must be {expected}, got {value!r}")

    for key, low in (("max_steps", 1), ("log_every", 1), ("warmup_steps", 0), ("eval_every", 0),
                     ("checkpoint_every", 0), ("distill_relation_heads", 1)):  # fmt: skip
        v = _as_int(t[key])
        need(v is not None and v >= low, key, f"an integer >= {low}")
        if v is not None:
            out[key] = v
    for key in ("eval_limit", "threads"):
        v = _as_int(t[key])
        need(t[key] is None or (v is not None and v >= 1), key, "null or an integer >= 1")
        if v is not None:
            out[key] = v
    lr = t["lr"]
    need(_is_num(lr) and math.isfinite(lr) and 0 < lr <= _F32_MAX, "lr",
         f"a finite number > 0 (at most float32's largest, {_F32_MAX:.3g})")  # fmt: skip
    for key in ("weight_decay", "grad_clip", "aux_loss_weight", "distill_attention_weight"):
        need(_is_num(t[key]) and math.isfinite(t[key]) and t[key] >= 0, key, "a finite number >= 0")
    for key in ("min_lr_ratio", "distill_weight"):
        need(_is_num(t[key]) and 0 <= t[key] <= 1, key, "a number in [0, 1]")
    need(_is_num(t["label_smoothing"]) and 0 <= t["label_smoothing"] < 1, "label_smoothing", "a number in [0, 1)")
    temp = t["distill_temperature"]
    need(_is_num(temp) and math.isfinite(temp) and temp > 0, "distill_temperature", "a finite number > 0")
    betas = t["betas"]
    need(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas),
         "betas", "two numbers in [0, 1)")  # fmt: skip
    need(t["distill_attention"] in (None, "maps", "relations"), "distill_attention", "null, maps or relations")
    need(t["precision"] in ("fp32", "bf16", "fp16"), "precision", "one of fp32, bf16, fp16")
    dev = t["device"]
    need(isinstance(dev, str) and (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")), "device",
         "auto, cpu, cuda or cuda:<index>")  # fmt: skip
    for key in ("compile", "find_unused_parameters", "progress", "tensorboard", "deterministic"):
        need(isinstance(t[key], bool), key, "true or false")
    need(isinstance(t["log_attention_entropy"], bool), "log_attention_entropy", "true or false")
    for key in ("batch_size", "eval_batch_size"):
        if data is not None and key in data:
            v = _as_int(data[key])
            need(v is not None and v >= 1, key, "an integer >= 1", prefix="data")
    if problems:
        raise ValueError("invalid settings: " + "; ".join(problems))
    return out


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the step and the last good checkpoint."""


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, t: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (biases, norms) and position/class embeddings do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or any(k in name for k in ("pos_embed", "pos_emb", "cls_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]))


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return None
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"trainer.precision must be fp32, bf16 or fp16, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _resume_source(resume: Any, run_dir: Path) -> tuple[Path | None, bool]:
    """(checkpoint file or None, whether it was named explicitly) for ``cfg.resume``."""
    if resume in (None, False, "false", "False", ""):
        return None, False
    if resume is True or resume in ("true", "True"):
        return run_dir / "checkpoints" / "last.pt", False
    return checkpoint_path(str(resume)), True


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def init_weights_from(
    model: nn.Module, source: str | os.PathLike[str], *, allow_missing: tuple[str, ...] = ("pruning.",)
) -> list[str]:
    """Warm start: copy a trained checkpoint's model weights into ``model`` (optimizer, schedule, step: fresh).

    ``source`` is a checkpoint written by the trainer or its run directory
    (``<dir>/checkpoints/last.pt``). Every parameter of the checkpoint must exist in ``model``
    with the same shape, and every parameter of ``model`` must come from the checkpoint except
    those whose names start with one of ``allow_missing`` (default: the pruners' own parameters,
    ``pruning.*``, which a dense checkpoint lacks - so a trained unpruned model can be
    fine-tuned with token pruning, the recipe of EViT, DynamicViT and LTP). Returns the names
    left at their initial values; raises FileNotFoundError / ValueError naming what differs.
    """
    path = checkpoint_path(source)
    state = load_checkpoint(path, map_location="cpu", required=("model",), what="init_from")
    own = _unwrap(model).state_dict()
    src = state["model"]
    unexpected = sorted(set(src) - set(own))
    missing = sorted(k for k in set(own) - set(src) if not k.startswith(allow_missing))
    shapes = sorted(f"{k}: {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in set(src) & set(own)
                    if tuple(src[k].shape) != tuple(own[k].shape))  # fmt: skip
    if unexpected or missing or shapes:
        raise ValueError(
            f"init_from: {path} does not fit this model: "
            + "; ".join(
                f"{what} {items[:8]}{' ...' if len(items) > 8 else ''}"
                for what, items in (
                    ("keys not in the model", unexpected),
                    ("model keys not in it", missing),
                    ("shape (checkpoint vs model)", shapes),
                )
                if items
            )
        )
    _unwrap(model).load_state_dict(src, strict=False)
    return sorted(set(own) - set(src))


def load_teacher(source: str | os.PathLike[str], data: Any) -> nn.Module:
    """The model of a trainer checkpoint (or run dir), built from its own config, frozen, in eval mode.

    ``data`` supplies the model's data-dependent sizes (``data.model_kwargs()``).
    """
    ck = load_checkpoint(source, map_location="cpu", required=("model", "config"), what="distill_from")
    conf = ck["config"]
    teacher = build_model(conf["model"], conf["attention"], **data.model_kwargs())
    teacher.load_state_dict(ck["model"])
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def train(cfg: DictConfig | Mapping[str, Any], run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train and test one configuration; returns the flat results (also written to run_dir/results.json).

    ``cfg`` has ``attention``, ``model``, ``data``, ``trainer`` (see :data:`TRAINER_DEFAULTS`,
    checked by :func:`validate_trainer`), ``seed``, ``resume`` (false | true =
    ``run_dir/checkpoints/last.pt``, from step 0 when it does not exist yet | a checkpoint or run
    dir, which must exist; trainer settings that differ from the checkpoint's apply from the
    resumed step) and ``init_from`` (null | a checkpoint or run dir: warm start from its model
    weights with a fresh optimizer and schedule, :func:`init_weights_from`; ignored when
    resuming from a checkpoint) and ``distill_from`` (null | a checkpoint or run dir: a frozen
    teacher model for knowledge distillation of classification logits, ``trainer.distill_weight`` /
    ``distill_temperature``, and of attention in any task, ``trainer.distill_attention``:
    :mod:`attnlib.analysis.distill`).

    A new run refuses a ``run_dir`` that holds another run (``resume`` continues one), and no
    two processes train in one ``run_dir`` at a time (:mod:`attnlib.training.rundir`).
    """
    wall0 = time.perf_counter()
    cfg = OmegaConf.create(_plain(cfg))
    t = {**TRAINER_DEFAULTS, **_plain(cfg.get("trainer", {}))}
    unknown = sorted(set(t) - set(TRAINER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown trainer option(s) {unknown}; known: {', '.join(TRAINER_DEFAULTS)}")
    t = validate_trainer(t, _plain(cfg.get("data", {})))
    run_dir = Path(run_dir)
    seed = int(cfg.get("seed", 0))
    info = init_distributed(t["device"])
    if info.world > 1 and info.is_main:
        log.info("DDP: %d processes, backend %s", info.world, dist.get_backend())
    if info.world > 1:  # every rank uses rank 0's run directory
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    try:
        return _train(cfg, t, run_dir, seed, info, wall0)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: DictConfig, t: dict[str, Any], run_dir: Path, seed: int, info: DistInfo, wall0: float
) -> dict[str, Any]:
    dev = info.device
    resume_file, explicit = _resume_source(cfg.get("resume", False), run_dir)
    ck = None
    if resume_file is not None and (explicit or resume_file.exists()):  # an explicit path must exist
        ck = load_checkpoint(resume_file, map_location=dev, required=CHECKPOINT_KEYS, what="resume")
        _check_resume(ck["config"], cfg)
        if int(ck["step"]) > int(t["max_steps"]):
            raise ValueError(
                f"trainer.max_steps={t['max_steps']} is below the checkpoint's step {ck['step']} ({resume_file}): "
                "nothing left to train"
            )
    continues_here = resume_file is not None and (not explicit or _inside(resume_file, run_dir))
    with contextlib.ExitStack() as stack:
        refused: list[BaseException | None] = [None]
        if info.is_main:  # rank 0 owns the run directory: one run per directory, one process in it
            try:
                stack.enter_context(lock_run_dir(run_dir))
                if not continues_here:
                    check_fresh(run_dir)
            except RunDirError as e:
                refused[0] = e
        if info.world > 1:  # every rank stops if rank 0 may not use the directory
            dist.broadcast_object_list(refused, src=0)
        if refused[0] is not None:
            raise refused[0]
        return _run(cfg, t, run_dir, seed, info, wall0, ck, resume_file)


def _run(
    cfg: DictConfig,
    t: dict[str, Any],
    run_dir: Path,
    seed: int,
    info: DistInfo,
    wall0: float,
    ck: Mapping[str, Any] | None,
    resume_file: Path | None,
) -> dict[str, Any]:
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = info.device

    data_cfg = dict(_plain(cfg.data))
    data_cfg.setdefault("seed", seed)
    data = build_data(data_cfg)
    if info.is_main:  # rank 0 generates/caches first, the others then read the cache
        data.ensure_setup()
    if info.world > 1:
        dist.barrier()
    data.ensure_setup()
    model = build_model(cfg.model, cfg.attention, **data.model_kwargs()).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    # the first attention's variant (a model's first blocks may have none, e.g. LIT's MLP-only blocks)
    attns = (m.variant for m in _unwrap(model).modules() if isinstance(m, Attention))
    variant = next(attns, str(cfg.attention.get("variant")))
    opt = build_optimizer(model, t)
    total = int(t["max_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup=int(t["warmup_steps"]), total=total, min_ratio=float(t["min_lr_ratio"]))
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=t["precision"] == "fp16")
    autocast = _autocast(t["precision"], dev)
    torch.manual_seed(int(stable_hash(seed, "train", info.rank), 16) % (2**63 - 1))  # per-rank dropout streams

    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start, train_seconds = 0, 0.0
    run_loss, run_items, run_n = 0.0, 0, 0  # running sums since the last train log line
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start, train_seconds = int(ck["step"]), float(ck["train_seconds"])
        _apply_trainer_settings(model, opt, sched, t, ck["config"].get("trainer") or {}, start, info)
        run_loss, run_items, run_n = ck["log_state"]
        states = ck["rng"]
        if len(states) == info.world:
            restore_rng(states[info.rank])
        elif info.is_main:
            log.warning(
                "checkpoint has RNG states of %d processes, this run has %d: not exact", len(states), info.world
            )
        if info.is_main:
            log.info("resumed from %s at step %d", resume_file, start)
    elif resume_file is not None and info.is_main:
        log.info("resume=true: no checkpoint at %s yet, starting from step 0", resume_file)
    init_from = cfg.get("init_from", None)
    if init_from not in (None, "", False) and start == 0:
        fresh = init_weights_from(model, init_from)
        if info.is_main:
            log.info("initialised from %s (left at init: %s)", init_from, ", ".join(fresh) or "nothing")

    teacher = None
    if cfg.get("distill_from", None) not in (None, "", False):
        teacher = load_teacher(cfg.distill_from, data).to(dev)
        if info.is_main:
            log.info("distilling from %s (weight %s, temperature %s)", cfg.distill_from, t["distill_weight"],
                     t["distill_temperature"])  # fmt: skip
    loss_fn = attention_distillation(train_loss, teacher, t)  # train_loss itself unless trainer.distill_attention

    if info.world > 1:
        kw = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=t["find_unused_parameters"], **kw)
    fwd_model = torch.compile(model) if t["compile"] else model

    logger = None
    if info.is_main:
        logger = MetricLogger(run_dir, tensorboard=t["tensorboard"], resume_step=start if start else None)
        log.info("%s | model %s (%s params) | attention %s | run dir %s", data.describe(), cfg.model.name,
                 f"{n_params:,}", _plain(cfg.attention), run_dir)  # fmt: skip
    bar = None
    if info.is_main and t["progress"] and start < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{cfg.model.name}/{variant}", dynamic_ncols=True, mininterval=1.0)

    stop = _Stopper(ckpt_path, start if ck is not None else None, t, info)
    pending: _Pending | None = None  # a due checkpoint, written once its state has trained one more step
    params = [p for p in model.parameters() if p.requires_grad]
    t_log = time.perf_counter()
    step = start
    model.train()
    try:
        while step < total:
            t0 = time.perf_counter()
            batch = _to(data.train_batch(step, rank=info.rank, world=info.world), dev)
            aux_loss(model)  # drop stale auxiliary losses (e.g. from evaluation)
            with autocast() if autocast is not None else _null():
                loss, items = loss_fn(
                    fwd_model,
                    batch,
                    data.task,
                    label_smoothing=float(t["label_smoothing"]),
                    teacher=teacher,
                    distill_weight=float(t["distill_weight"]),
                    distill_temperature=float(t["distill_temperature"]),
                )
                extra = aux_loss(model)
                if t["aux_loss_weight"] and extra.requires_grad:
                    loss = loss + float(t["aux_loss_weight"]) * extra
            stop.check(loss.detach(), "loss", step + 1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t["grad_clip"]:
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
            elif not scaler.is_enabled():
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients by design
                stop.check(gnorm.detach(), "gradient norm", step + 1)
            if pending is not None:  # the state of step `pending.step` gave a finite loss and gradients
                t_save = time.perf_counter()
                stop.save_if_finite(model, opt, sched, scaler, cfg, data, pending)
                pending = None
                t_save = time.perf_counter() - t_save
                t0, t_log = t0 + t_save, t_log + t_save  # the write is neither training time nor throughput
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            train_seconds += time.perf_counter() - t0
            run_loss += float(loss.detach())
            run_items += items
            run_n += 1
            if bar is not None:
                bar.update(1)
            if step % int(t["log_every"]) == 0 or step == total:
                dt = time.perf_counter() - t_log
                stats = {
                    "loss": run_loss / run_n,
                    "lr": opt.param_groups[0]["lr"],
                    "items_per_s": run_items * info.world / max(dt, 1e-9),
                }
                if logger is not None:
                    logger.log(step, "train", stats)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}",
                        lr=f"{stats['lr']:.2e}",
                        ips=f"{stats['items_per_s']:.0f}",
                        refresh=False,
                    )
                run_loss, run_items, run_n, t_log = 0.0, 0, 0, time.perf_counter()
            if t["eval_every"] and step % int(t["eval_every"]) == 0 and step < total:
                val = evaluate(model, data, "val", info, limit=t["eval_limit"], autocast=autocast,
                               progress=bar is not None)  # fmt: skip
                if logger is not None:
                    logger.log(step, "val", val)
                    msg = " ".join(f"{k}={v:.4f}" for k, v in val.items())
                    (bar.write if bar is not None else print)(f"step {step}: val {msg}")
                    _log_attention(logger, step, model, data, dev, t)
                t_log = time.perf_counter()
            state = _Pending(step, capture_rng(), train_seconds, (run_loss, run_items, run_n))
            if step == total:  # the final state: written now (after a check that it is finite)
                stop.save_if_finite(model, opt, sched, scaler, cfg, data, state)
            elif t["checkpoint_every"] and step % int(t["checkpoint_every"]) == 0:
                pending = state
    finally:
        if bar is not None:
            bar.close()

    show = bool(t["progress"]) and info.is_main
    val = evaluate(model, data, "val", info, autocast=autocast, progress=show)
    test = evaluate(model, data, "test", info, autocast=autocast, progress=show)
    results: dict[str, Any] = {f"val_{k}": v for k, v in val.items()}
    results.update({f"test_{k}": v for k, v in test.items()})
    results.update(
        {
            "model": str(cfg.model.name),
            "data": str(cfg.data.name),
            "variant": variant,
            "params": n_params,
            "steps": step,
            "world_size": info.world,
            "train_seconds": round(train_seconds, 3),
            "wall_seconds": round(time.perf_counter() - wall0, 3),
            "seed": seed,
        }
    )
    for key in ("init_from", "distill_from"):
        if cfg.get(key, None) not in (None, "", False):
            results[key] = str(cfg[key])
    if logger is not None:
        logger.log(step, "val", val)
        logger.log(step, "test", test)
        _log_attention(logger, step, model, data, dev, t)
        logger.close()
        tmp = run_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(run_dir / "results.json")
        print(f"\nResults ({run_dir / 'results.json'}):\n{format_table(results)}")
    return results


def _log_attention(logger: MetricLogger, step: int, model: nn.Module, data: Any, dev: torch.device, t: Any) -> None:
    """Per-head attention entropy on a few validation examples -> metrics.csv split ``attention``
    (one forward through the task's own loss, apart from the training loss the loop calls)."""
    if t["log_attention_entropy"]:
        batch = _to(next(data.eval_batches("val", limit=16)), dev)
        run = lambda m: tasks.train_loss(m, batch, data.task)  # noqa: E731
        logger.log(step, "attention", entropy_metrics(_unwrap(model), run))


def _null() -> Any:
    return contextlib.nullcontext()


@dataclass
class _Pending:
    """What a checkpoint of the state after ``step`` holds besides the live model/optimizer/scheduler."""

    step: int
    rng: dict[str, Any]  # this process's RNG states at the end of the step
    train_seconds: float
    log_state: tuple[float, int, int]


class _Stopper:
    """Non-finite checks and checkpoint writes; knows the last good checkpoint for the stop message."""

    def __init__(self, ckpt: Path, last_good: int | None, t: Mapping[str, Any], info: DistInfo) -> None:
        self.ckpt, self.last_good, self.t, self.info = ckpt, last_good, t, info

    def check(self, value: torch.Tensor, what: str, step: int) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank) if ``value`` is not finite on some rank."""
        finite = bool(torch.isfinite(value).all())
        bad = torch.tensor(0.0 if finite else 1.0, device=self.info.device)
        if self.info.world > 1:
            dist.all_reduce(bad)
        if bad.item():
            shown = value.item() if not finite and value.numel() == 1 else "on another rank"
            self.fail(f"non-finite {what} ({shown}) at step {step}; training stopped before that update.")

    def fail(self, what: str) -> None:
        """Raise :class:`NonFiniteLossError`: ``what`` happened, plus the last good checkpoint and advice that works."""
        t = self.t
        lower = f"trainer.lr={float(t['lr']) / 10:g}"
        if self.last_good is not None:
            where = (
                f"Last good checkpoint: {self.ckpt} (step {self.last_good}; its loss and gradients were finite). "
                f"To continue from it with a lower learning rate: resume={self.ckpt} {lower}"
            )
        else:
            where = (
                "No good checkpoint was written yet: start again with a lower learning rate, "
                f"e.g. {lower} (in the same run dir: add resume=true)"
            )
        more = [
            *(["enable trainer.grad_clip (e.g. 1.0)"] if not t["grad_clip"] else []),
            *(["use trainer.precision=fp32"] if t["precision"] != "fp32" else []),
        ]
        raise NonFiniteLossError(f"{what} {where}" + (f"; or {' / '.join(more)}." if more else "."))

    def save_if_finite(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        scaler: Any,
        cfg: DictConfig,
        data: Any,
        state: _Pending,
    ) -> None:
        """Write the checkpoint of ``state.step`` if parameters and optimizer state are finite, else stop."""
        tensors = [*_unwrap(model).parameters(), *(v for s in opt.state.values() for v in s.values())]
        bad = [x for x in tensors if torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all())]
        if bad:
            self.fail(f"non-finite parameters or optimizer state after step {state.step}; not saved.")
        states = [state.rng]
        if self.info.world > 1:
            states = [None] * self.info.world
            dist.all_gather_object(states, state.rng)
        if self.info.is_main:
            atomic_save(
                {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": state.step,
                    "train_seconds": state.train_seconds,
                    "rng": states,
                    "data_position": data.position(state.step),
                    "config": _plain(cfg),
                    "world_size": self.info.world,
                    "log_state": state.log_state,
                },
                self.ckpt,
            )
        if self.info.world > 1:
            dist.barrier()
        self.last_good = state.step


def _check_resume(saved: Mapping[str, Any], cfg: DictConfig) -> None:
    now = _plain(cfg)
    diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint was written by a different configuration ({detail})")


def _apply_trainer_settings(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    t: Mapping[str, Any],
    saved: Mapping[str, Any],
    step: int,
    info: DistInfo,
) -> None:
    """After loading a checkpoint: this run's optimizer and schedule settings replace the checkpoint's.

    ``load_state_dict`` restores the hyperparameters saved with the optimizer (lr, betas, weight
    decay) and the scheduler's base lr; the settings of the current config apply from the
    resumed ``step`` instead, and each change is logged. Unchanged settings give the same
    values, so an unchanged resume stays exact.
    """
    fresh = build_optimizer(model, t).param_groups
    for group, new in zip(opt.param_groups, fresh, strict=True):
        group.update({k: v for k, v in new.items() if k != "params"})
    sched.base_lrs = [g["lr"] for g in fresh]
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    old = {**TRAINER_DEFAULTS, **saved}
    changed = [f"{k}: {old.get(k)!r} -> {t[k]!r}" for k in TRAINER_DEFAULTS if old.get(k) != t[k]]
    if changed and info.is_main:
        log.warning(
            "resuming with changed trainer settings, applied from step %d on (the run is no longer the "
            "uninterrupted one): %s",
            step,
            "; ".join(changed),
        )
