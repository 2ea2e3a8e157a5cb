"""Per-head summaries of a capture: entropy per (layer, head), and the metrics the trainer logs.

:func:`head_entropy` averages :func:`attnlib.analysis.entropy` over the batch and the query
rows that may attend something; :func:`entropy_metrics` turns one forward into the scalars
``attnlib-train`` writes to ``metrics.csv`` (split ``attention``) at every evaluation, which
``attnlib-analyze`` plots as entropy curves over training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.analysis.capture import Record, Recorder, capture
from attnlib.analysis.measures import entropy

__all__ = ["entropy_metrics", "head_entropy", "record_entropy"]


def record_entropy(record: Record) -> Tensor | None:
    """(H,) mean entropy (nats) of each head of one call: over the batch and the query rows that
    may attend at least one key; rows renormalised (variants like ``flow``); None without weights
    or for signed weights."""
    if record.weights is None:
        return None
    allowed = record.allowed()
    w = record.weights.double()
    try:
        ent = entropy(w, None if allowed is None else allowed.to(w.device), normalize=True)  # (B, H, R)
    except ValueError:
        return None
    valid = (w.sum(-1) > 0).to(ent.dtype)
    return (ent * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1.0)


def head_entropy(rec: Recorder, call: int = -1) -> Tensor:
    """(L, H_max) mean entropy per site and head (NaN for sites without weights, and beyond a
    site's own head count), from each site's ``call``-th call."""
    rows = [record_entropy(r) for r in rec.layers(call)]
    if not rows:
        raise ValueError("nothing was captured")
    h = max((len(r) for r in rows if r is not None), default=1)
    out = torch.full((len(rows), h), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : len(r)] = r.cpu()
    return out


@torch.no_grad()
def entropy_metrics(model: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, float]:
    """One forward ``run(model)`` in eval mode -> ``{"entropy": mean, "entropy_L{l}": layer mean,
    "entropy_L{l}_H{h}": head}`` in nats; empty when no layer reports weights."""
    was = model.training
    model.eval()
    try:
        with capture(model, importance=False) as rec:
            run(model)
    finally:
        model.train(was)
    if not rec.records:
        return {}
    ent = head_entropy(rec, call=0)
    out: dict[str, float] = {}
    if bool(torch.isnan(ent).all()):
        return out
    out["entropy"] = float(ent.nanmean())
    for layer, row in enumerate(ent):
        if bool(torch.isnan(row).all()):
            continue
        out[f"entropy_L{layer}"] = float(row.nanmean())
        for h, val in enumerate(row.tolist()):
            if val == val:  # not NaN
                out[f"entropy_L{layer}_H{h}"] = val
    return out
