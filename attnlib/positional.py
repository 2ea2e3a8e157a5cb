"""Rotary position embeddings (Su et al., "RoFormer", 2021), rotate-half convention.

For a head vector x at position p, pairs (x_i, x_{i + D/2}) are rotated by the angle
``p * base^(-2i / D)``. Applied to queries and keys, it makes q·k depend on the relative
offset only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., N, D) by angles with cos/sin of shape (N, D/2)."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary embedding for heads of size ``head_dim`` (even).

    ``forward(x, offset)`` rotates x (B, H, N, D) as positions offset .. offset + N - 1.
    Angles are computed in float64 and cached per length and device.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        if base <= 0:
            raise ValueError(f"rotary base must be positive, got {base}")
        self.head_dim = head_dim
        self.base = float(base)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def angles(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (L, D/2) float64 with L >= length (grown in powers of two)."""
        key = str(device)
        hit = self._cache.get(key)
        if hit is None or hit[0].shape[0] < length:
            size = 1 << max(6, (length - 1).bit_length())
            inv = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            ang = torch.arange(size, dtype=torch.float64)[:, None] * inv[None, :]
            hit = (ang.cos().to(device), ang.sin().to(device))
            self._cache[key] = hit
        return hit

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """x (B, H, N, D) at positions offset .. offset + N - 1 -> rotated (B, H, N, D).

        ``positions`` (B, N) or (N,) long gives each token its own position instead (e.g. the
        original positions of the tokens a pruner kept); ``offset`` is then added to them.
        """
        n = x.shape[-2]
        if positions is not None:
            if positions.shape[-1] != n or positions.dim() not in (1, 2):
                raise ValueError(f"positions must be (B, N) or (N,) with N={n}, got shape {tuple(positions.shape)}")
            pos = positions.long() + offset
            cos, sin = self.angles(int(pos.max()) + 1, x.device)
            c, s = cos[pos], sin[pos]  # (B, N, D/2) or (N, D/2)
            if c.dim() == 3:
                c, s = c[:, None], s[:, None]
            return apply_rotary(x, c, s)
        cos, sin = self.angles(offset + n, x.device)
        return apply_rotary(x, cos[offset : offset + n], sin[offset : offset + n])
