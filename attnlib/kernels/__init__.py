"""Attention kernels: Triton kernels with PyTorch paths for every device.

* :func:`block_sparse_attention` - exact softmax attention over a
  :class:`attnlib.masks.BlockMask`, visiting only active blocks (Triton forward/backward on
  CUDA, a fused PyTorch path elsewhere).

Triton is optional: it is imported only when a Triton path runs. ``TRITON_INTERPRET=1`` runs
the Triton kernels on CPU tensors through Triton's interpreter (for tests).
"""

from attnlib.kernels.block_sparse import (
    KernelBackend,
    block_sparse_attention,
    triton_available,
    triton_supports,
)

__all__ = [
    "KernelBackend",
    "block_sparse_attention",
    "triton_available",
    "triton_supports",
]
