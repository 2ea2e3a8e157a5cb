"""CoaT conv-attention: ``factorized`` (linear-time factorized attention) and ``coat`` (plus CRPE).

Xu, Xu, Chang & Tu, "Co-Scale Conv-Attentional Image Transformers" (ICCV 2021,
arXiv:2104.06399). The math is in :mod:`attnlib.functional.factorized`.

* ``factorized``: ``scale * Q (softmax_N(K)^T V)`` - the softmax over the key (token) axis, no
  attention matrix, O(N D^2). Self- and cross-attention, key padding; no positions of its own.
* ``coat``: factorized attention plus the convolutional relative position encoding
  ``Q_img * DWConv(V_img)`` with learned depthwise kernels (head groups of kernel sizes 3/5/7),
  the conv-attention of CoaT's serial blocks. Grid-aware: the tokens are ``num_prefix_tokens``
  followed by an (H, W) grid (``grid``, default square), so it is self-attention only.

Neither has a causal form (``causal=True`` raises :class:`attnlib.UnsupportedError`): the
token-axis softmax normalises each key against all others, later ones included.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from attnlib._validation import non_negative_int, optional_positive_number
from attnlib.functional.factorized import conv_relative_position, crpe_head_split, factorized_attention
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["CoaTAttention", "FactorizedAttention"]

_PAPER = "Xu et al. 2021, Co-Scale Conv-Attentional Image Transformers (CoaT)"


def _caps(*, grid: bool) -> Capabilities:
    # ``coat`` reads its tokens as a grid: self-attention only, no key padding (a padded batch of
    # sequences is no grid; models that pad therefore refuse it at build time), and neither weights
    # nor importance (its CRPE term is no attention over the keys)
    return Capabilities(
        causal=False,
        cross=not grid,
        key_padding=not grid,
        complexity="O(N)",
        exact=False,
        has_weights=not grid,
        trainable=grid,
        permutation_equivariant=not grid,
        importance=not grid,
        family="factorized",
        paper=_PAPER,
    )


@register_variant("factorized")
class FactorizedAttention(AttentionCore):
    """CoaT factorized attention ``scale * Q (softmax_N(K)^T V)``, linear in the sequence length.

    ``weights`` are the explicit linear map ``scale * Q softmax_N(K)^T`` (signed; rows do not sum
    to one) and ``importance`` its mean over the queries, computed in O(M D).

    Args:
        scale: default head_dim**-0.5.
    """

    capabilities = _caps(grid=False)

    def __init__(self, *, num_heads: int, head_dim: int, scale: float | None = None) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.scale = optional_positive_number(scale, f"{self.name}: scale")

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
        res = factorized_attention(
            q,
            k,
            v,
            key_padding=mask.key_padding,
            scale=self.scale,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        if isinstance(res, Tensor):
            return CoreOutput(res)
        out, *rest = res
        return CoreOutput(
            out,
            weights=rest.pop(0) if need_weights else None,
            importance=rest.pop(0) if need_importance else None,
        )


@register_variant("coat")
class CoaTAttention(FactorizedAttention):
    """CoaT conv-attention: factorized attention + convolutional relative position encoding.

    ``out = scale * Q (softmax_N(K)^T V) + Q_img * DWConv(V_img)``; prefix tokens' CRPE rows are 0.

    Args:
        num_prefix_tokens: tokens in front of the grid (a ViT's class token: 1). A ViT passes
            its own count to every variant that takes this option.
        grid: (H, W) of the grid tokens, or None: inferred from the sequence length per call (so
            one module serves several resolutions) - square when the grid-token count is a perfect
            square, else its most square factorisation (H <= W; 1 x N for a prime count).
        windows: CRPE kernel sizes per head, ``{kernel: heads}`` or one kernel size; default the
            official ``{3: 2, 5: 3, 7: 3}`` for 8 heads and the same proportions otherwise
            (:func:`attnlib.functional.factorized.crpe_head_split`).
        scale: default head_dim**-0.5.

    Kernels are initialised like ``nn.Conv2d`` (CoaT keeps the PyTorch default). The CRPE needs
    the same tokens as queries and values on one grid: self-attention only, no key padding
    (:func:`attnlib.functional.factorized.conv_relative_position` takes one for direct use).
    """

    capabilities = _caps(grid=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_prefix_tokens: int = 0,
        grid: tuple[int, int] | list[int] | None = None,
        windows: Mapping[int, int] | int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, scale=scale)
        self.num_prefix_tokens = non_negative_int(num_prefix_tokens, "coat: num_prefix_tokens")
        self.grid: tuple[int, int] | None = None
        if grid is not None:
            ok = isinstance(grid, (tuple, list)) and len(grid) == 2
            if not ok or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
                raise ValueError(f"coat: grid must be None or a pair of positive ints (H, W), got {grid!r}")
            self.grid = (int(grid[0]), int(grid[1]))
        self.windows = crpe_head_split(num_heads, windows)
        self.convs = nn.ModuleList(
            nn.Conv2d(heads * head_dim, heads * head_dim, kernel, padding=kernel // 2, groups=heads * head_dim)
            for kernel, heads in self.windows.items()
        )

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
        res = super().attend(q, k, v, mask, cross=cross, need_weights=False, need_importance=False, dropout_p=dropout_p)
        ev = conv_relative_position(
            q,
            v,
            [c.weight for c in self.convs],
            [c.bias for c in self.convs],
            num_prefix_tokens=self.num_prefix_tokens,
            grid=self.grid,
        )
        res.out = res.out + ev.to(res.out.dtype)
        return res

    def extra_repr(self) -> str:
        grid = "most square" if self.grid is None else self.grid
        extra = f", num_prefix_tokens={self.num_prefix_tokens}, grid={grid}, windows={self.windows}"
        return super().extra_repr() + extra
