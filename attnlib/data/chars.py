"""Character-level (byte-level) language modelling over local text files.

Default corpus: the ``.py`` files of the running Python's standard library (found with
``sysconfig``; site-/dist-packages excluded). Files are assigned to train/val/test by a hash
of their path relative to the corpus root (90/5/5 by default) - deterministic and
independent of the file count - and concatenated in sorted order, separated by a blank
line. Symbols are bytes (V = 256), so bits per character are bits per byte (the stdlib is
almost all ASCII). The corpus is cached as ``.npy`` files.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlib.data.base import Batch, DataModule, cache_dir, seeded_generator, stable_hash

__all__ = ["CharsData", "stdlib_root"]


def stdlib_root() -> Path:
    """Directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


class CharsData(DataModule):
    """Byte-level LM data: batches ``{"tokens": (B, seq_len + 1) long}`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Args:
        root: corpus directory (default: the stdlib); pattern: file glob (default ``*.py``).
        seq_len: training/eval context length.
        val_fraction, test_fraction: fraction of files (by path hash) in val and test.
        max_eval_tokens: evaluate on the first this many bytes of a split (non-overlapping windows).
        seed, batch_size, eval_batch_size, cache_dir: see :class:`DataModule`.

    Training windows start at uniformly random offsets of the train stream (seeded by step).
    """

    task = "lm"
    name = "chars"

    def __init__(
        self,
        *,
        root: str | None = None,
        pattern: str = "*.py",
        seq_len: int = 256,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_eval_tokens: int = 262144,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.root = Path(root).expanduser() if root else stdlib_root()
        self.pattern, self.seq_len = pattern, int(seq_len)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_eval_tokens = int(max_eval_tokens)
        self.streams: dict[str, Tensor] = {}

    def _files(self) -> list[Path]:
        skip = {"site-packages", "dist-packages", "__pycache__"}
        files = sorted(
            f
            for f in self.root.rglob(self.pattern)
            if f.is_file() and not skip.intersection(f.relative_to(self.root).parts)
        )
        if not files:
            raise FileNotFoundError(f"chars data: no files matching {self.pattern!r} under {self.root}")
        return files

    def _split_of(self, rel: str) -> str:
        u = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 2**32
        if u < self.test_fraction:
            return "test"
        if u < self.test_fraction + self.val_fraction:
            return "val"
        return "train"

    def setup(self) -> None:
        files = self._files()
        rels = [str(f.relative_to(self.root)) for f in files]
        key = stable_hash(
            "chars", str(self.root), rels, [f.stat().st_size for f in files], self.val_fraction, self.test_fraction
        )
        base = cache_dir(self.cache_path) / f"chars-{key}"
        paths = {s: base.with_name(base.name + f"-{s}.npy") for s in ("train", "val", "test")}
        if not all(p.exists() for p in paths.values()):
            parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
            for f, rel in zip(files, rels):
                parts[self._split_of(rel)].append(f.read_bytes() + b"\n\n")
            for s, p in paths.items():
                arr = np.frombuffer(b"".join(parts[s]), dtype=np.uint8)
                tmp = p.with_name(p.name + ".tmp.npy")
                np.save(tmp, arr)
                tmp.replace(p)
        for s, p in paths.items():
            self.streams[s] = torch.from_numpy(np.load(p).astype(np.int64))
            if len(self.streams[s]) < self.seq_len + 2:
                raise ValueError(f"chars data: the {s} split has only {len(self.streams[s])} bytes; need > seq_len")

    def num_train(self) -> int:
        self.ensure_setup()
        return len(self.streams["train"]) - self.seq_len - 1

    def train_indices(self, step: int) -> Tensor:
        # Uniform random window starts (a stream has no natural epoch); seeded by (seed, step).
        return torch.randint(0, self.num_train(), (self.batch_size,), generator=seeded_generator(self.seed, 3, step))

    def position(self, step: int) -> dict[str, int]:
        return {"windows_seen": step * self.batch_size, "tokens_seen": step * self.batch_size * self.seq_len}

    def collate(self, indices: Tensor, gen: torch.Generator | None) -> Batch:
        offs = indices[:, None] + torch.arange(self.seq_len + 1)[None, :]
        return {"tokens": self.streams["train"][offs]}

    def eval_examples(self, split: str) -> int:
        self.ensure_setup()
        n = min(len(self.streams[split]), self.max_eval_tokens + 1)
        return (n - 1) // self.seq_len

    def eval_collate(self, split: str, start: int, end: int) -> Batch:
        offs = torch.arange(start, end)[:, None] * self.seq_len + torch.arange(self.seq_len + 1)[None, :]
        return {"tokens": self.streams[split][offs]}

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": 256}

    def describe(self) -> str:
        self.ensure_setup()
        sizes = ", ".join(f"{s} {len(t) / 1e6:.1f} MB" for s, t in self.streams.items())
        return f"chars: {self.root} ({self.pattern}): {sizes}; seq_len {self.seq_len}"
