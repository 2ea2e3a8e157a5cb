"""Building blocks shared by the backbones.

Every block takes an attention *config* - a dict or OmegaConf DictConfig such as
``{"variant": "local", "window": 32}`` (the contents of ``configs/attention/<name>.yaml``) -
never a class, so any registered variant fits any block whose needs its capabilities meet.
:func:`check_attention` reads the variant's :class:`attnlib.Capabilities` at build time and
raises :class:`attnlib.UnsupportedError` naming the variant and the missing capability.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.attention import Attention, AttentionCache, build_attention
from attnlib.errors import UnsupportedError
from attnlib.functional.gta import Geometry
from attnlib.positional import RotaryPositions
from attnlib.registry import available, variant_info
from attnlib.variants.base import AttentionCore

__all__ = [
    "INIT_SCHEMES",
    "DropPath",
    "FeedForward",
    "TransformerBlock",
    "attention_dict",
    "check_attention",
    "init_weights",
    "make_attention",
    "make_pruning",
    "variants_serving",
]

AttentionConfig = Mapping[str, Any] | Any  # dict or omegaconf.DictConfig

# Keys of an attention config that belong to the model, not to the attention.
_MODEL_OWNED = ("dim", "num_heads", "causal")


def attention_dict(cfg: AttentionConfig) -> dict[str, Any]:
    """A plain dict copy of an attention config (dict / DictConfig), with ``name`` read as ``variant``.

    Raises ValueError when it is not a mapping or names no variant.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    if isinstance(cfg, str):
        cfg = {"variant": cfg}
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"an attention config must be a mapping like {{'variant': 'softmax'}} (or a variant name), "
            f"got {type(cfg).__name__}"
        )
    data = dict(cfg)
    if "name" in data and "variant" not in data:
        data["variant"] = data.pop("name")
    if "variant" not in data:
        raise ValueError(f"attention config names no variant (expected a 'variant' key), got keys {sorted(data)}")
    return data


def variants_serving(needs: Mapping[str, str] | list[str]) -> list[str]:
    """Registered variants whose capabilities include every field in ``needs``."""
    return [n for n in available() if all(getattr(variant_info(n), f) for f in needs)]


def check_attention(cfg: AttentionConfig, needs: Mapping[str, str], *, model: str) -> str:
    """Check at build time that the configured variant has the capabilities a model needs.

    Args:
        cfg: attention config (dict / DictConfig / variant name).
        needs: capability field -> why the model needs it, e.g. ``{"causal": "next-token prediction"}``.
        model: the model's name, for the message.

    Returns:
        The variant name. Raises ValueError for an unknown variant and
        :class:`attnlib.UnsupportedError` naming the variant and each missing capability.
    """
    name = attention_dict(cfg)["variant"]
    caps = variant_info(name)  # ValueError with close matches for unknown names
    missing = [f for f in needs if not getattr(caps, f)]
    if missing:
        why = "; ".join(f"capabilities.{f}=True ({needs[f]})" for f in missing)
        ok = variants_serving(needs)
        raise UnsupportedError(
            f"{model} cannot use attention variant {name!r}: it needs {why}, but {name!r} has "
            + ", ".join(f"{f}=False" for f in missing)
            + f". Variants that can serve {model}: {', '.join(ok) or 'none'}"
        )
    return name


def make_attention(
    cfg: AttentionConfig,
    *,
    dim: int,
    num_heads: int,
    causal: bool = False,
    needs: Mapping[str, str] | None = None,
    model: str = "this block",
    **defaults: Any,
) -> Attention:
    """Build the :class:`attnlib.Attention` of a block from an attention config.

    ``dim``, ``num_heads`` and ``causal`` are the model's (a config that sets them raises
    ValueError); ``defaults`` (e.g. ``dropout``, ``rope``, ``num_kv_heads``) apply unless the
    config sets them. ``needs`` are checked with :func:`check_attention` first.
    """
    data = attention_dict(cfg)
    clash = [k for k in _MODEL_OWNED if k in data]
    if clash:
        raise ValueError(
            f"attention config sets {clash}, which the model decides ({model}: dim={dim}, num_heads={num_heads}, "
            f"causal={causal}); set them on the model instead"
        )
    all_needs = dict(needs or {})
    if causal:
        all_needs.setdefault("causal", "causal self-attention")
    check_attention(data, all_needs, model=model)
    for key, value in defaults.items():
        data.setdefault(key, value)
    return build_attention(data, dim=dim, num_heads=num_heads, causal=causal)


def make_pruning(
    pruning: Any,
    attention: AttentionConfig,
    *,
    dim: int,
    depth: int,
    model: str,
    kinds: tuple[str, ...] = ("tokens",),
    positional: bool = False,
    cls_token: bool = False,
) -> Any:
    """Build a model's :class:`attnlib.pruning.PruningPlan` from a ``pruning:`` config (None -> None).

    Checks at build time that the attention variant reports ``importance`` when the pruner
    ranks by it (:class:`attnlib.UnsupportedError` otherwise), that the pruner's kind is one the
    model serves, that pruners scoring by the class token's attention row (``score="cls"``) get
    a model with a ``cls_token`` and a variant with attention weights, and - for ``positional``
    models (causal LMs, rotary positions) - that the pruner keeps real tokens (no synthesised ones).
    """
    if pruning is None:
        return None
    from attnlib.pruning import build_pruning

    plan = build_pruning(pruning, dim=dim, depth=depth, model=model)
    if plan.kind not in kinds:
        raise UnsupportedError(
            f"{model} cannot use pruner {plan.name!r} (kind {plan.kind!r}); it serves pruners of kind "
            f"{', '.join(repr(k) for k in kinds)}"
        )
    pruners = list(plan.pruners.values())
    if any(getattr(p, "needs_importance", False) for p in pruners):
        check_attention(
            attention, {"importance": f"pruner {plan.name!r} ranks tokens by the attention they receive"}, model=model
        )
    scored = [p for p in pruners if getattr(p, "score_query", None) is not None]
    if scored and not cls_token:
        raise UnsupportedError(
            f"{model}: pruner {plan.name!r} with score='cls' ranks tokens by the class token's attention row, "
            f"but this {model} has no class token; use score='mean'"
        )
    if scored:
        check_attention(
            attention,
            {"has_weights": f"pruner {plan.name!r} with score='cls' reads the class token's attention weights"},
            model=model,
        )
    if positional and any(getattr(p, "synthesizes", False) for p in pruners):
        raise UnsupportedError(
            f"{model} needs each token's position (causal order / rotary positions), but pruner {plan.name!r} "
            "with these options synthesises new tokens (TokenLearner, EViT fusion); use a pruner that keeps real tokens"
        )
    return plan


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample.

    ``forward(x (B, ...)) -> (B, ...)``: in training each sample's branch is zeroed with
    probability p and the kept ones scaled by 1 / (1 - p); identity in eval.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Position-wise MLP: (B, N, dim) -> (B, N, dim).

    Args:
        dim: width; hidden: inner width.
        activation: "gelu", "silu" (Swish) or "swiglu" (gated; Shazeer 2020).
        dropout: after the activation and at the output.
    """

    def __init__(self, dim: int, hidden: int, *, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("gelu", "silu", "swiglu"):
            raise ValueError(f"activation must be 'gelu', 'silu' or 'swiglu', got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.activation == "swiglu":
            a, g = h.chunk(2, -1)
            h = F.silu(g) * a
        elif self.activation == "silu":
            h = F.silu(h)
        else:
            h = F.gelu(h)
        return self.drop(self.fc2(self.drop(h)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with drop path.

    Args:
        dim, num_heads: width and attention heads.
        attention: attention config (dict / DictConfig), e.g. ``{"variant": "softmax"}``.
        causal: causal self-attention (the variant must declare ``causal``).
        needs: further capabilities the caller needs (field -> reason), checked at build time.
        model: name used in error messages.
        mlp_ratio: MLP hidden width / dim.
        activation: MLP activation ("gelu", "silu", "swiglu").
        dropout: residual-branch dropout; attn_dropout: the attention's dropout.
        drop_path: stochastic-depth probability of both branches.
        rope: rotary positions inside the attention; rope_base: their frequency base.
        num_kv_heads: grouped-query attention key/value heads.

    Shapes: ``forward(x (B, N, dim), key_padding_mask=None | (B, N) bool, cache=None) -> (B, N, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        causal: bool = False,
        needs: Mapping[str, str] | None = None,
        model: str = "TransformerBlock",
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        rope: bool = False,
        rope_base: float = 10000.0,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        kv = {} if num_kv_heads is None else {"num_kv_heads": num_kv_heads}
        self.attn = make_attention(
            attention,
            dim=dim,
            num_heads=num_heads,
            causal=causal,
            needs=needs,
            model=model,
            dropout=attn_dropout,
            rope=rope,
            **({"rope_base": rope_base} if rope else {}),
            **kv,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), activation=activation, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        cache: AttentionCache | None = None,
        *,
        positions: Tensor | RotaryPositions | None = None,
        return_importance: bool = False,
        importance_query: int | None = None,
        return_weights: bool = False,
        geometry: Geometry | None = None,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """x (B, N, dim); key_padding_mask (B, M) (True = real token); cache for decoding.

        ``return_weights`` returns the attention weights (B, H, N, M) instead of the importance
        (e.g. the per-query rows a KV-cache eviction policy reads; None if the variant has none).
        ``geometry``: GTA group representations of the tokens (:mod:`attnlib.functional.gta`).

        ``positions`` (B, N) long (or a shared :class:`attnlib.positional.RotaryPositions`): rotary
        position of each token (after token pruning).
        ``return_importance`` also returns the attention's importance (B, M) - the attention
        mass each key received, averaged over heads and queries (None if the variant has none) -
        or, with ``importance_query=q``, query q's attention row averaged over heads (B, M)
        (e.g. the class token's, EViT; needs a variant with attention weights).
        """
        kw: dict = {"key_padding_mask": key_padding_mask}
        if cache is not None:
            kw["cache"] = cache
        if positions is not None:
            kw["positions"] = positions
        if geometry is not None:
            kw["geometry"] = geometry
        imp = None
        if return_weights:
            a, extras = self.attn(self.norm1(x), return_extras=True, need_weights=True, **kw)
            imp = extras.weights
        elif return_importance:
            if importance_query is None:
                a, extras = self.attn(self.norm1(x), return_extras=True, need_weights=False, **kw)
                imp = extras.importance
            else:  # one query's row only (UnsupportedError for a variant without weights)
                a, extras = self.attn(self.norm1(x), return_extras=True, weights_query=importance_query, **kw)
                assert extras.weights is not None
                imp = extras.weights[:, :, 0, :].mean(1)
        else:
            a = self.attn(self.norm1(x), **kw)
        x = x + self.drop_path(self.drop(a))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, imp) if return_importance or return_weights else x

    def forward_groups(
        self,
        x: Tensor,
        groups: list[tuple[int, int]],
        *,
        positions: Tensor | RotaryPositions | None = None,
        return_importance: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """The block on a ragged batch packed by length (no padding; see :mod:`attnlib.models.ragged`).

        x (T, dim) packed tokens, ``groups`` ``[(rows_g, length_g), ...]``, ``positions`` (T,)
        rotary positions -> (T, dim) (and importance (T,) | None with ``return_importance``).
        Equals :meth:`forward` on each sequence alone. Stochastic depth needs whole rows, so a
        block with ``drop_path > 0`` runs this only in eval.
        """
        if self.training and self.drop_path.p > 0:
            raise UnsupportedError(
                f"TransformerBlock.forward_groups: drop_path={self.drop_path.p} drops whole rows in training; "
                "use forward() on the padded batch in training (or eval mode)"
            )
        res = self.attn.forward_groups(self.norm1(x), groups, positions=positions, return_importance=return_importance)
        a, imp = res if return_importance else (res, None)
        x = x + self.drop(a)
        x = x + self.mlp(self.norm2(x))
        return (x, imp) if return_importance else x


INIT_SCHEMES = ("gpt2", "fan_in")


def init_weights(model: nn.Module, std: float = 0.02, *, scheme: str = "gpt2") -> None:
    """Initialise Linear/Embedding weights, zero biases, unit LayerNorms.

    Schemes:

    * ``"gpt2"``: truncated normal (std ``std``, cut at 2 std) for every Linear and Embedding
      (GPT-2/ViT practice, tuned for widths of several hundred).
    * ``"fan_in"``: Linear weights uniform in ``±1/sqrt(fan_in)`` (PyTorch's ``nn.Linear``
      default) and embeddings normal with std ``1/sqrt(dim)``. Scales with the width; small
      models (dim 64) need it - with std 0.02 a dim-64 model's attention logits start near
      zero and, e.g., associative recall stalls on a long plateau before induction heads form.

    Modules inside an attention variant's core are left alone: a variant initialises its own
    parameters the way its paper says.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    skip: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, AttentionCore):
            skip.update(id(m) for m in mod.modules())
    for mod in model.modules():
        if id(mod) in skip:
            continue
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            if scheme == "gpt2":
                nn.init.trunc_normal_(mod.weight, std=std, a=-2 * std, b=2 * std)
            elif isinstance(mod, nn.Linear):
                bound = mod.in_features**-0.5
                nn.init.uniform_(mod.weight, -bound, bound)
            else:
                nn.init.normal_(mod.weight, std=mod.embedding_dim**-0.5)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            nn.init.ones_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
