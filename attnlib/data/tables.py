"""Synthetic tables for tabular in-context learning (a small random-SCM prior; nothing downloaded).

Each example is one whole table: ``num_train`` labelled rows and ``num_test`` rows whose labels
the model predicts in context (no gradient step per table), as tabular foundation models
(TabPFN, TabICL, Orion-BiX) are meta-trained on random structural causal models. A table here:

* a random MLP causal graph: root causes ``z ~ N(0, I_w)``, then ``layers`` layers
  ``h_l = act(h_{l-1} W_l) + noise`` with ``W_l ~ N(0, 1 / w)``, an activation per table (tanh,
  ReLU, sine or identity) and Gaussian noise of a per-table scale;
* ``num_features`` feature columns and one target column picked from the hidden nodes of all
  layers (distinct nodes), so features are causes, effects and siblings of the target;
* the target cut into ``C`` classes at random quantiles (C uniform in 2..``max_classes``), the
  class ids shuffled;
* features standardised with the training rows' mean and standard deviation.

Batches follow the ``recall`` task: ``tokens`` (B, S, F + 1) float - the features and, last, the
label of a training row (-1 for a test row) - and ``labels`` (B, S) long, the class of each test
row and -100 at the training rows. Table i of a split is a pure function of (seed, split, i).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlib.data.base import Batch, DataModule, seeded_generator

__all__ = ["IGNORE", "TablesData", "random_scm_table"]

IGNORE = -100
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}


def random_scm_table(
    gen: torch.Generator,
    *,
    num_features: int,
    num_rows: int,
    max_classes: int,
    width: int = 16,
    layers: int = 3,
) -> tuple[Tensor, Tensor, int]:
    """One random-SCM table: features (S, F) float32, classes (S,) long, number of classes C."""
    if num_features + 1 > width * layers:
        raise ValueError(f"tables: {num_features} features + 1 target need width * layers >= {num_features + 1}")
    act = int(torch.randint(0, 4, (), generator=gen))
    noise = float(torch.empty(()).uniform_(0.01, 0.3, generator=gen))
    h = torch.randn(num_rows, width, generator=gen)
    nodes = []
    for _ in range(layers):
        w = torch.randn(width, width, generator=gen) / width**0.5
        h = h @ w
        h = (torch.tanh(h), torch.relu(h), torch.sin(h), h)[act] + noise * torch.randn(num_rows, width, generator=gen)
        nodes.append(h)
    allnodes = torch.cat(nodes, 1)
    pick = torch.randperm(allnodes.shape[1], generator=gen)[: num_features + 1]
    x, t = allnodes[:, pick[:-1]], allnodes[:, pick[-1]].contiguous()
    c = int(torch.randint(2, max_classes + 1, (), generator=gen))
    qs = torch.sort(torch.rand(c - 1, generator=gen) * 0.8 + 0.1).values  # cut points away from the tails
    cuts = torch.quantile(t, qs)
    y = torch.bucketize(t, cuts)
    y = torch.randperm(c, generator=gen)[y]
    return x, y, c


class TablesData(DataModule):
    """Tabular in-context learning on random-SCM tables: ``{"tokens": (B, S, F + 1), "labels": (B, S)}``.

    Args:
        num_features: F columns per table.
        num_train, num_test: labelled rows and rows to predict per table (S = their sum).
        max_classes: classes per table are uniform in 2..max_classes.
        width, layers: size of the random causal MLP.
        num_tables: tables per epoch of the training split (generated on the fly).
        num_val, num_test_tables: tables of the evaluation splits.
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.
    """

    task = "recall"
    name = "tables"

    def __init__(
        self,
        *,
        num_features: int = 8,
        num_train: int = 64,
        num_test: int = 32,
        max_classes: int = 4,
        width: int = 16,
        layers: int = 3,
        num_tables: int = 100_000,
        num_val: int = 256,
        num_test_tables: int = 512,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if num_train < 1 or num_test < 1 or max_classes < 2 or num_features < 1:
            raise ValueError(
                "tables: need num_train >= 1, num_test >= 1, max_classes >= 2 and num_features >= 1, got "
                f"{num_train}, {num_test}, {max_classes}, {num_features}"
            )
        self.num_features, self.rows, self.max_classes = num_features, (num_train, num_test), max_classes
        self.width, self.layers = width, layers
        self.sizes = {"train": num_tables, "val": num_val, "test": num_test_tables}

    def table(self, split: str, i: int) -> tuple[Tensor, Tensor]:
        """Table i of a split: tokens (S, F + 1) and labels (S,)."""
        gen = seeded_generator(self.seed, 7, _SPLIT_ID[split], int(i))
        n_train, n_test = self.rows
        x, y, _ = random_scm_table(
            gen,
            num_features=self.num_features,
            num_rows=n_train + n_test,
            max_classes=self.max_classes,
            width=self.width,
            layers=self.layers,
        )
        mu, sd = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
        x = ((x - mu) / sd).clamp(-10, 10)
        shown = torch.cat([y[:n_train].float(), torch.full((n_test,), -1.0)])
        labels = torch.cat([torch.full((n_train,), IGNORE), y[n_train:]])
        return torch.cat([x, shown[:, None]], 1), labels

    def _batch(self, split: str, ids: list[int]) -> Batch:
        tables = [self.table(split, i) for i in ids]
        return {"tokens": torch.stack([t for t, _ in tables]), "labels": torch.stack([y for _, y in tables])}

    def num_train(self) -> int:
        return self.sizes["train"]

    def eval_examples(self, split: str) -> int:
        return self.sizes[split]

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        return self._batch("train", indices.tolist())

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        return self._batch(split, list(range(start, end)))

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "max_classes": self.max_classes}
