"""Monotonic attention: hard monotonic, MoChA, infinite lookback, monotonic multihead (MMA).

A monotonic head reads the keys (encoder frames) left to right. For query (decoder step) i it
scans forward from where step i - 1 stopped and stops at key j with the *selection
probability* ``p_ij = sigmoid(e_ij)`` (Raffel et al. 2017, "Online and Linear-Time Attention
by Enforcing Monotonic Alignments"). Training uses the expected alignment

    alpha_ij = p_ij · sum_{k <= j} alpha_{i-1,k} · prod_{l=k}^{j-1} (1 - p_il),

alpha_{-1} = one-hot at the first key (:func:`expected_alignment`); inference takes the hard
decisions (:func:`hard_alignment`: the first j at or after the previous stop with
``p_ij >= 0.5``). The head then attends with weights ``beta`` (:func:`chunkwise_weights`):

* chunk w = 1 - hard monotonic attention: ``beta = alpha``;
* chunk w > 1 - MoChA (Chiu & Raffel 2018): a softmax over the w keys ending at the stop,
  ``beta_ij = sum_{k=j}^{j+w-1} alpha_ik exp(u_ij) / sum_{l=k-w+1}^{k} exp(u_il)``;
* chunk None - infinite lookback (MILk, Arivazhagan et al. 2019; MMA-IL, Ma et al. 2020):
  the window is every key up to the stop.

Monotonic multihead attention (Ma et al. 2020; for ASR, Inaguma et al. 2020) runs one such
head per attention head. :func:`headdrop` is Inaguma et al.'s HeadDrop regulariser and
:func:`head_divergence` the variance of the heads' expected stops.

The products ``prod (1 - p)`` are formed from differences of a log-space cumulative sum,
``exp(L_j - L_k)`` with ``L`` the exclusive cumsum of ``log(1 - p)`` (exact zero factors
counted apart), which neither underflows into a division by zero (the cumprod/cumsum closed
form's problem) nor loops over keys. Rows are processed in order (the recursion runs
over queries); each row costs O(M^2) memory per (batch, head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.functional.softmax import _softmax_rows

__all__ = [
    "chunkwise_weights",
    "expected_alignment",
    "hard_alignment",
    "head_divergence",
    "headdrop",
    "preserve_mass",
]


def _check_p(p_choose: Tensor, where: str) -> tuple[int, int, int, int]:
    if not isinstance(p_choose, Tensor) or p_choose.dim() != 4 or not p_choose.is_floating_point():
        raise ValueError(f"{where}: p_choose must be a floating (B, H, N, M) tensor, got {p_choose!r:.80}")
    b, h, n, m = p_choose.shape
    return b, h, n, m


def _check_rows(skip: Tensor | None, b: int, n: int, where: str) -> Tensor | None:
    if skip is None:
        return None
    if skip.dtype != torch.bool or tuple(skip.shape) not in ((b, n), (b, 1, n)):
        raise ValueError(
            f"{where}: skip must be a bool (B, N) = ({b}, {n}) tensor, got {skip.dtype} {tuple(skip.shape)}"
        )
    return skip.reshape(b, 1, n)


def expected_alignment(p_choose: Tensor, *, skip: Tensor | None = None) -> Tensor:
    """The expected monotonic alignment alpha (training), row by row.

    Args:
        p_choose: (B, H, N, M) selection probabilities in [0, 1]; give 0 where a key may not
            be chosen (padding, masks).
        skip: (B, N) bool, rows that do not advance the alignment (e.g. padded queries): they
            pass alpha_{i-1} on to row i + 1 and get alpha_i = 0.

    Returns:
        alpha (B, H, N, M), ``alpha_ij = p_ij · sum_{k<=j} alpha_{i-1,k} prod_{l=k}^{j-1}(1 - p_il)``
        with alpha_{-1} = one-hot at key 0. Rows sum to at most 1 (the rest is the probability
        of not stopping before the end).
    """
    b, h, n, m = _check_p(p_choose, "expected_alignment")
    skip3 = _check_rows(skip, b, n, "expected_alignment")
    below = torch.ones(m, m, dtype=torch.bool, device=p_choose.device).tril()  # k <= j
    prev = torch.zeros(b, h, m, dtype=p_choose.dtype, device=p_choose.device)
    prev[..., 0] = 1.0
    rows = []
    for i in range(n):
        p = p_choose[:, :, i]
        one_minus = 1.0 - p
        zero = one_minus <= 0  # exact zero factors are counted, not logged
        log1m = torch.log(torch.where(zero, torch.ones_like(p), one_minus))
        big_l = F.pad(torch.cumsum(log1m[..., :-1], -1), (1, 0))  # exclusive: sum_{l<j} log(1 - p_l)
        zeros = F.pad(torch.cumsum(zero[..., :-1].to(torch.int32), -1), (1, 0))
        blocked = (zeros.unsqueeze(-1) != zeros.unsqueeze(-2)) | ~below  # a zero factor between k and j
        diff = (big_l.unsqueeze(-1) - big_l.unsqueeze(-2)).masked_fill(blocked, float("-inf"))
        carried = torch.matmul(torch.exp(diff), prev.unsqueeze(-1)).squeeze(-1)  # sum_k T_jk prev_k
        alpha = p * carried
        if skip3 is not None:
            sk = skip3[:, :, i, None]
            rows.append(alpha.masked_fill(sk, 0.0))
            prev = torch.where(sk, prev, alpha)
        else:
            rows.append(alpha)
            prev = alpha
    return torch.stack(rows, 2)


def preserve_mass(alpha: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Put each row's leftover mass ``1 - sum_j alpha_ij`` on its last allowed key (fairseq MMA's
    "mass preservation"). alpha (B, H, N, M), allowed bool broadcastable to it or None -> (B, H, N, M).
    Rows with no allowed key stay zero."""
    m = alpha.shape[-1]
    if allowed is None:
        allowed = torch.ones(1, 1, 1, m, dtype=torch.bool, device=alpha.device)
    allowed = allowed.expand_as(alpha)
    idx = torch.arange(m, device=alpha.device)
    last = torch.where(allowed, idx, -1).amax(-1, keepdim=True)  # (B, H, N, 1)
    live = last >= 0
    leftover = (1.0 - alpha.sum(-1, keepdim=True)).clamp_min(0.0) * live
    return alpha + leftover * (idx == last)


def hard_alignment(p_choose: Tensor, *, skip: Tensor | None = None, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Hard monotonic decisions (inference): row i stops at the first key j >= the previous stop
    with ``p_ij >= threshold``.

    Args:
        p_choose: (B, H, N, M) selection probabilities (0 where a key may not be chosen).
        skip: (B, N) bool, rows that do not move the alignment (they get no stop).
        threshold: the decision threshold (0.5).

    Returns:
        (alpha (B, H, N, M) one-hot at the stop or all zero when the head finds none,
        stops (B, H, N) long, -1 where there is none). Stops never move backwards. A head that
        finds no stop has read every key, so no later row of it stops either (as in the
        expected alignment, whose mass is then spent, and in Raffel et al.'s and Inaguma et
        al.'s inference, which multiply p by the cumulative sum of the previous alignment).
    """
    b, h, n, m = _check_p(p_choose, "hard_alignment")
    skip3 = _check_rows(skip, b, n, "hard_alignment")
    idx = torch.arange(m, device=p_choose.device)
    start = torch.zeros(b, h, 1, dtype=torch.long, device=p_choose.device)
    stops = []
    for i in range(n):
        cand = (p_choose[:, :, i] >= threshold) & (idx >= start)
        if skip3 is not None:
            cand = cand & ~skip3[:, :, i, None]
        found = cand.any(-1, keepdim=True)
        first = cand.to(torch.int8).argmax(-1, keepdim=True)  # the first True
        stops.append(torch.where(found, first, -1).squeeze(-1))
        moved = found if skip3 is None else found | skip3[:, :, i, None]
        start = torch.where(found, first, torch.where(moved, start, m))  # no stop: the head read every key
    stop = torch.stack(stops, 2)
    alpha = (idx == stop.unsqueeze(-1)).to(p_choose.dtype)
    return alpha, stop


_S_ELEMENTS = 1 << 24  # entries of the per-window softmax tensor built at once (memory bound)


def chunkwise_weights(alpha: Tensor, energy: Tensor | None, chunk: int | None, allowed: Tensor | None = None) -> Tensor:
    """Attention weights beta from the alignment alpha: the stop's window softmax, weighted by alpha.

    Args:
        alpha: (B, H, N, M) alignment (expected or hard).
        energy: (B, H, N, M) chunk energies u (unused when ``chunk == 1``).
        chunk: window size w >= 1 (1: hard monotonic, ``beta = alpha``), or None for infinite
            lookback (every key up to the stop).
        allowed: bool broadcastable to (B, H, N, M), True = may attend, or None.

    Returns:
        beta (B, H, N, M): ``beta_ij = sum_k alpha_ik S_ikj`` with ``S_ik`` the softmax of u_i
        over the allowed keys of the window ending at k. Rows sum to the mass alpha put on keys
        whose window holds an allowed key. A finite chunk costs O(M·w) per row (no (M, M)
        window matrix); infinite lookback O(M^2).
    """
    if chunk == 1:
        return alpha if allowed is None else alpha * allowed
    if energy is None or energy.shape != alpha.shape:
        raise ValueError(f"chunkwise_weights: energy must match alpha {tuple(alpha.shape)}, got {energy!r:.60}")
    if allowed is not None:
        allowed = torch.broadcast_to(allowed, alpha.shape)
    if chunk is not None:
        return _chunk_weights(alpha, energy, chunk, allowed)
    m = alpha.shape[-1]
    k_idx = torch.arange(m, device=alpha.device)
    window = k_idx[None, :] <= k_idx[:, None]  # (k, j): j <= k
    # S is (..., rows, k, j): rows of queries at a time keep it near _S_ELEMENTS entries
    n = alpha.shape[-2]
    rows = max(1, _S_ELEMENTS // max(alpha.numel() // max(n, 1) * m, 1))
    out = []
    for i in range(0, n, rows):
        a_i, e_i = alpha[..., i : i + rows, :], energy[..., i : i + rows, :]
        ok = window if allowed is None else window & allowed[..., i : i + rows, :].unsqueeze(-2)  # (..., k, j)
        s = _softmax_rows(e_i.unsqueeze(-2).expand(*e_i.shape[:-1], m, m), ok)
        out.append(torch.matmul(a_i.unsqueeze(-2), s).squeeze(-2))
    return torch.cat(out, -2)


def _chunk_weights(alpha: Tensor, energy: Tensor, w: int, allowed: Tensor | None) -> Tensor:
    """MoChA's weights for a finite chunk w in O(M·w) per row (:func:`chunkwise_weights`).

    With ``D_k = log sum_{l=k-w+1}^{k} exp(u_l)`` (allowed keys only) the definition reads
    ``beta_j = sum_{d<w} alpha_{j+d} exp(u_j - D_{j+d})``: every exponent is <= 0 where j is
    allowed, so nothing overflows, and no (M, M) window matrix is built.
    """
    inf = float("inf")
    u = energy if allowed is None else energy.masked_fill(~allowed, -inf)
    windows = F.pad(u, (w - 1, 0), value=-inf).unfold(-1, w, 1)  # (..., M, w): u_{k-w+1..k}
    empty = torch.isneginf(windows).all(-1)  # (..., M): a window with no allowed key
    log_den = torch.logsumexp(windows.masked_fill(empty.unsqueeze(-1), 0.0), -1).masked_fill(empty, inf)
    a_ahead = F.pad(alpha, (0, w - 1)).unfold(-1, w, 1)  # (..., M, w): alpha_{j..j+w-1}
    d_ahead = F.pad(log_den, (0, w - 1), value=inf).unfold(-1, w, 1)
    return (a_ahead * torch.exp(u.unsqueeze(-1) - d_ahead)).sum(-1)


def headdrop(alpha: Tensor, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """HeadDrop (Inaguma et al. 2020): zero each head's alignment with probability p (one draw per
    head for the whole batch, as in the authors' code) and scale the kept heads by H / H_kept.
    alpha (B, H, N, M) -> (B, H, N, M); ``p = 0`` returns alpha unchanged."""
    if p <= 0:
        return alpha
    h = alpha.shape[1]
    keep = torch.rand(h, generator=generator) >= p
    kept = int(keep.sum())
    if kept == 0:
        return torch.zeros_like(alpha)
    scale = keep.to(alpha.device, alpha.dtype) * (h / kept)
    return alpha * scale[None, :, None, None]


def head_divergence(alpha: Tensor, skip: Tensor | None = None) -> Tensor:
    """Variance across heads of the expected stop ``sum_j j · alpha_ij``, averaged over rows.

    alpha (B, H, N, M), skip (B, N) rows to leave out -> scalar. The spread of the heads'
    boundaries (the "head divergence" loss of Inaguma et al.'s code; MMA's latency variance).
    """
    m = alpha.shape[-1]
    pos = torch.arange(m, device=alpha.device, dtype=alpha.dtype)
    stop = (alpha * pos).sum(-1)  # (B, H, N)
    var = stop.var(1, unbiased=False)  # (B, N)
    if skip is None:
        return var.mean()
    keep = (~skip).to(var.dtype)
    return (var * keep).sum() / keep.sum().clamp_min(1.0)
