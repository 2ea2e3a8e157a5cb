"""Attention sorting (Peysakhovich & Lerer 2023) on a synthetic retrieval task with a tiny DecoderLM (CPU).

    .venv/bin/python benchmarks/attention_sorting.py [--steps 1500] [--train-docs 8] [--docs 16] [--test 512]

The task: a context of documents ``[key value]`` with distinct keys, then the query ``key*``;
the model must answer ``value*`` (associative recall). The model is trained on contexts of
``--train-docs`` documents followed by ``--queries`` queried documents repeated (multi-query
associative recall: each repeated key must predict its value; each queried document drawn
uniformly, or with a recency prior: among the last ``--recent`` documents except with
probability ``--anywhere``) and tested on longer contexts of
``--docs`` documents with one query. Early documents are then further from the query than any
key the model saw in training - the situation the paper describes, where information early in a
long context is used less.

For each position of the relevant document the script reports the answer accuracy (greedy, at
the query's last token) as is, and after one and two rounds of
:func:`attnlib.analysis.attention_sort` (documents re-ordered by the attention the query's last
token gives them, averaged over layers and heads, most attended last), plus how often the
relevant document ends up last.

Writes benchmarks/results/attention_sorting.{json,md}. No timings (shared, busy machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlib.analysis import attention_sort
from attnlib.bench.machine import machine_info
from attnlib.models import DecoderLM

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _common import markdown_table  # noqa: E402

KEY0 = 1  # keys: KEY0 .. KEY0 + keys - 1; values after them (token 0 unused)


def make_batch(
    batch: int, docs: int, keys: int, values: int, positions: Tensor, gen: torch.Generator
) -> tuple[list[list[Tensor]], Tensor, Tensor, Tensor]:
    """Contexts with the relevant document at ``positions`` (B,): (documents, queries, answers, tokens)."""
    val0 = KEY0 + keys
    all_docs, queries, answers, rows = [], [], [], []
    for b in range(batch):
        ks = torch.randperm(keys, generator=gen)[:docs] + KEY0
        vs = torch.randint(values, (docs,), generator=gen) + val0
        ds = [torch.tensor([int(k), int(v)]) for k, v in zip(ks, vs)]
        rel = int(positions[b])
        q = torch.tensor([int(ks[rel])])
        all_docs.append(ds)
        queries.append(q)
        answers.append(int(vs[rel]))
        rows.append(torch.cat([*ds, q]))
    return all_docs, torch.stack(queries), torch.tensor(answers), torch.stack(rows)


def train_model(args: argparse.Namespace) -> DecoderLM:
    """Train on contexts followed by ``--queries`` queried pairs ``[key value]`` repeated from the
    context; the loss is at the repeated keys (predicting their values), as in multi-query
    associative recall."""
    torch.manual_seed(args.seed)
    vocab = KEY0 + args.keys + args.values
    model = DecoderLM(attention={"variant": "softmax"}, vocab_size=vocab, dim=args.dim, depth=args.depth,
                      num_heads=args.heads, init="fan_in", tie_embeddings=False)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    b, nq = args.batch, args.queries
    model.train()
    for step in range(args.steps):
        n = args.train_docs
        recent = n - 1 - torch.randint(min(args.recent, n), (b, nq), generator=gen)
        anywhere = torch.randint(n, (b, nq), generator=gen)
        pos = torch.where(torch.rand(b, nq, generator=gen) < args.anywhere, anywhere, recent)
        docs, _, _, _ = make_batch(b, n, args.keys, args.values, pos[:, 0], gen)
        rows, targets = [], []
        for i in range(b):
            qa = [docs[i][p] for p in pos[i].tolist()]  # each queried pair repeated: its key predicts its value
            rows.append(torch.cat([*docs[i], *qa]))
            targets.append(torch.stack([q[1] for q in qa]))
        tok, tgt = torch.stack(rows), torch.stack(targets)
        at = 2 * n + 2 * torch.arange(nq)  # the query keys' positions: they predict the values
        loss = F.cross_entropy(model(tok)[:, at].flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def evaluate(model: DecoderLM, args: argparse.Namespace) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(args.seed + 2)
    per = max(1, args.test // args.docs)
    rows = []
    for p in range(args.docs):
        pos = torch.full((per,), p)
        docs, queries, ans, tok = make_batch(per, args.docs, args.keys, args.values, pos, gen)
        base = (model(tok)[:, -1].argmax(-1) == ans).float().mean().item()
        acc = {1: 0.0, 2: 0.0}
        last = {1: 0.0, 2: 0.0}
        for i in range(per):
            res = attention_sort(model, docs[i], queries[i], iterations=2)
            for r in (1, 2):
                order = res.order if r == 2 else res.history[1][0]
                t = torch.cat([*(docs[i][d] for d in order), queries[i]])[None]
                acc[r] += float(model(t)[0, -1].argmax() == ans[i]) / per
                last[r] += float(order[-1] == p) / per
        rows.append({"position": p, "examples": per, "accuracy": base, "accuracy_sorted_1": acc[1],
                     "accuracy_sorted_2": acc[2], "relevant_last_1": last[1], "relevant_last_2": last[2]})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--docs", type=int, default=16, help="documents per test context")
    p.add_argument("--train-docs", type=int, default=8, help="documents per training context")
    p.add_argument("--recent", type=int, default=4, help="training prior: a queried document is among the last R")
    p.add_argument("--anywhere", type=float, default=1.0, help="... except with this probability (1 = uniform)")
    p.add_argument("--queries", type=int, default=4, help="training: query-answer pairs per context")
    p.add_argument("--keys", type=int, default=32)
    p.add_argument("--values", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test", type=int, default=512, help="test contexts (spread over the positions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/attention_sorting", help="output path without suffix")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = train_model(args)
    rows = evaluate(model, args)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("position", "examples")}
    info = machine_info(args.threads)
    result = {"config": vars(args), "rows": rows, "mean": mean, "machine": info,
              "date": time.strftime("%Y-%m-%d"), "wall_seconds": round(time.time() - t0, 1)}  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["position", "accuracy", "accuracy_sorted_1", "accuracy_sorted_2", "relevant_last_1", "relevant_last_2"]
    table = markdown_table(cols, [[f"{r[k]:.3f}" if isinstance(r[k], float) else r[k] for k in cols] for r in rows])
    cmd = "python benchmarks/attention_sorting.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if p.get_default(k) != v
    )
    prior = (
        "uniformly"
        if args.anywhere >= 1
        else f"among the last {args.recent} documents with probability {1 - args.anywhere:.2f} (a recency prior), "
        "anywhere otherwise"
    )
    longer = (
        ", so early documents lie further from the query than anything seen in training"
        if args.docs > args.train_docs
        else ""
    )
    text = f"""# Attention sorting on synthetic key-value retrieval (DecoderLM, CPU)

Task: documents `[key value]` with distinct keys, then one of the keys; the answer is its
value (associative recall). A softmax DecoderLM (dim {args.dim}, depth {args.depth}, {args.heads} heads,
rotary positions) is trained for {args.steps} steps (batch {args.batch}) on contexts of {args.train_docs}
documents followed by {args.queries} of them repeated (each key predicting its value), each queried
document drawn {prior}. Test: contexts of {args.docs} documents and one query, {rows[0]["examples"]} per
position of the relevant document (0 = first){longer}. `sorted_r`: after r
rounds of `attnlib.analysis.attention_sort` (documents ordered by the attention the query's last
token gives them, averaged over layers and heads; most attended last); `relevant_last_r`: how
often the relevant document was moved last.

Machine: {info["cpu"]}, {info["cores"]} cores, {args.threads} thread(s), load average {info["loadavg"]};
torch {info["torch"]}; commit {info["commit"]}; {result["date"]}. Rerun: `{cmd.strip()}`.

Mean over positions: accuracy {mean["accuracy"]:.3f}, after one round {mean["accuracy_sorted_1"]:.3f},
after two rounds {mean["accuracy_sorted_2"]:.3f}; relevant document last after one round
{mean["relevant_last_1"]:.3f}, after two {mean["relevant_last_2"]:.3f}.

{table}
"""
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
