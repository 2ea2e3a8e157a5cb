"""Base class of the data modules: deterministic, resumable batches without downloads.

A data module produces the *global* training batch of any step as a pure function of
``(seed, step)`` - samples are drawn epoch by epoch from a permutation seeded by
``(seed, epoch)``, random augmentation from a generator seeded by ``(seed, step)`` - so a
run resumed from a checkpoint at step s sees exactly the batches an uninterrupted run would,
and each DDP rank takes its own slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["DataModule", "cache_dir", "seeded_generator", "stable_hash"]

Batch = dict[str, Any]


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where generated data is cached: ``path``, else $ATTNLIB_CACHE, else ~/.cache/attnlib."""
    p = Path(path or os.environ.get("ATTNLIB_CACHE") or Path.home() / ".cache" / "attnlib").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def stable_hash(*parts: object) -> str:
    """A short hex digest of the reprs of ``parts`` (stable across processes, unlike hash())."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded by a stable mix of the integers ``parts``."""
    g = torch.Generator()
    g.manual_seed(int(stable_hash(*parts), 16) % (2**63 - 1))
    return g


class DataModule:
    """Base class. Subclasses set ``task`` and implement :meth:`setup`, :meth:`num_train`,
    :meth:`collate`, :meth:`eval_examples` and :meth:`model_kwargs`.

    Args:
        seed: data seed (splits, epoch order, augmentation).
        batch_size: global training batch size (split across DDP ranks).
        eval_batch_size: evaluation batch size per rank.
        cache_dir: where generated data is cached (see :func:`cache_dir`).
    """

    task: ClassVar[str] = "?"
    name: ClassVar[str] = "?"

    def __init__(
        self, *, seed: int = 0, batch_size: int = 64, eval_batch_size: int = 256, cache_dir: str | None = None
    ) -> None:
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.cache_path = cache_dir
        self._perm: dict[int, Tensor] = {}
        self._ready = False

    # -- to implement ------------------------------------------------------------------------

    def setup(self) -> None:
        """Load or generate the data (cached on disk where generating is slow)."""

    def num_train(self) -> int:
        """Number of training examples (one epoch)."""
        raise NotImplementedError

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        """The training batch of these example indices; ``gen`` drives augmentation."""
        raise NotImplementedError

    def eval_examples(self, split: str) -> int:
        """Number of examples of ``split`` ("val" or "test")."""
        raise NotImplementedError

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        """Evaluation batch of examples start..end of ``split`` (no augmentation)."""
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Sizes the model must be built with (num_classes, vocab_size, img_size, ...)."""
        return {}

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{self.name}: {self.num_train()} train, {self.eval_examples('val')} val, {self.eval_examples('test')} test"
        )

    # -- shared ---------------------------------------------------------------------------------

    def ensure_setup(self) -> None:
        """Call :meth:`setup` once."""
        if not self._ready:
            self.setup()
            self._ready = True

    def _epoch_perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.clear()
            self._perm[epoch] = torch.randperm(self.num_train(), generator=seeded_generator(self.seed, 1, epoch))
        return self._perm[epoch]

    def train_indices(self, step: int) -> Tensor:
        """Example indices of the global batch of ``step`` (epoch-wise permutations, no drops)."""
        n, b = self.num_train(), self.batch_size
        pos = torch.arange(step * b, (step + 1) * b)
        out = torch.empty(b, dtype=torch.long)
        epochs = pos // n
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._epoch_perm(e)[pos[sel] % n]
        return out

    def position(self, step: int) -> dict[str, int]:
        """Data position after ``step`` batches: epoch and offset within it (for checkpoints)."""
        p = step * self.batch_size
        return {"epoch": p // self.num_train(), "offset": p % self.num_train(), "samples_seen": p}

    def train_batch(self, step: int, *, rank: int = 0, world: int = 1) -> Batch:
        """This rank's share of the global training batch of ``step``.

        The global batch (examples and augmentation) depends on ``(seed, step)`` only; rank r
        of ``world`` gets rows ``r * B / world .. (r + 1) * B / world`` of it, so DDP training
        sees the same data as a single process.
        """
        self.ensure_setup()
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by the number of processes ({world})")
        batch = self.collate(self.train_indices(step), seeded_generator(self.seed, 2, step))
        if world == 1:
            return batch
        per = self.batch_size // world
        return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}

    def eval_batches(self, split: str, *, rank: int = 0, world: int = 1, limit: int | None = None) -> Iterator[Batch]:
        """Batches of ``split`` for this rank (rank r gets batches r, r + world, ...)."""
        self.ensure_setup()
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        n = self.eval_examples(split)
        if limit is not None:
            n = min(n, limit)
        for i, start in enumerate(range(0, n, self.eval_batch_size)):
            if i % world == rank:
                yield self.eval_collate(split, start, min(n, start + self.eval_batch_size))
