"""Exceptions raised by attnlib.

`UnsupportedError` is raised when a variant is asked for something its capabilities do not
cover (a mask kind, causal cross-attention, a dtype, ...). It subclasses `ValueError`, so
code that catches bad input generically keeps working.
"""

from __future__ import annotations

__all__ = ["UnsupportedError"]


class UnsupportedError(ValueError):
    """A request that the chosen attention variant cannot honour.

    The message always names the variant and what was asked of it, e.g.
    ``"variant 'flow' does not support a full (B, H, N, M) mask; it supports: causal, key padding"``.
    """
