"""Kernelized attention with relative positions via FFT (Luo et al. 2021) and FNet Fourier mixing.

* :func:`kernelized_rpe_attention` - "Stable, Fast and Accurate: Kernelized Attention with
  Relative Positional Encoding" (Luo et al., NeurIPS 2021), Algorithm 1. Queries and keys are
  L2-normalised, mapped by positive random features
  ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` (so ``E[phi(q)·phi(k)] = exp(q·k)``), and a
  relative-position bias ``b_r`` over offsets ``r = j - i`` multiplies the kernel by
  ``c_r = exp(b_r)``::

      out_i = sum_j c_{j-i} phi(q_i)·phi(k_j) v_j / sum_j c_{j-i} phi(q_i)·phi(k_j)

  ``C = [c_{j-i}]`` is a Toeplitz matrix, so both sums are Toeplitz matrix products computed
  by FFT: O(N log N) time and O(N) memory in the sequence length. The same weights applied
  directly (row blocks, two matmuls) are faster on a CPU up to tens of thousands of keys per row,
  and for a bias that is constant beyond ±R (clipped) a row block needs only its window of 2R
  keys densely plus running sums for the rest (``method="dense"``; ``"auto"`` chooses). ``causal=True`` sets
  ``c_r = 0`` for future offsets (``b_r = -inf`` for ``r > 0``); the causal product is a
  dyadic sequence of FFTs (O(N log^2 N)) in which no row reads a later key, not even through
  FFT round-off.
* :func:`kernelized_rpe_reference` - the same attention as an explicit (N, N) matrix (the
  "dense Toeplitz form"), float64: the oracle of the FFT path.
* :func:`toeplitz_matmul` - ``y_i = sum_j c_{j-i} x_j`` by FFT, and :func:`toeplitz_matrix`.
* :func:`fourier_mixing` - FNet (Lee-Thorp et al., NAACL 2022): ``Re(FFT2(x))`` over
  (sequence, hidden); no parameters.

Relative-position bias layout everywhere: a tensor whose last dim has ``2N - 1`` entries, entry
``r + N - 1`` holding ``b_r`` for offset ``r = j - i`` in ``-(N-1) .. N-1`` (key j, query i).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib import dispatch
from attnlib._validation import check_qkv, describe, positive_int
from attnlib.functional._common import acc_dtype

__all__ = [
    "clipped_offset_bias",
    "draw_random_features",
    "fourier_mixing",
    "kernelized_rpe_attention",
    "kernelized_rpe_attention_2d",
    "kernelized_rpe_reference",
    "kernelized_rpe_reference_2d",
    "offset_matrix_2d",
    "positive_random_features",
    "toeplitz_matmul",
    "toeplitz_matrix",
]

_CHUNK_ELEMS = 1 << 20  # real elements of one FFT batch (features x values x padded length; cache-sized)


def _fft_length(n: int) -> int:
    """Smallest power of two >= 2n - 1 (no circular wrap-around for a length-n Toeplitz product)."""
    return 1 << max(0, (2 * n - 2).bit_length())


def draw_random_features(
    num_features: int,
    dim: int,
    *,
    orthogonal: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random projection W (num_features, dim) for :func:`positive_random_features`.

    Rows are i.i.d. N(0, I_dim) (Algorithm 1 of Luo et al.). With ``orthogonal=True`` rows come
    in blocks of ``dim`` orthogonal directions, each rescaled to the norm of a Gaussian vector
    (Performer's ORF), which keeps every row marginally N(0, I) and lowers the variance.
    """
    positive_int(num_features, "num_features")
    positive_int(dim, "dim")
    if not orthogonal:
        w = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        sign = torch.sign(torch.diagonal(r))
        qm = qm * torch.where(sign == 0, torch.ones_like(sign), sign)[None, :]  # uniform (Haar) rotation
        blocks.append(qm.T)
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(dtype=dtype, device=device)


def positive_random_features(x: Tensor, projection: Tensor) -> Tensor:
    """Positive random features ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``.

    Args:
        x: (..., H, N, D) (the head axis is dim -3 when ``projection`` is per head).
        projection: W, (m, D) shared by all heads, or (H, m, D) per head.

    Returns:
        (..., H, N, m), positive; ``E_W[phi(x)·phi(y)] = exp(x·y)`` for W with N(0, I) rows.
    """
    if projection.dim() not in (2, 3) or projection.shape[-1] != x.shape[-1]:
        raise ValueError(f"projection must be (m, D) or (H, m, D) with D={x.shape[-1]}, got {describe(projection)}")
    m = projection.shape[-2]
    wx = x @ projection.transpose(-1, -2)  # (m, D) or (H, m, D) broadcast over (..., H, N, D)
    return torch.exp(wx - 0.5 * x.square().sum(-1, keepdim=True)) / math.sqrt(m)


def toeplitz_matrix(c: Tensor) -> Tensor:
    """Dense Toeplitz matrix ``T[..., i, j] = c[..., (j - i) + N - 1]`` from c (..., 2N - 1) -> (..., N, N)."""
    length = c.shape[-1]
    if length % 2 != 1:
        raise ValueError(f"c must have 2N - 1 (odd) entries in its last dim, got {length}")
    n = (length + 1) // 2
    idx = torch.arange(n, device=c.device)
    return c[..., idx[None, :] - idx[:, None] + n - 1]


def _toeplitz_kernel_fft(c: Tensor, n: int, length: int) -> Tensor:
    """rfft of the circulant first column g with g[k mod L] = c_{-k}, k = -(n-1)..n-1."""
    g = c.new_zeros((*c.shape[:-1], length))
    g[..., :n] = c[..., :n].flip(-1)  # k = 0..n-1 -> c_{-k} at index n-1-k
    if n > 1:
        g[..., length - n + 1 :] = c[..., n:].flip(-1)  # k = -(n-1)..-1 at L+k -> c_{-k}
    return torch.fft.rfft(g, n=length)


_CAUSAL_BLOCK = 256  # causal products: rows of the dense diagonal blocks (P)


class _ToeplitzPlan:
    """FFT kernels for ``y_i = sum_j c_{j-i} a_j`` on (..., C, N) inputs.

    FFT round-off is absolute, about eps·(the transformed signal's magnitude), spread over every
    output row. Non-causal rows all sum about N terms, so one FFT over the whole sequence is
    accurate. A causal row must not read later keys, not even through round-off (a large later
    value would move the earlier rows by eps times its size), and its relative error should not
    grow with N / i. So causal products are computed by the dyadic ("online") decomposition:
    dense lower-triangular products inside blocks of P = ``_CAUSAL_BLOCK`` rows, and, at every
    level L = P, 2P, ..., one FFT of length 2L per pair of sibling segments carrying the left
    segment's L keys to the right segment's L rows. Every key-row pair j < i of different blocks
    is covered exactly once (at the level where the two first fall into sibling segments), each
    row reads only keys before its own block (and its block's earlier keys, densely), and the
    round-off a row receives is relative to at most 2x its own prefix. O(N·P + N log^2 N) time:
    log2(N / P) FFT passes over the sequence instead of one.
    """

    def __init__(self, c: Tensor, n: int, causal: bool) -> None:
        self.n, self.causal = n, causal
        # causal: (segment length L, rfft of the kernel at length 2L) per level; else (FFT length, rfft)
        self.levels: list[tuple[int, Tensor]] = []
        self.base: Tensor | None = None  # causal: dense (1, H|1, P, P) block Toeplitz^T
        if not causal:
            length = _fft_length(n)
            self.levels.append((length, _toeplitz_kernel_fft(c, n, length)[None, :, None, :]))
            return
        p = min(n, _CAUSAL_BLOCK)
        self.block = p
        self.padded = p << max(0, math.ceil(n / p) - 1).bit_length()  # P·2^k >= n
        self.base = toeplitz_matrix(c[..., n - p : n + p - 1]).transpose(-1, -2)[None]
        g = c[..., :n].flip(-1)  # g[d] = c_{-d}: the weight of key i - d for row i
        seg = p
        while seg < self.padded:
            gd = F.pad(g, (0, max(0, 2 * seg - n)))[..., : 2 * seg]
            self.levels.append((seg, torch.fft.rfft(gd, n=2 * seg)[None, :, None, None, :]))
            seg *= 2

    def apply(self, a: Tensor) -> Tensor:
        """a (B, H, C, N') -> (B, H, C, N) for N' >= N (a may come zero-padded to the FFT length)."""
        if not self.causal:
            length, kern = self.levels[0]
            src = a if a.shape[-1] == length else a[..., : self.n]
            return torch.fft.irfft(torch.fft.rfft(src, n=length) * kern, n=length)[..., : self.n]
        assert self.base is not None
        n, p, total = self.n, self.block, self.padded
        a = a[..., :n]
        a = F.pad(a, (0, total - n)) if total > n else a
        lead = a.shape[:-1]
        rows = a.shape[-2] * (total // p)  # (B, H, C·blocks, P) @ (1, H|1, P, P): one large matmul per head
        y = (a.reshape(*lead[:-1], rows, p) @ self.base).reshape(*lead, total)
        for seg, kern in self.levels:
            left = a.reshape(*lead, total // (2 * seg), 2, seg)[..., 0, :]  # keys of every left segment
            part = torch.fft.irfft(torch.fft.rfft(left, n=2 * seg) * kern, n=2 * seg)[..., seg:]  # right rows
            y.view(*lead, total // (2 * seg), 2, seg)[..., 1, :] += part  # autograd-safe: matmul/irfft keep no output
        return y[..., :n]


def toeplitz_matmul(c: Tensor, x: Tensor) -> Tensor:
    """Toeplitz product ``y[..., i, :] = sum_j c[..., (j - i) + N - 1] x[..., j, :]`` by FFT.

    Args:
        c: (..., 2N - 1) over offsets -(N-1)..N-1 (broadcast against x's leading dims).
        x: (..., N, C).

    Returns:
        (..., N, C), equal to ``toeplitz_matrix(c) @ x`` up to FFT round-off; O(N log N) time.
        Half-precision inputs are computed in float32 and cast back.
    """
    n = x.shape[-2]
    if c.shape[-1] != 2 * n - 1:
        raise ValueError(f"c must have 2N - 1 = {2 * n - 1} entries for x with N={n}, got shape {tuple(c.shape)}")
    ct = acc_dtype(c.dtype, x.dtype)
    length = _fft_length(n)
    kern = _toeplitz_kernel_fft(c.to(ct), n, length)  # (..., F)
    xf = torch.fft.rfft(x.to(ct).transpose(-1, -2), n=length)  # (..., C, F)
    y = torch.fft.irfft(xf * kern[..., None, :], n=length)[..., :n]
    return y.transpose(-1, -2).to(x.dtype)


def _check_rpe(q: Tensor, k: Tensor, v: Tensor, rpe_bias: Tensor, projection: Tensor, where: str) -> None:
    check_qkv(q, k, v, where=where)
    _, h, n, d = q.shape
    if k.shape[1] != h:
        raise ValueError(f"{where}: needs as many key/value heads as query heads, got H={h} and H_kv={k.shape[1]}")
    if k.shape[2] != n:
        raise ValueError(
            f"{where}: relative positions need self-attention (N == M), got N={n} queries and M={k.shape[2]} keys"
        )
    if not isinstance(rpe_bias, Tensor) or rpe_bias.dim() not in (1, 2) or rpe_bias.shape[-1] != 2 * n - 1:
        raise ValueError(
            f"{where}: rpe_bias must be (2N - 1,) or (H, 2N - 1) = ({h}, {2 * n - 1}) over offsets "
            f"-(N-1)..N-1, got {describe(rpe_bias)}"
        )
    if rpe_bias.dim() == 2 and rpe_bias.shape[0] not in (1, h):
        raise ValueError(f"{where}: rpe_bias has {rpe_bias.shape[0]} heads, expected 1 or H={h}")
    if not isinstance(projection, Tensor) or projection.dim() not in (2, 3) or projection.shape[-1] != d:
        raise ValueError(f"{where}: projection must be (m, D={d}) or (H, m, D), got {describe(projection)}")
    if projection.dim() == 3 and projection.shape[0] not in (1, h):
        raise ValueError(f"{where}: projection has {projection.shape[0]} heads, expected 1 or H={h}")


def _check_key_padding(key_padding: Tensor | None, b: int, n: int, device: torch.device, where: str) -> None:
    if key_padding is None:
        return
    if not isinstance(key_padding, Tensor) or key_padding.dtype != torch.bool or tuple(key_padding.shape) != (b, n):
        raise ValueError(f"{where}: key_padding must be a bool tensor (B, N) = ({b}, {n}), got {describe(key_padding)}")
    if key_padding.device != device:
        raise ValueError(f"{where}: key_padding is on {key_padding.device} but q is on {device}")


def clipped_offset_bias(table: Tensor, n: int, max_distance: int) -> Tensor:
    """Per-head bias over the offsets ``-(n-1)..n-1`` of N tokens from a table over ``-R..R``.

    table (H, 2R + 1) with R = ``max_distance``; offsets beyond ±R take the bias of ±R
    (Shaw-style clipping). Returns (H, 2n - 1), the ``rpe_bias`` of :func:`kernelized_rpe_attention`.
    """
    r = torch.arange(-(n - 1), n, device=table.device).clamp(-max_distance, max_distance)
    return table[:, r + max_distance]


def _bias_table(rpe_bias: Tensor, n: int, causal: bool, ct: torch.dtype) -> Tensor:
    """(H|1, 2N-1) log-weights with -inf on future offsets when causal."""
    bias = rpe_bias.to(ct)
    if bias.dim() == 1:
        bias = bias[None]
    if causal and n > 1:
        future = torch.arange(2 * n - 1, device=bias.device) > n - 1
        bias = bias.masked_fill(future, float("-inf"))
    return bias


def _empty_rows(key_padding: Tensor | None, causal: bool) -> Tensor | None:
    """(B, 1, N, 1) True where a query has no allowed key, or None when none can."""
    if key_padding is None:
        return None
    seen = key_padding.cumsum(-1) > 0 if causal else key_padding.any(-1, keepdim=True).expand_as(key_padding)
    return (~seen)[:, None, :, None]


def _features(q: Tensor, k: Tensor, projection: Tensor, key_padding: Tensor | None, ct: torch.dtype):
    """phi of the L2-normalised queries and keys (B, H, N, m), padded keys zeroed."""
    w = projection.to(ct)
    phi_q = positive_random_features(F.normalize(q.to(ct), dim=-1), w)
    phi_k = positive_random_features(F.normalize(k.to(ct), dim=-1), w)
    if key_padding is not None:
        phi_k = phi_k * key_padding[:, None, :, None].to(ct)
    return phi_q, phi_k


def _kernelized_apply(
    q: Tensor,
    v: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    apply: Callable[[Tensor], Tensor],
    apply_t: Callable[[Tensor], Tensor],
    *,
    empty: Tensor | None,
    eps: float,
    return_importance: bool,
    feature_chunk: int | None,
    length: int,
) -> Tensor | tuple[Tensor, Tensor]:
    """``out_i = phi(q_i)^T (C A)_i / phi(q_i)^T (C phi(k))_i`` for a positional operator C.

    ``apply`` maps (B, H, channels, N) -> (B, H, channels, N) as ``y[..., i] = sum_j C_ij a[..., j]``
    and ``apply_t`` as C^T (for the importance); ``length`` is the padded sequence length of one
    operator call (for the feature chunking). Shared by the 1-D (Toeplitz) and 2-D (block Toeplitz)
    relative-position forms.
    """
    b, h, n, _ = phi_q.shape
    dv = v.shape[-1]
    ct = phi_q.dtype
    m = phi_k.shape[-1]
    vv_t = torch.cat([v.to(ct), torch.ones_like(v[..., :1], dtype=ct)], -1).transpose(-1, -2)  # [v, 1] (B, H, Dv+1, N)
    phi_k_t, phi_q_t = phi_k.transpose(-1, -2), phi_q.transpose(-1, -2)  # (B, H, m, N)
    if feature_chunk is None:
        feature_chunk = max(1, _CHUNK_ELEMS // max(1, b * h * (dv + 1) * length))
    acc = None
    for s in range(0, m, feature_chunk):
        e = min(m, s + feature_chunk)
        a = phi_k_t[:, :, s:e, None, :] * vv_t[:, :, None, :, :]  # A_j = phi(k_j)[s:e] (x) [v_j, 1]
        y = apply(a.reshape(b, h, (e - s) * (dv + 1), n)).reshape(b, h, e - s, dv + 1, n)
        part = (y * phi_q_t[:, :, s:e, None, :]).sum(2)  # (B, H, Dv+1, N): sum_a phi(q_i)_a D[a, :, i]
        acc = part if acc is None else acc + part
    assert acc is not None
    acc = acc.transpose(-1, -2)  # (B, H, N, Dv+1)
    num, den = acc[..., :dv], acc[..., dv:]
    out = num / den.clamp_min(eps)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    out = out.to(q.dtype)
    if not return_importance:
        return out
    # importance_j = (1/N) phi(k_j) · sum_i C_ij phi(q_i) / den_i  (the transposed product)
    u = phi_q / den.clamp_min(eps)
    if empty is not None:
        u = u.masked_fill(empty, 0.0)
    t = apply_t(u.transpose(-1, -2))
    imp = (phi_k * t.transpose(-1, -2)).sum(-1) / n
    return out, imp.to(q.dtype)


def kernelized_rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe_bias: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    eps: float = 1e-6,
    return_importance: bool = False,
    feature_chunk: int | None = None,
    method: Literal["auto", "fft", "dense"] = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Kernelized attention with relative-position bias by FFT (Luo et al. 2021, Algorithm 1).

    Args:
        q, k: (B, H, N, D); normalised to unit L2 norm here (no 1/sqrt(D), no temperature).
        v: (B, H, N, Dv).
        rpe_bias: b, (H, 2N - 1) or (2N - 1,): entry ``r + N - 1`` is the bias of offset
            ``r = j - i``; the kernel is multiplied by ``exp(b_r)``.
        projection: random-feature matrix W, (m, D) or (H, m, D) (see :func:`draw_random_features`).
        causal: ``exp(b_r) = 0`` for ``r > 0`` (no key after the query).
        key_padding: bool (B, N), True = real key; padded keys get zero weight.
        eps: lower clamp of the normaliser (it is positive in exact arithmetic; FFT round-off
            can bring a tiny one to <= 0).
        return_importance: also return the attention mass each key receives, averaged over the
            N queries, (B, H, N), by one more (transposed) Toeplitz product.
        feature_chunk: random features per FFT batch (memory O(B·H·chunk·Dv·N)); default
            picks a chunk of about 1M elements (cache-sized).
        method: "fft" (the paper's Toeplitz product by FFT), "dense" (the same weights
            ``phi(q_i)·phi(k_j) exp(b_{j-i})`` as (N, N) row blocks and two matmuls, O(N · block)
            memory; where the bias is constant beyond some offset ±R, as a clipped bias is,
            each row block reads only its window of keys densely and the rest through running
            sums) or "auto": dense while the window is at most
            :data:`attnlib.dispatch.KERNELIZED_DENSE_MAX_N` keys
            (:func:`attnlib.dispatch.kernelized_dense`), where it is faster. Both give the same
            result up to round-off.

    Returns:
        out (B, H, N, Dv) in q's dtype (computed in >= float32), or (out, importance).
        Queries with no allowed key (all keys padded / before them) return zeros.
        O(B·H·m·Dv·N log N) time (causal: N log^2 N), O(B·H·chunk·Dv·N) memory.
    """
    where = "kernelized_rpe_attention"
    _check_rpe(q, k, v, rpe_bias, projection, where)
    b, _, n, _ = q.shape
    _check_key_padding(key_padding, b, n, q.device, where)
    ct = acc_dtype(q.dtype)
    phi_q, phi_k = _features(q, k, projection, key_padding, ct)
    bias = _bias_table(rpe_bias, n, causal, ct)
    # a global shift of b cancels in the ratio; it keeps exp(b) <= 1 (fp32 FFT round-off ~ max c)
    c = torch.exp(bias - bias.amax(-1, keepdim=True).detach())  # (H|1, 2N-1)
    if method not in ("auto", "fft", "dense"):
        raise ValueError(f"{where}: method must be 'auto', 'fft' or 'dense', got {method!r}")
    if method == "auto":
        r_l, r_r = _constant_reach(c)
        method = "dense" if dispatch.kernelized_dense(n, r_l + r_r + 1) else "fft"
    if method == "dense":
        return _kernelized_dense(
            q, v, phi_q, phi_k, c, empty=_empty_rows(key_padding, causal), eps=eps,
            return_importance=return_importance,
        )  # fmt: skip
    plan = _ToeplitzPlan(c, n, causal)
    return _kernelized_apply(
        q, v, phi_q, phi_k, plan.apply, lambda a: _ToeplitzPlan(c.flip(-1), n, False).apply(a),
        empty=_empty_rows(key_padding, causal), eps=eps, return_importance=return_importance,
        feature_chunk=feature_chunk, length=_fft_length(n),
    )  # fmt: skip


def _constant_reach(c: Tensor) -> tuple[int, int]:
    """(left, right): the smallest R_l, R_r >= 0 with ``c_r`` the same for every offset r <= -R_l
    and the same for every r >= R_r (every head), for c (H|1, 2N-1) over offsets -(N-1)..N-1.

    A bias clipped beyond ±R (:func:`clipped_offset_bias`) gives R_l = R_r = R; a causal one has
    c_r = 0 for every r >= 1, so R_r <= 1."""
    n = (c.shape[-1] + 1) // 2

    def reach(side: Tensor) -> int:  # side[..., d] = c at offset ±d, d = 0..N-1
        changes = (side[..., 1:] != side[..., :-1]).flatten(0, -2).any(0).nonzero()
        return int(changes.max()) + 1 if changes.numel() else 0

    return reach(c[..., :n].flip(-1)), reach(c[..., n - 1 :])


def _kernelized_dense(
    q: Tensor,
    v: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    c: Tensor,
    *,
    empty: Tensor | None,
    eps: float,
    return_importance: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`_kernelized_apply` with the Toeplitz weights applied directly, row block by row block:
    ``S_ij = phi(q_i)·phi(k_j) c_{j-i}``, out_i = S_i [v, 1]; importance_j = (1/N) sum_i S_ij / den_i.

    Where c is constant beyond offsets -R_l and R_r (:func:`_constant_reach`; e.g. a bias clipped
    at ±R), a block of rows [s, e) reads the keys [s - R_l, e + R_r) (widened to whole key blocks)
    densely and every other key through two running sums of ``phi(k_j) (x) [v_j, 1]`` (keys before
    and after its window) times the constant weight there: O(N·(R_l + R_r + block)·(m + Dv)) time
    and O(N · block) memory. Without such a reach it is the dense form, O(N²·(m + Dv))."""
    b, h, n, _ = phi_q.shape
    ct = phi_q.dtype
    dv = v.shape[-1]
    vv = torch.cat([v.to(ct), torch.ones_like(v[..., :1], dtype=ct)], -1)  # [v, 1] (B, H, N, Dv+1)
    phi_k_t = phi_k.transpose(-1, -2)
    r_l, r_r = _constant_reach(c)
    span = min(n, r_l + r_r + 1)
    step = min(n, dispatch.row_block(n, span, b * h), max(16, span))
    if span + 2 * step >= n:  # the windows would cover about everything: one dense pass, no running sums
        r_l = r_r = n
        span, step = n, min(n, dispatch.row_block(n, n, b * h))
    # the weights outside the windows, (H|1, 1, 1); zero weights are skipped
    c_left, c_right = c[..., 0].reshape(-1, 1, 1), c[..., -1].reshape(-1, 1, 1)
    use_left = r_l < n and bool((c_left != 0).any())
    use_right = r_r < n and bool((c_right != 0).any())
    # per key block of `step` keys: sum_j phi(k_j) (x) [v_j, 1], and exclusive prefix / suffix sums
    nb = -(-n // step)
    if use_left or use_right:
        pad = nb * step - n
        kb = F.pad(phi_k, (0, 0, 0, pad)).reshape(b, h, nb, step, -1)
        vb = F.pad(vv, (0, 0, 0, pad)).reshape(b, h, nb, step, dv + 1)
        blocks = kb.transpose(-1, -2) @ vb  # (B, H, nb, m, Dv+1)
        zero = torch.zeros_like(blocks[:, :, :1])
        before = torch.cat([zero, blocks.cumsum(2)], 2)  # before[t]: keys of blocks < t
        after = torch.cat([blocks.flip(2).cumsum(2).flip(2), zero], 2)  # after[t]: keys of blocks >= t
    offs = torch.arange(n, device=c.device)
    outs: list[Tensor] = []
    imp = phi_q.new_zeros(b, h, n) if return_importance else None
    g_left = phi_q.new_zeros(b, h, nb + 1, phi_q.shape[-1]) if return_importance and use_left else None
    g_right = phi_q.new_zeros(b, h, nb + 1, phi_q.shape[-1]) if return_importance and use_right else None
    for s in range(0, n, step):
        e = min(n, s + step)
        lo = max(0, s - r_l) // step  # first key block read densely
        hi = min(nb, -(-(e + r_r) // step))  # end of the key blocks read densely
        k0, k1 = lo * step, min(n, hi * step)
        cblk = c[:, offs[k0:k1][None, :] - offs[s:e, None] + n - 1]  # (H|1, rows, keys)
        scores = (phi_q[:, :, s:e] @ phi_k_t[..., k0:k1]).mul_(cblk)
        nd = scores @ vv[:, :, k0:k1]  # (B, H, rows, Dv+1)
        if use_left and lo > 0:
            nd = nd + phi_q[:, :, s:e] @ (c_left * before[:, :, lo])
        if use_right and hi < nb:
            nd = nd + phi_q[:, :, s:e] @ (c_right * after[:, :, hi])
        den = nd[..., dv:].clamp_min(eps)
        outs.append(nd[..., :dv] / den)
        if imp is not None:
            u = 1.0 / den
            if empty is not None:
                u = u.masked_fill(empty[:, :, s:e], 0.0)
            imp[..., k0:k1] += (scores * u).sum(-2)
            gq = (phi_q[:, :, s:e] * u).sum(-2)  # (B, H, m): sum_i phi(q_i) / den_i
            if g_left is not None and lo > 0:
                g_left[:, :, lo] += gq  # read by the key blocks < lo
            if g_right is not None and hi < nb:
                g_right[:, :, hi] += gq  # read by the key blocks >= hi
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    out = out.to(q.dtype)
    if imp is None:
        return out
    # the keys outside the windows: key j in block t receives phi(k_j) · sum of the row blocks'
    # g over those whose left window starts after t (c_left) or whose right window ends at or before t
    kblk = offs // step
    for g, wgt, rev in ((g_left, c_left, True), (g_right, c_right, False)):
        if g is None:
            continue
        acc = g.flip(2).cumsum(2).flip(2)[:, :, 1:] if rev else g.cumsum(2)[:, :, :-1]  # (B, H, nb, m)
        imp = imp + (phi_k * acc[:, :, kblk]).sum(-1) * wgt.reshape(1, -1, 1)
    return out, (imp / n).to(q.dtype)


def _dense_reference(
    q: Tensor, k: Tensor, v: Tensor, cmat: Tensor, projection: Tensor, key_padding: Tensor | None, ct: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``W_ij = phi(q_i)·phi(k_j) C_ij [j allowed] / sum_j (...)``, out = W v (cmat (H|1, N, N))."""
    phi_q, phi_k = _features(q, k, projection, key_padding, ct)
    scores = (phi_q @ phi_k.transpose(-1, -2)) * cmat[None]
    den = scores.sum(-1, keepdim=True)
    weights = torch.where(den > 0, scores / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(scores))
    return weights @ v.to(ct), weights


def kernelized_rpe_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe_bias: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    key_padding: Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The dense (N, N) form of :func:`kernelized_rpe_attention`: the oracle of the FFT path.

    ``W_ij = phi(q_i)·phi(k_j) exp(b_{j-i}) [j allowed] / sum_j (...)``, out = W v. Computed in
    ``dtype`` (float64 by default; None = q's dtype promoted to >= float32). O(N^2) memory.

    Returns:
        (out (B, H, N, Dv), weights (B, H, N, N)); rows with no allowed key are zero.
    """
    where = "kernelized_rpe_reference"
    _check_rpe(q, k, v, rpe_bias, projection, where)
    b, _, n, _ = q.shape
    _check_key_padding(key_padding, b, n, q.device, where)
    ct = acc_dtype(q.dtype) if dtype is None else dtype
    bias = _bias_table(rpe_bias, n, causal, ct)  # (H|1, 2N-1)
    return _dense_reference(q, k, v, torch.exp(toeplitz_matrix(bias)), projection, key_padding, ct)


# ------------------------------------------------------------------------------------------
# 2-D relative positions (image grids)
# ------------------------------------------------------------------------------------------


def _check_grid(grid: tuple[int, int], n: int, bias2d: Tensor, h: int, where: str) -> int:
    """Validate a (gh, gw) grid for N tokens and a (H|1, 2gh-1, 2gw-1) table; returns the prefix count."""
    if len(grid) != 2:
        raise ValueError(f"{where}: grid must be (rows, cols), got {grid!r}")
    gh, gw = (positive_int(g, f"{where}: grid") for g in grid)
    if gh * gw > n:
        raise ValueError(f"{where}: a {gh}x{gw} grid needs N >= {gh * gw} tokens, got N={n}")
    want = (2 * gh - 1, 2 * gw - 1)
    if not isinstance(bias2d, Tensor) or bias2d.dim() != 3 or tuple(bias2d.shape[1:]) != want:
        raise ValueError(f"{where}: rpe_bias_2d must be (H, {want[0]}, {want[1]}), got {describe(bias2d)}")
    if bias2d.shape[0] not in (1, h):
        raise ValueError(f"{where}: rpe_bias_2d has {bias2d.shape[0]} heads, expected 1 or H={h}")
    return n - gh * gw


def offset_matrix_2d(c2: Tensor, grid: tuple[int, int]) -> Tensor:
    """Dense 2-level Toeplitz matrix ``C[i, j] = c2[r_j - r_i + gh - 1, c_j - c_i + gw - 1]`` over the
    raster-ordered grid cells: c2 (..., 2gh - 1, 2gw - 1) -> (..., gh·gw, gh·gw)."""
    gh, gw = grid
    r = torch.arange(gh * gw, device=c2.device) // gw
    col = torch.arange(gh * gw, device=c2.device) % gw
    return c2[..., r[None, :] - r[:, None] + gh - 1, col[None, :] - col[:, None] + gw - 1]


def _bttb_kernel(c2: Tensor, grid: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """rfft2 of the 2-D circulant g with ``g[-dr mod L1, -dc mod L2] = c2[dr, dc]`` (offsets centred)."""
    gh, gw = grid
    dr = torch.arange(-(gh - 1), gh, device=c2.device)
    dc = torch.arange(-(gw - 1), gw, device=c2.device)
    g = c2.new_zeros((*c2.shape[:-2], *shape))
    g[..., (-dr % shape[0])[:, None], (-dc % shape[1])[None, :]] = c2
    return torch.fft.rfft2(g, s=shape)


def _grid_operator(c2: Tensor, c0: Tensor, grid: tuple[int, int], prefix: int) -> Callable[[Tensor], Tensor]:
    """y = C a for a (B, H, channels, N): the grid block by 2-D FFT (``c2`` (H|1, 2gh-1, 2gw-1)),
    every pair involving one of the ``prefix`` leading tokens weighted by ``c0`` (H|1,)."""
    gh, gw = grid
    shape = (_fft_length(gh), _fft_length(gw))
    kern = _bttb_kernel(c2, grid, shape)[None, :, None]  # (1, H|1, 1, F1, F2)
    c0 = c0[None, :, None, None]

    def apply(a: Tensor) -> Tensor:
        pre, cells = a[..., :prefix], a[..., prefix:]
        img = cells.reshape(*cells.shape[:-1], gh, gw)
        y = torch.fft.irfft2(torch.fft.rfft2(img, s=shape) * kern, s=shape)[..., :gh, :gw].flatten(-2)
        total = a.sum(-1, keepdim=True)
        if prefix:
            y = y + c0 * pre.sum(-1, keepdim=True)
            return torch.cat([(c0 * total).expand_as(pre), y], -1)
        return y

    return apply


def kernelized_rpe_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe_bias_2d: Tensor,
    projection: Tensor,
    grid: tuple[int, int],
    *,
    key_padding: Tensor | None = None,
    eps: float = 1e-6,
    return_importance: bool = False,
    feature_chunk: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Kernelized attention with a 2-D relative-position bias over an image grid (Luo et al. 2021, images).

    The last gh·gw of the N tokens are the cells of a (gh, gw) grid in raster order (patches);
    the leading ``N - gh·gw`` (e.g. a class token) carry no position. The kernel of cells i, j is
    multiplied by ``exp(b[dr, dc])`` with ``(dr, dc) = (row_j - row_i, col_j - col_i)`` (Swin's 2-D
    relative positions, which the paper uses for ImageNet); a pair involving a leading token by
    ``exp(0)``. ``C`` is then a two-level (block) Toeplitz matrix, applied by 2-D FFT:
    O(N log N) time, O(N) memory; non-causal only.

    Args:
        q, k: (B, H, N, D), L2-normalised here; v: (B, H, N, Dv).
        rpe_bias_2d: (H, 2gh - 1, 2gw - 1) (or 1 head), entry ``[dr + gh - 1, dc + gw - 1]``.
        projection: random features (m, D) or (H, m, D).
        grid: (gh, gw).
        key_padding, eps, return_importance, feature_chunk: as :func:`kernelized_rpe_attention`.

    Returns:
        out (B, H, N, Dv), or (out, importance (B, H, N)).
    """
    where = "kernelized_rpe_attention_2d"
    check_qkv(q, k, v, where=where)
    b, h, n, _ = q.shape
    if k.shape[2] != n or k.shape[1] != h:
        raise ValueError(f"{where}: needs self-attention with H_kv == H, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    prefix = _check_grid(grid, n, rpe_bias_2d, h, where)
    _check_key_padding(key_padding, b, n, q.device, where)
    ct = acc_dtype(q.dtype)
    phi_q, phi_k = _features(q, k, projection, key_padding, ct)
    bias = rpe_bias_2d.to(ct)
    shift = bias.flatten(1).amax(-1).clamp_min(0.0).detach()  # exp(b - shift) <= 1, exp(0 - shift) <= 1
    c2 = torch.exp(bias - shift[:, None, None])
    c0 = torch.exp(-shift)
    fwd = _grid_operator(c2, c0, tuple(grid), prefix)
    bwd = _grid_operator(c2.flip(-1, -2), c0, tuple(grid), prefix)
    return _kernelized_apply(
        q, v, phi_q, phi_k, fwd, bwd, empty=_empty_rows(key_padding, False), eps=eps,
        return_importance=return_importance, feature_chunk=feature_chunk,
        length=_fft_length(grid[0]) * _fft_length(grid[1]) + prefix,
    )  # fmt: skip


def kernelized_rpe_reference_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe_bias_2d: Tensor,
    projection: Tensor,
    grid: tuple[int, int],
    *,
    key_padding: Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The dense (N, N) form of :func:`kernelized_rpe_attention_2d` (the oracle): (out, weights)."""
    where = "kernelized_rpe_reference_2d"
    check_qkv(q, k, v, where=where)
    b, h, n, _ = q.shape
    prefix = _check_grid(grid, n, rpe_bias_2d, h, where)
    _check_key_padding(key_padding, b, n, q.device, where)
    ct = acc_dtype(q.dtype) if dtype is None else dtype
    cmat = torch.zeros(rpe_bias_2d.shape[0], n, n, dtype=ct, device=q.device)  # log-weights: 0 for prefix pairs
    cmat[:, prefix:, prefix:] = offset_matrix_2d(rpe_bias_2d.to(ct), tuple(grid))
    return _dense_reference(q, k, v, torch.exp(cmat), projection, key_padding, ct)


def fourier_mixing(x: Tensor, *, dims: tuple[int, int] = (-2, -1), norm: str = "backward") -> Tensor:
    """FNet token mixing: the real part of the 2-D DFT over (sequence, hidden).

    ``Y = Re(F_N X F_C)`` with ``F_n[a, c] = exp(-2 pi i a c / n)`` (Lee-Thorp et al. 2022).

    Args:
        x: (B, N, C) (any leading dims); ``dims`` names the (sequence, hidden) axes.
        norm: "backward" (the paper: unnormalised DFT, output variance ~ N·C/2 x input's) or
            "ortho" (scaled by 1/sqrt(N·C), variance-preserving; not in the paper).

    Returns:
        A real tensor of x's shape and dtype (half inputs are transformed in float32).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"fourier_mixing expects a floating tensor with >= 2 dims (B, N, C), got {describe(x)}")
    if norm not in ("backward", "ortho"):
        raise ValueError(f"norm must be 'backward' (FNet) or 'ortho', got {norm!r}")
    y = torch.fft.fftn(x.to(acc_dtype(x.dtype)), dim=dims, norm=norm).real
    return y.to(x.dtype)
