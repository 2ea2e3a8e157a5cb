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

from attnlib._validation import describe
from attnlib.errors import UnsupportedError
from attnlib.masks import MaskLike, normalize_mask
from attnlib.positional import RotaryEmbedding
from attnlib.registry import Capabilities, get_variant
from attnlib.variants.base import AttentionCore

__all__ = ["Attention", "AttentionExtras", "aux_loss", "build_attention"]


@dataclass
class AttentionExtras:
    """Extra outputs of :meth:`Attention.forward` with ``return_extras=True``.

    Attributes:
        weights: (B, H, N, M) attention weights, or None where the variant has none (or
            ``need_weights=False``).
        importance: (B, M) attention mass each key receives, averaged over heads and
            queries, or None where the variant cannot compute it.
        aux_loss: scalar auxiliary loss of this call, or None.
    """

    weights: Tensor | None
    importance: Tensor | None
    aux_loss: Tensor | None


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

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: MaskLike | list[MaskLike] = None,
        return_extras: bool = False,
        need_weights: bool = True,
        position_offset: int = 0,
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

        Returns:
            (B, N, dim), or ((B, N, dim), AttentionExtras) when ``return_extras``.
        """
        self._check_inputs(x, context)
        q, k, v = self.project(x, context)
        if self.rope is not None:
            q = self.rope(q, position_offset)
            k = self.rope(k, position_offset)
        b, h, n, _ = q.shape
        m = k.shape[2]
        am = normalize_mask(mask, causal=self.causal, batch=b, heads=h, n=n, m=m, device=x.device)
        caps = self.core.capabilities
        if not caps.gqa and self.num_kv_heads != self.num_heads:
            g = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        p = self.dropout if self.training else 0.0
        res = self.core(
            q,
            k,
            v,
            am,
            cross=context is not None,
            need_weights=return_extras and need_weights,
            need_importance=return_extras,
            dropout_p=p if caps.attn_dropout else 0.0,
        )
        out = res.out
        if p > 0 and not caps.attn_dropout:
            out = F.dropout(out, p)
        y = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        self.pending_aux_loss = res.aux_loss
        if not return_extras:
            return y
        imp = res.importance.mean(1) if res.importance is not None else None
        return y, AttentionExtras(weights=res.weights, importance=imp, aux_loss=res.aux_loss)

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
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - hydra-core is a runtime dependency
            pass
        if not isinstance(cfg, Mapping):
            raise ValueError(f"build_attention expects a mapping / DictConfig, got {describe(cfg)}")
        data = dict(cfg)
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
