"""Agreement between variants: how far other attentions' weights are from a model's own, layer by layer.

:func:`variant_agreement` runs a model once. At every attention call it gives the same q, k,
v and mask - the model's own activations - to a *shadow* core of each other variant (built
with the layer's head count and size, on the same device and dtype) and compares the weights
row by row: KL(own || other), Jensen-Shannon, L1, and the relative error of the outputs. Each
layer therefore sees exactly the inputs of the model's own forward, so the numbers measure the
attention approximation itself, not errors compounded through the layers.

E.g. a softmax model against ``flow`` and ``performer``: ``variant_agreement(model, run,
["flow", "performer"])``. Variants that cannot take a call's mask are reported with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.analysis.capture import Removable, attention_sites, core_call_hooks, site_core
from attnlib.analysis.measures import js_divergence, kl_divergence, l1_distance
from attnlib.errors import UnsupportedError
from attnlib.registry import get_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["Agreement", "variant_agreement"]


@dataclass
class Agreement:
    """Per-layer, per-head agreement of one variant with the model's own attention.

    Attributes:
        variant: the compared variant's name.
        kl, js, l1: (L, H) row-wise KL(own || other) and JS divergences (nats, rows renormalised)
            and L1 distance, averaged over batch and the rows that may attend; NaN where a layer
            has no comparable weights (KL/JS also where a side has signed weights).
        out_rel_error: (L,) ``||o_other - o_own|| / ||o_own||`` of the core outputs.
        skipped: {layer name: reason} for calls the variant could not take.
    """

    variant: str
    kl: Tensor
    js: Tensor
    l1: Tensor
    out_rel_error: Tensor
    skipped: dict[str, str] = field(default_factory=dict)


def _row_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over batch and valid rows: x (B, H, N), valid (B|1, H|1, N) -> (H,)."""
    v = valid.expand_as(x).to(x.dtype)
    x = torch.where(v > 0, x, torch.zeros_like(x))
    return x.sum((0, 2)) / v.sum((0, 2)).clamp_min(1.0)


def _compare(own: CoreOutput, other: CoreOutput, mask: Any) -> dict[str, Tensor]:
    h = own.out.shape[1]
    nan = torch.full((h,), float("nan"), dtype=torch.float64)
    res = {"kl": nan, "js": nan, "l1": nan}
    num = (other.out.double() - own.out.double()).norm()
    res["out"] = (num / own.out.double().norm().clamp_min(1e-30)).reshape(1)
    if own.weights is None or other.weights is None:
        return res
    p, q = own.weights.detach().double(), other.weights.detach().double()
    allowed = mask.dense() if mask is not None and not mask.is_empty else None
    valid = (allowed.any(-1) if allowed is not None else torch.ones(1, 1, p.shape[2], dtype=torch.bool)).to(p.device)
    res["l1"] = _row_mean(l1_distance(p, q, allowed), valid).cpu()
    try:
        res["kl"] = _row_mean(kl_divergence(p, q, allowed), valid).cpu()
        res["js"] = _row_mean(js_divergence(p, q, allowed), valid).cpu()
    except ValueError:  # signed weights on one side: no distribution to compare
        pass
    return res


def variant_agreement(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    variants: Sequence[str] | Mapping[str, Mapping[str, Any]],
    *,
    seed: int = 0,
) -> dict[str, Agreement]:
    """Compare the model's attention with other variants on the model's own q, k, v at every layer.

    Args:
        model: a model with attention sites holding variant cores (e.g. built of
            :class:`attnlib.Attention`); its own variant must report weights.
        run: ``run(model)`` runs one forward (under ``torch.no_grad`` here), e.g.
            ``lambda m: m(images)``.
        variants: names, or ``{name: constructor kwargs}`` (e.g. ``{"performer": {"num_features": 64}}``).
        seed: torch seed for the shadow cores' own random parameters (e.g. random features).

    Returns:
        ``{variant: Agreement}``. The call's first forward per layer is compared (later calls of
        a layer inside ``run`` are ignored).
    """
    spec = {v: {} for v in variants} if not isinstance(variants, Mapping) else {k: dict(a) for k, a in variants.items()}
    sites = attention_sites(model)
    cores = [site_core(name, mod) for name, mod in sites]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        shadows = {
            v: [get_variant(v)(num_heads=c.num_heads, head_dim=c.head_dim, **kw) for c in cores]
            for v, kw in spec.items()
        }
    finally:
        torch.random.set_rng_state(gen_state)
    found: dict[str, dict[int, dict[str, Tensor]]] = {v: {} for v in spec}
    skipped: dict[str, dict[str, str]] = {v: {} for v in spec}
    handles: list[Removable] = []

    def make(layer: int, name: str) -> Any:
        def on_call(args: tuple[Any, ...], kwargs: dict[str, Any], out: CoreOutput) -> None:
            q, k, v, mask = args[:4]
            for var, cs in shadows.items():
                if layer in found[var] or name in skipped[var]:
                    continue
                sh: AttentionCore = cs[layer].to(device=q.device, dtype=q.dtype)
                try:
                    o = sh(q, k, v, mask, cross=bool(kwargs.get("cross", False)), need_weights=True)
                except UnsupportedError as e:
                    skipped[var][name] = str(e)
                    continue
                found[var][layer] = _compare(out, o, mask)

        return on_call

    def tokens_only(name: str, core: AttentionCore) -> Any:
        def on_tokens(_x: Tensor, _mask: Any, _out: CoreOutput) -> None:
            why = f"site {name!r} ({core.name}) computes the layer from its tokens: no per-head q, k, v to replay on"
            for var in shadows:
                skipped[var].setdefault(name, why)

        return on_tokens

    try:
        for layer, ((name, _), core) in enumerate(zip(sites, cores)):
            handles += core_call_hooks(
                core, make(layer, name), weights=True, importance=False, on_tokens=tokens_only(name, core)
            )
        with torch.no_grad():
            run(model)
    finally:
        for hd in handles:
            hd.remove()
    out: dict[str, Agreement] = {}
    for var in spec:
        rows = {key: [] for key in ("kl", "js", "l1", "out")}
        for layer, core in enumerate(cores):
            got = found[var].get(layer)
            nan = torch.full((core.num_heads,), float("nan"), dtype=torch.float64)
            for key in rows:
                rows[key].append(got[key] if got is not None else (nan[:1] if key == "out" else nan))
        out[var] = Agreement(
            var,
            kl=torch.stack(rows["kl"]),
            js=torch.stack(rows["js"]),
            l1=torch.stack(rows["l1"]),
            out_rel_error=torch.cat(rows["out"]),
            skipped=skipped[var],
        )
    return out
