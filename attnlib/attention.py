"""``attnlib.Attention``: the one drop-in multi-head attention module.

It owns what every variant shares - input projections, heads (with grouped-query attention),
rotary positions, output projection, input validation - and holds one variant *core* chosen
by registry name. Swapping the attention of a model is changing ``variant=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attnlib._config import to_plain_dict
from attnlib._validation import check_index, describe
from attnlib.errors import UnsupportedError
from attnlib.masks import MaskLike, normalize_mask
from attnlib.positional import RotaryEmbedding, RotaryPositions
from attnlib.registry import Capabilities, get_variant
from attnlib.variants.base import AttentionCore, check_supported

__all__ = ["Attention", "AttentionCache", "AttentionExtras", "aux_loss", "build_attention", "decode_mode"]


@dataclass
class AttentionExtras:
    """Extra outputs of :meth:`Attention.forward` with ``return_extras=True``.

    Attributes:
        weights: (B, H, N, M) attention weights, or None where the variant has none (or
            ``need_weights=False``); (B, H, 1, M), one query's row, with ``weights_query``.
        importance: (B, M) attention mass each key receives, averaged over heads and
            queries, or None where the variant cannot compute it.
        aux_loss: scalar auxiliary loss of this call, or None.
    """

    weights: Tensor | None
    importance: Tensor | None
    aux_loss: Tensor | None


_CACHE_MODES = ("recurrent", "kv", "recompute")


def decode_mode(caps: Capabilities) -> str | None:
    """How a causal module with these capabilities decodes incrementally, or None if it cannot.

    * ``"recurrent"`` (``caps.recurrent``): the variant's own ``step`` with an O(1)-size state.
    * ``"kv"`` (``caps.causal_cross``): keys/values are cached and new queries attend to the
      whole cache with a bottom-right aligned causal mask.
    * ``"recompute"`` (``caps.causal`` only): queries, keys and values of every position are
      cached and the causal core runs over the whole prefix; only the new rows are kept. Exact
      for any variant without future leakage, at O(prefix) cost per step.
    """
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
        q: (B, H, capacity, D) query buffer (``recompute`` mode only).
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
            self.state = {
                key: (t.index_select(0, index) if t.dim() > 0 and t.shape[0] == self.batch else t)
                for key, t in self.state.items()
            }
        self.batch = int(index.numel())

    def __repr__(self) -> str:
        return f"AttentionCache(mode={self.mode!r}, batch={self.batch}, length={self.length}, size={self.size})"


def _check_variant_kwargs(variant: str, cls: type[AttentionCore], kwargs: dict[str, Any]) -> None:
    """Unknown options raise a ValueError listing the ones the variant accepts."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if n not in ("self", "num_heads", "head_dim") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"variant {variant!r} got unknown option(s) {unknown}; it accepts: "
            f"{', '.join(accepted) or 'no options'} (plus the Attention arguments)"
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Attention(nn.Module):
    """Multi-head attention over any registered variant.

    Args:
        dim: model width C; must be divisible by ``num_heads``.
        num_heads: query heads H; head size D = dim // num_heads.
        variant: registry name (see :func:`attnlib.available`).
        causal: queries may not attend to later keys (bottom-right aligned when N != M).
        num_kv_heads: key/value heads H_kv for grouped-query attention (divides H; default H).
        qkv_bias: bias in the input projections.
        dropout: attention dropout, on the probabilities where the variant has them
            (``capabilities.attn_dropout``), otherwise on the variant's output; training only.
        rope: rotary position embeddings on q and k (self-attention only).
        rope_base: rotary frequency base.
        **variant_kwargs: passed to the variant's constructor.

    Shapes: ``forward(x (B, N, C), context (B, M, C) | None) -> (B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        variant: str = "softmax",
        *,
        causal: bool = False,
        num_kv_heads: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        rope: bool = False,
        rope_base: float = 10000.0,
        **variant_kwargs: Any,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, num_kv_heads={kv_heads}"
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        cls = get_variant(variant)
        caps = cls.capabilities
        if causal and not caps.causal:
            raise UnsupportedError(
                f"variant {variant!r} does not support causal=True (its capabilities: causal={caps.causal})"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = dim // num_heads
        self.variant = variant
        self.causal = bool(causal)
        self.dropout = float(dropout)
        kv_dim = kv_heads * self.head_dim
        self.in_proj = nn.Linear(dim, dim + 2 * kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        _check_variant_kwargs(variant, cls, variant_kwargs)
        self.core: AttentionCore = cls(num_heads=num_heads, head_dim=self.head_dim, **variant_kwargs)
        self.pending_aux_loss: Tensor | None = None

    @property
    def capabilities(self) -> Capabilities:
        """The variant's capabilities."""
        return self.core.capabilities

    # -- validation ------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, N, dim={self.dim}) tensor, got {describe(x)}")
        b, n, c = x.shape
        if c != self.dim:
            raise ValueError(f"x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        if n == 0 or b == 0:
            raise ValueError(f"x is empty: shape {tuple(x.shape)}; B and N must be > 0")
        w = self.in_proj.weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x has dtype {x.dtype} but the module's parameters are {w.dtype}; convert one of "
                "them (module.to(dtype)) or run under torch.autocast"
            )
        if context is None:
            return
        if not isinstance(context, Tensor) or context.dim() != 3:
            raise ValueError(f"context must be a (B, M, dim={self.dim}) tensor, got {describe(context)}")
        if context.shape[0] != b:
            raise ValueError(f"batch mismatch: x has B={b} but context has B={context.shape[0]}")
        if context.shape[2] != self.dim:
            raise ValueError(f"context must have last dim {self.dim}, got shape {tuple(context.shape)}")
        if context.shape[1] == 0:
            raise ValueError(f"context is empty: shape {tuple(context.shape)}; M must be > 0")
        if context.dtype != x.dtype or context.device != x.device:
            raise ValueError(
                f"x and context must share dtype and device, got x {x.dtype} on {x.device} and "
                f"context {context.dtype} on {context.device}"
            )
        if self.rope is not None:
            raise UnsupportedError(
                "rope=True is for self-attention; cross-attention (context given) has no shared "
                "positions - build the cross-attention module with rope=False"
            )

    # -- forward ---------------------------------------------------------------------------

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections: x (B, N, C), context (B, M, C) -> q (B, H, N, D), k, v (B, H_kv, M, D)."""
        dq, dkv = self.dim, self.num_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.in_proj(x).split([dq, dkv, dkv], -1)
        else:
            w, bias = self.in_proj.weight, self.in_proj.bias
            q = F.linear(x, w[:dq], None if bias is None else bias[:dq])
            k, v = F.linear(context, w[dq:], None if bias is None else bias[dq:]).chunk(2, -1)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(k, "b m (h d) -> b h m d", h=self.num_kv_heads)
        v = rearrange(v, "b m (h d) -> b h m d", h=self.num_kv_heads)
        return q, k, v

    def _project_rotated(
        self, x: Tensor, offset: int = 0, positions: Tensor | RotaryPositions | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention projections with rotary positions applied: x (B, N, C) -> q (B, H, N, D), k, v.

        q and k are rotated together in the token-major layout of the projection's output
        (:meth:`RotaryEmbedding.rotate_tokens`), before the heads are split off; the same values
        as rotating the head-major q and k one by one, several times faster on CPU.
        """
        if self.rope is None:
            return self.project(x)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.in_proj(x)
        qk = self.rope.rotate_tokens(qkv[..., : (hq + hkv) * d].unflatten(-1, (hq + hkv, d)), offset, positions)
        q = rearrange(qk[..., :hq, :], "b n h d -> b h n d")
        k = rearrange(qk[..., hq:, :], "b m h d -> b h m d")
        v = rearrange(qkv[..., (hq + hkv) * d :], "b m (h d) -> b h m d", h=hkv)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: MaskLike | list[MaskLike] = None,
        return_extras: bool = False,
        need_weights: bool = True,
        position_offset: int = 0,
        cache: AttentionCache | None = None,
        positions: Tensor | RotaryPositions | None = None,
        weights_query: int | None = None,
    ) -> Tensor | tuple[Tensor, AttentionExtras]:
        """Attend.

        Args:
            x: (B, N, dim) queries (and keys/values for self-attention).
            context: (B, M, dim) keys/values for cross-attention, or None.
            mask: True = may attend: key padding (B, M), full (B|1, H|1, N, M), a
                :class:`attnlib.masks.SlidingWindow`, a :class:`attnlib.masks.BlockMask`, or
                a list of these. Unsupported masks raise :class:`attnlib.UnsupportedError`.
            return_extras: also return :class:`AttentionExtras` (importance, weights, aux loss).
            need_weights: with ``return_extras``, compute the (B, H, N, M) weights where the
                variant has them (O(N·M) memory); set False when only importance is needed.
            position_offset: rotary position of the first query (for incremental decoding).
            cache: an :class:`AttentionCache` from :meth:`init_cache` for incremental causal
                decoding: x holds the next N tokens, which attend to every token the cache has
                seen plus themselves (causally); the cache is updated in place. ``mask`` may
                then only be key padding over all tokens so far, (B, cache.length + N).
                With ``return_extras`` a ``kv`` cache also reports the importance of every
                cached key for the new queries, (B, cache.size + N).
            positions: (B, N) or (N,) long rotary position of each token (self-attention
                only), e.g. the original positions of the tokens a pruner kept; default
                ``position_offset + arange(N)``. A :class:`attnlib.positional.RotaryPositions`
                shares its gathered rotary tables with every other call given the same object.
            weights_query: with ``return_extras``, report only this query's row of the weights,
                ``extras.weights`` (B, H, 1, M), and no importance - e.g. the class token's row
                (0) that EViT-style pruning ranks by. Variants that can compute one row alone
                (:meth:`AttentionCore.query_weights`; exact softmax) then keep their fast output
                path; the others compute the full weights and the row is taken from them.
                Negative values count from the end; UnsupportedError for a variant without
                weights.

        Returns:
            (B, N, dim), or ((B, N, dim), AttentionExtras) when ``return_extras``.
        """
        if cache is not None:
            if positions is not None:
                raise ValueError("with cache=, positions come from cache.length; do not pass positions")
            if weights_query is not None:
                raise ValueError("weights_query= is not supported with cache= (decoding); pass it without a cache")
            return self._forward_cached(x, cache, mask, context, return_extras, position_offset)
        self._check_inputs(x, context)
        if positions is not None and context is not None:
            raise ValueError("positions= is for self-attention; got a context")
        if positions is not None and self.rope is None:
            raise ValueError(
                "positions= sets rotary positions, but this module has rope=False (build it with rope=True)"
            )
        if self.rope is not None:  # self-attention (a context with rope raised above); positions checked there
            q, k, v = self._project_rotated(x, position_offset, positions)
        else:
            q, k, v = self.project(x, context)
        b, h, n, _ = q.shape
        m = k.shape[2]
        am = normalize_mask(mask, causal=self.causal, batch=b, heads=h, n=n, m=m, device=x.device)
        caps = self.core.capabilities
        if not caps.gqa and self.num_kv_heads != self.num_heads:
            g = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        p = self.dropout if self.training else 0.0
        row: Tensor | None = None
        one_row = return_extras and weights_query is not None
        if one_row:
            query = check_index(weights_query, n, what="weights_query")
            if not caps.has_weights:
                raise UnsupportedError(
                    f"weights_query needs attention weights, but variant {self.variant!r} has none "
                    "(capabilities.has_weights=False)"
                )
            check_supported(self.variant, caps, am, cross=context is not None)
            row = self.core.query_weights(q, k, am, query)
        res = self.core(
            q,
            k,
            v,
            am,
            cross=context is not None,
            need_weights=(one_row and row is None) or (return_extras and need_weights and not one_row),
            need_importance=return_extras and not one_row,
            dropout_p=p if caps.attn_dropout else 0.0,
        )
        if one_row and row is None:
            if res.weights is None:
                raise UnsupportedError(f"weights_query needs attention weights, but variant {self.variant!r} has none")
            row = res.weights[:, :, query : query + 1]
        out = res.out
        if p > 0 and not caps.attn_dropout:
            out = F.dropout(out, p)
        y = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        self.pending_aux_loss = res.aux_loss
        if not return_extras:
            return y
        if one_row:
            return y, AttentionExtras(weights=row, importance=None, aux_loss=res.aux_loss)
        imp = res.importance.mean(1) if res.importance is not None else None
        return y, AttentionExtras(weights=res.weights, importance=imp, aux_loss=res.aux_loss)

    def forward_groups(
        self,
        x: Tensor,
        groups: list[tuple[int, int]] | tuple[tuple[int, int], ...],
        *,
        positions: Tensor | RotaryPositions | None = None,
        return_importance: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Self-attention over a ragged batch packed by length: no padding, no key-padding mask.

        The batch's real tokens are concatenated into ``x`` (T, dim), grouped by sequence length:
        group g holds ``rows_g`` sequences of ``length_g`` tokens each, stored contiguously and
        row-major (sequence r of the group at offset + r * length_g), groups one after another, so
        ``T = sum_g rows_g * length_g``. The projections run once over all T tokens; the variant's
        core runs once per group on an unpadded (rows_g, H, length_g, D) batch. Each sequence
        therefore gets exactly what :meth:`forward` gives it alone - unlike a padded batch, where
        a variant that reduces over queries (``importance``) or a pruner downstream sees padding.
        :func:`attnlib.models.ragged.group_by_length` builds the layout from a padded batch.

        Args:
            x: (T, dim) packed tokens.
            groups: ``[(rows_g, length_g), ...]`` with rows_g >= 0, length_g >= 0 (empty groups skipped).
            positions: (T,) long rotary position of each token (``rope=True``), default
                ``arange(length_g)`` in every sequence; or a ``RotaryPositions`` (shared tables).
            return_importance: also return the importance (T,) of each token as a key (attention
                mass received, averaged over heads and the queries of its sequence), None where
                the variant has none.

        Returns:
            (T, dim), or ((T, dim), importance (T,) | None) with ``return_importance``.
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"forward_groups: x must be (T, dim={self.dim}) packed tokens, got {describe(x)}")
        self._check_inputs(x[None] if x.shape[0] else x.new_zeros(1, 1, self.dim), None)
        try:
            sizes = [(int(r), int(n)) for r, n in groups]
        except (TypeError, ValueError):
            raise ValueError(
                f"forward_groups: groups must be a list of (rows, length) int pairs, got {groups!r}"
            ) from None
        if any(r < 0 or n < 0 for r, n in sizes) or sum(r * n for r, n in sizes) != x.shape[0]:
            raise ValueError(
                f"forward_groups: groups {sizes} (rows, length >= 0) must cover the T={x.shape[0]} tokens of x "
                f"exactly (sum of rows * length = {sum(r * n for r, n in sizes)})"
            )
        if positions is not None and self.rope is None:
            raise ValueError("forward_groups: positions= sets rotary positions, but this module has rope=False")
        if positions is not None and (positions.dim() != 1 or positions.shape[0] != x.shape[0]):
            raise ValueError(f"forward_groups: positions must be (T,) = ({x.shape[0]},), got {describe(positions)}")
        dq, dkv = self.dim, self.num_kv_heads * self.head_dim
        qkv = self.in_proj(x)
        if self.rope is not None:  # all T tokens at once, token-major (see _project_rotated)
            if positions is None:
                positions = torch.cat(
                    [torch.arange(n, device=x.device).repeat(r) for r, n in sizes] or [x.new_zeros(0, dtype=torch.long)]
                )
            hd = self.num_heads + self.num_kv_heads
            qk = self.rope.rotate_tokens(qkv[:, : dq + dkv].unflatten(-1, (hd, self.head_dim)), 0, positions)
        else:
            qk = qkv[:, : dq + dkv].unflatten(-1, (self.num_heads + self.num_kv_heads, self.head_dim))
        vv = qkv[:, dq + dkv :].unflatten(-1, (self.num_kv_heads, self.head_dim))
        hq = self.num_heads
        caps = self.core.capabilities
        p = self.dropout if self.training else 0.0
        merged: Tensor | None = None  # (T, H * Dv): each group's output copied in once (no cat)
        imps: list[Tensor] = []
        has_imp = return_importance
        aux: Tensor | None = None
        start = 0
        for r, n in sizes:
            t = r * n
            if t == 0:
                continue
            # plain views, not einops: this loop runs once per distinct length (dozens per batch)
            # and einops' per-call overhead (~10 us each) was a measurable share of a pruned ViT block
            part = qk[start : start + t].view(r, n, -1, self.head_dim)
            q, k = part[:, :, :hq].transpose(1, 2), part[:, :, hq:].transpose(1, 2)
            v = vv[start : start + t].view(r, n, -1, self.head_dim).transpose(1, 2)
            if not caps.gqa and self.num_kv_heads != self.num_heads:
                g = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            am = normalize_mask(None, causal=self.causal, batch=r, heads=self.num_heads, n=n, m=n, device=x.device)
            res = self.core(
                q,
                k,
                v,
                am,
                cross=False,
                need_weights=False,
                need_importance=return_importance,
                dropout_p=p if caps.attn_dropout else 0.0,
            )
            out = res.out
            if p > 0 and not caps.attn_dropout:
                out = F.dropout(out, p)
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
        if merged is not None:
            y = self.out_proj(merged)
        else:
            y = self.out_proj(x.new_zeros(0, self.dim))
        self.pending_aux_loss = None if aux is None else aux / max(x.shape[0], 1)  # token-weighted mean
        if not return_importance:
            return y
        if not has_imp:
            return y, None
        return y, (torch.cat(imps) if imps else x.new_zeros(0))

    # -- incremental decoding ----------------------------------------------------------------

    def init_cache(self, batch: int, *, mode: str | None = None) -> AttentionCache:
        """An empty decoding cache for ``batch`` sequences (pass it as ``forward(x, cache=...)``).

        ``mode`` defaults to :func:`decode_mode` of the variant's capabilities: the variant's
        recurrent ``step`` where it has one, else a key/value cache where it supports causal
        attention with N != M, else recomputation over the cached prefix. Raises ValueError for
        a non-causal module and :class:`attnlib.UnsupportedError` when the variant cannot decode.
        """
        _positive_int("batch", batch)
        if not self.causal:
            raise ValueError(
                f"init_cache needs a causal Attention (build it with causal=True); this {self.variant!r} module is not"
            )
        caps = self.core.capabilities
        default = decode_mode(caps)
        mode = default if mode is None else mode
        if mode not in _CACHE_MODES:
            raise ValueError(f"cache mode must be one of {_CACHE_MODES} or None, got {mode!r}")
        if mode == "recurrent" and not caps.recurrent:
            raise UnsupportedError(f"variant {self.variant!r} has no recurrent step (capabilities.recurrent=False)")
        if mode == "kv" and not caps.causal_cross:
            raise UnsupportedError(
                f"variant {self.variant!r} cannot attend from new queries to a longer key cache "
                "(capabilities.causal_cross=False); use mode='recompute'"
            )
        cache = AttentionCache(mode, batch)
        if mode == "recurrent":
            w = self.in_proj.weight
            cache.state = self.core.initial_state(batch, dtype=w.dtype, device=w.device)
        return cache

    def _forward_cached(
        self,
        x: Tensor,
        cache: AttentionCache,
        mask: MaskLike | list[MaskLike],
        context: Tensor | None,
        return_extras: bool,
        position_offset: int,
    ) -> Tensor | tuple[Tensor, AttentionExtras]:
        """Incremental causal decoding of x (B, N, dim) after the cache's tokens -> (B, N, dim)."""
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
        self._check_inputs(x, None)
        b, n = x.shape[0], x.shape[1]
        if b != cache.batch:
            raise ValueError(f"batch mismatch: x has B={b} but the cache was made for B={cache.batch}")
        start = cache.length
        fill = cache.size
        q, k, v = self._project_rotated(x, start)
        caps = self.core.capabilities
        g = self.num_heads // self.num_kv_heads
        p = self.dropout if self.training else 0.0
        if cache.mode == "recurrent":
            if mask is not None:
                raise UnsupportedError(
                    f"variant {self.variant!r} decodes with its recurrent step, which takes no mask; "
                    "decode sequences without padding (or use init_cache(mode='recompute'))"
                )
            if g > 1:
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            state = cache.state
            if state is None:
                raise ValueError("recurrent cache has no state; make caches with Attention.init_cache()")
            outs = []
            for t in range(n):
                o, state = self.core.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
                outs.append(o)
            cache.state = state
            out = torch.cat(outs, 2) if n > 1 else outs[0]
            self.pending_aux_loss = None
            res = None
        else:
            total = fill + n
            if cache.size != cache.length and mask is not None:
                raise ValueError(
                    "this cache has evicted entries; a key-padding mask over all tokens so far no longer "
                    "lines up with it - decode without mask= after eviction"
                )
            cache.k = cache._append(cache.k, k, fill)
            cache.v = cache._append(cache.v, v, fill)
            kk, vv = cache.k[:, :, :total], cache.v[:, :, :total]
            if cache.mode == "recompute":
                cache.q = cache._append(cache.q, q, start)
                q = cache.q[:, :, :total]
            am = normalize_mask(
                mask, causal=True, batch=b, heads=self.num_heads, n=q.shape[2], m=total, device=x.device
            )
            if am.full is not None or am.window is not None or am.block is not None:
                raise ValueError("with cache=, mask may only be key padding (B, cache.length + N)")
            if cache.valid is not None:
                held = torch.cat([cache.valid, cache.valid.new_ones(b, n)], 1)
                am = normalize_mask(
                    held, causal=True, batch=b, heads=self.num_heads, n=q.shape[2], m=total, device=x.device
                )
            if not caps.gqa and g > 1:
                kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
            res = self.core(q, kk, vv, am, need_importance=return_extras, dropout_p=p if caps.attn_dropout else 0.0)
            out = res.out[:, :, -n:]
            self.pending_aux_loss = res.aux_loss
            if cache.valid is not None:
                cache.valid = torch.cat([cache.valid, cache.valid.new_ones(b, n)], 1)
        cache.length = start + n
        cache.size = fill + n
        if p > 0 and not caps.attn_dropout:
            out = F.dropout(out, p)
        y = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        if not return_extras:
            return y
        imp = res.importance.mean(1) if res is not None and res.importance is not None else None
        return y, AttentionExtras(weights=None, importance=imp, aux_loss=None if res is None else res.aux_loss)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"variant={self.variant!r}, causal={self.causal}"
        )


def aux_loss(model: nn.Module, *, clear: bool = True) -> Tensor:
    """Sum of the pending auxiliary losses of every module in ``model`` (0 if none).

    Each :class:`Attention` keeps the auxiliary loss of its most recent forward in
    ``pending_aux_loss``; any other module exposing that attribute is included too.
    With ``clear`` (default) the pending losses are reset after reading.
    Returns a scalar tensor.
    """
    total: Tensor | None = None
    for mod in model.modules():
        val = getattr(mod, "pending_aux_loss", None)
        if val is not None:
            total = val if total is None else total + val
            if clear:
                mod.pending_aux_loss = None
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def build_attention(cfg: Mapping[str, Any] | Any = None, /, **overrides: Any) -> Attention:
    """Build an :class:`Attention` from a dict / OmegaConf DictConfig (plus keyword overrides).

    Keys: ``dim``, ``num_heads``, ``variant`` (or ``name``) and any :class:`Attention` or
    variant keyword. Example: ``build_attention({"variant": "local", "window": 32}, dim=256,
    num_heads=4)``.
    """
    if cfg is None:
        data: dict[str, Any] = {}
    else:
        data = to_plain_dict(cfg, what="build_attention config")
    data.update(overrides)
    if "name" in data:
        if "variant" in data and data["variant"] != data["name"]:
            raise ValueError(f"config gives both name={data['name']!r} and variant={data['variant']!r}")
        data["variant"] = data.pop("name")
    missing = [k for k in ("dim", "num_heads") if k not in data]
    if missing:
        raise ValueError(f"build_attention: missing required key(s) {missing}; got keys {sorted(data)}")
    dim, heads = data.pop("dim"), data.pop("num_heads")
    return Attention(dim, heads, **data)
