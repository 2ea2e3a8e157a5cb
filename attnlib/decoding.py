"""Incremental causal decoding for :class:`attnlib.Attention`: caches, decode modes, the cached forward.

:meth:`attnlib.Attention.init_cache` makes an :class:`AttentionCache`;
``Attention.forward(x, cache=...)`` feeds the next tokens through :func:`forward_cached`. How a
module decodes follows from its variant's capabilities (:func:`decode_mode`): the variant's
recurrent ``step``, a key/value cache, or recomputation over the cached prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnlib._validation import check_qkv, describe
from attnlib.errors import UnsupportedError
from attnlib.functional._common import repeat_kv
from attnlib.masks import AttentionMask, MaskLike, normalize_mask
from attnlib.positional import RotaryCall, RotaryPositions
from attnlib.registry import Capabilities

if TYPE_CHECKING:  # pragma: no cover
    from attnlib.attention import Attention, AttentionExtras
    from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = [
    "AttentionCache",
    "attend_new_queries",
    "decode_mode",
    "forward_cached",
    "init_cache",
    "kv_decode_exact",
    "select_state_rows",
    "step_tokens",
]

_CACHE_MODES = ("recurrent", "kv", "recompute")


def decode_mode(caps: Capabilities) -> str | None:
    """How a causal module with these capabilities decodes incrementally, or None if it cannot.

    * ``"recurrent"`` (``caps.recurrent``): the variant's own ``step`` with an O(1)-size state.
    * ``"kv"`` (``caps.causal_cross``): keys/values are cached and new queries attend to the
      whole cache with a bottom-right aligned causal mask.
    * ``"recompute"`` (``caps.causal`` only): queries, keys and values of every position are
      cached and the causal core runs over the whole prefix; only the new rows are kept. Exact
      for any variant whose causal rows do not depend on the total length
      (``caps.decode``), at O(prefix) cost per step.

    None when ``caps.decode`` is False (a causal row depends on the total length N).
    """
    if not caps.decode:
        return None
    if caps.recurrent:
        return "recurrent"
    if caps.causal_cross:
        return "kv"
    if caps.causal:
        return "recompute"
    return None


class AttentionCache:
    """Incremental-decoding state of one :class:`Attention` (see :meth:`Attention.init_cache`).

    Attributes:
        mode: ``"recurrent"``, ``"kv"`` or ``"recompute"`` (see :func:`decode_mode`).
        length: tokens consumed so far (the rotary position of the next token).
        size: entries held in the key/value buffers; equals ``length`` unless entries were
            evicted with :meth:`evict` (KV-cache eviction, :mod:`attnlib.pruning`).
        valid: (B, size) bool, which held entries are real (after an eviction that kept
            different counts per sequence), or None when all are.
        k, v: (B, H_kv, capacity, D) key/value buffers (``kv`` and ``recompute`` modes; the first
            ``size`` entries are valid), rotary positions already applied.
        q: (B, H, capacity, D) query buffer (``recompute`` mode only); for a core that computes
            from tokens (``projects_tokens``) the input tokens instead, (B, 1, capacity, C).
        state: the variant's recurrent state (``recurrent`` mode only).
    """

    def __init__(self, mode: str, batch: int) -> None:
        if mode not in _CACHE_MODES:
            raise ValueError(f"cache mode must be one of {_CACHE_MODES}, got {mode!r}")
        self.mode = mode
        self.batch = batch
        self.length = 0
        self.size = 0
        self.valid: Tensor | None = None
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.q: Tensor | None = None
        self.state: dict[str, Tensor] | None = None

    @staticmethod
    def _append(buf: Tensor | None, new: Tensor, length: int) -> Tensor:
        """Write new (B, H, n, D) at positions length..length+n of buf, growing it by doubling."""
        need = length + new.shape[2]
        if buf is None or buf.shape[2] < need:
            cap = max(16, 1 << (need - 1).bit_length())
            grown = new.new_zeros(new.shape[0], new.shape[1], cap, new.shape[3])
            if buf is not None and length:
                grown[:, :, :length] = buf[:, :, :length]
            buf = grown
        buf[:, :, length:need] = new
        return buf

    def evict(self, index: Tensor, valid: Tensor | None = None) -> None:
        """Keep only the cached entries ``index`` (B, K) long (ascending per row) - KV-cache eviction.

        ``valid`` (B, K) bool marks padding entries (rows that keep fewer than K); they are
        masked out of every later attention. Only ``kv`` caches can evict (a ``recompute``
        cache re-runs queries over the prefix and a recurrent state has no entries). The
        rotary position of the next token (``length``) is unchanged: cached keys are stored
        already rotated, so evicting them is safe.
        """
        if self.mode != "kv":
            raise ValueError(f"only a 'kv' cache can evict entries, this cache is {self.mode!r}")
        if index.dim() != 2 or index.shape[0] != self.batch or index.dtype != torch.long:
            raise ValueError(f"index must be (B={self.batch}, K) long, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(f"index entries must lie in [0, size={self.size})")
        if valid is not None and tuple(valid.shape) != tuple(index.shape):
            raise ValueError(f"valid must match index {tuple(index.shape)}, got {tuple(valid.shape)}")
        k_new = index.shape[1]
        for name in ("k", "v"):
            buf = getattr(self, name)
            if buf is None:
                continue
            idx = index[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            kept = buf[:, :, : self.size].gather(2, idx)
            buf[:, :, :k_new] = kept
        old = self.valid
        if old is not None:
            keep_valid = old.gather(1, index)
            valid = keep_valid if valid is None else valid & keep_valid
        self.valid = None if valid is None or bool(valid.all()) else valid
        self.size = k_new

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch entries in place (beam search): index (B',) long."""
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
        for name in ("k", "v", "q"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        if self.state is not None:
            self.state = select_state_rows(self.state, index, self.batch)
        self.batch = int(index.numel())

    def __repr__(self) -> str:
        return f"AttentionCache(mode={self.mode!r}, batch={self.batch}, length={self.length}, size={self.size})"


def init_cache(attn: Attention, batch: int, mode: str | None) -> AttentionCache:
    """An empty cache for ``batch`` sequences of ``attn`` (see :meth:`Attention.init_cache`)."""
    if not attn.causal:
        raise ValueError(
            f"init_cache needs a causal Attention (build it with causal=True); this {attn.variant!r} module is not"
        )
    caps = attn.core.capabilities
    attn.core.check_decoding()
    mode = decode_mode(caps) if mode is None else mode
    if mode not in _CACHE_MODES:
        raise ValueError(f"cache mode must be one of {_CACHE_MODES} or None, got {mode!r}")
    if mode == "recurrent" and not caps.recurrent:
        raise UnsupportedError(f"variant {attn.variant!r} has no recurrent step (capabilities.recurrent=False)")
    if mode == "kv" and not caps.causal_cross:
        raise UnsupportedError(
            f"variant {attn.variant!r} cannot attend from new queries to a longer key cache "
            "(capabilities.causal_cross=False); use mode='recompute'"
        )
    cache = AttentionCache(mode, batch)
    if mode == "recurrent":
        w = attn.in_proj.weight
        cache.state = attn.core.initial_state(batch, dtype=w.dtype, device=w.device)
    return cache


def _check_call(
    cache: object,
    context: Tensor | None,
    return_extras: bool,
    position_offset: int,
    positions: Tensor | RotaryPositions | None,
    weights_query: int | None,
) -> AttentionCache:
    """The ``forward`` arguments that do not go with ``cache=`` raise ValueError."""
    if positions is not None:
        raise ValueError("with cache=, positions come from cache.length; do not pass positions")
    if weights_query is not None:
        raise ValueError("weights_query= is not supported with cache= (decoding); pass it without a cache")
    if not isinstance(cache, AttentionCache):
        raise ValueError(f"cache must be an AttentionCache from init_cache(), got {describe(cache)}")
    if context is not None:
        raise ValueError("cache= is for causal self-attention decoding; context must be None")
    if return_extras and cache.mode != "kv":
        raise ValueError(
            f"return_extras is not available with a {cache.mode!r} cache (only with a 'kv' cache); "
            "call forward without a cache for extras"
        )
    if position_offset:
        raise ValueError("with cache=, positions come from cache.length; do not pass position_offset")
    return cache


def select_state_rows(state: dict[str, Tensor], index: Tensor, batch: int) -> dict[str, Tensor]:
    """The recurrent state of the sequences ``index`` (B',) long of a batch of ``batch`` (beam search's
    reorder, a batch selection or repetition). A state entry is either batch-first (B, ...) and is
    indexed, or shared by the whole batch (a 0-dim step counter, ...) and is kept."""
    return {
        key: (t.index_select(0, index) if t.dim() > 0 and t.shape[0] == batch else t) for key, t in state.items()
    }


def step_tokens(
    core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor]
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The core's recurrent ``step`` over N tokens, one at a time: q (B, H, N, D), k (B, H_kv, N, D),
    v (B, H_kv, N, Dv) and the state after the earlier tokens -> (out (B, H, N, Dv) or None when
    N = 0, the state after these tokens). Key/value heads are repeated to the query heads (a
    recurrent step takes one per query head)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = repeat_kv(k, g), repeat_kv(v, g)
    outs = []
    for t in range(q.shape[2]):
        o, state = core.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(o)
    if not outs:
        return None, state
    return (torch.cat(outs, 2) if len(outs) > 1 else outs[0]), state


def _step_recurrent(attn: Attention, q: Tensor, k: Tensor, v: Tensor, cache: AttentionCache) -> Tensor:
    """The variant's recurrent ``step`` over the N new tokens, one at a time -> (B, H, N, Dv)."""
    if cache.state is None:
        raise ValueError("recurrent cache has no state; make caches with Attention.init_cache()")
    out, cache.state = step_tokens(attn.core, q, k, v, cache.state)
    assert out is not None
    return out


def _cache_mask(
    attn: Attention,
    mask: MaskLike | list[MaskLike],
    key_padding_mask: Tensor | None,
    b: int,
    n_q: int,
    total: int,
    device: torch.device,
) -> AttentionMask:
    """The causal mask of a cached call, n_q queries over ``total`` keys, with key padding (B, total)
    - the only mask a cached call takes (ValueError for any other)."""
    size = {"batch": b, "heads": attn.num_heads, "n": n_q, "m": total, "device": device}
    am = normalize_mask(mask, causal=True, key_padding_mask=key_padding_mask, **size)
    other = [kind for kind in am.kinds() if kind not in ("causal", "key_padding")]
    if other:
        raise ValueError(
            "with cache=, the only mask is key padding over every token so far: key_padding_mask= "
            f"(B, cache.length + N) = ({b}, {total}); got {', '.join(other)}"
        )
    return am


def _window_rows(
    attn: Attention, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, n: int
) -> tuple[Tensor, Tensor, Tensor, AttentionMask]:
    """A ``recompute`` call of a core with a :meth:`AttentionCore.causal_reach` r (``local``): the N new
    rows read only the last N + r positions, so q, k, v (all M positions) and the causal mask shrink
    to them, O((N + r) · r) per call whatever M. Unchanged where the core reads the whole prefix or
    a modifier edits the scores (a score edit may read absolute positions)."""
    reach = attn.core.causal_reach()
    total = k.shape[2]
    if reach is None or total <= n + reach or attn.modifiers.changes_attention(attn.training):
        kp = key_padding_mask
        lo = 0
    else:
        lo = total - n - reach
        q, k, v = q[:, :, lo:], k[:, :, lo:], v[:, :, lo:]
        kp = None if key_padding_mask is None else key_padding_mask[:, lo:]
    return q, k, v, _cache_mask(attn, None, kp, q.shape[0], total - lo, total - lo, q.device)


def _forward_tokens_cached(
    attn: Attention,
    x: Tensor,
    cache: AttentionCache,
    mask: MaskLike | list[MaskLike],
    key_padding_mask: Tensor | None,
    return_extras: bool,
) -> Tensor:
    """Recompute decoding of a ``projects_tokens`` core: its input tokens are cached and the core
    runs over the whole prefix (causal), keeping the new rows."""
    if return_extras:
        raise ValueError(f"return_extras is not available with a {cache.mode!r} cache; call forward without a cache")
    b, n = x.shape[0], x.shape[1]
    start = cache.length
    total = start + n
    cache.q = cache._append(cache.q, x[:, None], start)  # the tokens, (B, 1, length, C)
    am = _cache_mask(attn, mask, key_padding_mask, b, total, total, x.device)
    pos = torch.arange(total, device=x.device)
    rotary = None if attn.rope is None else RotaryCall(attn.rope.base, pos, pos)
    y, res = attn.run_tokens(cache.q[:, 0, :total], am, rotary, need_weights=False, need_importance=False)
    attn.pending_aux_loss = res.aux_loss
    cache.length = cache.size = total
    return y[:, -n:]


def forward_cached(
    attn: Attention,
    x: Tensor,
    cache: AttentionCache,
    mask: MaskLike | list[MaskLike],
    key_padding_mask: Tensor | None,
    context: Tensor | None,
    return_extras: bool,
    position_offset: int,
    positions: Tensor | RotaryPositions | None,
    weights_query: int | None,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, AttentionExtras]:
    """Incremental causal decoding of x (B, N, dim) after the cache's tokens -> (B, N, dim).

    With ``return_extras`` and ``need_weights`` (``kv`` caches) the extras hold the new queries'
    weights over every held entry, (B, H, N, cache.size + N).

    ``Attention.forward(x, cache=cache, ...)``: the arguments are :meth:`Attention.forward`'s.
    """
    cache = _check_call(cache, context, return_extras, position_offset, positions, weights_query)
    attn._check_inputs(x, None)
    b, n = x.shape[0], x.shape[1]
    if b != cache.batch:
        raise ValueError(f"batch mismatch: x has B={b} but the cache was made for B={cache.batch}")
    start = cache.length
    fill = cache.size
    if attn.core.projects_tokens and cache.mode == "recompute":
        return _forward_tokens_cached(attn, x, cache, mask, key_padding_mask, return_extras)
    q, k, v = attn._project_rotated(x, start)
    if cache.mode == "recurrent":
        if mask is not None or key_padding_mask is not None:
            raise UnsupportedError(
                f"variant {attn.variant!r} decodes with its recurrent step, which takes no mask; "
                "decode sequences without padding (or use init_cache(mode='recompute'))"
            )
        if attn.modifiers.changes_attention(attn.training):
            raise UnsupportedError(
                f"modifiers {attn.modifiers.names()} do not act inside variant {attn.variant!r}'s recurrent "
                "step; decode with init_cache(mode='recompute')"
            )
        out = _step_recurrent(attn, q, k, v, cache)
        attn.pending_aux_loss = None
        res = None
    else:
        total = fill + n
        if cache.size != cache.length and (mask is not None or key_padding_mask is not None):
            raise ValueError(
                "this cache has evicted entries; a key-padding mask over all tokens so far no longer "
                "lines up with it - decode without key_padding_mask= after eviction"
            )
        n_q = total if cache.mode == "recompute" else n
        am = _cache_mask(attn, mask, key_padding_mask, b, n_q, total, x.device)
        if cache.valid is not None:
            held = torch.cat([cache.valid, cache.valid.new_ones(b, n)], 1)
            am = _cache_mask(attn, None, held, b, n_q, total, x.device)
        cache.k = cache._append(cache.k, k, fill)
        cache.v = cache._append(cache.v, v, fill)
        kk, vv = cache.k[:, :, :total], cache.v[:, :, :total]
        if cache.mode == "recompute":
            cache.q = cache._append(cache.q, q, start)
            q = cache.q[:, :, :total]
        rotary = None
        if attn.rope is not None and attn.core.uses_rotary:
            if cache.size != cache.length:
                raise UnsupportedError(
                    f"variant {attn.variant!r} reads the rotary positions of its keys, which an evicted "
                    "cache no longer knows; decode it without eviction"
                )
            kpos = torch.arange(total, device=x.device)
            rotary = RotaryCall(attn.rope.base, kpos[-q.shape[2] :], kpos)
        if cache.mode == "recompute" and mask is None and rotary is None and attn.core.causal_reach() is not None:
            q, kk, vv, am = _window_rows(attn, q, kk, vv, key_padding_mask, n)
        kr, vr = attn._repeat_kv(kk, vv)
        res = attn._attend(q, kr, vr, am, rotary=rotary, need_importance=return_extras)
        if return_extras and need_weights:  # a second call: the output keeps the variant's fast path, bit for bit
            res.weights = attn._attend(q, kr, vr, am, rotary=rotary, need_weights=True).weights
        out = res.out[:, :, -n:]
        attn.pending_aux_loss = res.aux_loss
        if cache.valid is not None:
            cache.valid = torch.cat([cache.valid, cache.valid.new_ones(b, n)], 1)
    cache.length = start + n
    cache.size = fill + n
    y = attn._project_out(out)
    if not return_extras:
        return y
    weights = None if res is None or res.weights is None else res.weights[:, :, -n:]
    return y, attn._extras(res, weights=weights)


def kv_decode_exact(core: AttentionCore) -> bool:
    """Whether ``core`` attending from N new queries to M >= N cached keys (causal, bottom-right
    aligned) gives exactly the last N rows of its causal forward over all M positions.

    True for a variant with ``causal_cross`` that decodes (``capabilities.decode`` and no
    :meth:`AttentionCore.decoding_error`): ``causal_cross`` promises exactly these rows (a pattern
    laid out over positions, like block_sparse's, is placed at the queries' positions M - N + i),
    and the decoding conformance suite checks it for every such variant. The others decode
    exactly by recomputing over the prefix.
    """
    return core.capabilities.causal_cross and core.decoding_error() is None


def attend_new_queries(
    core: AttentionCore,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    prefix_queries: Tensor | None = None,
    need_weights: bool = False,
    dropout_p: float = 0.0,
) -> CoreOutput:
    """Causal attention of the last N positions of a sequence to its M keys/values held elsewhere
    (e.g. a framework's key/value cache): q (B, H, N, D), k, v (B, H_kv, M, D) with M >= N.

    Where :func:`kv_decode_exact` holds (or a core with ``capabilities.causal_cross`` gets no
    ``prefix_queries``), the new queries attend directly (bottom-right aligned causal mask, the
    ``"kv"`` decode mode). Otherwise the core needs the queries of the M - N earlier positions,
    ``prefix_queries`` (B, H, M - N, D): it runs over the whole prefix and keeps the new rows (the
    ``"recompute"`` mode), which equals recomputing the sequence from scratch. A core with a
    :meth:`AttentionCore.causal_reach` r (``local``) given no ``prefix_queries`` needs neither: its
    new rows read only the last N + r keys, over which it runs alone (placeholder queries for the
    earlier positions, whose rows are dropped), O((N + r) · r) whatever M (not with
    ``need_weights``, which are over all M keys).
    ``key_padding_mask`` (B, M): True = real key. Key/value heads are repeated for a core without
    grouped-query support. Returns the core's :class:`CoreOutput` for the N new rows.
    """
    check_qkv(q, k, v, where="attend_new_queries")
    caps = core.capabilities
    b, h, n, _ = q.shape
    m = k.shape[2]
    if not caps.causal:
        raise UnsupportedError(f"variant {core.name!r} does not support causal=True")
    if m < n:
        raise ValueError(f"attend_new_queries needs at least as many keys as queries, got N={n}, M={m}")
    if m > n:
        core.check_decoding()
    direct = kv_decode_exact(core) or (caps.causal_cross and prefix_queries is None)
    reach = None if direct or n == m or need_weights or prefix_queries is not None else core.causal_reach()
    if reach is not None:  # only the last n + reach keys matter; placeholder queries before the new ones
        m = min(m, n + reach)
        k, v = k[:, :, -m:], v[:, :, -m:]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, -m:]
        prefix_queries = q.new_zeros(b, h, m - n, q.shape[3])
    if n != m and not direct:
        if prefix_queries is None or tuple(prefix_queries.shape) != (b, h, m - n, q.shape[3]):
            raise UnsupportedError(
                f"variant {core.name!r} does not attend from N={n} new queries to M={m} cached keys "
                "exactly (attnlib.decoding.kv_decode_exact): it recomputes over the prefix and needs the queries of "
                f"the {m - n} earlier positions, prefix_queries (B, H, M - N, D) = ({b}, {h}, {m - n}, "
                f"{q.shape[3]}); got {describe(prefix_queries)}"
            )
        q = torch.cat([prefix_queries.to(q.dtype), q], 2)
    if not caps.gqa and k.shape[1] != h:
        k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // k.shape[1])
    am = normalize_mask(
        None, causal=True, batch=b, heads=h, n=q.shape[2], m=m, device=q.device, key_padding_mask=key_padding_mask
    )
    res = core(q, k, v, am, need_weights=need_weights, dropout_p=dropout_p)
    if q.shape[2] != n:
        res.out = res.out[:, :, -n:]
        res.weights = None if res.weights is None else res.weights[:, :, -n:]
        res.importance = None
    return res
