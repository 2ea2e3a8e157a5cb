"""Decoder-only language model with incremental decoding.

Token embeddings, rotary positions (Su et al. 2021) inside every attention (or learned
absolute positions), pre-norm causal blocks, tied input/output embeddings (Press & Wolf
2017). Incremental decoding keeps one :class:`attnlib.AttentionCache` per layer: the
variant's recurrent ``step`` where it has one (``capabilities.recurrent``), a key/value cache
where it supports causal attention with N != M, and recomputation over the cached prefix
otherwise - in every case equal to the full forward token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib.attention import AttentionCache
from attnlib.models.blocks import AttentionConfig, TransformerBlock, init_weights, make_pruning

__all__ = ["DecoderCache", "DecoderLM"]


@dataclass
class DecoderCache:
    """Decoding state of a :class:`DecoderLM`: one :class:`attnlib.AttentionCache` per layer.

    ``eviction`` holds the KV-cache eviction state of each layer with a ``namm`` policy
    (layer index -> :class:`attnlib.pruning.NAMMState`).
    """

    layers: list[AttentionCache]
    eviction: dict[int, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Tokens consumed so far (the position of the next token)."""
        return self.layers[0].length

    @property
    def modes(self) -> list[str]:
        """Decoding mode of each layer ("recurrent", "kv" or "recompute")."""
        return [c.mode for c in self.layers]

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch entries of every layer (beam search): index (B',) long."""
        if self.eviction:
            raise ValueError("reorder is not supported with KV-cache eviction (namm) states")
        for c in self.layers:
            c.reorder(index)


class DecoderLM(nn.Module):
    """Causal (decoder-only) transformer language model.

    Args:
        attention: attention config; the variant must declare ``causal``.
        vocab_size: V.
        dim, depth, num_heads: width, blocks, heads; num_kv_heads: grouped-query heads.
        mlp_ratio, activation: MLP width ratio and activation ("gelu", "silu", "swiglu").
        dropout, attn_dropout, drop_path: regularisation.
        positions: "rope" (rotary, in every attention) or "learned" (absolute, needs max_len).
        max_len: longest sequence for learned positions (optional with rope).
        rope_base: rotary frequency base.
        tie_embeddings: output projection shares the token embedding matrix.
        pruning: a pruning config (:mod:`attnlib.pruning`). Token pruners that keep real tokens
            (``ltp``, ``topk`` without fusion, ``iared2``) act in the full-sequence forward: later
            blocks run on the kept tokens (at their original rotary positions; the newest token
            is protected by default) and every dropped token keeps the hidden state it had when
            dropped (scatter-back), so logits come out for all N positions. They do not act in
            cached decoding. ``namm`` evicts entries of ``kv`` decoding caches instead (the
            full-sequence forward is unchanged).
        init: weight initialisation, "gpt2" (truncated normal, std 0.02) or "fan_in" (scaled by
            the width; better for small models), see :func:`attnlib.models.blocks.init_weights`.

    Shapes: ``forward(tokens (B, N) long, mask=None | (B, N) bool, cache=None) -> logits (B, N, V)``.
    With a cache, ``tokens`` are the next N tokens and ``mask`` (if any) covers every token so
    far, (B, cache.length + N).
    """

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        vocab_size: int,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        positions: str = "rope",
        max_len: int | None = None,
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        pruning: Any = None,
        init: str = "gpt2",
    ) -> None:
        super().__init__()
        if positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {positions!r}")
        if positions == "learned" and not max_len:
            raise ValueError("positions='learned' needs max_len (the longest sequence)")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size, self.dim, self.positions, self.max_len = vocab_size, dim, positions, max_len
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads,
                attention,
                causal=True,
                needs={"causal": "next-token prediction must not see later tokens"},
                model="DecoderLM",
                mlp_ratio=mlp_ratio,
                activation=activation,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=r,
                rope=positions == "rope",
                rope_base=rope_base,
                num_kv_heads=num_kv_heads,
            )
            for r in rates
        )
        self.pruning = make_pruning(
            pruning, attention, dim=dim, depth=depth, model="DecoderLM", kinds=("tokens", "kv_cache"), positional=True
        )
        if self.pruning is not None and self.pruning.kind == "kv_cache":
            from attnlib.models.blocks import check_attention

            check_attention(
                attention,
                {"causal_cross": f"pruner {self.pruning.name!r} evicts entries of a key/value decoding cache"},
                model="DecoderLM",
            )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        init_weights(self, scheme=init)
        if self.pruning is not None:
            self.pruning.reset_parameters()
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @property
    def variant(self) -> str:
        """The attention variant's registry name."""
        return self.blocks[0].attn.variant

    def init_cache(self, batch: int, *, mode: str | None = None) -> DecoderCache:
        """Empty decoding caches for ``batch`` sequences (see :meth:`attnlib.Attention.init_cache`)."""
        layers = [blk.attn.init_cache(batch, mode=mode) for blk in self.blocks]
        cache = DecoderCache(layers)
        if self.pruning is not None and self.pruning.kind == "kv_cache":
            w = self.tok_emb.weight
            for i in self.pruning.layers:
                if layers[i].mode != "kv":
                    raise ValueError(f"pruner {self.pruning.name!r} needs 'kv' caches, got mode {layers[i].mode!r}")
                kv_heads = self.blocks[i].attn.num_kv_heads
                cache.eviction[i] = self.pruning.get(i).init_state(batch, device=w.device, kv_heads=kv_heads)
        return cache

    def features(self, tokens: Tensor, mask: Tensor | None = None, cache: DecoderCache | None = None) -> Tensor:
        """tokens (B, N) long -> final-norm hidden states (B, N, dim)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"tokens must be a (B, N) integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        start = 0 if cache is None else cache.length
        n = tokens.shape[1]
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            if start + n > self.pos_emb.num_embeddings:
                raise ValueError(f"sequence of {start + n} tokens exceeds max_len={self.pos_emb.num_embeddings}")
            x = x + self.pos_emb(torch.arange(start, start + n, device=tokens.device))
        x = self.drop(x)
        plan = self.pruning
        if plan is not None and plan.kind == "tokens" and cache is None:
            x = self._pruned_blocks(x, mask)
        elif plan is not None and plan.kind == "kv_cache" and cache is not None:
            for i, blk in enumerate(self.blocks):
                pol = plan.get(i)
                if pol is None:
                    x = blk(x, key_padding_mask=mask, cache=cache.layers[i])
                    continue
                x, weights = blk(x, key_padding_mask=mask, cache=cache.layers[i], return_weights=True)
                pol.observe(cache.layers[i], weights, cache.eviction[i])
        else:
            for i, blk in enumerate(self.blocks):
                x = blk(x, key_padding_mask=mask, cache=None if cache is None else cache.layers[i])
        return self.norm(x)

    def _pruned_blocks(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Blocks with token pruners, full sequence: x (B, N, dim) -> (B, N, dim) (dropped tokens scattered back)."""
        assert self.pruning is not None
        b, n0, c = x.shape
        index = torch.arange(n0, device=x.device).expand(b, n0)
        canvas: Tensor | None = None
        pruned = False

        def write(canvas: Tensor | None, x: Tensor, index: Tensor, mask: Tensor | None) -> Tensor:
            if canvas is None:
                canvas = x.new_zeros(b, n0 + 1, c)
            idx = index if mask is None else torch.where(mask, index, n0)  # padding -> a spare row
            return canvas.scatter(1, idx[..., None].expand(-1, -1, c), x)

        for i, blk in enumerate(self.blocks):
            pr = self.pruning.get(i)
            positions = index if pruned and self.positions == "rope" else None
            if pr is None:
                x = blk(x, key_padding_mask=mask, positions=positions)
                continue
            if pr.needs_importance:
                x, imp = blk(x, key_padding_mask=mask, positions=positions, return_importance=True)
            else:
                x, imp = blk(x, key_padding_mask=mask, positions=positions), None
            out = pr(x, imp, mask, self.pruning.protected(index, n0, [-1]))
            if out.x is x:
                continue
            canvas = write(canvas, x, index, mask)
            index, x, mask = index.gather(1, out.index), out.x, out.mask
            pruned = True
        if canvas is None:
            return x
        return write(canvas, x, index, mask)[:, :n0]

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        *,
        select: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, N) long -> logits (B, N, V); see the class docstring for mask and cache.

        ``select`` (B, N) bool returns only the logits of the selected positions, (K, V) -
        cheaper when few positions carry a target (e.g. associative recall).
        """
        h = self.features(tokens, mask, cache)
        if select is not None:
            h = h[select]
        return self.head(h)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cache_mode: str | None = None,
    ) -> Tensor:
        """Continue ``prompt`` (B, T) by up to ``max_new_tokens`` tokens -> (B, T + new).

        The prompt is consumed in one cached forward, then one token at a time. Sampling from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens, or
        argmax when ``greedy`` (or temperature == 0). Sequences that emitted ``eos_token_id``
        are continued with it; generation stops early once all have. Runs in eval mode.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a non-empty (B, T) token tensor, got shape {tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        greedy = greedy or temperature == 0
        was_training = self.training
        self.eval()
        try:
            cache = self.init_cache(prompt.shape[0], mode=cache_mode)
            logits = self(prompt, cache=cache)[:, -1]
            out = [prompt]
            done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
            for i in range(max_new_tokens):
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    lg = logits.float() / temperature
                    if top_k is not None and top_k < lg.shape[-1]:
                        kth = lg.topk(top_k, -1).values[:, -1:]
                        lg = lg.masked_fill(lg < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(lg, -1), 1, generator=generator)[:, 0]
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                out.append(nxt[:, None])
                if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                    break
                logits = self(nxt[:, None], cache=cache)[:, -1]
            return torch.cat(out, 1)
        finally:
            self.train(was_training)
