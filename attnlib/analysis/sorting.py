"""Attention sorting (Peysakhovich & Lerer 2023): reorder context documents by the attention they receive.

Long-context models attend less to early documents (a recency prior), yet a relevant document
still draws more attention than an irrelevant one at the same position. Attention sorting
runs one decoding step over ``[prefix] doc_1 ... doc_k [query]``, measures the attention each
document receives from the last position, re-orders the documents by it *ascending* (the most
attended document last, next to the query), repeats, and then decodes with the final order.

:func:`document_attention` is the measurement: the last query row's attention, summed over each
document's tokens (:func:`attnlib.analysis.segment_mass`) and averaged over every layer and
head - the default we chose where the paper leaves the aggregation open (see docs/analysis.md).
Prefix and query tokens belong to no document (an attention-sink first token does not count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlib._validation import describe, positive_int
from attnlib.analysis.capture import capture
from attnlib.analysis.measures import segment_mass

__all__ = ["SortResult", "attention_sort", "document_attention", "layout"]


def layout(
    documents: Sequence[Tensor], order: Sequence[int], query: Tensor, prefix: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``[prefix] doc_order[0] ... doc_order[-1] query`` -> (tokens (N,), segment ids (N,)).

    Each token's segment id is its document's index in ``documents`` (-1 for prefix and query).
    """
    parts, segs = [], []
    if prefix is not None:
        parts.append(prefix)
        segs.append(torch.full((len(prefix),), -1, dtype=torch.long))
    for d in order:
        parts.append(documents[d])
        segs.append(torch.full((len(documents[d]),), int(d), dtype=torch.long))
    parts.append(query)
    segs.append(torch.full((len(query),), -1, dtype=torch.long))
    return torch.cat(parts).long(), torch.cat(segs)


@torch.no_grad()
def document_attention(
    model: nn.Module,
    tokens: Tensor,
    segment_ids: Tensor,
    num_documents: int | None = None,
    *,
    forward: Callable[[nn.Module, Tensor], object] | None = None,
) -> Tensor:
    """Attention each document receives from the last position: (B, S).

    Args:
        model: a causal model of attnlib attention (e.g. :class:`attnlib.models.DecoderLM`).
        tokens: (B, N) long.
        segment_ids: (B, N) or (N,) document of each token, -1 = none.
        num_documents: S (default: largest id + 1).
        forward: ``forward(model, tokens)`` (default ``model(tokens)``).

    Returns:
        (B, S): last-row weights summed over each document's tokens, averaged over layers and heads.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, N), got {describe(tokens)}")
    with capture(model, rows=[tokens.shape[1] - 1], importance=False) as rec:
        (forward or (lambda m, t: m(t)))(model, tokens)
    masses = [segment_mass(w.double(), segment_ids, num_documents) for w in rec.weights(call=0)]  # (B, H, 1, S)
    return torch.stack([m.mean(1)[:, 0] for m in masses]).mean(0)


@dataclass
class SortResult:
    """What :func:`attention_sort` returns.

    Attributes:
        order: the final document order (indices into the documents; the most attended last).
        history: per round, (the order measured, attention per document (S,) by document index).
    """

    order: list[int]
    history: list[tuple[list[int], Tensor]]


def attention_sort(
    model: nn.Module,
    documents: Sequence[Tensor],
    query: Tensor,
    *,
    prefix: Tensor | None = None,
    iterations: int = 1,
    order: Sequence[int] | None = None,
    forward: Callable[[nn.Module, Tensor], object] | None = None,
) -> SortResult:
    """Sort ``documents`` by the attention they receive, ``iterations`` times.

    Args:
        model: as for :func:`document_attention`.
        documents: k token tensors (len_i,), tokenised separately (exact boundaries).
        query: (len_q,) tokens that stay last (question / instruction).
        prefix: (len_p,) tokens that stay first (e.g. BOS), or None.
        iterations: rounds of measure-and-sort.
        order: the starting order (default 0..k-1).
        forward: as for :func:`document_attention`.

    Returns:
        :class:`SortResult`. Sorting is stable: an order whose attention already ascends is a
        fixed point.
    """
    k = len(documents)
    if k == 0:
        raise ValueError("attention_sort needs at least one document")
    positive_int(iterations, "iterations")
    cur = list(range(k)) if order is None else [int(i) for i in order]
    if sorted(cur) != list(range(k)):
        raise ValueError(f"order must be a permutation of 0..{k - 1}, got {list(order or [])}")
    history: list[tuple[list[int], Tensor]] = []
    for _ in range(iterations):
        tokens, seg = layout(documents, cur, query, prefix)
        dev = next(model.parameters()).device
        mass = document_attention(model, tokens[None].to(dev), seg.to(dev), k, forward=forward)[0].cpu()
        history.append((list(cur), mass))
        cur = sorted(cur, key=lambda d: float(mass[d]))  # stable: ties keep the current order
    return SortResult(cur, history)
