"""Dense exact attention: ``softmax`` (SDPA / Flex / math) and ``local`` (exact sliding window).

* ``softmax`` - Vaswani et al., "Attention Is All You Need" (NeurIPS 2017):
  ``softmax(Q K^T / sqrt(D)) V``, computed by PyTorch SDPA (fused flash kernels on CPU and
  GPU), by FlexAttention, or explicitly ("math") when weights are requested.
* ``local`` - sliding-window attention (Beltagy et al., "Longformer", 2020; the band of
  Parmar et al.'s Image Transformer): query i attends keys with |i - j| <= window
  (j <= i when causal), exactly, in O(N·w) time and memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlib import dispatch
from attnlib._validation import optional_positive_number, positive_int
from attnlib.functional.local import local_attention, local_importance
from attnlib.functional.modifiers import ScoreModFn
from attnlib.functional.softmax import (
    softmax_attention,
    softmax_attention_importance,
    softmax_importance,
    softmax_query_weights,
)
from attnlib.masks import AttentionMask, MaskLike, SlidingWindow
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["LocalAttention", "SoftmaxAttention"]


@register_variant("softmax")
class SoftmaxAttention(AttentionCore):
    """Exact softmax attention.

    Args:
        num_heads, head_dim: set by :class:`attnlib.Attention`.
        backend: "auto" (SDPA; math when weights are requested; a one-pass query-chunked math
            path giving output and importance together when only importance is requested; the
            explicit math path where :func:`attnlib.dispatch.few_keys_explicit` says so (few
            keys on CPU)), "sdpa", "flex" or "math". (Single-query steps with importance and
            many keys: SDPA plus the weight row, bit-identical to the step without importance.)
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
        complexity="O(N^2)",
        exact=True,
        has_weights=True,
        trainable=False,
        attn_dropout=True,
        gqa=True,
        permutation_equivariant=True,
        importance=True,
        score_mod=True,
        family="dense",
        paper="Vaswani et al. 2017, Attention Is All You Need",
    )

    def __init__(self, *, num_heads: int, head_dim: int, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        if backend not in ("auto", "sdpa", "flex", "math"):
            raise ValueError(f"softmax backend must be 'auto', 'sdpa', 'flex' or 'math', got {backend!r}")
        self.backend = backend
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
        score_mod: ScoreModFn | None = None,
    ) -> CoreOutput:
        sm = {"score_mod": score_mod} if score_mod is not None else {}
        if need_weights:
            out, w = softmax_attention(
                q,
                k,
                v,
                mask=mask,
                scale=self.scale,
                dropout_p=dropout_p,
                backend="math",
                return_weights=True,
                **sm,
            )
            return CoreOutput.from_weights(out, w, need_weights=True, need_importance=need_importance)
        short = self.backend == "auto" and mask.block is None and dispatch.few_keys_explicit(k.shape[2], q.device)
        if short and not need_importance:
            # the explicit path, the same kernel as below, so asking for importance never changes
            # the output bits
            out = softmax_attention(q, k, v, mask=mask, scale=self.scale, dropout_p=dropout_p, backend="math", **sm)
            return CoreOutput(out)  # type: ignore[arg-type]
        if need_importance and self.backend in ("auto", "math") and mask.block is None and (q.shape[2] > 1 or short):
            # one pass: explicit weights give out = w @ v and importance = w.mean(queries) together
            # (query-chunked, O(chunk·M) memory) instead of SDPA plus a second Q K^T pass. A single
            # query (a decoding step) keeps SDPA plus its one weight row, so decoding with importance
            # (namm eviction) gives bit-identical outputs to decoding without.
            out, imp = softmax_attention_importance(q, k, v, mask=mask, scale=self.scale, dropout_p=dropout_p, **sm)
            return CoreOutput(out, importance=imp)
        out = softmax_attention(q, k, v, mask=mask, scale=self.scale, dropout_p=dropout_p, backend=self.backend, **sm)  # type: ignore[arg-type]
        imp = softmax_importance(q, k, mask=mask, scale=self.scale, **sm) if need_importance else None
        return CoreOutput(out, importance=imp)  # type: ignore[arg-type]

    def query_weights(self, q: Tensor, k: Tensor, mask: AttentionMask, query: int) -> Tensor:
        """Row ``query`` of the softmax weights alone: (B, H, 1, M), O(M) per (batch, head)."""
        return softmax_query_weights(q, k, query, mask=mask, scale=self.scale)


@register_variant("local")
class LocalAttention(AttentionCore):
    """Exact sliding-window attention: query i attends keys with |i - j| <= window.

    With ``causal=True`` the window is one-sided (keys i - window .. i). Key-padding and full
    masks are ANDed with the band. O(N·window) time and memory.

    Args:
        window: w >= 1 (default 64).
        chunk_size: query chunk length (default about the window).
        scale: logit scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=False,
        window=False,
        complexity="O(N·w)",
        exact=True,
        has_weights=True,
        trainable=False,
        attn_dropout=True,
        gqa=True,
        permutation_equivariant=False,
        importance=True,
        score_mod=True,
        family="dense",
        paper="Beltagy et al. 2020, Longformer (sliding-window attention)",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        window: int = 64,
        chunk_size: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.window = positive_int(window, "local attention: window")
        self.chunk_size = None if chunk_size is None else positive_int(chunk_size, "local attention: chunk_size")
        self.scale = optional_positive_number(scale, f"{self.name}: scale")

    def implied_mask(self, n: int, m: int, device: torch.device | str = "cpu") -> MaskLike:
        return SlidingWindow(self.window, self.window)

    def causal_reach(self) -> int | None:
        return self.window  # causal row i reads keys i - window .. i, by offset only

    @classmethod
    def conformance_kwargs(cls) -> dict[str, object]:
        return {"window": 3, "chunk_size": 4}

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
        score_mod: ScoreModFn | None = None,
    ) -> CoreOutput:
        band = [mask, self.implied_mask(mask.n, mask.m, q.device)]
        if need_weights:
            out, w = softmax_attention(
                q,
                k,
                v,
                mask=band,
                scale=self.scale,
                dropout_p=dropout_p,
                backend="math",
                return_weights=True,
                score_mod=score_mod,
            )
            return CoreOutput.from_weights(out, w, need_weights=True, need_importance=need_importance)
        if score_mod is not None:  # the explicit band over query chunks (O(chunk·M)), with the score mod
            if need_importance:
                out, imp = softmax_attention_importance(
                    q, k, v, mask=band, scale=self.scale, dropout_p=dropout_p, score_mod=score_mod
                )
                return CoreOutput(out, importance=imp)
            out = softmax_attention(q, k, v, mask=band, scale=self.scale, dropout_p=dropout_p, score_mod=score_mod)
            return CoreOutput(out)  # type: ignore[arg-type]
        out = local_attention(
            q, k, v, self.window, mask=mask, scale=self.scale, dropout_p=dropout_p, chunk_size=self.chunk_size
        )
        imp = (
            local_importance(q, k, self.window, mask=mask, scale=self.scale, chunk_size=self.chunk_size)
            if need_importance
            else None
        )
        return CoreOutput(out, importance=imp)

    def query_weights(self, q: Tensor, k: Tensor, mask: AttentionMask, query: int) -> Tensor:
        """Row ``query`` of the band's softmax weights alone: (B, H, 1, M), O(M) per (batch, head)."""
        band = self.implied_mask(mask.n, mask.m, q.device)
        return softmax_query_weights(q, k, query, mask=[mask, band], scale=self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"
