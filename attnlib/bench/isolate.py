"""Run a function in a fresh process and measure its peak resident-memory growth (CPU).

A *fork server* (``multiprocessing`` "forkserver" context, with torch and attnlib pre-imported)
forks one new process per measurement, so each configuration starts from the same clean state
and no allocation of an earlier configuration is still cached by the allocator. Starting the
server costs one torch import; each measurement then costs a fork.

Inside the child, :func:`peak_rss_growth` does one warm-up call (lazy initialisation,
``torch.compile``), returns freed heap memory to the OS (``malloc_trim``), resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), records the RSS, makes one call and reads the peak
(``VmHWM``). The growth is the call's workspace plus its outputs (and gradients for fwd+bwd).
Off Linux it falls back to ``ru_maxrss`` growth without the warm-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import resource
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["IsolatedError", "alloc_probe", "peak_rss_growth", "run_isolated"]

_CTX: Any = None


class IsolatedError(RuntimeError):
    """The child process failed: raised, crashed (e.g. killed for memory) or timed out."""


def _context() -> Any:
    global _CTX
    if _CTX is None:
        if sys.platform.startswith("linux"):
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "attnlib", "attnlib.bench.isolate"])
        else:  # pragma: no cover - macOS / Windows
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - old kernels / restricted /proc
        return False


def peak_rss_growth(fn: Callable[[], object], *, warmup: bool = True) -> dict[str, Any]:
    """Peak RSS growth (bytes) of one call of ``fn`` in the current process.

    Returns ``{"peak_bytes": int, "method": str}``. Meant to run in a fresh process (see
    :func:`run_isolated`): the peak counter is process-wide.
    """
    if warmup:
        fn()
    import gc

    gc.collect()
    _malloc_trim()
    if _reset_peak():
        base = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if base is not None and peak is not None:
            how = "VmHWM - VmRSS after warm-up + malloc_trim" if warmup else "VmHWM - VmRSS"
            return {"peak_bytes": max(0, peak - base) * 1024, "method": f"fresh process, {how}"}
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover
    fn()  # pragma: no cover
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover
    scale = 1 if sys.platform == "darwin" else 1024  # pragma: no cover
    return {"peak_bytes": max(0, peak_kib - base_kib) * scale, "method": "fresh process, ru_maxrss growth"}


def _child(conn: Connection, target: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", target(*args, **kwargs)))
    except BaseException as e:  # report everything, including MemoryError
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


def run_isolated(target: Callable[..., Any], *args: Any, timeout: float = 600.0, **kwargs: Any) -> Any:
    """Call ``target(*args, **kwargs)`` in a fresh process and return its (picklable) result.

    ``target`` must be importable by module path (a module-level function). Raises
    :class:`IsolatedError` if it raises, dies (e.g. killed by the kernel for memory) or runs
    longer than ``timeout`` seconds (then it is killed).
    """
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, target, args, kwargs), daemon=False)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            proc.join()
            raise IsolatedError(f"timed out after {timeout:.0f} s")
        try:
            status, value = recv.recv()
        except EOFError:
            proc.join()
            raise IsolatedError(
                f"child process died (exit code {proc.exitcode}; -9 usually means killed for memory)"
            ) from None
    finally:
        recv.close()
    proc.join()
    if status == "error":
        raise IsolatedError(value)
    return value


def alloc_probe(nbytes: int, threads: int = 1) -> dict[str, Any]:
    """Self-check target: peak RSS growth of allocating and touching ``nbytes`` bytes with torch."""
    import torch

    torch.set_num_threads(threads)

    def fn() -> None:
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        del x

    return peak_rss_growth(fn)


def crash_probe() -> None:  # pragma: no cover - runs in the child
    """Self-check target: dies without reporting (as if killed for memory)."""
    import os

    os._exit(137)
