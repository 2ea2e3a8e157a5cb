"""Monotonic (multihead) attention: hard monotonic, MoChA and infinite lookback heads.

``monotonic`` - every head is a monotonic attention head (Raffel et al. 2017; MoChA, Chiu &
Raffel 2018; monotonic multihead attention, Ma et al. 2020; for Transformer ASR, Inaguma et
al. 2020, the lineage of the monotonic half of Zhao et al. 2022, "Adaptive Sparse and
Monotonic Attention for Transformer-based ASR"). Per head h the selection energy is the
scaled dot product plus a learned offset, ``e_ij = q_i · k_j / sqrt(D) + r_h``, and
``p_ij = sigmoid(e_ij + noise)`` (Gaussian noise in training only). Training attends with the
expected alignment; eval with the hard decisions (``inference="hard"``: stop at the first
``p >= 0.5`` at or after the previous stop), which read the keys left to right and never
move backwards - the output of query i depends only on keys up to its stop, so the keys can
arrive as a stream. ``chunk_size`` picks the attention around the stop: 1 = hard monotonic,
w > 1 = MoChA (a softmax over the w keys ending at the stop, with its own chunk energy
``u_ij = (q_i W_h) · k_j / sqrt(D)``), None = infinite lookback. ``headdrop`` (HeadDrop) and
``divergence_weight`` (the heads' stop variance as an auxiliary loss) are the regularisers
that make every head align; see :mod:`attnlib.functional.monotonic`.

Queries are processed in order (row i continues from row i - 1's stop), so a decoder that
decodes step by step recomputes the cross-attention over its whole prefix of queries
(``sequential_queries = True``). Not causal self-attention: the order comes from the
alignment recursion.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib._validation import non_negative_number, positive_int, positive_number
from attnlib.functional._common import acc_dtype
from attnlib.functional.monotonic import (
    chunkwise_weights,
    expected_alignment,
    hard_alignment,
    head_divergence,
    headdrop,
    preserve_mass,
)
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["INFERENCE_MODES", "MonotonicAttention"]

INFERENCE_MODES = ("hard", "expected")


@register_variant("monotonic")
class MonotonicAttention(AttentionCore):
    """Monotonic multihead attention (every head monotonic).

    Args:
        chunk_size: 1 (hard monotonic), w > 1 (MoChA chunk) or None (infinite lookback).
        init_r: initial selection-energy offset r_h (-4, Raffel et al.'s advice and Inaguma et
            al.'s ASR default; it starts every p near 0.02).
        noise_std: standard deviation of the pre-sigmoid noise in training (1.0).
        threshold: the hard decision threshold at inference (0.5).
        inference: "hard" (the decisions; streaming) or "expected" (the training alignment).
        mass_preservation: put each row's leftover alignment mass (the probability of not
            stopping) on its last allowed key, as fairseq's MMA does; off in Raffel et al. /
            Inaguma et al. (a head that does not stop attends to nothing).
        headdrop: HeadDrop probability in training (each head's alignment zeroed, the rest rescaled).
        divergence_weight: weight of the head-divergence auxiliary loss (variance of the heads'
            expected stops) in training.
        scale: energy scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        causal=False,
        cross=True,
        key_padding=True,
        full_mask=True,
        block_mask=True,
        window=True,
        causal_cross=False,
        complexity="O(N·M^2) training (O(N·M·w) hard inference)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=False,
        permutation_equivariant=False,
        importance=True,
        family="monotonic",
        paper="Raffel et al. 2017; Chiu & Raffel 2018 (MoChA); Ma et al. 2020 (MMA); Inaguma et al. 2020",
    )
    #: Query row i continues from row i - 1: incremental decoders recompute over the query prefix.
    sequential_queries: ClassVar[bool] = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        chunk_size: int | None = 4,
        init_r: float = -4.0,
        noise_std: float = 1.0,
        threshold: float = 0.5,
        inference: str = "hard",
        mass_preservation: bool = False,
        headdrop: float = 0.0,
        divergence_weight: float = 0.0,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.chunk_size = None if chunk_size is None else positive_int(chunk_size, "monotonic attention: chunk_size")
        self.noise_std = non_negative_number(noise_std, "monotonic attention: noise_std")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"monotonic attention: threshold must be in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        if inference not in INFERENCE_MODES:
            raise ValueError(f"monotonic attention: inference must be one of {INFERENCE_MODES}, got {inference!r}")
        self.inference = inference
        self.mass_preservation = bool(mass_preservation)
        if not 0.0 <= float(headdrop) < 1.0:
            raise ValueError(f"monotonic attention: headdrop must be in [0, 1), got {headdrop!r}")
        self.headdrop = float(headdrop)
        self.divergence_weight = non_negative_number(divergence_weight, "monotonic attention: divergence_weight")
        self.scale = head_dim**-0.5 if scale is None else positive_number(scale, "monotonic: scale")
        self.r = nn.Parameter(torch.full((num_heads,), float(init_r)))
        self.w_chunk = (
            nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1)) if self.chunk_size != 1 else None
        )  # (H, D, D), identity at init: u starts as the selection energy without r

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        # the expected alignment in eval too: hard decisions flip at p = 0.5 under bf16 rounding
        return {"chunk_size": 3, "init_r": 0.0, "inference": "expected"}

    @classmethod
    def approximation_knobs(cls) -> dict[str, list[Any]]:
        return {"chunk_size": [1, 4, None]}

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
        acc = acc_dtype(q.dtype)
        qa, ka = q.to(acc), k.to(acc)
        allowed = mask.dense()
        skip = None
        if allowed is not None:
            skip = ~allowed.any(-1).all(1)  # (B|1, N): rows with no allowed key in any head
            skip = skip.expand(q.shape[0], -1)
        if not cross and mask.key_padding is not None:  # self-attention: padded queries do not advance
            pad = ~mask.key_padding
            skip = pad if skip is None else skip | pad
        energy = torch.matmul(qa, ka.transpose(-1, -2)) * self.scale
        e = energy + self.r.to(acc)[None, :, None, None]
        if self.training and self.noise_std > 0:
            e = e + torch.randn_like(e) * self.noise_std
        p = torch.sigmoid(e)
        if allowed is not None:
            p = p * allowed
        if self.training or self.inference == "expected":
            alpha = expected_alignment(p, skip=skip)
        else:
            alpha, _ = hard_alignment(p, skip=skip, threshold=self.threshold)
        if self.mass_preservation:
            alpha = preserve_mass(alpha, allowed)
            if skip is not None:
                alpha = alpha.masked_fill(skip[:, None, :, None], 0.0)
        aux = None
        if self.training and self.divergence_weight > 0:
            aux = self.divergence_weight * head_divergence(alpha, skip)
        if self.training and self.headdrop > 0:
            alpha = headdrop(alpha, self.headdrop)
        u = None
        if self.w_chunk is not None:
            u = torch.matmul(torch.einsum("bhnd,hde->bhne", qa, self.w_chunk.to(acc)), ka.transpose(-1, -2))
            u = u * self.scale
        beta = chunkwise_weights(alpha, u, self.chunk_size, allowed)
        bd = F.dropout(beta, dropout_p) if dropout_p > 0 else beta
        out = torch.matmul(bd.to(v.dtype), v)
        return CoreOutput.from_weights(
            out, beta.to(q.dtype), need_weights=need_weights, need_importance=need_importance, aux_loss=aux
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}, inference={self.inference!r}"
