"""Attention-decoder speech recognition: Conformer encoder + Transformer decoder, joint CTC/attention.

* :class:`ConformerAED` - the :class:`attnlib.models.ConformerCTC` encoder (and its CTC layer)
  plus an autoregressive Transformer decoder whose layers are causal self-attention,
  cross-attention to the encoder output and a feed-forward block (pre-norm). Any registered
  variant serves the encoder (``attention``), the decoder's self-attention
  (``decoder_attention``, must be causal) and its cross-attention (``cross_attention``, must
  support cross-attention and key padding) - checked when the model is built.
* Training: the hybrid CTC/attention objective of Watanabe et al. 2017 (ESPnet),
  ``L = ctc_weight · L_ctc + (1 - ctc_weight) · L_att``, L_att a label-smoothed cross-entropy
  over the target tokens and ``<eos>`` with teacher forcing.
* Decoding: one-pass joint beam search (Watanabe et al. 2017): a hypothesis h scores
  ``(1 - ctc_decode_weight) · log p_att(h) + ctc_decode_weight · log p_ctc(h...)``, the CTC
  term the prefix probability of :func:`ctc_prefix_extend` (every prefix of an alignment);
  finished hypotheses are compared by score / length with ``length_normalize``.
* Incremental decoding keeps one :class:`attnlib.AttentionCache` per decoder layer
  (:meth:`attnlib.Attention.init_cache`); cross-attention variants whose query rows depend on
  earlier rows (monotonic attention, ``core.sequential_queries``) are recomputed over the
  decoded prefix, so step-by-step decoding equals the teacher-forced forward.

The decoder's vocabulary is the CTC vocabulary with the blank's index reused as
``<sos>``/``<eos>`` (the blank is never a target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib._validation import non_negative_int, positive_int
from attnlib.attention import AttentionCache
from attnlib.models.asr import ConformerCTC, _length_mask
from attnlib.models.blocks import AttentionConfig, FeedForward, attention_dict, init_weights, make_attention
from attnlib.variants.additive import reinforce_loss

__all__ = [
    "ConformerAED",
    "DecoderLayer",
    "DecoderState",
    "TransformerDecoder",
    "ctc_prefix_extend",
    "ctc_prefix_init",
]

_CROSS_NEEDS = {
    "cross": "the decoder attends to the encoder output",
    "key_padding": "encoder outputs of different lengths are padded in a batch",
}
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------
# CTC prefix scores (Watanabe et al. 2017, Algorithm 2), batched over hypotheses and labels
# ------------------------------------------------------------------------------------------


def ctc_frames(log_probs: Tensor, lengths: Tensor, blank: int) -> Tensor:
    """CTC log-probabilities (B, T, V) as the prefix scorer reads them: (T, B, V), and frames past
    each utterance's length turned into certain blanks (log 1 for the blank, -inf otherwise), so
    every quantity at the last frame T - 1 equals its value at the utterance's own last frame."""
    t, v = log_probs.shape[1:]
    x = log_probs.transpose(0, 1).clone()
    past = ~_length_mask(lengths, t).T  # (T, B)
    certain_blank = torch.full((v,), _NEG_INF, dtype=x.dtype, device=x.device)
    certain_blank[blank] = 0.0
    return torch.where(past[..., None], certain_blank, x)


def ctc_prefix_init(x: Tensor, blank: int) -> Tensor:
    """The prefix scorer's state of the empty prefix: x (T, N, V) -> r (T, N, 2).

    ``r[t, n, 0]`` (r^n) is the log-probability that frames 0..t spell the prefix ending in a
    label, ``r[t, n, 1]`` (r^b) ending in a blank; for the empty prefix r^n = -inf and
    r^b = sum of the blank log-probabilities up to t.
    """
    rb = torch.cumsum(x[:, :, blank], 0)
    return torch.stack([torch.full_like(rb, _NEG_INF), rb], -1)


def ctc_prefix_extend(x: Tensor, r: Tensor, last: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """CTC prefix scores of every one-label extension of N prefixes (Watanabe et al. 2017).

    Args:
        x: (T, N, V) frame log-probabilities (see :func:`ctc_frames`).
        r: (T, N, 2) the prefixes' state (:func:`ctc_prefix_init`, then a slice of this
            function's second output).
        last: (N,) long, each prefix's last label, -1 for the empty prefix.
        blank: the blank index; its column of the result is the score of ending the prefix
            (``<eos>``): ``log(r^n[T-1] + r^b[T-1])``.

    Returns:
        (psi (N, V): the log-probability that an alignment's labels start with prefix + c,
        r_ext (T, N, V, 2): the state of every extension).
    """
    t_len, n, v = x.shape
    rn, rb = r[..., 0], r[..., 1]
    both = torch.logaddexp(rn, rb)
    repeat = torch.arange(v, device=x.device)[None, :] == last[:, None]  # (N, V): c equals the last label
    phi = torch.where(repeat[None], rb[..., None], both[..., None])  # (T, N, V)
    ext_n = torch.full((t_len, n, v), _NEG_INF, dtype=x.dtype, device=x.device)
    ext_b = torch.full_like(ext_n, _NEG_INF)
    empty = (last < 0)[:, None]
    ext_n[0] = torch.where(empty, x[0], _NEG_INF)
    psi = ext_n[0].clone()
    for t in range(1, t_len):
        ext_n[t] = torch.logaddexp(ext_n[t - 1], phi[t - 1]) + x[t]
        ext_b[t] = torch.logaddexp(ext_n[t - 1], ext_b[t - 1]) + x[t, :, blank, None]
        psi = torch.logaddexp(psi, phi[t - 1] + x[t])
    psi[:, blank] = both[-1]
    return psi, torch.stack([ext_n, ext_b], -1)


# ------------------------------------------------------------------------------------------
# decoder
# ------------------------------------------------------------------------------------------


@dataclass
class DecoderState:
    """Incremental-decoding state of a :class:`TransformerDecoder`.

    Attributes:
        caches: one self-attention :class:`attnlib.AttentionCache` per layer.
        cross_prefix: per layer, the cross-attention queries decoded so far (N, t, dim) for a
            variant with ``sequential_queries`` (recomputed over the prefix), else None.
    """

    caches: list[AttentionCache]
    cross_prefix: list[Tensor | None]

    @property
    def length(self) -> int:
        """Tokens consumed so far."""
        return self.caches[0].length

    def reorder(self, index: Tensor) -> None:
        """Select/reorder hypotheses (beam search): index (N',) long."""
        for c in self.caches:
            c.reorder(index)
        self.cross_prefix = [None if p is None else p.index_select(0, index) for p in self.cross_prefix]


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``x + SelfAttn(LN x)`` (causal), ``x + CrossAttn(LN x, memory)``, ``x + FFN(LN x)``.

    ``cross_attention=None`` leaves the cross-attention out (a pruned layer).
    ``forward(x (B, L, dim), memory (B, M, dim), memory_valid (B, M), cache=None, prefix=None)``
    -> ``(x (B, L, dim), prefix)``: with a ``cache`` x holds the next tokens; ``prefix`` is the
    cross-attention queries decoded so far for a variant that is recomputed over them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        self_attention: AttentionConfig,
        cross_attention: AttentionConfig | None,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        model: str = "ConformerAED",
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = make_attention(
            self_attention, dim=dim, num_heads=num_heads, causal=True, model=f"{model} decoder self-attention",
            dropout=attn_dropout, rope=True,
        )  # fmt: skip
        self.cross_norm: nn.LayerNorm | None = None
        self.cross_attn = None
        if cross_attention is not None:
            self.cross_norm = nn.LayerNorm(dim)
            self.cross_attn = make_attention(
                cross_attention, dim=dim, num_heads=num_heads, needs=_CROSS_NEEDS,
                model=f"{model} cross-attention", dropout=attn_dropout, rope=False,
            )  # fmt: skip
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), activation="gelu", dropout=dropout)
        self.drop = nn.Dropout(dropout)

    @property
    def sequential_cross(self) -> bool:
        """Whether the cross-attention's query rows depend on earlier rows (recomputed over the prefix)."""
        return self.cross_attn is not None and bool(getattr(self.cross_attn.core, "sequential_queries", False))

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_valid: Tensor,
        cache: AttentionCache | None = None,
        prefix: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        h = self.self_norm(x)
        x = x + self.drop(self.self_attn(h) if cache is None else self.self_attn(h, cache=cache))
        if self.cross_attn is not None and self.cross_norm is not None:
            q = self.cross_norm(x)
            if cache is not None and self.sequential_cross:
                prefix = q if prefix is None else torch.cat([prefix, q], 1)
                c = self.cross_attn(prefix, memory, key_padding_mask=memory_valid)[:, -q.shape[1] :]
            else:
                c = self.cross_attn(q, memory, key_padding_mask=memory_valid)
            x = x + self.drop(c)
        x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x, prefix


class TransformerDecoder(nn.Module):
    """Token embedding, decoder layers (rotary positions in the self-attention), final norm, output layer.

    Args:
        vocab_size: V (index ``eos`` doubles as ``<sos>``).
        dim, depth, num_heads: decoder shape.
        self_attention, cross_attention: attention configs.
        no_cross_layers: the lowest layers without cross-attention (pruned heads).
        mlp_ratio, dropout, attn_dropout: as :class:`DecoderLayer`.

    Shapes: ``forward(tokens (B, L), memory (B, M, dim), memory_valid (B, M))`` -> logits (B, L, V);
    :meth:`step` feeds one token per hypothesis through the caches.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        self_attention: AttentionConfig,
        cross_attention: AttentionConfig,
        no_cross_layers: int = 0,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        model: str = "ConformerAED",
    ) -> None:
        super().__init__()
        positive_int(depth, f"{model}: decoder_depth")
        if non_negative_int(no_cross_layers, f"{model}: no_cross_layers") >= depth:
            raise ValueError(
                f"{model}: no_cross_layers={no_cross_layers} leaves no layer with cross-attention "
                f"(decoder_depth={depth}); it must be < decoder_depth"
            )
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(
                dim,
                num_heads,
                self_attention,
                None if i < no_cross_layers else cross_attention,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                model=model,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, memory: Tensor, memory_valid: Tensor) -> Tensor:
        x = self.drop(self.embed(tokens))
        for layer in self.layers:
            x, _ = layer(x, memory, memory_valid)
        return self.head(self.norm(x)).float()

    def init_state(self, batch: int) -> DecoderState:
        """An empty :class:`DecoderState` for ``batch`` hypotheses."""
        return DecoderState([layer.self_attn.init_cache(batch) for layer in self.layers], [None] * len(self.layers))

    def step(self, tokens: Tensor, memory: Tensor, memory_valid: Tensor, state: DecoderState) -> Tensor:
        """The next-token log-probabilities after ``tokens`` (N,) long: -> (N, V); ``state`` advances."""
        x = self.embed(tokens[:, None])
        for i, layer in enumerate(self.layers):
            x, state.cross_prefix[i] = layer(x, memory, memory_valid, state.caches[i], state.cross_prefix[i])
        return F.log_softmax(self.head(self.norm(x[:, 0])).float(), -1)


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------


class ConformerAED(ConformerCTC):
    """Conformer encoder + Transformer decoder with cross-attention, joint CTC/attention.

    Args (beyond :class:`attnlib.models.ConformerCTC`'s, whose ``attention`` is the encoder's):
        decoder_attention: the decoder self-attention's config (causal); None: the encoder's.
        cross_attention: the cross-attention's config (default exact softmax).
        decoder_depth, decoder_heads: decoder layers and heads (heads default: ``num_heads``).
        decoder_mlp_ratio, decoder_dropout: decoder feed-forward ratio and dropout.
        no_cross_layers: the lowest decoder layers have no cross-attention (Inaguma et al.'s
            pruning of redundant monotonic heads in the lower layers).
        ctc_weight: lambda of the training objective (0.3, ESPnet's ``mtlalpha``).
        label_smoothing: of the attention cross-entropy (0.1, ESPnet's ``lsm_weight``).
        beam_size, ctc_decode_weight, length_normalize: joint beam search defaults (beam 4,
            CTC weight 0.3, score / length when comparing finished hypotheses).

    Shapes: ``forward(wave (B, T), lengths (B,))`` -> (CTC log_probs (B, T', V), frames (B,)) as
    :class:`ConformerCTC`; ``forward(wave, lengths, targets (B, S), target_lengths (B,))`` -> the
    scalar training loss; :meth:`transcribe` -> label lists.
    """

    model_name = "ConformerAED"
    #: the training loop calls ``model(wave, lengths, targets, target_lengths)`` for the loss
    #: and :meth:`transcribe` to evaluate
    joint_ctc_attention = True

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        vocab_size: int,
        decoder_attention: AttentionConfig | None = None,
        cross_attention: AttentionConfig | None = None,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        decoder_mlp_ratio: float = 4.0,
        decoder_dropout: float = 0.1,
        no_cross_layers: int = 0,
        ctc_weight: float = 0.3,
        label_smoothing: float = 0.1,
        beam_size: int = 4,
        ctc_decode_weight: float = 0.3,
        length_normalize: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__(attention=attention, vocab_size=vocab_size, **encoder_kwargs)
        for name, w in (("ctc_weight", ctc_weight), ("ctc_decode_weight", ctc_decode_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
                raise ValueError(f"{self.model_name}: {name} must be a number in [0, 1], got {w!r}")
        if isinstance(label_smoothing, bool) or not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"{self.model_name}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.ctc_weight, self.ctc_decode_weight = float(ctc_weight), float(ctc_decode_weight)
        self.label_smoothing = float(label_smoothing)
        self.beam_size = positive_int(beam_size, f"{self.model_name}: beam_size")
        self.length_normalize = bool(length_normalize)
        self.eos = self.blank
        dim = self.head.in_features
        self.decoder = TransformerDecoder(
            vocab_size,
            dim=dim,
            depth=decoder_depth,
            num_heads=decoder_heads or self.blocks[0].attn.num_heads,
            self_attention=attention_dict(attention if decoder_attention is None else decoder_attention),
            cross_attention=attention_dict({"variant": "softmax"} if cross_attention is None else cross_attention),
            no_cross_layers=no_cross_layers,
            mlp_ratio=decoder_mlp_ratio,
            dropout=decoder_dropout,
            model=self.model_name,
        )
        init_weights(self.decoder)
        self._hard_cross = any(getattr(mod, "samples_attention", False) for mod in self.decoder.modules())

    def _teacher_forcing(self, targets: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder inputs ``<sos> y`` (B, S + 1) and outputs ``y <eos>`` (B, S + 1), padding -100."""
        b, s = targets.shape
        valid = _length_mask(target_lengths, s)
        y = targets.masked_fill(~valid, self.eos)
        ys_in = torch.cat([y.new_full((b, 1), self.eos), y], 1)
        ys_out = torch.cat([y, y.new_full((b, 1), self.eos)], 1)
        out_valid = _length_mask(target_lengths + 1, s + 1)
        return ys_in, ys_out.masked_fill(~out_valid, -100)

    def forward(  # type: ignore[override]
        self,
        wave: Tensor,
        lengths: Tensor | None = None,
        targets: Tensor | None = None,
        target_lengths: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """CTC log-probabilities and frames, or with ``targets`` the joint training loss (a scalar)."""
        x, frames = self.encode(wave, lengths)
        log_probs = F.log_softmax(self.head(x).float(), -1)
        if targets is None:
            return log_probs, frames
        if target_lengths is None:
            raise ValueError(f"{self.model_name}: targets given without target_lengths")
        ctc = self.ctc_loss(log_probs, frames, targets, target_lengths)
        ys_in, ys_out = self._teacher_forcing(targets, target_lengths)
        logits = self.decoder(ys_in, x, _length_mask(frames, x.shape[1]))
        att = F.cross_entropy(
            logits.flatten(0, 1), ys_out.flatten(), ignore_index=-100, label_smoothing=self.label_smoothing
        )
        loss = self.ctc_weight * ctc + (1.0 - self.ctc_weight) * att
        if self.training and self._hard_cross:  # hard stochastic cross-attention: REINFORCE with each utterance's NLL
            valid = ys_out != -100
            nll = F.cross_entropy(logits.transpose(1, 2), ys_out, ignore_index=-100, reduction="none").sum(1)
            surrogate = reinforce_loss(self.decoder, nll, valid)
            loss = loss + (1.0 - self.ctc_weight) * (surrogate - surrogate.detach())  # its gradient, value 0
        return loss

    @torch.no_grad()
    def transcribe(
        self,
        wave: Tensor,
        lengths: Tensor | None = None,
        *,
        beam_size: int | None = None,
        ctc_weight: float | None = None,
        length_normalize: bool | None = None,
    ) -> list[list[int]]:
        """Joint CTC/attention beam search: label ids per utterance (defaults: the model's settings)."""
        x, frames = self.encode(wave, lengths)
        log_probs = F.log_softmax(self.head(x).float(), -1)
        return self.beam_search(
            x,
            frames,
            log_probs,
            beam_size=self.beam_size if beam_size is None else positive_int(beam_size, "beam_size"),
            ctc_weight=self.ctc_decode_weight if ctc_weight is None else float(ctc_weight),
            length_normalize=self.length_normalize if length_normalize is None else bool(length_normalize),
        )

    def decode(self, wave: Tensor, lengths: Tensor | None = None) -> list[list[int]]:  # type: ignore[override]
        """Transcripts by the joint beam search (:meth:`transcribe` with the model's settings)."""
        return self.transcribe(wave, lengths)

    @torch.no_grad()
    def beam_search(
        self,
        memory: Tensor,
        frames: Tensor,
        ctc_log_probs: Tensor,
        *,
        beam_size: int,
        ctc_weight: float,
        length_normalize: bool,
    ) -> list[list[int]]:
        """One-pass joint CTC/attention beam search over encoder outputs.

        Args:
            memory: (B, M, dim) encoder output; frames: (B,) its valid lengths.
            ctc_log_probs: (B, M, V) CTC log-probabilities.
            beam_size: K hypotheses per utterance.
            ctc_weight: lambda of ``(1 - lambda) log p_att + lambda log p_ctc``; 0 = attention only.
            length_normalize: compare finished hypotheses by score / (labels + 1).

        Returns:
            The best hypothesis' labels per utterance. Hypotheses end with ``<eos>`` or at
            ``frames`` labels (CTC allows no more).
        """
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight!r}")
        b, m, _ = memory.shape
        v, k, eos = self.vocab_size, beam_size, self.eos
        n = b * k
        mem = memory.repeat_interleave(k, 0)
        mem_valid = _length_mask(frames, m).repeat_interleave(k, 0)
        limit = frames.tolist()
        state = self.decoder.init_state(n)
        tokens = torch.full((n,), eos, dtype=torch.long, device=memory.device)
        score = torch.full((b, k), _NEG_INF, device=memory.device)
        score[:, 0] = 0.0
        seqs: list[list[int]] = [[] for _ in range(n)]
        use_ctc = ctc_weight > 0
        if use_ctc:
            xs = ctc_frames(ctc_log_probs.float(), frames, self.blank).repeat_interleave(k, 1)
            r = ctc_prefix_init(xs, self.blank)
            psi_prev = torch.zeros(n, device=memory.device)
            last = torch.full((n,), -1, dtype=torch.long, device=memory.device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max(limit) + 1):
            cand = (1.0 - ctc_weight) * self.decoder.step(tokens, mem, mem_valid, state)
            if use_ctc:
                psi, r_ext = ctc_prefix_extend(xs, r, last, self.blank)
                cand = cand + ctc_weight * (psi - psi_prev[:, None])
            total = torch.nan_to_num(score.reshape(n, 1) + cand, nan=_NEG_INF)
            at_limit = torch.tensor([step >= lim for lim in limit], device=memory.device).repeat_interleave(k)
            total[at_limit] = torch.where(torch.arange(v, device=memory.device) == eos, total[at_limit], _NEG_INF)
            flat = total.reshape(b, k * v)
            top_s, top_i = flat.topk(min(2 * k, k * v), -1)
            src, tok, new_score = [], [], []
            for u in range(b):
                kept = []
                if not done[u]:
                    for rank, (s, i) in enumerate(zip(top_s[u].tolist(), top_i[u].tolist())):
                        if s == _NEG_INF:
                            break
                        beam, c = divmod(i, v)
                        if c == eos:
                            if rank < k:
                                seq = seqs[u * k + beam]
                                finished[u].append((s / (len(seq) + 1) if length_normalize else s, seq))
                        elif len(kept) < k:
                            kept.append((u * k + beam, c, s))
                    if len(finished[u]) >= k or not kept:
                        done[u] = True
                kept = kept if not done[u] else []
                kept += [(u * k, eos, _NEG_INF)] * (k - len(kept))
                for sb, c, s in kept:
                    src.append(sb)
                    tok.append(c)
                    new_score.append(s)
            if all(done):
                break
            index = torch.tensor(src, device=memory.device)
            tokens = torch.tensor(tok, device=memory.device)
            state.reorder(index)
            score = torch.tensor(new_score, device=memory.device).reshape(b, k)
            seqs = [seqs[sb] + [c] for sb, c in zip(src, tok)]
            if use_ctc:
                r = r_ext[:, index, tokens]
                psi_prev = torch.nan_to_num(psi[index, tokens], neginf=0.0)
                last = tokens
        return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]

    def extra_repr(self) -> str:
        return f"ctc_weight={self.ctc_weight}, beam_size={self.beam_size}, ctc_decode_weight={self.ctc_decode_weight}"
