"""Kernelized / FFT family: ``kernelized_rpe`` (Luo et al. 2021) and ``fnet`` (Lee-Thorp et al. 2022).

* ``kernelized_rpe`` - "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
  Encoding" (Luo et al., NeurIPS 2021): L2-normalised q/k, positive random features, and a
  learned per-head bias ``b_r`` for every relative offset ``r = j - i`` applied as ``exp(b_r)``
  in a Toeplitz product computed by FFT - O(N log N) time, O(N) memory; causal by
  ``b_r = -inf`` for ``r > 0``. The math is :func:`attnlib.functional.kernelized_rpe_attention`.
* ``fnet`` - "FNet: Mixing Tokens with Fourier Transforms" (Lee-Thorp et al., NAACL 2022):
  ``Re(FFT2)`` over (sequence, hidden); parameter-free, non-causal, no masks, self only.

Not here: the "spectral token mixer" of Kiruluta (2025, "From Attention to Atoms", arXiv
2505.00033). Only its abstract and figure caption could be read; they describe a learned Fourier
dictionary with conv mixing coefficients and a pointer-generator head (FFTs only in an STFT
loss), not an attention layer, and the atom formula, normalisation and losses could not be
confirmed - so no ``spectral`` variant is offered.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from attnlib._validation import positive_int, positive_number
from attnlib.errors import UnsupportedError
from attnlib.functional.kernelized import (
    clipped_offset_bias,
    draw_random_features,
    fourier_mixing,
    kernelized_rpe_attention,
    kernelized_rpe_attention_2d,
    kernelized_rpe_reference,
    kernelized_rpe_reference_2d,
)
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["FNetMixing", "KernelizedRPEAttention", "share_rpe_bias"]


@register_variant("kernelized_rpe")
class KernelizedRPEAttention(AttentionCore):
    """Kernelized attention with relative positional encoding by FFT (Luo et al. 2021).

    ``out_i = sum_j exp(b_{j-i}) phi(q_i)·phi(k_j) v_j / sum_j exp(b_{j-i}) phi(q_i)·phi(k_j)``
    with ``q, k`` normalised to unit norm and ``phi`` positive random features, so it
    approximates ``softmax(q̂·k̂ + b_{j-i}) v`` (exact in expectation over the features for the
    numerator and denominator; the error falls like ``m^-1/2``).

    Images: with ``grid=(gh, gw)`` the last gh·gw tokens are the patches of a gh x gw grid in
    raster order and the bias is 2-D, one learned value per head for every (row, column) offset
    (Swin's relative positions, which the paper uses for ImageNet), applied by a 2-D FFT
    (:func:`attnlib.functional.kernelized_rpe_attention_2d`); leading tokens (a class token)
    carry no position (bias 0 to and from every token). The 1-D bias would give raster offsets that
    wrap across rows.

    The paper shares the bias table across layers (its Eq. 6: "for each j - i, b_{j-i} is a
    learnable scalar and shared across all layers"); an :class:`attnlib.Attention` owns its
    core, so each layer has its own table unless :func:`share_rpe_bias` ties them.

    Args:
        num_heads, head_dim: set by :class:`attnlib.Attention`.
        num_features: random features m (paper: 16-64; 32 for ImageNet, 64 for WikiText-103).
        max_distance: R; one learned bias per head for each offset in ``-R..R`` (offsets
            beyond are clipped to ``±R``, Shaw-style), initialised to 0 (a normalised Performer).
        grid: (gh, gw) for 2-D relative positions over an image grid (non-causal), or None (1-D).
        orthogonal: draw orthogonal random features (lower variance) instead of i.i.d. ones.
        eps: lower clamp of the normaliser.
        feature_chunk: random features per FFT batch (memory), default automatic.

    The random projection is a buffer (saved in the state dict); :meth:`redraw_features`
    samples a new one. ``need_weights`` returns the dense (N, N) weights (O(N^2), for
    inspection); the output always comes from the FFT path.
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=False,
        block_mask=False,
        window=False,
        complexity="O(N log N)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=False,
        gqa=False,
        permutation_equivariant=False,
        importance=True,
        family="kernelized",
        paper="Luo et al. 2021, Stable, Fast and Accurate: Kernelized Attention with RPE",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_features: int = 64,
        max_distance: int = 1024,
        orthogonal: bool = False,
        eps: float = 1e-6,
        feature_chunk: int | None = None,
        grid: tuple[int, int] | list[int] | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.grid = None if grid is None else tuple(positive_int(g, "kernelized_rpe: grid") for g in grid)
        if self.grid is not None and len(self.grid) != 2:
            raise ValueError(f"kernelized_rpe: grid must be (rows, cols), got {grid!r}")
        self.num_features = positive_int(num_features, "kernelized_rpe: num_features")
        self.max_distance = positive_int(max_distance, "kernelized_rpe: max_distance")
        if feature_chunk is not None:
            positive_int(feature_chunk, "kernelized_rpe: feature_chunk")
        positive_number(eps, "kernelized_rpe: eps")
        self.orthogonal = bool(orthogonal)
        self.eps = float(eps)
        self.feature_chunk = feature_chunk
        if self.grid is None:
            self.rpe_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_distance + 1))
        else:
            self.rpe_bias = nn.Parameter(torch.zeros(num_heads, 2 * self.grid[0] - 1, 2 * self.grid[1] - 1))
        self.register_buffer("projection", draw_random_features(num_features, head_dim, orthogonal=self.orthogonal))

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"num_features": 16, "max_distance": 6}

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Sample a new random projection (same shape, dtype and device)."""
        w = draw_random_features(self.num_features, self.head_dim, orthogonal=self.orthogonal, generator=generator)
        self.projection.copy_(w)

    def bias_table(self, n: int) -> Tensor:
        """Per-head bias over offsets ``-(n-1)..n-1``: (H, 2n - 1), offsets clipped to ``±max_distance``."""
        return clipped_offset_bias(self.rpe_bias, n, self.max_distance)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        *,
        cross: bool,
        need_weights: bool,
        need_importance: bool,
        dropout_p: float,
    ) -> CoreOutput:
        n = q.shape[2]
        kp = mask.key_padding
        if self.grid is not None:
            return self._attend_2d(q, k, v, mask, need_weights, need_importance)
        bias = self.bias_table(n)
        res = kernelized_rpe_attention(
            q,
            k,
            v,
            bias,
            self.projection,
            causal=mask.causal,
            key_padding=kp,
            eps=self.eps,
            return_importance=need_importance,
            feature_chunk=self.feature_chunk,
        )
        out, imp = res if isinstance(res, tuple) else (res, None)
        weights = None
        if need_weights:
            _, weights = kernelized_rpe_reference(
                q, k, v, bias, self.projection, causal=mask.causal, key_padding=kp, dtype=None
            )
            weights = weights.to(q.dtype)
        return CoreOutput(out, weights=weights, importance=imp)

    def _attend_2d(
        self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, need_weights: bool, need_importance: bool
    ) -> CoreOutput:
        """The 2-D (image grid) form."""
        if mask.causal:
            raise UnsupportedError(
                "kernelized_rpe with grid= (2-D relative positions) is non-causal; build it without grid for causal use"
            )
        assert self.grid is not None
        kp = mask.key_padding
        res = kernelized_rpe_attention_2d(
            q, k, v, self.rpe_bias, self.projection, self.grid, key_padding=kp, eps=self.eps,
            return_importance=need_importance, feature_chunk=self.feature_chunk,
        )  # fmt: skip
        out, imp = res if isinstance(res, tuple) else (res, None)
        weights = None
        if need_weights:
            _, weights = kernelized_rpe_reference_2d(
                q, k, v, self.rpe_bias, self.projection, self.grid, key_padding=kp, dtype=None
            )
            weights = weights.to(q.dtype)
        return CoreOutput(out, weights=weights, importance=imp)

    def extra_repr(self) -> str:
        grid = f", grid={self.grid}" if self.grid is not None else ""
        return super().extra_repr() + f", num_features={self.num_features}, max_distance={self.max_distance}{grid}"


def share_rpe_bias(model: nn.Module) -> nn.Parameter:
    """Tie the relative-position bias of every ``kernelized_rpe`` core in ``model`` to the first one's.

    The paper shares one bias table across all layers (its Eq. 6); attnlib layers own theirs until
    this ties them (all must have the same shape: same heads, ``max_distance`` / ``grid``).
    Returns the shared parameter; ValueError when there is no such core or the shapes differ.
    """
    cores = [m for m in model.modules() if isinstance(m, KernelizedRPEAttention)]
    if not cores:
        raise ValueError("share_rpe_bias: the model has no 'kernelized_rpe' attention")
    shared = cores[0].rpe_bias
    for c in cores[1:]:
        if c.rpe_bias.shape != shared.shape:
            raise ValueError(
                f"share_rpe_bias: bias tables differ in shape ({tuple(c.rpe_bias.shape)} vs {tuple(shared.shape)})"
            )
        c.rpe_bias = shared
    return shared


@register_variant("fnet")
class FNetMixing(AttentionCore):
    """FNet Fourier mixing: ``Re(FFT2)`` over (sequence, hidden) of the values.

    Inside :class:`attnlib.Attention` the core mixes the value projection of all heads
    together (hidden = H·Dv) and the output projection follows, so the block is
    ``W_o Re(F_N (X W_v) F_C)``; q and k are not used (their projection rows get no gradient).
    The paper's exact parameter-free layer is :func:`attnlib.functional.fourier_mixing` applied
    to x directly.

    It cannot do what needs selective attention: no causal form (the DFT mixes all positions),
    no masks (padding tokens are mixed in), no cross-attention, no weights.

    Args:
        norm: "ortho" (default here: variance-preserving, 1/sqrt(N·C)) or "backward" (the paper's
            unnormalised DFT, output variance ~ N·C/2 x the input's; a post-LN absorbs it).
    """

    capabilities = Capabilities(
        causal=False,
        cross=False,
        key_padding=False,
        full_mask=False,
        block_mask=False,
        window=False,
        complexity="O(N log N)",
        exact=False,
        has_weights=False,
        trainable=False,
        attn_dropout=False,
        gqa=False,
        permutation_equivariant=False,
        importance=False,
        family="kernelized",
        paper="Lee-Thorp et al. 2022, FNet: Mixing Tokens with Fourier Transforms",
    )

    def __init__(self, *, num_heads: int, head_dim: int, norm: str = "ortho") -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        if norm not in ("ortho", "backward"):
            raise ValueError(f"fnet: norm must be 'ortho' or 'backward' (the paper's unnormalised DFT), got {norm!r}")
        self.norm = norm

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        *,
        cross: bool,
        need_weights: bool,
        need_importance: bool,
        dropout_p: float,
    ) -> CoreOutput:
        h = v.shape[1]
        x = rearrange(v, "b h n d -> b n (h d)")
        y = fourier_mixing(x, norm=self.norm)
        return CoreOutput(rearrange(y, "b n (h d) -> b h n d", h=h))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm={self.norm!r}"
