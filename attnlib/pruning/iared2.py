"""IA-RED2 (Pan et al., NeurIPS 2021, arXiv 2106.12620): a multi-head interpreter drops patches.

No official code exists; this follows the paper-level description, and the exact interpreter
form is our reading (marked unverified in the spec): per head h, a query-key score of each token
against a query q_h (taken from the first protected token - the class token - projected, or
from a learned vector when nothing is protected):
``phi_h(x_j) = <W_q q, W_k x_j>_h / sqrt(d_h)``, keep probability ``pi_j = mean_h sigmoid(phi_h)``.

* training: actions ``u_j ~ Bernoulli(pi_j)``; tokens with u_j = 0 are physically removed; the
  log-probability ``sum_j log p(u_j | pi_j)`` of each row is stored in ``last_log_prob`` (B,).
  Train with :func:`reinforce_loss` and a reward such as :func:`iared2_reward` (BlockDrop-style:
  ``1 - (kept fraction)^2`` if correct, else ``-tau``), with the backbone frozen.
* inference: deterministic ``u_j = [pi_j > threshold]`` (0.5).

``threshold = 0`` (or a policy with pi = 1) keeps every token: the pruner is then the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner, select_tokens

__all__ = ["IARed2Pruner", "iared2_reward", "reinforce_loss"]


@register_pruner("iared2")
class IARed2Pruner(TokenPruner):
    """Multi-head interpreter policy that drops uninformative tokens.

    Args:
        heads: interpreter heads H_I.
        head_dim: interpreter width per head.
        threshold: inference keep rule pi > threshold (0 keeps all).
        sample: sample actions in training (REINFORCE); False = threshold in training too.

    Shapes: x (B, N, C) -> (B, N', C); ``last_keep_prob`` (B, N), ``last_log_prob`` (B,).
    """

    needs_importance = False

    def __init__(
        self,
        *,
        dim: int,
        layer: int,
        depth: int,
        heads: int = 4,
        head_dim: int = 16,
        threshold: float = 0.5,
        sample: bool = True,
    ) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if heads < 1 or head_dim < 1:
            raise ValueError(f"iared2 needs heads >= 1 and head_dim >= 1, got {heads}, {head_dim}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"iared2 threshold must be in [0, 1), got {threshold!r}")
        self.heads, self.head_dim, self.threshold, self.sample = heads, head_dim, float(threshold), bool(sample)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, heads * head_dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.last_keep_prob: Tensor | None = None
        self.last_log_prob: Tensor | None = None

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Before each of up to 3 later groups of blocks (the paper: 4 groups)."""
        step = max(depth // 4, 1)
        return [i for i in range(step - 1, depth - 1, step)][:3] or [0]

    def keep_prob(self, x: Tensor, protected: Tensor | None) -> Tensor:
        """pi (B, N) = mean over heads of sigmoid(query-key score)."""
        b, n, _ = x.shape
        h = self.norm(x)
        if protected is not None and bool(protected.any()):
            first = protected.float().argmax(1)
            qsrc = h[torch.arange(b, device=x.device), first]
        else:
            qsrc = self.query.expand(b, -1)
        q = self.q(qsrc).view(b, self.heads, self.head_dim)
        k = self.k(h).view(b, n, self.heads, self.head_dim)
        phi = torch.einsum("bhd,bnhd->bnh", q, k) / self.head_dim**0.5
        return torch.sigmoid(phi).mean(-1)

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        b, n, _ = x.shape
        if self.threshold == 0.0 and not (self.training and self.sample):
            return self.identity(x, mask)
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        prot = torch.zeros_like(valid) if protected is None else protected
        cand = valid & ~prot
        pi = self.keep_prob(x, protected)
        self.last_keep_prob = pi.detach()
        if self.training and self.sample:
            u = torch.bernoulli(pi.detach()).bool()
            logp = torch.where(u, pi.clamp_min(1e-8).log(), (1 - pi).clamp_min(1e-8).log())
            self.last_log_prob = (logp * cand).sum(1)
        else:
            u = pi > self.threshold
            self.last_log_prob = None
        keep = (cand & u) | (prot & valid)
        xk, index, new_mask = select_tokens(x, keep)
        return PruneOutput(xk, index, new_mask)


def iared2_reward(correct: Tensor, kept_fraction: Tensor, tau: float = 0.5) -> Tensor:
    """BlockDrop-style reward (B,): ``1 - kept_fraction^2`` where correct, else ``-tau``."""
    return torch.where(correct, 1.0 - kept_fraction.to(torch.float32) ** 2, torch.full_like(kept_fraction, -tau))


def reinforce_loss(model: nn.Module, reward: Tensor, baseline: str | Tensor = "mean") -> Tensor:
    """Policy-gradient loss ``-mean_b (R_b - baseline) * sum_layers log p(u_b)`` over every sampled IA-RED2 policy.

    ``reward`` (B,); ``baseline`` "mean" (batch mean, a self-critical-style variance reduction),
    "none", or a tensor. Raises ValueError when no policy sampled in the last forward.
    """
    logps = [m.last_log_prob for m in model.modules() if isinstance(m, IARed2Pruner) and m.last_log_prob is not None]
    if not logps:
        raise ValueError("no IA-RED2 policy sampled actions in the last forward (train mode with sample=True?)")
    logp = torch.stack(logps).sum(0)
    if tuple(reward.shape) != tuple(logp.shape):
        raise ValueError(f"reward must be (B,) = {tuple(logp.shape)}, got {tuple(reward.shape)}")
    if isinstance(baseline, Tensor):
        b = baseline
    elif baseline == "mean":
        b = reward.mean()
    elif baseline == "none":
        b = torch.zeros(())
    else:
        raise ValueError(f"baseline must be 'mean', 'none' or a tensor, got {baseline!r}")
    return -((reward - b).detach() * logp).mean()
