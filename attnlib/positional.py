"""Rotary position embeddings (Su et al., "RoFormer", 2021), rotate-half convention.

For a head vector x at position p, pairs (x_i, x_{i + D/2}) are rotated by the angle
``p * base^(-2i / D)``. Applied to queries and keys, it makes q·k depend on the relative
offset only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["RotaryCall", "RotaryEmbedding", "RotaryPositions", "apply_rotary", "rotate_at"]


class RotaryPositions:
    """Per-token rotary positions whose gathered cos/sin tables are built once and shared.

    Pass it wherever a ``positions`` tensor is accepted (:meth:`attnlib.Attention.forward`,
    ``forward_groups``, :meth:`RotaryEmbedding.rotate_tokens`): every block that receives the
    same object reuses one gather of the token-wide tables instead of repeating it (e.g. the
    blocks after a token pruner, which all see the kept tokens' original positions; the gather is
    a large share of such a block's rotary cost). The positions are copied on construction, so
    later changes to the source tensor cannot make the cached tables stale.

    Args:
        positions: (B, N) or (N,) (or, packed, (T,)) long positions.
    """

    def __init__(self, positions: Tensor) -> None:
        if not isinstance(positions, Tensor) or positions.dim() not in (1, 2) or positions.is_floating_point():
            raise ValueError(f"RotaryPositions needs a (B, N) or (N,) integer tensor, got {positions!r:.80}")
        self.positions = positions.long().clone()
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def shape(self) -> torch.Size:
        """Shape of the positions: (B, N) or (N,)."""
        return self.positions.shape

    def dim(self) -> int:
        """Number of dimensions of the positions (1 or 2)."""
        return self.positions.dim()

    def tables(
        self, rope: RotaryEmbedding, offset: int, heads: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (*shape, heads, D), of ``positions + offset`` for ``rope``; cached per settings."""
        key = (rope.head_dim, rope.base, offset, heads, dtype, str(device))
        hit = self._tables.get(key)
        if hit is None:
            hit = rope.gather_tables(self.positions.to(device), offset, heads, dtype)
            self._tables[key] = hit
        return hit


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., N, D) by angles with cos/sin of shape (N, D/2)."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rotate_at(x: Tensor, positions: Tensor, base: float, *, inverse: bool = False) -> Tensor:
    """Rotate x (B, H, n, D) at positions (n,), (B, n) or (B, H, n) (int or float), frequencies ``base^(-2i/D)``.

    ``inverse`` undoes the rotation (angles negated): ``rotate_at(rotate_at(x, p, b), p, b, inverse=True) == x``.
    Angles are computed in float64.
    """
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(device=x.device, dtype=torch.float64)[..., None] * inv  # (*positions.shape, D/2)
    if ang.dim() == 3:  # (B, n): one position per batch row and token, shared by the heads
        ang = ang[:, None]
    sin = -ang.sin() if inverse else ang.sin()
    return apply_rotary(x, ang.cos(), sin)


@dataclass(frozen=True)
class RotaryCall:
    """The rotary positions an :class:`attnlib.Attention` applied to the q and k it hands to a core.

    Passed to the cores that declare ``uses_rotary`` (e.g. a gate that pools pre-rotary vectors).
    ``q_positions`` (N,) or (B, N) and ``k_positions`` (M,) or (B, M) are long; ``base`` the
    frequency base; the module rotated every head dimension (``head_dim`` = D of q and k).
    """

    base: float
    q_positions: Tensor
    k_positions: Tensor

    def unrotate_q(self, q: Tensor) -> Tensor:
        """The pre-rotary queries of q (B, H, N, D)."""
        return rotate_at(q, self.q_positions, self.base, inverse=True)

    def unrotate_k(self, k: Tensor) -> Tensor:
        """The pre-rotary keys of k (B, H_kv, M, D)."""
        return rotate_at(k, self.k_positions, self.base, inverse=True)


def _check_positions(positions: Tensor | RotaryPositions, n: int, batch: int | None) -> None:
    """Per-token positions must be (N,) or, when x has a batch dim ``batch``, (B, N) with B in (1, batch)."""
    two_d = batch is not None and positions.dim() == 2 and positions.shape[0] in (1, batch)
    if positions.shape[-1] != n or not (positions.dim() == 1 or two_d):
        form = "(N,)" if batch is None else f"(B, N) with B={batch} (or 1) or (N,)"
        raise ValueError(f"positions must be {form} with N={n}, got shape {tuple(positions.shape)}")


def _offset_positions(positions: Tensor, offset: int) -> Tensor:
    """``positions + offset`` as long, checked >= 0 (a negative index would wrap around a table)."""
    pos = positions.long() + offset
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError(f"rotary positions must be >= 0 (after the offset {offset}), got min {int(pos.min())}")
    return pos


def _rotate_half_matrix(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(D, D) signed permutation P with ``x @ P = cat(-x2, x1)`` for x = cat(x1, x2) (exact: one +-1 per column)."""
    h = d // 2
    eye = torch.eye(h, dtype=dtype, device=device)
    zero = torch.zeros(h, h, dtype=dtype, device=device)
    return torch.cat((torch.cat((zero, eye), 1), torch.cat((-eye, zero), 1)), 0)


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
        # token-layout tables: (device, dtype, heads) -> (cos, sin) (L, heads * D) and the rotate-half matrix
        self._wide: dict[tuple[str, torch.dtype, int], tuple[Tensor, Tensor, Tensor]] = {}

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

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | RotaryPositions | None = None) -> Tensor:
        """x (B, H, N, D) at positions offset .. offset + N - 1 -> rotated (B, H, N, D).

        ``positions`` (B, N) or (N,) long gives each token its own position instead (e.g. the
        original positions of the tokens a pruner kept); ``offset`` is then added to them.
        """
        n = x.shape[-2]
        if isinstance(positions, RotaryPositions):
            positions = positions.positions
        if positions is not None:
            _check_positions(positions, n, x.shape[0] if x.dim() >= 3 else None)
            pos = _offset_positions(positions, offset)
            cos, sin = self.angles(int(pos.max()) + 1, x.device)
            c, s = cos[pos], sin[pos]  # (B, N, D/2) or (N, D/2)
            if c.dim() == 3:
                c, s = c[:, None], s[:, None]
            return apply_rotary(x, c, s)
        cos, sin = self.angles(offset + n, x.device)
        return apply_rotary(x, cos[offset : offset + n], sin[offset : offset + n])

    def _wide_tables(
        self, length: int, heads: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """cos and sin (L, heads * D) in ``dtype`` (each head's D/2 angles twice; L >= length) and P (D, D)."""
        key = (str(device), dtype, heads)
        hit = self._wide.get(key)
        if hit is None or hit[0].shape[0] < length:
            cos, sin = self.angles(length, device)
            wide = [torch.cat((t, t), -1).to(dtype).repeat(1, heads) for t in (cos, sin)]
            hit = (wide[0], wide[1], _rotate_half_matrix(self.head_dim, dtype, device))
            self._wide[key] = hit
        return hit

    def gather_tables(self, positions: Tensor, offset: int, heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, each (*positions.shape, heads, D) in ``dtype``, of ``positions + offset`` (long)."""
        pos = _offset_positions(positions, offset)
        cos, sin, _ = self._wide_tables(int(pos.max()) + 1 if pos.numel() else 1, heads, positions.device, dtype)
        flat = pos.reshape(-1)
        shape = (*pos.shape, heads, self.head_dim)
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)

    def rotate_tokens(self, x: Tensor, offset: int = 0, positions: Tensor | RotaryPositions | None = None) -> Tensor:
        """Rotate heads stored token-major: x (B, N, G, D) (or (N, G, D)) -> rotated, same shape, contiguous.

        The layout of a projection's output before the heads are split off, so the query and key
        heads of a token (G = H + H_kv) are rotated together, in one pass. Positions are
        ``offset .. offset + N - 1``, or ``positions`` (B, N) or (N,) long plus ``offset`` (a
        :class:`RotaryPositions` reuses its gathered tables across calls). Equals :meth:`forward`
        on the head-major view (same products and sums per element:
        ``x * cos + rotate_half(x) * sin``, with ``rotate_half`` an exact signed-permutation
        matmul), several times faster on CPU: the cos/sin tables are as wide as a token's
        G * D features, so no operation runs over D/2-long rows.
        """
        if x.dim() not in (3, 4) or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"rotate_tokens: x must be (B, N, G, D) or (N, G, D) with D={self.head_dim}, got {tuple(x.shape)}"
            )
        n, g, d = x.shape[-3], x.shape[-2], x.shape[-1]
        if positions is not None:
            _check_positions(positions, n, x.shape[0] if x.dim() == 4 else None)
            if isinstance(positions, RotaryPositions):
                c, s = positions.tables(self, offset, g, x.device, x.dtype)
            else:
                c, s = self.gather_tables(positions, offset, g, x.dtype)
            rot = self._wide_tables(1, g, x.device, x.dtype)[2]
        else:
            cos, sin, rot = self._wide_tables(offset + n, g, x.device, x.dtype)
            c, s = cos[offset : offset + n].view(n, g, d), sin[offset : offset + n].view(n, g, d)
        swapped = torch.matmul(x, rot)  # cat(-x2, x1) per head, exactly
        swapped.mul_(s)
        return torch.mul(x, c).add_(swapped)
