"""Input validation shared by the functional layer, the variants and the module.

Every check raises ValueError with a message that says what was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "check_index",
    "check_qkv",
    "describe",
    "fraction",
    "int_at_least",
    "non_negative_int",
    "non_negative_number",
    "number_above",
    "optional_positive_number",
    "positive_int",
    "positive_int_pair",
    "positive_number",
]


def describe(x: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"[:200]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, where: str, same_head_dim: bool = True) -> None:
    """Check q (B, H, N, D), k (B, H_kv, M, D), v (B, H_kv, M, Dv) for an attention call.

    H must be a multiple of H_kv (grouped-query attention); dtypes and devices must agree;
    N and M must be positive.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {name} must be a tensor (B, H, N, D), got {describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must have 4 dims (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    bk, hk, m, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"{where}: batch sizes differ: q has B={b}, k has B={bk}, v has B={v.shape[0]}")
    if v.shape[1] != hk or v.shape[2] != m:
        raise ValueError(f"{where}: k and v must share (H_kv, M), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"{where}: query heads H={h} must be a multiple of key/value heads H_kv={hk}")
    if same_head_dim and dk != d:
        raise ValueError(f"{where}: q and k head dims differ: q has D={d}, k has D={dk}")
    if n == 0 or m == 0:
        raise ValueError(f"{where}: empty sequence: N={n} queries, M={m} keys; both must be > 0")
    if b == 0:
        raise ValueError(f"{where}: empty batch (B=0)")


def check_index(value: object, n: int, *, what: str) -> int:
    """An int index into ``n`` items, ``[-n, n)`` (negative counts from the end), as ``[0, n)``."""
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value < n:
        raise ValueError(f"{what} must be an int in [-{n}, {n}) for N={n} queries, got {value!r}")
    return value % n


# Scalar arguments. ``what`` names the argument in the message (e.g. "performer: num_features");
# ``hint`` follows the expectation (e.g. " (1 = softmax)"). Bools are rejected where an int or a
# number is expected. Each returns the checked value (ints as given, numbers as float).


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(value: object, minimum: int, what: str, *, hint: str = "") -> int:
    """``value`` if it is an int >= ``minimum``, else ValueError "{what} must be an int >= {minimum}"."""
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{what} must be an int >= {minimum}{hint}, got {value!r}")
    return value  # type: ignore[return-value]


def positive_int(value: object, what: str, *, hint: str = "") -> int:
    """``value`` if it is an int > 0, else ValueError "{what} must be a positive int"."""
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"{what} must be a positive int{hint}, got {value!r}")
    return value  # type: ignore[return-value]


def positive_int_pair(value: object, what: str, *, hint: str = "") -> tuple[int, int]:
    """``(value, value)`` for an int > 0, or ``tuple(value)`` for a pair of ints > 0 (e.g. a block
    size (bq, bk)); else ValueError "{what} must be a positive int or a pair of positive ints"."""
    if _is_int(value):
        pair: tuple[object, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        pair = ()
    if len(pair) != 2 or not all(_is_int(v) and v > 0 for v in pair):  # type: ignore[operator]
        raise ValueError(f"{what} must be a positive int or a pair of positive ints{hint}, got {value!r}")
    return pair  # type: ignore[return-value]


def non_negative_int(value: object, what: str, *, hint: str = "") -> int:
    """``value`` if it is an int >= 0, else ValueError "{what} must be a non-negative int"."""
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{what} must be a non-negative int{hint}, got {value!r}")
    return value  # type: ignore[return-value]


def positive_number(value: object, what: str, *, hint: str = "") -> float:
    """``float(value)`` if it is a finite number > 0, else ValueError "{what} must be a positive number"."""
    if not _is_number(value) or not value > 0 or not math.isfinite(value):  # type: ignore[operator, arg-type]
        raise ValueError(f"{what} must be a positive number{hint}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def optional_positive_number(value: object, what: str, *, hint: str = "") -> float | None:
    """None, or :func:`positive_number` of ``value`` (e.g. a logit scale whose None means the default)."""
    return None if value is None else positive_number(value, what, hint=hint)


def non_negative_number(value: object, what: str, *, hint: str = "") -> float:
    """``float(value)`` if it is a number >= 0, else ValueError "{what} must be a non-negative number"."""
    if not _is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{what} must be a non-negative number{hint}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def fraction(value: object, what: str, *, hint: str = "") -> float:
    """``float(value)`` if it is a number in (0, 1], else ValueError "{what} must be in (0, 1]"."""
    if not _is_number(value) or not 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{what} must be in (0, 1]{hint}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def number_above(value: object, bound: float, what: str, *, hint: str = "") -> float:
    """``float(value)`` if it is a number > ``bound``, else ValueError "{what} must be > {bound}"."""
    if not _is_number(value) or not float(value) > bound:  # type: ignore[arg-type]
        raise ValueError(f"{what} must be > {bound}{hint}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
