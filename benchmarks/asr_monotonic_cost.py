"""Cost of monotonic (MoChA) cross-attention in the attention-decoder ASR model (CPU, one thread).

Builds ``experiment=asr_digits_aed`` twice - softmax and monotonic cross-attention, the same
initialisation otherwise - and times, alternating between the two in one process: a training step
(forward + backward, batch 32 of the validation split) and the joint beam search over 8 utterances
(untrained models: hypotheses run to the frame limit, the worst case for the monotonic
cross-attention, which is recomputed over each hypothesis' prefix). Also times the expected
alignment and the chunk weights alone at the digits shapes. Writes
benchmarks/results/asr_monotonic_cost.{md,json}.

    python benchmarks/asr_monotonic_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

OUT = "asr_monotonic_cost"


def build(overrides: list[str]):
    """(model, data) of ``experiment=asr_digits_aed`` with the overrides, seed 0."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from attnlib.data import build_data
    from attnlib.models import build_model

    with initialize_config_module("attnlib.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=asr_digits_aed", *overrides])
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True))
    data.ensure_setup()
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.attention, **data.model_kwargs()), data


def record_commit() -> str:
    """This checkout's commit (the attnlib imported)."""
    return str(machine_info()["commit"])


def main() -> None:
    """Time both models alternately; write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=OUT, help=f"results name (default {OUT})")
    ap.add_argument("--code", default=None, help="the commit of the attnlib imported, when not this checkout's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from attnlib.functional.monotonic import chunkwise_weights, expected_alignment

    models = {"softmax": build([])[0], "monotonic": build(["attention@model.cross_attention=monotonic"])[0]}
    _, data = build([])
    batch = next(iter(data.eval_batches("val")))
    wave, lengths = batch["wave"][:32], batch["lengths"][:32]
    targets, target_lengths = batch["targets"][:32], batch["target_lengths"][:32]

    def train_step(m) -> float:
        m.train()
        m.zero_grad()
        t = time.perf_counter()
        m(wave, lengths, targets, target_lengths).backward()
        return time.perf_counter() - t

    def decode(m) -> float:
        m.eval()
        t = time.perf_counter()
        m.transcribe(wave[:8], lengths[:8])
        return time.perf_counter() - t

    load = [os.getloadavg()[0]]
    times: dict[str, dict[str, list[float]]] = {k: {"train_step": [], "decode_8": []} for k in models}
    for m in models.values():
        train_step(m)  # warm-up
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name]["train_step"].append(train_step(m))
    for _ in range(max(1, args.repeats - 2)):
        for name, m in models.items():
            times[name]["decode_8"].append(decode(m))
    # the two functions alone, one decoder layer's cross-attention at the digits shapes
    frames = int(models["softmax"].encode(wave, lengths)[1].max())
    g = torch.Generator().manual_seed(0)
    shape = (32, models["monotonic"].decoder.layers[0].cross_attn.num_heads, int(target_lengths.max()) + 1, frames)
    p = torch.sigmoid(torch.randn(shape, generator=g) - 2).requires_grad_()
    u = torch.randn(shape, generator=g).requires_grad_()
    parts: dict[str, list[float]] = {"expected_alignment": [], "chunk_weights_w4": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        alpha = expected_alignment(p)
        alpha.sum().backward()
        parts["expected_alignment"].append(time.perf_counter() - t)
        alpha = alpha.detach()
        t = time.perf_counter()
        chunkwise_weights(alpha, u, 4).sum().backward()
        parts["chunk_weights_w4"].append(time.perf_counter() - t)
    load.append(os.getloadavg()[0])
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    record = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "load": [round(x, 1) for x in load],
        "times_s": times,
        "parts_s": parts,
        "parts_shape": list(shape),
        "attnlib_code": args.code or record_commit(),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = [
        [k, f"{med['softmax'][k]:.2f}", f"{med['monotonic'][k]:.2f}", f"{med['monotonic'][k] / med['softmax'][k]:.2f}x"]
        for k in ("train_step", "decode_8")
    ]
    info = record["machine"]
    text = (
        "# Monotonic (MoChA) cross-attention's cost in the attention-decoder ASR model (CPU)\n\n"
        f"Machine: `{info['cpu']}`, torch {info['torch']}, attnlib at commit {record['attnlib_code']}, "
        f"{record['date']}; one thread, "
        f"a shared 2-core machine, load average {record['load'][0]}-{record['load'][-1]}. `experiment=asr_digits_aed` "
        "with softmax vs monotonic (chunk 4) cross-attention, untrained, timed alternately in one process "
        f"(medians of {args.repeats}): a training step (forward + backward, batch 32) and the joint beam "
        "search (beam 4) over 8 utterances, where untrained hypotheses run to the frame limit - the worst "
        "case for the monotonic cross-attention, recomputed over each prefix. "
        "Rerun: `python benchmarks/asr_monotonic_cost.py`.\n\n"
        + markdown_table(["seconds", "softmax", "monotonic", "ratio"], rows)
        + f"\n\nThe two monotonic functions alone (one decoder layer, shape (B, H, N, M) = {tuple(shape)}, "
        f"forward + backward, median): expected alignment {statistics.median(parts['expected_alignment']):.3f} s, "
        f"chunk weights (w = 4) {statistics.median(parts['chunk_weights_w4']):.3f} s.\n"
    )
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
