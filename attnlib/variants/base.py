"""The base class of every attention variant ("core").

A core maps q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) and an
:class:`attnlib.masks.AttentionMask` to a :class:`CoreOutput` with out (B, H, N, Dv). It holds
the variant's own parameters and declares its :class:`attnlib.registry.Capabilities`;
projections, heads, positions and output projection live in :class:`attnlib.Attention`.

Subclasses implement :meth:`AttentionCore.attend`. :meth:`AttentionCore.forward` first checks
the request against the capabilities and raises :class:`attnlib.UnsupportedError` naming the
variant and what it cannot do, so no variant silently ignores a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnlib._validation import check_qkv
from attnlib.errors import UnsupportedError
from attnlib.functional._common import weights_importance
from attnlib.masks import AttentionMask, MaskLike
from attnlib.positional import RotaryCall
from attnlib.registry import Capabilities

__all__ = ["AttentionCore", "CoreOutput", "check_supported"]

_KIND_TEXT = {
    "causal": "causal=True",
    "key_padding": "a key-padding (B, M) mask",
    "full_mask": "a full (B, H, N, M) mask",
    "window": "a SlidingWindow mask",
    "block_mask": "a BlockMask",
}


@dataclass
class CoreOutput:
    """What a core returns.

    Attributes:
        out: (B, H, N, Dv).
        weights: (B, H, N, M) attention weights, when requested and the variant has them.
        importance: (B, H, M) attention mass each key receives, averaged over queries.
        aux_loss: scalar auxiliary loss (training-time regulariser/distillation) or None.
    """

    out: Tensor
    weights: Tensor | None = None
    importance: Tensor | None = None
    aux_loss: Tensor | None = None

    @classmethod
    def from_weights(
        cls,
        out: Tensor,
        weights: Tensor,
        *,
        need_weights: bool,
        need_importance: bool,
        aux_loss: Tensor | None = None,
    ) -> CoreOutput:
        """``out`` computed from explicit ``weights`` (B, H, N, M): keep them and / or their
        importance (:func:`attnlib.functional._common.weights_importance`) as requested."""
        return cls(
            out,
            weights=weights if need_weights else None,
            importance=weights_importance(weights) if need_importance else None,
            aux_loss=aux_loss,
        )


def check_supported(name: str, caps: Capabilities, mask: AttentionMask, *, cross: bool) -> None:
    """Raise UnsupportedError when ``mask`` / cross-attention is outside ``caps``."""
    supported = [k for k in _KIND_TEXT if caps.supports(k)]
    listing = ", ".join(_KIND_TEXT[k] for k in supported) or "no masks"
    for kind in mask.kinds():
        if not caps.supports(kind):
            raise UnsupportedError(f"variant {name!r} does not support {_KIND_TEXT[kind]}; it supports: {listing}")
    if cross and not caps.cross:
        raise UnsupportedError(
            f"variant {name!r} does not support cross-attention (queries N={mask.n} and "
            f"keys M={mask.m} from different sequences); it is self-attention only"
        )
    if mask.causal and mask.n != mask.m and not caps.causal_cross:
        raise UnsupportedError(f"variant {name!r} supports causal=True only with N == M, got N={mask.n}, M={mask.m}")


class AttentionCore(nn.Module):
    """Base class: an attention variant acting on per-head q, k, v.

    Subclasses set ``capabilities`` (and get ``name`` from :func:`attnlib.register_variant`)
    and implement :meth:`attend`. The constructor receives ``num_heads`` and ``head_dim``
    (the query/key head size) plus the variant's own keyword arguments.
    """

    name: ClassVar[str] = "?"
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: :meth:`attend` takes ``rotary=`` (a :class:`attnlib.positional.RotaryCall` or None): the
    #: rotary positions the module applied to q and k (e.g. for a gate that pools pre-rotary vectors).
    uses_rotary: ClassVar[bool] = False
    #: :meth:`forward_tokens` computes the whole layer from the module's input tokens (e.g. to
    #: project only the tokens a router picked); :class:`attnlib.Attention` then calls it instead of
    #: projecting every token and calling :meth:`attend`.
    projects_tokens: ClassVar[bool] = False

    def __init__(self, *, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    def implied_mask(self, n: int, m: int, device: torch.device | str = "cpu") -> MaskLike:
        """Constraints the variant itself imposes on N queries and M keys, or None.

        E.g. ``local``'s band, ``block_sparse``'s pattern. An ``exact`` variant equals exact
        softmax attention under the caller's masks AND this mask; the conformance suite and the
        benchmark correctness gate check exactly that. May be O(N·M) (used by oracles only).
        """
        return None

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        """Constructor kwargs for the small inputs of the conformance suite (N around 16)."""
        return {}

    @classmethod
    def decoding_kwargs(cls) -> dict[str, Any]:
        """Constructor kwargs with which the conformance suite decodes (``capabilities.decode``):
        :meth:`conformance_kwargs` unless options of those make :meth:`decoding_error` refuse."""
        return cls.conformance_kwargs()

    def decoding_error(self) -> str | None:
        """Why this core, with its options, cannot decode incrementally, or None when it can.

        Incremental decoding must equal recomputing the causal sequence; a core whose options make
        the causal row of position i depend on the total length (not only on positions <= i)
        returns the reason (naming the options that would decode), and every decoding entry point
        (:meth:`attnlib.Attention.init_cache`, :func:`attnlib.decoding.attend_new_queries`) raises
        :class:`attnlib.UnsupportedError` with it. Default: None where ``capabilities.decode``.
        """
        if not self.capabilities.decode:
            return (
                f"variant {self.name!r} cannot decode incrementally (capabilities.decode=False): the causal "
                "row of a position depends on the total sequence length, so a cache cannot equal recomputation"
            )
        return None

    def check_decoding(self) -> None:
        """Raise :class:`attnlib.UnsupportedError` with :meth:`decoding_error`'s reason, if any."""
        reason = self.decoding_error()
        if reason is not None:
            raise UnsupportedError(reason)

    @classmethod
    def smooth_kwargs(cls) -> dict[str, Any]:
        """Constructor kwargs that turn off the variant's hard data-dependent decisions (thresholds).

        Checks that compare precisions (bf16 vs float64) use them: near a threshold a rounding
        flip is a legitimate low-precision result, not an error. Default: none.
        """
        return {}

    @classmethod
    def approximation_knobs(cls) -> dict[str, list[Any]]:
        """The constructor kwargs that trade accuracy for speed, with values worth sweeping.

        E.g. ``{"num_features": [16, 64, 256]}`` for random features, ``{"num_bits": [8, 16, 32]}``
        for hashing, ``{"density": [0.1, 0.25, 0.5]}`` for kept blocks. ``attnlib-bench mode=approx``
        sweeps each knob (one at a time, the others at their defaults) and plots the error vs
        exact softmax against it. Default: no knob.
        """
        return {}

    @classmethod
    def benchmark_kwargs(cls, n: int) -> dict[str, Any]:
        """Constructor kwargs a benchmark at sequence length ``n`` needs (e.g. a maximum length >= n).

        Merged under the user's own settings by ``attnlib-bench``. Default: none.
        """
        return {}

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        *,
        cross: bool = False,
        need_weights: bool = False,
        need_importance: bool = False,
        dropout_p: float = 0.0,
        rotary: RotaryCall | None = None,
        score_mod: Any = None,
    ) -> CoreOutput:
        """Check the request against the capabilities, then :meth:`attend`.

        Args:
            q: (B, H, N, D); k: (B, H_kv, M, D) (H_kv == H unless ``capabilities.gqa``);
            v: (B, H_kv, M, Dv).
            mask: the call's normalised masks (True = may attend), incl. ``causal``.
            cross: keys come from another sequence (cross-attention).
            need_weights: fill ``CoreOutput.weights`` (B, H, N, M) if the variant has them.
            need_importance: fill ``CoreOutput.importance`` (B, H, M).
            dropout_p: attention dropout (only passed when ``capabilities.attn_dropout``).
            rotary: the module's rotary positions of q and k, passed on to cores with ``uses_rotary``.
            score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` for the pre-softmax logits, passed
                to :meth:`attend` as a keyword for variants with ``capabilities.score_mod`` (others
                raise :class:`attnlib.UnsupportedError`).
        """
        check_qkv(q, k, v, where=f"variant {self.name!r}")
        if not self.capabilities.gqa and k.shape[1] != q.shape[1]:
            raise ValueError(
                f"variant {self.name!r} needs as many key/value heads as query heads "
                f"(got H={q.shape[1]}, H_kv={k.shape[1]}); attnlib.Attention repeats them for it"
            )
        check_supported(self.name, self.capabilities, mask, cross=cross)
        extra: dict[str, Any] = {"rotary": rotary} if self.uses_rotary else {}
        if score_mod is not None:
            if not self.capabilities.score_mod:
                raise UnsupportedError(
                    f"variant {self.name!r} cannot apply a score_mod (capabilities.score_mod=False): it has "
                    "no pre-softmax logits to modify"
                )
            extra["score_mod"] = score_mod
        return self.attend(
            q,
            k,
            v,
            mask,
            cross=cross,
            need_weights=need_weights,
            need_importance=need_importance,
            dropout_p=dropout_p,
            **extra,
        )

    def forward_tokens(
        self,
        x: Tensor,
        mask: AttentionMask,
        *,
        in_proj: nn.Linear,
        out_proj: nn.Linear,
        num_kv_heads: int,
        rotary: RotaryCall | None,
        need_weights: bool,
        need_importance: bool,
        dropout_p: float,
    ) -> tuple[Tensor, CoreOutput]:
        """The whole self-attention layer from the module's tokens (cores with ``projects_tokens``).

        x (B, N, C); ``in_proj`` / ``out_proj`` the module's projections (rows of ``in_proj``: H
        query heads, then ``num_kv_heads`` key heads, then as many value heads, D each);
        ``rotary``: the positions (and base) the module would rotate q and k with, or None.
        Returns (y (B, N, C) after ``out_proj``, the :class:`CoreOutput` extras; its ``out`` may be
        the per-head output (B, H, N, Dv)).
        """
        raise NotImplementedError(f"variant {self.name!r} does not compute from tokens (projects_tokens=False)")

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
        """The variant's computation; see :meth:`forward` for shapes and arguments.

        ``cross`` says whether the keys come from another sequence: variants that treat
        self-attention specially (e.g. key padding that also pads the queries) read it here.
        """
        raise NotImplementedError

    def query_weights(self, q: Tensor, k: Tensor, mask: AttentionMask, query: int) -> Tensor | None:
        """The attention weights of query row ``query`` alone: (B, H, 1, M), or None.

        q (B, H, N, D), k (B, H_kv, M, D), ``query`` in [0, N). None (the default) means the
        variant has no cheaper way than its full weights: :class:`attnlib.Attention` then asks
        :meth:`attend` for ``need_weights`` and takes the row. Variants whose full weights cost
        O(N·M) but one row O(M) (exact softmax) override this, so a caller that needs one row
        (the class token's, for EViT-style pruning) keeps the variant's fast output path.
        """
        return None

    def causal_reach(self) -> int | None:
        """How many earlier positions a causal row reads at most, or None when it may read the
        whole prefix.

        An integer r promises that the causal row of position i depends only on the keys/values of
        positions i - r .. i, and on them only through their offsets from i (e.g. ``local``'s
        sliding window): a decoding step on a framework's key/value cache then attends over the
        last N + r entries alone (:func:`attnlib.decoding.attend_new_queries`), O(r) per token.
        """
        return None

    # -- recurrent decoding (variants with ``capabilities.recurrent``) ------------------------

    def initial_state(self, batch: int, *, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Empty recurrent state for causal decoding (e.g. the running sums of linear attention).

        Variants with ``capabilities.recurrent`` override this and :meth:`step`; feeding the
        tokens of a sequence one at a time through :meth:`step` must equal the causal
        parallel forward token for token.
        """
        raise UnsupportedError(f"variant {self.name!r} has no recurrent step (capabilities.recurrent=False)")

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One causal decoding step: q, k (B, H, 1, D), v (B, H, 1, Dv), state -> (out (B, H, 1, Dv), new state)."""
        raise UnsupportedError(f"variant {self.name!r} has no recurrent step (capabilities.recurrent=False)")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_heads={self.num_heads}, head_dim={self.head_dim}"
