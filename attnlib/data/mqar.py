"""Multi-query associative recall (MQAR; Arora, Eyuboglu et al. 2023, "Zoology").

Each sequence starts with ``num_kv_pairs`` key-value pairs (keys from the lower half of the
vocabulary excluding 0, values from the upper half, all distinct within a sequence); the rest
holds each key once more as a query, at gaps drawn from the power law
``p(g) ∝ g^(power_a - 1)`` over the even positions of the query region, and the model must
predict the key's value at the query position's next token. Other positions are random
tokens (``random_non_queries``). Labels are -100 except at the queries' next positions.
This follows the Zoology generator's construction; the arrays are generated here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlib.data.base import Batch, DataModule

__all__ = ["MQARData", "multiquery_ar"]

IGNORE = -100


def multiquery_ar(
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Generate MQAR examples: inputs (E, seq_len) long and labels (E, seq_len) long (-100 = ignore).

    ``labels[e, t]`` is the target for the prediction made at position t (the value of the
    key queried at position t), as in causal LM training with pre-shifted labels.
    """
    if seq_len % 2:
        raise ValueError(f"mqar: seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"mqar: vocab_size ({vocab_size}) must exceed seq_len ({seq_len})")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"mqar: need 4 * num_kv_pairs <= seq_len, got num_kv_pairs={num_kv_pairs}, seq_len={seq_len}")
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"mqar: num_kv_pairs={num_kv_pairs} exceeds the {half - 1} available keys")
    rng = np.random.default_rng(seed)
    ctx = 2 * num_kv_pairs
    # distinct keys (1..half-1) and values (half..V-1) per example: argsort of uniform noise
    keys = np.argsort(rng.random((num_examples, half - 1)), axis=1)[:, :num_kv_pairs] + 1
    vals = np.argsort(rng.random((num_examples, vocab_size - half)), axis=1)[:, :num_kv_pairs] + half
    space = (seq_len - ctx) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    # gaps: num_kv_pairs distinct slots out of `space`, drawn without replacement with weights p
    # (Gumbel top-k = sequential sampling without replacement)
    gumbel = -np.log(-np.log(rng.random((num_examples, space))))
    gaps = np.argsort(-(np.log(p)[None, :] + gumbel), axis=1)[:, :num_kv_pairs]
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = vals
    qpos = ctx + 2 * gaps
    np.put_along_axis(inputs, qpos, keys, axis=1)
    labels = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, qpos, vals, axis=1)
    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, filler, inputs)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


class MQARData(DataModule):
    """MQAR: batches ``{"tokens": (B, N) long, "labels": (B, N) long}`` (-100 = no target).

    Args:
        vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries: generator settings.
        num_train, num_val, num_test: examples per split (fixed sets, different seeds).
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.
    """

    task = "recall"
    name = "mqar"

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        seq_len: int = 64,
        num_kv_pairs: int = 8,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        num_train: int = 100_000,
        num_val: int = 1000,
        num_test: int = 3000,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.gen = {
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "num_kv_pairs": num_kv_pairs,
            "power_a": power_a,
            "random_non_queries": random_non_queries,
        }
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.data: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self) -> None:
        for i, (split, n) in enumerate(self.sizes.items()):
            self.data[split] = multiquery_ar(n, seed=self.seed * 1000 + 17 * (i + 1), **self.gen)

    def num_train(self) -> int:
        return self.sizes["train"]

    def eval_examples(self, split: str) -> int:
        return self.sizes[split]

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        x, y = self.data["train"]
        return {"tokens": x[indices], "labels": y[indices]}

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        x, y = self.data[split]
        return {"tokens": x[start:end], "labels": y[start:end]}

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.gen["vocab_size"]}
