"""Optimal-transport family: ``sinkhorn`` (Sinkformers) and ``got`` (Graph Optimal Transport).

* ``sinkhorn`` - Sander, Ablin, Blondel & Peyré, "Sinkformers: Transformers with Doubly
  Stochastic Attention" (AISTATS 2022): the softmax is replaced by ``n_iters`` alternating
  row/column normalisations of ``exp(q k^T / sqrt(D))`` (``n_iters=1`` is softmax exactly).
  Math: :func:`attnlib.functional.sinkhorn.sinkhorn_attention`.
* ``got`` - Chen et al., "Graph Optimal Transport for Cross-Domain Alignment" (ICML 2020): the
  attention weights are the OT plan between queries and keys (IPOT on cosine costs, rows
  rescaled to sum to 1), and the GOT regulariser (Wasserstein + Gromov-Wasserstein distance
  between the query and key sets of every head) is returned as ``aux_loss`` in training.
  Math: :func:`attnlib.functional.ot.ot_attention`, :func:`attnlib.functional.ot.got_loss`.

Both normalise over queries as well as keys, so with key padding in self-attention the padded
positions are padded queries too: they take part in no column sum and return zeros.
"""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor

from attnlib._validation import int_at_least, non_negative_number, optional_positive_number, positive_number
from attnlib.functional.ot import got_loss, ot_attention
from attnlib.functional.sinkhorn import sinkhorn_attention
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = ["GOTAttention", "SinkhornAttention"]


def _query_mask(mask: AttentionMask, cross: bool) -> Tensor | None:
    """(B, N) bool padding of the queries: the key padding in self-attention, else None."""
    if cross or mask.key_padding is None or mask.n != mask.m:
        return None
    return mask.key_padding


@register_variant("sinkhorn")
class SinkhornAttention(AttentionCore):
    """Doubly-stochastic attention by Sinkhorn normalisation (Sinkformers).

    Args:
        num_heads, head_dim: set by :class:`attnlib.Attention`.
        n_iters: normalisation steps, rows first: 1 = softmax, 2 = rows then columns, ... The
            last step is a row step for odd n_iters (rows sum to 1 exactly); Sinkformers use
            3-21 (default 3).
        scale: logit scale, default head_dim**-0.5.

    Column sums are N_real / M_real (the total mass of N_real rows summing to 1). Not causal:
    a column normalisation lets every query influence every other query's weights.
    """

    capabilities = Capabilities(
        causal=False,
        cross=True,
        key_padding=True,
        full_mask=True,
        block_mask=True,
        window=True,
        complexity="O(N^2·iters)",
        exact=False,
        has_weights=True,
        trainable=False,
        attn_dropout=True,
        gqa=True,
        permutation_equivariant=True,
        importance=True,
        family="ot",
        paper="Sander et al. 2022, Sinkformers: Transformers with Doubly Stochastic Attention",
    )

    def __init__(self, *, num_heads: int, head_dim: int, n_iters: int = 3, scale: float | None = None) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        self.n_iters = int_at_least(n_iters, 1, "sinkhorn: n_iters", hint=" (1 = softmax)")
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
    ) -> CoreOutput:
        res = sinkhorn_attention(
            q,
            k,
            v,
            mask=mask,
            query_mask=_query_mask(mask, cross),
            scale=self.scale,
            n_iters=self.n_iters,
            dropout_p=dropout_p,
            return_weights=need_weights or need_importance,
        )
        if not isinstance(res, tuple):
            return CoreOutput(res)
        out, w = res
        return CoreOutput.from_weights(out, w, need_weights=need_weights, need_importance=need_importance)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n_iters={self.n_iters}"


@register_variant("got")
class GOTAttention(AttentionCore):
    """Attention by optimal transport (GOT), returning the GOT regulariser as ``aux_loss``.

    Per head, the weights are the OT plan between the queries and the keys (uniform masses over
    the real tokens, cost ``1 - cos(q_i, k_j)`` or ``-q·k/sqrt(D)``, solved by IPOT and
    differentiated through), rows rescaled to sum to 1; ``out = weights @ v``. With IPOT the
    plan tends to an exact OT plan (sparse; a permutation when N == M) as ``n_iters`` grows.

    In training mode ``aux_loss = mean over (batch, head) of wd_weight·WD(q, k) +
    gwd_weight·GWD(q, k)`` (:func:`attnlib.functional.ot.got_loss`, pruned cosine costs, GOT's
    defaults): add ``attnlib.aux_loss(model)`` to the loss. In eval mode no aux loss is computed.

    Args:
        cost: "cosine" (GOT) or "dot".
        solver: "ipot" (``beta``) or "sinkhorn" (``eps``) for the attention plan.
        beta, eps, n_iters: solver settings of the attention plan (0.5, 0.05, 20).
        wd_weight, gwd_weight: weights of the regulariser (GOT VQA: 0.1, 0.1; 0 disables a term).
        prune: GOT pruning fraction of the regulariser's costs (0.1).
        shared_plan: one fused plan for WD and GWD (the paper's form) instead of two.
        reg_plan_grad: "envelope" (default, as the GOT code: the regulariser's plans carry no
            gradient, memory O(N·M)) or "unroll".
    """

    capabilities = Capabilities(
        causal=False,
        cross=True,
        key_padding=True,
        full_mask=False,
        block_mask=False,
        window=False,
        complexity="O(N·M·iters)",
        exact=False,
        has_weights=True,
        trainable=False,
        attn_dropout=False,
        gqa=False,
        permutation_equivariant=True,
        importance=True,
        family="ot",
        paper="Chen et al. 2020, Graph Optimal Transport for Cross-Domain Alignment",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        cost: str = "cosine",
        solver: str = "ipot",
        beta: float = 0.5,
        eps: float = 0.05,
        n_iters: int = 20,
        wd_weight: float = 0.1,
        gwd_weight: float = 0.1,
        prune: float | None = 0.1,
        shared_plan: bool = False,
        reg_plan_grad: str = "envelope",
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        if cost not in ("cosine", "dot"):
            raise ValueError(f"got: cost must be 'cosine' or 'dot', got {cost!r}")
        if solver not in ("ipot", "sinkhorn"):
            raise ValueError(f"got: solver must be 'ipot' or 'sinkhorn', got {solver!r}")
        if reg_plan_grad not in ("envelope", "unroll"):
            raise ValueError(f"got: reg_plan_grad must be 'envelope' or 'unroll', got {reg_plan_grad!r}")
        self.cost = cost
        self.solver = solver
        self.beta = positive_number(beta, "got: beta")
        self.eps = positive_number(eps, "got: eps")
        self.n_iters = int_at_least(n_iters, 1, "got: n_iters")
        self.wd_weight = non_negative_number(wd_weight, "got: wd_weight")
        self.gwd_weight = non_negative_number(gwd_weight, "got: gwd_weight")
        self.prune = prune
        self.shared_plan = bool(shared_plan)
        self.reg_plan_grad = reg_plan_grad

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"n_iters": 5}

    def regularizer(self, q: Tensor, k: Tensor, query_mask: Tensor | None, key_mask: Tensor | None) -> Tensor:
        """GOT regulariser between the query and key sets of every (batch, head): a scalar."""
        h = q.shape[1]
        x = rearrange(q, "b h n d -> (b h) n d")
        y = rearrange(k, "b h m d -> (b h) m d")
        xm = None if query_mask is None else query_mask.repeat_interleave(h, 0)
        ym = None if key_mask is None else key_mask.repeat_interleave(h, 0)
        loss = got_loss(
            x,
            y,
            x_mask=xm,
            y_mask=ym,
            wd_weight=self.wd_weight,
            gwd_weight=self.gwd_weight,
            prune=self.prune,
            shared_plan=self.shared_plan,
            plan_grad=self.reg_plan_grad,
        )
        return loss.to(q.dtype)  # type: ignore[union-attr]

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
        qm = _query_mask(mask, cross)
        km = mask.key_padding
        res = ot_attention(
            q,
            k,
            v,
            key_mask=km,
            query_mask=qm,
            cost=self.cost,  # type: ignore[arg-type]
            solver=self.solver,  # type: ignore[arg-type]
            beta=self.beta,
            eps=self.eps,
            n_iters=self.n_iters,
            return_weights=need_weights or need_importance,
        )
        aux = None
        if self.training and (self.wd_weight > 0 or self.gwd_weight > 0):
            aux = self.regularizer(q, k, qm, km)
        if not isinstance(res, tuple):
            return CoreOutput(res, aux_loss=aux)
        out, w = res
        return CoreOutput.from_weights(out, w, need_weights=need_weights, need_importance=need_importance, aux_loss=aux)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", solver={self.solver!r}, n_iters={self.n_iters}, wd_weight={self.wd_weight}, "
            f"gwd_weight={self.gwd_weight}"
        )
