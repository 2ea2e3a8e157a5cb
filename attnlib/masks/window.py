"""The sliding-window mask kind: :class:`SlidingWindow` and its shorthand :func:`sliding_window`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlib.masks.predicates import MaskMod, window_mask, window_mod

__all__ = ["SlidingWindow", "sliding_window"]


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window mask: query position p may attend key j iff ``p - left <= j <= p + right``.

    ``None`` for a side means unbounded on that side. ``SlidingWindow(w, w)`` is the
    Longformer band |i - j| <= w; combine ``SlidingWindow(w - 1, 0)`` or ``causal=True``
    with ``SlidingWindow(w - 1, None)`` for a Mistral-style causal window of W = w keys.
    With N queries and M keys, query i sits at position ``p = i + (M - N)`` (bottom-right aligned).
    """

    left: int | None
    right: int | None

    def __post_init__(self) -> None:
        for side in ("left", "right"):
            val = getattr(self, side)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"SlidingWindow.{side} must be a non-negative int or None, got {val!r}")

    def intersect(self, other: SlidingWindow) -> SlidingWindow:
        """The window allowed by both (the smaller radius on each side)."""

        def side(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return SlidingWindow(side(self.left, other.left), side(self.right, other.right))

    def mask_mod(self, n: int, m: int) -> MaskMod:
        """The window's predicate for N queries and M keys (:func:`attnlib.masks.predicates.window_mod`)."""
        return window_mod(self.left, self.right, n, m)

    def dense(self, n: int, m: int, device: torch.device | str | None = None) -> Tensor:
        """The window as a dense bool tensor of shape (N, M)."""
        return window_mask(n, m, left=self.left, right=self.right, device=device)


def sliding_window(left: int | None, right: int | None = None) -> SlidingWindow:
    """Shorthand for :class:`SlidingWindow`; ``right`` defaults to ``left`` (symmetric band)."""
    return SlidingWindow(left, left if right is None else right)
