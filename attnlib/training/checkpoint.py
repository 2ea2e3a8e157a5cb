"""Atomic checkpoints: write to a temporary file in the same directory, fsync, rename.

A process killed at any moment leaves either the previous checkpoint or the new one, never
a torn file: ``os.replace`` is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "atomic_save",
    "capture_rng",
    "checkpoint_path",
    "load_checkpoint",
    "restore_rng",
]

#: Entries of a checkpoint written by the trainer that resuming needs.
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "scaler", "step", "train_seconds", "rng", "log_state")


class CheckpointError(ValueError):
    """A file that should be a trainer checkpoint cannot be used: the message names the file and the problem."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save ``obj`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(source: str | os.PathLike[str]) -> Path:
    """The checkpoint file of ``source``: the file itself, or ``<source>/checkpoints/last.pt`` for a run dir."""
    p = Path(source).expanduser()
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    required: tuple[str, ...] = (),
    what: str = "checkpoint",
) -> dict[str, Any]:
    """Load a checkpoint written by the trainer (a file, or a run dir: ``<dir>/checkpoints/last.pt``).

    Raises FileNotFoundError when there is no such file and :class:`CheckpointError` naming the
    file when it is empty, not a torch file (truncated, random bytes, another format) or lacks one
    of the ``required`` entries (e.g. :data:`CHECKPOINT_KEYS` to resume). ``what`` prefixes the
    messages (``"resume"``, ``"init_from"``, ...).
    """
    file = checkpoint_path(path)
    if not file.is_file():
        looked = f" (looked for {file})" if str(file) != str(path) else ""
        raise FileNotFoundError(f"{what}: no checkpoint at {str(path)!r}{looked}")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{what}: {file} is an empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # torch.load raises EOFError, UnpicklingError, RuntimeError, ... for a bad file
        raise CheckpointError(
            f"{what}: {file} is not a readable checkpoint (truncated, or not written by torch.save): "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise CheckpointError(f"{what}: {file} holds a {kind}, not a checkpoint written by attnlib-train")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"{what}: {file} is not a checkpoint written by attnlib-train: no {', '.join(map(repr, missing))} "
            f"entry (it has {', '.join(map(repr, list(state)[:8]))})"
        )
    return state


def capture_rng() -> dict[str, Any]:
    """RNG states: Python, NumPy, torch CPU and (if available) CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore states from :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
