"""Speech recognition encoders with a CTC head: Conformer and Branchformer.

* Front end: log-mel filterbank features from ``torch.stft`` (25 ms Hann window, 10 ms hop by
  default), per-utterance mean/variance normalisation, SpecAugment in training
  (Park et al. 2019), and a two-layer strided convolution that subsamples time by 4.
* ``ConformerCTC`` - Gulati et al. 2020, "Conformer": macaron half-step feed-forwards around
  self-attention and a convolution module (pointwise conv + GLU, depthwise conv, norm, Swish,
  pointwise conv), then a final LayerNorm.
* ``BranchformerCTC`` - Peng et al. 2022, "Branchformer": a self-attention branch and a
  convolutional-gating MLP (cgMLP) branch in parallel, merged by concatenation and a linear
  projection.
* CTC (Graves et al. 2006) output layer over ``vocab_size`` symbols with the blank at index 0,
  and greedy decoding (argmax, collapse repeats, drop blanks).

Padded batches give every utterance the same output as alone: padded samples/frames are
zeroed before every convolution and masked out of attention (the variant must honour key
padding, checked at build time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.errors import UnsupportedError
from attnlib.models.blocks import AttentionConfig, DropPath, FeedForward, init_weights, make_attention

__all__ = [
    "BranchMerge",
    "BranchformerCTC",
    "CTCEncoder",
    "ConformerCTC",
    "ConvSubsampling",
    "LogMelFrontend",
    "SpecAugment",
    "ctc_greedy_decode",
    "mel_filterbank",
]

_NEEDS = {"key_padding": "utterances of different lengths are padded in a batch"}


def _length_mask(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) bool, True for positions < length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular mel filters on the HTK mel scale (mel = 2595 log10(1 + f / 700)).

    Returns (n_freqs, n_mels): column m is the triangle rising from mel point m to m + 1 and
    falling to m + 2, of ``n_mels + 2`` points equally spaced in mel between f_min and f_max
    (default sample_rate / 2), evaluated at the STFT bin frequencies.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)

    def mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    pts = torch.linspace(
        float(mel(torch.tensor(f_min))), float(mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64
    )
    hz = 700.0 * (10 ** (pts / 2595.0) - 1.0)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMelFrontend(nn.Module):
    """Waveform -> normalised log-mel features.

    Args:
        sample_rate: Hz.
        n_mels: mel channels.
        win_ms, hop_ms: analysis window and hop in milliseconds (Hann window).
        n_fft: FFT size (default: next power of two >= the window).
        f_min, f_max: mel range in Hz.
        normalize: per-utterance mean/variance normalisation of each channel over its frames.

    Shapes: ``forward(wave (B, T), lengths (B,) | None) -> (feats (B, F, n_mels), frames (B,))``
    with F = 1 + T // hop; utterance b has ``1 + lengths[b] // hop`` valid frames and zeros after.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 80,
        *,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        n_fft: int | None = None,
        f_min: float = 20.0,
        f_max: float | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.sample_rate = int(sample_rate)
        self.win = round(sample_rate * win_ms / 1000)
        self.hop = round(sample_rate * hop_ms / 1000)
        self.n_fft = n_fft or 1 << (self.win - 1).bit_length()
        if self.n_fft % 2 or self.n_fft < self.win:
            raise ValueError(f"n_fft must be even and >= the window ({self.win} samples), got {self.n_fft}")
        self.n_mels = n_mels
        self.normalize = normalize
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        fb = mel_filterbank(self.n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.register_buffer("fbank", fb, persistent=False)

    def frames(self, lengths: Tensor) -> Tensor:
        """Valid feature frames for waveform lengths (B,)."""
        return 1 + torch.div(lengths, self.hop, rounding_mode="floor")

    def forward(self, wave: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, T) samples, got shape {tuple(wave.shape)}")
        b, t = wave.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=wave.device)
        wave = wave * _length_mask(lengths, t).to(wave.dtype)
        half = self.n_fft // 2
        x = F.pad(wave.float(), (half, half))  # zero padding (not reflect): batch invariant
        spec = torch.stft(
            x, self.n_fft, self.hop, self.win, window=self.window, center=False, return_complex=True
        )  # (B, n_fft/2 + 1, F)
        power = spec.real.square() + spec.imag.square()
        feats = torch.log(torch.clamp(power.transpose(1, 2) @ self.fbank, min=1e-10))  # (B, F, n_mels)
        frames = self.frames(lengths)
        valid = _length_mask(frames, feats.shape[1]).unsqueeze(-1).to(feats.dtype)
        if self.normalize:
            cnt = valid.sum(1, keepdim=True).clamp_min(1.0)
            mean = (feats * valid).sum(1, keepdim=True) / cnt
            var = ((feats - mean).square() * valid).sum(1, keepdim=True) / cnt
            feats = (feats - mean) / torch.sqrt(var + 1e-5)
        return (feats * valid).to(wave.dtype), frames


class SpecAugment(nn.Module):
    """SpecAugment masking (Park et al. 2019), training only.

    ``freq_masks`` bands of up to ``freq_width`` channels and ``time_masks`` spans of up to
    ``time_ratio`` x the utterance's frames are set to zero (the normalised mean).
    ``forward(feats (B, F, C), frames (B,)) -> (B, F, C)``; identity in eval.
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 10, time_masks: int = 2, time_ratio: float = 0.05):
        super().__init__()
        self.freq_masks, self.freq_width, self.time_masks, self.time_ratio = (
            freq_masks,
            freq_width,
            time_masks,
            time_ratio,
        )

    def forward(self, feats: Tensor, frames: Tensor) -> Tensor:
        if not self.training or (self.freq_masks == 0 and self.time_masks == 0):
            return feats
        b, f, c = feats.shape
        dev = feats.device
        keep = torch.ones(b, f, c, dtype=torch.bool, device=dev)
        ch = torch.arange(c, device=dev)[None, :]
        for _ in range(self.freq_masks):
            w = torch.randint(0, self.freq_width + 1, (b, 1), device=dev)
            s = (torch.rand(b, 1, device=dev) * (c - w + 1)).long()
            keep &= ~((ch >= s) & (ch < s + w))[:, None, :]
        tt = torch.arange(f, device=dev)[None, :]
        for _ in range(self.time_masks):
            wmax = (frames.float() * self.time_ratio).long().clamp_min(0)[:, None]
            w = (torch.rand(b, 1, device=dev) * (wmax + 1).float()).long()
            s = (torch.rand(b, 1, device=dev) * (frames[:, None] - w + 1).clamp_min(1).float()).long()
            keep &= ~((tt >= s) & (tt < s + w))[:, :, None]
        return feats * keep.to(feats.dtype)


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, mel) + ReLU, then a linear layer: time / 4.

    ``forward(feats (B, F, n_mels), frames (B,)) -> (x (B, F', dim), frames' (B,))`` with
    F' = ceil(F / 4) (each conv maps L -> (L - 1) // 2 + 1). Frames beyond each utterance's
    length are zeroed after every convolution, so padding never leaks into valid frames.
    """

    def __init__(self, n_mels: int, dim: int, channels: int | None = None) -> None:
        super().__init__()
        c = channels or dim
        self.conv1 = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        f = (n_mels - 1) // 2 + 1
        f = (f - 1) // 2 + 1
        self.out = nn.Linear(c * f, dim)

    @staticmethod
    def _shrink(frames: Tensor) -> Tensor:
        return torch.div(frames - 1, 2, rounding_mode="floor") + 1

    def forward(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        x = feats.unsqueeze(1)  # (B, 1, F, C)
        for conv in (self.conv1, self.conv2):
            x = F.relu(conv(x))
            frames = self._shrink(frames)
            x = x * _length_mask(frames, x.shape[2])[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(b, t, c * f)), frames


class ConvModule(nn.Module):
    """Conformer convolution module: LN, pointwise conv (2x) + GLU, depthwise conv, LN, Swish, pointwise conv.

    ``forward(x (B, T, dim), valid (B, T) bool) -> (B, T, dim)``; invalid frames are zeroed
    before the depthwise convolution. (LayerNorm instead of the paper's BatchNorm: batch
    statistics over padded frames would make outputs depend on the batch.)
    """

    def __init__(self, dim: int, kernel_size: int = 15, dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv kernel_size must be odd, got {kernel_size}")
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.dw = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pw2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h = F.glu(self.pw1(self.norm(x)), dim=-1) * valid.unsqueeze(-1).to(x.dtype)
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        return self.drop(self.pw2(F.silu(self.norm2(h))))


class ConformerBlock(nn.Module):
    """Conformer block: x + FF/2, x + MHSA, x + Conv, x + FF/2, LayerNorm.

    ``forward(x (B, T, dim), valid (B, T) bool) -> (B, T, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        ff_ratio: float = 4.0,
        conv_kernel: int = 15,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        rope: bool = True,
        model: str = "ConformerCTC",
    ) -> None:
        super().__init__()
        self.ff1_norm, self.ff2_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff1 = FeedForward(dim, int(dim * ff_ratio), activation="silu", dropout=dropout)
        self.ff2 = FeedForward(dim, int(dim * ff_ratio), activation="silu", dropout=dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = make_attention(
            attention, dim=dim, num_heads=num_heads, needs=_NEEDS, model=model, dropout=attn_dropout, rope=rope
        )
        self.conv = ConvModule(dim, conv_kernel, dropout)
        self.final_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + 0.5 * self.drop_path(self.ff1(self.ff1_norm(x)))
        x = x + self.drop_path(self.drop(self.attn(self.attn_norm(x), key_padding_mask=valid)))
        x = x + self.drop_path(self.conv(x, valid))
        x = x + 0.5 * self.drop_path(self.ff2(self.ff2_norm(x)))
        return self.final_norm(x)


class ConvGatingMLP(nn.Module):
    """cgMLP (Sakuma et al. 2021, used by Branchformer): Linear up, GELU, convolutional spatial gating, Linear down.

    The gating unit splits the hidden channels in two halves (r, g) and returns
    ``r * DepthwiseConv(LN(g))``. ``forward(x (B, T, dim), valid (B, T)) -> (B, T, dim)``.
    """

    def __init__(self, dim: int, units: int, kernel_size: int = 31, dropout: float = 0.0) -> None:
        super().__init__()
        if units % 2:
            raise ValueError(f"cgMLP units must be even, got {units}")
        if kernel_size % 2 == 0:
            raise ValueError(f"cgMLP kernel_size must be odd, got {kernel_size}")
        self.up = nn.Linear(dim, units)
        self.gate_norm = nn.LayerNorm(units // 2)
        self.gate_conv = nn.Conv1d(units // 2, units // 2, kernel_size, padding=kernel_size // 2, groups=units // 2)
        self.down = nn.Linear(units // 2, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        r, g = F.gelu(self.up(x)).chunk(2, -1)
        g = self.gate_norm(g) * valid.unsqueeze(-1).to(x.dtype)
        g = self.gate_conv(g.transpose(1, 2)).transpose(1, 2)
        return self.down(self.drop(r * g))


class BranchMerge(nn.Module):
    """Branchformer's merge of the attention branch a and the cgMLP branch m (Peng et al. 2022).

    * ``"concat"``: ``Linear_{2C->C}([a, m])``.
    * ``"learned_ave"``: the paper's learned weighted average ``Linear_{C->C}(w_a a + w_m m)``; each
      branch is pooled over time by attention pooling (scores ``Linear_{C->1}(x) / sqrt(C)``,
      softmax over valid frames), the pooled vector gives a logit ``Linear_{C->1}``, and
      ``(w_a, w_m)`` = softmax of the two logits, one pair per utterance.
    * ``"fixed_ave"``: ``Linear_{C->C}((1 - cgmlp_weight) a + cgmlp_weight m)``.

    ``forward(a (B, T, C), m (B, T, C), valid (B, T) bool) -> (B, T, C)``; ``last_weights`` keeps
    the (B, 2) branch weights of the latest ``learned_ave`` call (for inspection).
    """

    METHODS = ("concat", "learned_ave", "fixed_ave")

    def __init__(self, dim: int, method: str = "concat", cgmlp_weight: float = 0.5) -> None:
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"Branchformer merge must be one of {self.METHODS}, got {method!r}")
        if not 0.0 <= float(cgmlp_weight) <= 1.0:
            raise ValueError(f"cgmlp_weight must be in [0, 1], got {cgmlp_weight!r}")
        self.method, self.dim, self.cgmlp_weight = method, dim, float(cgmlp_weight)
        self.proj = nn.Linear(2 * dim if method == "concat" else dim, dim)
        if method == "learned_ave":
            self.pool_score = nn.ModuleList(nn.Linear(dim, 1) for _ in range(2))
            self.weight_logit = nn.ModuleList(nn.Linear(dim, 1) for _ in range(2))
        self.last_weights: Tensor | None = None

    def branch_weights(self, a: Tensor, m: Tensor, valid: Tensor) -> Tensor:
        """(B, 2) softmax weights of the two branches (``learned_ave``)."""
        logits = []
        for x, score, logit in zip((a, m), self.pool_score, self.weight_logit):
            s = (score(x).squeeze(-1) / self.dim**0.5).masked_fill(~valid, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)  # an utterance without frames pools to 0
            logits.append(logit(torch.einsum("bt,btc->bc", p, x)))
        return torch.softmax(torch.cat(logits, -1), -1)

    def forward(self, a: Tensor, m: Tensor, valid: Tensor) -> Tensor:
        if self.method == "concat":
            return self.proj(torch.cat([a, m], -1))
        if self.method == "fixed_ave":
            return self.proj((1.0 - self.cgmlp_weight) * a + self.cgmlp_weight * m)
        w = self.branch_weights(a, m, valid)
        self.last_weights = w.detach()
        return self.proj(w[:, 0, None, None] * a + w[:, 1, None, None] * m)


class BranchformerBlock(nn.Module):
    """Branchformer block: ``x + Merge(MHSA(LN(x)), cgMLP(LN(x)))``, then LayerNorm.

    ``merge`` is ``"concat"`` (the ESPnet default), ``"learned_ave"`` (the paper's learned
    weighted average) or ``"fixed_ave"`` (with ``cgmlp_weight``); see :class:`BranchMerge`.
    ``forward(x (B, T, dim), valid (B, T) bool) -> (B, T, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        cgmlp_ratio: float = 4.0,
        conv_kernel: int = 31,
        merge: str = "concat",
        cgmlp_weight: float = 0.5,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        rope: bool = True,
        model: str = "BranchformerCTC",
    ) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = make_attention(
            attention, dim=dim, num_heads=num_heads, needs=_NEEDS, model=model, dropout=attn_dropout, rope=rope
        )
        units = 2 * round(dim * cgmlp_ratio / 2)
        self.cgmlp = ConvGatingMLP(dim, units, conv_kernel, dropout)
        self.merge = BranchMerge(dim, merge, cgmlp_weight)
        self.final_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        a = self.drop(self.attn(self.attn_norm(x), key_padding_mask=valid))
        m = self.drop(self.cgmlp(self.mlp_norm(x), valid))
        x = x + self.drop_path(self.drop(self.merge(a, m, valid)))
        return self.final_norm(x)


def ctc_greedy_decode(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: per-frame argmax, collapse repeats, remove blanks.

    log_probs (B, T, V), lengths (B,) valid frames -> one label list per utterance.
    """
    best = log_probs.argmax(-1).cpu()
    out = []
    for b, n in enumerate(lengths.cpu().tolist()):
        seq = best[b, :n]
        if n == 0:
            out.append([])
            continue
        keep = torch.ones(n, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append([int(t) for t in seq[keep] if int(t) != blank])
    return out


class CTCEncoder(nn.Module):
    """Log-mel front end, conv subsampling, a stack of encoder blocks and a CTC output layer.

    Subclasses choose the block (:class:`ConformerCTC`, :class:`BranchformerCTC`).

    Args:
        attention: attention config; the variant must honour key padding.
        vocab_size: output symbols V including the CTC blank at index ``blank`` (0).
        sample_rate, n_mels, win_ms, hop_ms: front end.
        dim, depth, num_heads: encoder shape.
        subsample_channels: channels of the subsampling convolutions (default ``dim``).
        dropout, attn_dropout, drop_path: regularisation.
        rope: rotary (relative) positions in the attention.
        specaugment: SpecAugment settings (freq_masks, freq_width, time_masks, time_ratio) or None.
        block_kwargs: passed to the block (kernel sizes, ratios).

    Shapes: ``forward(wave (B, T), lengths (B,) | None) -> (log_probs (B, T', V), out_lengths (B,))``.
    """

    block_cls: type[nn.Module] = ConformerBlock
    model_name = "CTCEncoder"
    #: Why a ``pruning:`` config is refused (see :mod:`attnlib.pruning`).
    PRUNING_NOTE = (
        "CTC needs one output frame per time step of an order-preserving, evenly sampled time axis with "
        "out_length >= target_length (+ repeats); importance-based token dropping removes arbitrary frames, "
        "which breaks the frame alignment, the convolution modules' neighbourhoods and the length bound. "
        "Reduce time resolution with the subsampling front end instead (fixed-rate, length-valid downsampling)."
    )

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        vocab_size: int,
        sample_rate: int = 16000,
        n_mels: int = 80,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        dim: int = 144,
        depth: int = 4,
        num_heads: int = 4,
        subsample_channels: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        rope: bool = True,
        blank: int = 0,
        specaugment: dict | None = None,
        pruning: object = None,
        **block_kwargs: object,
    ) -> None:
        super().__init__()
        if pruning is not None:
            raise UnsupportedError(f"{self.model_name} takes no token pruning: {self.PRUNING_NOTE}")
        if not 0 <= blank < vocab_size:
            raise ValueError(f"blank index {blank} out of range for vocab_size={vocab_size}")
        self.vocab_size, self.blank = vocab_size, blank
        self.frontend = LogMelFrontend(sample_rate, n_mels, win_ms=win_ms, hop_ms=hop_ms)
        self.specaugment = SpecAugment(**(specaugment or {})) if specaugment is not None else None
        self.subsample = ConvSubsampling(n_mels, dim, subsample_channels)
        self.drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            self.block_cls(
                dim,
                num_heads,
                attention,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=r,
                rope=rope,
                model=self.model_name,
                **block_kwargs,
            )
            for r in rates
        )
        self.head = nn.Linear(dim, vocab_size)
        init_weights(self)
        for m in self.modules():  # convolutions: PyTorch's default (Kaiming-uniform) init
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.reset_parameters()
        nn.init.kaiming_uniform_(self.subsample.out.weight, a=math.sqrt(5))

    @property
    def variant(self) -> str:
        """The attention variant's registry name."""
        return self.blocks[0].attn.variant

    def encode(self, wave: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The encoder's output before the CTC layer: wave (B, T) -> (x (B, T', dim), frames (B,))."""
        feats, frames = self.frontend(wave, lengths)
        if self.specaugment is not None:
            feats = self.specaugment(feats, frames)
        x, frames = self.subsample(feats, frames)
        x = self.drop(x)
        valid = _length_mask(frames, x.shape[1])
        for blk in self.blocks:
            x = blk(x, valid)
        return x, frames

    def forward(self, wave: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, frames = self.encode(wave, lengths)
        return F.log_softmax(self.head(x).float(), -1), frames

    def ctc_loss(self, log_probs: Tensor, out_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        """Mean over the batch of the CTC loss per utterance divided by its target length.

        log_probs (B, T', V), out_lengths (B,), targets (B, S) padded, target_lengths (B,).
        """
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            out_lengths,
            target_lengths,
            blank=self.blank,
            reduction="mean",
            zero_infinity=True,
        )

    @torch.no_grad()
    def decode(self, wave: Tensor, lengths: Tensor | None = None) -> list[list[int]]:
        """Greedy CTC transcripts (label ids without blanks) of a batch of waveforms."""
        log_probs, frames = self(wave, lengths)
        return ctc_greedy_decode(log_probs, frames, self.blank)


class ConformerCTC(CTCEncoder):
    """Conformer encoder + CTC (Gulati et al. 2020). Block options: ``ff_ratio``, ``conv_kernel``.

    See :class:`CTCEncoder` for arguments and shapes.
    """

    block_cls = ConformerBlock
    model_name = "ConformerCTC"


class BranchformerCTC(CTCEncoder):
    """Branchformer encoder + CTC (Peng et al. 2022). Block options: ``cgmlp_ratio``, ``conv_kernel``,
    ``merge`` ("concat", "learned_ave", "fixed_ave") and ``cgmlp_weight``.

    See :class:`CTCEncoder` for arguments and shapes.
    """

    block_cls = BranchformerBlock
    model_name = "BranchformerCTC"
