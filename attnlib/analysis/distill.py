"""Attention distillation in training: ``attnlib-train distill_from=<run> trainer.distill_attention=...``.

:class:`AttentionDistiller` wraps a training-loss function ``loss_fn(model, batch, task,
**kw) -> (loss, items)`` (:func:`attnlib.training.train_loss`): the student's forward runs
inside a :func:`attnlib.analysis.capture` that keeps the graph, the frozen teacher's forward
on the same batch inside another, and the distillation loss is added:

* ``"maps"`` - attention-map transfer, :func:`attnlib.functional.relations.attention_map_kl`
  of every student layer to a teacher layer (student layer i of L_s takes teacher layer
  ``round((i + 1) L_t / L_s) - 1``, the uniform mapping of TinyBERT); head-averaged maps when the
  head counts differ. Both variants must report weights; N must match.
* ``"relations"`` - MiniLMv2, :func:`attnlib.functional.relations.minilm_relation_loss` between
  the last layers' q, k, v (before rotary positions), with R relation heads: any head counts
  and widths, as long as R divides both widths.

``total = task loss (+ logit KD for classification, as before) + weight * distillation loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.analysis.capture import Recorder, capture
from attnlib.functional.relations import attention_map_kl, minilm_relation_loss

__all__ = ["KINDS", "AttentionDistiller", "attention_distillation", "layer_map"]

KINDS = ("maps", "relations")


def _f(x: Tensor) -> Tensor:
    """At least float32 (losses of half-precision activations under autocast are computed in float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer of each student layer: ``round((i + 1) L_t / L_s) - 1`` (the last maps to the last)."""
    return [max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


class AttentionDistiller:
    """Adds an attention distillation loss to a training-loss function.

    Args:
        teacher: the frozen teacher model (eval mode; built of attnlib attention).
        kind: "maps" or "relations" (see the module docstring).
        weight: multiplies the distillation loss.
        relation_heads: R for "relations".
    """

    def __init__(self, teacher: nn.Module, *, kind: str, weight: float = 1.0, relation_heads: int = 8) -> None:
        if kind not in KINDS:
            raise ValueError(f"attention distillation kind must be one of {KINDS}, got {kind!r}")
        if not weight >= 0:
            raise ValueError(f"attention distillation weight must be >= 0, got {weight!r}")
        self.teacher = teacher
        self.kind = kind
        self.weight = float(weight)
        self.relation_heads = int(relation_heads)

    def _capture(self, model: nn.Module, *, detach: bool) -> Any:
        maps = self.kind == "maps"
        return capture(model, weights=maps, importance=False, qkv=not maps, detach=detach)

    def loss(self, teacher: Recorder, student: Recorder) -> Tensor:
        """The distillation loss from the two captures of one batch (scalar, at least float32)."""
        s_recs, t_recs = student.layers(0), teacher.layers(0)
        if not s_recs or not t_recs:
            raise ValueError("attention distillation: a forward of the student or the teacher recorded nothing")
        if self.kind == "relations":
            s, t = s_recs[-1], t_recs[-1]
            if s.q is None or t.q is None:
                raise ValueError(
                    f"relation distillation needs q, k, v of {s.name!r} and {t.name!r} (attnlib.Attention layers)"
                )
            kp = None if s.mask is None else s.mask.key_padding
            return minilm_relation_loss(
                (_f(t.q), _f(t.k), _f(t.v)),  # type: ignore[arg-type]
                (_f(s.q), _f(s.k), _f(s.v)),  # type: ignore[arg-type]
                self.relation_heads,
                kp,
            )
        total = torch.zeros((), device=s_recs[0].weights.device if s_recs[0].weights is not None else None)
        for s, ti in zip(s_recs, layer_map(len(s_recs), len(t_recs))):
            t = t_recs[ti]
            if s.weights is None or t.weights is None:
                missing = s.name if s.weights is None else f"teacher {t.name}"
                raise ValueError(
                    f"attention-map distillation needs attention weights, but {missing!r} reports none "
                    "(a variant with capabilities.has_weights=False); use distill_attention=relations"
                )
            if s.weights.shape[-2:] != t.weights.shape[-2:]:
                raise ValueError(
                    f"attention maps of student {s.name!r} {tuple(s.weights.shape)} and teacher {t.name!r} "
                    f"{tuple(t.weights.shape)} cover different tokens"
                )
            allowed = s.allowed()
            total = total + attention_map_kl(
                _f(t.weights),
                _f(s.weights),
                None if allowed is None else allowed.to(s.weights.device),
                average_heads=s.weights.shape[1] != t.weights.shape[1],
            )
        return total / len(s_recs)

    def wrap(self, loss_fn: Callable[..., tuple[Tensor, int]]) -> Callable[..., tuple[Tensor, int]]:
        """``loss_fn`` plus ``weight`` times the distillation loss (same signature and return)."""

        def wrapped(model: nn.Module, batch: Any, task: str, **kw: Any) -> tuple[Tensor, int]:
            if task != "classify":  # logit distillation is for classification; the teacher still runs below
                kw["teacher"] = None
            with self._capture(model, detach=False) as s_rec, self._capture(self.teacher, detach=True) as t_rec:
                loss, items = loss_fn(model, batch, task, **kw)
                if not t_rec.records:  # the task loss did not run the teacher
                    with torch.no_grad():
                        loss_fn(self.teacher, batch, task)
            return loss + self.weight * self.loss(t_rec, s_rec).to(loss.dtype), items

        return wrapped


def attention_distillation(
    loss_fn: Callable[..., tuple[Tensor, int]], teacher: nn.Module | None, trainer: Mapping[str, Any]
) -> Callable[..., tuple[Tensor, int]]:
    """The training-loss function with attention distillation per the trainer settings
    ``distill_attention`` (null | "maps" | "relations"), ``distill_attention_weight`` and
    ``distill_relation_heads``; ``loss_fn`` itself when off. ValueError without a teacher."""
    kind = trainer.get("distill_attention")
    if kind in (None, "", False, "none", "null"):
        return loss_fn
    if teacher is None:
        raise ValueError(
            f"trainer.distill_attention={kind!r} needs a teacher: set distill_from=<run dir or checkpoint>"
        )
    return AttentionDistiller(
        teacher,
        kind=str(kind),
        weight=float(trainer.get("distill_attention_weight", 1.0)),
        relation_heads=int(trainer.get("distill_relation_heads", 8)),
    ).wrap(loss_fn)
