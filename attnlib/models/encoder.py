"""Transformer encoder for sequence classification (e.g. ListOps, LRA-style text tasks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlib.models.blocks import AttentionConfig, TransformerBlock, init_weights

__all__ = ["EncoderClassifier"]


class EncoderClassifier(nn.Module):
    """Bidirectional transformer encoder with a classification head, for padded token batches.

    Args:
        attention: attention config; the variant must honour key padding (variable lengths).
        vocab_size: V (token 0 is padding by convention of the data modules).
        num_classes: K.
        dim, depth, num_heads, mlp_ratio: transformer shape.
        pool: "cls" (a class token prepended) or "mean" (mean over real tokens).
        positions: "rope" (rotary in the attention) or "learned" (absolute, needs max_len).
        max_len: longest sequence for learned positions.
        dropout, attn_dropout, drop_path: regularisation.

    Shapes: ``forward(tokens (B, N) long, mask (B, N) bool | None) -> logits (B, K)``;
    ``mask`` marks real tokens (True) - None means all are real.
    """

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        vocab_size: int,
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "mean",
        positions: str = "rope",
        max_len: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {positions!r}")
        if positions == "learned" and not max_len:
            raise ValueError("positions='learned' needs max_len")
        self.pool = pool
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_emb = nn.Embedding(max_len + (pool == "cls"), dim) if positions == "learned" else None  # type: ignore[operator]
        self.drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads,
                attention,
                needs={"key_padding": "batches of different-length sequences are padded"},
                model="EncoderClassifier",
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=r,
                rope=positions == "rope",
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """tokens (B, N), mask (B, N) True = real token -> logits (B, K)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, N), got shape {tuple(tokens.shape)}")
        b, n = tokens.shape
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, n)):
            raise ValueError(f"mask must be bool (B, N) = ({b}, {n}), got {mask.dtype} {tuple(mask.shape)}")
        x = self.tok_emb(tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        if self.pos_emb is not None:
            if x.shape[1] > self.pos_emb.num_embeddings:
                raise ValueError(f"sequence of {n} tokens exceeds max_len={self.pos_emb.num_embeddings}")
            x = x + self.pos_emb.weight[: x.shape[1]]
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=mask)
        x = self.norm(x)
        if self.cls_token is not None:
            return self.head(x[:, 0])
        if mask is None:
            return self.head(x.mean(1))
        w = mask.to(x.dtype).unsqueeze(-1)
        return self.head((x * w).sum(1) / w.sum(1).clamp_min(1.0))
