"""A progress bar (tqdm) that degrades to a no-op when disabled or tqdm is missing."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar over ``total`` steps (to stderr), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
