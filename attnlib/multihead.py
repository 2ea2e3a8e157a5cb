"""``attnlib.MultiheadAttention``: a drop-in for :class:`torch.nn.MultiheadAttention` over any variant.

Same constructor, forward signature, mask conventions and ``state_dict`` names as
``nn.MultiheadAttention``, so ``load_state_dict`` works both ways and the module can be the
``self_attn`` / ``multihead_attn`` of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.
At this boundary masks keep PyTorch's MHA convention (bool True = *not* allowed, float masks
additive); inside, they become attnlib's (True = may attend) and go to the variant's core.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib._validation import describe, positive_int
from attnlib.errors import UnsupportedError
from attnlib.functional.softmax import biased_softmax_attention
from attnlib.masks import normalize_mask
from attnlib.registry import Capabilities
from attnlib.variants import build_core
from attnlib.variants.base import AttentionCore

__all__ = ["MultiheadAttention"]


def _mha_mask(mask: Tensor | None, what: str, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """An nn.MultiheadAttention mask -> (allowed bool | None, additive float bias | None).

    Bool: True = not allowed. Float: added to the logits; ``-inf`` entries forbid, and a float
    mask of only 0 / -inf is a plain boolean mask (no bias).
    """
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{what} must be a bool or float tensor, got {describe(mask)}")
    if mask.dtype == torch.bool:
        return ~mask, None
    if not mask.is_floating_point():
        raise ValueError(f"{what} must be bool (True = not allowed) or float (additive), got dtype {mask.dtype}")
    allowed = mask != float("-inf")
    finite = mask.masked_fill(~allowed, 0.0)
    if bool((finite == 0).all()):
        return allowed, None
    return allowed, finite.to(dtype)


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with a swappable attention variant.

    Args:
        embed_dim: model width E; divisible by ``num_heads``.
        num_heads: heads H; head size E // H.
        variant: registry name (:func:`attnlib.available`); ``"softmax"`` equals nn.MultiheadAttention.
        dropout: attention dropout (on the probabilities where the variant has them, else on
            its output; training only).
        bias: biases in the input and output projections.
        add_bias_kv, add_zero_attn: nn.MultiheadAttention's extra key rows; not supported
            (UnsupportedError when True).
        kdim, vdim: key / value feature sizes (default E); when they differ from E the input
            projections are the separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``.
        batch_first: inputs and output are (B, L, E) instead of (L, B, E).
        device, dtype: factory arguments of the parameters.
        **variant_kwargs: the variant's own options.

    Shapes: ``forward(query (L, B, E), key (S, B, kdim), value (S, B, vdim))`` ->
    ``(out (L, B, E), weights (B, L, S) | (B, H, L, S) | None)``; (B, ·, ·) with ``batch_first``;
    unbatched (L, E) inputs give (L, E).
    """

    # torch's TransformerEncoderLayer / TransformerEncoder take a fused C++ path (which would
    # bypass the variant) only when this is True; the projections' layout is ``_same_dims``.
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        variant: str = "softmax",
        *,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **variant_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(variant, str):
            raise ValueError(
                f"variant must be a registry name (attnlib.available()), got {variant!r}; nn.MultiheadAttention's "
                "dropout, bias, ... are keyword-only here (dropout=...)"
            )
        positive_int(embed_dim, "embed_dim")
        positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if add_bias_kv or add_zero_attn:
            raise UnsupportedError(
                "attnlib.MultiheadAttention does not support add_bias_kv / add_zero_attn (extra key rows); "
                "build it with both False"
            )
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else positive_int(kdim, "kdim")
        self.vdim = embed_dim if vdim is None else positive_int(vdim, "vdim")
        self._same_dims = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.variant = variant
        if self._same_dims:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.core: AttentionCore = build_core(variant, num_heads, self.head_dim, **variant_kwargs)
        self.pending_aux_loss: Tensor | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform projections, zero biases."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @property
    def capabilities(self) -> Capabilities:
        """The variant's capabilities."""
        return self.core.capabilities

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            return self.in_proj_weight.chunk(3)  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight  # type: ignore[return-value]

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Validate the inputs; returns whether they are batched (3-D)."""
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, Tensor) or t.dim() not in (2, 3) or t.shape[-1] != width:
                raise ValueError(
                    f"{name} must be a ({'B, L' if self.batch_first else 'L, B'}, {width}) or unbatched "
                    f"(L, {width}) tensor, got {describe(t)}"
                )
        if not query.dim() == key.dim() == value.dim():
            raise ValueError(
                f"query, key and value must all be batched or all unbatched, got {query.dim()}-D, "
                f"{key.dim()}-D and {value.dim()}-D"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must have the same leading shape, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        return query.dim() == 3

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention's forward.

        Args:
            query: (L, B, E) ((B, L, E) with ``batch_first``; (L, E) unbatched).
            key: (S, B, kdim); value: (S, B, vdim) (same layout as ``query``).
            key_padding_mask: (B, S) ((S,) unbatched); bool True = padding (ignored key), or float added
                to the logits.
            need_weights: also return the attention weights (UnsupportedError for a variant
                without weights; pass False).
            attn_mask: (L, S) or (B·H, L, S); bool True = not allowed, or float added to the
                logits (``-inf`` forbids; other finite values need ``variant="softmax"``).
            average_attn_weights: average the weights over heads -> (B, L, S); else (B, H, L, S).
            is_causal: ``attn_mask`` is the causal mask (a hint, as in PyTorch); with no
                ``attn_mask`` the causal mask is applied.

        Returns:
            (out, weights or None), out in the layout of ``query``.
        """
        batched = self._check(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        else:
            q_in, k_in, v_in = query, key, value
        b, n, m = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        if k_in.shape[0] != b:
            raise ValueError(f"batch mismatch: query has B={b} but key has B={k_in.shape[0]}")
        h, d = self.num_heads, self.head_dim
        wq, wk, wv = self._projections()
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q = F.linear(q_in, wq, bq).unflatten(-1, (h, d)).transpose(1, 2)
        k = F.linear(k_in, wk, bk).unflatten(-1, (h, d)).transpose(1, 2)
        v = F.linear(v_in, wv, bv).unflatten(-1, (h, d)).transpose(1, 2)

        causal, allowed, kp, bias = self._masks(attn_mask, key_padding_mask, is_causal, b, n, m, q.dtype)
        am = normalize_mask(allowed, causal=causal, batch=b, heads=h, n=n, m=m, device=q.device, key_padding_mask=kp)
        caps = self.capabilities
        p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights and not caps.has_weights:
            raise UnsupportedError(
                f"variant {self.variant!r} has no attention weights (capabilities.has_weights=False); "
                "call with need_weights=False"
            )
        if bias is not None:
            if self.variant != "softmax":
                raise UnsupportedError(
                    f"variant {self.variant!r} takes boolean masks only; a float mask with finite non-zero "
                    "entries (an additive score bias) needs variant='softmax'"
                )
            res = biased_softmax_attention(
                q, k, v, bias, mask=am, scale=getattr(self.core, "scale", None), dropout_p=p, return_weights=True
            )
            out, weights = res
            aux = None
        else:
            r = self.core(
                q,
                k,
                v,
                am,
                cross=n != m or key is not query,
                need_weights=need_weights,
                dropout_p=p if caps.attn_dropout else 0.0,
            )
            out, weights, aux = r.out, r.weights, r.aux_loss
            if p > 0 and not caps.attn_dropout:
                out = F.dropout(out, p)
        self.pending_aux_loss = aux
        y = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first or not batched:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(1)
        if not need_weights or weights is None:
            return y, None
        if average_attn_weights:
            weights = weights.mean(1)
        return y, weights if batched else weights.squeeze(0)

    def _masks(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        b: int,
        n: int,
        m: int,
        dtype: torch.dtype,
    ) -> tuple[bool, Tensor | None, Tensor | None, Tensor | None]:
        """MHA masks -> (causal, allowed (B|1, H|1, N, M) bool, key padding (B, M) bool (True = real
        key), additive bias (B|1, H|1, N, M)), each None when absent."""
        h = self.num_heads
        allowed, bias = _mha_mask(attn_mask, "attn_mask", dtype)
        if allowed is not None:
            if allowed.dim() == 2 and tuple(allowed.shape) == (n, m):
                allowed = allowed[None, None]
                bias = None if bias is None else bias[None, None]
            elif allowed.dim() == 3 and tuple(allowed.shape) == (b * h, n, m):
                allowed = allowed.view(b, h, n, m)
                bias = None if bias is None else bias.view(b, h, n, m)
            else:
                raise ValueError(
                    f"attn_mask must be (L, S) = ({n}, {m}) or (B·num_heads, L, S) = ({b * h}, {n}, {m}), "
                    f"got shape {tuple(attn_mask.shape)}"  # type: ignore[union-attr]
                )
        kp_allowed, kp_bias = _mha_mask(key_padding_mask, "key_padding_mask", dtype)
        if kp_allowed is not None and tuple(kp_allowed.shape) != (b, m):
            raise ValueError(f"key_padding_mask must be (B, S) = ({b}, {m}), got shape {tuple(kp_allowed.shape)}")
        causal = False
        if is_causal and n == m and (allowed is None or bias is None):
            # the hint, as in PyTorch's fast paths: attn_mask is the causal mask
            causal, allowed = True, None
        elif is_causal and allowed is None:
            raise ValueError("is_causal=True needs N == M or an attn_mask giving the causal pattern")
        elif allowed is not None and bias is None and n == m and not self.capabilities.full_mask:
            tri = torch.ones(n, m, dtype=torch.bool, device=allowed.device).tril()
            if allowed.shape[:2] == (1, 1) and torch.equal(allowed[0, 0], tri):
                causal, allowed = True, None  # a causal attn_mask, for variants without full masks
        if kp_bias is not None:
            kb = kp_bias[:, None, None, :]
            bias = kb if bias is None else bias + kb
        if kp_allowed is not None and bool(kp_allowed.all()):
            kp_allowed = None
        return causal, allowed, kp_allowed, bias
