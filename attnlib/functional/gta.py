"""GTA: geometric transform attention (Miyato, Jaeger, Welling & Geiger, ICLR 2024, arXiv:2310.10375).

Every token i carries a group element g_i (its camera pose, its patch position, ...) and
``rho`` is a representation of the group acting on each head's channels, block-diagonal. GTA
expresses every key and value in the query's frame::

    O_i = sum_j softmax_j( q_i^T rho(g_i^{-1} g_j) k_j / sqrt(D) ) rho(g_i^{-1} g_j) v_j

and, because ``rho`` is a homomorphism, computes it with any attention kernel in between a pre-
and a post-transform (official code ``autonomousvision/gta``, ``source/utils/gta.py``)::

    q~_i = rho(g_i^{-1})^T q_i,   k~_j = rho(g_j) k_j,   v~_j = rho(g_j) v_j,
    O_i  = rho(g_i^{-1}) Attn(q~, k~, v~)_i.

A :class:`Geometry` holds the representation matrices of one call. Channel layout per head
(as the official code): first the untransformed ("trivial") channels, then each
:class:`RepBlock` in order, ``copies`` blocks of ``size`` channels each. Builders:

* :func:`grid_so2` - 2-D patch positions: 2x2 rotations by ``max_freq * 2 pi * coord * f_k``
  per axis at ``F`` frequencies ``f_k = 2^k / 2^F`` (k = 1..F), coordinates ``row / H`` and
  ``col / W`` (the official ``make_2dcoord`` / ``make_SO2mats``): a 2-D RoPE when ``v_transform``
  is off. Tokens without a position (a class token) get the identity.
* :func:`pose_blocks` - homogeneous camera poses in SE(3) (4x4) or SE(2) (3x3), translation
  multiplied by ``trans_coeff``, inverse in closed form, one pose per view shared by the view's
  tokens.
* :func:`angle_so2` - rotation angles (e.g. a 2-D camera's heading) at integer frequencies:
  the irreducible representations of SO(2).

:func:`gta_reference` is the defining equation with explicit (i, j) loops in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlib._validation import describe, positive_int

__all__ = [
    "Geometry",
    "RepBlock",
    "angle_so2",
    "grid_so2",
    "gta_output",
    "gta_reference",
    "gta_transform",
    "pose_blocks",
    "rigid_inverse",
]


@dataclass(frozen=True)
class RepBlock:
    """One channel group of a block-diagonal representation.

    Attributes:
        q: (B|1, N, c, s, s) ``rho(g_i)`` of the queries' group elements (c blocks of size s).
        q_inv: (B|1, N, c, s, s) ``rho(g_i)^{-1}``.
        k: (B|1, M, c, s, s) ``rho(g_j)`` of the keys' elements (the same tensor as ``q`` in
            self-attention).
        name: a label ("so2", "se3", ...), for messages.
    """

    q: Tensor
    q_inv: Tensor
    k: Tensor
    name: str = "block"

    @property
    def size(self) -> int:
        """Block size s."""
        return int(self.q.shape[-1])

    @property
    def copies(self) -> int:
        """Number of blocks c (channels used: c * s)."""
        return int(self.q.shape[-3])

    @property
    def channels(self) -> int:
        """Channels of each head this group transforms, c * s."""
        return self.size * self.copies


@dataclass(frozen=True)
class Geometry:
    """The group representations of one GTA call: pass as ``Attention(...)(x, geometry=...)``.

    Attributes:
        blocks: the transformed channel groups, after ``head_dim - channels`` trivial channels.
        v_transform: also transform the values and map the output back to the query's frame
            (GTA's default); False transforms queries and keys only (a RoPE-like score bias).
    """

    blocks: tuple[RepBlock, ...]
    v_transform: bool = True

    @property
    def channels(self) -> int:
        """Transformed channels per head."""
        return sum(b.channels for b in self.blocks)

    def check(self, b: int, n: int, m: int, head_dim: int, *, where: str = "geometry") -> None:
        """ValueError unless the blocks fit B, N queries, M keys and ``head_dim`` channels."""
        if self.channels > head_dim:
            raise ValueError(
                f"{where}: the representation transforms {self.channels} channels per head "
                f"({', '.join(f'{x.name}: {x.copies}x{x.size}' for x in self.blocks)}) but the head size is {head_dim}"
            )
        for blk in self.blocks:
            for label, t, rows in (("q", blk.q, n), ("q_inv", blk.q_inv, n), ("k", blk.k, m)):
                ok = t.dim() == 5 and t.shape[0] in (1, b) and t.shape[1] == rows and t.shape[-1] == t.shape[-2]
                if not ok or t.shape[2:] != blk.q.shape[2:]:
                    raise ValueError(
                        f"{where}: block {blk.name!r} {label} must be (B|1={b}, {rows}, c, s, s) with the "
                        f"same (c, s) as q, got {describe(t)}"
                    )

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Geometry:
        """The same geometry with every matrix cast / moved."""
        cast = [
            RepBlock(x.q.to(device, dtype), x.q_inv.to(device, dtype), x.k.to(device, dtype), x.name)
            for x in self.blocks
        ]
        return Geometry(tuple(cast), self.v_transform)


def _apply(mats: Tensor, x: Tensor, *, transpose: bool = False) -> Tensor:
    """Block matrices (B|1, T, c, s, s) applied to x (B, H, T, c*s) -> (B, H, T, c*s)."""
    c, s = mats.shape[-3], mats.shape[-1]
    xs = x.unflatten(-1, (c, s))
    m = mats.to(x.dtype)[:, None]  # (B|1, 1, T, c, s, s)
    if transpose:
        m = m.transpose(-1, -2)
    # out_i = sum_j m_ij x_j as s broadcast multiply-adds: faster than einsum / matmul for 2x2 - 4x4 blocks
    out = m[..., 0] * xs[..., :1]
    for j in range(1, s):
        out = out + m[..., j] * xs[..., j : j + 1]
    return out.flatten(-2)


def _map_groups(x: Tensor, geometry: Geometry, fn: Callable[[RepBlock, Tensor], Tensor]) -> Tensor:
    """Apply ``fn(block, channels)`` to each block's channel slice of x (..., D); trivial channels kept."""
    triv = x.shape[-1] - geometry.channels
    parts, start = [x[..., :triv]], triv
    for blk in geometry.blocks:
        parts.append(fn(blk, x[..., start : start + blk.channels]))
        start += blk.channels
    return torch.cat(parts, -1)


def gta_transform(q: Tensor, k: Tensor, v: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    """GTA's pre-transform: ``q~ = rho(g_i^{-1})^T q``, ``k~ = rho(g_j) k``, ``v~ = rho(g_j) v``.

    q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) (Dv == D when ``v_transform``).
    """
    geometry.check(q.shape[0], q.shape[2], k.shape[2], q.shape[-1], where="gta_transform")
    qt = _map_groups(q, geometry, lambda blk, x: _apply(blk.q_inv, x, transpose=True))
    kt = _map_groups(k, geometry, lambda blk, x: _apply(blk.k, x))
    if not geometry.v_transform:
        return qt, kt, v
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"gta_transform: v_transform needs Dv == D, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    return qt, kt, _map_groups(v, geometry, lambda blk, x: _apply(blk.k, x))


def gta_output(out: Tensor, geometry: Geometry) -> Tensor:
    """GTA's post-transform ``O_i = rho(g_i^{-1}) out_i`` (identity without ``v_transform``): (B, H, N, D)."""
    if not geometry.v_transform:
        return out
    return _map_groups(out, geometry, lambda blk, x: _apply(blk.q_inv, x))


def _dense(blocks: Sequence[Tensor], d: int) -> Tensor:
    """Block-diagonal (..., D, D) matrices from per-group (..., c, s, s) blocks after D - sum(c s) trivial channels."""
    lead = blocks[0].shape[:-3] if blocks else ()
    out = torch.zeros(*lead, d, d, dtype=torch.float64)
    idx = torch.arange(d)
    out[..., idx, idx] = 1.0
    start = d - sum(t.shape[-3] * t.shape[-1] for t in blocks)
    for t in blocks:
        s = t.shape[-1]
        for c in range(t.shape[-3]):
            out[..., start : start + s, start : start + s] = t[..., c, :, :].double()
            start += s
    return out


def gta_reference(
    q: Tensor, k: Tensor, v: Tensor, geometry: Geometry, *, allowed: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """The defining equation, explicitly (float64, tiny sizes; the tests' oracle).

    For every (i, j) builds ``R_ij = rho(g_i)^{-1} rho(g_j)`` = ``rho(g_i^{-1} g_j)`` as a dense
    block-diagonal (D, D) matrix and computes
    ``O_i = sum_j softmax_j(q_i^T R_ij k_j * scale) R_ij v_j`` (``R_ij v_j`` replaced by ``v_j``
    without ``v_transform``). q (B, H, N, D), k, v (B, H, M, D); ``allowed`` (B|1, H|1, N, M)
    bool or None. Rows with no allowed key are 0.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    sc = d**-0.5 if scale is None else scale
    pq = _dense([x.q.expand(b, *x.q.shape[1:]) for x in geometry.blocks], d)  # (B, N, D, D)
    pk = _dense([x.k.expand(b, *x.k.shape[1:]) for x in geometry.blocks], d)  # (B, M, D, D)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    full = torch.ones(b, h, n, m, dtype=torch.bool) if allowed is None else allowed.expand(b, h, n, m)
    for bi in range(b):
        for i in range(n):
            inv = torch.linalg.inv(pq[bi, i])
            rel = [inv @ pk[bi, j] for j in range(m)]
            for hi in range(h):
                ok = [j for j in range(m) if bool(full[bi, hi, i, j])]
                if not ok:
                    continue
                s = torch.stack([q[bi, hi, i].double() @ rel[j] @ k[bi, hi, j].double() * sc for j in ok])
                p = torch.softmax(s, 0)
                for pj, j in zip(p, ok, strict=True):
                    vj = v[bi, hi, j].double()
                    out[bi, hi, i] += pj * (rel[j] @ vj if geometry.v_transform else vj)
    return out


# -- builders ------------------------------------------------------------------------------------


def _rot2(theta: Tensor) -> Tensor:
    """(...,) angles -> (..., 2, 2) rotation matrices [[cos, -sin], [sin, cos]]."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _self(mats: Tensor, name: str, inv: Tensor | None = None) -> RepBlock:
    """A block for self-attention: keys carry the queries' elements."""
    return RepBlock(mats, mats.transpose(-1, -2) if inv is None else inv, mats, name)


def grid_so2(
    grid: tuple[int, int],
    num_freqs: int = 8,
    *,
    max_freq: float | tuple[float, float] = 1.0,
    num_prefix_tokens: int = 0,
    coord_scale: float | tuple[float, float] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RepBlock:
    """The so2 block of 2-D patch positions, for self-attention over ``num_prefix_tokens`` + H*W tokens.

    Token (r, c) of the grid has coordinates ``(r * a, c * b)`` with ``(a, b) = coord_scale``,
    default ``(1 / H, 1 / W)`` (the official ``make_2dcoord``: coordinates in [0, 1)); a fixed
    scale (e.g. ``1 / H_train``) keeps the frequencies of a training resolution at other
    resolutions. Per frequency ``f_k = 2^k / 2^F`` (k = 1..F) and axis, a 2x2 rotation by
    ``max_freq * 2 pi * coord * f_k``: 2F blocks (4F channels), frequency-major, rows before
    columns. Prefix tokens get identity blocks. Returns a :class:`RepBlock` (1, P + H*W, 2F, 2, 2).
    """
    f = positive_int(num_freqs, "grid_so2: num_freqs")
    gh, gw = grid
    mf = (max_freq, max_freq) if isinstance(max_freq, (int, float)) else tuple(max_freq)
    scale = (1.0 / gh, 1.0 / gw) if coord_scale is None else coord_scale
    scale = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw) * scale[0]
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh) * scale[1]
    freqs = 2.0 ** torch.arange(1, f + 1, dtype=torch.float64) / 2.0**f
    th = torch.stack(
        [mf[0] * 2 * math.pi * rows[:, None] * freqs, mf[1] * 2 * math.pi * cols[:, None] * freqs], -1
    )  # (H*W, F, 2): frequency-major, axis-minor
    mats = _rot2(th.flatten(1))  # (H*W, 2F, 2, 2)
    eye = torch.eye(2, dtype=torch.float64).expand(num_prefix_tokens, 2 * f, 2, 2)
    mats = torch.cat([eye, mats])[None].to(device=device, dtype=dtype)
    return _self(mats, "so2")


def angle_so2(
    angles: Tensor, freqs: Sequence[float] = (1.0,), *, keys: Tensor | None = None, dtype: torch.dtype | None = None
) -> RepBlock:
    """Rotation blocks of per-token angles at the given frequencies: ``rot(f * theta)`` per frequency.

    ``angles`` (B, N) (radians) of the queries' tokens, ``keys`` (B, M) of the keys' (default the
    same: self-attention). Integer frequencies give representations of SO(2) (angles mod 2 pi).
    Returns a :class:`RepBlock` (B, N, len(freqs), 2, 2).
    """
    fr = torch.tensor(list(freqs), dtype=torch.float64)
    dt = dtype or angles.dtype

    def mats(a: Tensor) -> Tensor:
        return _rot2(a.double()[..., None] * fr).to(dt)

    q = mats(angles)
    k = q if keys is None else mats(keys)
    return RepBlock(q, q.transpose(-1, -2), k, "so2_angle")


def rigid_inverse(pose: Tensor) -> Tensor:
    """Inverse of homogeneous rigid transforms (..., n+1, n+1) ``[R t; 0 1]`` -> ``[R^T -R^T t; 0 1]``.

    Assumes R is orthogonal (a rotation), as camera poses are; exact, no matrix inversion.
    """
    n = pose.shape[-1] - 1
    r = pose[..., :n, :n]
    t = pose[..., :n, n:]
    rt = r.transpose(-1, -2)
    out = torch.zeros_like(pose)
    out[..., :n, :n] = rt
    out[..., :n, n:] = -rt @ t
    out[..., n, n] = 1.0
    return out


def pose_blocks(
    poses: Tensor,
    tokens_per_view: int,
    copies: int,
    *,
    key_poses: Tensor | None = None,
    trans_coeff: float = 1.0,
    name: str | None = None,
) -> RepBlock:
    """Camera poses as homogeneous blocks: SE(3) (4x4) or SE(2) (3x3), one per view, shared by its tokens.

    Args:
        poses: (B, V, n+1, n+1) rigid transforms ``[R t; 0 1]`` of the queries' views; the
            tokens are view-major (view v holds tokens v*T .. v*T + T - 1).
        tokens_per_view: T.
        copies: blocks per head (channels used: copies * (n + 1)).
        key_poses: (B, V', n+1, n+1) of the keys' views (default ``poses``: self-attention).
        trans_coeff: translations multiplied by this (the official ``trans_coeff``; a group
            automorphism, so still a representation) - large translations make the blocks
            ill-conditioned.

    Returns:
        A :class:`RepBlock` (B, V*T, copies, n+1, n+1); query inverses in closed form
        (:func:`rigid_inverse`), never ``rho(g)^T`` (these blocks are not orthogonal).
    """
    positive_int(tokens_per_view, "pose_blocks: tokens_per_view")
    positive_int(copies, "pose_blocks: copies")

    def scaled(p: Tensor) -> Tensor:
        if p.dim() != 4 or p.shape[-1] != p.shape[-2] or p.shape[-1] not in (3, 4):
            raise ValueError(
                f"pose_blocks: poses must be (B, V, 3, 3) (SE(2)) or (B, V, 4, 4) (SE(3)), got {describe(p)}"
            )
        out = p.clone()
        out[..., :-1, -1] = out[..., :-1, -1] * trans_coeff
        return out

    def per_token(p: Tensor) -> Tensor:
        return p.repeat_interleave(tokens_per_view, 1)[:, :, None].expand(-1, -1, copies, -1, -1)

    pq = scaled(poses)
    pk = pq if key_poses is None else scaled(key_poses)
    label = name or ("se3" if poses.shape[-1] == 4 else "se2")
    return RepBlock(per_token(pq), per_token(rigid_inverse(pq)), per_token(pk), label)
