"""Head importance: gradient-based (Michel, Levy & Neubig 2019) and by ablation.

Both take ``loss_fn(model, batch) -> scalar`` and an iterable of batches, and return (L, H):
one row per attention site (:func:`attnlib.analysis.attention_sites`) and one column per head.

* :func:`gradient_head_importance`: ``I_h = E |d loss / d xi_h|`` at ``xi = 1``, with ``xi`` the
  head mask of :func:`attnlib.analysis.head_mask` - the first-order estimate of the loss change
  when the head is removed. As in the authors' code the absolute value is taken per batch (of
  the batch's mean loss), then averaged over the batches; the paper writes the expectation over
  single examples. ``normalize_layers`` divides each layer's row by its L2 norm (the paper's
  default).
* :func:`ablation_head_importance`: the exact change of the mean loss when the head alone is
  masked to 0 (L·H extra evaluations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.analysis.capture import attention_sites, head_mask, site_core

__all__ = ["ablation_head_importance", "gradient_head_importance", "head_counts"]

LossFn = Callable[[nn.Module, Any], Tensor]


def head_counts(model: nn.Module) -> list[int]:
    """Heads of each attention site of ``model``, in order."""
    sites = attention_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no attention sites")
    return [site_core(name, mod).num_heads for name, mod in sites]


def _ones(model: nn.Module) -> Tensor:
    counts = head_counts(model)
    if len(set(counts)) != 1:
        raise ValueError(f"head importance needs the same head count in every layer, got {counts}")
    p = next(model.parameters(), None)
    return torch.ones(len(counts), counts[0], dtype=torch.float32, device=None if p is None else p.device)


def gradient_head_importance(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, normalize_layers: bool = True
) -> Tensor:
    """Head importance ``mean over batches of |d loss / d xi|`` at the all-ones head mask ``xi``: (L, H).

    The model's parameter gradients are not touched (``torch.autograd.grad`` on the mask only);
    run it in eval mode for a deterministic estimate.
    """
    xi = _ones(model).requires_grad_(True)
    total = torch.zeros_like(xi)
    count = 0
    for batch in batches:
        with head_mask(model, xi):
            loss = loss_fn(model, batch)
        (g,) = torch.autograd.grad(loss, xi)
        total += g.abs()
        count += 1
    if count == 0:
        raise ValueError("gradient_head_importance: no batches")
    imp = total / count
    if normalize_layers:
        imp = imp / imp.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return imp.detach()


@torch.no_grad()
def ablation_head_importance(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any]) -> Tensor:
    """``mean loss with head (l, h) masked to 0 - mean loss of the full model``: (L, H).

    Positive entries are heads whose removal hurts. ``batches`` is iterated once and kept.
    """
    data = list(batches)
    if not data:
        raise ValueError("ablation_head_importance: no batches")
    ones = _ones(model)

    def mean_loss(mask: Tensor | None) -> float:
        tot = 0.0
        for batch in data:
            if mask is None:
                tot += float(loss_fn(model, batch))
            else:
                with head_mask(model, mask):
                    tot += float(loss_fn(model, batch))
        return tot / len(data)

    base = mean_loss(None)
    out = torch.zeros_like(ones)
    for layer in range(ones.shape[0]):
        for h in range(ones.shape[1]):
            m = ones.clone()
            m[layer, h] = 0.0
            out[layer, h] = mean_loss(m) - base
    return out
