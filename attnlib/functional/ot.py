"""Optimal transport as differentiable, batched PyTorch functions: Sinkhorn, IPOT, Gromov-Wasserstein, GOT.

Every solver works on costs of shape (..., N, M) (any leading batch dims), with marginals
``a`` (..., N) and ``b`` (..., M) that default to uniform over the real points, and padding
masks ``a_mask`` (..., N) / ``b_mask`` (..., M) (True = real point): padded rows/columns get
zero mass and never produce NaN/inf, also when a whole example is padding. Iterations run in
the log domain in float32 for half inputs (and in float64 for float64 inputs); results come
back in that computation dtype. Gradients flow through the iterations (autograd unrolling)
unless ``plan_grad="envelope"`` is asked for, where it exists.

* :func:`sinkhorn` - entropic OT, log-domain Sinkhorn (Cuturi 2013): the plan
  ``P = argmin <C, P> - eps H(P)`` with marginals a, b; ``<C, P>`` equals POT's
  ``ot.sinkhorn2(..., method="sinkhorn_log")``.
* :func:`ipot` - the inexact proximal point method (Xie et al. 2019), the solver of GOT:
  converges to the exact (unregularised) OT plan (``ot.emd``) as iterations grow.
* :func:`gromov_wasserstein` - GW with the square loss, Peyré et al. (2016)'s decomposition
  ``L(T) = (Cx^2) a 1^T + 1 ((Cy^2) b)^T - 2 Cx T Cy^T`` and ``GW(T) = <L(T), T>``, solved by
  repeatedly transporting for the linearised cost ``L(T)`` (GOT's released solver).
* :func:`got_distance` and :func:`got_loss` - "Graph Optimal Transport for Cross-Domain
  Alignment" (Chen et al., ICML 2020): Wasserstein (node matching) and Gromov-Wasserstein (edge
  matching) distances between two sets of features, with cosine costs and GOT's graph pruning
  computed per example over real tokens only, and their weighted mean (the GOT regulariser;
  :class:`attnlib.ot.GOTRegularizer` is its module form).
* :func:`ot_attention` - attention whose weights are a (row-normalised) OT plan between queries
  and keys (the ``got`` variant).
* :func:`sinkhorn_steps` - the alternating log-domain row / column normalisation all of these
  (and :func:`attnlib.functional.sinkhorn_attention`) iterate.

The public module :mod:`attnlib.ot` re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlib import dispatch
from attnlib._validation import describe, int_at_least, non_negative_number, positive_number
from attnlib.functional._common import acc_dtype, nonzero

__all__ = [
    "NEG",
    "cosine_cost",
    "got_distance",
    "got_loss",
    "gromov_wasserstein",
    "gw_cost",
    "ipot",
    "ot_attention",
    "prune_cost",
    "sinkhorn",
    "sinkhorn_steps",
    "sinkhorn_steps_blocked",
    "transport_blocked",
    "transport_cost",
]

NEG = -1e30  # finite "minus infinity": keeps every log-domain quantity and gradient finite

Solver = Literal["ipot", "sinkhorn"]
PlanGrad = Literal["unroll", "envelope"]


# ------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------


def _as_tensor(x: object, device: torch.device | None = None) -> object:
    """numpy arrays / nested lists become tensors (dtype kept: float64 stays float64); tensors and None pass."""
    if x is None or isinstance(x, Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(x), device=device)
    return x


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return acc_dtype(*(t.dtype for t in tensors if t is not None))


def _broadcastable(*shapes: torch.Size) -> bool:
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return True


def _broadcasts_to(have: torch.Size, want: tuple[int, ...]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(have, want)) == tuple(want)
    except RuntimeError:
        return False


def _check_mask(mask: Tensor | None, shape: tuple[int, ...], name: str, where: str, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{where}: {name} must be a bool tensor of shape {shape} (True = real point), got {describe(mask)}"
        )
    if not _broadcasts_to(mask.shape, shape):
        raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{where}: {name} is on {mask.device} but the cost is on {device}")


def _check_marginal(x: Tensor | None, shape: tuple[int, ...], name: str, where: str, device: torch.device) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{where}: {name} must be a floating tensor of shape {shape} (a marginal), got {describe(x)}")
    if not _broadcasts_to(x.shape, shape):
        raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{where}: {name} is on {x.device} but the cost is on {device}")
    if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: {name} must be finite and non-negative")


def _examples(flags: Tensor) -> str:
    """ " in example(s) [...]": the leading indices (up to 4) where ``flags`` (...) is True ("" for 0-d)."""
    if flags.dim() == 0:
        return ""
    return f" in example(s) {[tuple(int(i) for i in idx) for idx in flags.nonzero()[:4]]}"


def _check_cost(cost: Tensor, where: str) -> None:
    if not isinstance(cost, Tensor) or not cost.is_floating_point() or cost.dim() < 2:
        raise ValueError(f"{where}: cost must be a floating tensor (..., N, M), got {describe(cost)}")
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"{where}: cost is empty, shape {tuple(cost.shape)}; N and M must be > 0")


class _Problem:
    """Validated marginals in log form, masks, and the computation dtype of one OT problem."""

    def __init__(
        self,
        cost: Tensor,
        a: Tensor | None,
        b: Tensor | None,
        a_mask: Tensor | None,
        b_mask: Tensor | None,
        where: str,
    ) -> None:
        cost = _as_tensor(cost)  # type: ignore[assignment]
        _check_cost(cost, where)
        a, b, a_mask, b_mask = (_as_tensor(t, cost.device) for t in (a, b, a_mask, b_mask))  # type: ignore[assignment]
        *lead, n, m = cost.shape
        lead_t = tuple(lead)
        dev = cost.device
        _check_mask(a_mask, (*lead_t, n), "a_mask", where, dev)
        _check_mask(b_mask, (*lead_t, m), "b_mask", where, dev)
        _check_marginal(a, (*lead_t, n), "a", where, dev)
        _check_marginal(b, (*lead_t, m), "b", where, dev)
        self.dtype = _compute_dtype(cost, a, b)
        self.cost = cost.to(self.dtype)
        rmask = torch.ones((*lead_t, n), dtype=torch.bool, device=dev)
        cmask = torch.ones((*lead_t, m), dtype=torch.bool, device=dev)
        if a_mask is not None:
            rmask = rmask & a_mask
        if b_mask is not None:
            cmask = cmask & b_mask
        rmask_in, cmask_in = rmask, cmask
        if a is not None:
            rmask = rmask & (a > 0)
        if b is not None:
            cmask = cmask & (b > 0)
        bad = ~torch.isfinite(cost) & (rmask[..., :, None] & cmask[..., None, :])
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{where}: cost must be finite on the real pairs, got {cost[first].item()} at index {first}; "
                "leave points out of the transport with a_mask / b_mask (or a zero marginal) instead"
            )
        for name, x, real in (("a", a, rmask_in), ("b", b, cmask_in)):
            if x is not None:  # an example with real points but no mass on them
                empty = (torch.where(real, x, torch.zeros_like(x)).sum(-1) <= 0) & real.any(-1)
                if bool(empty.any()):
                    raise ValueError(
                        f"{where}: {name} has zero total mass on its real points{_examples(empty)}; a "
                        f"marginal must carry positive mass (mark an example as padding with {name}_mask=False)"
                    )
        live = rmask.any(-1, keepdim=True) & cmask.any(-1, keepdim=True)  # examples with mass on both sides
        self.rmask = rmask & live
        self.cmask = cmask & live
        self.pair = self.rmask[..., :, None] & self.cmask[..., None, :]
        self.a = self._marginal(a, self.rmask)
        self.b = self._marginal(b, self.cmask)
        if a is not None or b is not None:  # balanced OT: equal total mass in every example
            sa, sb = self.a.sum(-1), self.b.sum(-1)
            half = any(t is not None and t.dtype in (torch.float16, torch.bfloat16) for t in (a, b))
            tol = 1e-2 if half else 1e-5
            if bool(((sa - sb).abs() > tol * torch.maximum(sa, sb)).any()):
                got_a, got_b = sa.detach().flatten()[:4].tolist(), sb.detach().flatten()[:4].tolist()
                raise ValueError(
                    f"{where}: a and b must carry the same total mass in every example (after padding "
                    f"is removed); got sums {got_a} and {got_b}"
                )
        # log marginals, 0 on padded points (never log 0)
        self.log_a = torch.where(self.rmask, torch.log(torch.where(self.rmask, self.a, torch.ones_like(self.a))), 0.0)
        self.log_b = torch.where(self.cmask, torch.log(torch.where(self.cmask, self.b, torch.ones_like(self.b))), 0.0)

    def _marginal(self, x: Tensor | None, mask: Tensor) -> Tensor:
        if x is None:
            cnt = mask.sum(-1, keepdim=True).clamp_min(1).to(self.dtype)
            return mask.to(self.dtype) / cnt
        x = x.to(self.dtype).expand(mask.shape)
        return torch.where(mask, x, torch.zeros_like(x))

    def plan(self, logp: Tensor) -> Tensor:
        """exp of a log-plan, exactly 0 on padded pairs."""
        return torch.exp(logp.masked_fill(~self.pair, NEG))


def transport_cost(cost: Tensor, plan: Tensor) -> Tensor:
    """``<C, P> = sum_ij C_ij P_ij``: cost (..., N, M), plan (..., N, M) -> (...)."""
    cost, plan = _as_tensor(cost), _as_tensor(plan)  # type: ignore[assignment]
    for name, t in (("cost", cost), ("plan", plan)):
        if not isinstance(t, Tensor) or t.dim() < 2:
            raise ValueError(f"transport_cost: {name} must be a tensor (..., N, M), got {describe(t)}")
    if cost.shape[-2:] != plan.shape[-2:] or not _broadcastable(cost.shape[:-2], plan.shape[:-2]):
        raise ValueError(
            "transport_cost: cost and plan must both be (..., N, M) with the same (N, M) and broadcastable "
            f"leading dims, got cost {tuple(cost.shape)} and plan {tuple(plan.shape)}"
        )
    return (cost * plan).sum((-1, -2))


# ------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------


def sinkhorn_steps(
    logk: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    steps: int,
    f: Tensor,
    g: Tensor,
    *,
    rmask: Tensor | None = None,
    cmask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``steps`` alternating log-domain Sinkhorn normalisations of ``exp(logk)``, rows first.

    A row step sets ``f_i = log a_i - LSE_j(logk_ij + g_j)`` (rows of ``exp(logk + f + g)`` sum
    to a), a column step ``g_j = log b_j - LSE_i(logk_ij + f_i)`` (columns sum to b); potentials
    outside ``rmask`` / ``cmask`` stay 0. ``logk`` should be :data:`NEG` on pairs that carry no
    mass, so the sums need no further masking (NEG + finite stays ~NEG).

    Args:
        logk: (..., N, M) log-kernel. log_a: (..., N) or broadcastable; log_b: (..., M) or broadcastable.
        steps: half-steps (2 = one row and one column normalisation).
        f, g: (..., N), (..., M) initial potentials.
        rmask, cmask: (..., N), (..., M) bool, False = a point without mass (potential 0).

    Returns:
        (f, g); the plan is ``exp(logk + f_i + g_j)``.
    """
    return _alternate(
        steps,
        f,
        g,
        lambda g: log_a - torch.logsumexp(logk + g[..., None, :], -1),
        lambda f: log_b - torch.logsumexp(logk + f[..., :, None], -2),
        rmask,
        cmask,
    )


def _alternate(
    steps: int,
    f: Tensor,
    g: Tensor,
    row_step: Callable[[Tensor], Tensor],
    col_step: Callable[[Tensor], Tensor],
    rmask: Tensor | None,
    cmask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``steps`` alternating updates ``f = row_step(g)``, ``g = col_step(f)`` (rows first); potentials
    outside ``rmask`` / ``cmask`` set to 0."""
    for it in range(steps):
        if it % 2 == 0:
            f = row_step(g)
            if rmask is not None:
                f = torch.where(rmask, f, 0.0)
        else:
            g = col_step(f)
            if cmask is not None:
                g = torch.where(cmask, g, 0.0)
    return f, g


LogKernelRows = Callable[[int, int], Tensor]
"""``rows(s, e)`` -> the rows s..e-1 of a log-kernel (..., N, M), recomputed on demand (NEG on pairs without mass)."""


def _blockwise(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``fn(*args)``; under autograd its intermediates are recomputed in the backward pass
    (activation checkpointing), so a block's (rows x M) tensors are never kept for backward."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _blocks(n: int, m: int, lead: int) -> list[tuple[int, int]]:
    step = dispatch.row_block(n, m, lead)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def sinkhorn_steps_blocked(
    rows: LogKernelRows,
    shape: tuple[int, ...],
    log_a: Tensor,
    log_b: Tensor,
    steps: int,
    f: Tensor,
    g: Tensor,
    *,
    rmask: Tensor | None = None,
    cmask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn_steps` on a log-kernel given a block of rows at a time.

    ``rows(s, e)`` returns the log-kernel's rows s..e-1 (..., e-s, M); ``shape`` is the full
    (..., N, M). A row step takes each block's row log-sum-exps; a column step combines the
    blocks' column log-sum-exps by one more log-sum-exp. Memory O(block · M) (under autograd
    too: each block is recomputed in the backward pass); the kernel is recomputed at every step.
    """
    *lead, n, m = shape
    blocks = _blocks(n, m, int(np.prod(lead)) if lead else 1)

    def row_lse(s: int, e: int, g: Tensor) -> Tensor:
        return torch.logsumexp(rows(s, e) + g[..., None, :], -1)

    def col_lse(s: int, e: int, f: Tensor) -> Tensor:
        return torch.logsumexp(rows(s, e) + f[..., s:e, None], -2)

    def row_step(g: Tensor) -> Tensor:
        return log_a - torch.cat([_blockwise(row_lse, s, e, g) for s, e in blocks], -1)

    def col_step(f: Tensor) -> Tensor:
        parts = [_blockwise(col_lse, s, e, f) for s, e in blocks]
        return log_b - (parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, -2), -2))

    return _alternate(steps, f, g, row_step, col_step, rmask, cmask)


def transport_blocked(
    rows: LogKernelRows,
    f: Tensor,
    g: Tensor,
    v: Tensor,
    *,
    normalize_rows: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """``P v`` with the plan ``P = exp(logk + f_i + g_j)`` formed a block of rows at a time.

    ``rows`` as for :func:`sinkhorn_steps_blocked`; f (..., N), g (..., M), v (..., M, Dv).
    ``normalize_rows`` divides each row of P by its sum first (0 rows stay 0); ``dropout_p``
    drops entries of P (training). Returns (..., N, Dv); memory O(block · M).
    """
    n, m = f.shape[-1], g.shape[-1]

    def block(s: int, e: int, f: Tensor, g: Tensor, v: Tensor) -> Tensor:
        p = torch.exp(rows(s, e) + f[..., s:e, None] + g[..., None, :])
        if normalize_rows:
            p = p / nonzero(p.sum(-1, keepdim=True))
        if dropout_p > 0:
            p = F.dropout(p, p=dropout_p)
        return torch.matmul(p, v)

    lead = int(np.prod(f.shape[:-1])) if f.dim() > 1 else 1
    outs = [_blockwise(block, s, e, f, g, v) for s, e in _blocks(n, m, lead)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -2)


def _sinkhorn_log(
    pb: _Problem, logk: Tensor, n_iters: int, tol: float | None, check_every: int
) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn on the log-kernel ``logk`` (..., N, M) (NEG on padded pairs); returns
    potentials (f, g) with plan ``exp(logk + f_i + g_j)``: the columns match b exactly, the rows
    up to convergence (checked every ``check_every`` iterations against ``tol``, if given)."""
    f, g = torch.zeros_like(pb.log_a), torch.zeros_like(pb.log_b)
    done = 0
    while done < n_iters:
        todo = n_iters - done if tol is None else min(check_every, n_iters - done)
        f, g = sinkhorn_steps(logk, pb.log_a, pb.log_b, 2 * todo, f, g, rmask=pb.rmask, cmask=pb.cmask)
        done += todo
        if tol is not None and done % check_every == 0:
            with torch.no_grad():
                rows = pb.plan(logk + f[..., :, None] + g[..., None, :]).sum(-1)
                if float((rows - pb.a).abs().sum(-1).max()) < tol:
                    break
    return f, g


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    n_iters: int = 100,
    tol: float | None = None,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    check_every: int = 10,
) -> Tensor:
    """Entropic optimal transport plan by log-domain Sinkhorn iterations.

    Solves ``min_P <C, P> + eps sum_ij P_ij (log P_ij - 1)`` over plans with row sums a and
    column sums b: ``P_ij = exp((f_i + g_j - C_ij) / eps)``, alternating
    ``f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps)`` and the same for g. Stable for any eps
    (1e-3 included) in float32. Same fixed point as POT's ``ot.sinkhorn(a, b, C, eps,
    method="sinkhorn_log")``; ``transport_cost(C, P)`` is ``ot.sinkhorn2``'s value.

    Args:
        cost: C (..., N, M).
        a: (..., N) source marginal, default uniform over real rows; b: (..., M) likewise.
            a and b should carry the same total mass.
        eps: entropic regularisation (> 0). Small eps needs many iterations.
        n_iters: maximum number of (row, column) iteration pairs.
        tol: stop early when every example's row-marginal L1 error is below tol (checked every
            ``check_every`` iterations; columns are exact after each iteration).
        a_mask, b_mask: (..., N), (..., M) bool, False = padding (zero mass).

    Returns:
        The plan P (..., N, M), differentiable w.r.t. cost, a and b (through the iterations).
    """
    where = "sinkhorn"
    eps = positive_number(eps, f"{where}: eps")
    int_at_least(n_iters, 1, f"{where}: n_iters")
    int_at_least(check_every, 1, f"{where}: check_every")
    if tol is not None:
        positive_number(tol, f"{where}: tol")
    pb = _Problem(cost, a, b, a_mask, b_mask, where)
    logk = (-pb.cost / eps).masked_fill(~pb.pair, NEG)
    f, g = _sinkhorn_log(pb, logk, n_iters, tol, check_every)
    return pb.plan(logk + f[..., :, None] + g[..., None, :])


# ------------------------------------------------------------------------------------------
# IPOT
# ------------------------------------------------------------------------------------------


def _ipot_log(pb: _Problem, cost: Tensor, beta: float, n_iters: int, inner_iters: int) -> Tensor:
    """Log-domain IPOT on (possibly linearised) cost; returns the log-plan (NEG on padded pairs)."""
    pair = pb.pair
    logg = (-cost / beta).masked_fill(~pair, NEG)
    logt = torch.zeros_like(logg).masked_fill(~pair, NEG)  # T = 1 1^T on real pairs
    m_real = pb.cmask.sum(-1, keepdim=True).clamp_min(1).to(pb.dtype)
    log_sigma = torch.where(pb.cmask, -torch.log(m_real), 0.0)  # sigma = 1/m
    log_delta = torch.zeros_like(pb.log_a)
    for _ in range(n_iters):
        logq = logg + logt  # Q = G * T
        log_delta, log_sigma = sinkhorn_steps(
            logq, pb.log_a, pb.log_b, 2 * inner_iters, log_delta, log_sigma, rmask=pb.rmask, cmask=pb.cmask
        )
        logt = (log_delta[..., :, None] + logq + log_sigma[..., None, :]).masked_fill(~pair, NEG)
    return logt


def _ipot_exp(pb: _Problem, cost: Tensor, beta: float, n_iters: int) -> Tensor | None:
    """IPOT (one Sinkhorn step per proximal step) as GOT's code writes it, in the exp domain:
    ``Q = G * T``, ``delta = a / (Q sigma)``, ``sigma = b / (Q^T delta)``, ``T = diag(delta) Q
    diag(sigma)``, with ``G = exp(-(C - min_j C_ij) / beta)`` (a per-row shift, which the row
    scaling delta absorbs, so every row of G keeps an entry 1). Used while no entry of G falls
    below sqrt(tiny), i.e. ``max (C_ij - min_j C_ij) / beta <= -log(tiny) / 2`` (43 in float32;
    cosine costs with beta >= 0.05), so no row or column of Q can lose its mass to underflow.

    A step is three elementwise products, one matrix-vector product and one column sum, with no
    log-sum-exp: several times faster, forward and backward. Returns the plan (differentiable when grad is
    enabled), or None when it is not finite or a real row or column lost all its mass to
    underflow (the caller then runs the log domain, :func:`_ipot_log`)."""
    pair = pb.pair
    tiny = torch.finfo(pb.dtype).tiny
    shift = cost.detach().masked_fill(~pair, float("inf")).amin(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    spread = (cost.detach() - shift).masked_fill(~pair, 0.0).amax() / beta
    if not bool(spread <= -math.log(tiny) / 2):  # G would come near underflow: a column could vanish
        return None
    g = torch.exp((shift - cost) / beta).masked_fill(~pair, 0.0)
    a, b = pb.a[..., :, None], pb.b
    sigma = torch.where(pb.cmask, 1.0 / pb.cmask.sum(-1, keepdim=True).clamp_min(1).to(pb.dtype), 0.0)
    plan = pair.to(pb.dtype)
    inplace = not (torch.is_grad_enabled() and g.requires_grad)  # no graph: one (N, M) buffer
    for _ in range(n_iters):
        q = plan.mul_(g) if inplace else g * plan
        delta = a / (q @ sigma[..., :, None]).clamp_min(tiny)
        qd = q.mul_(delta) if inplace else q * delta  # delta_i Q_ij
        sigma = b / qd.sum(-2).clamp_min(tiny)
        plan = qd.mul_(sigma[..., None, :]) if inplace else qd * sigma[..., None, :]
    with torch.no_grad():
        ok = torch.isfinite(plan).all()
        ok &= ((plan.sum(-1) > 0) | ~pb.rmask).all() & ((plan.sum(-2) > 0) | ~pb.cmask).all()
    return plan if bool(ok) else None


def ipot(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    beta: float = 0.5,
    n_iters: int = 50,
    inner_iters: int = 1,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
) -> Tensor:
    """Exact-OT plan by the inexact proximal point method (IPOT; Xie et al. 2019), GOT's solver.

    Each outer step solves ``T <- argmin <C, T> + beta KL(T || T_prev)`` approximately with
    ``inner_iters`` Sinkhorn steps on the kernel ``exp(-C / beta) * T_prev`` (``T_0 = 1 1^T``,
    ``sigma_0 = 1/M``, as in the GOT code), in the log domain so no ``exp(-C/beta)`` underflows.
    As ``n_iters`` grows the plan converges to an exact OT plan (``<C, T>`` -> ``ot.emd2``).

    Args:
        cost: C (..., N, M); a (..., N), b (..., M): marginals (default uniform over real points).
        beta: proximal step (GOT: 0.5 for WD, 0.1 inside GW).
        n_iters: outer iterations (GOT: 20-50). inner_iters: Sinkhorn steps per outer step (GOT: 1).
        a_mask, b_mask: bool padding masks (False = padding, zero mass).

    Returns:
        The plan T (..., N, M) (column sums equal b exactly; rows up to convergence),
        differentiable through the iterations.
    """
    where = "ipot"
    beta = positive_number(beta, f"{where}: beta")
    int_at_least(n_iters, 1, f"{where}: n_iters")
    int_at_least(inner_iters, 1, f"{where}: inner_iters")
    pb = _Problem(cost, a, b, a_mask, b_mask, where)
    return pb.plan(_ipot_log(pb, pb.cost, beta, n_iters, inner_iters))


# ------------------------------------------------------------------------------------------
# Gromov-Wasserstein
# ------------------------------------------------------------------------------------------


def _check_square(c: Tensor, name: str, where: str) -> None:
    if not isinstance(c, Tensor) or not c.is_floating_point() or c.dim() < 2 or c.shape[-1] != c.shape[-2]:
        raise ValueError(
            f"{where}: {name} must be a floating tensor (..., n, n) of intra-domain costs, got {describe(c)}"
        )


def _gw_linear_cost(cx: Tensor, cy: Tensor, plan: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Peyré's square-loss tensor ``L(T) = (Cx^2) a 1^T + 1 ((Cy^2) b)^T - 2 Cx T Cy^T`` (..., N, M)."""
    const_x = cx.square() @ a[..., :, None]  # (..., N, 1)
    const_y = (cy.square() @ b[..., :, None]).transpose(-1, -2)  # (..., 1, M)
    return const_x + const_y - 2.0 * (cx @ plan @ cy.transpose(-1, -2))


def gw_cost(cx: Tensor, cy: Tensor, plan: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
    """Gromov-Wasserstein (square loss) value of a fixed plan: ``<L(T), T>``.

    Equals ``sum_ijkl (Cx_ik - Cy_jl)^2 T_ij T_kl`` when a, b are the plan's marginals (their
    default), and POT's ``ot.gromov.gwloss(*ot.gromov.init_matrix(Cx, Cy, a, b), T)`` for given
    a, b. Shapes: cx (..., N, N), cy (..., M, M), plan (..., N, M) -> (...).
    """
    where = "gw_cost"
    cx, cy, plan, a, b = (_as_tensor(t) for t in (cx, cy, plan, a, b))  # type: ignore[assignment]
    _check_square(cx, "cx", where)
    _check_square(cy, "cy", where)
    if not isinstance(plan, Tensor) or plan.shape[-2:] != (cx.shape[-1], cy.shape[-1]):
        raise ValueError(f"{where}: plan must be (..., {cx.shape[-1]}, {cy.shape[-1]}), got {describe(plan)}")
    a = plan.sum(-1) if a is None else a
    b = plan.sum(-2) if b is None else b
    return transport_cost(_gw_linear_cost(cx, cy, plan, a.to(plan.dtype), b.to(plan.dtype)), plan)


def _solve(pb: _Problem, cost: Tensor, solver: str, beta: float, eps: float, n_iters: int) -> Tensor:
    """Plan for ``cost`` under pb's marginals/masks with the named solver."""
    if solver == "ipot":
        plan = _ipot_exp(pb, cost, beta, n_iters)
        return plan if plan is not None else pb.plan(_ipot_log(pb, cost, beta, n_iters, 1))
    logk = (-cost / eps).masked_fill(~pb.pair, NEG)
    f, g = _sinkhorn_log(pb, logk, n_iters, None, 1)
    return pb.plan(logk + f[..., :, None] + g[..., None, :])


def _check_solver(solver: str, plan_grad: str, where: str) -> None:
    if solver not in ("ipot", "sinkhorn"):
        raise ValueError(f"{where}: solver must be 'ipot' or 'sinkhorn', got {solver!r}")
    if plan_grad not in ("unroll", "envelope"):
        raise ValueError(f"{where}: plan_grad must be 'unroll' or 'envelope', got {plan_grad!r}")


def _zero_pad(c: Tensor, rmask: Tensor, cmask: Tensor) -> Tensor:
    return c.masked_fill(~(rmask[..., :, None] & cmask[..., None, :]), 0.0)


def gromov_wasserstein(
    cx: Tensor,
    cy: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    solver: Solver = "ipot",
    outer_iters: int = 5,
    inner_iters: int = 20,
    beta: float = 0.1,
    eps: float = 0.05,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    plan_grad: PlanGrad = "unroll",
) -> tuple[Tensor, Tensor]:
    """Gromov-Wasserstein alignment of two metric-measure spaces (square loss), GOT's solver.

    ``T <- a b^T``; ``outer_iters`` times: ``T <- solver(L(T))`` with Peyré's decomposition
    ``L(T) = (Cx^2) a 1^T + 1 ((Cy^2) b)^T - 2 Cx T Cy^T``; value ``<L(T), T>``. GW is
    non-convex: this finds a local optimum (compare with POT's solvers loosely).

    Args:
        cx: (..., N, N), cy: (..., M, M) intra-domain costs (e.g. cosine distances).
        a, b: marginals (default uniform over real points); a_mask, b_mask: padding masks.
        solver: "ipot" (proximal step ``beta``; GOT uses 0.1) or "sinkhorn" (entropy ``eps``).
        outer_iters, inner_iters: linearisations and solver iterations per linearisation (5, 20).
        plan_grad: "unroll" differentiates through the iterations; "envelope" solves without
            gradient and differentiates ``<L(T), T>`` at the fixed plan (GOT's released code).

    Returns:
        (plan (..., N, M), value (...)).
    """
    where = "gromov_wasserstein"
    cx, cy = _as_tensor(cx), _as_tensor(cy)  # type: ignore[assignment]
    _check_square(cx, "cx", where)
    _check_square(cy, "cy", where)
    _check_solver(solver, plan_grad, where)
    beta = positive_number(beta, f"{where}: beta")
    eps = positive_number(eps, f"{where}: eps")
    int_at_least(outer_iters, 1, f"{where}: outer_iters")
    int_at_least(inner_iters, 1, f"{where}: inner_iters")
    n, m = cx.shape[-1], cy.shape[-1]
    if not _broadcastable(cx.shape[:-2], cy.shape[:-2]):
        raise ValueError(
            f"{where}: cx (..., N, N) and cy (..., M, M) must have broadcastable leading (batch) dims, "
            f"got cx {tuple(cx.shape)} and cy {tuple(cy.shape)}"
        )
    lead = torch.broadcast_shapes(cx.shape[:-2], cy.shape[:-2])
    dummy = cx.new_zeros((*lead, n, m)).to(_compute_dtype(cx, cy))
    pb = _Problem(dummy, a, b, a_mask, b_mask, where)
    cx_ = _zero_pad(cx.to(pb.dtype).expand(*lead, n, n), pb.rmask, pb.rmask)
    cy_ = _zero_pad(cy.to(pb.dtype).expand(*lead, m, m), pb.cmask, pb.cmask)
    with torch.set_grad_enabled(torch.is_grad_enabled() and plan_grad == "unroll"):
        plan = pb.a[..., :, None] * pb.b[..., None, :]
        for _ in range(outer_iters):
            lin = _gw_linear_cost(cx_, cy_, plan, pb.a, pb.b)
            plan = _solve(pb, lin, solver, beta, eps, inner_iters)
    value = transport_cost(_gw_linear_cost(cx_, cy_, plan, pb.a, pb.b), plan)
    return plan, value


# ------------------------------------------------------------------------------------------
# GOT
# ------------------------------------------------------------------------------------------


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine distance ``C_ij = 1 - cos(x_i, y_j)``: x (..., N, D), y (..., M, D) -> (..., N, M) in [0, 2]."""
    x, y = _as_tensor(x), _as_tensor(y)  # type: ignore[assignment]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"cosine_cost expects x (..., N, D) and y (..., M, D), got {describe(x)} and {describe(y)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"cosine_cost: feature dims differ, x has D={x.shape[-1]} and y has D={y.shape[-1]}")
    ct = _compute_dtype(x, y)
    xn = F.normalize(x.to(ct), dim=-1, eps=eps)
    yn = F.normalize(y.to(ct), dim=-1, eps=eps)
    return 1.0 - xn @ yn.transpose(-1, -2)


def prune_cost(cost: Tensor, frac: float, row_mask: Tensor | None = None, col_mask: Tensor | None = None) -> Tensor:
    """GOT's graph pruning: ``relu(C - (min C + frac (max C - min C)))`` per example.

    Pairs in the lowest ``frac`` of the [min, max] range get cost 0 (an edge of the graph), all
    others are shifted down by the threshold. Unlike the released GOT code (min/max over the whole
    batch tensor, padding included), min and max are taken per example (leading index) over real
    pairs only (``row_mask`` (..., N), ``col_mask`` (..., M)); padded pairs come back as 0.
    ``frac = 0`` still shifts by the minimum.
    """
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
        raise ValueError(f"prune_cost: frac must be in [0, 1], got {frac!r}")
    pair = None
    if row_mask is not None or col_mask is not None:
        rm = row_mask if row_mask is not None else torch.ones(cost.shape[:-1], dtype=torch.bool, device=cost.device)
        cm = (
            col_mask
            if col_mask is not None
            else torch.ones((*cost.shape[:-2], cost.shape[-1]), dtype=torch.bool, device=cost.device)
        )
        pair = rm[..., :, None] & cm[..., None, :]
    big = torch.finfo(cost.dtype).max
    lo = (cost if pair is None else cost.masked_fill(~pair, big)).amin((-1, -2), keepdim=True)
    hi = (cost if pair is None else cost.masked_fill(~pair, -big)).amax((-1, -2), keepdim=True)
    if pair is not None:  # an example without real pairs: keep lo/hi finite
        lo = torch.where(pair.any((-1, -2), keepdim=True), lo, torch.zeros_like(lo))
        hi = torch.where(pair.any((-1, -2), keepdim=True), hi, torch.zeros_like(hi))
    out = F.relu(cost - (lo + frac * (hi - lo)))
    return out if pair is None else out.masked_fill(~pair, 0.0)


def got_distance(
    x: Tensor,
    y: Tensor,
    *,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    wd_weight: float = 1.0,
    gwd_weight: float = 1.0,
    prune: float | None = 0.1,
    prune_cross: float | None = None,
    shared_plan: bool = False,
    solver: Solver = "ipot",
    beta: float = 0.5,
    n_iters: int = 50,
    gw_beta: float = 0.1,
    gw_outer_iters: int = 5,
    gw_inner_iters: int = 20,
    eps: float = 0.05,
    plan_grad: PlanGrad = "unroll",
    return_plans: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Graph Optimal Transport distances between two sets of features (Chen et al., ICML 2020).

    Costs are cosine distances: ``C_xy`` across the sets, ``C_x``, ``C_y`` within each; all are
    pruned GOT-style (:func:`prune_cost`) per example over real tokens only. Then

    * WD = ``<C_xy, T_w>`` with ``T_w`` the OT plan for ``C_xy`` (IPOT, ``beta``, ``n_iters``);
    * GWD = ``<L(T_g), T_g>`` with ``T_g`` the Gromov-Wasserstein plan for ``C_x``, ``C_y``
      (``gw_beta``, ``gw_outer_iters`` x ``gw_inner_iters``; :func:`gromov_wasserstein`).

    With ``shared_plan=True`` one plan serves both (the paper's GOT distance): the fused cost
    ``lam C_xy + (1 - lam) L(T)`` with ``lam = wd_weight / (wd_weight + gwd_weight)`` is
    re-linearised ``gw_outer_iters`` times.

    Args:
        x: (..., N, D), y: (..., M, D) (D may differ between x and y only without the WD term's
            cross cost, so it must be equal here).
        x_mask, y_mask: (..., N), (..., M) bool, True = real token; padding gets zero mass.
        wd_weight, gwd_weight: the weights of the GOT distance ``wd_weight·WD + gwd_weight·GWD``;
            they set ``lam`` of the shared plan and are applied by :func:`got_loss` (the
            returned distances are unweighted).
        prune: pruning fraction of the intra-domain costs (GOT: 0.1); None = no pruning.
        prune_cross: pruning fraction of ``C_xy`` (default ``prune``; GOT's MT code uses 0.2).
        solver: "ipot" (GOT) or "sinkhorn" (with ``eps``).
        plan_grad: "unroll" (default; gradients through the iterations - they match finite
            differences of the returned values) or "envelope" (plans without gradient, as the
            released GOT code: less memory, gradients only through the costs).
        return_plans: also return the plans (T_w, T_g) (the same tensor twice when shared).

    Returns:
        (wd, gwd), each (...), or (wd, gwd, T_w, T_g). Examples with no real token on a side
        give 0.
    """
    where = "got_distance"
    x, y, x_mask, y_mask = (_as_tensor(t) for t in (x, y, x_mask, y_mask))  # type: ignore[assignment]
    _check_solver(solver, plan_grad, where)
    non_negative_number(wd_weight, f"{where}: wd_weight")
    non_negative_number(gwd_weight, f"{where}: gwd_weight")
    if shared_plan and wd_weight + gwd_weight <= 0:
        raise ValueError(f"{where}: shared_plan needs wd_weight + gwd_weight > 0")
    beta = positive_number(beta, f"{where}: beta")
    gw_beta = positive_number(gw_beta, f"{where}: gw_beta")
    eps = positive_number(eps, f"{where}: eps")
    int_at_least(n_iters, 1, f"{where}: n_iters")
    int_at_least(gw_outer_iters, 1, f"{where}: gw_outer_iters")
    int_at_least(gw_inner_iters, 1, f"{where}: gw_inner_iters")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"{where}: expects x (..., N, D) and y (..., M, D), got {describe(x)} and {describe(y)}")
    if x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"{where}: batch dims differ: x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise ValueError(f"{where}: empty set: x {tuple(x.shape)}, y {tuple(y.shape)}")
    cross = cosine_cost(x, y)
    dummy_pb = _Problem(cross, None, None, x_mask, y_mask, where)
    rm, cm = dummy_pb.rmask, dummy_pb.cmask
    cx, cy = cosine_cost(x, x), cosine_cost(y, y)
    pc = prune if prune_cross is None else prune_cross
    if pc is not None:
        cross = prune_cost(cross, pc, rm, cm)
    if prune is not None:
        cx = prune_cost(cx, prune, rm, rm)
        cy = prune_cost(cy, prune, cm, cm)
    cross, cx, cy = _zero_pad(cross, rm, cm), _zero_pad(cx, rm, rm), _zero_pad(cy, cm, cm)
    pb = _Problem(cross, None, None, rm, cm, where)
    grad = torch.is_grad_enabled() and plan_grad == "unroll"
    if shared_plan:
        lam = wd_weight / (wd_weight + gwd_weight)
        with torch.set_grad_enabled(grad):
            plan = pb.a[..., :, None] * pb.b[..., None, :]
            for _ in range(gw_outer_iters):
                fused = lam * cross + (1.0 - lam) * _gw_linear_cost(cx, cy, plan, pb.a, pb.b)
                plan = _solve(pb, fused, solver, gw_beta, eps, gw_inner_iters)
        wd = transport_cost(cross, plan)
        gwd = transport_cost(_gw_linear_cost(cx, cy, plan, pb.a, pb.b), plan)
        plans = (plan, plan)
    else:
        with torch.set_grad_enabled(grad):
            t_w = _solve(pb, cross, solver, beta, eps, n_iters)
        wd = transport_cost(cross, t_w)
        t_g, gwd = gromov_wasserstein(
            cx,
            cy,
            solver=solver,
            outer_iters=gw_outer_iters,
            inner_iters=gw_inner_iters,
            beta=gw_beta,
            eps=eps,
            a_mask=rm,
            b_mask=cm,
            plan_grad=plan_grad,
        )
        plans = (t_w, t_g)
    if return_plans:
        return wd, gwd, plans[0], plans[1]
    return wd, gwd


def got_loss(
    x: Tensor,
    y: Tensor,
    *,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    wd_weight: float = 0.1,
    gwd_weight: float = 0.1,
    return_plans: bool = False,
    **got_kwargs: object,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The GOT regulariser: ``mean(wd_weight·WD + gwd_weight·GWD)`` between two sets of features.

    The mean runs over the examples (leading indices) with real tokens on both sides; 0 if there
    are none. x (..., N, D), y (..., M, D), x_mask (..., N), y_mask (..., M) (True = real token);
    any other keyword goes to :func:`got_distance` (prune, shared_plan, solver, beta, n_iters,
    plan_grad, ...). Chen et al. 2020 weigh both terms 0.1 in VQA.

    Returns:
        The scalar loss, or ``(loss, T_w, T_g)`` with the plans of :func:`got_distance`.
    """
    x, y, x_mask, y_mask = (_as_tensor(t) for t in (x, y, x_mask, y_mask))  # type: ignore[assignment]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"got_loss: expects x (..., N, D) and y (..., M, D), got {describe(x)} and {describe(y)}")
    lead = x.shape[:-2]
    count = int(np.prod(lead)) if lead else 1
    # examples are independent: long sequences are solved a few examples at a time (peak memory)
    step = max(1, dispatch.ROW_BLOCK_ELEMENTS // max(1, x.shape[-2] * y.shape[-2]))
    if step >= count or x.shape[:-2] != y.shape[:-2]:
        parts = [(x, y, x_mask, y_mask)]
    else:
        flat = [None if t is None else t.reshape(count, *t.shape[len(lead) :]) for t in (x, y, x_mask, y_mask)]
        parts = [tuple(None if t is None else t[s : s + step] for t in flat) for s in range(0, count, step)]

    def part(px: Tensor, py: Tensor, pxm: Tensor | None, pym: Tensor | None) -> tuple[Tensor, ...]:
        return got_distance(  # type: ignore[return-value]
            px,
            py,
            x_mask=pxm,
            y_mask=pym,
            wd_weight=wd_weight,
            gwd_weight=gwd_weight,
            return_plans=return_plans,
            **got_kwargs,  # type: ignore[arg-type]
        )

    # several groups without plans to return: each group's graph is recomputed in the backward
    # pass, so only one group's (N x M) matrices are held at a time
    run = _blockwise if len(parts) > 1 and not return_plans else (lambda fn, *args: fn(*args))
    res = [run(part, *p) for p in parts]
    if len(res) == 1:
        outs = res[0]
    else:
        outs = tuple(torch.cat([r[i] for r in res]) for i in range(len(res[0])))
        outs = tuple(o.reshape(*lead, *o.shape[1:]) for o in outs)
    wd, gwd = outs[0], outs[1]
    per = wd_weight * wd + gwd_weight * gwd
    live = torch.ones(per.shape, dtype=torch.bool, device=per.device)  # examples with real tokens on both sides
    for mk in (x_mask, y_mask):
        if mk is not None:
            live = live & mk.any(-1)
    live = live.to(per.dtype)
    loss = (per * live).sum() / live.sum().clamp_min(1.0)
    if return_plans:
        return loss, outs[2], outs[3]
    return loss


# ------------------------------------------------------------------------------------------
# OT attention
# ------------------------------------------------------------------------------------------


def ot_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    cost: Literal["cosine", "dot"] = "cosine",
    solver: Solver = "ipot",
    beta: float = 0.5,
    eps: float = 0.05,
    n_iters: int = 20,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention whose alignment is the OT plan between queries and keys (GOT's alignment as attention).

    ``T`` = plan between the uniform measures on the real queries and keys for the cost
    ``1 - cos(q_i, k_j)`` (``cost="cosine"``, GOT) or ``-q_i·k_j·scale`` (``"dot"``); the
    weights are T with rows rescaled to sum to 1 (``N·T`` at convergence) and ``out = W v``.

    Args:
        q: (B, H, N, D); k: (B, H, M, D); v: (B, H, M, Dv).
        key_mask: (B, M) bool, False = padded key; query_mask: (B, N) bool, False = padded query
            (zero row, no mass).
        solver: "ipot" (``beta``, converges to exact OT: a sparse, self-normalised alignment) or
            "sinkhorn" (``eps``).
        n_iters: solver iterations (differentiated through).

    IPOT runs in a form carried by one column potential (``_ipot_attention_columns``: a
    softmax per step, equal to the log-domain iterations); above
    :func:`attnlib.dispatch.ot_whole_matrix`'s size (and without ``return_weights``) it never holds
    an N x M matrix (memory O(N · block), the scores recomputed at every step). Sinkhorn runs over
    blocks of query rows there too (:func:`sinkhorn_steps_blocked`).

    Returns:
        out (B, H, N, Dv) in q's dtype (computed in >= float32), or (out, weights (B, H, N, M)).
    """
    where = "ot_attention"
    if cost not in ("cosine", "dot"):
        raise ValueError(f"{where}: cost must be 'cosine' or 'dot', got {cost!r}")
    _check_solver(solver, "unroll", where)
    b, h, n, d = q.shape
    m = k.shape[2]
    if k.shape[:2] != (b, h) or v.shape[:3] != (b, h, m) or k.shape[-1] != d:
        raise ValueError(
            f"{where}: expects q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    ct = _compute_dtype(q)
    beta = positive_number(beta, f"{where}: beta")
    eps = positive_number(eps, f"{where}: eps")
    n_iters = int_at_least(n_iters, 1, f"{where}: n_iters")
    whole = return_weights or dispatch.ot_whole_matrix(b * h * n * m)
    if solver == "ipot" or not whole:
        return _ot_attention_blocked(
            q, k, v, key_mask, query_mask, cost, solver, beta, eps, n_iters, scale, whole, return_weights
        )
    if cost == "cosine":
        c = cosine_cost(q.to(ct), k.to(ct))
    else:
        c = -(q.to(ct) @ k.to(ct).transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    a_mask = None if query_mask is None else query_mask[:, None, :].expand(b, h, n)
    b_mask = None if key_mask is None else key_mask[:, None, :].expand(b, h, m)
    pb = _Problem(c, None, None, a_mask, b_mask, where)
    plan = _solve(pb, pb.cost, solver, beta, eps, n_iters)
    weights = plan / nonzero(plan.sum(-1, keepdim=True))  # plans are >= 0
    out = (weights @ v.to(ct)).to(q.dtype)
    if return_weights:
        return out, weights.to(q.dtype)
    return out


def _ot_attention_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    query_mask: Tensor | None,
    cost: str,
    solver: str,
    beta: float,
    eps: float,
    n_iters: int,
    scale: float | None,
    whole: bool = False,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`ot_attention` from potentials: IPOT (:func:`_ipot_attention_columns`, on the whole
    matrix if ``whole``) or Sinkhorn a block of query rows at a time (same validation)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    ct = _compute_dtype(q)
    dev = q.device
    if cost == "cosine":
        qx, kx, shift, mult = F.normalize(q.to(ct), dim=-1), F.normalize(k.to(ct), dim=-1), 1.0, -1.0
    else:
        qx, kx, shift, mult = q.to(ct), k.to(ct), 0.0, -(d**-0.5 if scale is None else scale)
    for name, mk, size in (("query_mask", query_mask, n), ("key_mask", key_mask, m)):
        _check_mask(None if mk is None else mk[:, None, :].expand(b, h, size), (b, h, size), name, "ot_attention", dev)
    rmask = torch.ones(b, h, n, dtype=torch.bool, device=dev)
    cmask = torch.ones(b, h, m, dtype=torch.bool, device=dev)
    if query_mask is not None:
        rmask = rmask & query_mask[:, None, :]
    if key_mask is not None:
        cmask = cmask & key_mask[:, None, :]
    live = rmask.any(-1, keepdim=True) & cmask.any(-1, keepdim=True)
    rmask, cmask = rmask & live, cmask & live
    log_a = torch.where(rmask, -torch.log(rmask.sum(-1, keepdim=True).clamp_min(1).to(ct)), 0.0)
    log_b = torch.where(cmask, -torch.log(cmask.sum(-1, keepdim=True).clamp_min(1).to(ct)), 0.0)
    if solver == "ipot":
        res = _ipot_attention_columns(
            qx, kx, v.to(ct), -mult / beta, rmask, cmask, log_a, log_b, n_iters, whole, return_weights
        )
        return (res[0].to(q.dtype), res[1].to(q.dtype)) if return_weights else res[0].to(q.dtype)

    def neg_cost(s: int, e: int) -> Tensor:  # -C / step on the block's pairs, NEG elsewhere
        c = shift + mult * torch.matmul(qx[..., s:e, :], kx.transpose(-1, -2))
        pair = rmask[..., s:e, None] & cmask[..., None, :]
        return (-c / eps).masked_fill(~pair, NEG)

    zf, zg = torch.zeros_like(log_a), torch.zeros_like(log_b)
    shape = (b, h, n, m)
    f, g = sinkhorn_steps_blocked(neg_cost, shape, log_a, log_b, 2 * n_iters, zf, zg, rmask=rmask, cmask=cmask)
    return transport_blocked(neg_cost, f, g, v.to(ct), normalize_rows=True).to(q.dtype)


def _ipot_attention_columns(
    qx: Tensor,
    kx: Tensor,
    v: Tensor,
    gain: float,
    rmask: Tensor,
    cmask: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    n_iters: int,
    whole: bool = False,
    return_weights: bool = False,
) -> tuple[Tensor, ...]:
    """IPOT attention (one Sinkhorn step per proximal step) carried by one column potential.

    With ``-C_ij / beta = gain · qx_i·kx_j + const`` (the constant cancels), IPOT's plan after t
    steps is ``T_t = exp(t · gain · qx_i·kx_j + D_i + S_j)``, where D and S are the running sums
    of its Sinkhorn potentials; the row step and the column step of step t reduce to

    * ``P = softmax_j(t · gain · qx_i·kx_j + u_j)`` with ``u = S_{t-1} + log sigma_{t-1}``
      (the row step: ``D_t = log a - LSE_j(...)``, so ``exp(... + D_t) = a_i P_ij``);
    * ``S_t = log b - log(a^T P) + u`` (the column step), ``log sigma_t = S_t - S_{t-1}``;

    and the row-normalised plan (the attention weights) is ``softmax_j(n · gain · qx·kx + S_n)``,
    so D is never needed: a step is a matmul (or, on the whole matrix, a scaled add of the
    scores), a softmax and a vector-matrix product, versus two log-sum-exp passes of the
    log-domain form. Should a real column's mass ``a^T P`` underflow (far apart costs), that
    step's column sums are recomputed by log-sum-exp of ``log a_i + log_softmax``.

    ``whole`` keeps the (B·H, N, M) scores and differentiates through every step; otherwise the
    logits are recomputed in blocks of heads x rows (:func:`attnlib.dispatch.ot_blocks`),
    checkpointed under autograd (memory O(block · M)).

    qx (B, H, N, D), kx (B, H, M, D), v (B, H, M, Dv); rmask / cmask (B, H, N) / (B, H, M) real
    rows / columns; log_a, log_b their log masses (uniform). Returns (out (B, H, N, Dv),) or, with
    ``return_weights`` (needs ``whole``), (out, weights (B, H, N, M)); both 0 on padded rows.
    """
    b, h, n, d = qx.shape
    m, bh = kx.shape[2], b * h
    q3, k3, v3 = qx.reshape(bh, n, d), kx.reshape(bh, m, d), v.reshape(bh, m, v.shape[-1])
    cm = cmask.reshape(bh, m)
    rows_a = torch.where(rmask, log_a.exp(), 0.0).reshape(bh, 1, n)  # a_i, 0 on padded rows
    log_rows_a = torch.where(rmask, log_a, NEG).reshape(bh, n, 1)
    log_b = log_b.reshape(bh, m)
    floor = torch.finfo(qx.dtype).tiny / torch.finfo(qx.dtype).eps  # column masses above keep full precision
    if whole:
        heads, rows = [(0, bh)], [(0, n)]
        scores = torch.bmm(q3, k3.transpose(1, 2))

        def prepare(alpha: float, pot: Tensor) -> tuple[Any, Tensor]:
            return alpha, pot

        def logits(i: int, j: int, s: int, e: int, alpha: Any, pot: Tensor) -> Tensor:
            return torch.add(pot[i:j, None, :], scores[i:j, s:e], alpha=alpha)

        def run(fn: Callable[..., Tensor], *args: Any) -> Tensor:
            return fn(*args)
    else:
        ones = q3.new_ones(bh, n, 1)
        hb, rb = dispatch.ot_blocks(bh, n, m)
        heads = [(i, min(bh, i + hb)) for i in range(0, bh, hb)]
        rows = [(s, min(n, s + rb)) for s in range(0, n, rb)]

        def prepare(alpha: float, pot: Tensor) -> tuple[Any, Tensor]:  # [alpha qx, 1] . [kx, pot]
            return torch.cat([alpha * q3, ones], -1), torch.cat([k3, pot[..., None]], -1).transpose(1, 2)

        def logits(i: int, j: int, s: int, e: int, qa: Any, ka: Tensor) -> Tensor:
            return torch.bmm(qa[i:j, s:e], ka[i:j])

        run = _blockwise

    def col_mass(i: int, j: int, s: int, e: int, x: Any, y: Tensor) -> Tensor:
        return torch.bmm(rows_a[i:j, :, s:e], torch.softmax(logits(i, j, s, e, x, y), -1))[:, 0]

    def log_col_mass(i: int, j: int, s: int, e: int, x: Any, y: Tensor) -> Tensor:
        return torch.logsumexp(log_rows_a[i:j, s:e] + torch.log_softmax(logits(i, j, s, e, x, y), -1), 1)

    def out_rows(i: int, j: int, s: int, e: int, x: Any, y: Tensor) -> Tensor:
        return torch.bmm(torch.softmax(logits(i, j, s, e, x, y), -1), v3[i:j])

    def columns(fn: Callable[..., Tensor], x: Any, y: Tensor) -> list[list[Tensor]]:
        return [[run(fn, i, j, s, e, x, y) for s, e in rows] for i, j in heads]

    # without autograd, blocks write into buffers allocated once: nothing small outlives a block
    # among the blocks' temporaries, which the allocator would otherwise keep (growing with N^2)
    buffered = not torch.is_grad_enabled() or not any(t.requires_grad for t in (qx, kx, v))

    def col_sums(x: Any, y: Tensor) -> Tensor:
        if buffered:
            col = q3.new_zeros(bh, m)
            for i, j in heads:
                for s, e in rows:
                    col[i:j] += col_mass(i, j, s, e, x, y)
            return col
        total = []
        for i, j in heads:  # a running sum: few small tensors live at once
            acc = run(col_mass, i, j, *rows[0], x, y)
            for s, e in rows[1:]:
                acc = acc + run(col_mass, i, j, s, e, x, y)
            total.append(acc)
        return torch.cat(total)

    s_prev = torch.where(cm, torch.zeros_like(log_b), NEG)  # S_0 (T_0 = 1 1^T); log_b's dtype
    u = torch.where(cm, log_b, NEG)  # S_0 + log sigma_0, sigma_0 = 1 / M = b
    for t in range(1, n_iters + 1):
        x, y = prepare(t * gain, u)
        col = col_sums(x, y)
        with torch.no_grad():
            ok = bool(((col > floor) & torch.isfinite(col) | ~cm).all())
        if ok:
            log_col = torch.log(torch.where(cm, col, 1.0))
        else:  # a real column's mass underflowed: this step's column sums by log-sum-exp
            log_col = torch.cat([torch.logsumexp(torch.stack(p), 0) for p in columns(log_col_mass, x, y)])
        s_t = torch.where(cm, log_b - log_col + u, NEG)
        u, s_prev = torch.where(cm, 2.0 * s_t - s_prev, NEG), s_t
    keep = rmask.reshape(bh, n, 1).to(v3.dtype)
    x, y = prepare(n_iters * gain, s_prev)
    if return_weights:
        w = torch.softmax(logits(0, bh, 0, n, x, y), -1) * keep
        return (w @ v3).reshape(b, h, n, -1), w.reshape(b, h, n, m)
    if buffered:
        out = v3.new_empty(bh, n, v3.shape[-1])
        for i, j in heads:
            for s, e in rows:
                out[i:j, s:e] = out_rows(i, j, s, e, x, y)
    else:
        out = torch.cat([torch.cat(parts, 1) for parts in columns(out_rows, x, y)])
    return ((out * keep).reshape(b, h, n, -1),)
