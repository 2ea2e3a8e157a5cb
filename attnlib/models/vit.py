"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Patch embedding (a strided convolution), pre-norm blocks with stochastic depth and a linear
head; the attention is any registered variant, given as a config. Options beside the plain
ViT (see :class:`ViT`; the blocks are in :mod:`attnlib.models.vision`):

* positions ``pos``: learned absolute (default), a PEG after the first block (conditional
  positional encodings), GTA's 2-D representations in every attention, or none;
* pooling ``pool``: class token, mean, CaiT class-attention, PatchConvNet attention pooling,
  gated class-attention (continual learning);
* LIT's attention-free early blocks (``mlp_only_blocks``); its deformable token merging is the
  ``dtm`` pruner (:mod:`attnlib.pruning`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlib._config import to_plain_dict
from attnlib.errors import UnsupportedError
from attnlib.functional.gta import Geometry, grid_so2
from attnlib.models.blocks import AttentionConfig, TransformerBlock, attention_dict, init_weights, make_pruning
from attnlib.models.ragged import LengthGroups, group_by_length
from attnlib.models.vision import PEG, ClassAttentionBlock, GatedClassAttention, MLPBlock
from attnlib.positional import RotaryPositions
from attnlib.registry import get_variant

__all__ = ["POOLS", "POSITIONS", "ViT"]

POSITIONS = ("learned", "peg", "gta", "none")
"""The ViT's position schemes (``pos=``)."""

POOLS = ("cls", "mean", "cait", "attn", "gated")
"""The ViT's poolings (``pool=``)."""

# pool -> defaults of its class-attention options (None: the trunk's value)
_CA_DEFAULTS: dict[str, dict[str, Any]] = {
    "cait": {"depth": 2, "num_heads": None, "mlp_ratio": None, "init_values": 1e-5, "attention": None},
    "attn": {"depth": 1, "num_heads": 1, "mlp_ratio": 3.0, "init_values": 1e-4, "attention": None, "multiclass": False},
    "gated": {"num_heads": None, "mlp_ratio": None, "attention": None, "num_tasks": 2, "s_max": 800.0},
}
_POS_DEFAULTS: dict[str, dict[str, Any]] = {
    "peg": {"kernel_size": 3, "layers": [0]},
    "gta": {"num_freqs": None, "max_freq": 1.0, "v_transform": True, "coord_scale": None},
}


def _options(given: Any, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``defaults`` updated by ``given`` (None / mapping); unknown keys raise ValueError."""
    data = {} if given is None else to_plain_dict(given, what=what)
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **data}


def _with_prefix(attention: AttentionConfig, prefix: int) -> dict[str, Any]:
    """The attention config with ``num_prefix_tokens`` set to the model's where the variant takes that
    option (the grid-aware variants, e.g. ``coat``) and the config does not set it."""
    data = attention_dict(attention)
    cls = get_variant(data["variant"])
    if "num_prefix_tokens" in inspect.signature(cls.__init__).parameters:
        data.setdefault("num_prefix_tokens", prefix)
    return data


def _pair(x: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    t = (x, x) if isinstance(x, int) else tuple(x)
    if len(t) != 2 or any(not isinstance(v, int) or v <= 0 for v in t):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {x!r}")
    return t  # type: ignore[return-value]


class ViT(nn.Module):
    """Vision Transformer classifier.

    Args:
        attention: attention config, e.g. ``{"variant": "softmax"}``. Variants that take a
            ``num_prefix_tokens`` option (the grid-aware ``coat``) get the model's count (the
            class token) unless the config sets it.
        img_size: image (H, W) or side; must be divisible by ``patch_size``.
        patch_size: patch (P_h, P_w) or side.
        in_chans: image channels C.
        num_classes: classes K.
        dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        pool: how the class is read out (:data:`POOLS`):

            * ``"cls"``: a class token in front of the patches from the start;
            * ``"mean"``: the mean of the patch tokens;
            * ``"cait"``: CaiT class-attention - a class token inserted after the blocks, updated
              by ``depth`` (2) class-attention blocks with LayerScale (1e-5) that attend to
              ``[cls; patches]`` (patches frozen);
            * ``"attn"``: PatchConvNet's attention-based pooling - one such block, 1 head, MLP
              ratio 3, LayerScale 1e-4; ``multiclass=True`` gives one token per class attending
              to the patches only, each with its own linear head;
            * ``"gated"``: gated class-attention (GCAB) for class-incremental learning - the
              classes split into ``num_tasks`` tasks, each with its own class token, head and
              gates on one class-attention block (:class:`attnlib.models.vision.GatedClassAttention`,
              reachable as ``model.pool_head``); the logits of the active tasks only.

            The class-attention blocks use ``context=``: their variant (``class_attention.attention``,
            default the blocks') needs cross-attention.
        class_attention: options of the class-attention poolings, overriding the defaults above:
            ``depth``, ``num_heads``, ``mlp_ratio``, ``init_values`` (LayerScale, None = off),
            ``attention`` (a config), ``multiclass`` (attn), ``num_tasks``, ``s_max`` (gated).
        pos: positions (:data:`POSITIONS`):

            * ``"learned"``: learned absolute position embeddings (interpolated bicubically to
              other grids with ``dynamic_img_size``);
            * ``"peg"``: conditional positional encodings - a PEG (``x + DWConv_3x3(x)`` on the
              patch grid) after block 0, no absolute positions;
            * ``"gta"``: GTA - every attention gets the so2 representations of the 2-D patch
              positions (:func:`attnlib.functional.gta.grid_so2`; the class token the identity);
            * ``"none"``.
        pos_options: ``peg``: ``kernel_size`` (3), ``layers`` ([0], the blocks a PEG follows);
            ``gta``: ``num_freqs`` (default head_dim // 4: every channel), ``max_freq`` (1.0),
            ``v_transform`` (True), ``coord_scale`` (None = 1 / grid side, coordinates in [0, 1);
            a number fixes the coordinate step at any resolution).
        mlp_only_blocks: LIT - the first this many blocks are attention-free MLP blocks.
        dynamic_img_size: accept any image size divisible by the patch size (the learned
            positions interpolated, the other schemes as they are).
        drop_path: stochastic depth rate, linearly increasing over the blocks to this value.
        dropout: dropout on embeddings and residual branches; attn_dropout: in the attention.
        rope: rotary positions inside the attention (1-D over the patch sequence) in addition
            to ``pos``.
        pruning: token-pruning config (:mod:`attnlib.pruning`), e.g. ``{"name": "topk",
            "keep_ratio": 0.5, "layers": [1]}``: after each listed block the pruner drops tokens
            (the class token is protected by default); later blocks run on the kept tokens.
            ``last_kept_index`` then holds the original positions of the final tokens (B, N')
            (-1 for synthesised ones). ``{"name": "dtm"}`` merges the grid 2x2 (LIT).
        ragged: how rows that keep different numbers of tokens run the later blocks in eval:
            ``"groups"`` (default) packs the real tokens and runs the attention once per distinct
            length on unpadded rows (:mod:`attnlib.models.ragged`; no padding computed, each image
            gets exactly its own-batch result); ``"pad"`` runs one padded batch with a key-padding
            mask (the longest row's cost for every row). Training always pads (stochastic depth
            and the pruners' training modes work on whole rows).
        init: weight initialisation, "gpt2" (truncated normal, std 0.02) or "fan_in" (scaled by
            the width), see :func:`attnlib.models.blocks.init_weights`.
        sigma_reparam: sigmaReparam (Zhai et al. 2023) on every Linear and the patch-embedding
            convolution (attention q/k/v slices and output, MLP, head), see
            :func:`attnlib.modifiers.apply_sigma_reparam`.

    Shapes: ``forward(images (B, C, H, W), patch_mask=None | (B, num_patches) bool) -> (B, K)``.
    ``patch_mask`` marks real patches (True) for variable-size images padded to ``img_size``.
    The PEG's convolution (``pos_emb_generator``) is left out of weight decay like the other
    position parameters.
    """

    def __init__(
        self,
        *,
        attention: AttentionConfig,
        img_size: int | tuple[int, int] = 8,
        patch_size: int | tuple[int, int] = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        class_attention: Any = None,
        pos: str = "learned",
        pos_options: Any = None,
        mlp_only_blocks: int = 0,
        dynamic_img_size: bool = False,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        rope: bool = False,
        pruning: Any = None,
        ragged: str = "groups",
        init: str = "gpt2",
        sigma_reparam: bool = False,
    ) -> None:
        super().__init__()
        if ragged not in ("groups", "pad"):
            raise ValueError(f"ragged must be 'groups' or 'pad', got {ragged!r}")
        self.ragged = ragged
        ih, iw = _pair(img_size, "img_size")
        ph, pw = _pair(patch_size, "patch_size")
        if ih % ph or iw % pw:
            raise ValueError(f"img_size {(ih, iw)} must be divisible by patch_size {(ph, pw)}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
        if (
            isinstance(mlp_only_blocks, bool)
            or not isinstance(mlp_only_blocks, int)
            or not 0 <= mlp_only_blocks <= depth
        ):
            raise ValueError(f"mlp_only_blocks must be an int in [0, depth={depth}], got {mlp_only_blocks!r}")
        self.img_size, self.patch_size, self.in_chans = (ih, iw), (ph, pw), in_chans
        self.grid = (ih // ph, iw // pw)
        self.num_patches = self.grid[0] * self.grid[1]
        self.pool, self.pos, self.dynamic_img_size = pool, pos, bool(dynamic_img_size)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=(ph, pw), stride=(ph, pw))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.num_prefix_tokens = int(pool == "cls")
        n_tok = self.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02) if pos == "learned" else None
        self.pos_options = _options(pos_options, _POS_DEFAULTS.get(pos, {}), f"ViT pos_options for pos={pos!r}")
        self.peg_layers: list[int] = []
        self.pos_emb_generator: nn.ModuleDict | None = None
        if pos == "peg":
            layers = [int(i) for i in self.pos_options["layers"]]
            if not layers or any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"pos_options.layers must be distinct block indices in [0, {depth}), got {layers}")
            self.peg_layers = sorted(layers)
            k = self.pos_options["kernel_size"]
            self.pos_emb_generator = nn.ModuleDict({str(i): PEG(dim, k) for i in self.peg_layers})
        if pos == "gta":
            hd = dim // num_heads
            f = self.pos_options["num_freqs"]
            self.pos_options["num_freqs"] = hd // 4 if f is None else f
            if self.pos_options["num_freqs"] < 1 or 4 * self.pos_options["num_freqs"] > hd:
                raise ValueError(
                    f"pos='gta' needs 4 * num_freqs <= head_dim = {hd} channels (2 axes x 2 per frequency), "
                    f"got num_freqs={self.pos_options['num_freqs']}"
                )
        self.drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        trunk_attention = _with_prefix(attention, self.num_prefix_tokens)
        self.blocks = nn.ModuleList(
            MLPBlock(dim, mlp_ratio=mlp_ratio, dropout=dropout, drop_path=r)
            if i < mlp_only_blocks
            else TransformerBlock(
                dim,
                num_heads,
                trunk_attention,
                model="ViT",
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                drop_path=r,
                rope=rope,
            )
            for i, r in enumerate(rates)
        )
        self.mlp_only_blocks = mlp_only_blocks
        self.rope = rope
        self.pruning = make_pruning(
            pruning,
            attention,
            dim=dim,
            depth=depth,
            model="ViT",
            positional=rope or pos == "gta",
            cls_token=pool == "cls",
        )
        self._check_pruning(pos)
        self.last_kept_index: Tensor | None = None
        self.norm = nn.LayerNorm(dim)
        self.ca_blocks = nn.ModuleList()
        self.pool_head: GatedClassAttention | None = None
        self.head: nn.Module | None = None
        self.class_attention: dict[str, Any] = {}
        self._build_pool(attention, dim, num_heads, mlp_ratio, num_classes, dropout, attn_dropout, class_attention)
        init_weights(self, scheme=init)
        for mod in self.modules():
            if mod is not self and isinstance(mod, (ClassAttentionBlock, GatedClassAttention, PEG)):
                mod.reset_parameters()
        if self.pruning is not None:
            self.pruning.reset_parameters()
        if sigma_reparam:
            from attnlib.modifiers.sigma_reparam import apply_sigma_reparam

            apply_sigma_reparam(self)

    def _check_pruning(self, pos: str) -> None:
        """Build-time checks of pruning against the position scheme and the MLP-only blocks."""
        if self.pruning is None:
            return
        layers = self.pruning.layers
        if pos == "gta":
            raise UnsupportedError("ViT: pos='gta' with token pruning is not supported (the kept tokens' geometry)")
        if self.peg_layers and max(self.peg_layers) > min(layers):
            raise UnsupportedError(
                f"ViT: a PEG after block {max(self.peg_layers)} needs the full patch grid, but pruner "
                f"{self.pruning.name!r} acts after block {min(layers)}; prune after the PEG layers"
            )
        for i in layers:
            pr = self.pruning.get(i)
            if i < self.mlp_only_blocks and getattr(pr, "needs_importance", False):
                raise UnsupportedError(
                    f"ViT: pruner {self.pruning.name!r} after block {i} ranks tokens by attention, but block {i} "
                    f"is an MLP-only block (mlp_only_blocks={self.mlp_only_blocks}) with no attention"
                )

    def _build_pool(
        self,
        attention: AttentionConfig,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        dropout: float,
        attn_dropout: float,
        options: Any,
    ) -> None:
        """The head and, for the class-attention poolings, their blocks and class tokens."""
        pool = self.pool
        if pool in ("cls", "mean"):
            if options is not None:
                raise ValueError(f"class_attention options are for pool in {POOLS[2:]}, got pool={pool!r}")
            self.head = nn.Linear(dim, num_classes)
            return
        o = _options(options, _CA_DEFAULTS[pool], f"ViT class_attention for pool={pool!r}")
        o["num_heads"] = o["num_heads"] or num_heads
        o["mlp_ratio"] = o["mlp_ratio"] or mlp_ratio
        o["attention"] = attention_dict(o["attention"] or attention)
        self.class_attention = o
        if pool == "gated":
            t = o["num_tasks"]
            if not isinstance(t, int) or t < 1 or num_classes % t:
                raise ValueError(f"pool='gated': num_tasks must divide num_classes={num_classes}, got {t!r}")
            self.pool_head = GatedClassAttention(
                dim,
                o["num_heads"],
                o["attention"],
                classes_per_task=[num_classes // t] * t,
                mlp_ratio=o["mlp_ratio"],
                s_max=o["s_max"],
                dropout=dropout,
                attn_dropout=attn_dropout,
            )
            return
        multi = bool(o.get("multiclass", False))
        n_tok = num_classes if multi else 1
        self.cls_token = nn.Parameter(torch.zeros(1, n_tok, dim))
        self.ca_blocks = nn.ModuleList(
            ClassAttentionBlock(
                dim,
                o["num_heads"],
                o["attention"],
                mlp_ratio=o["mlp_ratio"],
                init_values=o["init_values"],
                include_cls=not multi,
                dropout=dropout,
                attn_dropout=attn_dropout,
                model=f"ViT(pool={pool!r})",
            )
            for _ in range(int(o["depth"]))
        )
        if multi:  # one linear head per class token: logit_k = <w_k, x_k> + b_k
            self.head_weight = nn.Parameter(torch.zeros(num_classes, dim))
            self.head_bias = nn.Parameter(torch.zeros(num_classes))
            nn.init.trunc_normal_(self.head_weight, std=0.02)
        else:
            self.head = nn.Linear(dim, num_classes)

    # -- forward ---------------------------------------------------------------------------------

    def _grid_of(self, images: Tensor) -> tuple[int, int]:
        """Check the images; their patch grid (H', W')."""
        ok = images.dim() == 4 and images.shape[1] == self.in_chans
        if ok and tuple(images.shape[2:]) == self.img_size:
            return self.grid
        ph, pw = self.patch_size
        if not ok or not self.dynamic_img_size or images.shape[2] % ph or images.shape[3] % pw:
            any_size = " with both sides divisible by the patch size" if self.dynamic_img_size else ""
            raise ValueError(
                f"ViT expects images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}){any_size}, "
                f"got {tuple(images.shape)}"
                + ("" if self.dynamic_img_size else " (build it with dynamic_img_size=True for other sizes)")
            )
        return images.shape[2] // ph, images.shape[3] // pw

    def position_embedding(self, grid: tuple[int, int]) -> Tensor | None:
        """The learned positions for a patch grid (1, P + H'*W', dim): the table itself at the training
        grid, else its grid part resized bicubically (prefix rows kept); None unless ``pos="learned"``."""
        if self.pos_embed is None:
            return None
        if grid == self.grid:
            return self.pos_embed
        p = self.num_prefix_tokens
        table = self.pos_embed[:, p:].reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :p], table.flatten(2).transpose(1, 2)], 1)

    def geometry(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Geometry | None:
        """GTA's so2 representations of the patch positions (``pos="gta"``), else None."""
        if self.pos != "gta":
            return None
        o = self.pos_options
        blk = grid_so2(
            grid,
            o["num_freqs"],
            max_freq=o["max_freq"],
            num_prefix_tokens=self.num_prefix_tokens,
            coord_scale=o["coord_scale"],
            dtype=dtype,
            device=device,
        )
        return Geometry((blk,), bool(o["v_transform"]))

    def _after_block(self, i: int, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """The PEG after block i, if any."""
        if self.pos_emb_generator is None or str(i) not in self.pos_emb_generator:
            return x
        return self.pos_emb_generator[str(i)](x, grid, self.num_prefix_tokens)

    def tokens(self, images: Tensor, patch_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The blocks' output: images (B, C, H, W) -> tokens (B, N', dim) (before the final norm) and
        their key-padding mask (B, N') | None."""
        grid = self._grid_of(images)
        n_patches = grid[0] * grid[1]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, dim)
        b = x.shape[0]
        mask = None
        if patch_mask is not None:
            if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != (b, n_patches):
                raise ValueError(
                    f"patch_mask must be bool (B, num_patches) = ({b}, {n_patches}), "
                    f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
                )
            mask = patch_mask
        if self.pool == "cls":
            assert self.cls_token is not None
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        pos = self.position_embedding(grid)
        x = self.drop(x if pos is None else x + pos)
        if self.pruning is None:
            geometry = self.geometry(grid, x.dtype, x.device)
            kw = {} if geometry is None else {"geometry": geometry}
            for i, blk in enumerate(self.blocks):
                x = self._after_block(i, blk(x, key_padding_mask=mask, **kw), grid)
            return x, mask
        return self._pruned_blocks(x, mask, grid)

    def features(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images (B, C, H, W) -> pooled features (B, dim) ((B, K, dim) for multi-class attention pooling)."""
        if self.pool == "gated":
            raise UnsupportedError("pool='gated' reads out one feature per task inside model.pool_head; call the model")
        x, mask = self.tokens(images, patch_mask)
        if self.pool == "cls":
            return self.norm(x)[:, 0]
        if self.pool == "mean":
            x = self.norm(x)
            if mask is None:
                return x.mean(1)
            w = mask.to(x.dtype).unsqueeze(-1)
            return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        assert self.cls_token is not None
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.ca_blocks:
            cls = blk(cls, x, mask)
        cls = self.norm(cls)
        return cls if self.class_attention.get("multiclass") else cls[:, 0]

    def _pruned_blocks(self, x: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """Run the blocks with the pruners after their layers: x (B, N, dim) -> (B, N', dim), mask (B, N') | None.

        After a pruner leaves rows of different lengths, eval with ``ragged="groups"`` runs the
        next blocks on the packed real tokens (:class:`LengthGroups`) and unpacks them only for the
        next pruner and at the end. PEGs run before the first pruner (checked at build time).
        """
        assert self.pruning is not None
        n0 = x.shape[1]
        index = torch.arange(n0, device=x.device).expand(x.shape[0], n0)  # original positions
        default = [0] if self.cls_token is not None and self.pool == "cls" else []
        groups: LengthGroups | None = None  # set while x is packed (T, dim)
        # rotary positions of the kept tokens, built once per pruner and shared by the blocks after
        # it (one gather of the rotary tables); None before the first pruner (rows still 0..N-1)
        positions: RotaryPositions | None = None
        for i, blk in enumerate(self.blocks):
            pr = self.pruning.get(i)
            need_imp = pr is not None and pr.needs_importance
            query = pr.score_query if need_imp else None
            if groups is not None and query is not None:  # attention rows need the padded layout
                x, groups = groups.unpack(x), None
                positions = RotaryPositions(index) if self.rope else None
            if groups is not None:
                res = blk.forward_groups(x, groups.groups, positions=positions, return_importance=need_imp)
                if pr is None:
                    x = res  # type: ignore[assignment]
                    continue
                x, imp_p = res if need_imp else (res, None)  # type: ignore[misc]
                imp = None if imp_p is None else groups.unpack(imp_p)
                x, groups = groups.unpack(x), None
            else:
                if pr is None:
                    x = self._after_block(i, blk(x, key_padding_mask=mask, positions=positions), grid)
                    continue
                if need_imp:
                    x, imp = blk(
                        x, key_padding_mask=mask, positions=positions, return_importance=True, importance_query=query
                    )
                else:
                    x, imp = blk(x, key_padding_mask=mask, positions=positions), None
                x = self._after_block(i, x, grid)
            out = pr(x, imp, mask, self.pruning.protected(index, n0, default))
            index = torch.where(out.index >= 0, index.gather(1, out.index.clamp_min(0)), out.index)
            x, mask = out.x, out.mask
            if mask is not None and self.ragged == "groups" and not self.training and i + 1 < len(self.blocks):
                groups = group_by_length(mask)
                x = groups.pack(x)
            if self.rope:
                positions = RotaryPositions(index if groups is None else groups.pack(index))
        if groups is not None:
            x = groups.unpack(x)
        self.last_kept_index = index
        return x, mask

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images (B, C, H, W) -> class logits (B, num_classes) (pool='gated': the active tasks' classes)."""
        if self.pool == "gated":
            assert self.pool_head is not None
            x, mask = self.tokens(images, patch_mask)
            return self.pool_head(x, mask)
        f = self.features(images, patch_mask)
        if self.class_attention.get("multiclass"):
            return (f * self.head_weight).sum(-1) + self.head_bias
        assert self.head is not None
        return self.head(f)
