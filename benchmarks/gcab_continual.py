"""Gated class-attention (GCAB) on a 2-task class-incremental split of the digits: does it forget less?

Task A = digits 0-4, task B = digits 5-9, no exemplars. A ViT with ``pool="gated"`` (2 tasks:
per-task class token, head and HAT gates on one class-attention block) trains on A (everything),
then on B with the trunk frozen (patch embedding, positions, blocks) and only the class-attention
head learning. ``gated``: GCAB's recipe - the current task's gates soft with the scale annealed per
epoch (``1 / s_max -> s_max``), the gate-sparsity regulariser (lambda), gradients of the channels
task A took masked, embedding gradients compensated, embeddings clamped. ``ungated`` (control):
the same model and loop with every gate fixed at 1 (the plain shared class-attention block,
fine-tuned on B). Reported on the test digits after each task: task-aware accuracy (argmax
within the task's own classes), and task-agnostic accuracy (argmax over all active classes).

    python benchmarks/gcab_continual.py [--steps-a 800] [--steps-b 400] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from _vision import finish, start

from attnlib.data import DigitsData
from attnlib.functional.gating import gate_scale
from attnlib.models import ViT

BATCH = 64


def split(data: DigitsData, part: str, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.x[part], data.y[part]
    sel = (y >= 5 * task) & (y < 5 * task + 5)
    return x[sel], y[sel]


def train_task(model: ViT, data: DigitsData, task: int, steps: int, *, gated: bool, lam: float, seed: int) -> None:
    head = model.pool_head
    assert head is not None
    x, y = split(data, "train", task)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    per_epoch = math.ceil(len(y) / BATCH)
    g = torch.Generator().manual_seed(1000 * seed + task)
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(y), generator=g)
        idx = perm[(step % per_epoch) * BATCH : (step % per_epoch + 1) * BATCH]
        head.scale = gate_scale(step % per_epoch, per_epoch, head.s_max) if gated else head.s_max
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if gated:
            loss = loss + lam * head.regularizer()
        opt.zero_grad()
        loss.backward()
        if gated:
            head.mask_gradients()
        else:  # the control: earlier tasks' tokens and heads are frozen too, only the gates differ
            for p, t in ((head.cls_tokens, head.task),):
                p.grad[:t] = 0
            for h in head.heads[: head.task]:
                for p in h.parameters():
                    p.grad.zero_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if gated:
            head.clamp_embeddings()
    head.scale = head.s_max
    model.eval()


@torch.no_grad()
def evaluate(model: ViT, data: DigitsData, tasks: int) -> dict[str, float]:
    out = {}
    for t in range(tasks):
        x, y = split(data, "test", t)
        logits = model(x)
        out[f"task{t}_aware"] = float((logits[:, 5 * t : 5 * t + 5].argmax(-1) + 5 * t == y).float().mean())
        out[f"task{t}_agnostic"] = float((logits.argmax(-1) == y).float().mean())
    return out


def run(gated: bool, seed: int, steps_a: int, steps_b: int, lam: float) -> dict:
    torch.manual_seed(seed)
    data = DigitsData(seed=seed)
    data.ensure_setup()
    model = ViT(
        attention={"variant": "softmax"},
        img_size=8,
        patch_size=2,
        num_classes=10,
        dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        pool="gated",
        class_attention={"num_tasks": 2},
    )
    head = model.pool_head
    assert head is not None
    if not gated:
        with torch.no_grad():
            head.e0.fill_(head.thres_emb)
            head.e2.fill_(head.thres_emb)  # sigmoid(s_max * 6) == 1: every gate open
        head.e0.requires_grad_(False)
        head.e2.requires_grad_(False)
    train_task(model, data, 0, steps_a, gated=gated, lam=lam, seed=seed)
    after_a = evaluate(model, data, 1)
    head.next_task()
    for name, p in model.named_parameters():
        if not name.startswith("pool_head."):
            p.requires_grad_(False)  # the trunk is frozen for task B
    train_task(model, data, 1, steps_b, gated=gated, lam=lam, seed=seed)
    after_b = evaluate(model, data, 2)
    used = float(head.taken0.mean())
    return {"seed": seed, "after_task_a": after_a, "after_task_b": after_b, "task_a_channels_taken": used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-a", type=int, default=800)
    ap.add_argument("--steps-b", type=int, default=400)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lam", type=float, default=0.05, help="weight of the gate regulariser (GCAB: 0.05)")
    args = ap.parse_args()
    meta = start()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    records = {}
    for method in ("ungated", "gated"):
        runs = []
        for seed in seeds:
            print(f"{method} seed {seed} ...", flush=True)
            r = run(method == "gated", seed, args.steps_a, args.steps_b, args.lam)
            print(f"  {r}", flush=True)
            runs.append(r)
        records[method] = runs

    def mean(method: str, stage: str, key: str) -> str:
        vals = [r[stage][key] for r in records[method]]
        return f"{100 * statistics.mean(vals):.1f}%" + (
            f" (±{100 * statistics.stdev(vals):.1f})" if len(vals) > 1 else ""
        )

    rows = []
    for method, label in (("ungated", "ungated class-attention (control)"), ("gated", "gated class-attention (GCAB)")):
        rows.append(
            [
                label,
                mean(method, "after_task_a", "task0_aware"),
                mean(method, "after_task_b", "task0_aware"),
                mean(method, "after_task_b", "task1_aware"),
                mean(method, "after_task_b", "task0_agnostic"),
                mean(method, "after_task_b", "task1_agnostic"),
            ]
        )
    md = (
        "# Gated class-attention: 2-task class-incremental digits (0-4, then 5-9), no exemplars\n\n<!-- machine -->"
        f'ViT (dim 64, depth 4, 4 heads, softmax) with `pool="gated"`; task A {args.steps_a} steps (all parameters), '
        f"task B {args.steps_b} steps (trunk frozen, class-attention head only), AdamW lr 2e-3, batch {BATCH}, "
        f"gate regulariser lambda {args.lam}, s_max 800, seeds {seeds} (mean ± std). Task-aware: argmax within the "
        "task's 5 classes; task-agnostic: argmax over all 10 active classes (no task id).\n\n"
        + markdown_table(
            [
                "method",
                "A task-aware after A",
                "A task-aware after B",
                "B task-aware after B",
                "A task-agnostic after B",
                "B task-agnostic after B",
            ],
            rows,
        )
        + "\n"
    )
    finish("gcab_continual", meta, {"args": vars(args), "records": records}, md)
    print(md)


if __name__ == "__main__":
    main()
