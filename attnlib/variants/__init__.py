"""Attention variants, one module per family. Importing this package registers them all.

Each core maps q (B, H, N, D), k/v (B, H_kv, M, D) to (B, H, N, Dv); see
:class:`attnlib.variants.base.AttentionCore`. To add a variant: write a class in its family
module (or a new one imported here), decorate it with ``@register_variant("name")``, give it
``capabilities`` and add ``configs/attention/<name>.yaml`` - the conformance suite picks it up.

Families: ``dense`` (softmax, local), ``linear`` (linear, performer, cosformer, lsa,
ecoformer), ``flow`` (flow), ``aft`` (aft_full, aft_local, aft_simple, aft_conv), ``sparse``
(block_sparse, grat, seer, mosa, sparsifiner, swinbert_mask), ``entmax``, ``kernelized``
(kernelized_rpe, fnet), ``ot`` (sinkhorn, got).
"""

from attnlib.variants import aft, dense, entmax, flow, kernelized, linear, ot, sparse
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = [
    "AttentionCore",
    "CoreOutput",
    "aft",
    "dense",
    "entmax",
    "flow",
    "kernelized",
    "linear",
    "ot",
    "sparse",
]
