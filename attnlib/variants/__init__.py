"""Attention variants, one module per family. Importing this package registers them all.

Each core maps q (B, H, N, D), k/v (B, H_kv, M, D) to (B, H, N, Dv); see
:class:`attnlib.variants.base.AttentionCore`. To add a variant: write its math in
:mod:`attnlib.functional`, a class in a family module of this package (an existing one or a new
file: every public module here is imported by :func:`load_all`, no list to edit), decorate it
with ``@register_variant("name")``, give it ``capabilities`` and add
``configs/attention/<name>.yaml`` - the conformance suite picks it up.

Families: ``dense`` (softmax, local), ``linear`` (linear, performer, cosformer, lsa,
ecoformer), ``flow`` (flow), ``aft`` (aft_full, aft_local, aft_simple, aft_conv), ``sparse``
(block_sparse, grat, seer, mosa, sparsifiner, swinbert_mask), ``entmax``, ``kernelized``
(kernelized_rpe, fnet), ``ot`` (sinkhorn, got).
"""

import importlib
import pkgutil

from attnlib.variants._build import build_core
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["AttentionCore", "CoreOutput", "build_core", "family_modules", "load_all"]


def family_modules() -> list[str]:
    """Names of the public modules of this package (private ``_`` modules left out), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_all() -> list[str]:
    """Import every family module, which registers its variants; returns the module names.

    A module that fails to import raises ImportError naming it (its variants would otherwise
    be missing from :func:`attnlib.available` without a word).
    """
    names = family_modules()
    for name in names:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except Exception as e:
            raise ImportError(f"attnlib.variants: family module {__name__}.{name} failed to import: {e}") from e
    return names


load_all()
