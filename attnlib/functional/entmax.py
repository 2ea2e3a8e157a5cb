"""Sparse probability maps: sparsemax, 1.5-entmax, alpha-entmax, and attention built on them.

alpha-entmax (Peters, Niculae & Martins 2019; Correia, Niculae & Martins 2019, "Adaptively
Sparse Transformers") maps scores z (along ``dim``) to

    p_i = [(alpha - 1) z_i - tau]_+ ^ (1 / (alpha - 1)),   tau such that sum_i p_i = 1,

with alpha > 1: alpha -> 1 is softmax, alpha = 2 is sparsemax (Martins & Astudillo 2016).
Unlike softmax it gives exact zeros. Here:

* :func:`sparsemax` - exact, sort-based threshold (O(n log n));
* :func:`entmax15` - exact threshold without a sort: a lower bound from block maxima, Newton
  steps on the scores above it, the closed form on the final support (a full sort only for a
  row that does not settle);
* :func:`entmax_bisect` - any alpha > 1 (a float or a tensor, e.g. learned per head) by
  bisection on tau: 50 halvings of [max z' - 1, max z' - n^(1 - alpha)], z' = (alpha - 1) z,
  then renormalised;
* closed-form backward passes: with g = p^(2 - alpha) on the support,
  dz = g ⊙ dp - g · <g, dp> / sum(g); for alpha,
  d alpha = sum_i dp_i [(p_i - g~_i) / (alpha - 1)^2 - (p_i log p_i - g~_i H) / (alpha - 1)],
  g~ = g / sum(g), H = sum_i p_i log p_i.

Masked entries are ``-inf`` and get probability 0; a slice that is entirely ``-inf`` maps to
zeros (never NaN). Half-precision inputs are computed in float32.
:func:`entmax_attention` applies a map to masked attention scores, query chunk by query chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlib import dispatch
from attnlib._validation import check_qkv, number_above, positive_int
from attnlib.functional._common import acc_dtype, as_attention_mask, masked_scores, repeat_kv
from attnlib.masks import MaskLike

__all__ = ["alpha_logit", "entmax15", "entmax_attention", "entmax_bisect", "learned_alpha", "sparsemax"]

ALPHA_MIN = 1.01
"""Lowest learned alpha: the alpha gradient of entmax is singular at alpha = 1."""


def learned_alpha(logit: Tensor) -> Tensor:
    """A learned alpha in (1, 2): ``1 + sigmoid(logit)``, clamped to >= :data:`ALPHA_MIN`."""
    return (1.0 + torch.sigmoid(logit)).clamp_min(ALPHA_MIN)


def alpha_logit(alpha: float) -> float:
    """The logit whose :func:`learned_alpha` is ``alpha`` in (1, 2): ``log(a / (1 - a))`` with a = alpha - 1."""
    a = alpha - 1.0
    return math.log(a / (1 - a))


def _prep(x: Tensor, dim: int) -> tuple[Tensor, Tensor, torch.dtype]:
    """Move ``dim`` last, upcast half types, shift by the max; return (z, empty-slice mask, dtype)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {type(x).__name__}")
    dtype = x.dtype
    z = x.movedim(dim, -1)
    z = z.to(acc_dtype(dtype))
    mx = z.amax(-1, keepdim=True)
    empty = torch.isneginf(mx)
    z = torch.where(empty, torch.zeros_like(z), z - torch.where(empty, torch.zeros_like(mx), mx))
    return z, empty, dtype


def _finish(p: Tensor, empty: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return p.masked_fill(empty, 0.0).to(dtype).movedim(-1, dim)


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:
        z, empty, dtype = _prep(x, dim)
        zs, _ = torch.sort(z, dim=-1, descending=True)
        cs = zs.cumsum(-1)
        k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        support = (1 + k * zs) > cs
        kstar = support.sum(-1, keepdim=True).clamp_min(1)
        tau = (cs.gather(-1, kstar - 1) - 1) / kstar.to(z.dtype)
        p = torch.clamp(z - tau, min=0)
        out = _finish(p, empty, dim, dtype)
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dp: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        sup = (p > 0).to(dp.dtype)
        cnt = sup.sum(ctx.dim, keepdim=True)
        mean = (dp * sup).sum(ctx.dim, keepdim=True) / cnt.clamp_min(1)
        return sup * (dp - mean), None


ENTMAX15_BLOCK = 64
"""Width of the blocks whose maxima give :func:`entmax15` its first lower bound on the threshold."""

ENTMAX15_NEWTON_STEPS = 30
"""Most Newton steps :func:`entmax15` takes on a row's candidates before it sorts the row instead."""


def _entmax15_sorted(zs: Tensor) -> tuple[Tensor, Tensor]:
    """The 1.5-entmax threshold of rows ``zs`` (already halved) sorted in descending order
    -> (tau (rows, 1), support size (rows, 1)): the support is a prefix of the sorted row."""
    k = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=zs.dtype)
    mean = zs.cumsum(-1) / k
    mean_sq = (zs * zs).cumsum(-1) / k
    ss = k * (mean_sq - mean * mean)
    delta = torch.clamp((1 - ss) / k, min=0)
    tau = mean - torch.sqrt(delta)
    kstar = (tau <= zs).sum(-1, keepdim=True).clamp_min(1)
    return tau.gather(-1, kstar - 1), kstar


def _entmax15_rows(x: Tensor) -> Tensor:
    """1.5-entmax of the rows of ``x`` (R, n) (scores, not yet halved; -inf allowed) -> (R, n).

    Sort-free and exact: the 1.5-entmax of the maxima of blocks of :data:`ENTMAX15_BLOCK` scores
    has a threshold at or below the row's (dropping entries only lowers it), so only the scores
    above it are candidates. On those, Newton's method on the convex f(tau) = sum (z - tau)_+^2 - 1
    rises to the threshold from below; once the support {z > t} is the final one, the threshold
    solves sum over the support (z - tau)^2 = 1 exactly (checked for consistency row by row).
    Rows not settled after :data:`ENTMAX15_NEWTON_STEPS` steps are sorted."""
    r, n = x.shape
    if dispatch.entmax_sorts(n):
        return _entmax15_sort_rows(x)
    w = ENTMAX15_BLOCK
    nb = n // w
    maxima = x[:, : nb * w].reshape(r, nb, w).amax(-1)
    if nb * w < n:
        maxima = torch.cat([maxima, x[:, nb * w :].amax(-1, keepdim=True)], 1)
    maxima = maxima.sort(-1, descending=True).values
    mx = maxima[:, :1]
    empty = torch.isneginf(mx)
    mx = torch.where(empty, torch.zeros_like(mx), mx)
    t_lo, _ = _entmax15_sorted((maxima - mx) / 2)
    t_lo = t_lo.masked_fill(empty, 0.0)
    # candidates: scores above the lower bound (none in an all -inf row), packed row by row
    row, col = (x > torch.where(empty, torch.full_like(mx, float("inf")), mx + 2 * t_lo)).nonzero(as_tuple=True)
    counts = torch.bincount(row, minlength=r)
    vals = (x[row, col] - mx[row, 0]) / 2
    pos = torch.arange(row.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[row]
    # padding below the lower bound never enters a support
    c = torch.full((r, max(1, int(counts.max()) if r else 1)), -2.0, dtype=x.dtype, device=x.device)
    c = c + t_lo
    c[row, pos] = vals
    t = t_lo
    done = empty.clone()
    tau = torch.zeros_like(t)
    for _ in range(ENTMAX15_NEWTON_STEPS):
        # on the support {c > t}: s1 = sum (c - t), s2 = sum (c - t)^2; the threshold t + u with
        # cnt u^2 - 2 s1 u + s2 - 1 = 0 is exact when its support is {c > t} as well
        y = (c - t).clamp_(min=0)
        cnt = (y > 0).sum(-1, keepdim=True).to(x.dtype)
        s1 = y.sum(-1, keepdim=True)
        s2 = y.square_().sum(-1, keepdim=True)
        f = s2 - 1
        u = f / (s1 + torch.sqrt(torch.clamp(s1 * s1 - cnt * f, min=0))).clamp_min(torch.finfo(x.dtype).tiny)
        ok = ~done & ((c > t + u).sum(-1, keepdim=True).to(x.dtype) == cnt)
        tau = torch.where(ok, t + u, tau)
        done |= ok
        if bool(done.all()):
            break
        # Newton's step from below (f is convex and decreasing in t)
        t = torch.where(done, t, t + f / (2 * s1).clamp_min(torch.finfo(x.dtype).tiny))
    pk = (c - tau).clamp_(min=0).square_()
    p = torch.zeros_like(x)
    p[row, col] = pk[row, pos]
    rest = (~done).squeeze(-1).nonzero().squeeze(-1)
    if rest.numel():
        p[rest] = _entmax15_sort_rows(x[rest])
    return p


def _entmax15_sort_rows(x: Tensor) -> Tensor:
    """1.5-entmax of the rows of ``x`` (R, n) by a full sort (-inf allowed; all -inf rows -> 0)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    z = (x - m) / 2
    tau, _ = _entmax15_sorted(torch.sort(z, -1, descending=True).values)
    return torch.clamp(z - tau, min=0).square().nan_to_num_(0.0)


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int) -> Tensor:
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
        dtype = x.dtype
        z = x.movedim(dim, -1).to(acc_dtype(dtype))
        shape = z.shape
        p = _entmax15_rows(z.reshape(-1, shape[-1])).reshape(shape)
        out = p.to(dtype).movedim(-1, dim)
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dp: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        g = p.sqrt()
        gd = g * dp
        den = g.sum(ctx.dim, keepdim=True)
        q = gd.sum(ctx.dim, keepdim=True) / torch.where(den == 0, torch.ones_like(den), den)
        return gd - q * g, None


def _p_alpha(x: Tensor, alpha: Tensor) -> Tensor:
    return torch.clamp(x, min=0) ** (1 / (alpha - 1))


class _EntmaxBisect(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, dim: int, n_iter: int, ensure_sum_one: bool) -> Tensor:
        z, empty, dtype = _prep(x, dim)
        a = alpha.to(z.dtype).movedim(dim, -1).expand(*z.shape[:-1], 1)
        zz = z * (a - 1)
        mx = zz.amax(-1, keepdim=True)
        n = z.shape[-1]
        tau_lo = mx - 1.0
        tau_hi = mx - (1.0 / n) ** (a - 1)
        f_lo = _p_alpha(zz - tau_lo, a).sum(-1, keepdim=True) - 1
        dm = tau_hi - tau_lo
        p = torch.zeros_like(zz)
        for _ in range(n_iter):
            dm = dm / 2
            tau_m = tau_lo + dm
            p = _p_alpha(zz - tau_m, a)
            f_m = p.sum(-1, keepdim=True) - 1
            tau_lo = torch.where(f_m * f_lo >= 0, tau_m, tau_lo)
        if ensure_sum_one:
            s = p.sum(-1, keepdim=True)
            p = p / torch.where(s == 0, torch.ones_like(s), s)
        out = _finish(p, empty, dim, dtype)
        ctx.save_for_backward(out, alpha)
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dp: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        p, alpha = ctx.saved_tensors
        dim = ctx.dim
        acc = acc_dtype(p.dtype)
        pa, dpa, a = p.to(acc), dp.to(acc), alpha.to(acc)
        pos = pa > 0
        g = torch.where(pos, pa.clamp_min(1e-300 if acc == torch.float64 else 1e-38) ** (2 - a), torch.zeros_like(pa))
        gsum = g.sum(dim, keepdim=True)
        gsum_safe = torch.where(gsum == 0, torch.ones_like(gsum), gsum)
        gd = g * dpa
        dx = gd - g * gd.sum(dim, keepdim=True) / gsum_safe
        d_alpha = None
        if ctx.needs_input_grad[1]:
            s = torch.where(pos, pa * torch.log(torch.where(pos, pa, torch.ones_like(pa))), torch.zeros_like(pa))
            ent = s.sum(dim, keepdim=True)
            g_sk = g / gsum_safe
            da = dpa * (pa - g_sk) / (a - 1) ** 2 - dpa * (s - g_sk * ent) / (a - 1)
            da = da.sum(dim, keepdim=True)
            # reduce to alpha's shape (it was broadcast against x)
            da = da.sum_to_size(alpha.shape) if alpha.dim() else da.sum()
            d_alpha = da.to(alpha.dtype)
        return dx.to(dp.dtype), d_alpha, None, None, None


def _dim(x: Tensor, dim: int, where: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax (alpha = 2): the Euclidean projection of ``x`` onto the simplex along ``dim``.

    Any shape; returns the same shape and dtype. ``-inf`` entries get 0; all-``-inf`` slices give zeros.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"sparsemax expects a tensor, got {type(x).__name__}")
    return _Sparsemax.apply(x, _dim(x, dim, "sparsemax"))


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """Exact 1.5-entmax along ``dim``. Same shape and dtype as ``x``.

    The threshold is found without sorting (a lower bound from block maxima, Newton steps on the
    scores above it, and the closed form on the final support, checked row by row); a row that
    does not settle is sorted. Memory O(size of x).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"entmax15 expects a tensor, got {type(x).__name__}")
    return _Entmax15.apply(x, _dim(x, dim, "entmax15"))


def entmax_bisect(
    x: Tensor, alpha: float | Tensor = 1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True
) -> Tensor:
    """alpha-entmax along ``dim`` by bisection on the threshold (any alpha > 1).

    Args:
        x: scores, any shape.
        alpha: a float > 1, or a tensor broadcastable to ``x`` with size 1 along ``dim``
            (e.g. (1, H, 1, 1) for one alpha per head); differentiable.
        dim: the normalised dimension.
        n_iter: bisection steps (50 reach float64 precision; ~24 suffice in float32).
        ensure_sum_one: renormalise the result (sum exactly 1).

    Returns:
        Probabilities, same shape and dtype as ``x``; gradients flow to ``x`` and ``alpha``.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"entmax_bisect expects a tensor, got {type(x).__name__}")
    d = _dim(x, dim, "entmax_bisect")
    positive_int(n_iter, "entmax_bisect: n_iter")
    if not isinstance(alpha, Tensor):
        number_above(alpha, 1, "entmax_bisect: alpha", hint=" (alpha -> 1 is softmax)")
        alpha_t = torch.full([1] * x.dim(), float(alpha), dtype=x.dtype, device=x.device)
    else:
        alpha_t = alpha
        if bool((alpha_t.detach() <= 1).any()):
            raise ValueError("entmax_bisect: every alpha must be > 1 (alpha -> 1 is softmax)")
        while alpha_t.dim() < x.dim():
            alpha_t = alpha_t.unsqueeze(0)
        try:
            shape = torch.broadcast_shapes(alpha_t.shape, x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"entmax_bisect: alpha of shape {tuple(alpha.shape)} does not broadcast to x {tuple(x.shape)}"
            ) from err
        if alpha_t.shape[d] != 1 or shape != x.shape:
            raise ValueError(
                f"entmax_bisect: alpha must broadcast to x {tuple(x.shape)} with size 1 along dim {dim}, "
                f"got {tuple(alpha.shape)}"
            )
    return _EntmaxBisect.apply(x, alpha_t, d, n_iter, ensure_sum_one)


def _entmax_map(s: Tensor, alpha: float | Tensor, n_iter: int) -> Tensor:
    if isinstance(alpha, Tensor):
        return entmax_bisect(s, alpha, -1, n_iter)
    if float(alpha) == 2.0:
        return sparsemax(s, -1)
    if float(alpha) == 1.5:
        return entmax15(s, -1)
    return entmax_bisect(s, float(alpha), -1, n_iter)


def _fused(q: Tensor, k: Tensor, v: Tensor, am: Any, alpha: float, scale: float, n_iter: int) -> Tensor | None:
    """The fused kernel's output when the machine policy prefers it and it supports the call
    (a fixed alpha; causal and right-padded key masks only), else None."""
    if not dispatch.entmax_fused(q.device):
        return None
    kinds = set(am.kinds())
    if not kinds <= {"causal", "key_padding"}:
        return None
    lengths = am.key_lengths() if "key_padding" in kinds else None
    if "key_padding" in kinds and lengths is None:
        return None
    from attnlib.kernels.entmax import entmax_attention_fused, fused_entmax_supports

    if fused_entmax_supports(q, k, v, alpha) is not None:
        return None
    return entmax_attention_fused(
        q, k, v, alpha=alpha, scale=scale, causal=am.causal, kv_lengths=lengths, n_iter=n_iter
    )


def entmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    alpha: float | Tensor = 1.5,
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    scale: float | None = None,
    n_iter: int = 50,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_importance: bool = False,
    chunk_size: int = 256,
) -> Tensor | tuple[Tensor, ...]:
    """Attention with alpha-entmax instead of softmax: ``entmax_alpha(q k^T · scale + mask) v``.

    Args:
        q: (B, H, N, D); k: (B, H_kv, M, D); v: (B, H_kv, M, Dv).
        alpha: float > 1 (2: sparsemax, 1.5: exact entmax15, other: bisection) or a tensor
            of shape (H,) - one alpha per head, differentiable (bisection).
        mask, causal: as :func:`attnlib.functional.softmax_attention`; masked keys get 0.
        scale: logit scale, default D**-0.5.
        n_iter: bisection steps.
        dropout_p: dropout on the probabilities.
        return_weights: also return the (B, H, N, M) probabilities.
        return_importance: also return the (B, H, M) mass per key averaged over queries.
        chunk_size: query rows per step (memory O(chunk_size · M)).

    Returns:
        out (B, H, N, Dv), then weights and/or importance when requested. Rows with no
        allowed key are zeros.

    On CUDA (:func:`attnlib.dispatch.entmax_fused`) a call with a fixed alpha, no weights,
    importance or dropout, and at most causal / right-padded key masks runs the fused Triton
    kernel :func:`attnlib.kernels.entmax_attention_fused` (``n_iter`` caps its threshold steps).
    """
    check_qkv(q, k, v, where="entmax_attention")
    am = as_attention_mask(q, k, mask, causal)
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if isinstance(alpha, Tensor):
        if alpha.shape not in ((h,), (1,), ()):
            raise ValueError(
                f"entmax_attention: a tensor alpha must have shape (H,) = ({h},), got {tuple(alpha.shape)}"
            )
        alpha = alpha.reshape(1, -1, 1, 1).to(acc_dtype(q.dtype))
    else:
        number_above(alpha, 1, "entmax_attention: alpha")
    if not (return_weights or return_importance or dropout_p > 0 or isinstance(alpha, Tensor)):
        fused = _fused(q, k, v, am, float(alpha), scale, n_iter)
        if fused is not None:
            return fused
    g = h // k.shape[1]
    kk, vv = repeat_kv(k, g), repeat_kv(v, g)
    acc = acc_dtype(q.dtype)
    outs, weights = [], []
    imp = torch.zeros(b, h, k.shape[2], dtype=acc, device=q.device) if return_importance else None
    qs = q * scale  # the logit scale on q (N x D) rather than on every (N x M) score chunk
    for s0 in range(0, n, chunk_size):
        s1 = min(n, s0 + chunk_size)
        s = masked_scores(qs, kk, am, (s0, s1), 1.0, acc)
        p = _entmax_map(s, alpha, n_iter)
        if imp is not None:
            imp = imp + p.sum(2)
        if return_weights:
            weights.append(p.to(q.dtype))
        pd = F.dropout(p, dropout_p) if dropout_p > 0 else p
        outs.append(torch.matmul(pd.to(v.dtype), vv))
    res: list[Tensor] = [torch.cat(outs, 2)]
    if return_weights:
        res.append(torch.cat(weights, 2))
    if imp is not None:
        res.append((imp / n).to(q.dtype))
    return res[0] if len(res) == 1 else tuple(res)
