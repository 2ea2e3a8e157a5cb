"""``tra`` - Threshold Relative Attention (Opper, Fernandez, Smolensky, Gao 2025).

Selective sparsity (keys whose QK-normalised score is not above a threshold leave the softmax)
plus contextualised relative distance (distance counted over the kept keys only), weighted by a
learned log-sigmoid forget gate. TRA is itself the positional scheme: use it without rotary or
absolute positions, as the paper does. The math is :mod:`attnlib.functional.tra`.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attnlib._validation import optional_positive_number, positive_int
from attnlib.functional._common import acc_dtype
from attnlib.functional.tra import GATE_ON, tra_chunks
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["ThresholdRelativeAttention"]


@register_variant("tra")
class ThresholdRelativeAttention(AttentionCore):
    """Threshold Relative Attention.

    Args:
        num_heads, head_dim: set by :class:`attnlib.Attention`.
        threshold: keys with score ``<= threshold`` are dropped (paper's code: 0).
        qk_norm: RMS-normalise q and k without a learned scale (paper's code: on).
        gate_on: "query" (one forget gate per query, ``g_i · n_ij``: the paper's code) or "key"
            (one gate per key, summed over the kept keys between key and query).
        scale: logit scale, default head_dim**-0.5.
        chunk_size: query rows per chunk (memory O(chunk·M)).

    The forget gate is ``log sigmoid(w_h · u + b_h)`` per head, where u is the concatenation of
    the heads' query vectors (``gate_on="query"``) or key vectors (``"key"``) before QK-norm:
    an affine function of the block input, like the paper's gate on the input x (the same
    function class whenever the query / key projection is invertible).
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=True,
        window=True,
        causal_cross=True,
        complexity="O(N^2)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=False,
        permutation_equivariant=False,
        importance=True,
        family="dense",
        paper="Opper et al. 2025, TRA: Better Length Generalisation with Threshold Relative Attention",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        threshold: float = 0.0,
        qk_norm: bool = True,
        gate_on: str = "query",
        scale: float | None = None,
        chunk_size: int = 256,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        if gate_on not in GATE_ON:
            raise ValueError(f"tra: gate_on must be one of {GATE_ON}, got {gate_on!r}")
        self.threshold = float(threshold)
        self.qk_norm = bool(qk_norm)
        self.gate_on = gate_on
        self.scale = optional_positive_number(scale, "tra: scale")
        self.chunk_size = positive_int(chunk_size, "tra: chunk_size")
        self.gate_proj = nn.Linear(num_heads * head_dim, num_heads)

    @classmethod
    def smooth_kwargs(cls) -> dict[str, float]:
        """Keep every allowed key: bf16 rounding flips scores near the threshold (a real effect)."""
        return {"threshold": float("-inf")}

    def gates(self, x: Tensor) -> Tensor:
        """Log forget gates from per-head vectors x (B, H, L, D) -> (B, H, L), all <= 0."""
        u = rearrange(x, "b h l d -> b l (h d)")
        dt = acc_dtype(x.dtype)  # >= float32: the gate multiplies distances up to N
        w, bias = self.gate_proj.weight, self.gate_proj.bias
        z = F.linear(u.to(dt), w.to(dt), bias.to(dt))
        return rearrange(F.logsigmoid(z), "b l h -> b h l")

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
        gate = self.gates(q if self.gate_on == "query" else k)
        scale = self.head_dim**-0.5 if self.scale is None else float(self.scale)
        out, w, imp = tra_chunks(
            q, k, v, gate, mask, scale=scale, threshold=self.threshold, qk_norm=self.qk_norm,
            gate_on=self.gate_on, dropout_p=dropout_p, chunk_size=self.chunk_size,
            need_weights=need_weights, need_importance=need_importance,
        )  # fmt: skip
        return CoreOutput(out, weights=w, importance=imp)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}, gate_on={self.gate_on!r}"
