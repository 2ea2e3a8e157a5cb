"""The report behind ``attnlib-analyze <run dir>``: load a trained run, write figures and a summary.

:func:`load_run` rebuilds the model and the data module of a run directory written by
``attnlib-train`` (``checkpoints/last.pt`` holds the model weights and the composed config;
``metrics.csv`` and ``results.json`` sit beside it). :func:`analyze_run` then captures the
attention on a few evaluation examples and writes, into ``<run dir>/analysis`` by default:

* ``attention_maps.png`` - ViT: the class token's attention over each image, layer by layer
  (heads averaged); sequences: every layer's and head's attention map of the first example;
* ``rollout.png`` - attention rollout (Abnar & Zuidema): over the image for a ViT, as a
  token x token map for sequences;
* ``attention_distance.png`` - mean attention distance per head and layer (pixels for a ViT);
* ``head_entropy.png`` - head entropy over training, from the ``attention`` rows of
  ``metrics.csv`` (``trainer.log_attention_entropy``, on by default);
* ``head_importance.png``, ``head_ablation.png`` - gradient (Michel et al. 2019) and ablation
  head importance on evaluation batches;
* ``induction.png`` - language models: the induction-head probe on a repeated random sequence;
* ``summary.md`` - the run, the figures, and the per-head numbers behind them.

Variants without attention weights get the figures that need none (importance, entropy curves
are then absent) and a note saying what was skipped and why.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlib.analysis import plots
from attnlib.analysis.capture import capture
from attnlib.analysis.importance import ablation_head_importance, gradient_head_importance
from attnlib.analysis.measures import attention_distance, rollout
from attnlib.analysis.probes import induction_probe
from attnlib.analysis.summary import head_entropy
from attnlib.data import build_data
from attnlib.data.base import DataModule
from attnlib.models import build_model
from attnlib.models.vit import ViT
from attnlib.training.checkpoint import load_checkpoint
from attnlib.training.tasks import _to, train_loss

__all__ = ["Run", "analyze_run", "entropy_curves", "load_run"]


@dataclass
class Run:
    """A trained run: the model (eval mode), its data module, config, results and paths."""

    model: nn.Module
    data: DataModule
    config: dict[str, Any]
    step: int
    results: dict[str, Any]
    run_dir: Path
    device: torch.device


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> Run:
    """Rebuild the model of a run directory (or a checkpoint file in one) and its data module."""
    path = Path(run_dir)
    ck_path = path if path.is_file() else path / "checkpoints" / "last.pt"
    if not ck_path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {ck_path}: give a run directory written by attnlib-train (it holds checkpoints/last.pt)"
        )
    root = ck_path.parent.parent if ck_path.parent.name == "checkpoints" else ck_path.parent
    ck = load_checkpoint(ck_path, map_location="cpu")
    if not isinstance(ck, Mapping) or "model" not in ck or "config" not in ck:
        raise ValueError(f"{ck_path} is not a checkpoint written by attnlib-train (no 'model' / 'config')")
    cfg = dict(ck["config"])
    data_cfg = dict(cfg["data"])
    data_cfg.setdefault("seed", cfg.get("seed", 0))
    data = build_data(data_cfg)
    data.ensure_setup()
    dev = torch.device(device)
    model = build_model(cfg["model"], cfg["attention"], **data.model_kwargs())
    model.load_state_dict(ck["model"])
    model.to(dev).eval()
    res_path = root / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    return Run(model, data, cfg, int(ck.get("step", 0)), results, root, dev)


def entropy_curves(metrics_csv: str | Path) -> dict[int, dict[int, tuple[list[int], list[float]]]]:
    """``{layer: {head: (steps, entropies)}}`` from the ``attention`` rows of a metrics.csv (empty if none)."""
    path = Path(metrics_csv)
    out: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    if not path.is_file():
        return out
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            name = row.get("metric", "")
            if row.get("split") != "attention" or not name.startswith("entropy_L") or "_H" not in name:
                continue
            layer_s, head_s = name[len("entropy_L") :].split("_H")
            steps, vals = out.setdefault(int(layer_s), {}).setdefault(int(head_s), ([], []))
            steps.append(int(row["step"]))
            vals.append(float(row["value"]))
    return out


def _chunks(batch: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    n = next(len(v) for v in batch.values() if isinstance(v, Tensor))
    return [{k: v[i : i + size] if isinstance(v, Tensor) else v for k, v in batch.items()} for i in range(0, n, size)]


def _table(matrix: Tensor, *, fmt: str = "{:.3f}") -> str:
    heads = matrix.shape[1]
    lines = ["| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]
    for i, row in enumerate(matrix.tolist()):
        cells = ["–" if (v != v) else fmt.format(v) for v in row]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grid_maps(model: ViT, rows: list[Tensor]) -> Tensor:
    """(K, L, gh, gw): each layer's class-token row over the patches (or the attention each patch
    receives, without a class token), heads averaged."""
    prefix = int(model.cls_token is not None)
    gh, gw = model.grid
    per_layer = []
    for w in rows:  # (B, H, N, N)
        a = w.mean(1)
        row = a[:, 0, prefix:] if prefix else a.mean(1)
        per_layer.append(row.reshape(-1, gh, gw))
    return torch.stack(per_layer, 1)


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    examples: int = 6,
    batches: int = 2,
    split: str = "val",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Path:
    """Write the figures and ``summary.md`` of a run (see the module docstring); returns the summary's path.

    Args:
        run_dir: a run directory of ``attnlib-train`` (or its checkpoint file).
        out_dir: where to write (default ``<run dir>/analysis``).
        examples: evaluation examples per batch (the figures show the first ones).
        batches: batches of ``examples`` for head importance.
        split: "val" or "test".
        device: where the model runs.
        seed: for the induction probe's random tokens.
    """
    run = load_run(run_dir, device=device)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    model, task = run.model, run.data.task
    first = next(run.data.eval_batches(split, limit=examples * max(1, batches)))
    chunks = [_to(c, run.device) for c in _chunks(first, examples)]
    batch = chunks[0]

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return train_loss(m, b, task)[0]

    with torch.no_grad(), capture(model) as rec:
        loss_fn(model, batch)
    recs = rec.layers(0)
    has_weights = bool(recs) and all(r.weights is not None for r in recs)
    variant = run.results.get("variant") or run.config.get("attention", {}).get("variant", "?")
    notes: list[str] = []
    figures: list[tuple[str, str]] = []
    tables: list[tuple[str, str]] = []

    if has_weights:
        weights = [r.weights.float() for r in recs]  # type: ignore[union-attr]
        tables.append(("Mean attention entropy (nats) per head", _table(head_entropy(rec, call=0))))
        square = len({tuple(w.shape[-2:]) for w in weights}) == 1 and weights[0].shape[-1] == weights[0].shape[-2]
        roll = rollout(weights) if square else None
        if not square:
            notes.append("rollout skipped: the layers attend over different tokens (token pruning)")
        if isinstance(model, ViT):
            imgs = batch["x"].cpu()
            k = min(len(imgs), examples)
            if square:
                maps = _grid_maps(model, weights)[:k]
                cols = [f"layer {i}" for i in range(len(weights))]
                question = "Where does the class token look, layer by layer? (heads averaged)"
                if model.cls_token is None:
                    question = "Which patches receive attention, layer by layer? (heads and queries averaged)"
                plots.plot_image_attention(imgs[:k], maps, out / "attention_maps.png", columns=cols, title=question)
                figures.append(("attention_maps.png", question))
                assert roll is not None
                prefix = int(model.cls_token is not None)
                gh, gw = model.grid
                r_maps = (roll[:, 0, prefix:] if prefix else roll.mean(1)).reshape(-1, gh, gw)[:k]
                with torch.no_grad():
                    pred = model(batch["x"]).argmax(-1).cpu()
                labels = [f"label {int(y)} / pred {int(p)}" for y, p in zip(batch["y"].cpu()[:k], pred[:k])]
                q = "What does the prediction draw on through all layers? (attention rollout)"
                plots.plot_image_rollout(imgs[:k], r_maps, out / "rollout.png", labels=labels, title=q)
                figures.append(("rollout.png", q))
                dist = torch.stack(
                    [
                        attention_distance(w, grid=model.grid, num_prefix=prefix, patch_size=model.patch_size[0])
                        .nanmean((0, 2))
                        .cpu()
                        for w in weights
                    ]
                )
                unit = "pixels"
        else:
            tok = batch["tokens"][0, :-1].cpu() if "tokens" in batch else None
            crop = min(48, weights[0].shape[-1])
            labels = [_char(int(t)) for t in tok[:crop]] if tok is not None and task == "lm" else None
            q = f"Attention maps of the first example (first {crop} positions), layers x heads"
            plots.plot_token_attention([w[0, :, :crop, :crop] for w in weights], out / "attention_maps.png",
                                       tokens=labels, title=q)  # fmt: skip
            figures.append(("attention_maps.png", q))
            if roll is not None:
                q = f"Attention rollout of the first example (first {crop} positions): output x input token"
                plots.plot_matrix(roll[0, :crop, :crop], out / "rollout.png", title=q, xlabel="input token",
                                  ylabel="output token")  # fmt: skip
                figures.append(("rollout.png", q))
            dist = torch.stack([attention_distance(w).mean((0, 2)).cpu() for w in weights]) if square else None
            unit = "tokens"
        if square and dist is not None:
            q = f"How far does each head look? (mean attention distance, {unit})"
            plots.plot_layer_heads(dist, out / "attention_distance.png", title=q, ylabel=f"distance ({unit})")
            figures.append(("attention_distance.png", q))
            tables.append((f"Mean attention distance ({unit}) per head", _table(dist, fmt="{:.2f}")))
    else:
        notes.append(
            f"variant {variant!r} reports no attention weights (capabilities.has_weights=False): attention maps, "
            "rollout, distances and entropies are skipped; head importance needs no weights"
        )

    curves = entropy_curves(run.run_dir / "metrics.csv")
    if curves:
        q = "How does each head's attention entropy change over training?"
        plots.plot_entropy_curves(curves, out / "head_entropy.png", title=q)
        figures.append(("head_entropy.png", q))
    else:
        notes.append(
            "no entropy curves: metrics.csv has no `attention` rows (train with trainer.log_attention_entropy=true)"
        )

    imp = gradient_head_importance(model, loss_fn, chunks)
    abl = ablation_head_importance(model, loss_fn, chunks)
    heads = [f"{h}" for h in range(imp.shape[1])]
    layers = [f"{i}" for i in range(imp.shape[0])]
    q = "Which heads matter? Gradient importance |dL/d mask| (Michel et al. 2019), L2-normalised per layer"
    plots.plot_matrix(imp, out / "head_importance.png", title=q, xlabel="head", ylabel="layer", annotate=True,
                      xticks=heads, yticks=layers)  # fmt: skip
    figures.append(("head_importance.png", q))
    q = "What does removing one head cost? Loss increase when the head is masked (nats)"
    plots.plot_matrix(abl, out / "head_ablation.png", title=q, xlabel="head", ylabel="layer", annotate=True,
                      cmap="RdBu_r", xticks=heads, yticks=layers)  # fmt: skip
    figures.append(("head_ablation.png", q))
    tables.append(("Gradient head importance (per layer L2-normalised)", _table(imp)))
    tables.append(("Loss increase when the head is masked (nats)", _table(abl)))

    probe_text = ""
    if task == "lm" and has_weights:
        gen = torch.Generator().manual_seed(seed)
        printable = list(range(97, 123))  # a-z: in the distribution of a byte-level text model
        rep = induction_probe(model, printable, length=24, batch=8, generator=gen)
        q = "Which heads copy? Induction score (attention to the token after the earlier occurrence)"
        plots.plot_matrix(rep.induction, out / "induction.png", title=q, xlabel="head", ylabel="layer",
                          annotate=True, xticks=heads, yticks=layers)  # fmt: skip
        figures.append(("induction.png", q))
        probe_text = (
            f"Verbatim recall of a repeated random a-z sequence (24 characters, twice): next-character loss "
            f"{rep.loss_first:.3f} nats on the first copy, {rep.loss_repeat:.3f} on the repeat."
        )
        tables.append(("Induction score per head", _table(rep.induction)))
        tables.append(("Previous-token score per head", _table(rep.previous)))

    summary = _summary(run, variant, split, len(batch[next(iter(batch))]), figures, tables, notes, probe_text)
    path = out / "summary.md"
    path.write_text(summary)
    return path


def _char(b: int) -> str:
    c = chr(b)
    return {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(c, c if c.isprintable() else "·")


def _summary(
    run: Run,
    variant: str,
    split: str,
    examples: int,
    figures: list[tuple[str, str]],
    tables: list[tuple[str, str]],
    notes: list[str],
    probe_text: str,
) -> str:
    cfg = run.config
    metrics = {k: v for k, v in run.results.items() if k.startswith(("test_", "val_")) and isinstance(v, float)}
    lines = [
        f"# Attention report: {cfg.get('model', {}).get('name', '?')} on {cfg.get('data', {}).get('name', '?')}, "
        f"variant `{variant}`",
        "",
        f"Checkpoint at step {run.step}; figures from {examples} {split} examples.",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if math.isfinite(v)]
        lines.append("")
    for name, question in figures:
        lines += [f"## {question}", "", f"![{question}]({name})", ""]
    if probe_text:
        lines += ["## Verbatim recall", "", probe_text, ""]
    for title, table in tables:
        lines += [f"## {title}", "", table, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
