"""Probes: what one attention layer with random features can learn; verbatim recall / stacked heads.

:class:`RandomFeatureAttention` is the model of Fu, Guo, Bai & Mei (2023), "What can a Single
Attention Layer Learn? A Study Through the Random Features Lens": a query vector ``x_0`` and N
key vectors ``x_1..x_N``, M heads with random *frozen* query-key matrices ``W_m`` and trainable
value vectors ``v_m``:

    f(x_0, X) = sum_m (1/N) sum_i sigma(x_0^T W_m x_i) <v_m, x_i>

(``sigma = "softmax"`` replaces the 1/N average by the softmax over i, which is exactly one
attention layer with frozen q/k projections). f is linear in v, so it can be fit in closed form
(:meth:`RandomFeatureAttention.fit_ridge`) or by SGD. :func:`freeze_qk` puts any model of
:class:`attnlib.Attention` in the same regime: its query and key projections stay at their
(random, at initialisation) values while values, output projections and the rest train.

:func:`induction_probe` measures verbatim recall on a repeated random sequence: the loss on the
repeat against the first copy, and per head the *induction* score (attention from position t of
the repeat to the token after t's earlier occurrence) and the *previous-token* score (attention
to t - 1). Induction needs two stacked heads - a previous-token head, then an induction head in
a later layer reading its output (Olsson et al. 2022) - so a one-layer model cannot show it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from attnlib._validation import describe, positive_int
from attnlib.analysis.capture import capture
from attnlib.attention import Attention

__all__ = ["InductionReport", "RandomFeatureAttention", "freeze_qk", "induction_probe"]

_SIGMAS = ("exp", "softmax", "relu")


class RandomFeatureAttention(nn.Module):
    """One attention layer with random frozen query-key matrices and trainable values.

    Args:
        dim: d, the size of x_0 and of each key x_i.
        num_heads: M random features (heads).
        sigma: "exp" (default), "softmax" (normalised over the keys) or "relu".
        qk_init: "gaussian" (W_m entries i.i.d. N(0, 1/d)) or "gaussian_biased"
            (``W_m = mu I + G_m``, the non-zero-mean variant the paper finds better for some targets).
        mu: the mean for "gaussian_biased".
        generator: torch.Generator for W (reproducible features).

    ``W`` (M, d, d) is a buffer (never trained, no weight decay); ``v`` (M, d) the parameters.
    Shapes: ``forward(x0 (B, d), keys (B, N, d)) -> (B,)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        sigma: str = "exp",
        qk_init: str = "gaussian",
        mu: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        if sigma not in _SIGMAS:
            raise ValueError(f"sigma must be one of {_SIGMAS}, got {sigma!r}")
        if qk_init not in ("gaussian", "gaussian_biased"):
            raise ValueError(f"qk_init must be 'gaussian' or 'gaussian_biased', got {qk_init!r}")
        w = torch.randn(num_heads, dim, dim, generator=generator) / math.sqrt(dim)
        if qk_init == "gaussian_biased":
            w = w + float(mu) * torch.eye(dim)
        self.register_buffer("W", w)
        self.v = nn.Parameter(torch.zeros(num_heads, dim))
        self.sigma = sigma

    def scores(self, x0: Tensor, keys: Tensor) -> Tensor:
        """sigma(x_0^T W_m x_i) (or its softmax over i): (B, M, N)."""
        if x0.dim() != 2 or keys.dim() != 3 or keys.shape[0] != x0.shape[0] or keys.shape[2] != x0.shape[1]:
            raise ValueError(
                f"expected x0 (B, d) and keys (B, N, d) with d={self.W.shape[1]}, "
                f"got {describe(x0)} and {describe(keys)}"
            )
        s = torch.einsum("bd,mde,bne->bmn", x0, self.W.to(x0.dtype), keys)
        if self.sigma == "softmax":
            return s.softmax(-1)
        return (s.exp() if self.sigma == "exp" else s.relu()) / keys.shape[1]

    def features(self, x0: Tensor, keys: Tensor) -> Tensor:
        """The model's features ``phi_m = sum_i a_mi x_i``: (B, M, d); f = <v, phi> summed over m."""
        return torch.einsum("bmn,bnd->bmd", self.scores(x0, keys), keys)

    def forward(self, x0: Tensor, keys: Tensor) -> Tensor:
        """f(x_0, X): (B,)."""
        return (self.features(x0, keys) * self.v.to(x0.dtype)).sum((1, 2))

    @torch.no_grad()
    def fit_ridge(self, x0: Tensor, keys: Tensor, y: Tensor, lam: float = 1e-3) -> Tensor:
        """Set v to the ridge solution of ``min_v (1/n) ||Phi v - y||^2 + lam ||v||^2`` (float64).

        x0 (n, d), keys (n, N, d), y (n,). Returns the training mean squared error.
        """
        phi = self.features(x0.double(), keys.double()).flatten(1)  # (n, M d)
        n, p = phi.shape
        a = phi.T @ phi / n + float(lam) * torch.eye(p, dtype=torch.float64)
        sol = torch.linalg.solve(a, phi.T @ y.double() / n)
        self.v.copy_(sol.view_as(self.v).to(self.v.dtype))
        return ((phi @ sol - y.double()) ** 2).mean()


class _FrozenRows(nn.Module):
    """Parametrization: the first rows of a weight (or bias) are a frozen copy, the rest trains."""

    def __init__(self, frozen: Tensor) -> None:
        super().__init__()
        self.register_buffer("frozen", frozen.detach().clone())

    def forward(self, w: Tensor) -> Tensor:
        return torch.cat([self.frozen.to(w.dtype), w[self.frozen.shape[0] :]], 0)


def freeze_qk(model: nn.Module) -> list[str]:
    """Freeze the query and key projections of every :class:`attnlib.Attention` in ``model``.

    The rows of ``in_proj`` that compute q and k (weight and bias; ``dim + kv_dim`` rows, GQA
    included) are replaced, through :mod:`torch.nn.utils.parametrize`, by a buffer holding their
    current values; the value rows, ``out_proj`` and every other parameter keep training. Called
    on a freshly built model this is the frozen-random-query-key regime of Fu et al. (2023)
    (:class:`RandomFeatureAttention` is its one-layer form; here each head's bilinear form is the
    product ``W_q^T W_k`` of two random projections rather than one Gaussian matrix). Weight decay
    cannot move the frozen rows: the optimiser's copy of them is never read. The forward is
    unchanged; the state dict names ``in_proj.parametrizations.weight.original`` (and ``.0.frozen``).

    Returns:
        The qualified names of the frozen modules. ValueError when there is none, or when one
        is frozen already.
    """
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not sites:
        raise ValueError(f"freeze_qk: {type(model).__name__} holds no attnlib.Attention")
    for name, m in sites:
        if parametrize.is_parametrized(m.in_proj):
            raise ValueError(f"freeze_qk: {name or type(m).__name__}.in_proj is parametrized already")
    for _, m in sites:
        rows = m.dim + m.num_kv_heads * m.head_dim
        for pname in ("weight", "bias"):
            if getattr(m.in_proj, pname) is not None:
                parametrize.register_parametrization(m.in_proj, pname, _FrozenRows(getattr(m.in_proj, pname)[:rows]))
    return [name for name, _ in sites]


@dataclass
class InductionReport:
    """Result of :func:`induction_probe`.

    Attributes:
        loss_first, loss_repeat: mean next-token loss (nats) over the first copy and over the
            repeat after its first token (verbatim recall: the repeat is predictable only by copying).
        induction: (L, H) mean attention from repeat position t to the token after t's first
            occurrence (t - T + 1, for a copy of length T).
        previous: (L, H) mean attention from t to t - 1.
    """

    loss_first: float
    loss_repeat: float
    induction: Tensor
    previous: Tensor


@torch.no_grad()
def induction_probe(
    model: nn.Module,
    vocab: Sequence[int] | int,
    *,
    length: int = 32,
    batch: int = 8,
    generator: torch.Generator | None = None,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> InductionReport:
    """Verbatim recall of a repeated random sequence, and the heads that do it.

    Args:
        model: causal LM of attnlib attention, ``model(tokens (B, N)) -> logits (B, N, V)``
            (its variant must report weights for the head scores).
        vocab: token ids to draw from (or V: all of 0..V-1); e.g. the printable bytes for a
            byte-level model, to stay in its training distribution.
        length: T, tokens per copy (the input is 2T tokens).
        batch: sequences.
        generator: for the random tokens.
        forward: ``forward(model, tokens) -> logits`` (default ``model(tokens)``).

    Returns:
        :class:`InductionReport`.
    """
    positive_int(length, "length")
    positive_int(batch, "batch")
    ids = torch.arange(vocab) if isinstance(vocab, int) else torch.as_tensor(list(vocab), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"vocab must offer at least 2 tokens, got {describe(vocab)}")
    dev = next(model.parameters()).device
    first = ids[torch.randint(len(ids), (batch, length), generator=generator)]
    tokens = torch.cat([first, first], 1).to(dev)
    was = model.training
    model.eval()
    try:
        with capture(model, importance=False) as rec:
            logits = (forward or (lambda m, t: m(t)))(model, tokens)
    finally:
        model.train(was)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    nll = nll.view(batch, 2 * length - 1)
    t_rep = torch.arange(length, 2 * length, device=dev)  # query positions in the repeat
    t_prev = torch.arange(1, 2 * length, device=dev)
    ind, prev = [], []
    for w in rec.weights(call=0):  # (B, H, 2T, 2T)
        ind.append(w[:, :, t_rep, t_rep - length + 1].mean((0, 2)))
        prev.append(w[:, :, t_prev, t_prev - 1].mean((0, 2)))
    return InductionReport(
        loss_first=float(nll[:, : length - 1].mean()),
        loss_repeat=float(nll[:, length:].mean()),
        induction=torch.stack(ind).float().cpu(),
        previous=torch.stack(prev).float().cpu(),
    )
