"""Additive (Bahdanau) attention, soft or hard stochastic (Show, Attend and Tell).

``additive`` - Bahdanau, Cho & Bengio 2015 (the "concat" score), and the soft and hard
attention of Xu et al. 2015, "Show, Attend and Tell" (ICML): per head,
``e_ij = v^T tanh(W q_i + U k_j + b)``, ``alpha_i = softmax_j(e_ij / T)``. Soft mode returns
``sum_j alpha_ij v_j``. With ``hard=True`` each (batch, head, query) draws one key
``s ~ Multinoulli(alpha)`` in training and attends to it alone; with probability
``1 - semi_sampling_p`` a training call uses alpha instead (the paper's trick, one draw per
call as in the official code). The sample's log-probability and alpha's entropy wait on the
core until :func:`reinforce_loss` turns them into the REINFORCE loss with the paper's
moving-average baseline and entropy bonus. In eval a hard core attends to the argmax
(``hard_eval="argmax"``), to alpha (``"expected"``) or to a sample (``"sample"``).
See :mod:`attnlib.functional.additive`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlib._validation import positive_int, positive_number
from attnlib.functional.additive import (
    additive_attention,
    attention_entropy,
    hard_attention,
    reinforce_surrogate,
    update_baseline,
)
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["HARD_EVAL", "AdditiveAttention", "reinforce_loss"]

HARD_EVAL = ("argmax", "expected", "sample")


def _probability(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


@register_variant("additive")
class AdditiveAttention(AttentionCore):
    """Additive attention ``softmax_j(v^T tanh(W q_i + U k_j + b) / T)``, soft or hard stochastic.

    Args:
        attn_dim: hidden size A of the score network (default head_dim).
        temperature: T > 0 dividing the scores.
        hard: hard stochastic attention (one sampled key per query in training).
        semi_sampling_p: probability that a hard training call samples (else it uses alpha).
        hard_eval: what a hard core attends to in eval: "argmax", "expected" (alpha) or "sample".
        reward_scale: lambda_r of the REINFORCE term (the official code's 1/10).
        entropy_weight: lambda_e of the entropy bonus.
        baseline_momentum: the baseline's moving-average momentum (0.9 in the paper).

    Parameters per head: ``w_q`` and ``w_k`` (D, A) (the paper's W and U), ``bias`` (A) and the
    score vector ``v`` (A); ``baseline`` is a buffer.
    """

    capabilities = Capabilities(
        causal=True,
        cross=True,
        key_padding=True,
        full_mask=True,
        block_mask=True,
        window=True,
        causal_cross=True,
        complexity="O(N·M·A)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=False,
        permutation_equivariant=True,
        importance=True,
        family="additive",
        paper="Bahdanau et al. 2015; Xu et al. 2015, Show, Attend and Tell (soft and hard attention)",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        attn_dim: int | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        semi_sampling_p: float = 0.5,
        hard_eval: str = "argmax",
        reward_scale: float = 0.1,
        entropy_weight: float = 0.0,
        baseline_momentum: float = 0.9,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        a = head_dim if attn_dim is None else positive_int(attn_dim, "additive attention: attn_dim")
        self.attn_dim = a
        self.temperature = positive_number(temperature, "additive attention: temperature")
        self.hard = bool(hard)
        self.semi_sampling_p = _probability(semi_sampling_p, "additive attention: semi_sampling_p")
        if hard_eval not in HARD_EVAL:
            raise ValueError(f"additive attention: hard_eval must be one of {HARD_EVAL}, got {hard_eval!r}")
        self.hard_eval = hard_eval
        self.reward_scale = positive_number(reward_scale, "additive attention: reward_scale")
        self.entropy_weight = float(entropy_weight)
        if self.entropy_weight < 0:
            raise ValueError(f"additive attention: entropy_weight must be >= 0, got {entropy_weight!r}")
        self.baseline_momentum = _probability(baseline_momentum, "additive attention: baseline_momentum")
        bound_d, bound_a = head_dim**-0.5, a**-0.5  # nn.Linear's default uniform bounds
        self.w_q = nn.Parameter(torch.empty(num_heads, head_dim, a).uniform_(-bound_d, bound_d))
        self.w_k = nn.Parameter(torch.empty(num_heads, head_dim, a).uniform_(-bound_d, bound_d))
        self.bias = nn.Parameter(torch.zeros(num_heads, a))
        self.v = nn.Parameter(torch.empty(num_heads, a).uniform_(-bound_a, bound_a))
        self.register_buffer("baseline", torch.zeros(()))
        #: (B, H, N) log p(s) of the last training call's samples, or None (not sampled).
        self.pending_log_prob: Tensor | None = None
        #: (B, H, N) entropy of the last hard training call's alpha, or None.
        self.pending_entropy: Tensor | None = None

    @classmethod
    def approximation_knobs(cls) -> dict[str, list[object]]:
        return {"attn_dim": [4, 16, 64]}

    def scores_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w_q, w_k, v, bias) as :func:`attnlib.functional.additive.additive_scores` takes them."""
        return self.w_q, self.w_k, self.v, self.bias

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
        soft_dropout = 0.0 if self.hard else dropout_p
        out, alpha = additive_attention(
            q, k, v, self.w_q, self.w_k, self.v, self.bias, mask=mask, temperature=self.temperature,
            dropout_p=soft_dropout,
        )  # fmt: skip
        self.pending_log_prob = self.pending_entropy = None
        if not self.hard:
            return CoreOutput.from_weights(out, alpha, need_weights=need_weights, need_importance=need_importance)
        mode = self.hard_eval
        if self.training:
            self.pending_entropy = attention_entropy(alpha)
            mode = "sample" if float(torch.rand(())) < self.semi_sampling_p else "expected"
        out, used, self.pending_log_prob = hard_attention(alpha, v, mode)
        return CoreOutput.from_weights(out, used, need_weights=need_weights, need_importance=need_importance)

    @property
    def samples_attention(self) -> bool:
        """Whether training calls sample (hard attention): the model must then call :func:`reinforce_loss`."""
        return self.hard

    def reinforce(self, cost: Tensor, query_valid: Tensor | None = None) -> Tensor | None:
        """This core's REINFORCE term after a hard training call (see :func:`reinforce_loss`), or None."""
        if self.pending_entropy is None:
            return None
        term = reinforce_surrogate(
            self.pending_log_prob, self.pending_entropy, cost, self.baseline, valid=query_valid,
            reward_scale=self.reward_scale, entropy_weight=self.entropy_weight,
        )  # fmt: skip
        if self.pending_log_prob is not None:
            self.baseline.copy_(update_baseline(self.baseline, cost, self.baseline_momentum))
        self.pending_log_prob = self.pending_entropy = None
        return term

    def extra_repr(self) -> str:
        extra = f", attn_dim={self.attn_dim}"
        if self.hard:
            extra += f", hard=True, semi_sampling_p={self.semi_sampling_p}, hard_eval={self.hard_eval!r}"
        return super().extra_repr() + extra


def reinforce_loss(model: nn.Module, cost: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """The REINFORCE loss of every core in ``model`` that sampled its attention in a training forward.

    Each module with a ``reinforce(cost, query_valid)`` method (a hard :class:`AdditiveAttention`)
    contributes its term: the sampled locations' log-probabilities and alpha's entropies (summed
    over heads and valid queries, per sequence) go into
    :func:`attnlib.functional.additive.reinforce_surrogate` with the per-sequence cost and the
    core's moving-average baseline, which is then updated with the batch's mean cost (the
    paper's ``b <- 0.9 b + 0.1 C``). The pending samples are cleared.

    Args:
        model: a module containing hard additive cores.
        cost: (B,) per-sequence negative log-likelihood C (its gradient is ignored).
        query_valid: (B, N) bool, the queries that belong to the sequence (e.g. target tokens
            that are not padding), or None for all.

    Returns:
        A scalar to add to the training loss (0 when no core sampled).
    """
    total = cost.new_zeros(())
    for mod in model.modules():
        term = mod.reinforce(cost, query_valid) if callable(getattr(mod, "reinforce", None)) else None
        if term is not None:
            total = total + term
    return total
