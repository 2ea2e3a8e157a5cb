"""NAMM-style KV-cache eviction on CPU: bits per character vs cache evicted, lm_chars DecoderLM.

    .venv/bin/python benchmarks/namm_cpu.py [--work DIR] [--steps 300] [--seqs 16]

1. Trains (once, cached in ``--work``) the softmax ``experiment=lm_chars`` DecoderLM for
   ``--steps`` steps (the experiment's 2000 take too long on a shared 2-core machine).
2. Evaluates bits per character with *cached token-by-token decoding* (teacher forcing) on
   ``--seqs`` test windows of the model's 256-character context (16 x 256 = 4096 characters):
   no eviction (must equal the full forward pass), then ``namm`` eviction (every layer, every
   ``delay`` = 32 tokens; the newest ``protect_last`` tokens are never evicted) with
   * for reference, recency only (every entry but the newest ``protect_last`` evicted);
   * a fixed "heavy-hitter" scorer: score = (DC of the EMA spectrum of the attention a token
     received, scaled so uniform attention = n_fft/2 * EMA mass) - theta, at several theta
     (the eviction strength): tokens that received little attention lately are evicted;
   * the scorer evolved from the best fixed one by :func:`attnlib.pruning.evolve` on validation
     windows, fitness = fraction evicted, minus a penalty when bpc exceeds +4% of no-eviction.
3. Reports the fraction of the cache evicted (1 - held entries / entries without eviction,
   averaged over decoding steps, layers and sequences; and at the last step) and bpc relative
   to no eviction. Target: bpc within 5% while evicting >= 30%.

Writes benchmarks/results/namm_cpu.{json,md}. Shared, busy machine: only the bpc/memory numbers
matter here (no timing claims).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from attnlib.bench.machine import machine_info
from attnlib.data import build_data
from attnlib.models import build_model
from attnlib.pruning import evolve

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
sys.path.insert(0, str(ROOT))
from _common import default_work_dir, portable_paths  # noqa: E402

NAMM = {"name": "namm", "n_fft": 32, "hop": 16, "delay": 32, "protect_last": 16, "hidden": 25}


def train(work: Path, steps: int) -> Path:
    """Train (once) the lm_chars softmax LM for ``steps`` steps; returns the checkpoint path."""
    run = work / "lm_chars"
    if not (run / "results.json").exists():
        exe = Path(sys.executable).parent / "attnlib-train"
        cmd = [
            str(exe),
            "experiment=lm_chars",
            f"trainer.max_steps={steps}",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=100",
            "trainer.threads=1",
            "trainer.progress=false",
            f"hydra.run.dir={run}",
            "resume=true",
        ]
        subprocess.run(cmd, check=True)
    return run / "checkpoints" / "last.pt"


def build(ck: dict[str, Any], data: Any, pruning: dict | None) -> Any:
    """The checkpoint's DecoderLM (eval) with ``pruning`` (None = plain)."""
    cfg = OmegaConf.create(ck["config"])
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    mcfg["pruning"] = pruning
    m = build_model(mcfg, OmegaConf.to_container(cfg.attention, resolve=True), **data.model_kwargs())
    missing, unexpected = m.load_state_dict(ck["model"], strict=False)
    if unexpected or [k for k in missing if "pruning" not in k]:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return m.eval()


@torch.no_grad()
def decode_bpc(model: Any, tokens: Tensor) -> dict[str, float]:
    """Teacher-forced cached decoding of tokens (B, T+1): bpc and fraction of the cache evicted."""
    b, t1 = tokens.shape
    cache = model.init_cache(b)
    nll = 0.0
    held = full = 0.0
    for t in range(t1 - 1):
        logits = model(tokens[:, t : t + 1], cache=cache)[:, -1].float()
        nll += float(F.cross_entropy(logits, tokens[:, t + 1], reduction="sum"))
        for c in cache.layers:
            held += float(c.valid.sum()) if c.valid is not None else b * c.size
            full += b * c.length
    last = cache.layers
    held_last = sum(float(c.valid.sum()) if c.valid is not None else b * c.size for c in last)
    return {
        "bpc": nll / (b * (t1 - 1)) / math.log(2),
        "evicted": 1.0 - held / full,
        "evicted_last": 1.0 - held_last / sum(b * c.length for c in last),
    }


def heavy_hitter(model: Any, theta: float) -> None:
    """Set the shared scorer to score = DC feature - theta (one ReLU unit reads the DC feature)."""
    sc = model.pruning.get(model.pruning.layers[0]).scorer
    with torch.no_grad():
        for p in sc.parameters():
            p.zero_()
        sc.fc1.weight[0, 0] = 1.0
        sc.fc2.weight[0, 0] = 1.0
        sc.fc2.bias.fill_(-theta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="run cache (default $TMPDIR/attnlib-pruning)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--thetas", default="4,8,12,16,24,32")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = Path(args.work) if args.work else default_work_dir("attnlib-pruning")
    ck = torch.load(train(work, args.steps), map_location="cpu", weights_only=False)
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.create(ck["config"])
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True))
    data.ensure_setup()
    test = data.eval_collate("test", 0, args.seqs)["tokens"]
    val = data.eval_collate("val", 0, 4)["tokens"]

    plain = build(ck, data, None)
    with torch.no_grad():
        logits = plain(test[:, :-1]).float()
    bpc_forward = float(F.cross_entropy(logits.flatten(0, 1), test[:, 1:].flatten())) / math.log(2)
    rows: list[dict[str, Any]] = []
    ref = decode_bpc(plain, test)
    rows.append({"config": "no eviction (cached decoding)", **ref})
    ref_val = decode_bpc(plain, val)["bpc"]

    model = build(ck, data, NAMM)
    rows.append({"config": "namm, untrained scorer (score 0: keeps all)", **decode_bpc(model, test)})
    heavy_hitter(model, math.inf)  # every unprotected entry scores -inf: a recency window, for reference
    rows.append({"config": f"recency only: evict all but the newest {NAMM['protect_last']}", **decode_bpc(model, test)})
    best_theta, best_ev = None, -1.0
    for theta in [float(x) for x in args.thetas.split(",")]:
        heavy_hitter(model, theta)
        r = decode_bpc(model, test)
        rows.append({"config": f"namm, heavy-hitter scorer theta={theta:g}", **r})
        if r["bpc"] <= 1.04 * ref["bpc"] and r["evicted"] > best_ev:
            best_theta, best_ev = theta, r["evicted"]
        print(rows[-1], flush=True)

    evo: dict[str, Any] = {}
    if args.generations > 0:
        if best_theta is None:  # no fixed scorer within +4%: start from the mildest
            best_theta = float(args.thetas.split(",")[0])
        heavy_hitter(model, best_theta)
        scorer = model.pruning.get(model.pruning.layers[0]).scorer

        def fitness() -> float:
            r = decode_bpc(model, val)
            return r["evicted"] - 10.0 * max(0.0, r["bpc"] / ref_val - 1.04)

        res = evolve(
            scorer,
            fitness,
            generations=args.generations,
            population=args.population,
            sigma=0.065,
            seed=0,
            callback=lambda e: print("evolve", e, flush=True),
        )
        evo = {"start_theta": best_theta, "history": res.history, "best_fitness_val": res.best_fitness}
        label = f"namm, evolved scorer (ES from theta={best_theta:g}, val fitness)"
        rows.append({"config": label, **decode_bpc(model, test)})

    for r in rows:
        r["bpc_rel"] = r["bpc"] / ref["bpc"]
        r["meets_bar"] = bool(r["bpc_rel"] <= 1.05 and r["evicted"] >= 0.30)
    meta = machine_info(args.threads)
    meta.update(
        note="shared, busy machine; no timing claims here",
        lm_steps=args.steps,
        lm_results=json.loads((work / "lm_chars" / "results.json").read_text()),
        eval_chars=int(test.shape[0] * (test.shape[1] - 1)),
        bpc_full_forward=bpc_forward,
        namm=NAMM,
        evolve=evo,
        seconds=time.perf_counter() - t_start,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    payload = portable_paths({"meta": meta, "rows": rows}, work)
    (OUT / "namm_cpu.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [
        "# NAMM-style KV-cache eviction: lm_chars DecoderLM (softmax), bits per character vs cache evicted",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {args.threads} thread(s) - busy, shared machine (no timings "
        f"reported). LM: `attnlib-train experiment=lm_chars trainer.max_steps={args.steps}`. Evaluation: cached "
        f"token-by-token decoding of {meta['eval_chars']} test characters ({test.shape[0]} windows of "
        f"{test.shape[1] - 1}); full forward pass bpc {bpc_forward:.4f}. namm: every layer, evict every "
        f"{NAMM['delay']} tokens, newest {NAMM['protect_last']} protected, STFT n_fft {NAMM['n_fft']} hop "
        f"{NAMM['hop']}. `evicted` = 1 - held cache entries / entries without eviction, averaged over steps, "
        "layers and sequences; `at end` = after the last token. Rerun: `python benchmarks/namm_cpu.py`.",
        "",
        "| config | bpc | bpc vs no eviction | evicted (mean) | evicted (at end) | bar (<= +5%, >= 30%) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['bpc']:.4f} | {100 * (r['bpc_rel'] - 1):+.2f}% | {100 * r['evicted']:.1f}% | "
            f"{100 * r['evicted_last']:.1f}% | {'yes' if r['meets_bar'] else 'no'} |"
        )
    (OUT / "namm_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
