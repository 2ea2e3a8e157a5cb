"""Kernelised linear attention: ``linear``, ``performer``, ``cosformer``, ``lsa``, ``ecoformer``.

Each core maps q (B, H, N, D), k/v (B, H, M, D) to (B, H, N, D) in O(N) time and memory via
the functions of :mod:`attnlib.functional.linear` / :mod:`attnlib.functional.ecoformer`
(equations in their docstrings):

* ``linear`` - Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers
  with Linear Attention", ICML 2020: ``out_i = φ(q_i)^T Σ_j φ(k_j) v_j^T / (φ(q_i)·Σ_j φ(k_j) + eps)``,
  φ = elu + 1.
* ``performer`` - Choromanski et al., "Rethinking Attention with Performers", ICLR 2021:
  FAVOR+ positive orthogonal random features ``φ(x) = exp(W x - |x|^2/2)/sqrt(m)`` estimating
  ``exp(q·k/sqrt(D))``, the softmax kernel.
* ``cosformer`` - Qin et al., "cosFormer: Rethinking Softmax in Attention", ICLR 2022: ReLU
  features re-weighted by ``cos((π/2)(i - j)/L)``.
* ``lsa`` - un-normalised linear self-attention ``(Q K^T ⊙ mask) V / n`` (Mahankali,
  Hashimoto & Ma 2023; von Oswald et al. 2023): one layer implements a step of gradient descent.
* ``ecoformer`` - Liu et al., "EcoFormer: Energy-Saving Attention with Linear Complexity",
  NeurIPS 2022: kernelised hashing of q and k to b-bit codes, Hamming-affinity attention.

All support ``causal=True`` (chunked parallel form, chunk size ``chunk_size``), key padding,
cross-attention (``ecoformer``'s faithful mode excepted), ``importance`` in O(N), weights from
the explicit (quadratic) reference path when requested (``explicit=True`` forces that path
for the output as well), and a recurrent :meth:`step` for causal decoding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from attnlib._validation import positive_int, positive_number
from attnlib.errors import UnsupportedError
from attnlib.functional._common import acc_dtype
from attnlib.functional.ecoformer import BiasMode, ecoformer_attention, ecoformer_step, kernelized_hash, learn_ksh_hash
from attnlib.functional.linear import (
    FeatureMap,
    LSANorm,
    _feature_map,
    cosformer_attention,
    cosformer_step,
    linear_attention,
    linear_self_attention,
    linear_step,
    lsa_step,
    performer_attention,
    performer_projection,
    performer_step,
)
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants._common import KernelCore, kernel_family_caps, unpack
from attnlib.variants.base import CoreOutput

__all__ = ["CosformerAttention", "EcoformerAttention", "LinearAttention", "LinearSelfAttention", "PerformerAttention"]

State = dict[str, Tensor]


def _caps(paper: str, *, permutation_equivariant: bool = True, trainable: bool = False) -> Capabilities:
    return kernel_family_caps(
        paper, family="linear", trainable=trainable, permutation_equivariant=permutation_equivariant
    )


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------


@register_variant("linear")
class LinearAttention(KernelCore):
    """Linear Transformer attention (Katharopoulos et al., ICML 2020).

    ``out_i = φ(q_i)^T S_i / (φ(q_i)·z_i + eps)`` with ``S = Σ_j φ(k_j) v_j^T``, ``z = Σ_j φ(k_j)``
    (prefix sums when causal: the layer is an RNN with state (S, z)).

    Args:
        feature_map: "elu" (elu + 1, default), "relu" or "identity".
        eps: added to the denominator.
        chunk_size: chunk length of the causal chunked form.
        explicit: compute through the quadratic matrix (slow reference mode).
    """

    capabilities = _caps("Katharopoulos et al. 2020, Transformers are RNNs (linear attention)")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        feature_map: FeatureMap = "elu",
        eps: float = 1e-6,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        _feature_map(feature_map)  # validates
        self.feature_map = feature_map
        self.eps = float(eps)

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
        res = linear_attention(
            q,
            k,
            v,
            feature_map=self.feature_map,
            causal=mask.causal,
            eps=self.eps,
            mask=mask,
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        d = self.head_dim
        return {
            "S": self._zeros(batch, d, d, dtype=dtype, device=device),
            "z": self._zeros(batch, d, dtype=dtype, device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        self._check_step(q, k, v)
        return linear_step(q, k, v, state, feature_map=self.feature_map, eps=self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", feature_map={self.feature_map!r}"


# --------------------------------------------------------------------------------------------
# performer
# --------------------------------------------------------------------------------------------


@register_variant("performer")
class PerformerAttention(KernelCore):
    """Performer FAVOR+ attention (Choromanski et al., ICLR 2021).

    ``φ(x) = exp(W x' - |x'|^2/2)/sqrt(m)`` with ``x' = x · D^{-1/4}`` and W (m, D) orthogonal
    random features (QR with the sign fix, chi-distributed row norms), so that
    ``E[φ(q)·φ(k)] = exp(q·k/sqrt(D))`` and ``out_i = φ(q_i)^T Σ_j φ(k_j) v_j^T / φ(q_i)·Σ_j φ(k_j)``
    estimates softmax attention, with error falling as m grows. Numerically stabilised by
    exact max-shifts (see :func:`attnlib.functional.performer_attention`).

    Defaults follow the official FAVOR+ code (``make_fast_softmax_attention``): m = 256
    orthogonal features with chi row norms, redrawn for every training call (the paper: redrawing
    is what lets a Performer train from scratch). Deviation: W stays fixed in eval mode (the
    official code redraws at every call, seeded by the sum of the queries), so evaluation is
    deterministic and incremental decoding equals the full forward; call
    :meth:`redraw_projection` to draw anew.

    Args:
        num_features: m, default 256 (official); None = ``floor(D ln D)`` (266 for D = 64, the
            lucidrains default).
        orthogonal: orthogonal random features (default) or i.i.d. Gaussian.
        scaling: row norms "chi" (unbiased) or "sqrt_d".
        redraw_interval: redraw W every this many training forwards (default 1, the official
            every-call redraw; lucidrains: 1000; None = never).
        seed: W is drawn from ``torch.Generator().manual_seed(seed + 7919 * draw)``,
            so it is deterministic; it is a buffer (saved in the state dict).
        chunk_size, explicit: as for ``linear``.
    """

    capabilities = _caps("Choromanski et al. 2021, Rethinking Attention with Performers (FAVOR+)")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_features: int | None = 256,
        orthogonal: bool = True,
        scaling: str = "chi",
        redraw_interval: int | None = 1,
        seed: int = 0,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        m = max(1, int(head_dim * math.log(head_dim))) if num_features is None else num_features
        self.num_features = positive_int(m, "performer: num_features")
        if redraw_interval is not None:
            positive_int(redraw_interval, "performer: redraw_interval")
        if scaling not in ("chi", "sqrt_d"):
            raise ValueError(f"performer: scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
        self.orthogonal = bool(orthogonal)
        self.scaling = scaling
        self.redraw_interval = redraw_interval
        self.seed = int(seed)
        self.register_buffer("projection", self._draw(0))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_calls", torch.zeros((), dtype=torch.long))

    def _draw(self, index: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7919 * index)
        return performer_projection(
            self.num_features,
            self.head_dim,
            orthogonal=self.orthogonal,
            scaling=self.scaling,  # type: ignore[arg-type]
            generator=gen,
        )

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw a new W (deterministically: the next draw of the seeded sequence)."""
        self.draws += 1
        w = self._draw(int(self.draws))
        self.projection.copy_(w.to(self.projection))

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
        if self.training and self.redraw_interval is not None:
            self.train_calls += 1
            if int(self.train_calls) % self.redraw_interval == 0:
                self.redraw_projection()
        res = performer_attention(
            q,
            k,
            v,
            self.projection,
            causal=mask.causal,
            mask=mask,
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        m, d = self.num_features, self.head_dim
        return {
            "S": self._zeros(batch, m, d, dtype=dtype, device=device),
            "z": self._zeros(batch, m, dtype=dtype, device=device),
            "shift": torch.full((batch, self.num_heads), float("-inf"), dtype=acc_dtype(dtype), device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        self._check_step(q, k, v)
        return performer_step(q, k, v, state, self.projection, scale=self.head_dim**-0.5)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_features={self.num_features}, redraw_interval={self.redraw_interval}"


# --------------------------------------------------------------------------------------------
# cosformer
# --------------------------------------------------------------------------------------------


@register_variant("cosformer")
class CosformerAttention(KernelCore):
    """cosFormer attention (Qin et al., ICLR 2022).

    ``A_ij = relu(q_i)·relu(k_j) · cos((π/2)(i - j)/L)``, ``out_i = Σ_j A_ij v_j / max(Σ_j A_ij, eps)``,
    computed through the features ``[relu(x) sin a, relu(x) cos a]``, ``a_i = (π/2) i / L``.
    ``L = max(N, M)`` (official code) unless ``max_len`` fixes it; with key padding L is each
    example's own length (a padded example equals the example run alone). Recurrent decoding
    needs ``max_len`` (the cos re-weighting depends on the final length otherwise).

    Args:
        eps: denominator clamp (1e-6).
        max_len: fixed L (sequences longer than it raise).
        chunk_size, explicit: as for ``linear``.
    """

    capabilities = _caps("Qin et al. 2022, cosFormer: Rethinking Softmax in Attention", permutation_equivariant=False)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        max_len: int | None = None,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        self.eps = float(eps)
        self.max_len = None if max_len is None else positive_int(max_len, "cosformer: max_len")

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
        res = cosformer_attention(
            q,
            k,
            v,
            causal=mask.causal,
            eps=self.eps,
            max_len=self.max_len,
            mask=mask,
            query_padding=None if cross else mask.key_padding,  # self-attention: padded tokens are no queries
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    @classmethod
    def decoding_kwargs(cls) -> dict[str, Any]:
        return {**cls.conformance_kwargs(), "max_len": 64}

    def decoding_error(self) -> str | None:
        if self.max_len is None:
            return (
                "variant 'cosformer' needs max_len to decode: its cos re-weighting uses the sequence length "
                "L, which is unknown while generating; build it with max_len=<context length>"
            )
        return super().decoding_error()

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        self.check_decoding()
        d = self.head_dim
        return {
            "S": self._zeros(batch, 2 * d, d, dtype=dtype, device=device),
            "z": self._zeros(batch, 2 * d, dtype=dtype, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        self.check_decoding()
        assert self.max_len is not None
        self._check_step(q, k, v)
        return cosformer_step(q, k, v, state, max_len=self.max_len, eps=self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_len={self.max_len}"


# --------------------------------------------------------------------------------------------
# lsa
# --------------------------------------------------------------------------------------------


@register_variant("lsa")
class LinearSelfAttention(KernelCore):
    """Un-normalised linear self-attention ``out = (scale · Q K^T ⊙ mask) V / n``.

    Mahankali, Hashimoto & Ma, "One Step of Gradient Descent is Provably the Optimal In-Context
    Learner with One Layer of Linear Self-Attention" (2023): with ``W^{KQ} = diag(n η I, 0)``
    and ``W^{PV} = e_{d+1} e_{d+1}^T`` the prediction is one GD step from w = 0 on in-context
    least squares, ``ŷ = η x_q^T Σ_i y_i x_i``. No feature map, no softmax, no row normalisation.

    Args:
        normalize: "prefix_count" (default: divide by the number of keys each query sees - the
            same as "n" without ``causal``, and it keeps decoding length-independent), "n"
            (number of real keys M) or "none".
        scale: multiplies Q K^T (default 1).
        chunk_size, explicit: as for ``linear``.
    """

    capabilities = _caps("Mahankali, Hashimoto & Ma 2023, one-step GD as linear self-attention")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        normalize: LSANorm = "prefix_count",
        scale: float = 1.0,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        if normalize not in ("none", "n", "prefix_count"):
            raise ValueError(f"lsa: normalize must be 'none', 'n' or 'prefix_count', got {normalize!r}")
        self.normalize = normalize
        self.scale = positive_number(scale, f"{self.name}: scale")

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
        res = linear_self_attention(
            q,
            k,
            v,
            causal=mask.causal,
            normalize=self.normalize,  # type: ignore[arg-type]
            scale=self.scale,
            mask=mask,
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    def decoding_error(self) -> str | None:
        if self.normalize == "n":
            return (
                "variant 'lsa' with normalize='n' divides by the final sequence length, unknown while "
                "decoding; use normalize='prefix_count' (the default) or 'none'"
            )
        return super().decoding_error()

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        self.check_decoding()
        d = self.head_dim
        return {
            "S": self._zeros(batch, d, d, dtype=dtype, device=device),
            "count": torch.zeros((), dtype=acc_dtype(dtype), device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        self.check_decoding()
        self._check_step(q, k, v)
        return lsa_step(q, k, v, state, normalize=self.normalize, scale=self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", normalize={self.normalize!r}, scale={self.scale}"


# --------------------------------------------------------------------------------------------
# ecoformer
# --------------------------------------------------------------------------------------------


@register_variant("ecoformer")
class EcoformerAttention(KernelCore):
    """EcoFormer attention (Liu et al., NeurIPS 2022): kernelised hashing + Hamming-affinity attention.

    q and k are hashed by the same learned kernelised hash functions to b-bit codes
    (``h = sign(A (exp(-|x̂ - a|^2/(2σ)) - μ))``), and ``out_i = Σ_j s_ij v_j / Σ_j s_ij`` with the
    Hamming affinity ``s_ij = b - Hamming(h_i, h_j) = (b + h_i·h_j)/2`` (``bias_mode="consistent"``,
    default: weights >= 0 summing to 1), or the released code's
    ``[h_i^T Σ_j h_j v_j^T + (b+1) v_i] / [h_i·Σ_j h_j + (b+1) n]`` (``bias_mode="faithful"``,
    self-attention only; its weights do not sum to 1).

    The hash (anchors (H, m, D), centre μ (H, m), projection A (H, b, m)) lives in buffers
    together with a ``hash_learned`` flag, all saved in the state dict. It is learned by KSH
    (:func:`attnlib.functional.learn_ksh_hash`) on the first *training* forward while the flag
    is False, so a saved and reloaded model never re-learns it; before learning, the hash is
    a random kernel hash (random unit anchors, μ = 0, A ~ N(0, 1)). Under
    ``torch.distributed`` the hash learned on rank 0 is broadcast. :meth:`reset_hash` forces
    re-learning. σ is the per-sample mean distance (causal: prefix mean).

    Args:
        num_bits: b (16). num_anchors: m (25). topk: KSH positives/negatives per row (10).
        bias_mode: "consistent" or "faithful".
        ksh_lr, ksh_momentum, ksh_iters: KSH optimiser (5e-4, 0.9, 100).
        ksh_max_tokens: tokens used for hash learning (its memory is O(N^2)).
        seed: seeds the random initial hash and the anchor sampling.
        chunk_size, explicit: as for ``linear``.
    """

    capabilities = _caps("Liu et al. 2022, EcoFormer: Energy-Saving Attention with Linear Complexity")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_bits: int = 16,
        num_anchors: int = 25,
        topk: int = 10,
        bias_mode: BiasMode = "consistent",
        ksh_lr: float = 5e-4,
        ksh_momentum: float = 0.9,
        ksh_iters: int = 100,
        ksh_max_tokens: int | None = 2048,
        seed: int = 0,
        chunk_size: int = 64,
        explicit: bool = False,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, explicit=explicit)
        self.num_bits = positive_int(num_bits, "ecoformer: num_bits")
        self.num_anchors = positive_int(num_anchors, "ecoformer: num_anchors")
        self.topk = positive_int(topk, "ecoformer: topk")
        if bias_mode not in ("consistent", "faithful"):
            raise ValueError(f"ecoformer: bias_mode must be 'consistent' or 'faithful', got {bias_mode!r}")
        self.bias_mode = bias_mode
        self.ksh_lr = float(ksh_lr)
        self.ksh_momentum = float(ksh_momentum)
        self.ksh_iters = positive_int(ksh_iters, "ecoformer: ksh_iters")
        self.ksh_max_tokens = None if ksh_max_tokens is None else positive_int(ksh_max_tokens, "ksh_max_tokens")
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        anchors = F.normalize(torch.randn(num_heads, num_anchors, head_dim, generator=gen), dim=-1)
        self.register_buffer("anchors", anchors)
        self.register_buffer("center", torch.zeros(num_heads, num_anchors))
        self.register_buffer("hash_projection", torch.randn(num_heads, num_bits, num_anchors, generator=gen))
        self.register_buffer("hash_learned", torch.zeros((), dtype=torch.bool))
        self.last_ksh: dict[str, Tensor] | None = None

    @torch.no_grad()
    def reset_hash(self) -> None:
        """Mark the hash as not learned: the next training forward learns it again."""
        self.hash_learned.fill_(False)

    @torch.no_grad()
    def learn_hash(self, q: Tensor, k: Tensor, mask: AttentionMask | None = None) -> dict[str, Tensor]:
        """Learn the hash functions from q (B, H, N, D), k (B, H, M, D) and set ``hash_learned``."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        res = learn_ksh_hash(
            q,
            k,
            self.hash_projection,
            num_anchors=self.num_anchors,
            topk=self.topk,
            lr=self.ksh_lr,
            momentum=self.ksh_momentum,
            iters=self.ksh_iters,
            causal=bool(mask is not None and mask.causal),
            key_padding=None if mask is None else mask.key_padding,
            max_tokens=self.ksh_max_tokens,
            generator=gen,
        )
        self.anchors.copy_(res["anchors"].to(self.anchors))
        self.center.copy_(res["center"].to(self.center))
        self.hash_projection.copy_(res["projection"].to(self.hash_projection))
        if dist.is_available() and dist.is_initialized():
            for buf in (self.anchors, self.center, self.hash_projection):
                dist.broadcast(buf, src=0)
        self.hash_learned.fill_(True)
        self.last_ksh = res
        return res

    def codes(self, x: Tensor, *, causal: bool, valid: Tensor | None) -> Tensor:
        """Binary codes (B, H, N, b) of x (B, H, N, D) under the current hash."""
        return kernelized_hash(x, self.anchors, self.hash_projection, self.center, causal=causal, valid=valid)

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
        if cross and self.bias_mode == "faithful":
            raise UnsupportedError(
                "variant 'ecoformer' with bias_mode='faithful' is self-attention only (it adds each "
                "query's own value); use bias_mode='consistent' for cross-attention"
            )
        if self.training and not bool(self.hash_learned):
            self.learn_hash(q, k, mask)
        kp = mask.key_padding
        qvalid = None if cross else kp  # self-attention: padded tokens are no queries either
        if q.shape == k.shape:  # one hashing pass over queries and keys (σ is per example: rows stay apart)
            both = None if kp is None else torch.cat([torch.ones_like(kp) if qvalid is None else qvalid, kp])
            hq, hk = self.codes(torch.cat([q, k]), causal=mask.causal, valid=both).chunk(2)
        else:
            hq = self.codes(q, causal=mask.causal, valid=qvalid)
            hk = self.codes(k, causal=mask.causal, valid=kp)
        res = ecoformer_attention(
            hq,
            hk,
            v,
            causal=mask.causal,
            bias_mode=self.bias_mode,
            mask=mask,
            chunk_size=self.chunk_size,
            explicit=self.explicit,
            return_weights=need_weights,
            return_importance=need_importance,
        )
        return unpack(res, need_weights, need_importance)

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        b, d = self.num_bits, self.head_dim
        f = b + 1 if self.bias_mode == "consistent" else b
        z = self._zeros(batch, dtype=dtype, device=device)
        return {
            "S": self._zeros(batch, f, d, dtype=dtype, device=device),
            "z": self._zeros(batch, f, dtype=dtype, device=device),
            "dist_q": z.clone(),
            "dist_k": z.clone(),
            "count": torch.zeros((), dtype=acc_dtype(dtype), device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        self._check_step(q, k, v)
        return ecoformer_step(q, k, v, state, self.anchors, self.center, self.hash_projection, bias_mode=self.bias_mode)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"num_bits": 8, "num_anchors": 6, "topk": 3, "ksh_iters": 5}

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", num_bits={self.num_bits}, num_anchors={self.num_anchors}, bias_mode={self.bias_mode!r}"
        )
