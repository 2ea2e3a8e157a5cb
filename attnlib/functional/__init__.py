"""Pure tensor functions (no parameters): the math of every variant, plus float64 references.

Tensors are (B, H, N, D) for queries and (B, H_kv, M, D) for keys/values unless a function
says otherwise. Masks follow :mod:`attnlib.masks` (True = may attend).
"""

from attnlib.functional.entmax import entmax15, entmax_attention, entmax_bisect, sparsemax
from attnlib.functional.kernelized import (
    draw_random_features,
    fourier_mixing,
    kernelized_rpe_attention,
    kernelized_rpe_reference,
    positive_random_features,
    toeplitz_matmul,
    toeplitz_matrix,
)
from attnlib.functional.local import local_attention, local_importance
from attnlib.functional.sinkhorn import sinkhorn_attention
from attnlib.functional.softmax import (
    reference_attention,
    repeat_kv,
    softmax_attention,
    softmax_importance,
)

__all__ = [
    "draw_random_features",
    "entmax15",
    "entmax_attention",
    "entmax_bisect",
    "fourier_mixing",
    "kernelized_rpe_attention",
    "kernelized_rpe_reference",
    "local_attention",
    "local_importance",
    "positive_random_features",
    "reference_attention",
    "repeat_kv",
    "sinkhorn_attention",
    "softmax_attention",
    "softmax_importance",
    "sparsemax",
    "toeplitz_matmul",
    "toeplitz_matrix",
]
