"""Building a core by registry name: :func:`build_core` (the per-head entry point for integrators)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from attnlib._validation import check_qkv, positive_int
from attnlib.errors import UnsupportedError
from attnlib.functional._common import repeat_kv
from attnlib.masks import MaskLike, normalize_mask
from attnlib.registry import get_variant
from attnlib.variants.base import AttentionCore

__all__ = ["attention", "build_core", "check_variant_kwargs"]


def check_variant_kwargs(variant: str, cls: type[AttentionCore], kwargs: dict[str, Any]) -> None:
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


def build_core(variant: str, num_heads: int, head_dim: int, **kwargs: Any) -> AttentionCore:
    """The core of ``variant`` for ``num_heads`` heads of size ``head_dim``: a module mapping
    q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) and an :class:`attnlib.masks.AttentionMask`
    to a :class:`attnlib.variants.CoreOutput` with out (B, H, N, Dv).

    ``kwargs`` are the variant's own options; unknown ones raise ValueError listing the accepted
    ones, unknown names raise ValueError with close matches. It holds the variant's parameters
    (register it in your model). For a plain call on tensors see :func:`attnlib.functional.attention`.
    """
    positive_int(num_heads, "num_heads")
    positive_int(head_dim, "head_dim")
    cls = get_variant(variant)
    check_variant_kwargs(variant, cls, kwargs)
    return cls(num_heads=num_heads, head_dim=head_dim, **kwargs)


_CORES: dict[tuple[Any, ...], AttentionCore] = {}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    variant: str = "softmax",
    mask: MaskLike | list[MaskLike] = None,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    cross: bool | None = None,
    dropout_p: float = 0.0,
    **kwargs: Any,
) -> Tensor:
    """Attention of ``variant`` on per-head tensors: q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv)
    -> (B, H, N, Dv). Public as :func:`attnlib.functional.attention`.

    Args:
        variant: registry name; ``kwargs`` are its options.
        mask: as :meth:`attnlib.Attention.forward` (True = may attend; a tensor broadcasts as in SDPA).
        causal: bottom-right aligned causal mask.
        key_padding_mask: (B, M) bool, True = real key.
        cross: keys from another sequence (default: N != M).
        dropout_p: attention dropout (variants with ``capabilities.attn_dropout``; else refused).

    Key/value heads are repeated for variants without grouped-query support. The core is built
    once per (variant, heads, head size, options, device, dtype) and reused, so a variant with
    trainable or random parameters keeps its initial ones: build and own those with
    :func:`build_core` instead.
    """
    check_qkv(q, k, v, where="attnlib.functional.attention")
    b, h, n, d = q.shape
    cls = get_variant(variant)
    if dropout_p and not cls.capabilities.attn_dropout:
        raise UnsupportedError(f"variant {variant!r} has no attention dropout (capabilities.attn_dropout=False)")
    try:
        key = (variant, h, d, q.device, q.dtype, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        key = None
    core = _CORES.get(key) if key is not None else None
    if core is None:
        core = build_core(variant, h, d, **kwargs).to(device=q.device, dtype=q.dtype)
        if key is not None:
            _CORES[key] = core
    if not cls.capabilities.gqa and k.shape[1] != h:
        k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // k.shape[1])
    am = normalize_mask(
        mask, causal=causal, batch=b, heads=h, n=n, m=k.shape[2], device=q.device, key_padding_mask=key_padding_mask
    )
    return core(q, k, v, am, cross=n != k.shape[2] if cross is None else cross, dropout_p=dropout_p).out
