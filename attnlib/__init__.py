"""attnlib: interchangeable attention mechanisms behind one drop-in module.

>>> import attnlib, torch
>>> attn = attnlib.Attention(dim=64, num_heads=4, variant="local", window=8, causal=True)
>>> attn(torch.randn(2, 32, 64)).shape
torch.Size([2, 32, 64])

See :func:`available` for the registered variants and :func:`variant_info` for what each
supports. Masks are boolean with True = may attend (:mod:`attnlib.masks`).
"""

from attnlib import analysis, functional, kernels, masks, ot, variants
from attnlib.attention import Attention, AttentionExtras, aux_loss, build_attention
from attnlib.decoding import AttentionCache
from attnlib.errors import UnsupportedError
from attnlib.masks import BlockMask, KeyPadding, SlidingWindow
from attnlib.multihead import MultiheadAttention
from attnlib.registry import Capabilities, available, register_variant, variant_info
from attnlib.variants import build_core

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionCache",
    "AttentionExtras",
    "BlockMask",
    "Capabilities",
    "KeyPadding",
    "MultiheadAttention",
    "SlidingWindow",
    "UnsupportedError",
    "analysis",
    "aux_loss",
    "available",
    "build_attention",
    "build_core",
    "functional",
    "kernels",
    "masks",
    "ot",
    "register_variant",
    "variant_info",
    "variants",
]
