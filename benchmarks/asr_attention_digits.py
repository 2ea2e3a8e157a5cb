"""Attention-decoder ASR vs Conformer-CTC on synthesised spoken digits (CPU), with other cross-attentions.

Trains each configuration for the same number of steps with several seeds, then evaluates the
test split (400 held-out digit strings) and records the character error rate (CER) and the
utterance accuracy. For the attention-decoder models the test set is also decoded three ways:
the joint CTC/attention beam search (the model's default), the attention decoder alone
(greedy, CTC weight 0) and the model's own CTC layer (greedy). Results merge into
benchmarks/results/asr_attention_digits.{json,md}; finished runs are reused from the run
directory, so an interrupted sweep continues where it stopped.

    python benchmarks/asr_attention_digits.py                       # every configuration, seeds 0 1 2
    python benchmarks/asr_attention_digits.py ctc aed_softmax --seeds 0
    python benchmarks/asr_attention_digits.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table, save_records

STEPS = 500
# name -> overrides of `attnlib-train` (the step budget and evaluation schedule are added)
CONFIGS: dict[str, list[str]] = {
    "ctc": ["experiment=asr_digits"],
    "aed_softmax": ["experiment=asr_digits_aed"],
    "aed_relaxed": ["experiment=asr_digits_aed_relaxed"],
    "aed_monotonic": ["experiment=asr_digits_aed", "attention@model.cross_attention=monotonic"],
    "aed_additive": ["experiment=asr_digits_aed", "attention@model.cross_attention=additive"],
    "aed_hard_additive": [
        "experiment=asr_digits_aed",
        "attention@model.cross_attention=additive",
        "model.cross_attention.hard=true",
    ],
}
DEFAULT = ["aed_softmax", "ctc", "aed_relaxed", "aed_monotonic", "aed_additive"]
OUT = "asr_attention_digits"


def _schedule(steps: int) -> list[str]:
    return [
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}",
        "trainer.progress=false",
    ]


def train(name: str, seed: int, steps: int, runs: Path) -> dict:
    """Train one configuration (or reuse its finished run); returns results.json plus wall time."""
    run = runs / f"{name}-s{seed}"
    done = run / "results.json"
    overrides = [*CONFIGS[name], f"seed={seed}", "+data.seed=0", *_schedule(steps)]
    if not done.exists():
        cmd = [sys.executable, "-m", "attnlib.cli.train", *overrides, f"hydra.run.dir={run}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    res = json.loads(done.read_text())
    wall = run / "wall_seconds.txt"
    res["wall_seconds_command"] = float(wall.read_text()) if wall.exists() else None
    res["command"] = " ".join(["attnlib-train", *overrides])
    res["final_train_loss"] = final_train_loss(run)
    res["grad_clip"] = run_grad_clip(run)
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    res.setdefault("commit", machine_info()["commit"])
    return res


def final_train_loss(run: Path) -> float | None:
    """The last logged training loss of a run (its metrics.csv), or None."""
    path = run / "metrics.csv"
    if not path.exists():
        return None
    rows = [line.split(",") for line in path.read_text().splitlines()]
    losses = [float(r[3]) for r in rows if len(r) == 4 and r[1:3] == ["train", "loss"]]
    return losses[-1] if losses else None


def run_grad_clip(run: Path) -> float | None:
    """The gradient-clipping threshold a run trained with (its saved config), or None."""
    from omegaconf import OmegaConf

    path = run / ".hydra" / "config.yaml"
    return float(OmegaConf.load(path).trainer.grad_clip) if path.exists() else None


def decode_ablation(run: Path) -> dict[str, float]:
    """Test CER of a trained attention-decoder model decoded three ways (see the module docstring)."""
    import torch
    from omegaconf import OmegaConf

    from attnlib.data import build_data
    from attnlib.models import build_model
    from attnlib.models.asr import ctc_greedy_decode
    from attnlib.training.metrics import edit_distance

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True))
    data.ensure_setup()
    model = build_model(cfg.model, cfg.attention, **data.model_kwargs())
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    model.eval()
    torch.set_num_threads(1)
    edits = {"joint_beam": 0, "attention_greedy": 0, "ctc_greedy": 0}
    ref_len = 0
    with torch.no_grad():
        for batch in data.eval_batches("test"):
            refs = [batch["targets"][i, : int(n)].tolist() for i, n in enumerate(batch["target_lengths"])]
            ref_len += sum(len(r) for r in refs)
            hyps = {
                "joint_beam": model.transcribe(batch["wave"], batch["lengths"]),
                "attention_greedy": model.transcribe(batch["wave"], batch["lengths"], beam_size=1, ctc_weight=0.0),
            }
            lp, frames = model(batch["wave"], batch["lengths"])
            hyps["ctc_greedy"] = ctc_greedy_decode(lp, frames, model.blank)
            for k, hs in hyps.items():
                edits[k] += sum(edit_distance(r, h) for r, h in zip(refs, hs))
    return {k: v / max(ref_len, 1) for k, v in edits.items()}


def recipe_grad_clip(name: str) -> float:
    """The gradient-clipping threshold configuration ``name`` trains with now (its composed config)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=CONFIGS[name])
    return float(cfg.trainer.grad_clip)


def supersede(records: dict) -> dict:
    """Move the runs trained with another clipping threshold than their configuration's current
    recipe from ``records["runs"]`` to ``records["superseded"]`` (kept and shown apart)."""
    old = records.setdefault("superseded", {})
    for name, runs in records["runs"].items():
        clip = recipe_grad_clip(name)
        for seed in [s for s, r in runs.items() if (r.get("grad_clip") or 1.0) != clip]:
            old.setdefault(name, {})[seed] = runs.pop(seed)
    records["runs"] = {n: r for n, r in records["runs"].items() if r}
    return records


def table_rows(by_name: dict) -> list[list]:
    """One row per configuration: median CER over its seeds and the per-seed details."""
    rows = []
    for name in [n for n in CONFIGS if n in by_name]:
        runs = by_name[name]
        cers = [r["test_cer"] for r in runs.values()]
        accs = [r["test_utterance_accuracy"] for r in runs.values()]
        abl = [r["decoding"] for r in runs.values() if r.get("decoding")]

        def med(key: str, items: list[dict] = abl) -> str:
            return f"{statistics.median(d[key] for d in items):.4f}" if items else "-"

        rows.append(
            [
                f"`{name}`",
                ", ".join(str(s) for s in sorted(int(s) for s in runs)),
                f"{statistics.median(cers):.4f}",
                " / ".join(f"{c:.4f}" for _, c in sorted((int(s), r["test_cer"]) for s, r in runs.items())),
                f"{statistics.median(accs):.3f}",
                " / ".join(
                    "-" if r.get("final_train_loss") is None else f"{r['final_train_loss']:.2f}"
                    for _, r in sorted((int(s), r) for s, r in runs.items())
                ),
                med("attention_greedy"),
                med("ctc_greedy"),
                f"{statistics.median(r['train_seconds'] for r in runs.values()):.0f}",
                f"{int(statistics.median(r['params'] for r in runs.values())):,}",
                " / ".join(
                    f"{r.get('grad_clip') or 1.0:g}"  # runs recorded before this column trained with the default 1.0
                    for _, r in sorted((int(s), r) for s, r in runs.items())
                ),
                ", ".join(sorted({str(r.get("commit", "?")) for r in runs.values()})),
            ]
        )
    return rows


def write_tables(records: dict) -> None:
    """Rewrite the markdown tables from the records: the current recipe's runs, then superseded ones."""
    rows = table_rows(records["runs"])
    info = records["machine"]
    counts = {n: len(records["runs"][n]) for n in records["runs"]}
    seeds_note = ""
    if len(set(counts.values())) > 1:
        most = max(counts.values())
        fewer = ", ".join(f"`{n}` ({c})" for n, c in counts.items() if c < most)
        seeds_note = (
            f"Not every row has {most} seeds: {fewer} - the shared machine's time allowed no more; "
            "a single seed is no comparison, only a first measurement.\n\n"
        )
    missing = [n for n in DEFAULT if n not in records["runs"]]
    if missing:
        seeds_note += (
            "Not measured yet: "
            + ", ".join(f"`{n}`" for n in missing)
            + " (its 500-step run did not fit the shared machine's time; "
            f"`python benchmarks/{Path(__file__).name} {' '.join(missing)}` adds it).\n\n"
        )
    stuck = [
        f"`{n}` seed {s}" + tag
        for tag, group in (("", records["runs"]), (" (superseded)", records.get("superseded", {})))
        for n, runs in group.items()
        for s, r in sorted(runs.items())
        if r.get("decoding") and r["decoding"]["ctc_greedy"] > 0.5
    ]
    if stuck:
        seeds_note += (
            "Did not learn within the budget: "
            + ", ".join(stuck)
            + " - the joint models' CTC branch alone has a CER above 0.5 there (the encoder never learned "
            "the alignment) and the training loss stayed on or near the initial plateau (about 2.3, where every "
            "attention-decoder run sits from step 60 on until it leaves it). Medians over such seeds measure "
            "how often training leaves the plateau within the step budget, not the decoders at convergence.\n\n"
        )
    commands = "\n".join(f"- `{n}`: `{next(iter(records['runs'][n].values()))['command']}`" for n in records["runs"])
    text = (
        "# Attention-decoder ASR vs Conformer-CTC (spoken digits, CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}, table written at commit {info['commit']}, "
        f"{records['date']}. A shared 2-core machine (one training thread; load average "
        f"{records['load']} over the sweeps that trained these runs), so times are upper bounds for a quiet machine. "
        f"Every run trains {records['steps']} steps (batch 32, the `asr_digits` schedule shortened) and is "
        "evaluated once on the 400 held-out test strings. The seed changes the initialisation, SpecAugment and "
        "the batch order; the data (one synthesis, `data.seed=0`) is the same for every run. "
        "A finished run is reused by later sweeps (the last column names the commit each was trained at). "
        "Rerun: `python benchmarks/asr_attention_digits.py`.\n\n"
        "CER = character error rate of the model's own decoding: greedy CTC for `ctc`, the joint CTC/attention "
        "beam search (beam 4, CTC weight 0.3, length-normalised) for the attention decoders; their last two "
        "columns decode the same trained model with the attention decoder alone (greedy) and with its CTC "
        "layer alone (greedy). `aed_relaxed` is `aed_softmax` with relaxed cross-attention (gamma 0.35, in "
        "training only; decoding uses the plain weights), `aed_monotonic` / `aed_additive` replace the "
        "cross-attention by monotonic (MoChA chunk 4) / additive (Bahdanau) attention.\n\n"
        + seeds_note
        + markdown_table(
            header := [
                "config",
                "seeds",
                "test CER (median)",
                "test CER per seed",
                "utterance acc (median)",
                "final train loss per seed",
                "attention-only CER",
                "CTC-only CER",
                "train s (median)",
                "params",
                "grad clip per seed",
                "trained at commit",
            ],
            rows,
        )
        + "\n\nCommands:\n\n"
        + commands
        + "\n"
    )
    if records.get("superseded"):
        text += (
            "\n## Superseded runs\n\nTrained with another gradient-clipping threshold than their configuration "
            "uses now (before the joint models' clipping was set to the CTC recipe's 1.0 times the CTC weight, "
            "see docs/models.md); kept for comparison, same columns.\n\n"
            + markdown_table(header, table_rows(records["superseded"]))
            + "\n"
        )
    (RESULTS / f"{OUT}.md").write_text(text)


def main() -> None:
    """Run the chosen configurations and seeds; merge their records."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"configurations (default {' '.join(DEFAULT)}): {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--runs", default=None, help="run directories (default $TMPDIR/attnlib-asr-attention)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--tables", action="store_true", help="only rewrite the markdown from the JSON records")
    args = ap.parse_args()
    if args.list:
        for n, ov in CONFIGS.items():
            print(f"{n:18s} attnlib-train {' '.join(ov)}")
        return
    if args.tables:
        records = supersede(json.loads((RESULTS / f"{OUT}.json").read_text()))
        (RESULTS / f"{OUT}.json").write_text(json.dumps(records, indent=2) + "\n")
        write_tables(records)
        return
    names = args.names or DEFAULT
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    runs = Path(args.runs or Path(tempfile.gettempdir()) / "attnlib-asr-attention")
    runs.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{OUT}.json"
    records = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if records.get("steps", args.steps) != args.steps:
        raise SystemExit(f"{path} holds {records['steps']}-step runs; use --steps {records['steps']} or move it")
    loads = []
    for seed in args.seeds:  # seed-major: every configuration gets its first seed first
        for name in names:
            print(f"{name} seed {seed}: training ...", flush=True)
            loads.append(os.getloadavg()[0])
            res = train(name, seed, args.steps, runs)
            if name != "ctc":
                res["decoding"] = decode_ablation(runs / f"{name}-s{seed}")
            loads.append(os.getloadavg()[0])
            if path.exists():  # another sweep may have added runs meanwhile: merge into the file's records
                records = json.loads(path.read_text())
            records["runs"].setdefault(name, {})[str(seed)] = res
            records = supersede(records)
            span = loads + [float(x) for x in str(records.get("load", "")).split("-") if x]  # earlier sweeps too
            write_tables(save_records(path, records, runs, steps=args.steps, load=f"{min(span):.1f}-{max(span):.1f}"))
            print(f"{name} seed {seed}: test CER {res['test_cer']:.4f} ({res['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
