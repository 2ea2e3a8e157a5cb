"""Vision building blocks beside the transformer block: positions on the grid, class-attention, MLP-only blocks.

* :class:`PEG` - Conditional Positional Encodings' generator (Chu et al., ICLR 2023,
  arXiv:2102.10882): ``X + DWConv_3x3(X)`` on the patch tokens after the first block, instead
  of absolute positions; translation-equivariant, any resolution.
* :class:`ClassAttentionBlock` - CaiT's class-attention block (Touvron et al., "Going deeper with
  Image Transformers", ICCV 2021, arXiv:2103.17239) and PatchConvNet's attention-based pooling
  (Touvron et al., arXiv:2112.13692): class token(s) attend to ``[cls; patches]`` (or to the
  patches only, one token per class), patches are not updated. The attention runs through
  ``context=``, so every variant with cross-attention serves.
* :class:`GatedClassAttention` - gated class-attention for exemplar-free continual learning
  (Cotogni et al. 2022, arXiv:2211.12292): per-task class tokens, heads and HAT-style gates on
  one class-attention block (:mod:`attnlib.functional.gating`).
* :class:`MLPBlock` - LIT's attention-free early blocks (Pan et al., "Less is More: Pay Less
  Attention in Vision Transformers", AAAI 2022, arXiv:2105.14217): ``x + MLP(LN(x))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attnlib.errors import UnsupportedError
from attnlib.functional.gating import (
    gate_gradient_factor,
    gate_linear,
    gate_regularizer,
    hat_embedding_grad,
    hat_gate,
)
from attnlib.functional.grid import peg
from attnlib.models.blocks import AttentionConfig, DropPath, FeedForward, make_attention

__all__ = ["PEG", "ClassAttentionBlock", "GatedClassAttention", "MLPBlock"]


class PEG(nn.Module):
    """Positional Encoding Generator: patch tokens plus a depthwise k x k convolution of them.

    ``forward(x (B, P + H*W, C), grid (H, W), num_prefix_tokens=P) -> (B, P + H*W, C)``; the P
    prefix tokens pass unchanged. Zero padding (the source of the absolute-position signal).
    Init as the official Twins/CPVT code: weights normal(0, sqrt(2 / (k*k))), bias 0.

    Args:
        dim: channels C.
        kernel_size: k (odd; 3 in the paper).
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"PEG kernel_size must be an odd positive int, got {kernel_size!r}")
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, sqrt(2 / fan_out)) with fan_out = k*k*C/groups = k*k; zero bias."""
        k = self.proj.kernel_size[0]
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / (k * k)))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        return peg(x, self.proj.weight, self.proj.bias, grid, num_prefix_tokens)


class MLPBlock(nn.Module):
    """An attention-free block (LIT's early stages): ``x + drop_path(MLP(LN(x)))``, one token at a time.

    Takes the keyword arguments of :class:`attnlib.models.TransformerBlock.forward` (mask,
    positions, geometry, ...) and ignores them: there is no token mixing. It has no attention, so
    it reports no importance.

    Shapes: ``forward(x (B, N, dim)) -> (B, N, dim)``; ``forward_groups(x (T, dim), groups) -> (T, dim)``.
    """

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if kwargs.get("return_importance") or kwargs.get("cache") is not None:
            raise UnsupportedError("an MLP-only block has no attention: no importance, no decoding cache")
        return x + self.drop_path(self.mlp(self.norm(x)))

    def forward_groups(self, x: Tensor, groups: list[tuple[int, int]], **kwargs: Any) -> Tensor:
        """Per token, so the packed layout changes nothing: (T, dim) -> (T, dim)."""
        return self.forward(x, **kwargs)


class ClassAttentionBlock(nn.Module):
    """Class-attention block (CaiT) / learned aggregation (PatchConvNet): updates the class tokens only.

    ``u = [cls; patches]`` (or the patches alone with ``include_cls=False``, PatchConvNet's
    multi-class mode); ``cls <- cls + drop_path(g1 * Attn(LN(cls), context=LN(u)))`` and
    ``cls <- cls + drop_path(g2 * MLP(LN(cls)))``. ``g1``, ``g2`` are LayerScale vectors
    initialised to ``init_values`` (None: no LayerScale). The attention is the variant of
    ``attention`` through ``context=`` (the variant needs ``cross``; with a patch mask also
    ``key_padding``).

    Args:
        dim, num_heads: width and heads.
        attention: attention config.
        mlp_ratio: MLP hidden width / dim.
        init_values: LayerScale init (CaiT 1e-5, PatchConvNet 1e-4 / 1e-6) or None.
        include_cls: the class tokens are keys too (CaiT, single-token PatchConvNet).
        dropout, attn_dropout, drop_path: as in :class:`attnlib.models.TransformerBlock`.

    Shapes: ``forward(cls (B, K, dim), patches (B, N, dim), mask=None | (B, N) bool) -> (B, K, dim)``;
    ``last_weights`` (B, H, K, K + N or N) keeps the last attention weights where the variant
    has them and ``keep_weights`` is set.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        include_cls: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        model: str = "ClassAttentionBlock",
    ) -> None:
        super().__init__()
        self.include_cls = include_cls
        self.norm1 = nn.LayerNorm(dim)
        self.attn = make_attention(
            attention,
            dim=dim,
            num_heads=num_heads,
            needs={"cross": "class-attention: the class tokens attend to the patch tokens through context="},
            model=model,
            dropout=attn_dropout,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        self.init_values = init_values
        self.gamma1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.gamma2 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.keep_weights = False
        self.last_weights: Tensor | None = None

    def reset_parameters(self) -> None:
        """LayerScale back to ``init_values`` (after a model-wide weight init)."""
        if self.gamma1 is not None and self.gamma2 is not None:
            nn.init.constant_(self.gamma1, float(self.init_values))  # type: ignore[arg-type]
            nn.init.constant_(self.gamma2, float(self.init_values))  # type: ignore[arg-type]

    def context(self, cls: Tensor, patches: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The keys/values ``LN([cls; patches])`` (B, M, dim) and their key padding (B, M) | None."""
        u = torch.cat([cls, patches], 1) if self.include_cls else patches
        if mask is not None and self.include_cls:
            mask = torch.cat([mask.new_ones(mask.shape[0], cls.shape[1]), mask], 1)
        return self.norm1(u), mask

    def forward(self, cls: Tensor, patches: Tensor, mask: Tensor | None = None) -> Tensor:
        ctx, kp = self.context(cls, patches, mask)
        if self.keep_weights:
            a, extras = self.attn(self.norm1(cls), ctx, key_padding_mask=kp, return_extras=True)
            self.last_weights = None if extras.weights is None else extras.weights.detach()
        else:
            a = self.attn(self.norm1(cls), ctx, key_padding_mask=kp)
        a = self.drop(a)
        cls = cls + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(cls))
        return cls + self.drop_path(m if self.gamma2 is None else self.gamma2 * m)


class GatedClassAttention(nn.Module):
    """Gated class-attention (GCAB): per-task class tokens through one class-attention block with task gates.

    Task t has a class token, a linear head over its own classes, and gate embeddings ``e0_t``
    (dim) and ``e2_t`` (MLP hidden width). Its gates ``g0 = sigmoid(s e0_t)``, ``g2 = sigmoid(s e2_t)``
    mask the shared block as in the official code: ``q = (W_q (x_cls g0)) g0``,
    ``k = (W_k (z g0)) g0``, ``v = W_v (z g0)``, the attention output gated by g0 before and after
    the output projection; the MLP's input by g0, hidden by g2, output by g0. Applied as masked
    weights (:func:`attnlib.functional.gating.gate_linear`) through :func:`torch.func.functional_call`,
    so the block's attention may be any variant with cross-attention.

    Tasks ``0 .. task`` are active: the forward runs every active task's token with its own gates
    and returns their logits side by side (B, classes of tasks 0..task) - no task id at inference.
    Earlier tasks use binarised gates; the current task soft gates at ``scale`` (anneal it per
    batch with :func:`attnlib.functional.gating.gate_scale` while training; ``s_max`` otherwise).
    Training helpers: :meth:`regularizer`, :meth:`mask_gradients`, :meth:`clamp_embeddings`,
    :meth:`next_task`.

    Args:
        dim, num_heads, attention, mlp_ratio, dropout, attn_dropout, drop_path: of the block.
        classes_per_task: the number of classes of each task.
        s_max: the gate scale at the end of each epoch and at inference (800 in GCAB).
        thres_cosh, thres_emb: clamps of the embedding-gradient compensation and of the
            embeddings themselves (50 and 6 in GCAB).

    Shapes: ``forward(patches (B, N, dim), mask=None | (B, N)) -> (B, sum(classes_per_task[:task + 1]))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: AttentionConfig,
        *,
        classes_per_task: list[int],
        mlp_ratio: float = 4.0,
        s_max: float = 800.0,
        thres_cosh: float = 50.0,
        thres_emb: float = 6.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not classes_per_task or any(not isinstance(c, int) or c <= 0 for c in classes_per_task):
            raise ValueError(f"classes_per_task must be a non-empty list of positive ints, got {classes_per_task!r}")
        self.classes_per_task = list(classes_per_task)
        self.num_tasks = len(classes_per_task)
        self.block = ClassAttentionBlock(
            dim,
            num_heads,
            attention,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            drop_path=drop_path,
            model="GatedClassAttention",
        )
        if self.block.attn.num_kv_heads != num_heads:
            raise UnsupportedError("GatedClassAttention gates the key projection per channel: no grouped-query heads")
        hidden = self.block.mlp.fc2.in_features
        self.cls_tokens = nn.Parameter(torch.zeros(self.num_tasks, dim))
        self.e0 = nn.Parameter(torch.zeros(self.num_tasks, dim))
        self.e2 = nn.Parameter(torch.zeros(self.num_tasks, hidden))
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in classes_per_task)
        self.norm = nn.LayerNorm(dim)
        self.s_max, self.thres_cosh, self.thres_emb = float(s_max), float(thres_cosh), float(thres_emb)
        self.scale = self.s_max
        # m_pre: the elementwise max of the earlier tasks' binary gates (zeros: every channel free)
        self.register_buffer("taken0", torch.zeros(dim))
        self.register_buffer("taken2", torch.zeros(hidden))
        self.register_buffer("current_task", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    @property
    def task(self) -> int:
        """The task being trained (tasks 0..task are active)."""
        return int(self.current_task)

    def reset_parameters(self) -> None:
        """Tokens trunc-normal(0.02); gate embeddings normal(0, 1) (``nn.Embedding``'s init, as GCAB)."""
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        nn.init.normal_(self.e0)
        nn.init.normal_(self.e2)

    def gates(self, t: int) -> tuple[Tensor, Tensor]:
        """(g0 (dim,), g2 (hidden,)) of task t: binary for earlier tasks, soft at ``scale`` for the current one."""
        binary = t < self.task
        return hat_gate(self.e0[t], self.scale, binary=binary), hat_gate(self.e2[t], self.scale, binary=binary)

    def gated_parameters(self, g0: Tensor, g2: Tensor) -> dict[str, Tensor]:
        """The block's gated projections as masked weights (names as in ``self.block``)."""
        attn, mlp = self.block.attn, self.block.mlp
        c = attn.dim
        w, b = attn.in_proj.weight, attn.in_proj.bias
        bq, bk, bv = (None, None, None) if b is None else (b[:c], b[c : 2 * c], b[2 * c :])
        wq, bq = gate_linear(w[:c], bq, g0, g0)
        wk, bk = gate_linear(w[c : 2 * c], bk, g0, g0)
        wv, bv = gate_linear(w[2 * c :], bv, None, g0)
        out: dict[str, Tensor] = {"attn.in_proj.weight": torch.cat([wq, wk, wv])}
        if b is not None:
            out["attn.in_proj.bias"] = torch.cat([bq, bk, bv])  # type: ignore[list-item]
        out["attn.out_proj.weight"], out["attn.out_proj.bias"] = gate_linear(  # type: ignore[assignment]
            attn.out_proj.weight, attn.out_proj.bias, g0, g0
        )
        out["mlp.fc1.weight"], out["mlp.fc1.bias"] = gate_linear(mlp.fc1.weight, mlp.fc1.bias, None, g0)  # type: ignore[assignment]
        out["mlp.fc2.weight"], out["mlp.fc2.bias"] = gate_linear(mlp.fc2.weight, mlp.fc2.bias, g0, g2)  # type: ignore[assignment]
        return out

    def forward(self, patches: Tensor, mask: Tensor | None = None) -> Tensor:
        logits = []
        b = patches.shape[0]
        for t in range(self.task + 1):
            g0, g2 = self.gates(t)
            cls = self.cls_tokens[t].expand(b, 1, -1)
            y = functional_call(self.block, self.gated_parameters(g0, g2), (cls, patches, mask), strict=False)
            logits.append(self.heads[t](self.norm(y[:, 0])))
        return torch.cat(logits, -1)

    # -- continual-learning training helpers ------------------------------------------------------

    def regularizer(self) -> Tensor:
        """GCAB's gate-sparsity term of the current task (multiply by lambda, 0.05 in GCAB)."""
        g0, g2 = self.gates(self.task)
        return gate_regularizer([g0, g2], [self.taken0, self.taken2])

    def mask_gradients(self) -> None:
        """After ``backward``: freeze what earlier tasks use and compensate the embeddings' gradients.

        Gradients of the gated weights are multiplied by ``1 - outer(m_out, m_in)`` of the channels
        earlier tasks took; earlier tasks' tokens, heads and gate embeddings get no gradient; the
        current task's embedding gradients are compensated for the annealed scale (HAT).
        """
        for p, t in ((self.cls_tokens, self.task), (self.e0, self.task), (self.e2, self.task)):
            if p.grad is not None:
                p.grad[:t] = 0
        for head in self.heads[: self.task]:
            for p in head.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        t = self.task
        for e in (self.e0, self.e2):
            if e.grad is not None:
                e.grad[t] = hat_embedding_grad(e[t].detach(), e.grad[t], self.scale, self.s_max, self.thres_cosh)
        m0, m2 = self.taken0, self.taken2
        attn, mlp = self.block.attn, self.block.mlp
        rows = {"in_proj": gate_gradient_factor(m0.repeat(3), m0), "out_proj": gate_gradient_factor(m0, m0)}
        masks = [
            (attn.in_proj.weight, rows["in_proj"]),
            (attn.out_proj.weight, rows["out_proj"]),
            (mlp.fc1.weight, gate_gradient_factor(m2, m0)),
            (mlp.fc2.weight, gate_gradient_factor(m0, m2)),
            (attn.out_proj.bias, gate_gradient_factor(m0)),
            (mlp.fc1.bias, gate_gradient_factor(m2)),
            (mlp.fc2.bias, gate_gradient_factor(m0)),
        ]
        if attn.in_proj.bias is not None:
            masks.append((attn.in_proj.bias, gate_gradient_factor(m0.repeat(3))))
        for p, factor in masks:
            if p.grad is not None:
                p.grad.mul_(factor.to(p.grad.dtype))

    @torch.no_grad()
    def clamp_embeddings(self) -> None:
        """After the optimizer step: embeddings clamped to ``[-thres_emb, thres_emb]``."""
        self.e0.clamp_(-self.thres_emb, self.thres_emb)
        self.e2.clamp_(-self.thres_emb, self.thres_emb)

    @torch.no_grad()
    def next_task(self) -> None:
        """Close the current task: its binary gates join the taken channels; the next task becomes current."""
        if self.task + 1 >= self.num_tasks:
            raise ValueError(f"next_task: all {self.num_tasks} tasks are already active")
        self.taken0.copy_(torch.maximum(self.taken0, hat_gate(self.e0[self.task], self.s_max, binary=True)))
        self.taken2.copy_(torch.maximum(self.taken2, hat_gate(self.e2[self.task], self.s_max, binary=True)))
        self.current_task += 1
        self.scale = self.s_max

    def extra_repr(self) -> str:
        return f"classes_per_task={self.classes_per_task}, task={self.task}, s_max={self.s_max}"
