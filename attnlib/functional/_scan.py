"""Shared machinery of the linear-attention family (internal).

Everything here works on *feature-mapped* queries and keys: ``qf`` (B, H, N, F) and ``kf``
(B, H, M, F), values ``v`` (B, H, M, Dv). The implicit attention matrix is
``A = qf @ kf^T`` (B, H, N, M) (lower-triangular when causal); it is never formed outside
the explicit reference paths.

* :func:`linear_scan` - ``num = A @ v`` and ``den = A @ 1`` in O(N·F·Dv): one pass for the
  non-causal form, the chunked parallel form for the causal one (intra-chunk C x C products,
  inter-chunk running state ``S = Σ kf^T v``, ``z = Σ kf``), optionally with per-chunk state
  decay for features stabilised by a running maximum (Performer).
* :func:`column_mass` - ``Σ_i r_i · kf_j`` over the queries that see key j, i.e. the column
  sums of the implicit matrix ``diag(s) A`` for row scales folded into ``r = s ⊙ qf``. This
  gives every variant's ``importance`` in O(N·F).
* :func:`kernel_step` - one token of the recurrent (decoding) form: the running state
  ``S += kf^T v``, ``z += kf`` and the query's ``num = qf S``, ``den = qf·z``.
* mask helpers: the family supports ``causal`` (N == M) and key padding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.errors import UnsupportedError
from attnlib.masks import AttentionMask, MaskLike, causal_mask, normalize_mask

__all__ = [
    "block_rows",
    "blocked_attention",
    "causal_chunk_max",
    "chunk_states",
    "column_mass",
    "grad_free",
    "kernel_step",
    "linear_scan",
    "pack_result",
    "prefix_mask",
    "prefix_sum",
    "split_mask",
]


def split_mask(
    q: Tensor,
    k: Tensor,
    mask: MaskLike | list[MaskLike],
    causal: bool,
    *,
    where: str,
) -> tuple[Tensor | None, bool]:
    """Normalise ``mask``/``causal`` for q (B, H, N, D), k (B, H, M, D) -> (key padding (B, M) | None, causal).

    The linear family honours key padding and ``causal`` (self-attention, N == M) only;
    anything else raises :class:`attnlib.UnsupportedError` naming ``where`` and the mask.
    """
    b, h, n, _ = q.shape
    m = k.shape[2]
    am = mask if isinstance(mask, AttentionMask) else None
    if am is None or am.causal != causal:
        am = normalize_mask(mask, causal=causal, batch=b, heads=h, n=n, m=m, device=q.device)
    bad = [kind for kind in am.kinds() if kind not in ("causal", "key_padding")]
    if bad:
        raise UnsupportedError(
            f"{where} supports causal=True and key-padding (B, M) masks only (a linear-time form has no "
            f"N x M matrix to mask); got {', '.join(bad)}"
        )
    if am.causal and n != m:
        raise UnsupportedError(f"{where} supports causal=True only with N == M, got N={n}, M={m}")
    return am.key_padding, am.causal


def kernel_step(
    qf: Tensor, kf: Tensor, v: Tensor, s: Tensor, z: Tensor | None = None, *, decay: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """One token of the causal running sums of feature-mapped attention.

    ``S' = decay·S + kf v^T``, ``z' = decay·z + kf`` (no decay when None), then the query's
    ``num = qf S'`` and ``den = qf·z'``.

    Args:
        qf, kf: (B, H, F) features of the token's query and key; v: (B, H, Dv).
        s: (B, H, F, Dv) state; z: (B, H, F) normaliser state or None (no denominator).
        decay: (B, H) factor on the old state (Performer's running max-shift) or None.

    Returns:
        (num (B, H, Dv), den (B, H, 1) or None, S', z').
    """
    kv = kf[..., :, None] * v[..., None, :]
    s = s + kv if decay is None else s * decay[..., None, None] + kv
    num = (qf[..., :, None] * s).sum(-2)
    if z is None:
        return num, None, s, None
    z = z + kf if decay is None else z * decay[..., None] + kf
    return num, (qf * z).sum(-1, keepdim=True), s, z


def prefix_mask(n: int, device: torch.device) -> Tensor:
    """Lower-triangular (n, n) bool mask (j <= i): :func:`attnlib.masks.causal_mask` with N = M."""
    return causal_mask(n, device=device)


def prefix_sum(x: Tensor, *, reverse: bool = False, block: int = 64) -> Tensor:
    """Inclusive cumulative sum of x (..., T, C) over T (``reverse``: suffix sums).

    ``torch.cumsum`` over a strided dimension is slow on the CPU (about 60 ms for 8M floats on
    two cores); this blocked form (a triangular matmul per block of rows plus a small scan over
    block totals) is several times faster and as accurate.
    """
    t, ch = x.shape[-2], x.shape[-1]
    if t <= block:
        return x.flip(-2).cumsum(-2).flip(-2) if reverse else x.cumsum(-2)
    nb = math.ceil(t / block)
    pad = nb * block - t
    xp = F.pad(x, (0, 0, pad, 0) if reverse else (0, 0, 0, pad)) if pad else x
    xb = xp.reshape(*x.shape[:-2], nb, block, ch)
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril()
    if reverse:
        intra = tri.T @ xb
        tot = intra[..., 0, :]
        after = F.pad(tot[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))  # blocks after each block
        out = (intra + after[..., None, :]).reshape(*x.shape[:-2], nb * block, ch)
        return out[..., pad:, :] if pad else out
    intra = tri @ xb
    tot = intra[..., -1, :]
    before = F.pad(tot[..., :-1, :].cumsum(-2), (0, 0, 1, 0))
    out = (intra + before[..., None, :]).reshape(*x.shape[:-2], nb * block, ch)
    return out[..., :t, :] if pad else out


def _chunks(x: Tensor, c: int) -> Tensor:
    """(B, H, N, F) -> (B, H, nc, c, F), zero-padded at the end."""
    b, h, n, f = x.shape
    nc = math.ceil(n / c)
    if nc * c != n:
        x = F.pad(x, (0, 0, 0, nc * c - n))
    return x.reshape(b, h, nc, c, f)


def causal_chunk_max(s: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Running maximum of per-key log-scales, at chunk granularity.

    Args:
        s: (B, H, N) log-scales (-inf for keys to ignore).
        chunk_size: C.

    Returns:
        shift (B, H, N): for key j in chunk c, ``S_c = max_{j' in chunks <= c} s_j'`` (0 when
        all are -inf), and log_decay (B, H, nc): ``S_{c-1} - S_c`` (0 for c = 0), the log of
        the factor by which the running state of :func:`linear_scan` is rescaled entering c.
    """
    b, h, n = s.shape
    c = min(chunk_size, n)
    nc = math.ceil(n / c)
    sp = F.pad(s, (0, nc * c - n), value=float("-inf")) if nc * c != n else s
    cm = sp.reshape(b, h, nc, c).amax(-1).cummax(-1).values
    cm = torch.where(torch.isfinite(cm), cm, torch.zeros_like(cm))
    log_decay = torch.cat([torch.zeros_like(cm[..., :1]), cm[..., :-1] - cm[..., 1:]], -1)
    shift = cm.repeat_interleave(c, -1)[..., :n]
    return shift, log_decay


def linear_scan(
    qf: Tensor,
    kf: Tensor,
    v: Tensor,
    *,
    causal: bool,
    chunk_size: int = 64,
    log_decay: Tensor | None = None,
    need_den: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``num = A @ v`` and ``den = A @ 1`` for the implicit ``A = qf kf^T`` (lower-triangular if causal).

    Args:
        qf: (B, H, N, F) query features; kf: (B, H, M, F) key features; v: (B, H, M, Dv).
        causal: restrict to j <= i (needs N == M); computed by the chunked parallel form.
        chunk_size: C of the chunked form: intra-chunk (C x C) products plus a running
            (F x Dv) state; time O(N·C·(F + Dv) + N·F·Dv), no N x N tensor.
        log_decay: optional (B, H, nc) log-factors (<= 0) applied to the running state when it
            enters chunk c (see :func:`causal_chunk_max`); None = no decay.
        need_den: also return ``den``.

    Returns:
        (num (B, H, N, Dv), den (B, H, N) or None), in the dtype of the inputs.
    """
    if not causal:
        kv = kf.transpose(-1, -2) @ v  # (B, H, F, Dv)
        num = qf @ kv
        den = (qf @ kf.sum(-2, keepdim=True).transpose(-1, -2)).squeeze(-1) if need_den else None
        return num, den
    b, h, n, _ = qf.shape
    c = max(1, min(int(chunk_size), n))
    qc, kc, vc = _chunks(qf, c), _chunks(kf, c), _chunks(v, c)
    nc = qc.shape[2]
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~prefix_mask(c, qf.device), 0.0)
    num = scores @ vc
    den = scores.sum(-1) if need_den else None
    kv = kc.transpose(-1, -2) @ vc  # (B, H, nc, F, Dv)
    ks = kc.sum(-2) if need_den else None  # (B, H, nc, F)
    if log_decay is None:
        state = F.pad(kv[:, :, :-1].cumsum(2), (0, 0, 0, 0, 1, 0))
        zstate = F.pad(ks[:, :, :-1].cumsum(2), (0, 0, 1, 0)) if ks is not None else None
    else:
        decay = log_decay.exp()
        run = torch.zeros_like(kv[:, :, 0])
        zrun = torch.zeros_like(ks[:, :, 0]) if ks is not None else None
        states, zstates = [], []
        for ci in range(nc):
            d = decay[:, :, ci]
            run = run * d[..., None, None]
            states.append(run)
            run = run + kv[:, :, ci]
            if zrun is not None and ks is not None:
                zrun = zrun * d[..., None]
                zstates.append(zrun)
                zrun = zrun + ks[:, :, ci]
        state = torch.stack(states, 2)
        zstate = torch.stack(zstates, 2) if zstates else None
    num = num + qc @ state
    if den is not None and zstate is not None:
        den = den + (qc @ zstate.unsqueeze(-1)).squeeze(-1)
    num = num.reshape(b, h, nc * c, -1)[:, :, :n]
    if den is not None:
        den = den.reshape(b, h, nc * c)[:, :, :n]
    return num, den


def column_mass(
    r: Tensor,
    kf: Tensor,
    *,
    causal: bool,
    chunk_size: int = 64,
    log_decay: Tensor | None = None,
) -> Tensor:
    """Column sums of the implicit matrix ``r kf^T``: ``mass_j = kf_j · Σ_{i (>= j if causal)} r_i``.

    With ``r_i = qf_i / den_i`` this is the attention mass key j receives, summed over the
    queries, in O(N·F) time and memory.

    Args:
        r: (B, H, N, F) row-scaled query features; kf: (B, H, M, F).
        causal: sum over i >= j only (N == M).
        chunk_size, log_decay: as in :func:`linear_scan` when the key features were
            stabilised per chunk (then key j's features are rescaled by
            ``exp(S_{c(j)} - S_{c(i)})`` for queries i in later chunks).

    Returns:
        (B, H, M).
    """
    if not causal:
        return (kf * r.sum(-2, keepdim=True)).sum(-1)
    if log_decay is None:
        return (kf * prefix_sum(r, reverse=True)).sum(-1)
    b, h, n, _f = r.shape
    c = max(1, min(int(chunk_size), n))
    rc, kc = _chunks(r, c), _chunks(kf, c)
    nc = rc.shape[2]
    intra = rc.flip(-2).cumsum(-2).flip(-2)  # (B, H, nc, c, F)
    totals = rc.sum(-2)  # (B, H, nc, F)
    decay = log_decay.exp()
    tail = torch.zeros_like(totals[:, :, 0])
    tails = [tail]
    for ci in range(nc - 1, 0, -1):
        tail = decay[:, :, ci, None] * (totals[:, :, ci] + tail)
        tails.append(tail)
    tail_all = torch.stack(tails[::-1], 2)  # (B, H, nc, F): mass from chunks after c
    mass = (kc * (intra + tail_all[:, :, :, None, :])).sum(-1)
    return mass.reshape(b, h, nc * c)[:, :, :n]


def pack_result(
    out: Tensor,
    weights: Tensor | None,
    importance: Tensor | None,
    *,
    return_weights: bool,
    return_importance: bool,
) -> Tensor | tuple[Tensor, ...]:
    """``out``, or ``(out, weights?, importance?)`` in that order for the requested extras."""
    if not return_weights and not return_importance:
        return out
    res: list[Tensor] = [out]
    if return_weights:
        assert weights is not None
        res.append(weights)
    if return_importance:
        assert importance is not None
        res.append(importance)
    return tuple(res)


# --------------------------------------------------------------------------------------------
# blocked fast path (outputs only)
# --------------------------------------------------------------------------------------------

FeatureFn = Callable[[Tensor, int], Tensor]  # (x block (B, H, L, D), first position) -> (B, H, L, F)
FinishFn = Callable[[Tensor, Tensor | None, slice, int, int], Tensor]
"""(num (B', H', L, Dv), den (B', H', L) | None, batch rows, start, end) -> the output rows [start, end)
of batch rows ``batch``; may return ``num`` modified in place."""


def grad_free(*ts: Tensor) -> bool:
    """True when no autograd graph is being recorded through ``ts`` (in-place updates are safe)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in ts)


# Target size of a block's temporaries (elements); tests shrink it. Smaller blocks stay in cache
# but cost more (short) parallel regions per call; 2^21 (about 4096 rows at B·H·F = 512) is as
# fast as 2^19 on an idle 2-core machine for linear attention and degrades several times less
# when the cores are oversubscribed (every OpenMP region then waits for a descheduled thread).
BLOCK_ELEMENTS = 1 << 21


def block_rows(b: int, h: int, width: int, chunk: int, n: int) -> int:
    """Rows per block so that a block's temporaries hold about BLOCK_ELEMENTS elements (a multiple of ``chunk``)."""
    rows = max(chunk, BLOCK_ELEMENTS // max(1, b * h * width))
    rows = max(chunk, rows // chunk * chunk)
    return min(rows, max(chunk, math.ceil(n / chunk) * chunk))


def chunk_states(x: Tensor, carry: Tensor, log_decay: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exclusive running states over the chunks of a block, as one triangular matmul.

    With ``state_i = d_i (state_{i-1} + x_{i-1})`` and ``state_0 = d_0 · carry``:
    ``state_i = e^{D_i} carry + Σ_{j<i} e^{D_i - D_j} x_j`` for ``D_i = Σ_{l<=i} log d_l``
    (every exponent <= 0: the decays are <= 1).

    Args:
        x: (B, H, g, ...) per-chunk contributions; carry: (B, H, ...) state entering chunk 0.
        log_decay: (B, H, g) ``log d_i`` (<= 0) or None (no decay).

    Returns:
        (states (B, H, g, ...) entering each chunk, state after the last chunk (B, H, ...)).
    """
    b, h, g = x.shape[:3]
    rest = x.shape[3:]
    xf = x.reshape(b, h, g, -1)
    cf = carry.reshape(b, h, 1, -1)
    lower = torch.ones(g, g, dtype=torch.bool, device=x.device).tril(-1)
    if log_decay is None:
        states = lower.to(x.dtype) @ xf + cf
    else:
        cum = log_decay.cumsum(-1)
        rel = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf"))
        states = torch.exp(rel) @ xf + torch.exp(cum)[..., None] * cf
    after = states[:, :, -1] + xf[:, :, -1]
    return states.reshape(b, h, g, *rest), after.reshape(b, h, *rest)


def slabs(
    b: int, h: int, length: int, width: int, chunk: int, *, split_rows: bool = True
) -> list[tuple[slice, slice, int]]:
    """Work units of the non-causal blocked path: (batch rows, heads, rows per block).

    Each unit's output rows ``out[batch, heads, s:e]`` are contiguous (whole rows of whole
    heads, or a row block of a single head), so the output matmul writes straight into them.
    Units hold about ``BLOCK_ELEMENTS`` elements of width ``width``: several batch rows of all
    heads, or one batch row and a few heads, over the whole length; when one head is larger,
    one head at a time in blocks of rows (a multiple of ``chunk``), or over its whole length
    when ``split_rows`` is False.
    """
    fit = BLOCK_ELEMENTS // max(1, length * width)  # heads of full length per unit
    if not split_rows:
        fit = max(1, fit)
    if fit >= h:
        step = max(1, fit // h)
        return [(slice(b0, min(b, b0 + step)), slice(0, h), length) for b0 in range(0, b, step)]
    if fit >= 1:
        return [(slice(bi, bi + 1), slice(h0, min(h, h0 + fit)), length) for bi in range(b) for h0 in range(0, h, fit)]
    rows = block_rows(1, 1, width, chunk, length)
    return [(slice(bi, bi + 1), slice(hi, hi + 1), rows) for bi in range(b) for hi in range(h)]


def blocked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    qmap: FeatureFn,
    kmap: FeatureFn,
    finish: FinishFn,
    causal: bool,
    chunk_size: int,
    key_valid: Tensor | None = None,
    key_logits: bool = False,
    need_den: bool = True,
    width: int | None = None,
) -> Tensor:
    """``out = finish(A v, A 1)`` for ``A = qmap(Q) kmap(K)^T`` without full-size temporaries.

    Features are computed per block (so no (B, H, N, F) tensor is allocated); non-causal: per
    unit of :func:`slabs` (batch rows x heads x whole length, or row blocks of one head), one
    pass over the keys accumulating ``S = Σ kf^T v``, ``z = Σ kf``, then one over the queries
    with the output matmul written straight into ``out`` (no temporary + copy: on the 2-core
    VM the first touch of memory costs more than the arithmetic); causal: one pass over blocks
    of chunks (intra-chunk C x C products, exclusive chunk states, a running state carried
    across blocks). Used for the output when neither weights nor importance are requested.

    Args:
        q: (B, H, N, D), k: (B, H, M, D), v: (B, H, M, Dv), all in the accumulation dtype.
        qmap, kmap: feature maps of a block ``(x, first position) -> (B, H, L, F)``.
        finish: ``(num (B', H', L, Dv), den (B', H', L) | None, batch rows (slice), start, end)
            -> out rows``; may modify num/den in place (``num`` may already be the output slice).
        causal: j <= i (N == M). chunk_size: C.
        key_valid: (B, M) bool of real keys or None.
        key_logits: kmap returns log-features; they are exponentiated with a running maximum
            (per key block, resp. per chunk when causal) and the state rescaled as it grows.
        need_den: accumulate the denominator.
        width: feature width F (for the block size; default D).

    Returns:
        (B, H, N, Dv).
    """
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    c = max(1, min(int(chunk_size), n))
    rows = block_rows(b, h, max(width or d, dv), c, max(n, m))
    out = q.new_empty(b, h, n, dv)
    inplace = grad_free(q, k, v)

    every = slice(None)

    def keys(s: int, e: int, bsl: slice = every, hsl: slice = every) -> Tensor:
        """Key features of rows s:e (batch rows ``bsl``, heads ``hsl``), padded keys removed."""
        kf = kmap(k[bsl, hsl, s:e], s)
        if key_valid is not None:
            kv_ = key_valid[bsl, None, s:e, None]
            kf = kf.masked_fill(~kv_, float("-inf")) if key_logits else kf * kv_.to(kf.dtype)
        return kf

    if not causal:
        for bsl, hsl, rows_nc in slabs(b, h, max(n, m), max(width or d, dv), c):
            state: Tensor | None = None
            z: Tensor | None = None
            shift: Tensor | None = None
            for s in range(0, m, rows_nc):
                e = min(m, s + rows_nc)
                kf = keys(s, e, bsl, hsl)
                if key_logits:
                    bm = kf.amax((-1, -2)).detach()  # (B', H'); -inf while only padded keys were seen
                    new = bm if shift is None else torch.maximum(shift, bm)
                    use = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
                    if state is not None and shift is not None:
                        f = torch.where(torch.isfinite(shift), torch.exp(shift - use), torch.zeros_like(use))
                        state = state * f[..., None, None]
                        z = z * f[..., None] if z is not None else None
                    shift = new
                    kf = torch.exp(kf - use[..., None, None])
                kvb = kf.transpose(-1, -2) @ v[bsl, hsl, s:e]
                state = kvb if state is None else state + kvb
                if need_den:
                    zb = kf.sum(-2)
                    z = zb if z is None else z + zb
                del kf
            assert state is not None
            for s in range(0, n, rows_nc):
                e = min(n, s + rows_nc)
                qf = qmap(q[bsl, hsl, s:e], s)
                o = out[bsl, hsl, s:e]  # contiguous: whole rows of whole heads, or rows of one head
                if inplace:
                    num = torch.matmul(qf, state, out=o)
                else:
                    num = qf @ state
                den = torch.einsum("...lf,...f->...l", qf, z) if (need_den and z is not None) else None
                res = finish(num, den, bsl, s, e)
                if res is not o:
                    o.copy_(res)
        return out

    f_dim: int | None = None
    state = z = None
    shift = None
    tri = prefix_mask(c, q.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        length = e - s
        g = math.ceil(length / c)
        pad = g * c - length
        qf, kf, vb = qmap(q[:, :, s:e], s), keys(s, e), v[:, :, s:e]
        if pad:
            qf = F.pad(qf, (0, 0, 0, pad))
            kf = F.pad(kf, (0, 0, 0, pad), value=float("-inf") if key_logits else 0.0)
            vb = F.pad(vb, (0, 0, 0, pad))
        f_dim = qf.shape[-1]
        qc = qf.reshape(b, h, g, c, f_dim)
        kc = kf.reshape(b, h, g, c, f_dim)
        vc = vb.reshape(b, h, g, c, dv)
        if state is None:
            state = q.new_zeros(b, h, f_dim, dv)
            z = q.new_zeros(b, h, f_dim)
        log_decay = None
        if key_logits:
            cmax = kc.detach().amax((-1, -2))  # (B, H, g)
            prev = shift if shift is not None else torch.full_like(cmax[..., 0], float("-inf"))
            run = torch.cat([prev[..., None], cmax], -1).cummax(-1).values  # -inf until a real key
            use = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
            # log of the state rescale entering chunk i (where the old max is -inf the state is still zero)
            log_decay = torch.where(torch.isfinite(run[..., :-1]), run[..., :-1] - use[..., 1:], torch.zeros_like(cmax))
            shift = run[..., -1]
            kc = torch.exp(kc - use[..., 1:, None, None])
        scores = qc @ kc.transpose(-1, -2)
        scores = scores.masked_fill_(~tri, 0.0) if inplace else scores.masked_fill(~tri, 0.0)
        num = scores @ vc
        den = scores.sum(-1) if need_den else None
        assert z is not None
        kvc, state = chunk_states(kc.transpose(-1, -2) @ vc, state, log_decay)  # (B, H, g, F, Dv)
        ksc = None
        if need_den:
            ksc, z = chunk_states(kc.sum(-2), z, log_decay)
        if inplace:
            num.view(-1, c, dv).baddbmm_(qc.reshape(-1, c, f_dim), kvc.view(-1, f_dim, dv))
        else:
            num = num + qc @ kvc
        if den is not None and ksc is not None:
            inter = torch.einsum("...lf,...f->...l", qc, ksc)
            den = den.add_(inter) if inplace else den + inter
        num = num.reshape(b, h, g * c, dv)[:, :, :length]
        den = den.reshape(b, h, g * c)[:, :, :length] if den is not None else None
        out[:, :, s:e] = finish(num, den, slice(None), s, e)
    return out
