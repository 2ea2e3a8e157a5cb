"""Argument checks shared by the BlockMask builders (ValueError saying what was expected and given)."""

from __future__ import annotations


def as_block_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``block_size`` as (bq, bk), both positive."""
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    bq, bk = (int(b) for b in block_size)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return bq, bk


def check_nm(n: object, m: object, where: str) -> tuple[int, int]:
    """(N, M) as positive ints."""
    for name, val in (("N", n), ("M", m)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {val!r}")
    return n, m  # type: ignore[return-value]


def non_negative(name: str, val: object, where: str, *, allow_none: bool = False) -> int | None:
    """``val`` as a non-negative int (or None where allowed)."""
    if val is None and allow_none:
        return None
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
        raise ValueError(f"{where}: {name} must be a non-negative int, got {val!r}")
    return val
