"""NAMM-style KV-cache eviction (Cetin et al., "An Evolved Universal Transformer Memory", ICLR 2025).

While a :class:`attnlib.models.DecoderLM` decodes with a ``kv`` cache, every cached token's
*received attention* is recorded as a time series per KV head: the attention weight each new
query gives it (query heads averaged within their KV group), one value per query - so a prompt
chunk of n tokens adds n values per token, each from its own query row (0 from the queries before
the token existed, by the causal mask), as the official code's STFT over per-query rows. Every
``delay`` new tokens, per layer:

1. short-time Fourier transform of each (KV head, token) series since the last invocation
   (``n_fft``, ``hop``, periodic Hann window, one-sided magnitudes; the last ``n_fft - hop``
   values of the previous invocation are prepended - zeros for a new sequence) -> (F frames,
   n_fft/2 + 1);
2. exponential moving average over frames with ``c = ema ** hop`` per frame, continuing the
   token's previous EMA decayed by ``ema ** (F * hop)``;
3. features = EMA spectrum (scaled by the number of cached tokens, so uniform attention has
   scale 1) + a sinusoidal embedding of the token's age (``recency_dim``, base ``recency_base``);
4. a small scorer (MLP, shared across layers and heads) scores every (KV head, token); a token is
   evicted when every KV head scores it < 0 (the newest ``protect_last`` are always kept;
   optional hard cap ``cache_size`` on the best head score).

The scorer is non-differentiable through eviction; train it with :func:`attnlib.pruning.evolve`
(``method="cma"``: the paper's CMA-ES). Its output layer starts at zero, so an untrained scorer
scores 0 and evicts nothing (the no-eviction model equals the full-cache model exactly).

Remaining differences from the official code (SakanaAI/evo-memory), stated plainly: no
backward-attention memory (BAM) layer - the scorer is a per-token MLP; the official policy evicts
per KV head (ragged per-head caches), here one cache per layer keeps a token while any KV head
keeps it (the features and scores are per KV head); no running feature normalisation (a fixed
scale instead).
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
    """Per-layer eviction state, aligned with the layer's KV cache entries (size S), per KV head.

    Attributes:
        hist: (B, H_kv, S, T) received attention not yet turned into spectra (T >= n_fft - hop).
        ema: (B, H_kv, S, n_fft // 2 + 1) EMA of the spectra.
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
        self,
        batch: int,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        kv_heads: int = 1,
    ) -> NAMMState:
        """Empty state for ``batch`` sequences and ``kv_heads`` key/value heads."""
        return NAMMState(
            hist=torch.zeros(batch, kv_heads, 0, self.n_fft - self.hop, dtype=dtype, device=device),
            ema=torch.zeros(batch, kv_heads, 0, self.n_freq, dtype=dtype, device=device),
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
        """(B, H_kv, S, feat_dim) features of the cached tokens (after the EMA update)."""
        b, _, s, _ = state.ema.shape
        s_valid = torch.full((b, 1), s, device=state.ema.device) if valid is None else valid.sum(1, keepdim=True)
        spec = state.ema * s_valid[:, None, :, None].to(state.ema.dtype)
        age = (length - 1 - state.pos).clamp_min(0)
        rec = self.recency(age).to(spec.dtype)[:, None].expand(-1, spec.shape[1], -1, -1)
        return torch.cat([spec, rec], -1)

    @torch.no_grad()
    def observe(self, cache: Any, weights: Tensor, state: NAMMState) -> None:
        """Record the attention the cache's entries received and evict every ``delay`` tokens.

        ``cache`` is the layer's :class:`attnlib.AttentionCache` (``kv`` mode) right after a
        step that added n tokens; ``weights`` (B, H, n, cache.size) the attention weights of
        those n queries (each query's row: its own time step; query heads are averaged within
        their KV group, H_kv = ``cache.k.shape[1]``). A (B, cache.size) tensor is taken as one
        query row for one head (e.g. head- and query-averaged importance).
        """
        if weights.dim() == 2:
            weights = weights[:, None, None, :]
        b, h, n_q, s = weights.shape
        s_old = state.pos.shape[1]
        n_new = s - s_old
        if n_new <= 0 or s != cache.size:
            raise ValueError(f"namm state out of step with the cache: state {s_old} entries, cache {cache.size}")
        kv = state.hist.shape[1]
        if h % kv:
            raise ValueError(f"namm: {h} attention heads do not group into the state's {kv} KV heads")
        rows = weights.to(state.hist.dtype).view(b, kv, h // kv, n_q, s).mean(2).transpose(-1, -2)  # (B, kv, S, n)
        t = state.hist.shape[-1]
        hist = torch.cat([state.hist, state.hist.new_zeros(b, kv, n_new, t)], 2)
        state.hist = torch.cat([hist, rows], 3)
        state.ema = torch.cat([state.ema, state.ema.new_zeros(b, kv, n_new, self.n_freq)], 2)
        new_pos = torch.arange(cache.length - n_new, cache.length, device=state.pos.device)
        state.pos = torch.cat([state.pos, new_pos.expand(b, n_new)], 1)
        state.pending += n_q
        if state.pending < self.delay:
            return
        frames = state.pending // self.hop
        used = self.n_fft - self.hop + frames * self.hop
        spec = stft_magnitudes(state.hist[..., :used], self.n_fft, self.hop)  # (B, kv, S, F, n_freq)
        c = self.ema**self.hop
        w = (1 - c) * c ** torch.arange(frames - 1, -1, -1, dtype=spec.dtype, device=spec.device)
        state.ema = (spec * w[:, None]).sum(-2) + self.ema ** (frames * self.hop) * state.ema
        state.hist = state.hist[..., frames * self.hop :]
        state.pending -= frames * self.hop
        self._evict(cache, state)

    def _evict(self, cache: Any, state: NAMMState) -> None:
        b, s = state.pos.shape
        feats = self.features(state, cache.length, cache.valid).to(self.scorer.fc1.weight.dtype)
        score = self.scorer(feats).amax(1)  # (B, S): a token stays while any KV head keeps it
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
        kv = state.hist.shape[1]
        idx = order[:, None, :, None].expand(-1, kv, -1, -1)
        state.hist = state.hist.gather(2, idx.expand(-1, -1, -1, state.hist.shape[-1]))
        state.ema = state.ema.gather(2, idx.expand(-1, -1, -1, state.ema.shape[-1]))
        state.pos = state.pos.gather(1, order)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, n_fft={self.n_fft}, hop={self.hop}, delay={self.delay}, cache_size={self.cache_size}"
        )
