"""Pure tensor functions (no parameters): the math of every variant, plus float64 references.

Tensors are (B, H, N, D) for queries and (B, H_kv, M, D) for keys/values unless a function
says otherwise (the AFT functions work per channel on (..., T, C)). Masks follow
:mod:`attnlib.masks` (True = may attend).
"""

from typing import Any

from attnlib.functional._common import repeat_kv
from attnlib.functional.aft import aft_conv, aft_full, aft_local, aft_simple
from attnlib.functional.ecoformer import (
    binarize,
    ecoformer_attention,
    hash_kernel_features,
    kernelized_hash,
    learn_ksh_hash,
)
from attnlib.functional.entmax import entmax15, entmax_attention, entmax_bisect, sparsemax
from attnlib.functional.flow import flow_attention
from attnlib.functional.kernelized import (
    draw_random_features,
    fourier_mixing,
    kernelized_rpe_attention,
    kernelized_rpe_reference,
    positive_random_features,
    toeplitz_matmul,
    toeplitz_matrix,
)
from attnlib.functional.linear import (
    cosformer_attention,
    linear_attention,
    linear_self_attention,
    performer_attention,
    performer_projection,
)
from attnlib.functional.local import local_attention, local_importance
from attnlib.functional.sinkhorn import sinkhorn_attention
from attnlib.functional.softmax import (
    biased_softmax_attention,
    reference_attention,
    softmax_attention,
    softmax_attention_importance,
    softmax_importance,
    softmax_query_weights,
)

__all__ = [
    "aft_conv",
    "aft_full",
    "aft_local",
    "aft_simple",
    "attention",
    "biased_softmax_attention",
    "binarize",
    "cosformer_attention",
    "draw_random_features",
    "ecoformer_attention",
    "entmax15",
    "entmax_attention",
    "entmax_bisect",
    "flow_attention",
    "fourier_mixing",
    "hash_kernel_features",
    "kernelized_hash",
    "kernelized_rpe_attention",
    "kernelized_rpe_reference",
    "learn_ksh_hash",
    "linear_attention",
    "linear_self_attention",
    "local_attention",
    "local_importance",
    "performer_attention",
    "performer_projection",
    "positive_random_features",
    "reference_attention",
    "repeat_kv",
    "sinkhorn_attention",
    "softmax_attention",
    "softmax_attention_importance",
    "softmax_importance",
    "softmax_query_weights",
    "sparsemax",
    "toeplitz_matmul",
    "toeplitz_matrix",
]


def __getattr__(name: str) -> Any:
    """``attention``: the by-name entry point, which builds a variant's core. It lives in
    :mod:`attnlib.variants` (above this package) and is looked up lazily, the one name here that
    is not pure math."""
    if name == "attention":
        from attnlib.variants._build import attention

        return attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
