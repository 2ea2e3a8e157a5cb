"""Sparse attention family: block-sparse patterns, GRAT, SeerAttention, MoSA, Sparsifiner, SwinBERT mask.

All block-structured variants run on :func:`attnlib.kernels.block_sparse_attention` (Triton on
CUDA, the fused PyTorch path elsewhere); caller masks (causal, key padding, full, window,
BlockMask) are folded into the same :class:`attnlib.masks.BlockMask`, so they are exact
softmax attention under "caller masks AND the variant's pattern".

* ``block_sparse`` - a static pattern (sliding window, dilated, strided, global tokens,
  Longformer window+global, causal, dense) chosen by config.
* ``grat`` - GRAT (Ren et al. 2025, "Grouping First, Attending Smartly", arXiv 2505.14687):
  contiguous token groups share one key set (criss-cross or surrounding groups); training-free.
* ``seer`` - SeerAttention (Gao et al. 2024, arXiv 2410.13276) AttnGate: block-pooled Q/K,
  per-head projections, block scores -> top-k / threshold BlockMask; self-distillation KL.
* ``mosa`` - MoSA (Piękos, Csordás & Schmidhuber 2025, arXiv 2505.00315): each head's router
  picks its tokens (expert choice), attention among them, scaled by the router score.
* ``sparsifiner`` - Sparsifiner (Wei et al., CVPR 2023): low-rank connectivity predictor ->
  top-K instance-dependent mask; reconstruction loss toward the dense attention.
* ``swinbert_mask`` - SwinBERT's learnable soft attention mask (Lin et al., CVPR 2022) with its
  L1 sparsity loss; binarised into a BlockMask at inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnlib import dispatch
from attnlib._validation import (
    fraction,
    non_negative_int,
    non_negative_number,
    optional_positive_number,
    positive_int,
    positive_number,
)
from attnlib.functional._common import sequence_extent
from attnlib.functional.grat import grat_caller_mask, grat_layout
from attnlib.functional.softmax import softmax_attention, softmax_importance
from attnlib.functional.sparse import (
    MOSA_ROUTINGS,
    RowsFn,
    layout_masked_attention,
    mosa_attention,
    mosa_router,
    mosa_scatter_weights,
    mosa_select,
    mosa_token_attention,
    partial_rotary,
    seer_gate_from_official,
    seer_gate_logits,
    seer_gate_loss,
    seer_select,
    sparsifiner_attention,
    sparsifiner_block_select,
    sparsifiner_predictor,
    sparsifiner_recon_loss,
    swinbert_hard_mask,
    swinbert_soft_attention,
    swinbert_soft_mask,
    swinbert_sparsity,
)
from attnlib.kernels import block_sparse_attention
from attnlib.masks import AttentionMask, BlockMask, MaskLike
from attnlib.positional import RotaryCall
from attnlib.registry import Capabilities, register_variant
from attnlib.variants.base import AttentionCore, CoreOutput

__all__ = [
    "BlockSparseAttention",
    "GRATAttention",
    "MoSAAttention",
    "SeerAttention",
    "SparsifinerAttention",
    "SwinBERTMaskAttention",
    "freeze_all_but_gates",
]


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------


_PLAIN_LAYOUTS: dict[tuple[Any, ...], BlockMask] = {}


def _with_caller(am: AttentionMask, pattern: BlockMask | None, block_size: tuple[int, int]) -> BlockMask:
    """pattern AND every caller mask, as one BlockMask (the all-blocks / causal layouts are kept per size)."""
    if pattern is None and set(am.kinds()) <= {"causal"}:
        key = (am.n, am.m, str(am.device), am.causal, block_size)
        if key not in _PLAIN_LAYOUTS:
            if len(_PLAIN_LAYOUTS) >= 32:
                _PLAIN_LAYOUTS.pop(next(iter(_PLAIN_LAYOUTS)))
            layout = am.as_block_mask(block_size)
            _PLAIN_LAYOUTS[key] = layout or BlockMask.all_blocks(am.n, am.m, block_size=block_size, device=am.device)
        return _PLAIN_LAYOUTS[key]
    caller = am.as_block_mask(block_size)
    if pattern is None:
        if caller is None:
            return BlockMask.all_blocks(am.n, am.m, block_size=block_size, device=am.device)
        return caller
    return pattern if caller is None else pattern & caller


def _run_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bm: BlockMask,
    scale: float | None,
    need_weights: bool,
    need_importance: bool,
    score_mod: Any = None,
) -> CoreOutput:
    """Exact attention under ``bm`` through the block-sparse kernel (+ weights / importance on request).

    A layout that :func:`attnlib.dispatch.block_layout_as_dense` routes to dense attention (every
    block full) takes the dense path (:func:`softmax_attention`) instead. ``score_mod`` edits the
    logits on every path.
    """
    if dispatch.block_layout_as_dense(bm):
        out = softmax_attention(q, k, v, scale=scale, score_mod=score_mod)
    elif score_mod is None and dispatch.block_layout_as_masked_dense(bm, q.device):
        out = layout_masked_attention(q, k, v, bm, scale=scale)
    else:
        out = block_sparse_attention(q, k, v, bm, scale=scale, score_mod=score_mod)
    if need_weights:
        _, w = softmax_attention(
            q, k, v, mask=bm, scale=scale, backend="math", return_weights=True, score_mod=score_mod
        )
        return CoreOutput.from_weights(out, w, need_weights=True, need_importance=need_importance)  # type: ignore[arg-type]
    imp = softmax_importance(q, k, mask=bm, scale=scale, score_mod=score_mod) if need_importance else None
    return CoreOutput(out, importance=imp)  # type: ignore[arg-type]


def _dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    need_importance: bool,
    aux_loss: Tensor | None,
) -> CoreOutput:
    """Exact softmax attention under ``mask`` (+ weights / importance on request): the dense
    output of the learned-mask variants while they train their predictor."""
    if need_weights:
        out, w = softmax_attention(
            q, k, v, mask=mask, scale=scale, dropout_p=dropout_p, backend="math", return_weights=True
        )
        return CoreOutput.from_weights(out, w, need_weights=True, need_importance=need_importance, aux_loss=aux_loss)
    out = softmax_attention(q, k, v, mask=mask, scale=scale, dropout_p=dropout_p)
    imp = softmax_importance(q, k, mask=mask, scale=scale) if need_importance else None
    return CoreOutput(out, importance=imp, aux_loss=aux_loss)  # type: ignore[arg-type]


_BLOCK_CAPS = dict(
    causal=True,
    cross=True,
    key_padding=True,
    full_mask=True,
    block_mask=True,
    window=True,
    causal_cross=True,
    exact=False,
    has_weights=True,
    attn_dropout=False,
    gqa=True,
    importance=True,
    family="sparse",
)


# ------------------------------------------------------------------------------------------
# block_sparse: static patterns
# ------------------------------------------------------------------------------------------

_PATTERNS = ("sliding_window", "dilated", "strided", "global_tokens", "longformer", "causal", "dense")


@register_variant("block_sparse")
class BlockSparseAttention(AttentionCore):
    """Exact softmax attention restricted to a static block-sparse pattern.

    Args:
        pattern: "sliding_window" (|i - j| <= window, keys i - window .. i when causal),
            "dilated" (``window_blocks`` blocks each side, every ``dilation``-th block),
            "strided" (Sparse Transformer: ``local`` blocks + every ``stride``-th block),
            "global_tokens" (first ``num_global`` tokens global), "longformer"
            (sliding_window | global_tokens), "causal" or "dense".
        block_size: mask block (64 or 128 for the Triton kernel; any size on the PyTorch path).
        window: token radius of the sliding window.
        window_blocks, dilation: for "dilated".
        stride, local: for "strided" (in blocks).
        num_global: global tokens for "global_tokens" / "longformer".
        scale: logit scale, default head_dim**-0.5.

    Equals exact softmax attention under the caller's masks AND the pattern. The pattern is
    built once per (N, M, device) and cached. See :class:`attnlib.masks.BlockMask`.
    """

    capabilities = Capabilities(
        **{**_BLOCK_CAPS, "exact": True, "score_mod": True},  # type: ignore[arg-type]
        complexity="O(N·density·N)",
        trainable=False,
        permutation_equivariant=False,
        paper="Child et al. 2019 (Sparse Transformer); Beltagy et al. 2020 (Longformer); block-sparse FlashAttention",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        pattern: str = "sliding_window",
        block_size: int = 128,
        window: int = 256,
        window_blocks: int = 2,
        dilation: int = 2,
        stride: int = 4,
        local: int | None = None,
        num_global: int = 16,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        where = "block_sparse"
        if pattern not in _PATTERNS:
            raise ValueError(f"{where}: pattern must be one of {_PATTERNS}, got {pattern!r}")
        self.pattern = pattern
        self.block_size = positive_int(block_size, f"{where}: block_size")
        self.window = positive_int(window, f"{where}: window")
        self.window_blocks = positive_int(window_blocks, f"{where}: window_blocks")
        self.dilation = positive_int(dilation, f"{where}: dilation")
        self.stride = positive_int(stride, f"{where}: stride")
        self.local = None if local is None else positive_int(local, f"{where}: local")
        self.num_global = positive_int(num_global, f"{where}: num_global")
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self._cache: dict[tuple[int, int, str], BlockMask | None] = {}

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"pattern": "longformer", "block_size": 4, "window": 3, "num_global": 2}

    def block_mask(self, n: int, m: int, device: torch.device | str) -> BlockMask | None:
        """The pattern for N queries and M keys (None for "dense"), cached."""
        key = (n, m, str(device))
        if key not in self._cache:
            bs, p = self.block_size, self.pattern
            kw: dict[str, Any] = {"M": m, "block_size": bs, "device": device}
            bm: BlockMask | None
            if p == "sliding_window":
                bm = BlockMask.sliding_window(n, self.window, **kw)
            elif p == "dilated":
                bm = BlockMask.dilated(n, self.window_blocks, self.dilation, **kw)
            elif p == "strided":
                bm = BlockMask.strided(n, self.stride, local=self.local, **kw)
            elif p == "global_tokens":
                bm = BlockMask.global_tokens(n, self.num_global, **kw)
            elif p == "longformer":
                bm = BlockMask.longformer(n, self.window, self.num_global, **kw)
            elif p == "causal":
                bm = BlockMask.causal(n, m, block_size=bs, device=device)
            else:
                bm = None
            self._cache[key] = bm
        return self._cache[key]

    def decode_pattern(self, n: int, m: int, device: torch.device | str) -> BlockMask | None:
        """The pattern of N new queries after M - N earlier positions (causal N < M, decoding).

        Query i sits at position M - N + i (bottom-right aligned, like the causal mask), so its
        row is row M - N + i of the (M, M) pattern: the layout blocks stay aligned to the
        sequence's positions and a decoded token sees exactly the keys its row sees in the full
        causal forward. The (M, M) pattern is not kept (M grows with every decoding step);
        O(N · M) memory.
        """
        key = (m, m, str(device))
        kept = key in self._cache
        square = self.block_mask(m, m, device)
        if not kept:
            del self._cache[key]
        return None if square is None else BlockMask.from_dense(square.dense_rows(m - n, m), self.block_size)

    def implied_mask(self, n: int, m: int, device: torch.device | str = "cpu") -> MaskLike:
        return self.block_mask(n, m, device)

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
        score_mod: Any = None,
    ) -> CoreOutput:
        fn = _pattern_attend_eager() if torch.compiler.is_compiling() else _pattern_attend
        out, w, imp = fn(self, q, k, v, mask, need_weights, need_importance, score_mod)
        return CoreOutput(out, weights=w, importance=imp)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pattern={self.pattern!r}, block_size={self.block_size}"


def _pattern_attend(
    core: BlockSparseAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    need_weights: bool,
    need_importance: bool,
    score_mod: Any = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """block_sparse's computation: (out, weights | None, importance | None).

    Causal and right-padding key padding (each example's real keys a prefix, see
    :meth:`AttentionMask.key_lengths`) go to the kernel as its ``causal=`` / ``kv_lengths=`` flags
    (the PyTorch path caches those layouts on the pattern) instead of a new BlockMask per call;
    other caller masks are ANDed into the pattern. The layout work is
    data-dependent (active-block lists), so ``torch.compile`` runs this function eagerly
    (:func:`_pattern_attend_eager`): one graph break per call instead of one per block-list operation.
    """
    decoding = mask.causal and mask.n < mask.m  # new queries after cached positions
    pattern = (core.decode_pattern if decoding else core.block_mask)(mask.n, mask.m, q.device)
    plain = not (decoding or need_weights or need_importance or score_mod)
    flags = {"causal", "key_padding"}
    if pattern is not None and plain and set(mask.kinds()) & flags and set(mask.kinds()) <= flags:
        if not dispatch.block_layout_as_dense(pattern):
            lengths = mask.key_lengths()
            if mask.key_padding is None or lengths is not None:
                out = block_sparse_attention(q, k, v, pattern, scale=core.scale, causal=mask.causal, kv_lengths=lengths)
                return out, None, None
    bm = _with_caller(mask, pattern, (core.block_size, core.block_size))
    res = _run_block(q, k, v, bm, core.scale, need_weights, need_importance, score_mod)
    return res.out, res.weights, res.importance


_EAGER: dict[str, Any] = {}


def _pattern_attend_eager() -> Any:
    """:func:`_pattern_attend` behind ``torch.compiler.disable``, made on first use (wrapping it at
    import would import torch._dynamo - and Triton - with ``import attnlib``)."""
    if "fn" not in _EAGER:
        _EAGER["fn"] = torch.compiler.disable(_pattern_attend)
    return _EAGER["fn"]


# ------------------------------------------------------------------------------------------
# GRAT
# ------------------------------------------------------------------------------------------


@register_variant("grat")
class GRATAttention(AttentionCore):
    """GRAT: group-shared sparse attention (training-free).

    Tokens on a grid are cut into contiguous groups; every query of a group attends the same
    key groups - its criss-cross (GRAT-X: groups sharing a group row / column / frame) or its
    surrounding groups (GRAT-B: within ``radius`` groups per axis). The tokens are reordered
    group by group (:func:`attnlib.functional.grat.grat_permutation`), attention runs on the
    block-sparse kernel with :meth:`attnlib.masks.BlockMask.grat`, and outputs are put back
    in the original order. Tokens after the grid (N > prod(grid), e.g. text tokens) attend
    everything and are attended by everything, as in the official code.

    Args:
        grid: token grid (H, W) or (T, H, W) in raster order; None = 1D (the sequence itself).
        group: group shape (same rank as grid; an int in 1D).
        mode: "criss_cross" (GRAT-X) or "surrounding" (GRAT-B).
        radius: GRAT-B radius in groups.
        block_size: kernel mask block; a divisor of the group size gives full blocks only.
        scale: logit scale, default head_dim**-0.5.

    Equals exact softmax attention under the caller's masks AND the group mask (built in the
    grouped order; caller masks are permuted with the tokens).
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=False,
        window=False,
        causal_cross=False,
        complexity="O(N·density·N)",
        exact=True,
        has_weights=True,
        trainable=False,
        attn_dropout=False,
        gqa=True,
        permutation_equivariant=False,
        importance=True,
        family="sparse",
        paper="Ren et al. 2025, Grouping First, Attending Smartly (GRAT), arXiv 2505.14687",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        grid: tuple[int, ...] | list[int] | None = None,
        group: int | tuple[int, ...] | list[int] = 64,
        mode: str = "criss_cross",
        radius: int = 1,
        block_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        where = "grat"
        if grid is not None and not (isinstance(grid, Sequence) and not isinstance(grid, str) and 1 <= len(grid) <= 3):
            raise ValueError(
                f"{where}: grid must be None (1-D: the sequence itself) or the token grid (H, W) / (T, H, W) "
                f"as a tuple of positive ints, got {grid!r}"
            )
        self.grid = None if grid is None else tuple(positive_int(g, f"{where}: grid entry") for g in grid)
        if isinstance(group, Sequence) and not isinstance(group, str):
            self.group = tuple(positive_int(g, f"{where}: group entry") for g in group)
        else:
            self.group = (positive_int(group, f"{where}: group", hint=" (or a tuple of them, one per grid axis)"),)
        if self.grid is not None and len(self.grid) != len(self.group):
            raise ValueError(f"{where}: grid {self.grid} and group {self.group} must have the same rank")
        if self.grid is None and len(self.group) != 1:
            raise ValueError(f"{where}: without a grid (1D) the group must be one int, got {self.group}")
        if mode not in ("criss_cross", "surrounding"):
            raise ValueError(f"{where}: mode must be 'criss_cross' or 'surrounding', got {mode!r}")
        non_negative_int(radius, f"{where}: radius")
        self.mode, self.radius = mode, radius
        self.block_size = positive_int(block_size, f"{where}: block_size")
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self._cache: dict[tuple[int, str], tuple[BlockMask, Tensor | None]] = {}

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"group": 4, "block_size": 4, "mode": "surrounding", "radius": 1}

    def layout(self, n: int, device: torch.device | str) -> tuple[BlockMask, Tensor | None]:
        """(BlockMask in grouped order, permutation of the N tokens or None if identity), cached."""
        key = (n, str(device))
        if key not in self._cache:
            grid = self.grid if self.grid is not None else (n,)
            self._cache[key] = grat_layout(
                grid, self.group, n, mode=self.mode, radius=self.radius, block_size=self.block_size, device=device
            )
        return self._cache[key]

    def implied_mask(self, n: int, m: int, device: torch.device | str = "cpu") -> MaskLike:
        """The group mask in the original token order: bool (1, 1, N, N) (O(N^2); for oracles)."""
        bm, perm = self.layout(n, device)
        dense = bm.to_dense()
        if perm is None:
            return dense
        inv = torch.argsort(perm)
        return dense[:, :, inv][:, :, :, inv]

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
        n = q.shape[2]
        bm, perm = self.layout(n, q.device)
        bs = (self.block_size, self.block_size)
        if perm is None:
            return _run_block(q, k, v, _with_caller(mask, bm, bs), self.scale, need_weights, need_importance)
        inv = torch.argsort(perm)
        caller = grat_caller_mask(mask, perm, self.block_size)  # caller masks in the grouped order
        if caller is not None:
            bm = bm & caller
        res = _run_block(q[:, :, perm], k[:, :, perm], v[:, :, perm], bm, self.scale, need_weights, need_importance)
        out = res.out[:, :, inv]
        w = res.weights[:, :, inv][:, :, :, inv] if res.weights is not None else None
        imp = res.importance[:, :, inv] if res.importance is not None else None
        return CoreOutput(out, weights=w, importance=imp)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}, group={self.group}, mode={self.mode!r}"


# ------------------------------------------------------------------------------------------
# SeerAttention
# ------------------------------------------------------------------------------------------


@register_variant("seer")
class SeerAttention(AttentionCore):
    """SeerAttention: a learned AttnGate predicts the block-sparse mask of each head.

    Gate (prefill gate of the official code): Q is pooled per block (``q_pool``, default
    avg), K per block (``k_pool``, default max, min, avg; ceil mode); per-head linear maps
    (no bias) to ``gate_dim``, where the Q map is omitted when ``q_pool`` has one op and
    ``gate_dim == head_dim``; optional RoPE on the pooled vectors at block positions (first
    token of each block); block logits ``S = Q~ K~^T / sqrt(gate_dim)`` with disallowed blocks
    (caller masks, incl. causal) at -inf. Selection: top-k per query block by ``density``
    (causal: k = max(1, floor((1 - sqrt(1 - density)) · n)), the official ``nz_ratio`` rule;
    otherwise k = max(1, round(density · n_k))), or ``threshold`` on softmax(S). With causal
    masks the block(s) holding each query's own position are always kept (no empty rows). The
    selected blocks restrict the caller's BlockMask and run on the block-sparse kernel.

    Training (the frozen-base recipe): the output is the *dense* attention (the model behaves
    exactly like the base model) and ``aux_loss`` = ``loss_scale`` · KL(GT || softmax(S)) with
    GT the row-normalised block max-pooled dense attention, on query blocks I >= skip_first·n_q,
    averaged over all elements (PyTorch ``KLDivLoss`` 'mean'). Use :func:`freeze_all_but_gates`
    to train only the gates. ``train_sparse=True`` runs the sparse kernel in training too.

    Positions as in the official gate: inside an :class:`attnlib.Attention` built with
    ``rope=True`` the gate pools the *pre-rotary* q and k (the core undoes the module's rotation)
    and rotates the gate vectors once, at the position of the first token of each block, with
    the module's rotary base; the attention itself uses the rotated q and k. Gate weights of the
    official code load with :meth:`load_official_gate` and give the same logits.

    Remaining deviations: the gate K projection is per *query* head (the official one is per KV
    head when the gate has a Q projection; :meth:`load_official_gate` repeats a per-KV-head map,
    which gives the same logits, but training then unties it); the gate RoPE is the default
    rotary (no Llama-3 / YaRN frequency scaling).

    Args:
        block_size: gate / mask block (official 64).
        density: fraction of blocks kept (top-k), or
        threshold: keep blocks with gate probability > threshold (overrides density).
        gate_dim: gate hidden size d_g (official 128).
        q_pool, k_pool: pooling ops among "avg", "max", "min".
        gate_rope: RoPE on the pooled gate vectors. None (default): exactly when the module
            applies rotary positions (the official gate, in a RoPE model); True: also without
            them, at block positions ``I·block_size`` with ``rope_base``; False: never.
        rope_base: rotary base of the gate when the module has no rotary positions.
        loss_scale: gate loss scale (official 10).
        skip_first: fraction of leading query blocks left out of the loss (official 1/4).
        train_sparse: use the sparse kernel in training as well.
        last_block_dense: keep every allowed block of the last two query-block rows (official
            default True).
        keep_own_blocks: under causal masks always keep the block(s) holding each query's own
            position (no empty rows under a threshold; not in the official code).
        causal_gate: under causal masks, score only key blocks entirely in the past of a
            query block, from the previous query block's pooled queries (block 0: its first
            query), so the block choice never reads later tokens of the same block. The official
            prefill gate (default False) pools the whole query block and scores the diagonal
            block, so under causal masks tokens later in a query's own block can change which
            blocks that query reads (never what it reads inside them); use True where strict
            causality matters (training a causal model through the gate).
        scale: attention logit scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        # causal N != M: the causal gate of query block I pools the queries of block I - 1, which a
        # key/value cache does not hold, so new queries cannot attend alone; decoding recomputes
        **{**_BLOCK_CAPS, "causal_cross": False},  # type: ignore[arg-type]
        complexity="O(N·density·N) + O((N/b)^2)",
        trainable=True,
        permutation_equivariant=False,
        paper="Gao et al. 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276",
    )
    uses_rotary = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        block_size: int = 64,
        density: float = 0.5,
        threshold: float | None = None,
        gate_dim: int = 128,
        q_pool: tuple[str, ...] | list[str] = ("avg",),
        k_pool: tuple[str, ...] | list[str] = ("max", "min", "avg"),
        gate_rope: bool | None = None,
        rope_base: float = 10000.0,
        loss_scale: float = 10.0,
        skip_first: float = 0.25,
        train_sparse: bool = False,
        last_block_dense: bool = True,
        keep_own_blocks: bool = False,
        causal_gate: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        where = "seer"
        self.causal_gate = bool(causal_gate)
        self.last_block_dense = bool(last_block_dense)
        self.keep_own_blocks = bool(keep_own_blocks)
        self.block_size = positive_int(block_size, f"{where}: block_size")
        self.density = fraction(density, f"{where}: density")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError(f"{where}: threshold must be a float or None, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.gate_dim = positive_int(gate_dim, f"{where}: gate_dim")
        if gate_rope is not False and self.gate_dim % 2:
            raise ValueError(f"{where}: gate RoPE needs an even gate_dim, got {gate_dim} (or set gate_rope=False)")
        self.q_pool, self.k_pool = tuple(q_pool), tuple(k_pool)
        for ops in (self.q_pool, self.k_pool):
            if not ops or any(o not in ("avg", "max", "min") for o in ops):
                raise ValueError(f"{where}: pooling ops must be a non-empty list of 'avg', 'max', 'min', got {ops}")
        self.gate_rope = None if gate_rope is None else bool(gate_rope)
        self.rope_base = float(rope_base)
        self.loss_scale = non_negative_number(loss_scale, f"{self.name}: loss_scale")
        if not 0.0 <= float(skip_first) < 1.0:
            raise ValueError(f"{where}: skip_first must be in [0, 1), got {skip_first!r}")
        self.skip_first = float(skip_first)
        self.train_sparse = bool(train_sparse)
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self.q_gate: nn.Parameter | None = None
        if not (len(self.q_pool) == 1 and self.gate_dim == head_dim):
            self.q_gate = nn.Parameter(torch.empty(num_heads, len(self.q_pool) * head_dim, self.gate_dim))
        self.k_gate = nn.Parameter(torch.empty(num_heads, len(self.k_pool) * head_dim, self.gate_dim))
        for p in (self.q_gate, self.k_gate):
            if p is not None:
                for hh in range(num_heads):
                    nn.init.xavier_uniform_(p.data[hh])

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        # the strictly causal gate: the official one (default) lets later tokens of a query's own
        # block change which blocks it reads, which the registry's causality property forbids
        return {"block_size": 4, "density": 0.5, "gate_dim": 8, "causal_gate": True}

    @classmethod
    def decoding_kwargs(cls) -> dict[str, Any]:
        return {**cls.conformance_kwargs(), "threshold": 0.2, "last_block_dense": False, "keep_own_blocks": True}

    def decoding_error(self) -> str | None:
        length_dependent = [
            text
            for bad, text in (
                (not self.causal_gate, "causal_gate=False pools later tokens of a query's own block"),
                (self.last_block_dense, "last_block_dense=True keeps the last two block rows of the sequence dense"),
                (self.threshold is None, "the density top-k keeps a number of blocks set by the total length"),
            )
            if bad
        ]
        if length_dependent:
            return (
                "variant 'seer' decodes only where its block choice for a position does not depend on the "
                f"sequence length: {'; '.join(length_dependent)}. Build it with causal_gate=True, "
                "last_block_dense=False and a threshold= (keep_own_blocks=True avoids empty rows)"
            )
        return super().decoding_error()

    def gate_logits(
        self,
        q: Tensor,
        k: Tensor,
        allowed: Tensor | None = None,
        *,
        causal: bool = False,
        key_valid: Tensor | None = None,
        rotary: RotaryCall | None = None,
        cross: bool = False,
    ) -> Tensor:
        """Block logits (B, H, n_q, n_k), float32 (float64 for float64 inputs).

        ``allowed`` (block level, broadcastable) sets the rest to -inf; ``key_valid`` (B, M)
        keeps padding out of the pooling (of the queries too unless ``cross``); ``rotary``: the
        positions the module rotated q and k at (the gate pools the pre-rotary vectors and rotates
        at block positions). With ``causal`` and ``causal_gate`` query block I is represented by
        query block I - 1 (block 0 by its first query) and only key blocks entirely before it are
        scored, so the gate never reads future tokens.
        """
        use_rotary = rotary if self.gate_rope is not False else None
        if use_rotary is None and rotary is not None:  # gate_rope=False: still pool pre-rotary vectors
            q, k = rotary.unrotate_q(q), rotary.unrotate_k(k)
        return seer_gate_logits(
            q,
            k,
            self.k_gate,
            self.q_gate,
            block_size=self.block_size,
            q_pool=self.q_pool,
            k_pool=self.k_pool,
            rope_base=self.rope_base if self.gate_rope else None,
            allowed=allowed,
            causal_gate=causal and self.causal_gate,
            key_valid=key_valid,
            rotary=use_rotary,
            cross=cross,
        )

    @torch.no_grad()
    def load_official_gate(self, state: dict[str, Tensor], prefix: str = "") -> None:
        """Load AttnGate weights trained with the official SeerAttention code.

        ``state``: ``{prefix}mask_linear_k.weight`` and (gates with a Q map)
        ``{prefix}mask_linear_q.weight``, e.g. one layer's entries of the official
        ``attn_gate_weights.pth`` with ``prefix="model.layers.0.self_attn.attn_gate."``. Pooling ops,
        block size and gate_dim must match the official gate type (``Qavg_Kmaxminavg``: q_pool
        ("avg",), k_pool ("max", "min", "avg")).
        """
        qw, kw = seer_gate_from_official(state, self.num_heads, prefix)
        if (qw is None) != (self.q_gate is None):
            raise ValueError(
                f"seer: the official gate {'has' if qw is not None else 'has no'} Q map, this gate "
                f"{'has' if self.q_gate is not None else 'has none'} (q_pool={self.q_pool}, gate_dim={self.gate_dim})"
            )
        for name, w in (("k_gate", kw), ("q_gate", qw)):
            p = getattr(self, name)
            if w is None or p is None:
                continue
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"seer: official {name} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
            p.copy_(w)

    def select(
        self,
        logits: Tensor,
        allowed: Tensor,
        causal: bool,
        n: int,
        m: int,
        key_padding: Tensor | None = None,
        cross: bool = False,
    ) -> Tensor:
        """Block selection (B, H, n_q, n_k) bool from gate logits and the caller's allowed blocks;
        with ``key_padding`` (B, M) the top-k budget (and, in self-attention, the dense last rows)
        follow each example's last real key."""
        return seer_select(
            logits,
            allowed,
            causal=causal,
            density=self.density,
            threshold=self.threshold,
            block_size=self.block_size,
            n=n,
            m=m,
            last_block_dense=self.last_block_dense,
            keep_own_blocks=self.keep_own_blocks,
            key_padding=key_padding,
            cross=cross,
        )

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
        rotary: RotaryCall | None = None,
    ) -> CoreOutput:
        b, h, n, _ = q.shape
        m = k.shape[2]
        bs = (self.block_size, self.block_size)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        base = _with_caller(mask, None, bs)
        partial, full = base.block_states()
        allowed = (partial | full).expand(b, h, -1, -1)
        logits = self.gate_logits(
            q, k, allowed, causal=mask.causal, key_valid=mask.key_padding, rotary=rotary, cross=cross
        )
        aux = None
        if self.training:
            aux = self.loss_scale * seer_gate_loss(logits, q, k, mask, scale, self.block_size, self.skip_first)
            if not self.train_sparse:  # no attention dropout (capabilities.attn_dropout=False)
                return _dense(q, k, v, mask, scale, 0.0, need_weights, need_importance, aux)
        with torch.no_grad():
            sel = self.select(logits.detach(), allowed, mask.causal, n, m, mask.key_padding, cross)
        bm = base.restrict(sel)
        res = _run_block(q, k, v, bm, scale, need_weights, need_importance)
        res.aux_loss = aux
        return res

    def extra_repr(self) -> str:
        sel = f"threshold={self.threshold}" if self.threshold is not None else f"density={self.density}"
        return super().extra_repr() + f", block_size={self.block_size}, {sel}, gate_dim={self.gate_dim}"


def freeze_all_but_gates(model: nn.Module) -> list[nn.Parameter]:
    """SeerAttention's recipe: freeze every parameter of ``model`` except the AttnGates'.

    Returns the gate parameters (pass them to the optimizer). Raises ValueError when the
    model has no ``seer`` attention.
    """
    gates = [p for mod in model.modules() if isinstance(mod, SeerAttention) for p in mod.parameters()]
    if not gates:
        raise ValueError("freeze_all_but_gates: the model has no 'seer' attention")
    ids = {id(p) for p in gates}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return gates


# ------------------------------------------------------------------------------------------
# MoSA
# ------------------------------------------------------------------------------------------


@register_variant("mosa")
class MoSAAttention(AttentionCore):
    """MoSA: Mixture of Sparse Attention, each head an expert that picks its own tokens.

    Router ``r = sigmoid(x W_r)`` (one score per MoSA head and token, no bias by default, in
    float32) on the module's input tokens x; head e picks k = clamp(floor(N / sparsity),
    min_tokens, N) tokens, projects *only those* to q, k, v (so its cost is O(k·C·D + k^2·D)
    and it holds k key/value entries, not N), rotates the first ``rotate_fraction`` of the dims
    of q and k at the tokens' original positions, attends among them (causally by original
    positions: ``I_i >= I_j``, the paper's mask), multiplies the result by the router score (the
    router's only gradient path), projects it out and scatter-adds it at the picked positions;
    tokens a head did not pick get 0 from it. The first ``num_dense_heads`` heads are ordinary
    dense softmax heads (the paper's hybrid), with the same partial rotary.

    Routing (``routing``):

    * ``"expert_choice"``: the paper's and the official code's top-k over the whole sequence.
      With ``causal`` only the attention among the picks is causal; *which* tokens are picked
      depends on later tokens (an open question in the official repository: "Information leakage
      via router"), so a causal model's outputs read the future.
    * ``"causal_expert_choice"``: the same budget decided from the prefix: token t is picked iff
      expert choice over tokens 0..t would pick it and the head holds fewer than k(t+1) tokens.
      Causal outputs never read later tokens, decoding equals the full forward, and a head never
      holds more than k(N) tokens (ours; not in the paper).
    * ``"auto"`` (default): ``expert_choice`` for non-causal calls, ``causal_expert_choice``
      for causal ones.
    * ``"threshold"``: token t is picked iff ``r_t > threshold`` (the count is not tied to
      ``sparsity``; kept for comparison).

    Positions: the partial rotary uses the module's rotary positions and base, so build the
    :class:`attnlib.Attention` with ``rope=True`` (as :class:`attnlib.models.DecoderLM` does);
    without it MoSA has no positions (the official MoSA always rotates, base 1e4).

    Args:
        sparsity: rho, k = N / rho (1 keeps every token).
        routing: "auto", "expert_choice", "causal_expert_choice" or "threshold".
        threshold: router score threshold of ``"threshold"`` routing.
        include_first: token 0 is always picked (official option).
        min_tokens: smallest k (official 2).
        num_dense_heads: dense heads among the module's heads (the hybrid; the official README
            example: 3 dense + 4 MoSA heads).
        rotate_fraction: share of each head's dims that are rotated (official 0.5).
        router_bias: bias in the router (official: none).
        scale: logit scale, default head_dim**-0.5.

    Called as a bare core on q, k, v (no tokens) the router reads the concatenated per-head
    queries instead of x and nothing is rotated; :class:`attnlib.Attention` always goes through
    :meth:`forward_tokens`.
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=False,
        window=False,
        causal_cross=False,
        complexity="O((N/rho)^2 + N)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=False,
        permutation_equivariant=True,
        importance=True,
        family="sparse",
        paper="Piękos, Csordás & Schmidhuber 2025, Mixture of Sparse Attention (MoSA), arXiv 2505.00315",
    )
    projects_tokens = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        sparsity: float = 4.0,
        routing: str = "auto",
        threshold: float = 0.5,
        include_first: bool = False,
        min_tokens: int = 2,
        num_dense_heads: int = 0,
        rotate_fraction: float = 0.5,
        router_bias: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or float(sparsity) < 1.0:
            raise ValueError(f"mosa: sparsity must be a number >= 1 (k = N / sparsity), got {sparsity!r}")
        if routing not in ("auto", *MOSA_ROUTINGS):
            raise ValueError(f"mosa: routing must be 'auto' or one of {MOSA_ROUTINGS}, got {routing!r}")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"mosa: threshold must be in [0, 1), got {threshold!r}")
        if not 0.0 <= float(rotate_fraction) <= 1.0:
            raise ValueError(f"mosa: rotate_fraction must be in [0, 1], got {rotate_fraction!r}")
        self.num_dense_heads = non_negative_int(num_dense_heads, "mosa: num_dense_heads")
        if self.num_dense_heads >= num_heads:
            raise ValueError(f"mosa: num_dense_heads must be < num_heads={num_heads}, got {num_dense_heads}")
        self.sparsity = float(sparsity)
        self.routing = routing
        self.threshold = float(threshold)
        self.include_first = bool(include_first)
        self.min_tokens = positive_int(min_tokens, "mosa: min_tokens")
        self.rotate_fraction = float(rotate_fraction)
        self.n_rot = 2 * int(self.rotate_fraction * head_dim / 2)
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self.router = nn.Linear(num_heads * head_dim, num_heads - self.num_dense_heads, bias=router_bias)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"sparsity": 2.0, "num_dense_heads": 1}

    def routing_for(self, causal: bool) -> str:
        """The routing a call uses ("auto" resolved by ``causal``)."""
        if self.routing == "auto":
            return "causal_expert_choice" if causal else "expert_choice"
        return self.routing

    def route(self, tokens: Tensor, mask: AttentionMask) -> tuple[Tensor, Tensor, Tensor]:
        """Router scores and picks from tokens (B, N, C).

        Returns (r (B, E, N), idx (B, E, K) ascending, slot_valid (B, E, K)).
        """
        r = mosa_router(tokens, self.router.weight, self.router.bias)
        idx, slot_valid = mosa_select(
            r,
            routing=self.routing_for(mask.causal),
            sparsity=self.sparsity,
            min_tokens=self.min_tokens,
            threshold=self.threshold,
            include_first=self.include_first,
            valid=mask.key_padding,
        )
        return r, idx, slot_valid

    def _dense_heads(
        self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float, need: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The hybrid's dense heads: softmax attention of q, k, v (B, H_d, N, D) under ``mask``."""
        hd = q.shape[1]
        full = None if mask.full is None else mask.full[:, :hd] if mask.full.shape[1] > 1 else mask.full
        sub = dataclasses.replace(mask, heads=hd, full=full, _dense_cache={})
        if need:
            return softmax_attention(
                q, k, v, mask=sub, scale=self.scale, dropout_p=dropout_p, backend="math", return_weights=True
            )
        return softmax_attention(q, k, v, mask=sub, scale=self.scale, dropout_p=dropout_p), None

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
        hd = self.num_dense_heads
        b, h, n, d = q.shape
        r, idx, slot_valid = self.route(q.transpose(1, 2).reshape(b, n, h * d), mask)
        full = None if mask.full is None else mask.full[:, hd:] if mask.full.shape[1] > 1 else mask.full
        out, weights, imp = mosa_attention(
            q[:, hd:], k[:, hd:], v[:, hd:], r, idx, slot_valid, causal=mask.causal, full=full,
            scale=self.scale, dropout_p=dropout_p, need_weights=need_weights, need_importance=need_importance,
        )  # fmt: skip
        if not hd:
            return CoreOutput(out, weights=weights, importance=imp)
        od, wd = self._dense_heads(q[:, :hd], k[:, :hd], v[:, :hd], mask, dropout_p, need_weights or need_importance)
        return _merge_heads(od, wd, out, weights, imp, need_weights, need_importance)

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
        h, d, hd = self.num_heads, self.head_dim, self.num_dense_heads
        n, c = x.shape[1], x.shape[2]
        g = h // num_kv_heads
        kv = torch.arange(h, device=x.device) // g  # the key/value head of each query head
        w, bias = in_proj.weight, in_proj.bias
        rows = [torch.arange(h, device=x.device) * d, h * d + kv * d, (h + num_kv_heads) * d + kv * d]
        per_head = [r[:, None] + torch.arange(d, device=x.device) for r in rows]  # 3 x (H, D) row indices
        wq, wk, wv = (w[i] for i in per_head)  # (H, D, C)
        bq, bk, bv = (None if bias is None else bias[i] for i in per_head)  # (H, D)
        w_out = out_proj.weight.view(c, h, d).permute(1, 0, 2)  # (H, C, D)
        pos = None if rotary is None else rotary.q_positions
        base = 10000.0 if rotary is None else rotary.base
        r, idx, slot_valid = self.route(x, mask)
        full = None if mask.full is None else mask.full[:, hd:] if mask.full.shape[1] > 1 else mask.full
        y, w_g = mosa_token_attention(
            x, (wq[hd:], wk[hd:], wv[hd:]),
            (None, None, None) if bias is None else (bq[hd:], bk[hd:], bv[hd:]),
            w_out[hd:], r, idx, slot_valid, positions=pos, rope_base=base, n_rot=self.n_rot,
            causal=mask.causal, full=full, scale=self.scale, dropout_p=dropout_p,
            need_weights=need_weights or need_importance,
        )  # fmt: skip
        weights = imp = None
        if w_g is not None:
            weights, imp = mosa_scatter_weights(w_g, idx, n, need_weights, need_importance)
        if hd:
            q, k, v = (
                torch.einsum("bnc,hdc->bhnd", x, ww[:hd]) + (0 if bb is None else bb[None, :hd, None, :])
                for ww, bb in ((wq, bq), (wk, bk), (wv, bv))
            )
            if pos is not None:
                pp = pos if pos.dim() == 1 else pos[:, None]
                q, k = partial_rotary(q, pp, base, self.n_rot), partial_rotary(k, pp, base, self.n_rot)
            od, wd = self._dense_heads(q, k, v, mask, dropout_p, need_weights or need_importance)
            y = y + torch.einsum("bhnd,hcd->bnc", od, w_out[:hd])
            merged = _merge_heads(od, wd, None, weights, imp, need_weights, need_importance)
            weights, imp = merged.weights, merged.importance
        if out_proj.bias is not None:
            y = y + out_proj.bias
        return y, CoreOutput(y, weights=weights, importance=imp)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", sparsity={self.sparsity}, routing={self.routing!r}, num_dense_heads={self.num_dense_heads}"
        )


def _merge_heads(
    dense_out: Tensor,
    dense_w: Tensor | None,
    sparse_out: Tensor | None,
    sparse_w: Tensor | None,
    sparse_imp: Tensor | None,
    need_weights: bool,
    need_importance: bool,
) -> CoreOutput:
    """Dense heads first, then the sparse heads: outputs (when given), weights and importance concatenated."""
    out = dense_out if sparse_out is None else torch.cat([dense_out, sparse_out], 1)
    weights = imp = None
    if need_weights and dense_w is not None and sparse_w is not None:
        weights = torch.cat([dense_w, sparse_w], 1)
    if need_importance and dense_w is not None and sparse_imp is not None:
        imp = torch.cat([dense_w.mean(2), sparse_imp], 1)
    return CoreOutput(out, weights=weights, importance=imp)


# ------------------------------------------------------------------------------------------
# Sparsifiner
# ------------------------------------------------------------------------------------------


@register_variant("sparsifiner")
class SparsifinerAttention(AttentionCore):
    """Sparsifiner: a low-rank connectivity predictor picks K keys per query.

    Predictor (official code): channel reduction ``q_c = q W_q + b``, ``k_c = k W_k + b``
    (D -> D / reduce_c_factor, shared over heads); key down-projection over tokens
    ``K_down = k_c^T P_down`` (P_down: num_tokens x n_d, n_d = num_tokens // reduce_n_factor);
    ``Cf = softmax(q_c K_down · predictor_scale)`` over n_d; ``A^ = Cf W_up`` with
    W_up = P_back^T. Outside the reconstruction stage Cf keeps its top ``basis_topk`` entries
    and W_up becomes |W_up| with entries <= ``basis_threshold`` zeroed. The mask keeps the
    top K = ceil(keep_rate · N) entries of A^ per query (detached; caller masks respected;
    with ``causal`` query i keeps ceil(keep_rate · (i + 1)), so prefixes do not depend on N);
    the first ``num_dense_queries`` query rows (CLS) stay dense. Attention then runs on the
    K gathered keys per query (O(N·K·D)).

    ``aux_loss`` (training) = ``recon_weight`` · sum((A^_raw - A)^2) over the sparse rows, A
    the dense attention (detached): the stage-1 reconstruction loss, the predictor's only
    gradient (the mask has none). ``reconstruct=True`` is stage 1: dense attention output.

    Args:
        num_tokens: sequence length the token projections are sized for (N <= num_tokens;
            shorter sequences use the first N rows).
        keep_rate: fraction of keys per query (official 0.25).
        reduce_n_factor, reduce_c_factor: predictor ranks (official 6 and 2).
        basis_topk, basis_threshold: sparsified basis (official 8 and 0.02).
        num_dense_queries: leading query rows kept dense (1 = the CLS token).
        predictor_scale: logit scale of the predictor (official code: num_heads**-0.5).
        recon_weight: weight of the reconstruction loss (official 0.01).
        reconstruct: stage 1 (dense output, raw basis).
        selection: "tokens" (the paper: each query keeps its top K keys) or "blocks" (ours, for
            speed: each query block of ``block_size`` rows keeps its top ceil(keep_rate · n_k) key
            blocks by the block means of A^, computed without A^ itself, and attention runs on
            the block-sparse kernel; the ``num_dense_queries`` rows stay dense; under causal masks
            a block's choice also reads its later rows, so prefixes are not independent of them).
        block_size: query / key block of ``selection="blocks"``.
        scale: attention logit scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=False,
        window=False,
        causal_cross=False,
        complexity="O(N·K·D) + O(N^2·n_d)",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=True,
        gqa=False,
        permutation_equivariant=False,
        importance=True,
        family="sparse",
        paper="Wei et al. 2023, Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient ViTs (CVPR)",
    )

    @classmethod
    def benchmark_kwargs(cls, n: int) -> dict[str, Any]:
        """Token projections sized for sequence length ``n`` (benchmarks build at each N)."""
        return {"num_tokens": n}

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_tokens: int = 197,
        keep_rate: float = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        basis_topk: int = 8,
        basis_threshold: float = 0.02,
        num_dense_queries: int = 1,
        predictor_scale: float | None = None,
        recon_weight: float = 0.01,
        reconstruct: bool = False,
        selection: str = "tokens",
        block_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        where = "sparsifiner"
        if selection not in ("tokens", "blocks"):
            raise ValueError(f"{where}: selection must be 'tokens' or 'blocks', got {selection!r}")
        self.selection = selection
        self.block_size = positive_int(block_size, f"{where}: block_size")
        self.num_tokens = positive_int(num_tokens, f"{where}: num_tokens")
        self.keep_rate = fraction(keep_rate, f"{where}: keep_rate")
        n_d = max(1, self.num_tokens // positive_int(reduce_n_factor, f"{where}: reduce_n_factor"))
        c = max(1, head_dim // positive_int(reduce_c_factor, f"{where}: reduce_c_factor"))
        self.basis_topk = positive_int(basis_topk, f"{where}: basis_topk")
        self.basis_threshold = float(basis_threshold)
        self.num_dense_queries = non_negative_int(num_dense_queries, f"{where}: num_dense_queries")
        ps = optional_positive_number(predictor_scale, f"{self.name}: predictor_scale")
        self.predictor_scale = num_heads**-0.5 if ps is None else ps
        self.recon_weight = float(recon_weight)
        self.reconstruct = bool(reconstruct)
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self.q_reduce = nn.Linear(head_dim, c)
        self.k_reduce = nn.Linear(head_dim, c)
        self.down = nn.Parameter(torch.empty(self.num_tokens, n_d))
        self.up = nn.Parameter(torch.empty(self.num_tokens, n_d))
        nn.init.trunc_normal_(self.down, std=0.02)
        nn.init.trunc_normal_(self.up, std=0.02)

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"num_tokens": 64, "keep_rate": 0.5, "reduce_n_factor": 4, "basis_topk": 4}

    def predictor(
        self,
        q: Tensor,
        k: Tensor,
        *,
        sparse_basis: bool,
        causal: bool = False,
        key_valid: Tensor | None = None,
        block_pooled: int | None = None,
    ) -> RowsFn:
        """The predictor's A^ as ``rows(s, e)`` -> (B, H, e-s, N), or its block means with
        ``block_pooled`` (see :func:`sparsifiner_predictor`)."""
        n = q.shape[2]
        if n > self.num_tokens:
            raise ValueError(f"sparsifiner: sequence length N={n} exceeds num_tokens={self.num_tokens}")
        return sparsifiner_predictor(
            q,
            k,
            (self.q_reduce.weight, self.q_reduce.bias),
            (self.k_reduce.weight, self.k_reduce.bias),
            self.down,
            self.up,
            predictor_scale=self.predictor_scale,
            sparse_basis=sparse_basis,
            basis_topk=self.basis_topk,
            basis_threshold=self.basis_threshold,
            causal=causal,
            key_valid=key_valid,
            block_pooled=block_pooled,
        )

    def approx_attention(
        self, q: Tensor, k: Tensor, *, sparse_basis: bool, causal: bool = False, key_valid: Tensor | None = None
    ) -> Tensor:
        """The predictor's A^ (B, H, N, N), in float32 (float64 for float64 inputs).

        ``key_valid`` (B, N) leaves padding keys out of the token down-projection; with
        ``causal`` query i uses the down-projection of keys j <= i only (a prefix sum), so the
        predicted mask never depends on later tokens.
        """
        return self.predictor(q, k, sparse_basis=sparse_basis, causal=causal, key_valid=key_valid)(0, q.shape[2])

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
        n, d = q.shape[2], q.shape[3]
        if n > self.num_tokens:
            raise ValueError(f"sparsifiner: sequence length N={n} exceeds num_tokens={self.num_tokens}")
        scale = d**-0.5 if self.scale is None else self.scale
        allowed = mask.dense()
        aux = None
        if self.training:
            a_raw = self.predictor(q, k, sparse_basis=False, causal=mask.causal, key_valid=mask.key_padding)
            aux = self.recon_weight * sparsifiner_recon_loss(a_raw, q, k, allowed, scale, self.num_dense_queries)
        if self.reconstruct:
            return _dense(q, k, v, mask, scale, dropout_p, need_weights, need_importance, aux)
        if self.selection == "blocks":
            return self._attend_blocks(q, k, v, mask, scale, dropout_p, need_weights, need_importance, aux)
        with torch.no_grad():
            a_hat = self.predictor(q, k, sparse_basis=True, causal=mask.causal, key_valid=mask.key_padding)
        out, w = sparsifiner_attention(
            q,
            k,
            v,
            a_hat,
            keep_rate=self.keep_rate,
            allowed=allowed,
            causal=mask.causal,
            num_dense_queries=self.num_dense_queries,
            scale=scale,
            dropout_p=dropout_p,
            return_weights=need_weights or need_importance,
        )
        if w is None:
            return CoreOutput(out, aux_loss=aux)
        return CoreOutput.from_weights(out, w, need_weights=need_weights, need_importance=need_importance, aux_loss=aux)

    def block_layout(self, q: Tensor, k: Tensor, mask: AttentionMask) -> BlockMask:
        """``selection="blocks"``: the caller's layout restricted to the key blocks each query block keeps."""
        base = _with_caller(mask, None, (self.block_size, self.block_size))
        partial, full = base.block_states()
        with torch.no_grad():
            rows = self.predictor(
                q, k, sparse_basis=True, causal=mask.causal, key_valid=mask.key_padding, block_pooled=self.block_size
            )
            scores = rows(0, base.num_blocks[0])
            sel = sparsifiner_block_select(scores, partial | full, keep_rate=self.keep_rate)
        return base.restrict(sel)

    def _attend_blocks(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: AttentionMask,
        scale: float,
        dropout_p: float,
        need_weights: bool,
        need_importance: bool,
        aux: Tensor | None,
    ) -> CoreOutput:
        bm = self.block_layout(q, k, mask)
        n, nd = q.shape[2], min(self.num_dense_queries, q.shape[2])
        if need_weights or need_importance or dropout_p > 0:  # weights are N x M anyway: one dense mask
            allowed = bm.to_dense().expand(q.shape[0], q.shape[1], n, k.shape[2]).clone()
            if nd:
                rows = mask.dense_rows(0, nd)
                allowed[:, :, :nd] = True if rows is None else rows
            return _dense(q, k, v, allowed, scale, dropout_p, need_weights, need_importance, aux)  # type: ignore[arg-type]
        out = _run_block(q, k, v, bm, scale, False, False).out
        if nd:  # the dense (CLS) rows
            head = softmax_attention(q[:, :, :nd], k, v, mask=mask.dense_rows(0, nd), scale=scale)
            out = torch.cat([head, out[:, :, nd:]], 2)
        return CoreOutput(out, aux_loss=aux)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_tokens={self.num_tokens}, keep_rate={self.keep_rate}"


# ------------------------------------------------------------------------------------------
# SwinBERT learnable sparse mask
# ------------------------------------------------------------------------------------------


@register_variant("swinbert_mask")
class SwinBERTMaskAttention(AttentionCore):
    """SwinBERT's learnable sparse attention mask over (video) tokens.

    A parameter V (num_tokens x num_tokens) gives the soft mask ``S = I + (1 - I) ⊙ sigmoid(V)``
    over the last ``num_tokens`` tokens of the sequence (SwinBERT's [text; video] order; all
    tokens when N == num_tokens; a shorter sequence uses the leading N x N block of V; with key
    padding, the tokens before each example's last real token),
    shared by all heads and samples. Training: S enters the
    logits as the additive bias ``-mask_scale · (1 - S)`` (BERT's -10000 convention) and
    ``aux_loss = sparsity_weight · mean((1 - I) ⊙ sigmoid(V))`` (the L1 sparsity loss).
    Inference with ``hard_at_inference``: S is binarised at ``threshold`` into a BlockMask
    and attention runs on the block-sparse kernel (soft bias otherwise).

    Args:
        num_tokens: masked tokens M_v (official: 784 = 16·7·7).
        sparsity_weight: lambda of the L1 loss (official 0.5).
        mask_scale: bias magnitude (official 1e4).
        hard_at_inference, threshold: binarise in eval mode (official soft2hard, 0.5).
        block_size: BlockMask block of the binarised mask.
        init_std: V ~ N(0, init_std) (official nn.Embedding default 1).
        scale: logit scale, default head_dim**-0.5.
    """

    capabilities = Capabilities(
        causal=True,
        cross=False,
        key_padding=True,
        full_mask=True,
        block_mask=False,
        window=False,
        causal_cross=False,
        decode=False,  # the mask covers the last num_tokens tokens: a row depends on the total length
        complexity="O(N^2) train, O(N·density·N) eval",
        exact=False,
        has_weights=True,
        trainable=True,
        attn_dropout=False,
        gqa=True,
        permutation_equivariant=False,
        importance=True,
        family="sparse",
        paper="Lin et al. 2022, SwinBERT: End-to-End Transformers with Sparse Attention for Video Captioning (CVPR)",
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_tokens: int = 784,
        sparsity_weight: float = 0.5,
        mask_scale: float = 1e4,
        hard_at_inference: bool = True,
        threshold: float = 0.5,
        block_size: int = 64,
        init_std: float = 1.0,
        scale: float | None = None,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim)
        where = "swinbert_mask"
        self.num_tokens = positive_int(num_tokens, f"{where}: num_tokens")
        self.sparsity_weight = float(sparsity_weight)
        self.mask_scale = positive_number(mask_scale, f"{self.name}: mask_scale")
        self.hard_at_inference = bool(hard_at_inference)
        self.threshold = float(threshold)
        self.block_size = positive_int(block_size, f"{where}: block_size")
        self.scale = optional_positive_number(scale, f"{self.name}: scale")
        self.mask_logits = nn.Parameter(torch.randn(self.num_tokens, self.num_tokens) * float(init_std))
        self._hard: tuple[tuple[Any, ...], BlockMask] | None = None

    @classmethod
    def conformance_kwargs(cls) -> dict[str, Any]:
        return {"num_tokens": 8, "block_size": 4}

    def soft_mask(self, size: int | None = None) -> Tensor:
        """S = I + (1 - I) ⊙ sigmoid(V), (size, size) with size <= num_tokens (the leading block of V)."""
        return swinbert_soft_mask(self.mask_logits, size)

    def sparsity_loss(self) -> Tensor:
        """sparsity_weight · mean((1 - I) ⊙ sigmoid(V))."""
        return self.sparsity_weight * swinbert_sparsity(self.mask_logits)

    def hard_block_mask(self, n: int, device: torch.device, ends: Tensor | None = None) -> BlockMask:
        """The binarised mask (S >= threshold) embedded in (N, N), as a BlockMask (cached); with
        ``ends`` (B,) per example, ending at its last real token (see :func:`swinbert_hard_mask`)."""
        shape = None if ends is None else tuple(ends.tolist())
        key = (n, str(device), self.mask_logits._version, self.mask_logits.data_ptr(), self.threshold, shape)
        if self._hard is None or self._hard[0] != key:
            dense = swinbert_hard_mask(self.mask_logits, n, self.threshold, device, ends)
            self._hard = (key, BlockMask.from_dense(dense, self.block_size))
        return self._hard[1]

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
        b, n, d = q.shape[0], q.shape[2], q.shape[3]
        scale = d**-0.5 if self.scale is None else self.scale
        kp = mask.key_padding  # the mask covers the tokens before each example's last real one
        ends = None if kp is None else sequence_extent(kp, n, b, q.device)
        if not self.training and self.hard_at_inference:
            bm = _with_caller(mask, self.hard_block_mask(n, q.device, ends), (self.block_size, self.block_size))
            return _run_block(q, k, v, bm, scale, need_weights, need_importance)
        soft = self.soft_mask(min(n, self.num_tokens))
        out, w = swinbert_soft_attention(
            q, k, v, soft, mask_scale=self.mask_scale, allowed=mask.dense(), scale=scale, ends=ends
        )
        aux = self.sparsity_loss() if self.training else None
        return CoreOutput.from_weights(out, w, need_weights=need_weights, need_importance=need_importance, aux_loss=aux)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_tokens={self.num_tokens}, hard_at_inference={self.hard_at_inference}"
