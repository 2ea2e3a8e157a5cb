"""TokenLearner and TokenFuser (Ryoo et al., NeurIPS 2021, arXiv 2106.11297), v1.1 form.

TokenLearner replaces the N tokens after a block by S learned tokens, each an attention-weighted
average of the inputs: ``a = MLP(LN(X))`` (hidden ``bottleneck``, GELU) gives (B, N, S) logits,
``alpha = softmax over N`` (B, S, N), ``Z = alpha X`` (B, S, C). Protected tokens (a class
token) pass through unchanged in front of the S learned ones. Later blocks run on 1 + S tokens.

:class:`TokenFuser` maps S processed tokens back onto N positions (scenic's ``EncoderModFuser``):
``Y = LN(Z)``, mix across tokens with a zero-initialised (S, S) matrix, ``LN``, then
``out = sigmoid(MLP(LN(X_res))) @ Y'`` and ``X_res + out`` - exactly the identity at initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner

__all__ = ["TokenFuser", "TokenLearnerPruner"]


@register_pruner("tokenlearner")
class TokenLearnerPruner(TokenPruner):
    """TokenLearner v1.1: N tokens -> protected tokens + S learned tokens.

    Args:
        num_tokens: S (paper: 8 or 16).
        bottleneck: hidden width of the attention-map MLP (64).

    Shapes: x (B, N, C) -> (B, P + S, C) with P protected tokens (the same positions in
    every row, e.g. the class token); index is -1 for learned tokens. Padding (mask False)
    gets zero weight. ``last_maps`` keeps the last (B, S, N) attention maps.
    """

    needs_importance = False
    synthesizes = True

    def __init__(self, *, dim: int, layer: int, depth: int, num_tokens: int = 8, bottleneck: int = 64) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"tokenlearner num_tokens must be a positive int, got {num_tokens!r}")
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, bottleneck)
        self.fc2 = nn.Linear(bottleneck, num_tokens)
        self.last_maps: Tensor | None = None

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Once, in the middle of the network."""
        return [max(depth // 2 - 1, 0)]

    def maps(self, x: Tensor, allowed: Tensor | None) -> Tensor:
        """Attention maps alpha (B, S, N): softmax over the allowed tokens of MLP(LN(x))."""
        a = self.fc2(F.gelu(self.fc1(self.norm(x)))).transpose(1, 2)  # (B, S, N)
        if allowed is not None:
            a = a.masked_fill(~allowed[:, None, :], float("-inf"))
        return torch.softmax(a, -1).nan_to_num(0.0)

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        b, n, _ = x.shape
        prot_cols = torch.zeros(n, dtype=torch.bool, device=x.device)
        if protected is not None and bool(protected.any()):
            if not bool((protected == protected[:1]).all()):
                raise ValueError("tokenlearner needs the protected tokens at the same positions in every row")
            prot_cols = protected[0]
        allowed = ~prot_cols[None, :].expand(b, n)
        if mask is not None:
            allowed = allowed & mask
        alpha = self.maps(x, allowed)
        self.last_maps = alpha.detach()
        z = alpha @ x  # (B, S, C)
        keep_idx = prot_cols.nonzero().flatten()
        kept = x[:, keep_idx]
        index = torch.cat([keep_idx.expand(b, -1), keep_idx.new_full((b, self.num_tokens), -1)], 1)
        return PruneOutput(torch.cat([kept, z], 1), index, None)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_tokens={self.num_tokens}"


class TokenFuser(nn.Module):
    """TokenFuser: S processed tokens + the (B, N, C) residual -> (B, N, C).

    ``forward(tokens (B, S, C), residual (B, N, C)) -> residual + sigmoid(MLP(LN(residual))) @ LN(mix(LN(tokens)))``
    where ``mix`` is a bias-free (S, S) linear map across tokens, zero-initialised (the fuser is
    the identity on ``residual`` at initialisation).
    """

    def __init__(self, dim: int, num_tokens: int = 8, bottleneck: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.mix = nn.Linear(num_tokens, num_tokens, bias=False)
        self.norm_mix = nn.LayerNorm(dim)
        self.norm_res = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, bottleneck)
        self.fc2 = nn.Linear(bottleneck, num_tokens)
        self.drop = nn.Dropout(dropout)
        self.reset_pruner_parameters()

    def reset_pruner_parameters(self) -> None:
        """Zero the token-mixing matrix (identity fuser)."""
        nn.init.zeros_(self.mix.weight)

    def forward(self, tokens: Tensor, residual: Tensor) -> Tensor:
        y = self.norm_in(tokens)
        y = self.mix(y.transpose(1, 2)).transpose(1, 2)  # mix across the S tokens
        y = self.norm_mix(y)
        beta = torch.sigmoid(self.fc2(F.gelu(self.fc1(self.norm_res(residual)))))  # (B, N, S)
        return residual + self.drop(beta @ y)
