"""Flow attention: ``flow`` (Flowformer, Wu et al., ICML 2022).

Wu, Wu, Xu, Wang & Long, "Flowformer: Linearizing Transformers with Conservation Flows",
ICML 2022. With ``q̃ = σ(Q)``, ``k̃ = σ(K)``: incoming flows ``I = q̃ Σ_j k̃_j``, outgoing
``O = k̃ Σ_i q̃_i``, conserved flows ``Î = q̃ Σ_j k̃_j/O_j`` and ``Ô = k̃ Σ_i q̃_i/I_i``;
competition ``comp = M softmax(Ô)``, allocation ``alloc = σ(Î N/M)``, and
``R = alloc ⊙ (q̃/I) Σ_j k̃_j^T (comp_j v_j)`` (equations, causal form and flags in
:mod:`attnlib.functional.flow`). O(N) time and memory; the causal form uses prefix sums and
the chunked parallel scan, and a recurrent :meth:`FlowAttention.step` for decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlib.functional.flow import FLOW_FEATURE_MAPS, flow_attention, flow_step
from attnlib.masks import AttentionMask
from attnlib.registry import register_variant
from attnlib.variants._common import KernelCore, kernel_family_caps, unpack
from attnlib.variants.base import CoreOutput

__all__ = ["FLOW_PRESETS", "FlowAttention"]

# preset -> (feature_map, competition_clamp), after the official files (thuml/Flowformer)
FLOW_PRESETS: dict[str, tuple[str, float | None]] = {
    "paper": ("sigmoid", None),  # the paper's equations (no clamp)
    "core": ("sigmoid", 1.0),  # Flow_Attention.py (both classes), Flowformer_CV, Flowformer_TorchModule (GPT)
    "nlp_causal": ("sigmoid", 5.0),  # Flowformer_NLP/flow_attention.py (causal LM, WikiText-103)
    "rl_causal": ("sigmoid", 10.0),  # Flowformer_RL/.../flowformer_attention.py (decision transformer)
    "lra": ("relu", None),  # Flowformer_LRA (JAX): relu + 1e-6, no clamp
    "timeseries": ("sigmoid", None),  # Flowformer_TimeSeries/models/Flow_Attention.py: no clamp
}


@register_variant("flow")
class FlowAttention(KernelCore):
    """Flowformer flow-conservation attention.

    Args:
        eps: lower clamp of the flows in divisions (1e-6).
        competition_clamp: clamp Ô to [-c, c] before the competition softmax. Default 1.0, the
            official core file ``Flow_Attention.py`` (also the CV and GPT code); None is the
            paper's equation. With ±1 the clamp saturates about half the sources (all when
            N > M), which switches competition off for them (see the presets).
        feature_map: "sigmoid" (default) or "relu" (relu + 1e-6, the LRA code).
        competition, allocation: False gives the paper's "w/o competition" / "w/o allocation"
            ablations.
        preset: one official setting, sets feature_map and competition_clamp (overriding them):
            "core" (clamp 1: ``Flow_Attention.py``, CV, GPT module), "nlp_causal" (clamp 5:
            the WikiText-103 LM), "rl_causal" (clamp 10), "lra" (relu features, no clamp),
            "timeseries" (no clamp) or "paper" (the paper's equations, no clamp).
        chunk_size, explicit: as for ``linear``.

    In self-attention with key padding, padded tokens are removed as queries too (they would
    otherwise feed the outgoing flows); in cross-attention only the keys are padded.
    """

    capabilities = kernel_family_caps(
        "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows", family="flow"
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        competition_clamp: float | None = 1.0,
        feature_map: str = "sigmoid",
        competition: bool = True,
        allocation: bool = True,
        preset: str | None = None,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        if preset is not None:
            if preset not in FLOW_PRESETS:
                raise ValueError(f"flow: preset must be one of {sorted(FLOW_PRESETS)} or None, got {preset!r}")
            feature_map, competition_clamp = FLOW_PRESETS[preset]
        if feature_map not in FLOW_FEATURE_MAPS:
            raise ValueError(f"flow: feature_map must be one of {sorted(FLOW_FEATURE_MAPS)}, got {feature_map!r}")
        if competition_clamp is not None and not float(competition_clamp) > 0:
            raise ValueError(f"flow: competition_clamp must be positive or None, got {competition_clamp!r}")
        self.eps = float(eps)
        self.competition_clamp = None if competition_clamp is None else float(competition_clamp)
        self.feature_map = feature_map
        self.competition = bool(competition)
        self.allocation = bool(allocation)
        self.preset = preset

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
        kp = mask.key_padding
        self_attention = not cross and q.shape[2] == k.shape[2]
        res = flow_attention(
            q,
            k,
            v,
            causal=mask.causal,
            eps=self.eps,
            competition_clamp=self.competition_clamp,
            feature_map=self.feature_map,  # type: ignore[arg-type]
            competition=self.competition,
            allocation=self.allocation,
            mask=mask,
            query_padding=kp if self_attention else None,
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        d = self.head_dim
        vec = self._zeros(batch, d, dtype=dtype, device=device)
        return {
            "S": self._zeros(batch, d, d, dtype=dtype, device=device),
            "sum_q": vec.clone(),
            "sum_k": vec.clone(),
            "sum_q_t_over_I": vec.clone(),
            "sum_k_t_over_O": vec.clone(),
            "lse": torch.full((batch, self.num_heads), float("-inf"), dtype=vec.dtype, device=device),
            "count": torch.zeros((), dtype=vec.dtype, device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One causal step; equals the causal parallel form token by token."""
        self._check_step(q, k, v)
        return flow_step(
            q,
            k,
            v,
            state,
            eps=self.eps,
            competition_clamp=self.competition_clamp,
            feature_map=self.feature_map,  # type: ignore[arg-type]
            competition=self.competition,
            allocation=self.allocation,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", feature_map={self.feature_map!r}, competition_clamp={self.competition_clamp}"
            + ("" if self.competition else ", competition=False")
            + ("" if self.allocation else ", allocation=False")
        )
