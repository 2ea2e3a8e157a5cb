"""Adaptively sparse attention: softmax replaced by sparsemax, 1.5-entmax or alpha-entmax.

``entmax`` - Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers" (EMNLP), as
used for ASR by Zhao et al. 2022 (arXiv 2209.15176): ``A = entmax_alpha(Q K^T / sqrt(D) + mask)``,
``O = A V``. alpha = 2 is sparsemax, 1.5 the exact (sort-free) 1.5-entmax, other values use
bisection; ``learn_alpha=True`` learns one alpha per head as ``alpha_h = 1 + sigmoid(a_h)``
(in (1, 2)), clamped to >= 1.01 (the alpha gradient is singular at 1). Attention weights
contain exact zeros. See :mod:`attnlib.functional.entmax`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnlib._validation import number_above, optional_positive_number, positive_int
from attnlib.functional.entmax import alpha_logit, entmax_attention, learned_alpha
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["EntmaxAttention"]


@register_variant("entmax")
class EntmaxAttention(AttentionCore):
    """Attention with alpha-entmax probabilities (sparse, exact zeros).

    Args:
        alpha: fixed alpha > 1 (2: sparsemax, 1.5: entmax15, else bisection), or the
            initial alpha in (1, 2) when ``learn_alpha``.
        learn_alpha: one learnable alpha per head, ``1 + sigmoid(a_h)`` clamped to >= 1.01.
        n_iter: bisection steps.
        chunk_size: query rows per step (memory O(chunk_size · M)).
        scale: logit scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        causal=True,
        cross=True,
        key_padding=True,
        full_mask=True,
        block_mask=True,
        window=True,
        causal_cross=True,
        complexity="O(N^2) (O(n_iter·N^2) with bisection)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=True,
        permutation_equivariant=True,
        importance=True,
        family="sparse",
        paper="Correia, Niculae & Martins 2019, Adaptively Sparse Transformers; Peters et al. 2019 (entmax)",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        alpha: float = 1.5,
        learn_alpha: bool = False,
        n_iter: int = 50,
        chunk_size: int = 256,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        number_above(alpha, 1, "entmax: alpha", hint=" (alpha -> 1 is softmax)")
        if learn_alpha and not 1.0 < float(alpha) < 2.0:
            raise ValueError(
                f"entmax: a learned alpha lives in (1, 2); the initial alpha must be in (1, 2), got {alpha}"
            )
        self.alpha = float(alpha)
        self.learn_alpha = bool(learn_alpha)
        self.n_iter = positive_int(n_iter, "entmax: n_iter")
        self.chunk_size = positive_int(chunk_size, "entmax: chunk_size")
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self.alpha_logit: nn.Parameter | None = None
        if self.learn_alpha:
            self.alpha_logit = nn.Parameter(torch.full((num_heads,), alpha_logit(self.alpha)))

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"alpha": 1.5, "learn_alpha": True, "n_iter": 40}

    def alphas(self) -> Tensor | float:
        """The alpha in use: a float, or (H,) per-head values when learned."""
        if self.alpha_logit is None:
            return self.alpha
        return learned_alpha(self.alpha_logit)

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
        res = entmax_attention(
            q,
            k,
            v,
            alpha=self.alphas(),
            mask=mask,
            scale=self.scale,
            n_iter=self.n_iter,
            dropout_p=dropout_p,
            return_weights=need_weights,
            return_importance=need_importance,
            chunk_size=self.chunk_size,
        )
        if isinstance(res, Tensor):
            return CoreOutput(res)
        out, *rest = res
        w = rest.pop(0) if need_weights else None
        imp = rest.pop(0) if need_importance else None
        return CoreOutput(out, weights=w, importance=imp)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}, learn_alpha={self.learn_alpha}"
