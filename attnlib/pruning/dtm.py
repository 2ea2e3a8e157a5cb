"""Deformable token merging (DTM), LIT's token reduction between stages.

Pan, Zhuang, Liu, He & Cai, "Less is More: Pay Less Attention in Vision Transformers" (AAAI 2022,
arXiv:2105.14217); official code github.com/zhuang-group/LIT (``DeformablePatchMerging``). The
patch grid (H, W) is merged 2x2 into (H/2, W/2) by a 2x2, stride-2 deformable convolution whose
offsets come from a 2x2, stride-2 convolution of the same map (zero-initialised, so DTM starts
as a plain strided convolution), then BatchNorm and GELU:

    Y(p0) = sum_{n in 2x2 taps} w_n X(2 p0 + p_n + delta_n(p0)),   delta = Conv_2x2/2(X)

(:func:`attnlib.functional.deformable.deform_conv2d`, bilinear, zeros outside). It synthesises
tokens (index -1), like TokenLearner; protected tokens (a class token) pass in front unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.errors import UnsupportedError
from attnlib.functional.deformable import deform_conv2d
from attnlib.functional.grid import infer_grid
from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner

__all__ = ["DeformableTokenMerging"]

NORMS = ("batch", "layer", "none")


@register_pruner("dtm")
class DeformableTokenMerging(TokenPruner):
    """LIT's deformable token merging: P protected tokens + an (H, W) grid -> P + (H/2)(W/2) tokens.

    Args:
        out_dim: output channels (default ``dim``: a ViT keeps its width; LIT doubles it between
            stages).
        norm: ``"batch"`` (LIT: BatchNorm2d), ``"layer"`` or ``"none"``; GELU follows unless ``"none"``.
        offset_scale: the offsets are ``offset_scale * Conv(X)``. LIT trains the offset branch with
            a 0.01 learning-rate multiplier; under Adam(W), scaling the branch's output by 0.01
            moves the offsets at about 0.01 of the rate, without a separate parameter group.
        grid: (H, W) of the grid tokens; default square.

    Shapes: x (B, P + H*W, C) -> (B, P + (H/2)(W/2), out_dim); H and W must be even. The
    protected tokens must sit at the same positions in every row, and there must be no padding
    (a padded batch is no grid). ``last_offsets`` keeps the last (B, 8, H/2, W/2) offsets.
    """

    needs_importance = False
    synthesizes = True

    def __init__(
        self,
        *,
        dim: int,
        layer: int,
        depth: int,
        out_dim: int | None = None,
        norm: str = "batch",
        offset_scale: float = 0.01,
        grid: tuple[int, int] | list[int] | None = None,
    ) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if norm not in NORMS:
            raise ValueError(f"dtm norm must be one of {NORMS}, got {norm!r}")
        out = dim if out_dim is None else int(out_dim)
        self.offset = nn.Conv2d(dim, 8, kernel_size=2, stride=2)
        self.proj = nn.Conv2d(dim, out, kernel_size=2, stride=2)
        self.norm = nn.BatchNorm2d(out) if norm == "batch" else nn.GroupNorm(1, out) if norm == "layer" else None
        self.offset_scale = float(offset_scale)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.last_offsets: Tensor | None = None
        self.reset_pruner_parameters()

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Once, in the middle of the network (between LIT's "stages")."""
        return [max(depth // 2 - 1, 0)]

    def reset_pruner_parameters(self) -> None:
        """Zero offsets (DTM starts as a strided convolution); ``Conv2d``'s default init for the kernel."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.proj.reset_parameters()

    def merge(self, img: Tensor) -> Tensor:
        """img (B, C, H, W) -> (B, out_dim, H/2, W/2): deformable conv, then norm and GELU."""
        off = self.offset_scale * self.offset(img)
        self.last_offsets = off.detach()
        y = deform_conv2d(img, off, self.proj.weight, self.proj.bias, stride=2)
        if self.norm is None:
            return y
        return F.gelu(self.norm(y))

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        b, n, c = x.shape
        if mask is not None and not bool(mask.all()):
            raise UnsupportedError("dtm merges a full patch grid; it cannot follow padding (a patch mask or a pruner)")
        prot = torch.zeros(n, dtype=torch.bool, device=x.device)
        if protected is not None and bool(protected.any()):
            if not bool((protected == protected[:1]).all()):
                raise ValueError("dtm needs the protected tokens at the same positions in every row")
            prot = protected[0]
        keep_idx = prot.nonzero().flatten()
        rest = x[:, ~prot]
        h, w = infer_grid(rest.shape[1], 0, self.grid, where="dtm")
        if h % 2 or w % 2:
            raise ValueError(f"dtm merges 2x2: the grid {(h, w)} must have even sides")
        img = rest.transpose(1, 2).reshape(b, c, h, w)
        merged = self.merge(img).flatten(2).transpose(1, 2)
        index = torch.cat([keep_idx.expand(b, -1), keep_idx.new_full((b, merged.shape[1]), -1)], 1)
        return PruneOutput(torch.cat([x[:, keep_idx], merged], 1), index, None)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, offset_scale={self.offset_scale}"
