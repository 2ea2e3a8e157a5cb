"""Input validation shared by the functional layer, the variants and the module.

Every check raises ValueError with a message that says what was expected and what was given.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_index", "check_qkv", "describe"]


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


def floating_dtype_ok(dtype: torch.dtype) -> bool:
    """True for the float dtypes attnlib computes in (fp16, bf16, fp32, fp64)."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_index(value: object, n: int, *, what: str) -> int:
    """An int index into ``n`` items, ``[-n, n)`` (negative counts from the end), as ``[0, n)``."""
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value < n:
        raise ValueError(f"{what} must be an int in [-{n}, {n}) for N={n} queries, got {value!r}")
    return value % n
