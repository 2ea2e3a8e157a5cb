"""Pure tensor functions (no parameters): the math of every variant, plus float64 references.

Tensors are (B, H, N, D) for queries and (B, H_kv, M, D) for keys/values unless a function
says otherwise. Masks follow :mod:`attnlib.masks` (True = may attend).
"""

from attnlib.functional.entmax import entmax15, entmax_attention, entmax_bisect, sparsemax
from attnlib.functional.local import local_attention, local_importance
from attnlib.functional.softmax import (
    reference_attention,
    repeat_kv,
    softmax_attention,
    softmax_importance,
)

__all__ = [
    "entmax15",
    "entmax_attention",
    "entmax_bisect",
    "local_attention",
    "local_importance",
    "reference_attention",
    "repeat_kv",
    "softmax_attention",
    "softmax_importance",
    "sparsemax",
]
