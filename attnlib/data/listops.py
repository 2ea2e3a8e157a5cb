"""ListOps (Nangia & Bowman 2018) with the Long Range Arena generator's grammar (Tay et al. 2021).

A random expression tree: at depth < ``max_depth`` a node is an operator with probability
0.25 (else a digit 0-9); an operator - MAX, MIN, MED (integer part of the median), SM (sum
mod 10) - takes 2..``max_args`` arguments. Its token sequence is
``[OP arg arg ... ]`` (the LRA strings' parentheses carry no information and are dropped);
the label is the value, 0-9. Trees whose length (operators, digits and closing brackets)
lies strictly between ``min_length`` and ``max_length`` are kept, distinct ones only, as in
LRA (there: 500 < length < 2000; the defaults here are CPU-sized). Generated sets are
cached on disk.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlib.data.base import Batch, DataModule, cache_dir, stable_hash

__all__ = ["VOCAB", "ListOpsData", "evaluate_listops", "generate_listops"]

OPS = ("[MAX", "[MIN", "[MED", "[SM")
#: token vocabulary: 0 = padding, then digits, operators and the closing bracket.
VOCAB = ("<pad>", *[str(d) for d in range(10)], *OPS, "]")
_TOK = {t: i for i, t in enumerate(VOCAB)}
_VALUE_P = 0.25


class _TooLongError(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]) -> tuple[list[str], int]:
    """(tokens, value) of a random subtree; raises _TooLongError once the tree exceeds the token budget.

    Abandoning a tree that is already too long does not change the distribution of the trees
    that are kept (they never reach the budget).
    """
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLongError
    if depth >= max_depth or rng.random() > _VALUE_P:
        v = rng.randrange(10)
        return [str(v)], v
    n = rng.randint(2, max_args)
    toks: list[str] = []
    vals: list[int] = []
    for _ in range(n):
        t, v = _tree(rng, depth + 1, max_depth, max_args, budget)
        toks += t
        vals.append(v)
    op = rng.choice(OPS)
    budget[0] -= 1  # the closing bracket
    if budget[0] < 0:
        raise _TooLongError
    return [op, *toks, "]"], _apply(op, vals)


def _apply(op: str, vals: list[int]) -> int:
    if op == "[MAX":
        return max(vals)
    if op == "[MIN":
        return min(vals)
    if op == "[MED":
        return int(np.median(vals))
    return sum(vals) % 10


def evaluate_listops(tokens: list[str]) -> int:
    """Value of a ListOps token sequence (a stack evaluator, independent of the generator)."""
    stack: list[list[Any]] = []
    result = None
    for t in tokens:
        if t in OPS:
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            v = _apply(op, args)
            if stack:
                stack[-1].append(v)
            else:
                result = v
        else:
            if stack:
                stack[-1].append(int(t))
            else:
                result = int(t)
    if result is None or stack:
        raise ValueError("unbalanced ListOps expression")
    return result


def generate_listops(
    num: int, *, min_length: int, max_length: int, max_depth: int = 10, max_args: int = 10, seed: int = 0
) -> list[tuple[list[str], int]]:
    """``num`` distinct (tokens, value) examples with min_length < len(tokens) < max_length."""
    if max_length - min_length < 2:
        raise ValueError(f"listops: need max_length - min_length >= 2, got {min_length}..{max_length}")
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out = []
    tries = 0
    while len(out) < num:
        tries += 1
        if tries > 2000 * num + 100000:
            raise RuntimeError(
                f"listops: could not generate {num} examples with {min_length} < length < {max_length}; widen the range"
            )
        try:
            toks, v = _tree(rng, 1, max_depth, max_args, [max_length - 1])
        except _TooLongError:
            continue
        if min_length < len(toks) < max_length and tuple(toks) not in seen:
            seen.add(tuple(toks))
            out.append((toks, v))
    return out


class ListOpsData(DataModule):
    """ListOps: batches ``{"x": (B, N) long (0-padded), "mask": (B, N) bool, "y": (B,) long}``.

    Batches are padded to their longest sequence.

    Args:
        min_length, max_length, max_depth, max_args: generator settings (LRA: 500, 2000, 10, 10).
        num_train, num_val, num_test: examples per split (LRA: 96000, 2000, 2000).
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.
    """

    task = "classify"
    name = "listops"

    def __init__(
        self,
        *,
        min_length: int = 32,
        max_length: int = 128,
        max_depth: int = 10,
        max_args: int = 10,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 2000,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.gen = {"min_length": min_length, "max_length": max_length, "max_depth": max_depth, "max_args": max_args}
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.data: dict[str, tuple[list[Tensor], Tensor]] = {}

    def setup(self) -> None:
        total = sum(self.sizes.values())
        key = stable_hash("listops", self.gen, total, self.seed)
        path = cache_dir(self.cache_path) / f"listops-{key}.npz"
        if not path.exists():
            ex = generate_listops(total, seed=self.seed, **self.gen)
            lens = np.array([len(t) for t, _ in ex])
            flat = np.array([_TOK[t] for toks, _ in ex for t in toks], dtype=np.int8)
            labels = np.array([v for _, v in ex], dtype=np.int64)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, lens=lens, flat=flat, labels=labels)
            tmp.replace(path)
        z = np.load(path)
        seqs = [torch.from_numpy(s.astype(np.int64)) for s in np.split(z["flat"], np.cumsum(z["lens"])[:-1])]
        labels = torch.from_numpy(z["labels"])
        start = 0
        for split, n in self.sizes.items():
            self.data[split] = (seqs[start : start + n], labels[start : start + n])
            start += n

    def num_train(self) -> int:
        return self.sizes["train"]

    def eval_examples(self, split: str) -> int:
        return self.sizes[split]

    @staticmethod
    def _pad(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
        n = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = s
        return x, x != 0

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        seqs, y = self.data["train"]
        x, m = self._pad([seqs[i] for i in indices.tolist()])
        return {"x": x, "mask": m, "y": y[indices]}

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        seqs, y = self.data[split]
        x, m = self._pad(seqs[start:end])
        return {"x": x, "mask": m, "y": y[start:end]}

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": len(VOCAB), "num_classes": 10}
