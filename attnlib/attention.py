"""``attnlib.Attention``: the one drop-in multi-head attention module.

It owns what every variant shares - input projections, heads (with grouped-query attention),
rotary positions, output projection, input validation - and holds one variant *core* chosen
by registry name. Swapping the attention of a model is changing ``variant=``. Incremental
decoding lives in :mod:`attnlib.decoding` and packed ragged batches in :mod:`attnlib.packed`;
the methods here delegate to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attnlib import decoding, packed
from attnlib._config import to_plain_dict
from attnlib._validation import check_index, describe, non_negative_int, positive_int
from attnlib.decoding import AttentionCache, decode_mode
from attnlib.errors import UnsupportedError
from attnlib.functional.gta import Geometry, gta_output, gta_transform
from attnlib.masks import AttentionMask, MaskLike, normalize_mask
from attnlib.positional import RotaryCall, RotaryEmbedding, RotaryPositions
from attnlib.registry import Capabilities, get_variant
from attnlib.variants._build import check_variant_kwargs
from attnlib.variants.base import AttentionCore, CoreOutput, check_supported

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
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else positive_int(num_kv_heads, "num_kv_heads")
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
        check_variant_kwargs(variant, cls, variant_kwargs)
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

    def _project_tokens(
        self, x: Tensor, offset: int = 0, positions: Tensor | RotaryPositions | None = None
    ) -> tuple[Tensor, Tensor]:
        """Self-attention projections, token-major: x (..., C) -> qk (..., H + H_kv, D), v (..., H_kv, D).

        With ``rope``, q and k are rotated together in this layout (:meth:`RotaryEmbedding.rotate_tokens`),
        before the heads are split off; the same values as rotating the head-major q and k one by
        one, several times faster on CPU.
        """
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.in_proj(x)
        qk = qkv[..., : (hq + hkv) * d].unflatten(-1, (hq + hkv, d))
        if self.rope is not None:
            qk = self.rope.rotate_tokens(qk, offset, positions)
        return qk, qkv[..., (hq + hkv) * d :].unflatten(-1, (hkv, d))

    def _project_rotated(
        self, x: Tensor, offset: int = 0, positions: Tensor | RotaryPositions | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention projections with rotary positions applied: x (B, N, C) -> q (B, H, N, D), k, v."""
        if self.rope is None:
            return self.project(x)
        qk, v = self._project_tokens(x, offset, positions)
        q = rearrange(qk[..., : self.num_heads, :], "b n h d -> b h n d")
        k = rearrange(qk[..., self.num_heads :, :], "b m h d -> b h m d")
        return q, k, rearrange(v, "b m h d -> b h m d")

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: MaskLike | list[MaskLike] = None,
        key_padding_mask: Tensor | None = None,
        return_extras: bool = False,
        need_weights: bool = True,
        position_offset: int = 0,
        cache: AttentionCache | None = None,
        positions: Tensor | RotaryPositions | None = None,
        weights_query: int | None = None,
        geometry: Geometry | None = None,
    ) -> Tensor | tuple[Tensor, AttentionExtras]:
        """Attend.

        Args:
            x: (B, N, dim) queries (and keys/values for self-attention).
            context: (B, M, dim) keys/values for cross-attention, or None.
            mask: True = may attend. A bool tensor broadcast to (B, H, N, M) as in SDPA: (N, M),
                (1, N, M) or (B|1, H|1, N, M); a :class:`attnlib.masks.SlidingWindow`, a
                :class:`attnlib.masks.KeyPadding`, a :class:`attnlib.masks.BlockMask`, or a list
                of these (their AND). Unsupported masks raise :class:`attnlib.UnsupportedError`.
            key_padding_mask: (B, M) bool, True = real key, False = padding (ANDed with ``mask``).
            return_extras: also return :class:`AttentionExtras` (importance, weights, aux loss).
            need_weights: with ``return_extras``, compute the (B, H, N, M) weights where the
                variant has them (O(N·M) memory); set False when only importance is needed.
            position_offset: rotary position of the first query, an int >= 0.
            cache: an :class:`AttentionCache` from :meth:`init_cache` for incremental causal
                decoding: x holds the next N tokens, which attend to every token the cache has
                seen plus themselves (causally); the cache is updated in place. The only mask
                then is ``key_padding_mask`` over all tokens so far, (B, cache.length + N).
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
            geometry: GTA (geometric transform attention, :mod:`attnlib.functional.gta`): the
                group representations of the queries' and keys' tokens (camera poses, patch
                positions); q, k, v are expressed in each query's frame around the variant's
                call, for any variant. Not with ``cache``.

        Returns:
            (B, N, dim), or ((B, N, dim), AttentionExtras) when ``return_extras``.
        """
        if cache is not None:
            if geometry is not None:
                raise UnsupportedError("geometry= (GTA) is not supported with incremental decoding (cache=)")
            return decoding.forward_cached(
                self,
                x,
                cache,
                mask,
                key_padding_mask,
                context,
                return_extras,
                position_offset,
                positions,
                weights_query,
                need_weights,
            )
        non_negative_int(position_offset, "position_offset", hint=" (the rotary position of the first query)")
        self._check_inputs(x, context)
        if positions is not None and context is not None:
            raise ValueError("positions= is for self-attention; got a context")
        if positions is not None and self.rope is None:
            raise ValueError(
                "positions= sets rotary positions, but this module has rope=False (build it with rope=True)"
            )
        if self.core.projects_tokens and context is None:
            return self._forward_tokens(
                x, mask, key_padding_mask, return_extras, need_weights, position_offset, positions, weights_query
            )
        if self.rope is not None:  # self-attention (a context with rope raised above); positions checked there
            q, k, v = self._project_rotated(x, position_offset, positions)
        else:
            q, k, v = self.project(x, context)
        if geometry is not None:
            if not isinstance(geometry, Geometry):
                raise ValueError(f"geometry must be an attnlib.functional.gta.Geometry, got {describe(geometry)}")
            q, k, v = gta_transform(q, k, v, geometry)
        b, h, n, _ = q.shape
        am = normalize_mask(
            mask,
            causal=self.causal,
            batch=b,
            heads=h,
            n=n,
            m=k.shape[2],
            device=x.device,
            key_padding_mask=key_padding_mask,
        )
        k, v = self._repeat_kv(k, v)
        cross = context is not None
        row: Tensor | None = None
        one_row = return_extras and weights_query is not None
        if one_row:
            query = check_index(weights_query, n, what="weights_query")
            if not self.capabilities.has_weights:
                raise UnsupportedError(
                    f"weights_query needs attention weights, but variant {self.variant!r} has none "
                    "(capabilities.has_weights=False)"
                )
            check_supported(self.variant, self.capabilities, am, cross=cross)
            row = self.core.query_weights(q, k, am, query)
        res = self._attend(
            q,
            k,
            v,
            am,
            rotary=self.rotary_call(n, position_offset, positions, x.device) if not cross else None,
            cross=cross,
            need_weights=(one_row and row is None) or (return_extras and need_weights and not one_row),
            need_importance=return_extras and not one_row,
        )
        if one_row and row is None:
            if res.weights is None:
                raise UnsupportedError(f"weights_query needs attention weights, but variant {self.variant!r} has none")
            row = res.weights[:, :, query : query + 1]
        y = self._project_out(res.out if geometry is None else gta_output(res.out, geometry))
        self.pending_aux_loss = res.aux_loss
        if not return_extras:
            return y
        if one_row:
            return y, self._extras(res, weights=row, importance=False)
        return y, self._extras(res, weights=res.weights)

    def _forward_tokens(
        self,
        x: Tensor,
        mask: MaskLike | list[MaskLike],
        key_padding_mask: Tensor | None,
        return_extras: bool,
        need_weights: bool,
        position_offset: int,
        positions: Tensor | RotaryPositions | None,
        weights_query: int | None,
    ) -> Tensor | tuple[Tensor, AttentionExtras]:
        """forward for a core with ``projects_tokens``: the core computes the layer from x itself."""
        b, n, _ = x.shape
        am = normalize_mask(
            mask,
            causal=self.causal,
            batch=b,
            heads=self.num_heads,
            n=n,
            m=n,
            device=x.device,
            key_padding_mask=key_padding_mask,
        )
        check_supported(self.variant, self.capabilities, am, cross=False)
        one_row = return_extras and weights_query is not None
        query = check_index(weights_query, n, what="weights_query") if one_row else 0
        y, res = self.run_tokens(
            x,
            am,
            self.rotary_call(n, position_offset, positions, x.device),
            need_weights=one_row or (return_extras and need_weights),
            need_importance=return_extras and not one_row,
        )
        self.pending_aux_loss = res.aux_loss
        if not return_extras:
            return y
        if one_row:
            if res.weights is None:
                raise UnsupportedError(f"weights_query needs attention weights, but variant {self.variant!r} has none")
            return y, self._extras(res, weights=res.weights[:, :, query : query + 1], importance=False)
        return y, self._extras(res, weights=res.weights)

    # -- shared by forward, the cached forward (attnlib.decoding) and forward_groups (attnlib.packed)

    def rotary_call(
        self, n: int, offset: int, positions: Tensor | RotaryPositions | None, device: torch.device
    ) -> RotaryCall | None:
        """The rotary positions of N self-attention tokens for cores that read them (None otherwise)."""
        if self.rope is None or not (self.core.uses_rotary or self.core.projects_tokens):
            return None
        if isinstance(positions, RotaryPositions):
            positions = positions.positions
        pos = torch.arange(n, device=device) if positions is None else positions.to(device).long()
        pos = pos + offset
        return RotaryCall(self.rope.base, pos, pos)

    def run_tokens(
        self, x: Tensor, am: AttentionMask, rotary: RotaryCall | None, *, need_weights: bool, need_importance: bool
    ) -> tuple[Tensor, CoreOutput]:
        """A ``projects_tokens`` core on x (B, N, C) under ``am``: (y (B, N, C), its CoreOutput)."""
        p = self.dropout if self.training and self.capabilities.attn_dropout else 0.0
        return self.core.forward_tokens(
            x,
            am,
            in_proj=self.in_proj,
            out_proj=self.out_proj,
            num_kv_heads=self.num_kv_heads,
            rotary=rotary,
            need_weights=need_weights,
            need_importance=need_importance,
            dropout_p=p,
        )

    def _repeat_kv(self, k: Tensor, v: Tensor, *, always: bool = False) -> tuple[Tensor, Tensor]:
        """k, v (B, H_kv, M, D) -> (B, H, M, D) for a variant without grouped-query support
        (``always``: whatever its capabilities, e.g. for its recurrent step); unchanged otherwise."""
        g = self.num_heads // k.shape[1]
        if g == 1 or (self.capabilities.gqa and not always):
            return k, v
        return k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, am: AttentionMask, *, rotary: RotaryCall | None = None, **flags: bool
    ) -> CoreOutput:
        """The core on q, k, v (``flags``: its cross / need_weights / need_importance; ``rotary``: the
        positions q and k were rotated at, for cores that read them), with the attention dropout where
        the variant applies it to its probabilities."""
        p = self.dropout if self.training and self.capabilities.attn_dropout else 0.0
        return self.core(q, k, v, am, dropout_p=p, rotary=rotary, **flags)

    def _output_dropout(self, out: Tensor) -> Tensor:
        """The attention dropout of a variant without one of its own: on its output (training only)."""
        if self.training and self.dropout > 0 and not self.capabilities.attn_dropout:
            return F.dropout(out, self.dropout)
        return out

    def _project_out(self, out: Tensor) -> Tensor:
        """The core's output (B, H, N, Dv) -> (B, N, dim): output dropout, heads merged, output projection."""
        return self.out_proj(rearrange(self._output_dropout(out), "b h n d -> b n (h d)"))

    @staticmethod
    def _extras(res: CoreOutput | None, *, weights: Tensor | None = None, importance: bool = True) -> AttentionExtras:
        """AttentionExtras of a core call: importance averaged over heads (B, M) where wanted and computed."""
        imp = res.importance.mean(1) if importance and res is not None and res.importance is not None else None
        return AttentionExtras(weights=weights, importance=imp, aux_loss=None if res is None else res.aux_loss)

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
        return packed.forward_groups(self, x, groups, positions=positions, return_importance=return_importance)

    # -- incremental decoding ----------------------------------------------------------------

    def init_cache(self, batch: int, *, mode: str | None = None) -> AttentionCache:
        """An empty decoding cache for ``batch`` sequences (pass it as ``forward(x, cache=...)``).

        ``mode`` defaults to :func:`decode_mode` of the variant's capabilities: the variant's
        recurrent ``step`` where it has one, else a key/value cache where it supports causal
        attention with N != M, else recomputation over the cached prefix. Raises ValueError for
        a non-causal module and :class:`attnlib.UnsupportedError` when the variant cannot decode.
        """
        return decoding.init_cache(self, positive_int(batch, "batch"), mode)

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
