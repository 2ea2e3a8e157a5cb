"""Per-task training losses and evaluation metrics.

Tasks (a data module's ``task``):

* ``classify`` - batches ``x`` (+ optional ``mask``), ``y``: cross-entropy; accuracy.
* ``lm`` - batches ``tokens`` (B, N + 1): next-token cross-entropy; bits per character
  (``loss / ln 2``) and perplexity.
* ``recall`` - batches ``tokens``, ``labels`` (-100 = none): cross-entropy at labelled
  positions; accuracy there.
* ``ctc`` - batches ``wave``, ``lengths``, ``targets``, ``target_lengths``: CTC loss;
  character error rate (edit distance / reference characters) and utterance accuracy. A model
  with ``joint_ctc_attention`` (an attention decoder) computes its own loss from
  ``model(wave, lengths, targets, target_lengths)`` and transcribes with ``transcribe``.

Evaluation sums counts over DDP ranks, so metrics are exact over the whole split.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.data.base import DataModule
from attnlib.models.asr import ctc_greedy_decode
from attnlib.training.distributed import DistInfo, all_reduce_sum
from attnlib.training.metrics import edit_distance

__all__ = ["TASKS", "distill_loss", "evaluate", "train_loss"]

TASKS = ("classify", "lm", "recall", "ctc")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft knowledge distillation (Hinton et al. 2015): ``T^2 KL(softmax(t / T) || softmax(s / T))``.

    student, teacher: (B, K) logits -> scalar, mean over the batch (computed in float32).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"distill_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    if not temperature > 0:
        raise ValueError(f"distill_loss: temperature must be > 0, got {temperature!r}")
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, -1)
    log_q = F.log_softmax(teacher.float() / t, -1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def train_loss(
    model: nn.Module,
    batch: dict[str, Any],
    task: str,
    *,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 1.0,
) -> tuple[Tensor, int]:
    """(mean loss, items) of one batch; items counts examples/tokens/utterances for throughput.

    With a ``teacher`` (classification only): ``(1 - distill_weight) * CE + distill_weight *``
    :func:`distill_loss` of the model's logits to the teacher's (teacher run without gradients).
    """
    if teacher is not None and task != "classify":
        raise ValueError(f"distillation (a teacher) is implemented for the classify task, got task {task!r}")
    if task == "classify":
        args = (batch["x"], batch["mask"]) if "mask" in batch else (batch["x"],)
        logits = model(*args)
        loss = F.cross_entropy(logits.float(), batch["y"], label_smoothing=label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(*args)
            kd = distill_loss(logits, t_logits, distill_temperature)
            loss = (1.0 - distill_weight) * loss + distill_weight * kd
        return loss, len(batch["y"])
    if task == "lm":
        tok = batch["tokens"]
        logits = model(tok[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tok[:, 1:].flatten()), tok[:, 1:].numel()
    if task == "recall":
        sel = batch["labels"] != -100
        logits = model(batch["tokens"], select=sel)
        return F.cross_entropy(logits.float(), batch["labels"][sel]), int(sel.sum())
    if task == "ctc":
        core = model.module if hasattr(model, "module") else model
        if getattr(core, "joint_ctc_attention", False):  # attention decoder: the model computes its loss
            loss = model(batch["wave"], batch["lengths"], batch["targets"], batch["target_lengths"])
            return loss, len(batch["lengths"])
        log_probs, frames = model(batch["wave"], batch["lengths"])
        loss = core.ctc_loss(log_probs, frames, batch["targets"], batch["target_lengths"])
        return loss, len(batch["lengths"])
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _ctc_eval(model: nn.Module, core: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, list[list[int]]]:
    """(mean loss, transcripts) of a speech batch: greedy CTC, or an attention decoder's own search."""
    args = (batch["wave"], batch["lengths"], batch["targets"], batch["target_lengths"])
    if getattr(core, "joint_ctc_attention", False):
        return model(*args), core.transcribe(batch["wave"], batch["lengths"])
    log_probs, frames = model(batch["wave"], batch["lengths"])
    loss = core.ctc_loss(log_probs, frames, batch["targets"], batch["target_lengths"])
    return loss, ctc_greedy_decode(log_probs, frames, core.blank)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataModule,
    split: str,
    info: DistInfo,
    *,
    limit: int | None = None,
    autocast: Any = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` ("val" / "test"), exact over all ranks' shares.

    ``limit`` evaluates the first ``limit`` examples only; ``autocast`` is a context-manager
    factory (mixed precision) or None; ``progress`` shows a progress bar (tqdm, stderr) over
    this rank's batches.
    """
    was = model.training
    model.eval()
    task = data.task
    keys = ("loss_sum", "correct", "count", "edits", "ref_len")
    acc = dict.fromkeys(keys, 0.0)
    core = model.module if hasattr(model, "module") else model
    batches: Any = data.eval_batches(split, rank=info.rank, world=info.world, limit=limit)
    if progress:
        from tqdm.auto import tqdm

        n = data.eval_examples(split) if limit is None else min(data.eval_examples(split), limit)
        mine = len(range(info.rank, math.ceil(n / data.eval_batch_size), info.world))
        batches = tqdm(batches, total=mine, desc=f"eval {split}", unit="batch", leave=False, dynamic_ncols=True,
                       mininterval=1.0)  # fmt: skip
    try:
        for batch in batches:
            batch = _to(batch, info.device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                if task == "classify":
                    logits = (model(batch["x"], batch["mask"]) if "mask" in batch else model(batch["x"])).float()
                    acc["loss_sum"] += float(F.cross_entropy(logits, batch["y"], reduction="sum"))
                    acc["correct"] += float((logits.argmax(-1) == batch["y"]).sum())
                    acc["count"] += len(batch["y"])
                elif task == "lm":
                    tok = batch["tokens"]
                    logits = model(tok[:, :-1]).float()
                    acc["loss_sum"] += float(
                        F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten(), reduction="sum")
                    )
                    acc["count"] += tok[:, 1:].numel()
                elif task == "recall":
                    sel = batch["labels"] != -100
                    logits = model(batch["tokens"], select=sel).float()
                    tgt = batch["labels"][sel]
                    acc["loss_sum"] += float(F.cross_entropy(logits, tgt, reduction="sum"))
                    acc["correct"] += float((logits.argmax(-1) == tgt).sum())
                    acc["count"] += len(tgt)
                elif task == "ctc":
                    loss, hyps = _ctc_eval(model, core, batch)
                    acc["loss_sum"] += float(loss) * len(hyps)
                    for i, hyp in enumerate(hyps):
                        ref = batch["targets"][i, : int(batch["target_lengths"][i])].tolist()
                        acc["edits"] += edit_distance(ref, hyp)
                        acc["ref_len"] += len(ref)
                        acc["correct"] += float(hyp == ref)
                        acc["count"] += 1
                else:
                    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    finally:
        model.train(was)
        if progress:
            batches.close()
    acc = dict(zip(keys, all_reduce_sum([acc[k] for k in keys], info)))
    n = max(acc["count"], 1.0)
    out = {"loss": acc["loss_sum"] / n}
    if task in ("classify", "recall"):
        out["accuracy"] = acc["correct"] / n
    if task == "lm":
        out["bpc"] = out["loss"] / math.log(2)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    if task == "ctc":
        out["cer"] = acc["edits"] / max(acc["ref_len"], 1.0)
        out["utterance_accuracy"] = acc["correct"] / n
    return out
