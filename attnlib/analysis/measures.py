"""Measures of attention weights: pure functions on tensors.

Weights are (B, H, R, M) - R query rows (all N, or a sample of them), M keys - unless a function
says otherwise; masks are boolean, True = may attend, broadcastable to the weights. Rows of
exact softmax-like variants sum to 1; some variants report weights that do not (``flow``'s
``W`` with ``out = W v``; ``lsa``'s signed scores): functions that need a distribution say so
and raise a ValueError for the others (or renormalise where asked to).

* :func:`entropy` - per head and query, in nats (Zhai et al. 2023 track its mean);
* :func:`kl_divergence`, :func:`js_divergence`, :func:`l1_distance` - row-wise agreement;
* :func:`rollout`, :func:`attention_flow` - Abnar & Zuidema (2020): attention through the layers;
* :func:`attention_distance` - mean distance attended over (1-D, or an image token grid as in
  the ViT paper's figure of mean attention distance);
* :func:`segment_mass` - the attention each segment (e.g. a document) receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnlib._validation import describe

__all__ = [
    "attention_distance",
    "attention_flow",
    "entropy",
    "js_divergence",
    "kl_divergence",
    "l1_distance",
    "rollout",
    "segment_mass",
]

_TOL = 1e-3  # rows of a distribution sum to 1 (or 0: a fully masked row) within this


def _as_weights(w: object, what: str = "weights") -> Tensor:
    if not isinstance(w, Tensor) or w.dim() < 1 or not w.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor (..., M), got {describe(w)}")
    return w


def _apply_mask(w: Tensor, mask: Tensor | None) -> Tensor:
    """Weights with masked keys set to 0 (they are excluded, not given mass)."""
    if mask is None:
        return w
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = may attend), got {describe(mask)}")
    try:
        torch.broadcast_shapes(mask.shape, w.shape)
    except RuntimeError:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to weights {tuple(w.shape)}") from None
    return w.masked_fill(~mask.to(w.device), 0.0)


def _distribution(w: Tensor, what: str, normalize: bool) -> Tensor:
    """Check rows are a distribution (non-negative, sum 1 or 0), or renormalise them."""
    neg = float(w.min()) if w.numel() else 0.0
    if neg < -_TOL * max(1.0, float(w.abs().max())):
        raise ValueError(
            f"{what} has negative entries (min {neg:.3g}): not a distribution over keys (signed "
            "attention scores, e.g. variant 'lsa'); entropy and divergences are undefined for it"
        )
    w = w.clamp_min(0.0)
    s = w.sum(-1, keepdim=True)
    if normalize:
        return torch.where(s > 0, w / s.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    off = ((s - 1).abs() > _TOL) & (s.abs() > _TOL)
    if bool(off.any()):
        bad = s[off].flatten()[:3].tolist()
        raise ValueError(
            f"{what} rows must sum to 1 (or 0 for a fully masked row), got row sums such as {bad}; "
            "pass normalize=True to renormalise them (variants like 'flow' report weights W with "
            "out = W v whose rows do not sum to 1)"
        )
    return w


def entropy(weights: Tensor, mask: Tensor | None = None, *, normalize: bool = False) -> Tensor:
    """Entropy of each attention row in nats: ``-sum_j p_ij log p_ij`` with ``0 log 0 = 0``.

    Args:
        weights: (..., M) attention rows, e.g. (B, H, R, M).
        mask: bool, broadcastable to ``weights``; keys with False are excluded (not given mass).
        normalize: renormalise each row to sum 1 first (else rows must sum to 1, or 0 for a
            fully masked row, which has entropy 0).

    Returns:
        (...) entropies, e.g. (B, H, R): ``log(M)`` for a uniform row, 0 for a one-hot row.
    """
    w = _distribution(_apply_mask(_as_weights(weights), mask), "weights", normalize)
    return -torch.special.xlogy(w, w).sum(-1)


def kl_divergence(p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Row-wise ``KL(p || q) = sum_j p_j log(p_j / q_j)`` in nats, rows renormalised to sum 1.

    p, q: (..., M) non-negative; mask as in :func:`entropy`. Returns (...). Infinite where q
    puts no mass on a key p uses (a sparse q against a dense p); see :func:`js_divergence`.
    """
    return _kl_rows(*_pair(p, q, mask))


def js_divergence(p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Row-wise Jensen-Shannon divergence ``KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``.

    Symmetric, finite and in [0, log 2] nats. p, q: (..., M) non-negative (rows renormalised);
    returns (...).
    """
    p, q = _pair(p, q, mask)
    m = (p + q) / 2
    return 0.5 * (_kl_rows(p, m) + _kl_rows(q, m))


def l1_distance(p: Tensor, q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Row-wise ``sum_j |p_j - q_j|`` of the weights as given (no renormalisation; any sign).

    In [0, 2] for two distributions (twice their total-variation distance). p, q: (..., M);
    returns (...).
    """
    p, q = _as_weights(p, "p"), _as_weights(q, "q")
    _same_shape(p, q)
    return (_apply_mask(p, mask) - _apply_mask(q, mask)).abs().sum(-1)


def _same_shape(p: Tensor, q: Tensor) -> None:
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")


def _pair(p: Tensor, q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    p, q = _as_weights(p, "p"), _as_weights(q, "q")
    _same_shape(p, q)
    p = _distribution(_apply_mask(p, mask), "p", True)
    q = _distribution(_apply_mask(q, mask), "q", True)
    return p, q


def _kl_rows(p: Tensor, q: Tensor) -> Tensor:
    terms = torch.special.xlogy(p, p) - torch.special.xlogy(p, q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


# -- through the layers --------------------------------------------------------------------------


def _fuse_heads(weights: Sequence[Tensor], head_fusion: str, residual: float) -> list[Tensor]:
    """Per layer: heads fused, ``(1 - residual) A + residual I``, rows renormalised -> (B, N, N)."""
    if isinstance(weights, Tensor) or not len(weights):
        raise ValueError(
            f"weights must be a non-empty sequence of per-layer (B, H, N, N) tensors, got {describe(weights)}"
        )
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual!r}")
    shape = None
    out = []
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.dim() != 4 or w.shape[-1] != w.shape[-2]:
            raise ValueError(
                f"layer {i}: weights must be (B, H, N, N) self-attention maps with every query row "
                f"(not a sample of rows), got {describe(w)}"
            )
        if shape is not None and (w.shape[0], w.shape[2]) != shape:
            raise ValueError(f"layer {i}: (B, N) = {(w.shape[0], w.shape[2])} differs from layer 0's {shape}")
        shape = (w.shape[0], w.shape[2])
        if float(w.min()) < -_TOL:
            raise ValueError(f"layer {i}: weights have negative entries; rollout needs non-negative weights")
        a = w.mean(1) if head_fusion == "mean" else (w.amax(1) if head_fusion == "max" else w.amin(1))
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = (1.0 - residual) * a + residual * eye
        out.append(a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny))
    return out


def rollout(weights: Sequence[Tensor], *, residual: float = 0.5, head_fusion: str = "mean") -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input token.

    Args:
        weights: per-layer (B, H, N, N) self-attention weights, first layer first.
        residual: weight of the residual connection, ``Â_l = (1 - residual) A_l + residual I``
            with rows renormalised (0.5: the paper's ``(A + I) / 2``).
        head_fusion: how heads combine into ``A_l``: "mean" (the paper), "max" or "min".

    Returns:
        (B, N, N) joint attention ``Â_L Â_{L-1} ... Â_1``: row i is output token i's attention
        distribution over the input tokens (rows sum to 1).
    """
    fused = _fuse_heads(weights, head_fusion, residual)
    joint = fused[0]
    for a in fused[1:]:
        joint = a @ joint
    return joint


def attention_flow(
    weights: Sequence[Tensor], *, residual: float = 0.5, head_fusion: str = "mean", max_tokens: int = 64
) -> Tensor:
    """Attention flow (Abnar & Zuidema 2020): maximum flow from each output to each input token.

    The layers form a graph: node (l, i) is token i after layer l (l = 0: the input), with an
    edge (l, i) -> (l - 1, j) of capacity ``Â_l[i, j]`` (heads fused and the residual added as
    in :func:`rollout`). Entry [b, i, j] is the maximum flow from (L, i) to (0, j), each row
    then normalised to sum 1, as the authors' code does. Solved with networkx (Edmonds-Karp
    max flow), N^2 problems per batch entry: for small N only.

    Args:
        weights, residual, head_fusion: as in :func:`rollout`.
        max_tokens: refuse larger N (the cost grows like N^4 L).

    Returns:
        (B, N, N) flow values, rows summing to 1 (float64, on the weights' device).
    """
    import networkx as nx
    from networkx.algorithms.flow import edmonds_karp

    fused = _fuse_heads(weights, head_fusion, residual)
    b, n = fused[0].shape[0], fused[0].shape[-1]
    if n > max_tokens:
        raise ValueError(f"attention_flow solves N^2 max-flow problems: N={n} > max_tokens={max_tokens}")
    caps = torch.stack([a.detach().double().cpu() for a in fused], 1)  # (B, L, N, N)
    layers = caps.shape[1]
    out = torch.zeros(b, n, n, dtype=torch.float64)
    for bi in range(b):
        g = nx.DiGraph()
        for li in range(layers):
            c = caps[bi, li]
            for i in range(n):
                for j in range(n):
                    if float(c[i, j]) > 0:
                        g.add_edge((li + 1, i), (li, j), capacity=float(c[i, j]))
        for i in range(n):
            for j in range(n):
                src, dst = (layers, i), (0, j)
                if src in g and dst in g:
                    out[bi, i, j] = nx.maximum_flow_value(g, src, dst, flow_func=edmonds_karp)
    out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return out.to(fused[0].device)


# -- distances and segments ----------------------------------------------------------------------


def attention_distance(
    weights: Tensor,
    *,
    rows: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
    patch_size: float = 1.0,
) -> Tensor:
    """Mean distance each query attends over: ``sum_j p_ij d(i, j) / sum_j p_ij``.

    Args:
        weights: (B, H, R, N) self-attention weights (non-negative; rows need not sum to 1).
        rows: (R,) indices of the weights' query rows among the N tokens (default: all, R = N).
        grid: (gh, gw) for image tokens: tokens ``num_prefix ..`` are patches in row-major order
            and ``d`` is the Euclidean distance between patch centres times ``patch_size``
            (pixels), as in the ViT paper's mean attention distance. Prefix tokens (e.g. a class
            token) are left out as keys (the rows are renormalised over the patches) and their
            own rows are NaN. Without a grid, ``d(i, j) = |i - j|`` in tokens.
        num_prefix: tokens before the patches (grid only).
        patch_size: pixels per patch side (grid only).

    Returns:
        (B, H, R) mean distances (0 for a row without mass; NaN for prefix rows with a grid).
    """
    w = _as_weights(weights)
    if w.dim() != 4:
        raise ValueError(f"weights must be (B, H, R, N), got {describe(w)}")
    if float(w.min()) < -_TOL:
        raise ValueError("attention_distance needs non-negative weights (a signed variant such as 'lsa' has none)")
    n = w.shape[-1]
    r_idx = torch.arange(w.shape[2]) if rows is None else torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
    if r_idx.numel() != w.shape[2] or (r_idx.numel() and (int(r_idx.min()) < 0 or int(r_idx.max()) >= n)):
        raise ValueError(f"rows must hold {w.shape[2]} query indices in [0, {n}), got {describe(rows)}")
    if grid is None:
        pos_k = torch.arange(n, dtype=torch.float64)
        d = (r_idx.double()[:, None] - pos_k[None, :]).abs()
        keep_rows = torch.ones(len(r_idx), dtype=torch.bool)
    else:
        gh, gw = grid
        if num_prefix < 0 or gh * gw + num_prefix != n:
            raise ValueError(f"grid {grid} with num_prefix={num_prefix} needs N = {gh * gw + num_prefix}, got N = {n}")
        p = torch.arange(gh * gw)
        yx = torch.stack([p // gw, p % gw], -1).double() * float(patch_size)
        full = torch.zeros(n, n, dtype=torch.float64)
        full[num_prefix:, num_prefix:] = torch.cdist(yx, yx)
        d = full[r_idx]
        keep_rows = r_idx >= num_prefix
        w = w.clone()
        w[..., :num_prefix] = 0.0
    d = d.to(device=w.device, dtype=w.dtype)
    s = w.sum(-1)
    out = (w * d).sum(-1) / s.clamp_min(torch.finfo(w.dtype).tiny)
    out = torch.where(s > 0, out, torch.zeros_like(out))
    return out.masked_fill(~keep_rows.to(w.device), float("nan"))


def segment_mass(weights: Tensor, segment_ids: Tensor, num_segments: int | None = None) -> Tensor:
    """The attention mass each segment of keys receives: ``mass[..., s] = sum_{j: seg(j) = s} w_j``.

    Args:
        weights: (B, H, R, M) weights (e.g. the last query's row, R = 1).
        segment_ids: (B, M) or (M,) long segment of each key; -1 = in no segment (questions,
            separators, an attention-sink token), left out.
        num_segments: S (default: the largest id + 1).

    Returns:
        (B, H, R, S). Summed with the mass of the keys in no segment it gives each row's sum.
    """
    w = _as_weights(weights)
    if w.dim() != 4:
        raise ValueError(f"weights must be (B, H, R, M), got {describe(w)}")
    b, _, _, m = w.shape
    if not isinstance(segment_ids, Tensor) or segment_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"segment_ids must be an integer tensor (B, M) or (M,), got {describe(segment_ids)}")
    seg = segment_ids.to(w.device).long()
    if seg.dim() == 1:
        seg = seg.expand(b, -1)
    if tuple(seg.shape) != (b, m):
        raise ValueError(f"segment_ids must be (B={b}, M={m}) or ({m},), got {tuple(segment_ids.shape)}")
    s = int(seg.max()) + 1 if num_segments is None else int(num_segments)
    if int(seg.min()) < -1 or int(seg.max()) >= s:
        raise ValueError(f"segment ids must be in [-1, {s}), got range [{int(seg.min())}, {int(seg.max())}]")
    onehot = torch.nn.functional.one_hot(seg.clamp_min(0), s).to(w.dtype) * (seg >= 0).unsqueeze(-1).to(w.dtype)
    return torch.einsum("bhrm,bms->bhrs", w, onehot)
