"""Optimal transport: Sinkhorn, IPOT, Gromov-Wasserstein, GOT distances and OT attention.

The functions live in :mod:`attnlib.functional.ot` (their docstrings give the equations and
shapes) and are re-exported here; :class:`GOTRegularizer` is the GOT regulariser
(:func:`got_loss`) as a module.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlib._validation import non_negative_number
from attnlib.functional.ot import (
    cosine_cost,
    got_distance,
    got_loss,
    gromov_wasserstein,
    gw_cost,
    ipot,
    ot_attention,
    prune_cost,
    sinkhorn,
    transport_cost,
)

__all__ = [
    "GOTRegularizer",
    "cosine_cost",
    "got_distance",
    "got_loss",
    "gromov_wasserstein",
    "gw_cost",
    "ipot",
    "ot_attention",
    "prune_cost",
    "sinkhorn",
    "transport_cost",
]


class GOTRegularizer(nn.Module):
    """GOT as a drop-in regulariser: ``mean(wd_weight·WD + gwd_weight·GWD)`` between two feature sets.

    Add its output to the training loss to align, e.g., image-region and word features that
    feed a cross-attention (Chen et al. 2020: weights 0.1 and 0.1 in VQA). Any extra keyword
    goes to :func:`got_distance` (prune, shared_plan, solver, beta, n_iters, plan_grad, ...).

    ``forward(x (..., N, D), y (..., M, D), x_mask=None, y_mask=None) -> scalar``: the mean over
    examples that have real tokens on both sides (0 if none; :func:`got_loss`). The last plans
    are kept in ``self.last_plans`` (detached) for inspection.
    """

    def __init__(self, wd_weight: float = 0.1, gwd_weight: float = 0.1, **got_kwargs: object) -> None:
        super().__init__()
        self.wd_weight = non_negative_number(wd_weight, "GOTRegularizer: wd_weight")
        self.gwd_weight = non_negative_number(gwd_weight, "GOTRegularizer: gwd_weight")
        for key in ("wd_weight", "gwd_weight", "x_mask", "y_mask", "return_plans"):
            if key in got_kwargs:
                raise ValueError(f"GOTRegularizer: {key!r} is not a got_distance option here")
        self.got_kwargs = dict(got_kwargs)
        self.last_plans: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None) -> Tensor:
        loss, t_w, t_g = got_loss(  # type: ignore[misc]
            x,
            y,
            x_mask=x_mask,
            y_mask=y_mask,
            wd_weight=self.wd_weight,
            gwd_weight=self.gwd_weight,
            return_plans=True,
            **self.got_kwargs,
        )
        self.last_plans = (t_w.detach(), t_g.detach())
        return loss

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.got_kwargs.items())
        return f"wd_weight={self.wd_weight}, gwd_weight={self.gwd_weight}{opts}"
