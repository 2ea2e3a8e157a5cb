"""Figures of attention (matplotlib, imported when a function is called; the Agg backend).

One figure per question, each written to a PNG and closed:

* :func:`plot_image_attention` - where does each layer's class token (or each head) look in the image?
* :func:`plot_image_rollout` - what does the output draw on, through all layers (rollout overlay)?
* :func:`plot_token_attention` - attention maps of a token sequence, layers x heads.
* :func:`plot_matrix` - one heat map (e.g. rollout of a sequence, head importance).
* :func:`plot_entropy_curves` - head entropy over training (from ``metrics.csv``).
* :func:`plot_layer_heads` - a per-head quantity by layer (mean attention distance, entropy).

Attention over an image is drawn over the image in grey: bright and opaque where a patch gets
much attention (relative to the panel's range), transparent where it gets little. Figures use
matplotlib's constrained layout; titles are wrapped to the figure's width, and a heat map stays
within about 8 x 7 inches however many rows it has.

Inputs are numpy arrays or tensors (moved to the CPU); nothing here computes attention.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "plot_entropy_curves",
    "plot_image_attention",
    "plot_image_rollout",
    "plot_layer_heads",
    "plot_matrix",
    "plot_token_attention",
]

_CMAP = "magma"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _figure(plt: Any, rows: int, cols: int, size: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    """A figure of rows x cols axes (always 2-D) in constrained layout."""
    return plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained", **kw)


def _title(fig: Any, title: str, *, fontsize: float = 10) -> None:
    """The figure's title (the question it answers), wrapped to the figure's width."""
    chars = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # about 0.6 em per character
    fig.suptitle(textwrap.fill(title, chars), fontsize=fontsize)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str | None = None) -> None:
    """The image in grey with the heat map (a patch grid, stretched over it) on top: high attention
    opaque and bright, low attention transparent."""
    import matplotlib

    h, w = image.shape[-2:]
    ax.imshow(image, cmap="gray", extent=(0, w, h, 0), interpolation="nearest")
    lo, hi = float(np.nanmin(heat)), float(np.nanmax(heat))
    t = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    rgba = matplotlib.colormaps["inferno"](0.35 + 0.65 * t)
    rgba[..., 3] = 0.1 + 0.75 * t
    ax.imshow(rgba, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _image(x: Any) -> np.ndarray:
    img = _np(x)
    return img.mean(0) if img.ndim == 3 else img


def plot_image_attention(
    images: Sequence[Any], maps: Any, path: str | Path, *, columns: Sequence[str], title: str
) -> Path:
    """Attention over images: row i shows image i, then one overlay per column.

    Args:
        images: K images, (C, H, W) or (H, W).
        maps: (K, columns, gh, gw) attention per patch (e.g. the class token's row per layer).
        path: PNG to write.
        columns: the overlays' titles (e.g. "layer 1" ...).
        title: the figure title (the question it answers).
    """
    plt = _plt()
    m = _np(maps)
    k, c = m.shape[:2]
    fig, axes = _figure(plt, k, c + 1, (1.5 * (c + 1), 1.5 * k + 0.5))
    for i in range(k):
        img = _image(images[i])
        axes[i, 0].imshow(img, cmap="gray", interpolation="nearest")
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
        for j in range(c):
            _overlay(axes[i, j + 1], img, m[i, j], columns[j] if i == 0 else None)
    _title(fig, title)
    return _save(fig, path)


def plot_image_rollout(
    images: Sequence[Any], rollouts: Any, path: str | Path, *, labels: Sequence[str] | None = None, title: str
) -> Path:
    """Rollout overlays: one panel per image with its (gh, gw) rollout map on top.

    images: K images; rollouts: (K, gh, gw); labels: optional caption per image.
    """
    plt = _plt()
    r = _np(rollouts)
    k = r.shape[0]
    cols = min(k, 8)
    rows = math.ceil(k / cols)
    fig, axes = _figure(plt, rows, cols, (1.6 * cols, 1.7 * rows + 0.5))
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        _overlay(ax, _image(images[i]), r[i], labels[i] if labels else None)
    _title(fig, title)
    return _save(fig, path)


def plot_token_attention(
    weights: Sequence[Any], path: str | Path, *, tokens: Sequence[str] | None = None, title: str
) -> Path:
    """Attention maps of one sequence: rows = layers, columns = heads.

    weights: per layer (H, N, M) (one example); tokens: labels of the N = M positions (shown
    when there are at most 48).
    """
    plt = _plt()
    ws = [_np(w) for w in weights]
    layers, heads = len(ws), max(w.shape[0] for w in ws)
    fig, axes = _figure(plt, layers, heads, (2.2 * heads, 2.2 * layers + 0.5))
    for li, w in enumerate(ws):
        for h in range(heads):
            ax = axes[li, h]
            if h >= w.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(w[h], cmap=_CMAP, vmin=0.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    if tokens is not None and len(tokens) <= 48:
        ax = axes[-1, 0]
        ax.set_xticks(range(len(tokens)))
        ax.set_xticklabels(tokens, fontsize=4, rotation=90)
    _title(fig, title)
    return _save(fig, path)


def plot_matrix(
    matrix: Any,
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    annotate: bool = False,
    cmap: str = _CMAP,
    xticks: Sequence[str] | None = None,
    yticks: Sequence[str] | None = None,
) -> Path:
    """One heat map with a colour bar (e.g. head importance: layers x heads; annotate prints values)."""
    plt = _plt()
    m = _np(matrix)
    rows, cols = m.shape
    width = min(8.0, max(4.0, 0.55 * cols + 1.5))
    fig, axes = _figure(plt, 1, 1, (width, min(7.0, max(2.5, 0.45 * rows + 1.2))))
    ax = axes[0, 0]
    im = ax.imshow(m, cmap=cmap, interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    _title(fig, title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)))
        ax.set_xticklabels(xticks, fontsize=7, rotation=90 if len(xticks) > 12 else 0)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)))
        ax.set_yticklabels(yticks, fontsize=7)
    if annotate and m.size <= 256:
        hi = np.nanmax(m) if np.isfinite(m).any() else 0.0
        for (i, j), val in np.ndenumerate(m):
            if np.isfinite(val):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if val > 0.6 * hi else "white")  # fmt: skip
    return _save(fig, path)


def plot_entropy_curves(curves: Mapping[int, Mapping[int, tuple[Any, Any]]], path: str | Path, *, title: str) -> Path:
    """Head entropy over training: one panel per layer, one line per head.

    curves: ``{layer: {head: (steps, entropies)}}``.
    """
    plt = _plt()
    layers = sorted(curves)
    cols = min(len(layers), 4)
    rows = math.ceil(len(layers) / cols)
    fig, axes = _figure(plt, rows, cols, (3.2 * cols, 2.6 * rows + 0.4), sharey=True)
    for ax, layer in zip(axes.flat, layers):
        for head in sorted(curves[layer]):
            steps, ent = curves[layer][head]
            ax.plot(_np(steps), _np(ent), marker="o", markersize=2.5, linewidth=1.2, label=f"head {head}")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("entropy (nats)")
    axes[0, 0].legend(fontsize=7)
    _title(fig, title)
    return _save(fig, path)


def plot_layer_heads(values: Any, path: str | Path, *, title: str, ylabel: str) -> Path:
    """A per-head quantity by layer: values (L, H) -> one dot per head at each layer, the layer mean as a line."""
    plt = _plt()
    v = _np(values)
    fig, axes = _figure(plt, 1, 1, (5.0, 3.4))
    ax = axes[0, 0]
    for h in range(v.shape[1]):
        ax.scatter(np.arange(v.shape[0]), v[:, h], s=18, alpha=0.8, label=f"head {h}")
    ax.plot(np.arange(v.shape[0]), np.nanmean(v, 1), color="black", linewidth=1, label="mean")
    ax.set_xticks(range(v.shape[0]))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    _title(fig, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)
