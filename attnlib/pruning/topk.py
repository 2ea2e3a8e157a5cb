"""Top-k token pruning by attention importance, with optional EViT-style fusion.

Keep the ``keep_ratio`` most attended tokens after a block (ratio of the real, unprotected
tokens, rounded up) - the "attentive token" rule of EViT (Liang et al., ICLR 2022, "Not All
Patches are What You Need") with the importance of the attention contract (mass received,
averaged over heads and queries, instead of the class token's attention row, so it serves
models without a class token). With ``fuse`` the dropped tokens are merged into one extra
token, their importance-weighted average (EViT's "inattentive token fusion").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner, score_query_of, select_tokens

__all__ = ["TopKPruner"]


@register_pruner("topk")
class TopKPruner(TokenPruner):
    """Keep a fixed ratio of tokens by importance.

    Args:
        keep_ratio: fraction in (0, 1] of the real, unprotected tokens kept (ceil); 1.0 keeps
            all (the pruner is then the identity, bit for bit).
        fuse: append one token, sum_j s_j x_j / sum_j s_j over the dropped tokens j (EViT);
            its index is -1.
        min_keep: keep at least this many unprotected tokens per row.
        score: ``"mean"`` (default: attention received, averaged over heads and queries - the
            contract's ``importance``, for any model) or ``"cls"`` (the class token's attention
            row averaged over heads: EViT's exact rule; needs a class token and a variant with
            attention weights).

    Shapes: x (B, N, C), importance (B, N) -> x (B, N', C), N' = protected + ceil(ratio * rest) (+1 fused).
    """

    def __init__(
        self,
        *,
        dim: int,
        layer: int,
        depth: int,
        keep_ratio: float = 0.7,
        fuse: bool = False,
        min_keep: int = 1,
        score: str = "mean",
    ) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"topk keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"topk min_keep must be an int >= 0, got {min_keep!r}")
        self.keep_ratio, self.fuse, self.min_keep = float(keep_ratio), bool(fuse), min_keep
        self.score = score
        self.score_query = score_query_of("topk", score)
        self.synthesizes = self.fuse  # type: ignore[misc]
        # keep-all asks the block for no importance, so it runs the very kernels of the unpruned model
        self.needs_importance = self.keep_ratio < 1.0  # type: ignore[misc]

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        if self.keep_ratio >= 1.0:
            return self.identity(x, mask)
        assert importance is not None
        b, n, _ = x.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        prot = torch.zeros_like(valid) if protected is None else protected
        cand = valid & ~prot
        n_c = cand.sum(1)
        k = torch.ceil(n_c.double() * self.keep_ratio - 1e-9).long()
        k = torch.minimum(torch.clamp(k, min=self.min_keep), n_c)
        score = importance.float().masked_fill(~cand, -math.inf)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        keep = (cand & (rank < k[:, None])) | (prot & valid)
        xk, index, new_mask = select_tokens(x, keep)
        if not self.fuse:
            return PruneOutput(xk, index, new_mask)
        dropped = cand & ~keep
        w = (importance * dropped).to(x.dtype)
        fused = (w[..., None] * x).sum(1, keepdim=True) / w.sum(1).clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]
        has = dropped.any(1)
        km = new_mask if new_mask is not None else torch.ones(index.shape, dtype=torch.bool, device=x.device)
        out_mask = torch.cat([km, has[:, None]], 1)
        return PruneOutput(
            torch.cat([xk, fused], 1),
            torch.cat([index, index.new_full((b, 1), -1)], 1),
            None if bool(out_mask.all()) else out_mask,
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, keep_ratio={self.keep_ratio}, fuse={self.fuse}, score={self.score!r}"
