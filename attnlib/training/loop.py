"""The training loop behind ``attnlib-train`` (usable directly: :func:`train`).

One loop serves every backbone/data pair: AdamW with linear warmup and cosine decay,
gradient clipping, optional mixed precision, evaluation every ``eval_every`` steps,
metrics to CSV and TensorBoard, a progress bar, atomic checkpoints every
``checkpoint_every`` steps (model, optimizer, scheduler, RNG states of every rank, data
position), exact resume, DDP under torchrun/Slurm, and a stop with a clear message on a
non-finite loss or gradient (the last good checkpoint stays intact).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from attnlib.attention import aux_loss
from attnlib.data import build_data
from attnlib.data.base import stable_hash
from attnlib.models import build_model
from attnlib.modifiers import EntropyProbe
from attnlib.training.checkpoint import atomic_save, capture_rng, load_checkpoint, restore_rng
from attnlib.training.distributed import DistInfo, init_distributed
from attnlib.training.metrics import MetricLogger, format_table
from attnlib.training.tasks import _to, evaluate, train_loss

__all__ = [
    "TRAINER_DEFAULTS",
    "NonFiniteLossError",
    "build_optimizer",
    "init_weights_from",
    "load_teacher",
    "lr_lambda",
    "train",
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
    "attention_entropy": 16,
}

# config sections that must match for a resume to continue the same run
_RESUME_KEYS = ("attention", "model", "data", "seed")


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


def _resume_path(resume: Any, run_dir: Path) -> Path | None:
    if resume in (None, False, "false", "False", ""):
        return None
    if resume is True or resume in ("true", "True"):
        return run_dir / "checkpoints" / "last.pt"
    p = Path(str(resume)).expanduser()
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


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
    path = _resume_path(str(source), Path("."))
    if path is None or not path.exists():
        raise FileNotFoundError(f"init_from: no checkpoint at {source!r} (looked for {path})")
    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, Mapping) or "model" not in state:
        raise ValueError(f"init_from: {path} is not a checkpoint written by attnlib-train (no 'model' entry)")
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
    path = _resume_path(str(source), Path("."))
    if path is None or not path.exists():
        raise FileNotFoundError(f"distill_from: no checkpoint at {source!r} (looked for {path})")
    ck = load_checkpoint(path, map_location="cpu")
    if not isinstance(ck, Mapping) or "model" not in ck or "config" not in ck:
        raise ValueError(f"distill_from: {path} is not a checkpoint written by attnlib-train")
    conf = ck["config"]
    teacher = build_model(conf["model"], conf["attention"], **data.model_kwargs())
    teacher.load_state_dict(ck["model"])
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def train(cfg: DictConfig | Mapping[str, Any], run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train and test one configuration; returns the flat results (also written to run_dir/results.json).

    ``cfg`` has ``attention``, ``model``, ``data``, ``trainer`` (see :data:`TRAINER_DEFAULTS`),
    ``seed``, ``resume`` (false | true = ``run_dir/checkpoints/last.pt`` | a path) and
    ``init_from`` (null | a checkpoint or run dir: warm start from its model weights with a fresh
    optimizer and schedule, :func:`init_weights_from`; ignored when resuming from a checkpoint)
    and ``distill_from`` (null | a checkpoint or run dir: a frozen teacher model for knowledge
    distillation, classification only; ``trainer.distill_weight`` / ``distill_temperature``).
    """
    wall0 = time.perf_counter()
    cfg = OmegaConf.create(_plain(cfg))
    t = {**TRAINER_DEFAULTS, **_plain(cfg.get("trainer", {}))}
    unknown = sorted(set(t) - set(TRAINER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown trainer option(s) {unknown}; known: {', '.join(TRAINER_DEFAULTS)}")
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
    variant = _unwrap(model).blocks[0].attn.variant if hasattr(model, "blocks") else str(cfg.attention.get("variant"))
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
    resume_from = _resume_path(cfg.get("resume", False), run_dir)
    if resume_from is not None:
        if resume_from.exists():
            ck = load_checkpoint(resume_from, map_location=dev)
            _check_resume(ck["config"], cfg)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            start, train_seconds = int(ck["step"]), float(ck["train_seconds"])
            run_loss, run_items, run_n = ck["log_state"]
            states = ck["rng"]
            if len(states) == info.world:
                restore_rng(states[info.rank])
            elif info.is_main:
                log.warning(
                    "checkpoint has RNG states of %d processes, this run has %d: not exact", len(states), info.world
                )
            if info.is_main:
                log.info("resumed from %s at step %d", resume_from, start)
        elif info.is_main:
            log.warning("resume requested but %s does not exist: starting from step 0", resume_from)
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

    if info.world > 1:
        kw = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=t["find_unused_parameters"], **kw)
    fwd_model = torch.compile(model) if t["compile"] else model
    rows = int(t["attention_entropy"] or 0)  # per-head attention entropy on the logged steps (not compiled)
    probe = EntropyProbe(_unwrap(model), rows=rows) if rows > 0 and not t["compile"] else None

    logger = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricLogger(run_dir, tensorboard=t["tensorboard"], resume_step=start if start else None)
        log.info("%s | model %s (%s params) | attention %s | run dir %s", data.describe(), cfg.model.name,
                 f"{n_params:,}", _plain(cfg.attention), run_dir)  # fmt: skip
    bar = None
    if info.is_main and t["progress"] and start < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{cfg.model.name}/{variant}", dynamic_ncols=True, mininterval=1.0)

    last_good = start if resume_from is not None and resume_from.exists() else None
    t_log = time.perf_counter()
    step = start
    model.train()
    try:
        while step < total:
            t0 = time.perf_counter()
            batch = _to(data.train_batch(step, rank=info.rank, world=info.world), dev)
            aux_loss(model)  # drop stale auxiliary losses (e.g. from evaluation)
            log_now = (step + 1) % int(t["log_every"]) == 0 or step + 1 == total
            with autocast() if autocast is not None else _null(), probe.armed(log_now) if probe else _null():
                loss, items = train_loss(
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
            _check_finite(loss.detach(), "loss", step + 1, info, last_good, ckpt_path)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t["grad_clip"]:
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(t["grad_clip"]))
                if not scaler.is_enabled():
                    _check_finite(gnorm.detach(), "gradient norm", step + 1, info, last_good, ckpt_path)
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
                    **(probe.collect() if probe else {}),
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
                val = evaluate(model, data, "val", info, limit=t["eval_limit"], autocast=autocast)
                if logger is not None:
                    logger.log(step, "val", val)
                    msg = " ".join(f"{k}={v:.4f}" for k, v in val.items())
                    (bar.write if bar is not None else print)(f"step {step}: val {msg}")
                t_log = time.perf_counter()
            if (t["checkpoint_every"] and step % int(t["checkpoint_every"]) == 0) or step == total:
                _save(ckpt_path, model, opt, sched, scaler, step, train_seconds, cfg, info, data,
                      (run_loss, run_items, run_n))  # fmt: skip
                last_good = step
                t_log = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()

    val = evaluate(model, data, "val", info, autocast=autocast)
    test = evaluate(model, data, "test", info, autocast=autocast)
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
        logger.close()
        tmp = run_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(run_dir / "results.json")
        print(f"\nResults ({run_dir / 'results.json'}):\n{format_table(results)}")
    return results


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _check_finite(value: torch.Tensor, what: str, step: int, info: DistInfo, last_good: int | None, ckpt: Path) -> None:
    bad = torch.tensor(0.0 if bool(torch.isfinite(value).all()) else 1.0, device=info.device)
    if info.world > 1:
        dist.all_reduce(bad)
    if bad.item():
        where = f"{ckpt} (step {last_good})" if last_good is not None else "none written yet"
        shown = value.item() if not bool(torch.isfinite(value).all()) else "on another rank"
        raise NonFiniteLossError(
            f"non-finite {what} ({shown}) at step {step}; training stopped before that update. "
            f"Last good checkpoint: {where}. "
            "Lower trainer.lr, enable trainer.grad_clip or use trainer.precision=fp32."
        )


def _save(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    step: int,
    train_seconds: float,
    cfg: DictConfig,
    info: DistInfo,
    data: Any,
    log_state: tuple[float, int, int],
) -> None:
    rng = capture_rng()
    states = [rng]
    if info.world > 1:
        states = [None] * info.world
        dist.all_gather_object(states, rng)
    if info.is_main:
        atomic_save(
            {
                "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "rng": states,
                "data_position": data.position(step),
                "config": _plain(cfg),
                "world_size": info.world,
                "log_state": log_state,
            },
            path,
        )
    if info.world > 1:
        dist.barrier()


def _check_resume(saved: Mapping[str, Any], cfg: DictConfig) -> None:
    now = _plain(cfg)
    diff = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint was written by a different configuration ({detail})")
    if saved.get("trainer") != now.get("trainer"):
        log.warning("resuming with different trainer settings than the checkpoint's; the run will not be identical")
