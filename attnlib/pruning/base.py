"""The token-pruning interface, registry and shared helpers.

A *pruner* sits after one transformer block. It receives that block's output hidden states
``x`` (B, N, C), the block attention's ``importance`` (B, N) - the attention mass each token
received as a key, averaged over heads and queries (``Attention.forward(..., return_extras=True)``)
- the key-padding ``mask`` (B, N) (True = real token) and ``protected`` (B, N) (tokens that
must never be dropped: a class token, the newest tokens of a causal LM). It returns a
:class:`PruneOutput`: the kept hidden states (B, N', C), their indices into the input sequence
(B, N') - so positions and scatter-back stay right - the new padding mask (B, N') and an
optional auxiliary loss.

Rows may keep different numbers of tokens; the output is padded to the largest count and the
padding is marked False in ``mask`` (``mask`` is None when no row is padded). Kept tokens stay in
their original order, so causal order and positions are preserved.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from attnlib._config import lookup_registered, register_named, to_plain_dict

__all__ = [
    "SCORES",
    "PruneOutput",
    "PruningPlan",
    "TokenPruner",
    "available",
    "build_pruning",
    "get_pruner",
    "pruning_dict",
    "register_pruner",
    "score_query_of",
    "select_tokens",
]


@dataclass
class PruneOutput:
    """What a pruner returns.

    Attributes:
        x: (B, N', C) kept (or learned) hidden states.
        index: (B, N') long, position of each output token in the pruner's *input* sequence;
            -1 marks a synthesised token (an EViT fused token, a TokenLearner token).
        mask: (B, N') bool, True = real token; None when every output token is real.
        aux_loss: scalar auxiliary loss (e.g. LTP's keep-ratio term) or None.
    """

    x: Tensor
    index: Tensor
    mask: Tensor | None
    aux_loss: Tensor | None = None


def _arange_index(x: Tensor) -> Tensor:
    b, n = x.shape[0], x.shape[1]
    return torch.arange(n, device=x.device).expand(b, n)


def select_tokens(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Physically keep the tokens ``keep`` (B, N) bool of ``x`` (B, N, C), in order.

    Returns ``(x_kept (B, K, C), index (B, K) long, mask (B, K) bool | None)`` with K the
    largest per-row count; rows with fewer kept tokens are padded (mask False). When every
    token is kept, ``x`` itself is returned (bit-identical).
    """
    if keep.shape != x.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool {tuple(x.shape[:2])}, got {keep.dtype} {tuple(keep.shape)}")
    if bool(keep.all()):
        return x, _arange_index(x), None
    counts = keep.sum(1)
    k = max(int(counts.max()), 1)
    # stable sort puts kept tokens first, each group in original order
    order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
    xk = x.gather(1, order[..., None].expand(-1, -1, x.shape[2]))
    mask = torch.arange(k, device=x.device)[None, :] < counts[:, None]
    return xk, order, (None if bool(mask.all()) else mask)


def _check_inputs(pruner: str, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None):
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"pruner {pruner!r}: x must be (B, N, C), got {getattr(x, 'shape', type(x).__name__)}")
    bn = tuple(x.shape[:2])
    for name, t in (("importance", importance), ("mask", mask), ("protected", protected)):
        if t is not None and tuple(t.shape) != bn:
            raise ValueError(f"pruner {pruner!r}: {name} must be (B, N) = {bn}, got {tuple(t.shape)}")
    for name, t in (("mask", mask), ("protected", protected)):
        if t is not None and t.dtype != torch.bool:
            raise ValueError(f"pruner {pruner!r}: {name} must be bool, got {t.dtype}")


SCORES = ("mean", "cls")
"""Token scores of the ranking pruners: ``"mean"`` (attention received, averaged over queries) or ``"cls"``."""


def score_query_of(pruner: str, score: str) -> int | None:
    """The ``score_query`` of a ``score`` option (``"mean"`` -> None, ``"cls"`` -> 0); ValueError otherwise."""
    if score not in SCORES:
        raise ValueError(f"{pruner} score must be one of {SCORES}, got {score!r}")
    return 0 if score == "cls" else None


class TokenPruner(nn.Module):
    """Base class of the pruners registered with :func:`register_pruner`.

    Class attributes:
        needs_importance: the pruner ranks tokens by attention importance (the block's variant
            must declare ``capabilities.importance``; checked at build time).
        kind: ``"tokens"`` (drops hidden states in the forward pass) or ``"kv_cache"``
            (evicts entries of a decoding KV cache, :class:`attnlib.models.DecoderLM` only).
        synthesizes: outputs tokens that are not input tokens (index -1), so it cannot serve
            models that need each token's position (causal LMs, rotary positions).
        score_query: None (rank by ``importance``, the attention mass each token receives
            averaged over all queries) or a query position whose attention row, averaged over
            heads, is passed as ``importance`` instead (0 = the class token: EViT's rule); the
            model then asks its block for the attention weights (variant with ``has_weights``).

    Constructor keywords every pruner receives: ``dim`` (C), ``layer`` (index of the block it
    follows) and ``depth`` (number of blocks). Subclasses implement :meth:`prune`.
    """

    name: ClassVar[str] = "?"
    needs_importance: ClassVar[bool] = True
    kind: ClassVar[str] = "tokens"
    synthesizes: ClassVar[bool] = False
    score_query: int | None = None

    def __init__(self, *, dim: int, layer: int, depth: int) -> None:
        super().__init__()
        self.dim, self.layer, self.depth = dim, layer, depth
        self.pending_aux_loss: Tensor | None = None

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Blocks after which the pruner acts when the config gives no ``layers``."""
        return sorted({depth // 3, (2 * depth) // 3} - {depth - 1}) or [0]

    @classmethod
    def build_layers(
        cls,
        layers: list[int],
        *,
        dim: int,
        depth: int,
        options: dict[str, Any],
        per_layer: dict[int, dict[str, Any]],
    ) -> dict[int, nn.Module]:
        """One pruner per layer (overridden by pruners that share parameters across layers)."""
        return {i: cls(dim=dim, layer=i, depth=depth, **{**options, **per_layer.get(i, {})}) for i in layers}

    def forward(
        self, x: Tensor, importance: Tensor | None, mask: Tensor | None = None, protected: Tensor | None = None
    ) -> PruneOutput:
        """x (B, N, C), importance (B, N), mask (B, N) bool (True = real), protected (B, N) bool -> PruneOutput."""
        _check_inputs(self.name, x, importance, mask, protected)
        if self.needs_importance and importance is None:
            raise ValueError(
                f"pruner {self.name!r} needs the attention importance (B, N), got None; the attention "
                "variant must report it (capabilities.importance)"
            )
        out = self.prune(x, importance, mask, protected)
        self.pending_aux_loss = out.aux_loss
        return out

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        """Implemented by subclasses (inputs already validated)."""
        raise NotImplementedError

    def identity(self, x: Tensor, mask: Tensor | None) -> PruneOutput:
        """Keep everything: ``x`` unchanged, index = arange."""
        return PruneOutput(x, _arange_index(x), mask)


_PRUNERS: dict[str, type[TokenPruner]] = {}
P = TypeVar("P", bound=type[TokenPruner])


def register_pruner(name: str):
    """Class decorator registering a :class:`TokenPruner` subclass under ``name``."""

    def deco(cls: P) -> P:
        return register_named(_PRUNERS, name, cls, kind="pruner")

    return deco


def available() -> list[str]:
    """Sorted names of the registered pruners."""
    return sorted(_PRUNERS)


def get_pruner(name: str) -> type[TokenPruner]:
    """The pruner class registered as ``name``; unknown names raise ValueError with close matches."""
    return lookup_registered(_PRUNERS, name, kind="pruner", plural="pruners")


def pruning_dict(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A plain dict copy of a pruning config (dict / DictConfig / name); ``variant`` is read as ``name``."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    data = to_plain_dict(cfg, what="a pruning config (a mapping like {'name': 'topk'})")
    if "name" not in data:
        raise ValueError(f"pruning config names no pruner (expected a 'name' key), got keys {sorted(data)}")
    return data


def _check_kwargs(name: str, cls: type[TokenPruner], kwargs: Mapping[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if n not in ("self", "dim", "layer", "depth") and p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        close = {u: difflib.get_close_matches(u, accepted, n=1) for u in unknown}
        hints = "; ".join(f"{u!r} (did you mean {c[0]!r}?)" if c else repr(u) for u, c in close.items())
        raise ValueError(
            f"pruner {name!r} got unknown option(s) {hints}; it accepts: {', '.join(accepted) or 'no options'} "
            "(plus layers, per_layer, protect)"
        )


class PruningPlan(nn.Module):
    """The pruners of one model: ``layer index -> pruner`` (built by :func:`build_pruning`).

    Attributes:
        name: the pruner's registry name.
        layers: sorted block indices a pruner follows.
        protect: positions (of the model's *input* sequence; negative = from the end) never
            dropped, or None for the model's default.
        kind: the pruner kind ("tokens" or "kv_cache").
    """

    def __init__(self, name: str, pruners: dict[int, nn.Module], protect: list[int] | None, kind: str) -> None:
        super().__init__()
        self.name, self.protect, self.kind = name, protect, kind
        self.layers = sorted(pruners)
        self.pruners = nn.ModuleDict({str(i): p for i, p in pruners.items()})

    def get(self, layer: int) -> nn.Module | None:
        """The pruner after block ``layer``, or None."""
        return self.pruners[str(layer)] if str(layer) in self.pruners else None

    def protected(self, index: Tensor, n_total: int, default: list[int]) -> Tensor:
        """(B, N) bool: which tokens (given their original positions ``index`` (B, N)) are protected."""
        pos = self.protect if self.protect is not None else default
        out = torch.zeros_like(index, dtype=torch.bool)
        for p in pos:
            out |= index == (p if p >= 0 else n_total + p)
        return out

    def reset_parameters(self) -> None:
        """Re-apply the pruners' own initialisation (call after a model-wide weight init)."""
        for mod in self.modules():
            if mod is not self and hasattr(mod, "reset_pruner_parameters"):
                mod.reset_pruner_parameters()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, protect={self.protect}"


def build_pruning(cfg: Mapping[str, Any] | Any, *, dim: int, depth: int, model: str = "model") -> PruningPlan:
    """Build a :class:`PruningPlan` from a pruning config.

    Config keys: ``name`` (registry name), ``layers`` (block indices after which to prune;
    default the pruner's :meth:`TokenPruner.default_layers`), ``per_layer`` (``{layer: {option:
    value}}`` overrides), ``protect`` (positions never dropped; negative = from the end; default
    the model's: the class token of a ViT, the newest token of a LM), and the pruner's own
    options. Unknown names/options raise ValueError listing close matches.
    """
    data = pruning_dict(cfg)
    name = data.pop("name")
    cls = get_pruner(name)
    layers = data.pop("layers", None)
    per_layer = data.pop("per_layer", None) or {}
    protect = data.pop("protect", None)
    layers = cls.default_layers(depth) if layers is None else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"{model}: pruning layers must be distinct block indices in [0, {depth}), got {layers}")
    per_layer = {int(k): dict(v) for k, v in dict(per_layer).items()}
    stray = sorted(set(per_layer) - set(layers))
    if stray:
        raise ValueError(f"{model}: per_layer names layers {stray} that are not in layers={layers}")
    ints = isinstance(protect, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in protect)
    if protect is not None and not ints:
        raise ValueError(f"{model}: pruning protect must be a list of int positions, got {protect!r}")
    _check_kwargs(name, cls, data)
    for kw in per_layer.values():
        _check_kwargs(name, cls, kw)
    pruners = cls.build_layers(layers, dim=dim, depth=depth, options=data, per_layer=per_layer)
    return PruningPlan(name, pruners, None if protect is None else list(protect), cls.kind)
