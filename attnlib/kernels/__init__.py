"""Attention kernels: Triton kernels with PyTorch paths for every device.

* :func:`block_sparse_attention` - exact softmax attention over a
  :class:`attnlib.masks.BlockMask`, visiting only active blocks (Triton forward/backward on
  CUDA, a fused PyTorch path elsewhere).

* :func:`entmax_attention_fused` - alpha-entmax attention (sparse probabilities) with the
  threshold of each query row found inside a Triton kernel that streams over key tiles
  (forward and backward; CUDA, or the interpreter on CPU).

Triton is optional: it is imported only when a Triton path runs. ``TRITON_INTERPRET=1`` runs
the Triton kernels on CPU tensors through Triton's interpreter (for tests).
"""

from attnlib.kernels.block_sparse import (
    KernelBackend,
    block_sparse_attention,
    triton_available,
    triton_supports,
)
from attnlib.kernels.entmax import entmax_attention_fused, fused_entmax_supports

__all__ = [
    "KernelBackend",
    "block_sparse_attention",
    "entmax_attention_fused",
    "fused_entmax_supports",
    "triton_available",
    "triton_supports",
]
