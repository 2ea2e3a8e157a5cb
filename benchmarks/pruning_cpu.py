"""Token pruning on CPU: accuracy, FLOPs and inference throughput of vit_digits with topk / ltp.

    .venv/bin/python benchmarks/pruning_cpu.py --seeds 0,1,2,3,4 [--work DIR] [--runs 9]
    .venv/bin/python benchmarks/pruning_cpu.py --setting px1 --seeds 0,1,2 [--work DIR]
    .venv/bin/python benchmarks/pruning_cpu.py --setting px1 --core-only --ft-steps 2400  # longer fine-tunes

``--setting`` (:data:`SETTINGS`) picks the tokenisation of the same 8x8 digits: ``px2`` (default,
``experiment=vit_digits*``: 2x2 patches, 16 + class token = 17 tokens) or ``px1``
(``experiment=vit_digits_px1*``: one token per pixel, 64 + class token = 65 tokens, rotary positions,
2400 dense steps + 800-step fine-tunes at batch 64). Counts below are for px2; px1 keeps the same
fractions (32 of 64 patches).

1. Trains per seed (``--seeds``; cached in ``--work``, default ``$TMPDIR/attnlib-pruning[-px1]``, reused
   when finished), all with ``attnlib-train``:
   * ``experiment=vit_digits`` - the unpruned softmax baseline (2500 steps from scratch);
   * then, starting from that baseline (``init_from``) and distilling from it (``distill_from``,
     soft KD, weight 0.5, T = 1), the same fine-tune recipe for every config (1000 steps, peak
     lr 1e-3, warmup 50, cosine; ``experiment=vit_digits_finetune``):
     - ``dense_ft`` - no pruning: the control that gets the same extra training;
     - ``topk_ft`` - top-k after block 0, 8 of the 16 patches kept + the class token (9 of 17);
     - ``topk_fuse_ft`` - 7 patches + class token + one EViT-fused token (also 9 of 17);
     - ``topk2_ft`` - progressive top-k: 10 patches after block 0, 7 after block 1 (17/11/8/8,
       the same 9 tokens per later block on average);
     - ``ltp_ft`` - Learned Token Pruning after block 0 (learned threshold, straight-through
       training, per-sample keep-ratio loss at 50%; hard pruning in eval).
   Pruners score tokens by ``score`` of the experiment config (``RUNS``).
2. Evaluates on the 360 test digits (1 image = 0.28 points): accuracies are means over the seeds
   (the same seeds for every row; per seed in the JSON): the models above, the same weights at
   other eval-time keep ratios / thresholds (3 per pruner), post-hoc pruning of
   the baseline (no fine-tuning, for contrast), and the ltp model on a padded batch
   (``ragged="pad"``) instead of the default packed-by-length layout (``ragged="groups"``,
   :mod:`attnlib.models.ragged`) for the speed contrast.
3. Throughput (the first seed's models): batch 256, eval, ``torch.inference_mode``, interleaved rounds
   (:func:`attnlib.bench.timing.time_cpu_interleaved`; a new random order each round and one untimed
   call before each timed one, so no model is always first or timed right after another), median
   images/s; speed-up vs baseline.
4. FLOPs: analytic 2 x multiply-adds of the blocks for the token counts actually run (padded
   counts where the batch is padded, real counts in the packed layout).

Writes benchmarks/results/pruning_cpu{,_px1}.{json,md} (``Setting.out_stem``). Machine, threads and
load average (start and end) are recorded: on a shared, busy machine compare the ratios of the interleaved runs.
Paths in the results are written relative to the repository or as ``$TMPDIR/...``, never absolute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from attnlib.bench.machine import machine_info
from attnlib.bench.timing import time_cpu_interleaved
from attnlib.data import build_data
from attnlib.models import build_model

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
sys.path.insert(0, str(ROOT))
from _common import default_work_dir, display_path, portable_paths  # noqa: E402


def _px_suffix(setting: str) -> str:
    return "" if setting == "px2" else f"-{setting}"


RUNS: dict[str, list[str]] = {
    "base": ["experiment=vit_digits"],
    "dense_ft": ["experiment=vit_digits_finetune"],
    "topk_ft": ["experiment=vit_digits_topk_ft"],
    "topk_fuse_ft": ["experiment=vit_digits_topk_ft", "model.pruning.keep_ratio=0.4375", "model.pruning.fuse=true"],
    "ltp_ft": ["experiment=vit_digits_ltp_ft"],
    "topk2_ft": [
        "experiment=vit_digits_topk_ft",
        "model.pruning.layers=[0,1]",
        "model.pruning.keep_ratio=0.625",
        "+model.pruning.per_layer={1:{keep_ratio:0.7}}",
    ],
}
"""Training runs per seed (px2); the ``*_ft`` ones start from (and distil) the same seed's trained ``base``."""

OPTIONAL = ("topk_fuse_ft", "topk2_ft")
"""Runs (and their rows) that ``--core-only`` skips; the others are the bar's rows."""


@dataclass(frozen=True)
class Setting:
    """One tokenisation of vit_digits: its training runs, patch count and output file stem.

    ``runs`` maps run keys to ``attnlib-train`` overrides (``base`` from scratch; ``*_ft`` warm-started
    from ``base``). The fused run (px2 only: px1 has rotary positions) keeps ``patches // 2 - 1``
    patches + class + 1 fused token and the progressive run ``5/8`` of the patches after block 0 and
    ``7/10`` of those after block 1: the same ``patches // 2 + 1`` tokens per later block on average
    as top-k at r = 0.5.
    """

    name: str
    patches: int
    runs: dict[str, list[str]]
    out_stem: str
    ltp_scales: tuple[float, ...] = (0.25, 0.5, 3.0)


def _px1_runs() -> dict[str, list[str]]:
    # no EViT-fused run: vit_digits_px1 uses rotary positions, and a fused token has no position
    return {
        "base": ["experiment=vit_digits_px1"],
        "dense_ft": ["experiment=vit_digits_px1_finetune"],
        "topk_ft": ["experiment=vit_digits_px1_topk_ft"],
        "ltp_ft": ["experiment=vit_digits_px1_ltp_ft"],
        "topk2_ft": [o.replace("vit_digits_topk_ft", "vit_digits_px1_topk_ft") for o in RUNS["topk2_ft"]],
    }


SETTINGS: dict[str, Setting] = {
    "px2": Setting("px2", 16, RUNS, "pruning_cpu"),
    # px1 threshold scales picked on the validation split (seed 0) for the kept fraction: 72% / 44% / 33%
    "px1": Setting("px1", 64, _px1_runs(), "pruning_cpu_px1", ltp_scales=(0.1, 3.0, 10.0)),
}
"""``--setting`` choices: px2 = 2x2 patches (17 tokens, the original table), px1 = pixels (65 tokens)."""


def run_name(key: str, seed: int, ft_steps: int | None = None) -> str:
    """The run directory name of training run ``key`` at ``seed`` (seed 0 has no suffix; fine-tunes
    with a ``--ft-steps`` budget end in ``_ft<steps>``, the shared ``base`` never does)."""
    name = key if seed == 0 else f"{key}_s{seed}"
    return name if ft_steps is None or key == "base" else f"{name}_ft{ft_steps}"


def with_ft_steps(runs: dict[str, list[str]], ft_steps: int | None) -> dict[str, list[str]]:
    """``runs`` with every fine-tune (every run but ``base``, the control included) trained
    ``ft_steps`` steps instead of its experiment's budget (None: unchanged)."""
    if ft_steps is None:
        return runs
    return {k: v if k == "base" else [*v, f"trainer.max_steps={ft_steps}"] for k, v in runs.items()}


def train(work: Path, name: str, overrides: list[str]) -> Path:
    """Train (once) with the ``attnlib-train`` ``overrides`` into ``work/name``; returns the checkpoint path."""
    run = work / name
    ck = run / "checkpoints" / "last.pt"
    if not (run / "results.json").exists():
        exe = Path(sys.executable).parent / "attnlib-train"
        t0 = time.perf_counter()
        subprocess.run(
            [str(exe), *overrides, f"hydra.run.dir={run}", "trainer.progress=false", "resume=true"],
            check=True,
        )
        print(f"trained {' '.join(overrides)} in {time.perf_counter() - t0:.0f}s")
    return ck


def train_seed(work: Path, key: str, seed: int, runs: dict[str, list[str]], ft_steps: int | None = None) -> Path:
    """Train run ``key`` of ``runs`` at ``seed`` (warm-started runs first train their ``base``)."""
    overrides = [*runs[key], f"seed={seed}"]
    if key != "base":
        base = train(work, run_name("base", seed), [*runs["base"], f"seed={seed}"])
        if key.endswith("_ft"):
            overrides.append(f"init_from={base}")
    return train(work, run_name(key, seed, ft_steps), overrides)


def block_flops(n: float, dim: int, hidden: int) -> float:
    """FLOPs (2 x multiply-adds) of one pre-norm block on n tokens: qkv, scores, PV, out, MLP."""
    return 2 * (3 * n * dim * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden)


def load(
    ck: dict[str, Any], data: Any, pruning: dict | str | None = "same", backend: str | None = None, **model_kw: Any
) -> Any:
    """The checkpoint's model in eval mode, with its own pruning config or ``pruning`` instead (and ``model_kw``)."""
    cfg = OmegaConf.create(ck["config"])
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    mcfg.update(model_kw)
    if pruning != "same":
        mcfg["pruning"] = pruning
    att = OmegaConf.to_container(cfg.attention, resolve=True)
    if backend is not None:
        att["backend"] = backend
    m = build_model(mcfg, att, **data.model_kwargs())
    missing, unexpected = m.load_state_dict(ck["model"], strict=False)
    if unexpected or [k for k in missing if "pruning" not in k]:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return m.eval()


class TokenCounter:
    """Forward hooks on a ViT's pruners: tokens per block (padded length and mean real count)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.after: dict[int, tuple[float, float]] = {}
        if model.pruning is not None:
            for i in model.pruning.layers:
                model.pruning.get(i).register_forward_hook(self._hook(i))

    def _hook(self, layer: int):
        def fn(_mod: Any, _inp: Any, out: Any) -> None:
            n = out.x.shape[1]
            real = float(out.mask.sum(1).float().mean()) if out.mask is not None else float(n)
            self.after[layer] = (float(n), real)

        return fn

    def per_block(self, n0: int) -> tuple[list[float], list[float]]:
        """(padded, real) token counts each block runs on, from the last forward."""
        depth = len(self.model.blocks)
        padded, real, cur = [], [], (float(n0), float(n0))
        for i in range(depth):
            padded.append(cur[0])
            real.append(cur[1])
            if i in self.after:
                cur = self.after[i]
        return padded, real


def _steps(ck: dict[str, Any]) -> int:
    return int(ck["config"]["trainer"]["max_steps"])


def build_models(cks: dict[str, dict[str, Any]], data: Any, setting: Setting) -> dict[str, tuple[Any, str]]:
    """label -> (model in eval mode, note): the trained models and eval-time variants of one seed.

    Rows of runs missing from ``cks`` (the optional fused / progressive ones) are left out.
    """
    topk_cfg = dict(cks["topk_ft"]["config"]["model"]["pruning"])
    ltp_cfg = dict(cks["ltp_ft"]["config"]["model"]["pruning"], mode="hard")
    score = topk_cfg.get("score", "mean")
    half = setting.patches // 2
    ft = _steps(cks["dense_ft"])
    models: dict[str, tuple[Any, str]] = {
        "none (baseline)": (load(cks["base"], data), f"trained unpruned, {_steps(cks['base'])} steps"),
        "none, fine-tuned (control)": (load(cks["dense_ft"], data), f"baseline + the same {ft}-step KD fine-tune"),
        "topk r=0.5": (load(cks["topk_ft"], data), f"bar config: baseline fine-tuned with topk r=0.5, score={score}"),
        "topk r=0.75": (load(cks["topk_ft"], data, dict(topk_cfg, keep_ratio=0.75)), "topk r=0.5 model, eval r=0.75"),
        "topk r=0.25": (load(cks["topk_ft"], data, dict(topk_cfg, keep_ratio=0.25)), "topk r=0.5 model, eval r=0.25"),
    }
    if "topk_fuse_ft" in cks:
        models[f"topk {half - 1} + fused (EViT)"] = (
            load(cks["topk_fuse_ft"], data),
            f"fine-tuned with {half - 1} patches + class + 1 fused token (same {half + 1} tokens)",
        )
    if "topk2_ft" in cks:
        p1 = setting.patches * 5 // 8
        p2 = p1 * 7 // 10
        models[f"topk progressive {p1} -> {p2} patches"] = (
            load(cks["topk2_ft"], data),
            f"fine-tuned with topk after block 0 ({p1} patches) and block 1 ({p2}): "
            f"{setting.patches + 1}/{p1 + 1}/{p2 + 1}/{p2 + 1} tokens",
        )
    models["topk r=0.5 post-hoc"] = (load(cks["base"], data, topk_cfg), "baseline weights, no pruning-aware fine-tune")
    models["ltp"] = (load(cks["ltp_ft"], data, ltp_cfg), "bar config: baseline fine-tuned with ltp; packed by length")
    models["ltp, padded batch"] = (
        load(cks["ltp_ft"], data, ltp_cfg, ragged="pad"),
        "same weights; rows padded to the longest (ragged=pad)",
    )
    # the trained model at scaled thresholds (px2: the learned one sits in a wide gap of the
    # normalised class-token scores, so x0.75 / x1.25 barely change the kept count)
    for scale in setting.ltp_scales:
        m = load(cks["ltp_ft"], data, ltp_cfg)
        pr = m.pruning.get(ltp_cfg["layers"][0])
        with torch.no_grad():
            pr.delta.add_((scale - 1.0) * float(pr.threshold()))
        models[f"ltp threshold x{scale}"] = (m, f"ltp model, eval threshold x{scale}")
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="px2", help="tokenisation (see SETTINGS)")
    ap.add_argument("--work", default=None, help="run cache (default $TMPDIR/attnlib-pruning[-px1])")
    ap.add_argument("--core-only", action="store_true", help=f"skip the optional runs and rows {OPTIONAL}")
    ap.add_argument(
        "--split", choices=("test", "val"), default="test", help="accuracy split (val: for tuning; writes *_val.*)"
    )
    ap.add_argument(
        "--ft-steps",
        type=int,
        default=None,
        help="fine-tune budget of every fine-tuned run, the control included (runs and outputs get _ft<N>)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (accuracy = mean over them)")
    ap.add_argument("--note", default="", help="a sentence added to the markdown (e.g. where cached runs came from)")
    args = ap.parse_args()
    setting = SETTINGS[args.setting]
    work = Path(args.work) if args.work else default_work_dir(f"attnlib-pruning{_px_suffix(setting.name)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = {k: v for k, v in setting.runs.items() if not (args.core_only and k in OPTIONAL)}
    runs = with_ft_steps(runs, args.ft_steps)
    stem = setting.out_stem + ("" if args.ft_steps is None else f"_ft{args.ft_steps}")
    stem += "" if args.split == "test" else f"_{args.split}"
    t_start = time.perf_counter()
    load_start = machine_info(args.threads)["loadavg"]
    # the bar's runs seed by seed first, then the optional ones (partial results stay usable)
    order = [(k, sd) for sd in seeds for k in runs if k not in OPTIONAL]
    order += [(k, sd) for k in runs if k in OPTIONAL for sd in seeds]
    ck_paths = {(k, sd): train_seed(work, k, sd, runs, args.ft_steps) for k, sd in order}
    cks_by_seed = {
        sd: {k: torch.load(ck_paths[k, sd], map_location="cpu", weights_only=False) for k in runs} for sd in seeds
    }
    torch.set_num_threads(args.threads)
    cks = cks_by_seed[seeds[0]]
    data = build_data(OmegaConf.to_container(OmegaConf.create(cks["base"]["config"]).data, resolve=True))
    data.ensure_setup()
    batches = list(data.eval_batches(args.split))
    xs = torch.cat([b["x"] for b in batches])
    ys = torch.cat([b["y"] for b in batches])
    bench_x = xs[torch.arange(256) % xs.shape[0]]
    accs: dict[str, list[float]] = {}
    with torch.inference_mode():
        for sd in seeds[1:]:
            for label, (m, _) in build_models(cks_by_seed[sd], data, setting).items():
                accs.setdefault(label, []).append(float((m(xs).argmax(-1) == ys).float().mean()))
    models = build_models(cks, data, setting)  # the first seed's models are also timed
    n0 = 1 + models["none (baseline)"][0].num_patches
    ref = models["none (baseline)"][0]
    depth, dim = len(ref.blocks), ref.blocks[0].attn.dim
    hidden = ref.blocks[0].mlp.fc2.in_features
    rows: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for label, (m, note) in models.items():
            counter = TokenCounter(m)
            acc = [float((m(xs).argmax(-1) == ys).float().mean()), *accs.get(label, [])]
            m(bench_x)  # token counts of the timed batch
            padded, real = counter.per_block(n0)
            run = padded if getattr(m, "ragged", "pad") == "pad" else real
            rows[label] = {
                "note": note,
                "accuracy": statistics.mean(acc),
                "accuracy_per_seed": acc,
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "tokens_per_block_padded": padded,
                "tokens_per_block_real": real,
                "kept_fraction_later_blocks": sum(real[1:]) / ((depth - 1) * n0),
                "gflops_per_image": sum(block_flops(n, dim, hidden) for n in run) / 1e9,
            }

    def runner(m: Any):
        def fn() -> None:
            with torch.inference_mode():
                m(bench_x)

        return fn

    timings = time_cpu_interleaved(
        {k: runner(m) for k, (m, _) in models.items()},
        runs=args.runs,
        warmup=2,
        threads=args.threads,
        shuffle=0,
        rewarm=True,
    )
    base = rows["none (baseline)"]
    ctrl = rows["none, fine-tuned (control)"]
    base_t = timings["none (baseline)"].median_s
    for label, r in rows.items():
        t = timings[label]
        r["ms_per_batch"] = 1e3 * t.median_s
        r["noise_iqr_over_median"] = t.noise
        r["images_per_s"] = 256 / t.median_s
        r["speedup"] = base_t / t.median_s
        r["flops_ratio"] = base["gflops_per_image"] / r["gflops_per_image"]
        r["acc_drop_points"] = 100 * (base["accuracy"] - r["accuracy"])
        r["acc_drop_vs_control_points"] = 100 * (ctrl["accuracy"] - r["accuracy"])
    meta = machine_info(args.threads)
    meta.update(
        note="ratios of interleaved runs (order shuffled each round) are the meaningful numbers; the control "
        "row (baseline architecture) shows the timing noise",
        loadavg_start=load_start,
        work=display_path(work),
        batch=256,
        runs=args.runs,
        seconds=time.perf_counter() - t_start,
        test_images=int(xs.shape[0]),
        seeds=seeds,
        setting=setting.name,
        accuracy_split=args.split,
        runs_overrides=runs,
        user_note=args.note,
        train_results={
            run_name(k, sd, args.ft_steps): json.loads(
                (work / run_name(k, sd, args.ft_steps) / "results.json").read_text()
            )
            for sd in seeds
            for k in runs
        },
    )
    OUT.mkdir(parents=True, exist_ok=True)
    payload = portable_paths({"meta": meta, "vit_digits": rows}, work)
    (OUT / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))

    def fmt_load(v: Any) -> str:
        return ", ".join(f"{x:.2f}" for x in (v or []))

    base_exp = runs["base"][0].removeprefix("experiment=")
    px = {"px2": "2x2 patches", "px1": "one token per pixel (patch_size 1)"}.get(setting.name, setting.name)
    rerun = f"--setting {setting.name} " if setting.name != "px2" else ""
    rerun += "--core-only " if args.core_only else ""
    rerun += f"--ft-steps {args.ft_steps} " if args.ft_steps is not None else ""
    rerun += f"--split {args.split} " if args.split != "test" else ""
    lines = [
        f"# Token pruning on CPU: vit_digits (softmax, {px}), pruned models fine-tuned from the dense baseline",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {args.threads} thread(s), torch {meta['torch']}, load average "
        f"{fmt_load(load_start)} at the start and {fmt_load(meta['loadavg'])} at the end (the control row has the "
        f"baseline's architecture: its speed-up shows the timing noise). Batch 256, inference, interleaved medians of "
        f"{args.runs} rounds, the models in a new random order each round, each timed call preceded by an untimed "
        f"one "
        f"(first seed's models). {args.split.capitalize()} accuracy on the {xs.shape[0]} {args.split} digits: "
        f"mean ± std over training seeds {seeds} - the same seeds for every row (per seed in the JSON). Pruning "
        f"after block 0: blocks 1-3 run on the kept tokens ({n0} = {n0 - 1} patches + class token before). Rerun: "
        f"`python benchmarks/pruning_cpu.py {rerun}--seeds {args.seeds} --runs {args.runs}`.",
        "",
        f"Recipe (identical for every fine-tuned row): the dense baseline (`experiment={base_exp}`, "
        f"{_steps(cks['base'])} steps) is fine-tuned {_steps(cks['dense_ft'])} steps (peak lr "
        f"{cks['dense_ft']['config']['trainer']['lr']:g}, warmup {cks['dense_ft']['config']['trainer']['warmup_steps']}"
        ", cosine) with the pruner in place, distilling from the baseline (soft KD, weight 0.5, T = 1) - "
        f"`{runs['dense_ft'][0]}` / `{runs['topk_ft'][0]}` / `{runs['ltp_ft'][0]}` with `init_from=<baseline>`. "
        "The control row gets the same fine-tune without pruning. The pruners rank by the class token's attention "
        "row (`score: cls`), chosen over `mean` on the validation split (3 seeds, patch 2). "
        f"Training overrides: `{json.dumps(runs)}`. Finished runs in `--work` are reused. {args.note}",
        "",
        f"| config | tokens per block (real) | later-block keep | {args.split} acc | drop vs baseline (points) "
        "| drop vs control | GFLOPs/img | FLOPs ratio | img/s | speed-up | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        toks = "/".join(f"{v:.1f}".rstrip("0").rstrip(".") for v in r["tokens_per_block_real"])
        lines.append(
            f"| {label} | {toks} | {100 * r['kept_fraction_later_blocks']:.0f}% | {100 * r['accuracy']:.2f}% "
            f"(±{100 * r['accuracy_std']:.2f}) | {r['acc_drop_points']:+.2f} | "
            f"{r['acc_drop_vs_control_points']:+.2f} | "
            f"{r['gflops_per_image']:.5f} | {r['flops_ratio']:.2f}x | "
            f"{r['images_per_s']:.0f} | {r['speedup']:.2f}x | {r['note']} |"
        )
    lines += [
        "",
        "FLOPs count the tokens each block computes (the longest row for every row of a padded batch, the real "
        "counts when packed by length); `tokens per block` are the mean real counts of the timed batch. "
        "Targets: about 50% of tokens kept in the later layers, <= 1.5 points lost, >= 1.3x faster.",
    ]
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
