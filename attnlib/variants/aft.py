"""Attention Free Transformer: ``aft_full``, ``aft_local``, ``aft_simple``, ``aft_conv``.

Zhai, Talbott, Srivastava, Huang, Goh, Zhang & Susskind, "An Attention Free Transformer"
(2021, arXiv:2105.14103). Per channel c and position t, with a learned pairwise position
bias ``w_{t,t'}``::

    Y_tc = sigmoid(Q_tc) · Σ_{t'} exp(K_t'c + w_{t,t'}) V_t'c / Σ_{t'} exp(K_t'c + w_{t,t'})

The cores receive the module's per-head q, k, v (B, H, N, D); since AFT acts per channel the
head split only matters for ``aft_conv`` (one filter per head). Variants:

* ``aft_full``: ``w = U V^T`` with U, V (max_len, factor_dim) ~ N(0, init_std^2) (the paper's
  factorisation). O(N·M·D) time, O(chunk·M + N·D) memory.
* ``aft_local``: w kept for ``|t - t'| < window``, **0** (not -inf) outside. O(N·(window + chunk)·D).
* ``aft_simple``: no w; softmax over time per channel. O(N·D); no parameters.
* ``aft_conv``: per-head filter of ``kernel_size`` taps, reparameterised
  ``w = γ (w_raw - mean) / std + β`` with γ, β initialised to 0 (the layer starts as AFT-simple);
  the key is tied to the heads (one key channel per head, the mean of the head's k) unless
  ``key_per_head=False``.

``importance`` is the per-channel attention mass each key receives averaged over queries and
the head's channels. There are no (N, M) weights (each channel has its own map), so
``has_weights`` is False. All have a causal form (prefix sums, N == M) and a recurrent
:meth:`step` (``aft_full`` keeps every past key; the others keep running sums plus the last
window of keys).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnlib._validation import positive_int
from attnlib.functional.aft import (
    aft_conv,
    aft_conv_filter,
    aft_conv_row,
    aft_factor_row,
    aft_full,
    aft_head_key,
    aft_local,
    aft_simple,
    aft_step,
)
from attnlib.masks import AttentionMask
from attnlib.registry import Capabilities, register_variant
from attnlib.variants._common import KernelCore, kernel_family_caps
from attnlib.variants.base import CoreOutput

__all__ = ["AFTConv", "AFTFull", "AFTLocal", "AFTSimple"]

State = dict[str, Tensor]
_PAPER = "Zhai et al. 2021, An Attention Free Transformer"


def _caps(*, cross: bool, trainable: bool, permutation_equivariant: bool, complexity: str) -> Capabilities:
    return kernel_family_caps(
        _PAPER,
        family="aft",
        complexity=complexity,
        cross=cross,
        has_weights=False,  # per-channel maps: no (N, M) weights
        trainable=trainable,
        permutation_equivariant=permutation_equivariant,
    )


class _AFTCore(KernelCore):
    """Shared AFT plumbing: the functional call, importance, and the recurrent step.

    Subclasses define :meth:`_call` and, for the step (:func:`attnlib.functional.aft.aft_step`),
    ``_keep`` (cached past keys: None = all), ``_global`` (running global sums with weight e^K
    outside the pair terms), ``_tied_key`` (one key channel per head) and :meth:`_pair_row`
    (bias of the current position against the cached positions).
    """

    _global = True
    _tied_key = False

    def __init__(self, *, num_heads: int, head_dim: int, chunk_size: int = 128) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size)

    def _call(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, imp: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        raise NotImplementedError

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
        res = self._call(q, k, v, causal=mask.causal, mask=mask.key_padding, imp=need_importance)
        if isinstance(res, Tensor):
            return CoreOutput(res)
        out, imp = res
        return CoreOutput(out, importance=imp.mean(-1))

    # -- recurrent step ---------------------------------------------------------------------

    def _keep(self) -> int | None:
        return 0

    def _pair_row(self, pos: int, positions: Tensor) -> Tensor:
        """w_{pos, positions}: (H|1, L)."""
        raise NotImplementedError(f"variant {self.name!r} caches no keys: it has no pair bias row")

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> State:
        d = self.head_dim
        z = self._zeros(batch, 1, d, dtype=dtype, device=device)
        return {
            "max": torch.full_like(z, torch.finfo(z.dtype).min),
            "num": z.clone(),
            "den": z.clone(),
            "keys": z[:, :, :0].clone(),
            "values": z[:, :, :0].clone(),
            "pos": torch.zeros((), dtype=torch.long, device=device),
        }

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        """One causal step; equals the causal parallel form token by token."""
        self._check_step(q, k, v)
        return aft_step(
            q,
            k,
            v,
            state,
            keep=self._keep(),
            global_sums=self._global,
            pair_row=self._pair_row,
            tied_key=self._tied_key,
        )


class _PositionBias(nn.Module):
    """Factorised pairwise bias ``w = U V^T`` with U, V (max_len, r) ~ N(0, init_std^2)."""

    def __init__(self, max_len: int, factor_dim: int, init_std: float) -> None:
        super().__init__()
        self.max_len = positive_int(max_len, "aft: max_len")
        positive_int(factor_dim, "aft: factor_dim")
        self.u = nn.Parameter(torch.randn(max_len, factor_dim) * init_std)
        self.v = nn.Parameter(torch.randn(max_len, factor_dim) * init_std)

    def factors(self, n: int, m: int, name: str) -> tuple[Tensor, Tensor]:
        if max(n, m) > self.max_len:
            raise ValueError(
                f"variant {name!r}: sequence length {max(n, m)} exceeds max_len={self.max_len} of its learned "
                "position bias; build it with a larger max_len"
            )
        return self.u[:n], self.v[:m]

    def row(self, pos: int, positions: Tensor, name: str) -> Tensor:
        self.factors(pos + 1, pos + 1, name)
        return aft_factor_row(self.u, self.v, pos, positions)  # (1, L)


class _LearnedBias:
    """Mixin of the AFT cores with a learned (max_len x max_len) position bias."""

    @classmethod
    def benchmark_kwargs(cls, n: int) -> dict[str, Any]:
        """A learned position bias long enough for sequence length ``n`` (benchmarks build at each N)."""
        return {"max_len": max(1024, n)}


@register_variant("aft_full")
class AFTFull(_LearnedBias, _AFTCore):
    """AFT-full: learned pairwise bias ``w_{t,t'} = u_t·v_t'`` over every pair.

    Args:
        max_len: longest sequence (rows of U and V; 1024).
        factor_dim: r of ``w = U V^T`` (64; the paper uses 64-256).
        init_std: std of U, V at init (1e-2, so w ≈ 0 and the layer starts as AFT-simple).
        chunk_size: query rows per block.
    """

    capabilities = _caps(cross=True, trainable=True, permutation_equivariant=False, complexity="O(N^2)")
    _global = False

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_len: int = 1024,
        factor_dim: int = 64,
        init_std: float = 1e-2,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size)
        self.bias = _PositionBias(max_len, factor_dim, init_std)

    def _call(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, imp: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        w = self.bias.factors(q.shape[2], k.shape[2], self.name)
        return aft_full(q, k, v, w, causal=causal, mask=mask, chunk_size=self.chunk_size, return_importance=imp)  # type: ignore[return-value]

    def _keep(self) -> int | None:
        return None

    def _pair_row(self, pos: int, positions: Tensor) -> Tensor:
        return self.bias.row(pos, positions, self.name)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"max_len": 64, "factor_dim": 4, "init_std": 0.5, "chunk_size": 5}


@register_variant("aft_local")
class AFTLocal(_LearnedBias, _AFTCore):
    """AFT-local: the pairwise bias only inside ``|t - t'| < window`` (0, not -inf, outside).

    Args:
        window: s (32, the paper's best enwik8 setting; CIFAR-10 used 256).
        max_len, factor_dim, init_std, chunk_size: as for ``aft_full``.
    """

    capabilities = _caps(cross=False, trainable=True, permutation_equivariant=False, complexity="O(N·w)")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        window: int = 32,
        max_len: int = 1024,
        factor_dim: int = 64,
        init_std: float = 1e-2,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size)
        self.window = positive_int(window, "aft_local: window")
        self.bias = _PositionBias(max_len, factor_dim, init_std)

    def _call(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, imp: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        w = self.bias.factors(q.shape[2], k.shape[2], self.name)
        return aft_local(  # type: ignore[return-value]
            q, k, v, w, self.window, causal=causal, mask=mask, chunk_size=self.chunk_size, return_importance=imp
        )

    def _keep(self) -> int | None:
        return self.window

    def _pair_row(self, pos: int, positions: Tensor) -> Tensor:
        return self.bias.row(pos, positions, self.name)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"window": 3, "max_len": 64, "factor_dim": 4, "init_std": 0.5, "chunk_size": 5}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"


@register_variant("aft_simple")
class AFTSimple(_AFTCore):
    """AFT-simple: ``Y_t = σ(Q_t) ⊙ Σ_{t'} softmax_{t'}(K) ⊙ V_t'`` (no position bias; O(N·D)).

    Args:
        chunk_size: rows per block of the stabilised causal prefix sums.
    """

    capabilities = _caps(cross=True, trainable=False, permutation_equivariant=True, complexity="O(N)")

    def __init__(self, *, num_heads: int, head_dim: int, chunk_size: int = 256) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size)

    def _call(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, imp: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        return aft_simple(q, k, v, causal=causal, mask=mask, chunk_size=self.chunk_size, return_importance=imp)  # type: ignore[return-value]

    def _keep(self) -> int | None:
        return 0


@register_variant("aft_conv")
class AFTConv(_AFTCore):
    """AFT-conv (1-D): a per-head depthwise filter as the position bias, shared by the head's channels.

    ``w^i = γ_i (w_raw^i - mean(w_raw^i)) / std(w_raw^i) + β_i`` with γ, β initialised to
    ``gamma_init`` (paper: 0) and 0, so the layer starts as AFT-simple. Translation-invariant:
    generalises across lengths (no max_len). Non-causal filters are centred; causal ones look
    back ``kernel_size - 1`` steps.

    Args:
        kernel_size: filter taps s (7).
        key_per_head: tie the key to the heads (one key channel per head: the mean of the
            head's k), as in the paper; False keeps a key per channel.
        gamma_init: initial γ (paper 0; note the raw filter then gets no gradient until γ moves).
        chunk_size: rows per block.
    """

    capabilities = _caps(cross=False, trainable=True, permutation_equivariant=False, complexity="O(N·s)")

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        kernel_size: int = 7,
        key_per_head: bool = True,
        gamma_init: float = 0.0,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size)
        self.kernel_size = positive_int(kernel_size, "aft_conv: kernel_size")
        self.key_per_head = bool(key_per_head)
        self.w_raw = nn.Parameter(torch.randn(num_heads, kernel_size))
        self.gamma = nn.Parameter(torch.full((num_heads,), float(gamma_init)))
        self.beta = nn.Parameter(torch.zeros(num_heads))

    def filter(self) -> Tensor:
        """The effective filter w (H, kernel_size)."""
        return aft_conv_filter(self.w_raw, self.gamma, self.beta)

    def _call(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, imp: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        kk = aft_head_key(k) if self.key_per_head else k
        return aft_conv(  # type: ignore[return-value]
            q, kk, v, self.filter(), causal=causal, mask=mask, chunk_size=self.chunk_size, return_importance=imp
        )

    def _keep(self) -> int | None:
        return self.kernel_size

    @property
    def _tied_key(self) -> bool:  # type: ignore[override]
        return self.key_per_head

    def _pair_row(self, pos: int, positions: Tensor) -> Tensor:
        return aft_conv_row(self.filter(), pos, positions)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"kernel_size": 3, "gamma_init": 0.5, "chunk_size": 5}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_size={self.kernel_size}, key_per_head={self.key_per_head}"
