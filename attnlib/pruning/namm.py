"""NAMM-style KV-cache eviction (Cetin et al., "An Evolved Universal Transformer Memory", ICLR 2025).

While a :class:`attnlib.models.DecoderLM` decodes with a ``kv`` cache, every cached token's
*received attention* (the attention contract's importance for the new queries, averaged over
heads) is recorded as a time series. Every ``delay`` new tokens, per layer:

1. short-time Fourier transform of each token's series since the last invocation (``n_fft``,
   ``hop``, periodic Hann window, one-sided magnitudes; the last ``n_fft - hop`` values of the
   previous invocation are prepended - zeros for a new sequence) -> (F frames, n_fft/2 + 1);
2. exponential moving average over frames with ``c = ema ** hop`` per frame, continuing the
   token's previous EMA decayed by ``ema ** (F * hop)``;
3. features = EMA spectrum (scaled by the number of cached tokens, so uniform attention has
   scale 1) + a sinusoidal embedding of the token's age (``recency_dim``, base ``recency_base``);
4. a small scorer (MLP, shared across layers) gives a score per token; tokens scoring < 0 are
   evicted (the newest ``protect_last`` are always kept; optional hard cap ``cache_size``).

The scorer is non-differentiable through eviction; train it with :func:`attnlib.pruning.evolve`.
Its output layer starts at zero, so an untrained scorer scores 0 and evicts nothing (the
no-eviction model equals the full-cache model exactly).

Simplifications vs the official code (SakanaAI/evo-memory), stated plainly: no backward-attention
memory (BAM) layer - the scorer is a per-token MLP; features are averaged over heads (per layer,
not per KV head); no running feature normalisation (a fixed scale instead); a chunk of n > 1 new
queries contributes its query-averaged attention n times (single-token decoding is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.pruning.base import PruneOutput, TokenPruner, register_pruner

__all__ = ["NAMMEviction", "NAMMScorer", "NAMMState", "stft_magnitudes"]


def stft_magnitudes(signal: Tensor, n_fft: int, hop: int) -> Tensor:
    """Magnitudes of the STFT of ``signal`` (..., T) along time: (..., F, n_fft // 2 + 1).

    Frames start at 0, hop, ... (no centring, no padding), F = (T - n_fft) // hop + 1, each
    multiplied by the periodic Hann window before a one-sided DFT.
    """
    frames = signal.unfold(-1, n_fft, hop)  # (..., F, n_fft)
    win = torch.hann_window(n_fft, periodic=True, dtype=signal.dtype, device=signal.device)
    return torch.fft.rfft(frames * win, dim=-1).abs()


class NAMMScorer(nn.Module):
    """Per-token scorer: features (..., in_dim) -> score (..., ); MLP with one ReLU hidden layer.

    The output layer is zero-initialised (score 0 everywhere: nothing is evicted); ``bias``
    sets its initial bias instead (negative = evict everything not protected).
    """

    def __init__(self, in_dim: int, hidden: int = 25, bias: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.init_bias = float(bias)
        self.reset_pruner_parameters()

    def reset_pruner_parameters(self) -> None:
        """Zero output weights and the initial bias (a model's weight init would overwrite them)."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, self.init_bias)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(feats))).squeeze(-1)


@dataclass
class NAMMState:
    """Per-layer eviction state, aligned with the layer's KV cache entries (size S).

    Attributes:
        hist: (B, S, T) received attention not yet turned into spectra (T >= n_fft - hop).
        ema: (B, S, n_fft // 2 + 1) EMA of the spectra.
        pos: (B, S) long original position of each cached token.
        pending: new tokens since the last invocation.
        evicted: total entries evicted so far (summed over the batch).
    """

    hist: Tensor
    ema: Tensor
    pos: Tensor
    pending: int = 0
    evicted: int = 0


@register_pruner("namm")
class NAMMEviction(TokenPruner):
    """NAMM-style KV-cache eviction policy of one decoder layer (``kind = "kv_cache"``).

    Args:
        n_fft, hop: STFT window and hop (NAMM: 32, 16); ``delay`` must be a multiple of ``hop``.
        ema: per-step EMA coefficient (NAMM: 0.99).
        recency_dim, recency_base: sinusoidal age embedding size and base (NAMM: 8, 5e4).
        hidden: scorer hidden width (NAMM's MLP: 25).
        delay: evict every ``delay`` new tokens (NAMM: 512).
        protect_last: the newest tokens never evicted.
        cache_size: optional hard cap on the kept entries (top scores).
        scorer_bias: initial scorer output (0 = evict nothing).

    All layers share one :class:`NAMMScorer` (``self.scorer``).
    """

    kind = "kv_cache"

    def __init__(
        self,
        *,
        dim: int,
        layer: int,
        depth: int,
        n_fft: int = 32,
        hop: int = 16,
        ema: float = 0.99,
        recency_dim: int = 8,
        recency_base: float = 5e4,
        hidden: int = 25,
        delay: int = 512,
        protect_last: int = 1,
        cache_size: int | None = None,
        scorer_bias: float = 0.0,
        scorer: NAMMScorer | None = None,
    ) -> None:
        super().__init__(dim=dim, layer=layer, depth=depth)
        if not (isinstance(n_fft, int) and isinstance(hop, int) and 0 < hop <= n_fft):
            raise ValueError(f"namm needs ints 0 < hop <= n_fft, got n_fft={n_fft!r}, hop={hop!r}")
        if not isinstance(delay, int) or delay <= 0 or delay % hop:
            raise ValueError(f"namm delay must be a positive multiple of hop={hop}, got {delay!r}")
        if recency_dim % 2 or recency_dim < 0:
            raise ValueError(f"namm recency_dim must be even and >= 0, got {recency_dim!r}")
        if not 0.0 < ema < 1.0:
            raise ValueError(f"namm ema must be in (0, 1), got {ema!r}")
        if cache_size is not None and (not isinstance(cache_size, int) or cache_size < max(protect_last, 1)):
            raise ValueError(f"namm cache_size must be an int >= max(protect_last, 1), got {cache_size!r}")
        self.n_fft, self.hop, self.ema, self.delay = n_fft, hop, float(ema), delay
        self.recency_dim, self.recency_base = recency_dim, float(recency_base)
        self.protect_last, self.cache_size = int(protect_last), cache_size
        self.n_freq = n_fft // 2 + 1
        self.feat_dim = self.n_freq + recency_dim
        self.scorer = scorer if scorer is not None else NAMMScorer(self.feat_dim, hidden, scorer_bias)

    @classmethod
    def default_layers(cls, depth: int) -> list[int]:
        """Every layer."""
        return list(range(depth))

    @classmethod
    def build_layers(
        cls,
        layers: list[int],
        *,
        dim: int,
        depth: int,
        options: dict[str, Any],
        per_layer: dict[int, dict[str, Any]],
    ) -> dict[int, nn.Module]:
        """One policy per layer, all sharing the first one's scorer."""
        out: dict[int, nn.Module] = {}
        shared: NAMMScorer | None = None
        for i in layers:
            pol = cls(dim=dim, layer=i, depth=depth, scorer=shared, **{**options, **per_layer.get(i, {})})
            shared = pol.scorer
            out[i] = pol
        return out

    def prune(self, x: Tensor, importance: Tensor | None, mask: Tensor | None, protected: Tensor | None) -> PruneOutput:
        raise ValueError(
            "namm evicts KV-cache entries during decoding (DecoderLM with a cache); it prunes no hidden states"
        )

    # -- decoding ------------------------------------------------------------------------------

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> NAMMState:
        """Empty state for ``batch`` sequences."""
        return NAMMState(
            hist=torch.zeros(batch, 0, self.n_fft - self.hop, dtype=dtype, device=device),
            ema=torch.zeros(batch, 0, self.n_freq, dtype=dtype, device=device),
            pos=torch.zeros(batch, 0, dtype=torch.long, device=device),
        )

    def recency(self, age: Tensor) -> Tensor:
        """Sinusoidal embedding of ages (B, S) -> (B, S, recency_dim)."""
        if self.recency_dim == 0:
            return age.new_zeros(*age.shape, 0, dtype=torch.float32)
        i = torch.arange(self.recency_dim // 2, device=age.device, dtype=torch.float64)
        freq = self.recency_base ** (-2.0 * i / self.recency_dim)
        ang = age.double()[..., None] * freq
        return torch.cat([ang.sin(), ang.cos()], -1)

    def features(self, state: NAMMState, length: int, valid: Tensor | None) -> Tensor:
        """(B, S, feat_dim) features of the cached tokens (after the EMA update)."""
        s_valid = (
            torch.full((state.ema.shape[0], 1), state.ema.shape[1], device=state.ema.device)
            if valid is None
            else valid.sum(1, keepdim=True)
        )
        spec = state.ema * s_valid[..., None].to(state.ema.dtype)
        age = (length - 1 - state.pos).clamp_min(0)
        return torch.cat([spec, self.recency(age).to(spec.dtype)], -1)

    @torch.no_grad()
    def observe(self, cache: Any, importance: Tensor, state: NAMMState) -> None:
        """Record the attention the cache's entries received and evict every ``delay`` tokens.

        ``cache`` is the layer's :class:`attnlib.AttentionCache` (``kv`` mode) right after a
        step that added n tokens; ``importance`` (B, cache.size) is the attention each entry
        received from those n queries (averaged over heads and queries).
        """
        b, s = importance.shape
        s_old = state.pos.shape[1]
        n_new = s - s_old
        if n_new <= 0 or s != cache.size:
            raise ValueError(f"namm state out of step with the cache: state {s_old} entries, cache {cache.size}")
        imp = importance.to(state.hist.dtype)
        t = state.hist.shape[2]
        hist = torch.cat([state.hist, state.hist.new_zeros(b, n_new, t)], 1)
        state.hist = torch.cat([hist, imp[:, :, None].expand(b, s, n_new)], 2)
        state.ema = torch.cat([state.ema, state.ema.new_zeros(b, n_new, self.n_freq)], 1)
        new_pos = torch.arange(cache.length - n_new, cache.length, device=state.pos.device)
        state.pos = torch.cat([state.pos, new_pos.expand(b, n_new)], 1)
        state.pending += n_new
        if state.pending < self.delay:
            return
        frames = state.pending // self.hop
        used = self.n_fft - self.hop + frames * self.hop
        spec = stft_magnitudes(state.hist[:, :, :used], self.n_fft, self.hop)  # (B, S, F, n_freq)
        c = self.ema**self.hop
        w = (1 - c) * c ** torch.arange(frames - 1, -1, -1, dtype=spec.dtype, device=spec.device)
        state.ema = (spec * w[:, None]).sum(2) + self.ema ** (frames * self.hop) * state.ema
        state.hist = state.hist[:, :, frames * self.hop :]
        state.pending -= frames * self.hop
        self._evict(cache, state)

    def _evict(self, cache: Any, state: NAMMState) -> None:
        b, s = state.pos.shape
        score = self.scorer(self.features(state, cache.length, cache.valid).to(self.scorer.fc1.weight.dtype))
        valid = torch.ones(b, s, dtype=torch.bool, device=score.device) if cache.valid is None else cache.valid
        newest = torch.arange(s, device=score.device) >= s - self.protect_last
        keep = ((score >= 0) | newest) & valid
        if self.cache_size is not None:
            ranked = torch.where(newest, math.inf, score.double()).masked_fill(~keep, -math.inf)
            kth = torch.topk(ranked, min(self.cache_size, s), dim=1).indices
            cap = torch.zeros_like(keep).scatter_(1, kth, True)
            keep &= cap
        if bool(keep.all()):
            return
        counts = keep.sum(1)
        k = int(counts.max())
        order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
        mask = torch.arange(k, device=order.device)[None, :] < counts[:, None]
        state.evicted += int((valid.sum() - counts.sum()).item())
        cache.evict(order, mask)
        state.hist = state.hist.gather(1, order[..., None].expand(-1, -1, state.hist.shape[2]))
        state.ema = state.ema.gather(1, order[..., None].expand(-1, -1, state.ema.shape[2]))
        state.pos = state.pos.gather(1, order)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, n_fft={self.n_fft}, hop={self.hop}, delay={self.delay}, cache_size={self.cache_size}"
        )
