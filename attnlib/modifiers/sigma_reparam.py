"""sigmaReparam (Zhai et al., ICML 2023, "Stabilizing Transformer Training by Preventing
Attention Entropy Collapse"): every linear weight reparametrised as ``W_hat = (gamma / sigma(W)) W``.

``sigma(W)`` is the spectral norm, estimated by one power-iteration step per training step from a
persistent vector ``u`` (initialised as the top right singular vector by an SVD), and ``gamma`` a
learned scalar (initialised to ``sigma(W)``, so ``W_hat = W`` at the start). Implemented as a
``torch.nn.utils.parametrize`` parametrization: the module keeps its class, its original weight
lives at ``<module>.parametrizations.weight.original``.

* :class:`SigmaReparam` - the ``sigma_reparam`` modifier: an :class:`attnlib.Attention`'s fused
  q/k/v projection (one sigma and one gamma per q / k / v slice) and its output projection.
* :func:`apply_sigma_reparam` - every Linear (and Conv, flattened to out x in·k·k) of a model: the
  paper's recipe (``sigma_reparam=True`` on :class:`attnlib.models.ViT` / ``DecoderLM``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from attnlib.functional.modifiers import spectral_power_step, spectral_sigma
from attnlib.modifiers.base import Modifier, register_modifier

__all__ = [
    "GAMMA_INIT",
    "SigmaReparam",
    "SpectralReparam",
    "apply_sigma_reparam",
    "init_weight_target",
    "reparametrize_attention",
    "reset_sigma_reparam",
]

GAMMA_INIT = ("sigma", "one")


class SpectralReparam(nn.Module):
    """The parametrization ``W -> (gamma_s / sigma(W_s)) W_s`` for row slices s of W.

    Args:
        weight: the weight it will parametrize (out, ...); used for the shapes and the initial state.
        splits: row counts of the slices (sum = out); default one slice. The fused q/k/v
            projection of :class:`attnlib.Attention` uses ``[dim, kv_dim, kv_dim]``.
        gamma_init: "sigma" (gamma = sigma(W) at init, so W_hat = W: the official PyTorch code)
            or "one" (gamma = 1: the official JAX speech code).

    Buffers ``u`` (slices, in) and the parameter ``gamma`` (slices,) are in the state_dict. The
    power-iteration step updates ``u`` in training mode, at most once per change of the weight
    (an optimizer step), so repeated reads of the weight within a step agree; in eval ``u`` is
    fixed. The estimate runs in float32 (float64 for float64 weights), also under autocast.
    """

    def __init__(self, weight: Tensor, splits: Sequence[int] | None = None, *, gamma_init: str = "sigma") -> None:
        super().__init__()
        if gamma_init not in GAMMA_INIT:
            raise ValueError(f"sigma_reparam: gamma_init must be one of {GAMMA_INIT}, got {gamma_init!r}")
        rows = weight.shape[0]
        self.splits = [rows] if splits is None else [int(s) for s in splits]
        if sum(self.splits) != rows or any(s <= 0 for s in self.splits):
            raise ValueError(f"sigma_reparam: splits {self.splits} must be positive and sum to {rows} rows")
        self.gamma_init = gamma_init
        cols = weight[0].numel()
        self.register_buffer("u", torch.zeros(len(self.splits), cols, dtype=weight.dtype, device=weight.device))
        self.gamma = nn.Parameter(torch.ones(len(self.splits), dtype=weight.dtype, device=weight.device))
        self._seen_version: int | None = None
        self.reset(weight)

    def _slices(self, w2: Tensor) -> list[Tensor]:
        return list(w2.split(self.splits, 0))

    @torch.no_grad()
    def reset(self, weight: Tensor) -> None:
        """Re-initialise ``u`` (top right singular vector of each slice, by SVD) and ``gamma`` from ``weight``."""
        w2 = weight.detach().flatten(1).double()
        for i, part in enumerate(self._slices(w2)):
            _, s, vh = torch.linalg.svd(part, full_matrices=False)
            self.u[i] = vh[0].to(self.u.dtype)
            self.gamma[i] = float(s[0]) if self.gamma_init == "sigma" else 1.0
        self._seen_version = None

    def sigmas(self, weight: Tensor) -> Tensor:
        """The current spectral-norm estimates of the slices, (slices,), without updating ``u``."""
        w2 = weight.flatten(1)
        acc = torch.float64 if w2.dtype == torch.float64 else torch.float32
        return torch.stack([spectral_sigma(p.to(acc), u.to(acc)) for p, u in zip(self._slices(w2), self.u)])

    def forward(self, weight: Tensor) -> Tensor:
        w2 = weight.flatten(1)
        acc = torch.float64 if w2.dtype == torch.float64 else torch.float32
        with torch.autocast(w2.device.type, enabled=False):
            wa = w2.to(acc)
            parts = self._slices(wa)
            version = weight._version
            if self.training and version != self._seen_version:
                for i, p in enumerate(parts):
                    self.u[i] = spectral_power_step(p.detach(), self.u[i].to(acc)).to(self.u.dtype)
                self._seen_version = version
            out = [
                p * (g / spectral_sigma(p, u.to(acc, copy=True))) for p, g, u in zip(parts, self.gamma.to(acc), self.u)
            ]
            return torch.cat(out, 0).to(weight.dtype).view_as(weight)

    def extra_repr(self) -> str:
        return f"splits={self.splits}, gamma_init={self.gamma_init!r}"


def _reparametrized(module: nn.Module) -> bool:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    return plist is not None and any(isinstance(p, SpectralReparam) for p in plist)


def _register(module: nn.Module, splits: Sequence[int] | None, gamma_init: str) -> None:
    if _reparametrized(module):
        return
    parametrize.register_parametrization(
        module, "weight", SpectralReparam(module.weight, splits, gamma_init=gamma_init), unsafe=True
    )


def reparametrize_attention(attn: nn.Module, *, gamma_init: str = "sigma") -> None:
    """sigmaReparam on an :class:`attnlib.Attention`'s projections: the fused ``in_proj`` with one
    sigma / gamma per q, k, v slice, and ``out_proj``. Modules already reparametrised are skipped."""
    kv = int(attn.num_kv_heads) * int(attn.head_dim)  # type: ignore[arg-type]
    _register(attn.in_proj, [int(attn.dim), kv, kv], gamma_init)  # type: ignore[arg-type]
    _register(attn.out_proj, None, gamma_init)  # type: ignore[arg-type]


def apply_sigma_reparam(model: nn.Module, *, gamma_init: str = "sigma") -> nn.Module:
    """sigmaReparam on every Linear and Conv1d/2d weight of ``model`` (in place; returns ``model``).

    Attention modules get per-q/k/v sigmas on their fused projection (:func:`reparametrize_attention`).
    Left alone: weights shared with another module (tied embeddings), modules inside an attention
    variant's core (they initialise their own parameters the way their paper says) and modules
    already reparametrised.
    """
    from attnlib.variants.base import AttentionCore

    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    skip: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, AttentionCore):
            skip.update(id(m) for m in mod.modules())
    for mod in list(model.modules()):
        if id(mod) in skip:
            continue
        if hasattr(mod, "in_proj") and hasattr(mod, "num_kv_heads") and hasattr(mod, "out_proj"):
            reparametrize_attention(mod, gamma_init=gamma_init)
            skip.update({id(mod.in_proj), id(mod.out_proj)})
            continue
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not _reparametrized(mod):
            if counts.get(id(mod.weight), 1) > 1:
                continue
            _register(mod, None, gamma_init)
    return model


def init_weight_target(module: nn.Module) -> Tensor:
    """The tensor to initialise for ``module.weight``: the original weight of a parametrised module."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[union-attr]
    return module.weight  # type: ignore[return-value]


def reset_sigma_reparam(module: nn.Module) -> None:
    """After re-initialising a reparametrised module's original weight: re-derive ``u`` and ``gamma``
    of its :class:`SpectralReparam` (no-op for other modules)."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return
    for p in plist:
        if isinstance(p, SpectralReparam):
            p.reset(plist.original)


@register_modifier("sigma_reparam")
class SigmaReparam(Modifier):
    """sigmaReparam on the attention's projections (q/k/v slices of ``in_proj`` and ``out_proj``).

    For the paper's full recipe (every Linear of attention *and* MLP) use the model option
    ``sigma_reparam=True`` (:func:`apply_sigma_reparam`). Active in training and inference.

    Args:
        gamma_init: "sigma" (default; W_hat = W at initialisation) or "one".
    """

    def __init__(self, *, gamma_init: str = "sigma", when: str | None = None) -> None:
        super().__init__(when=when)
        if self.when != "always":
            raise ValueError("sigma_reparam reparametrises the weights themselves: when must be 'always'")
        if gamma_init not in GAMMA_INIT:
            raise ValueError(f"sigma_reparam: gamma_init must be one of {GAMMA_INIT}, got {gamma_init!r}")
        self.gamma_init = gamma_init

    def attach(self, attn: nn.Module) -> None:
        reparametrize_attention(attn, gamma_init=self.gamma_init)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"gamma_init": "one"}
