"""Self-attention over ragged batches packed by length (:meth:`attnlib.Attention.forward_groups`).

The real tokens of a batch are concatenated and grouped by sequence length; the projections run
once over all of them and the variant's core once per group, on an unpadded batch. The layout
is built from a padded batch by :func:`attnlib.models.ragged.group_by_length`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnlib._validation import describe
from attnlib.masks import normalize_mask
from attnlib.positional import RotaryCall, RotaryPositions

if TYPE_CHECKING:  # pragma: no cover
    from attnlib.attention import Attention

__all__ = ["forward_groups"]


def _check_groups(
    attn: Attention,
    x: Tensor,
    groups: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    positions: Tensor | RotaryPositions | None,
) -> list[tuple[int, int]]:
    """Validate the packed call; returns the groups as (rows, length) int pairs."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != attn.dim:
        raise ValueError(f"forward_groups: x must be (T, dim={attn.dim}) packed tokens, got {describe(x)}")
    attn._check_inputs(x[None] if x.shape[0] else x.new_zeros(1, 1, attn.dim), None)
    try:
        sizes = [(int(r), int(n)) for r, n in groups]
    except (TypeError, ValueError):
        raise ValueError(f"forward_groups: groups must be a list of (rows, length) int pairs, got {groups!r}") from None
    if any(r < 0 or n < 0 for r, n in sizes) or sum(r * n for r, n in sizes) != x.shape[0]:
        raise ValueError(
            f"forward_groups: groups {sizes} (rows, length >= 0) must cover the T={x.shape[0]} tokens of x "
            f"exactly (sum of rows * length = {sum(r * n for r, n in sizes)})"
        )
    if positions is not None and attn.rope is None:
        raise ValueError("forward_groups: positions= sets rotary positions, but this module has rope=False")
    if positions is not None and (positions.dim() != 1 or positions.shape[0] != x.shape[0]):
        raise ValueError(f"forward_groups: positions must be (T,) = ({x.shape[0]},), got {describe(positions)}")
    return sizes


def _group_positions(positions: Tensor | RotaryPositions | None, start: int, rows: int, n: int) -> Tensor:
    """The (rows, n) long positions of one group's tokens."""
    pos = positions.positions if isinstance(positions, RotaryPositions) else positions
    if pos is None:
        raise ValueError("forward_groups: rotary positions are missing")
    return pos[start : start + rows * n].view(rows, n).long()


def _forward_groups_tokens(
    attn: Attention,
    x: Tensor,
    sizes: list[tuple[int, int]],
    positions: Tensor | RotaryPositions | None,
    return_importance: bool,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """forward_groups for a ``projects_tokens`` core: the core runs on each group's tokens."""
    y = x.new_empty(x.shape[0], attn.dim)
    imps: list[Tensor] = []
    has_imp = return_importance
    aux: Tensor | None = None
    start = 0
    for r, n in sizes:
        t = r * n
        if t == 0:
            continue
        am = normalize_mask(None, causal=attn.causal, batch=r, heads=attn.num_heads, n=n, m=n, device=x.device)
        rotary = None
        if attn.rope is not None:
            pos = _group_positions(positions, start, r, n)
            rotary = RotaryCall(attn.rope.base, pos, pos)
        yg, res = attn.run_tokens(
            x[start : start + t].view(r, n, -1), am, rotary, need_weights=False, need_importance=return_importance
        )
        y[start : start + t] = yg.reshape(t, -1)
        if res.aux_loss is not None:
            aux = res.aux_loss * t if aux is None else aux + res.aux_loss * t
        if return_importance:
            if res.importance is None:
                has_imp = False
            else:
                imps.append(res.importance.mean(1).reshape(t))
        start += t
    attn.pending_aux_loss = None if aux is None else aux / max(x.shape[0], 1)
    if not return_importance:
        return y
    return y, (torch.cat(imps) if has_imp and imps else (x.new_zeros(0) if has_imp else None))


def forward_groups(
    attn: Attention,
    x: Tensor,
    groups: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    *,
    positions: Tensor | RotaryPositions | None = None,
    return_importance: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """``attn`` over the packed tokens x (T, dim) in ``groups``; see :meth:`Attention.forward_groups`."""
    sizes = _check_groups(attn, x, groups, positions)
    if attn.rope is not None and positions is None:
        positions = torch.cat(
            [torch.arange(n, device=x.device).repeat(r) for r, n in sizes] or [x.new_zeros(0, dtype=torch.long)]
        )
    if attn.core.projects_tokens:
        return _forward_groups_tokens(attn, x, sizes, positions, return_importance)
    qk, vv = attn._project_tokens(x, 0, positions)  # all T tokens at once
    hq, d = attn.num_heads, attn.head_dim
    merged: Tensor | None = None  # (T, H * Dv): each group's output copied in once (no cat)
    imps: list[Tensor] = []
    has_imp = return_importance
    aux: Tensor | None = None
    start = 0
    for r, n in sizes:
        t = r * n
        if t == 0:
            continue
        # plain views, not einops: this loop runs once per distinct length (dozens per batch),
        # where einops' per-call overhead adds up
        part = qk[start : start + t].view(r, n, -1, d)
        q, k = part[:, :, :hq].transpose(1, 2), part[:, :, hq:].transpose(1, 2)
        v = vv[start : start + t].view(r, n, -1, d).transpose(1, 2)
        am = normalize_mask(None, causal=attn.causal, batch=r, heads=hq, n=n, m=n, device=x.device)
        rotary = None
        if attn.rope is not None and attn.core.uses_rotary:
            pos = _group_positions(positions, start, r, n)
            rotary = RotaryCall(attn.rope.base, pos, pos)
        res = attn._attend(q, *attn._repeat_kv(k, v), am, rotary=rotary, need_importance=return_importance)
        out = attn._output_dropout(res.out)
        if merged is None:
            merged = out.new_empty(x.shape[0], out.shape[1] * out.shape[3])
        merged[start : start + t].view(r, n, out.shape[1], out.shape[3]).copy_(out.transpose(1, 2))
        if res.aux_loss is not None:
            aux = res.aux_loss * t if aux is None else aux + res.aux_loss * t
        if return_importance:
            if res.importance is None:
                has_imp = False
            else:
                imps.append(res.importance.mean(1).reshape(t))
        start += t
    y = attn.out_proj(merged if merged is not None else x.new_zeros(0, attn.dim))
    attn.pending_aux_loss = None if aux is None else aux / max(x.shape[0], 1)  # token-weighted mean
    if not return_importance:
        return y
    if not has_imp:
        return y, None
    return y, (torch.cat(imps) if imps else x.new_zeros(0))
