"""Tabular in-context learning with bi-axial attention (Orion-BiX).

Bouadi, Seth, Tanna & Sankarapu, "Orion-BiX: Bi-Axial Attention for Tabular In-Context Learning"
(2025, arXiv:2512.00181); official code github.com/Lexsi-Labs/Orion-BiX
(``model/layers.py``: ``BiAxialAttentionBlock`` and its patterns, ``CLSAttention``), built on
TabICL. A table (S rows x F features) is read along three axes:

1. **columns**: every feature attends across the rows - keys the labelled (training) rows only;
2. **rows** (:class:`BiAxialRowBlock`): every row attends across its F feature tokens with
   Orion-BiX's patterns in order - standard (all features), grouped (within ``num_groups``
   contiguous groups), hierarchical (first half reads the second, then the second half reads the
   updated first) and relational (all features after a projection) - and ``num_cls`` learned CLS
   tokens summarise the row;
3. **in-context**: every row attends to the labelled rows only (their label embedding added),
   and a decoder predicts each row's class.

Every attention is an :class:`attnlib.Attention` built from the model's attention config: the
"only labelled rows as keys" rule is a key-padding mask (equal to ``BlockMask.prefix_keys`` when
the labelled rows come first), the hierarchical halves and the CLS read-out use ``context=``,
so the variant needs ``key_padding`` and ``cross``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlib.models.blocks import AttentionConfig, TransformerBlock
from attnlib.models.vision import ClassAttentionBlock

__all__ = ["ROW_MODES", "ROW_PATTERNS", "BiAxialRowBlock", "TabularICL"]

ROW_PATTERNS = ("standard", "grouped", "hierarchical", "relational")
"""Orion-BiX's row-axis patterns in the order the official block applies them."""

ROW_MODES = ("biaxial", "standard")
"""``TabularICL(row_mode=...)``: Orion-BiX's patterns + CLS tokens, or one plain block + mean pooling."""


ROW_ROPE_BASE = 100_000.0
"""Frequency base of the rotary positions over the feature index in the row blocks (TabICL's default)."""


def _proj(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))


def _rope(rope: bool, base: float) -> dict:
    """TransformerBlock keywords: rotary positions over the feature index, or none."""
    return {"rope": True, "rope_base": base} if rope else {}


class BiAxialRowBlock(nn.Module):
    """Orion-BiX's row-axis block: feature tokens (R, F, dim) -> CLS tokens (R, num_cls, dim).

    ``patterns`` (default all four, in :data:`ROW_PATTERNS` order) each is a pre-norm transformer
    layer (attention + MLP, residual):

    * ``standard``: self-attention over all F features;
    * ``grouped``: ``LN(Linear(x))``, then self-attention within ``num_groups`` contiguous groups of
      ``F // num_groups`` features (each group its own sequence); leftover features pass unchanged
      (F < num_groups: the pattern is skipped);
    * ``hierarchical``: split at ``F // 2``; ``A <- LN(Linear(A))`` attends to B, then
      ``B <- LN(Linear(B))`` attends to the updated A (one shared layer, cross-attention; F = 1:
      skipped);
    * ``relational``: ``LN(Linear(x))``, then self-attention over all features.

    Then ``num_cls`` learned tokens cross-attend to the features (pre-norm, MLP) and the block's
    output is those tokens (as in the official code, so a second block reads the CLS tokens).
    ``rope`` (default True): the self-attention patterns (standard, grouped, relational) use rotary
    positions over the feature index (within a group for grouped) with base ``rope_base``, as
    TabICL's row interaction, so the block knows which feature holds which value.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        mlp_ratio: float = 2.0,
        num_groups: int = 4,
        num_cls: int = 4,
        patterns: tuple[str, ...] | list[str] = ROW_PATTERNS,
        dropout: float = 0.0,
        rope: bool = True,
        rope_base: float = ROW_ROPE_BASE,
    ) -> None:
        super().__init__()
        bad = [p for p in patterns if p not in ROW_PATTERNS]
        if bad:
            raise ValueError(f"unknown row pattern(s) {bad}; known: {ROW_PATTERNS}")
        if not isinstance(num_groups, int) or num_groups < 1 or not isinstance(num_cls, int) or num_cls < 1:
            raise ValueError(f"num_groups and num_cls must be positive ints, got {num_groups!r}, {num_cls!r}")
        self.patterns, self.num_groups = tuple(patterns), num_groups
        kw = {"mlp_ratio": mlp_ratio, "dropout": dropout, "model": "Orion-BiX"}
        self.layers = nn.ModuleDict()
        self.projs = nn.ModuleDict()
        for p in self.patterns:
            if p == "hierarchical":
                self.layers[p] = ClassAttentionBlock(dim, num_heads, attention, include_cls=False, **kw)
            else:
                self.layers[p] = TransformerBlock(dim, num_heads, attention, **kw, **_rope(rope, rope_base))
            if p != "standard":
                self.projs[p] = _proj(dim)
        self.cls_tokens = nn.Parameter(torch.zeros(num_cls, dim))
        self.cls_attention = ClassAttentionBlock(dim, num_heads, attention, include_cls=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLS tokens trunc-normal(0.02), as the official code."""
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)

    def grouped(self, x: Tensor) -> Tensor:
        """The grouped pattern: (R, F, dim) -> (R, F, dim)."""
        r, f, d = x.shape
        per = f // self.num_groups
        if per == 0:
            return x
        n = per * self.num_groups
        g = self.projs["grouped"](x[:, :n]).reshape(r * self.num_groups, per, d)
        g = self.layers["grouped"](g).reshape(r, n, d)
        return torch.cat([g, x[:, n:]], 1)

    def hierarchical(self, x: Tensor) -> Tensor:
        """The hierarchical pattern: (R, F, dim) -> (R, F, dim)."""
        mid = x.shape[1] // 2
        if mid == 0:
            return x
        layer, proj = self.layers["hierarchical"], self.projs["hierarchical"]
        a, b = x[:, :mid], x[:, mid:]
        a = layer(proj(a), b)
        b = layer(proj(b), a)
        return torch.cat([a, b], 1)

    def features(self, x: Tensor) -> Tensor:
        """The feature tokens after the patterns: (R, F, dim) -> (R, F, dim)."""
        for p in self.patterns:
            if p == "standard":
                x = self.layers[p](x)
            elif p == "grouped":
                x = self.grouped(x)
            elif p == "hierarchical":
                x = self.hierarchical(x)
            else:
                x = self.layers[p](self.projs[p](x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.cls_attention(self.cls_tokens.expand(x.shape[0], -1, -1), x)


class TabularICL(nn.Module):
    """A small tabular in-context learner: columns, rows (bi-axial or standard), then in-context rows.

    Args:
        attention: attention config of every block (the variant needs ``key_padding``; the
            bi-axial rows need ``cross`` too).
        num_features: F; max_classes: the decoder's logits.
        dim, num_heads, mlp_ratio, dropout: block sizes.
        col_blocks: blocks along the columns (each feature over the rows; keys: labelled rows).
        row_mode: ``"biaxial"`` (:class:`BiAxialRowBlock`, ``row_blocks`` of them, the last one's
            CLS tokens flattened) or ``"standard"`` (``row_blocks`` plain blocks, mean of the
            feature tokens).
        num_groups, num_cls, row_patterns: of the bi-axial blocks.
        row_rope: rotary positions over the feature index in the row blocks' self-attention (base
            :data:`ROW_ROPE_BASE`, as TabICL's row interaction). Without them a row's feature tokens
            carry no feature identity - after per-table standardisation the columns look alike to the
            column blocks - so a row is read as a *set* of values (swap two features' values and the
            prediction is the same) and the model cannot learn which feature predicts the class.
        icl_blocks: blocks along the rows in context (keys: labelled rows).

    Shapes: ``forward(tokens (B, S, F + 1), select=None | (B, S) bool) -> (B, S, max_classes)``
    logits, or (n, max_classes) for the ``select``-ed rows. ``tokens[..., -1]`` is a labelled row's
    class and -1 for a row to predict; every table needs a labelled row. A row's prediction reads
    the other rows only through the labelled ones.
    """

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        num_features: int,
        max_classes: int,
        dim: int = 32,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        col_blocks: int = 1,
        row_mode: str = "biaxial",
        row_blocks: int = 1,
        num_groups: int = 4,
        num_cls: int = 4,
        row_patterns: tuple[str, ...] | list[str] = ROW_PATTERNS,
        row_rope: bool = True,
        icl_blocks: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if row_mode not in ROW_MODES:
            raise ValueError(f"row_mode must be one of {ROW_MODES}, got {row_mode!r}")
        self.num_features, self.max_classes, self.row_mode = num_features, max_classes, row_mode
        kw = {"mlp_ratio": mlp_ratio, "dropout": dropout, "model": "TabularICL"}
        self.cell = nn.Linear(1, dim)
        self.col_blocks = nn.ModuleList(TransformerBlock(dim, num_heads, attention, **kw) for _ in range(col_blocks))
        if row_mode == "biaxial":
            self.row_blocks = nn.ModuleList(
                BiAxialRowBlock(
                    dim,
                    num_heads,
                    attention,
                    mlp_ratio=mlp_ratio,
                    num_groups=num_groups,
                    num_cls=num_cls,
                    patterns=row_patterns,
                    dropout=dropout,
                    rope=row_rope,
                )
                for _ in range(row_blocks)
            )
            self.row_out = nn.Linear(num_cls * dim, dim)
        else:
            self.row_blocks = nn.ModuleList(
                TransformerBlock(dim, num_heads, attention, **kw, **_rope(row_rope, ROW_ROPE_BASE))
                for _ in range(row_blocks)
            )
            self.row_out = nn.Linear(dim, dim)
        self.label_embed = nn.Embedding(max_classes, dim)
        self.icl_blocks = nn.ModuleList(TransformerBlock(dim, num_heads, attention, **kw) for _ in range(icl_blocks))
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, max_classes))

    def forward(self, tokens: Tensor, select: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.num_features + 1:
            raise ValueError(
                f"TabularICL expects tokens (B, S, num_features + 1 = {self.num_features + 1}) - the features "
                f"and, last, the label of a labelled row (-1 to predict), got {tuple(tokens.shape)}"
            )
        b, s, _ = tokens.shape
        x, label = tokens[..., :-1], tokens[..., -1]
        train = label >= 0
        if not bool(train.any(1).all()):
            raise ValueError("TabularICL: every table needs at least one labelled row (label >= 0)")
        if bool((label >= self.max_classes).any()):
            raise ValueError(f"TabularICL: labels must be < max_classes={self.max_classes}")
        f = self.num_features
        h = self.cell(x.unsqueeze(-1))  # (B, S, F, dim)
        hc = h.transpose(1, 2).reshape(b * f, s, -1)  # columns: each feature over the rows
        kp = train.repeat_interleave(f, 0)
        for blk in self.col_blocks:
            hc = blk(hc, key_padding_mask=kp)
        r = hc.reshape(b, f, s, -1).transpose(1, 2).reshape(b * s, f, -1)  # rows: each row over its features
        for blk in self.row_blocks:
            r = blk(r)
        r = r.flatten(1) if self.row_mode == "biaxial" else r.mean(1)
        r = self.row_out(r).reshape(b, s, -1)
        r = r + self.label_embed(label.clamp_min(0).long()) * train.unsqueeze(-1).to(r.dtype)
        for blk in self.icl_blocks:
            r = blk(r, key_padding_mask=train)
        logits = self.decoder(self.norm(r))
        return logits if select is None else logits[select]
