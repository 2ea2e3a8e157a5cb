"""Tile configurations of the block-sparse Triton kernels: candidates, pruning, fp32 policy.

The one place where machine-dependent kernel policy lives (DESIGN: "Policy that depends on the
machine lives in one dispatch place").

**Candidates.** Each kernel (``fwd``, ``dkdv``, ``dq``) has a short candidate list per
precision class (fp16 / bf16 operands; fp32 with TF32 dots; fp32 with 3xTF32 dots), in order
of preference, of (BLOCK_M, BLOCK_N, warps, stages). BLOCK_M is the query tile, BLOCK_N the
key tile; both are the mask block or a power-of-two fraction of it (the kernels walk the
sub-tiles in one pipelined loop), so a tile
can differ from the mask block - FlexAttention's H100 default (128 x 64, 8 warps, 3 stages)
is a candidate on 128-blocks.

**Pruning** (:func:`prune`, Triton's ``early_config_prune`` and :func:`unsupported`), per call:

1. the tile divides the mask block and is >= 16 (``tl.dot``'s minimum);
2. shared memory: :func:`smem_estimate` <= the device's opt-in limit per block (H100 227 KB,
   A100 163 KB, consumer cards ~99 KB; read from the driver). The estimate is a closed form in
   the tile sizes, calibrated on the offline compile of every candidate for sm_90
   (``benchmarks/gpu_compile_check.py``, ``benchmarks/results/gpu_compile_sm90.json``) and an
   upper bound of every measured value there (``tests/test_triton_configs.py`` checks it);
3. registers: each candidate carries the head dims at which the offline compile
   (``ptxas -v``) found it spilling at most ``SPILL_BUDGET`` bytes per thread; other head dims
   prune it (registers per thread are capped at 255 on every NVIDIA GPU since Volta; pre-Hopper
   cards use other MMA instructions, so the sm_80 compile adds a few exclusions there);
4. at most ``MAX_CONFIGS`` survivors (the first in preference order): the first call of a new
   shape autotunes at most 4 (half precision) or 3 (fp32) configs per kernel instead of 27
   (``ATTNLIB_TRITON_MAX_CONFIGS=1`` takes the first only: tests, quick checks).

When no candidate survives (e.g. head dim 256 on a ~99 KB card) :func:`unsupported` says so and
the dispatcher routes the call to the PyTorch path with a ``RuntimeWarning``
(``backend="triton"`` raises ``UnsupportedError``); a launch that still runs out of resources
raises ``NoKernelConfigError``, handled the same way.

**fp32 policy** (:func:`fp32_precision`). fp32 inputs use TF32 tensor-core dots
(``input_precision="tf32"``) when PyTorch allows TF32 for matmuls
(``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision()`` "high" /
"medium"), as cuBLAS and SDPA then do; otherwise ("highest", PyTorch's default) they use
3xTF32 (``"tf32x3"``: a split into high and low TF32 parts, error close to fp32's) instead of
exact-fp32 FMA dots, which spilled 57-133 KB per thread at head dim 128 and took minutes to
autotune. Set ``ATTNLIB_TRITON_FP32=ieee|tf32x3|tf32`` to force one (``ieee`` uses the 3xTF32
list and is not covered by the compile check). Each fp32 precision has its own short candidate
list (fp32 tiles are twice the bytes of half-precision ones; 3xTF32 needs more registers).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

__all__ = [
    "MAX_CONFIGS",
    "SPILL_BUDGET",
    "TileConfig",
    "block_d",
    "candidates",
    "device_arch",
    "device_smem_limit",
    "fp32_precision",
    "head_dims",
    "prune",
    "smem_estimate",
    "unsupported",
    "why_pruned",
]

MAX_CONFIGS = {"half": 4, "fp32": 3}
DEFAULT_SMEM = 232448  # H100 / H200 opt-in maximum per block (227 KB), when the driver cannot say


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One autotuning candidate: query tile, key tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def key(self) -> tuple[int, int, int, int]:
        return (self.block_m, self.block_n, self.warps, self.stages)

    def to_triton(self) -> Any:
        import triton

        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.warps, num_stages=self.stages
        )

    @classmethod
    def from_triton(cls, c: Any) -> TileConfig:
        return cls(int(c.kwargs["BLOCK_M"]), int(c.kwargs["BLOCK_N"]), int(c.num_warps), int(c.num_stages))

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.warps} s{self.stages}"


def block_d(d: int) -> int:
    """The padded (power-of-two, >= 16) head dim a kernel tile holds."""
    return max(16, 1 << (int(d) - 1).bit_length())


def _cls(dtype: torch.dtype, prec: str = "tf32") -> str:
    """The precision class: "half" (fp16 / bf16 operands) or the fp32 dots' precision
    ("tf32" / "tf32x3"; "ieee", forced or float64 under the interpreter, uses tf32x3's list)."""
    if dtype not in (torch.float32, torch.float64):
        return "half"
    return "tf32" if prec == "tf32" else "tf32x3"


_DIMS: dict[tuple[str, str, tuple[int, int, int, int]], tuple[int, ...]] = {}
ALL = (16, 32, 64, 128, 256)  # padded head dims
TO128 = (16, 32, 64, 128)


def _c(kernel: str, cls_: str, *rows: tuple[int, int, int, int, tuple[int, ...]]) -> list[TileConfig]:
    out = []
    for m, n, w, st, dims in rows:
        c = TileConfig(m, n, w, st)
        _DIMS[(kernel, cls_, c.key())] = dims
        out.append(c)
    return out


# Candidates in order of preference (the first MAX_CONFIGS that fit are autotuned):
# (BLOCK_M, BLOCK_N, warps, stages, padded head dims). The last field is the register rule: the
# head dims at which the offline sm_90 compile (ptxas) of that config spills at most
# SPILL_BUDGET bytes per thread; at others the config is pruned.
SPILL_BUDGET = 512
_CANDIDATES: dict[tuple[str, str], list[TileConfig]] = {
    ("fwd", "half"): _c(
        "fwd", "half",
        (128, 64, 8, 3, ALL), (128, 128, 8, 2, TO128), (64, 128, 4, 2, TO128), (64, 64, 4, 2, ALL),
        (128, 64, 8, 2, ALL), (64, 32, 4, 2, ALL), (32, 32, 4, 2, ALL), (16, 16, 4, 2, ALL),
    ),
    ("dkdv", "half"): _c(
        "dkdv", "half",
        (64, 128, 8, 2, TO128), (32, 128, 8, 2, TO128), (64, 64, 8, 2, TO128), (128, 32, 8, 2, (64, 128, 256)),
        (64, 32, 4, 2, TO128), (32, 64, 4, 2, TO128), (32, 32, 4, 2, ALL), (16, 16, 4, 2, ALL),
    ),
    ("dq", "half"): _c(
        "dq", "half",
        (128, 64, 8, 2, ALL), (128, 32, 8, 2, ALL), (64, 128, 8, 2, TO128), (64, 64, 4, 2, ALL),
        (64, 32, 4, 2, ALL), (32, 32, 4, 2, ALL), (16, 16, 4, 2, ALL),
    ),
    ("fwd", "tf32"): _c(
        "fwd", "tf32", (64, 64, 4, 2, ALL), (64, 32, 4, 2, ALL), (32, 64, 4, 2, ALL), (32, 32, 4, 2, ALL),
        (16, 16, 4, 2, ALL),
    ),
    ("dkdv", "tf32"): _c(
        "dkdv", "tf32", (64, 32, 4, 2, TO128), (32, 64, 4, 2, (16, 32, 64)), (32, 32, 4, 2, TO128),
        (16, 16, 4, 2, ALL),
    ),
    ("dq", "tf32"): _c(
        "dq", "tf32", (64, 32, 4, 2, ALL), (32, 64, 4, 2, ALL), (32, 32, 4, 2, ALL), (16, 16, 4, 2, ALL),
    ),
    # 3xTF32 needs more registers: smaller tiles, and no dK/dV, dQ config at head dim 256 (PyTorch path)
    ("fwd", "tf32x3"): _c(
        "fwd", "tf32x3", (64, 64, 4, 2, TO128), (64, 32, 4, 2, TO128), (32, 64, 4, 2, (16, 32, 64)),
        (32, 32, 4, 2, TO128), (16, 16, 4, 2, ALL),
    ),
    ("dkdv", "tf32x3"): _c(
        "dkdv", "tf32x3", (64, 32, 4, 2, (64,)), (32, 64, 4, 2, (16, 32, 64)), (32, 32, 4, 2, (16, 32, 64)),
        (16, 16, 4, 2, TO128),
    ),
    ("dq", "tf32x3"): _c(
        "dq", "tf32x3", (64, 32, 4, 2, (16, 32, 64)), (32, 64, 4, 2, (64,)), (32, 32, 4, 2, TO128),
        (16, 16, 4, 2, TO128),
    ),
}  # fmt: skip


# Pre-Hopper GPUs (mma.sync instead of wgmma) allocate registers differently: the sm_80 compile
# of the kept configs found these spilling > SPILL_BUDGET at padded head dim 128 (9-18 KB for the
# two dK/dV tiles), so on sm_8x they stop at 64.
_PRE_HOPPER_MAX_D: dict[tuple[str, str, tuple[int, int, int, int]], int] = {
    ("dkdv", "half", (64, 128, 8, 2)): 64,
    ("dkdv", "half", (32, 128, 8, 2)): 64,
    ("fwd", "tf32x3", (64, 32, 4, 2)): 64,
}


def head_dims(kernel: str, c: TileConfig, dtype: torch.dtype, prec: str = "tf32", arch: int = 90) -> tuple[int, ...]:
    """The padded head dims at which ``c`` stays within SPILL_BUDGET on sm_<arch> (empty: not a candidate)."""
    key = (kernel, _cls(dtype, prec), c.key())
    dims = _DIMS.get(key, ())
    if arch < 90 and key in _PRE_HOPPER_MAX_D:
        dims = tuple(d for d in dims if d <= _PRE_HOPPER_MAX_D[key])
    return dims


def candidates(kernel: str, dtype: torch.dtype = torch.bfloat16, prec: str = "tf32") -> list[TileConfig]:
    """The candidate list of ``kernel`` ("fwd", "dkdv", "dq") for the precision class."""
    return list(_CANDIDATES[(kernel, _cls(dtype, prec))])


def all_candidates(kernel: str) -> list[TileConfig]:
    """Every config of every class (the autotuner's list; :func:`prune` picks per call)."""
    out: list[TileConfig] = []
    for cls_ in ("half", "tf32", "tf32x3"):
        out += [c for c in _CANDIDATES[(kernel, cls_)] if c not in out]
    return out


def _esize(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else (4 if dtype == torch.float32 else 2)


# smem_estimate: bytes = e · (a·M·D + b·N·D) + M·N + l·(M + N) + SLACK, with e the element size,
# M / N the query / key tile, D the padded head dim (the larger of D and Dv), M·N the uint8
# partial-block tile, l·(M + N) the fp32 row statistics. Read off the sm_90 compile: the
# forward holds Q once and K, V double-buffered (a=1, b=4); dK/dV holds K, V once and Q^T, dO
# double-buffered plus LSE / Δ (a=4, b=2, l=8); dQ holds Q, dO once and K, V double-buffered
# (a=2, b=4). 3xTF32 keeps split copies of the register operands (forward: Q; dQ: Q, dO;
# dK/dV: K, V) and some scratch: + e·(sa·M·D + sb·N·D) + 4·M·N.
# Exact for tiles of >= 64 rows, an over-estimate for smaller ones.
_SMEM_COEF: dict[str, tuple[int, int, int]] = {"fwd": (1, 4, 0), "dkdv": (4, 2, 8), "dq": (2, 4, 0)}
_SPLIT_COEF: dict[str, tuple[int, int]] = {"fwd": (1, 0), "dkdv": (0, 2), "dq": (2, 0)}
_SMEM_SLACK = 2048


def smem_estimate(
    kernel: str, c: TileConfig, dtype: torch.dtype, block_d: int, block_dv: int, prec: str = "tf32"
) -> int:
    """Upper bound (bytes) of the shared memory a config needs (see ``_SMEM_COEF``)."""
    a, b, lstat = _SMEM_COEF[kernel]
    m, n, d = c.block_m, c.block_n, max(block_d, block_dv)
    e = _esize(dtype)
    sa, sb = _SPLIT_COEF[kernel]
    split = e * (sa * m * d + sb * n * d) + 4 * m * n if _cls(dtype, prec) == "tf32x3" else 0
    return e * (a * m * d + b * n * d) + m * n + lstat * (m + n) + split + _SMEM_SLACK


def why_pruned(
    kernel: str,
    c: TileConfig,
    *,
    dtype: torch.dtype,
    block_d: int,
    block_dv: int,
    bq: int,
    bk: int,
    prec: str,
    smem_limit: int,
    arch: int = 90,
) -> str | None:
    """None when ``c`` may run this call on sm_<arch>, else why not (the first failing rule)."""
    if c.block_m > bq or c.block_n > bk or bq % c.block_m or bk % c.block_n or min(c.block_m, c.block_n) < 16:
        return f"tile {c.block_m}x{c.block_n} does not divide the mask block {bq}x{bk}"
    smem = smem_estimate(kernel, c, dtype, block_d, block_dv, prec)
    if smem > smem_limit:
        return f"smem {smem // 1024} KB > {smem_limit // 1024} KB"
    dims = head_dims(kernel, c, dtype, prec, arch)
    if max(block_d, block_dv) not in dims:
        return (
            f"registers: spills > {SPILL_BUDGET} B at head dim {max(block_d, block_dv)}" if dims else "not a candidate"
        )
    return None


def prune(
    kernel: str,
    configs: list[TileConfig],
    *,
    dtype: torch.dtype,
    block_d: int,
    block_dv: int,
    bq: int,
    bk: int,
    prec: str,
    smem_limit: int,
    arch: int = 90,
) -> list[TileConfig]:
    """The configs of the precision class that fit (see the module docstring), at most MAX_CONFIGS."""
    mine = {x.key() for x in candidates(kernel, dtype, prec)}
    keep = [
        c
        for c in configs
        if c.key() in mine
        and why_pruned(
            kernel,
            c,
            dtype=dtype,
            block_d=block_d,
            block_dv=block_dv,
            bq=bq,
            bk=bk,
            prec=prec,
            smem_limit=smem_limit,
            arch=arch,
        )
        is None
    ]
    cap = MAX_CONFIGS["half" if _cls(dtype, prec) == "half" else "fp32"]
    forced = os.environ.get("ATTNLIB_TRITON_MAX_CONFIGS", "")
    return keep[: max(1, int(forced)) if forced.isdigit() else cap]


@functools.lru_cache(maxsize=16)
def _smem_of(index: int) -> int:
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        pass
    try:
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM))
    except Exception:
        return DEFAULT_SMEM


def device_smem_limit(device: torch.device | int | None = None) -> int:
    """The opt-in shared memory per block (bytes) of ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return DEFAULT_SMEM
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _smem_of(index)


@functools.lru_cache(maxsize=16)
def _arch_of(index: int) -> int:
    try:
        major, minor = torch.cuda.get_device_capability(index)
        return 10 * major + minor
    except Exception:
        return 90


def device_arch(device: torch.device | int | None = None) -> int:
    """Compute capability as an int (90 for sm_90) of ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        return 90
    if isinstance(device, int):
        return _arch_of(device)
    if device is None or device.index is None:
        return _arch_of(torch.cuda.current_device())
    return _arch_of(device.index)


def fp32_precision() -> str:
    """``input_precision`` of the dots for fp32 inputs (see the module docstring)."""
    forced = os.environ.get("ATTNLIB_TRITON_FP32", "").lower()
    if forced in ("ieee", "tf32", "tf32x3"):
        return forced
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() in ("high", "medium"):
        return "tf32"
    return "tf32x3"


def unsupported(
    dtype: torch.dtype, d: int, dv: int, block: tuple[int, int], device: torch.device | None = None
) -> str | None:
    """None when every kernel has a config that fits this call on ``device``, else why not."""
    prec = fp32_precision() if dtype == torch.float32 else "tf32"
    limit, arch = device_smem_limit(device), device_arch(device)
    return _unsupported(dtype, int(d), int(dv), (int(block[0]), int(block[1])), limit, prec, arch)


@functools.lru_cache(maxsize=256)
def _unsupported(
    dtype: torch.dtype, d: int, dv: int, block: tuple[int, int], limit: int, prec: str, arch: int
) -> str | None:
    bd, bdv = block_d(d), block_d(dv)
    for kernel in ("fwd", "dkdv", "dq"):
        kw = dict(bq=block[0], bk=block[1], prec=prec, smem_limit=limit, arch=arch)
        kw.update(dtype=dtype, block_d=bd, block_dv=bdv)
        cands = candidates(kernel, dtype, prec)
        if not prune(kernel, cands, **kw):  # type: ignore[arg-type]
            reasons = sorted({str(why_pruned(kernel, c, **kw)) for c in cands})  # type: ignore[arg-type]
            return (
                f"no {kernel} tile configuration fits: head dim {d} (padded {bd}), {dtype}"
                f"{f' ({prec} dots)' if dtype == torch.float32 else ''}, mask block {block[0]}x{block[1]}, "
                f"{limit // 1024} KB of shared memory ({'; '.join(reasons)})"
            )
    return None
