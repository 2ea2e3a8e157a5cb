"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Patch embedding (a strided convolution), a class token or mean pooling, learned absolute
positions, pre-norm blocks with stochastic depth, and a linear head. The attention is any
registered variant, given as a config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnlib.models.blocks import AttentionConfig, TransformerBlock, init_weights, make_pruning
from attnlib.models.ragged import LengthGroups, group_by_length
from attnlib.positional import RotaryPositions

__all__ = ["ViT"]


def _pair(x: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    t = (x, x) if isinstance(x, int) else tuple(x)
    if len(t) != 2 or any(not isinstance(v, int) or v <= 0 for v in t):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {x!r}")
    return t  # type: ignore[return-value]


class ViT(nn.Module):
    """Vision Transformer classifier.

    Args:
        attention: attention config, e.g. ``{"variant": "softmax"}``.
        img_size: image (H, W) or side; must be divisible by ``patch_size``.
        patch_size: patch (P_h, P_w) or side.
        in_chans: image channels C.
        num_classes: classes K.
        dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        pool: "cls" (class token) or "mean" (mean of patch tokens).
        drop_path: stochastic depth rate, linearly increasing over the blocks to this value.
        dropout: dropout on embeddings and residual branches; attn_dropout: in the attention.
        rope: rotary positions inside the attention (1-D over the patch sequence) in addition
            to the learned absolute positions.
        pruning: token-pruning config (:mod:`attnlib.pruning`), e.g. ``{"name": "topk",
            "keep_ratio": 0.5, "layers": [1]}``: after each listed block the pruner drops tokens
            (the class token is protected by default); later blocks run on the kept tokens.
            ``last_kept_index`` then holds the original positions of the final tokens (B, N')
            (-1 for synthesised ones).
        ragged: how rows that keep different numbers of tokens run the later blocks in eval:
            ``"groups"`` (default) packs the real tokens and runs the attention once per distinct
            length on unpadded rows (:mod:`attnlib.models.ragged`; no padding computed, each image
            gets exactly its own-batch result); ``"pad"`` runs one padded batch with a key-padding
            mask (the longest row's cost for every row). Training always pads (stochastic depth
            and the pruners' training modes work on whole rows).
        sigma_reparam: sigmaReparam (Zhai et al. 2023) on every Linear and the patch-embedding
            convolution (attention q/k/v slices and output, MLP, head), see
            :func:`attnlib.modifiers.apply_sigma_reparam`.

    Shapes: ``forward(images (B, C, H, W), patch_mask=None | (B, num_patches) bool) -> (B, K)``.
    ``patch_mask`` marks real patches (True) for variable-size images padded to ``img_size``.
    """

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        img_size: int | tuple[int, int] = 8,
        patch_size: int | tuple[int, int] = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        rope: bool = False,
        pruning: Any = None,
        ragged: str = "groups",
        sigma_reparam: bool = False,
    ) -> None:
        super().__init__()
        if ragged not in ("groups", "pad"):
            raise ValueError(f"ragged must be 'groups' or 'pad', got {ragged!r}")
        self.ragged = ragged
        ih, iw = _pair(img_size, "img_size")
        ph, pw = _pair(patch_size, "patch_size")
        if ih % ph or iw % pw:
            raise ValueError(f"img_size {(ih, iw)} must be divisible by patch_size {(ph, pw)}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.img_size, self.patch_size, self.in_chans = (ih, iw), (ph, pw), in_chans
        self.grid = (ih // ph, iw // pw)
        self.num_patches = self.grid[0] * self.grid[1]
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=(ph, pw), stride=(ph, pw))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        n_tok = self.num_patches + (pool == "cls")
        self.pos_embed = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads,
                attention,
                model="ViT",
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=r,
                rope=rope,
            )
            for r in rates
        )
        self.rope = rope
        self.pruning = make_pruning(
            pruning, attention, dim=dim, depth=depth, model="ViT", positional=rope, cls_token=pool == "cls"
        )
        self.last_kept_index: Tensor | None = None
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)
        if self.pruning is not None:
            self.pruning.reset_parameters()
        if sigma_reparam:
            from attnlib.modifiers.sigma_reparam import apply_sigma_reparam

            apply_sigma_reparam(self)

    def features(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images (B, C, H, W) -> pooled features (B, dim)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(
                f"ViT expects images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(images.shape)}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, dim)
        b = x.shape[0]
        mask = None
        if patch_mask is not None:
            if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != (b, self.num_patches):
                raise ValueError(
                    f"patch_mask must be bool (B, num_patches) = ({b}, {self.num_patches}), "
                    f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
                )
            mask = patch_mask
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        x = self.drop(x + self.pos_embed)
        if self.pruning is None:
            for blk in self.blocks:
                x = blk(x, key_padding_mask=mask)
        else:
            x, mask = self._pruned_blocks(x, mask)
        x = self.norm(x)
        if self.cls_token is not None:
            return x[:, 0]
        if mask is None:
            return x.mean(1)
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)

    def _pruned_blocks(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Run the blocks with the pruners after their layers: x (B, N, dim) -> (B, N', dim), mask (B, N') | None.

        After a pruner leaves rows of different lengths, eval with ``ragged="groups"`` runs the
        next blocks on the packed real tokens (:class:`LengthGroups`) and unpacks them only for the
        next pruner and at the end.
        """
        assert self.pruning is not None
        n0 = x.shape[1]
        index = torch.arange(n0, device=x.device).expand(x.shape[0], n0)  # original positions
        default = [0] if self.cls_token is not None else []
        groups: LengthGroups | None = None  # set while x is packed (T, dim)
        # rotary positions of the kept tokens, built once per pruner and shared by the blocks after
        # it (one gather of the rotary tables); None before the first pruner (rows still 0..N-1)
        positions: RotaryPositions | None = None
        for i, blk in enumerate(self.blocks):
            pr = self.pruning.get(i)
            need_imp = pr is not None and pr.needs_importance
            query = pr.score_query if need_imp else None
            if groups is not None and query is not None:  # attention rows need the padded layout
                x, groups = groups.unpack(x), None
                positions = RotaryPositions(index) if self.rope else None
            if groups is not None:
                res = blk.forward_groups(x, groups.groups, positions=positions, return_importance=need_imp)
                if pr is None:
                    x = res  # type: ignore[assignment]
                    continue
                x, imp_p = res if need_imp else (res, None)  # type: ignore[misc]
                imp = None if imp_p is None else groups.unpack(imp_p)
                x, groups = groups.unpack(x), None
            else:
                if pr is None:
                    x = blk(x, key_padding_mask=mask, positions=positions)
                    continue
                if need_imp:
                    x, imp = blk(
                        x, key_padding_mask=mask, positions=positions, return_importance=True, importance_query=query
                    )
                else:
                    x, imp = blk(x, key_padding_mask=mask, positions=positions), None
            out = pr(x, imp, mask, self.pruning.protected(index, n0, default))
            index = torch.where(out.index >= 0, index.gather(1, out.index.clamp_min(0)), out.index)
            x, mask = out.x, out.mask
            if mask is not None and self.ragged == "groups" and not self.training and i + 1 < len(self.blocks):
                groups = group_by_length(mask)
                x = groups.pack(x)
            if self.rope:
                positions = RotaryPositions(index if groups is None else groups.pack(index))
        if groups is not None:
            x = groups.unpack(x)
        self.last_kept_index = index
        return x, mask

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images (B, C, H, W) -> class logits (B, num_classes)."""
        return self.head(self.features(images, patch_mask))
