"""Run directories: one per run, claimed atomically; a run never writes into another run's directory.

* :func:`unique_dir` creates a new directory with ``os.mkdir`` (which fails if the path exists),
  trying ``base``, ``base-2``, ``base-3``, ...: two runs started in the same second (two
  processes, two machines on a shared file system) get two directories. ``attnlib-train``'s
  default ``hydra.run.dir`` / ``hydra.sweep.dir`` go through it as the OmegaConf resolver
  ``${attnlib.unique_dir:<base>}`` (cached per config, so every reader of a config sees the
  directory it created).
* :func:`lock_run_dir` holds an exclusive ``flock`` on ``<run dir>/.lock`` while a run trains
  there: a second process in the same directory (the same ``hydra.run.dir`` twice, a resume
  while the run is still going) is refused. The kernel releases the lock when the process
  ends, also on SIGKILL, so a killed run can be resumed.
* :func:`check_fresh` refuses to start a new run in a directory that already holds one
  (``results.json``, ``metrics.csv`` or ``checkpoints/last.pt``) unless it is being resumed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["RESOLVER", "RunDirError", "check_fresh", "lock_run_dir", "register_resolver", "unique_dir"]

log = logging.getLogger("attnlib.train")

#: Name of the OmegaConf resolver that claims a new directory (``${attnlib.unique_dir:<base>}``).
RESOLVER = "attnlib.unique_dir"
#: Files whose presence means a directory holds (part of) a run.
RUN_FILES = ("results.json", "metrics.csv", "checkpoints/last.pt")


class RunDirError(RuntimeError):
    """The run directory holds another run, or another process is training in it."""


def unique_dir(base: str | os.PathLike[str]) -> str:
    """Create and return a directory that did not exist: ``base``, else ``base-2``, ``base-3``, ...

    Each candidate is created with ``os.mkdir`` (fails when the path exists), so concurrent
    callers never get the same directory. The parents are created as needed.
    """
    base = str(base)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        candidate = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise RunDirError(f"could not create a new directory next to {base!r}: {base}-2 ... -9999 all exist")


def register_resolver() -> None:
    """Register ``${attnlib.unique_dir:<base>}`` with OmegaConf (idempotent; cached per config)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (created if needed) for the ``with`` block.

    Raises :class:`RunDirError` when another process (or another open of the lock in this
    one) holds it. On file systems without ``flock`` support it warns and goes on unlocked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError) as e:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunDirError(
                f"run dir {run_dir} is in use by another process (pid {owner}): two runs must not share a "
                "directory; wait for it to finish or choose another hydra.run.dir"
            ) from e
        except (ImportError, OSError) as e:  # no fcntl (Windows) or a file system without flock
            if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("cannot lock %s (%s): not protected against a second run in it", run_dir, e)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


def check_fresh(run_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if ``run_dir`` already holds a run (its results, metrics or checkpoint)."""
    found = [f for f in RUN_FILES if (Path(run_dir) / f).exists()]
    if found:
        raise RunDirError(
            f"run dir {run_dir} already holds a run ({', '.join(found)}): a new run never writes into it. "
            "Pass resume=true to continue that run, or choose another hydra.run.dir"
        )


register_resolver()
