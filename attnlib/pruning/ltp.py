"""LTP - Learned Token Pruning (Kim et al., KDD 2022, arXiv 2107.00910).

A token's importance is the attention it receives, averaged over heads and queries (the
attention contract's ``importance``). After block l, tokens whose importance is below a
learned threshold are dropped:

* threshold ``theta_l = final_threshold * l / depth + delta_l`` (a linear rise with depth, plus a
  learnable offset ``delta_l`` initialised to 0);
* **soft mode** (threshold search, training): the block output is multiplied token-wise by
  ``mu_j = sigmoid((s_j - theta_l) / T)`` and ``aux_loss = lam * mean_j mu_j`` pushes the kept
  ratio down (the LTP regulariser; summed over layers by :func:`attnlib.aux_loss`) - or, with
  ``keep_target`` set, ``aux_loss = lam * mean_b (mean_j mu_bj - keep_target)^2`` steers each
  sample's soft keep ratio to a target (the ratio loss of DynamicViT, Rao et al. 2021; an
  addition to LTP, whose plain regulariser needs ``lam`` searched per target; per-sample targets
  also keep the rows of a batch at similar lengths, which batched inference needs);
* **hard mode** (inference, and fine-tuning with frozen thresholds): keep j iff
  ``s_j >= max(min_threshold, theta_l)``, physically removing the others;
* **straight-through mode** (training; an addition to LTP): the hard forward pass of inference,
  with the kept tokens multiplied by ``mu_j / stopgrad(mu_j)`` (= 1), so the threshold and the
  scores still get gradients and the trained model sees exactly what inference runs (soft-mask
  training leaves "ghost" tokens that later blocks can still attend to; hard pruning drops them).
  The keep-ratio loss likewise takes the hard mask's value with mu's gradient
  (``hard_j + mu_j - stopgrad(mu_j)``), so ``keep_target`` is the fraction inference keeps.

The paper's two stages: (1) threshold search with the soft mask (``mode="auto"`` / ``"soft"``,
thresholds and weights trained with the regulariser), then (2) the thresholds are frozen and the
model is fine-tuned with hard pruning (``mode="hard"``, ``freeze_threshold=True``: no soft mask,
no regulariser, the threshold takes no gradient or weight decay), as the official
``--masking_mode hard`` run restored from the soft checkpoint. :func:`ltp_hard_stage` switches a
trained model's LTP pruners to stage 2; ``experiment=vit_digits_ltp_hard init_from=<stage-1 run>``
runs it.

``final_threshold = -inf`` disables pruning (identity, bit for bit). Deviations from the official
code (kssteven418/LTP): pruned tokens are removed (not masked with -10000), a class token /
protected tokens are never dropped, scores come from the attention without dropout, and the
importance averages over queries of the block (padded query rows included, as in the contract).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner, score_query_of, select_tokens

__all__ = ["LTPPruner", "ltp_hard_stage"]

_MODES = ("auto", "soft", "hard", "straight_through")


@register_pruner("ltp")
class LTPPruner(TokenPruner):
    """Learned-threshold token pruning.

    Args:
        final_threshold: theta_final; layer l's base threshold is ``final_threshold * l / depth``
            (LTP default 0.01). ``-inf`` keeps every token.
        temperature: T of the soft mask (LTP default 1e-3).
        lam: weight of the keep-ratio regulariser (LTP: 0.01-0.2, the main knob).
        mode: "auto" (soft while training, hard in eval), "soft", "hard" or "straight_through"
            (hard forward with soft-mask gradients while training, hard in eval).
        min_threshold: floor of the hard threshold (LTP: 1e-5).
        learn_threshold: make delta_l a trainable parameter (else a fixed buffer).
        freeze_threshold: stage 2 of the paper: delta_l stays a parameter (it loads from the
            stage-1 checkpoint) but takes no gradient.
        normalize: score ``N_valid * s_j`` instead of ``s_j`` (1 = uniform attention), which makes
            thresholds independent of the sequence length (off in the paper).
        keep_target: None (LTP's ``lam * mean mu`` over the batch) or a fraction in (0, 1]: each
            sample's soft keep ratio (mean of mu over its real, unprotected tokens) is pulled to it
            by ``lam * mean_b (ratio_b - keep_target)^2``.
        score: ``"mean"`` (LTP: attention received, averaged over heads and queries) or
            ``"cls"`` (the class token's attention row averaged over heads, as in EViT - an
            addition to LTP for class-token classifiers; needs a variant with attention weights).

    Shapes: x (B, N, C), importance (B, N) -> x (B, N', C) (hard) or (B, N, C) (soft).
    """

    def __init__(
        self,
        *,
        dim: int,
        layer: int,
        depth: int,
        final_threshold: float = 0.01,
        temperature: float = 1e-3,
        lam: float = 0.1,
        mode: str = "auto",
        min_threshold: float = 1e-5,
        learn_threshold: bool = True,
        normalize: bool = False,
        keep_target: float | None = None,
        score: str = "mean",
        freeze_threshold: bool = False,
    ) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if mode not in _MODES:
            raise ValueError(f"ltp mode must be one of {_MODES}, got {mode!r}")
        if not temperature > 0:
            raise ValueError(f"ltp temperature must be > 0, got {temperature!r}")
        if math.isnan(final_threshold) or final_threshold == math.inf:
            raise ValueError(f"ltp final_threshold must be a number or -inf, got {final_threshold!r}")
        self.final_threshold, self.temperature, self.lam = float(final_threshold), float(temperature), float(lam)
        if keep_target is not None and not (isinstance(keep_target, (int, float)) and 0.0 < keep_target <= 1.0):
            raise ValueError(f"ltp keep_target must be None or in (0, 1], got {keep_target!r}")
        self.mode, self.min_threshold, self.normalize = mode, float(min_threshold), bool(normalize)
        self.keep_target = None if keep_target is None else float(keep_target)
        self.score = score
        self.score_query = score_query_of("ltp", score)
        # keep-all (-inf) asks the block for no importance: the unpruned model's kernels, bit for bit
        self.needs_importance = self.final_threshold != -math.inf  # type: ignore[misc]
        delta = torch.zeros(())
        if learn_threshold:
            self.delta = nn.Parameter(delta, requires_grad=not freeze_threshold)
        else:
            self.register_buffer("delta", delta)

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Every block but the first (threshold 0) and the last."""
        return list(range(1, depth - 1)) or [0]

    @property
    def disabled(self) -> bool:
        """True when the threshold is -inf (keep everything)."""
        return self.final_threshold == -math.inf

    def threshold(self) -> Tensor:
        """theta_l = final_threshold * layer / depth + delta (scalar tensor)."""
        return self.final_threshold * self.layer / self.depth + self.delta

    def soft(self) -> bool:
        """Whether the next call uses the soft mask."""
        return self.mode == "soft" or (self.mode == "auto" and self.training)

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        if self.disabled:
            return self.identity(x, mask)
        assert importance is not None
        b, n, _ = x.shape
        valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        prot = torch.zeros_like(valid) if protected is None else protected
        s = importance.to(x.dtype)
        if self.normalize:
            s = s * valid.sum(1, keepdim=True).to(s.dtype)
        theta = self.threshold().to(s.dtype)
        cand = valid & ~prot
        ste = self.mode == "straight_through" and self.training
        aux = None
        if self.soft() or ste:
            mu = torch.sigmoid((s - theta) / self.temperature)
            mu = torch.where(cand, mu, torch.ones_like(mu))
            w = cand.to(mu.dtype)
            # straight-through: the loss sees the hard mask inference runs (value), with mu's gradient
            m = (
                mu
                if not ste
                else mu + ((cand & (s >= torch.clamp(theta, min=self.min_threshold))).to(mu.dtype) - mu).detach()
            )
            if self.keep_target is None:
                aux = self.lam * (m * w).sum() / w.sum().clamp_min(1.0)
            else:
                ratio = (m * w).sum(1) / w.sum(1).clamp_min(1.0)
                aux = self.lam * ((ratio - self.keep_target) ** 2).mean()
            if not ste:
                return PruneOutput(x * mu[..., None], torch.arange(n, device=x.device).expand(b, n), mask, aux)
        keep = (cand & (s >= torch.clamp(theta, min=self.min_threshold))) | (prot & valid)
        if ste:  # kept tokens x mu / stopgrad(mu): value exactly 1 (mu >= 1/2 there), gradient of mu
            den = torch.where(keep, mu.detach(), torch.ones_like(mu))
            x = x * torch.where(keep, mu / den, torch.ones_like(mu))[..., None]
        xk, index, new_mask = select_tokens(x, keep)
        return PruneOutput(xk, index, new_mask, aux)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, final_threshold={self.final_threshold}, temperature={self.temperature}, "
            f"lam={self.lam}, mode={self.mode!r}, keep_target={self.keep_target}, score={self.score!r}"
        )


def ltp_hard_stage(model: nn.Module) -> list[LTPPruner]:
    """Switch every LTP pruner of ``model`` to the paper's second stage, in place.

    Each :class:`LTPPruner` gets ``mode="hard"`` (hard pruning in training as in inference, no
    soft mask, no regulariser) and its learned threshold offset is frozen
    (``requires_grad=False``). Returns the pruners; ValueError when the model has none.
    """
    pruners = [m for m in model.modules() if isinstance(m, LTPPruner)]
    if not pruners:
        raise ValueError("ltp_hard_stage: the model has no LTP pruner")
    for p in pruners:
        p.mode = "hard"
        if isinstance(p.delta, nn.Parameter):
            p.delta.requires_grad_(False)
    return pruners
