"""The Triton kernels' tile-config pruning vs the committed offline compile results
(benchmarks/results/gpu_compile_sm90.json, from benchmarks/gpu_compile_check.py; no GPU needed).

* the pruning never offers a config that the compile found over the shared-memory limit or
  failing to compile, nor one that spills more than SPILL_BUDGET bytes per thread;
* its shared-memory estimate is an upper bound of every measured value (so it stays safe for
  other limits: A100 163 KB, consumer cards ~99 KB);
* the results cover every config the pruning keeps today (they are not stale);
* autotuning stays bounded (MAX_CONFIGS per kernel and call).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnlib.kernels import _triton_configs as cfgs

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (32, 64, 96, 128, 256)


def _load(arch: int) -> dict:
    path = RESULTS / f"gpu_compile_sm{arch}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not committed")
    return json.loads(path.read_text())


def _kept(
    kernel: str, dtype: torch.dtype, d: int, limit: int, prec: str = "tf32", arch: int = 90
) -> list[cfgs.TileConfig]:
    bd = cfgs.block_d(d)
    return cfgs.prune(
        kernel, cfgs.candidates(kernel, dtype, prec), dtype=dtype, block_d=bd, block_dv=bd, bq=128, bk=128,
        prec=prec, smem_limit=limit, arch=arch,
    )  # fmt: skip


@pytest.mark.parametrize("arch", [90, 80])
def test_pruning_never_offers_a_config_found_over_the_limit(arch: int) -> None:
    data = _load(arch)
    limit = data["smem_limit"]
    for r in data["records"]:
        c = cfgs.TileConfig(r["block_m"], r["block_n"], r["warps"], r["stages"])
        kept = c in _kept(r["kernel"], DTYPES[r["dtype"]], r["d"], limit, r["prec"], arch)
        bad = not r.get("ok") or r["smem"] > limit or r["spill_stores"] > cfgs.SPILL_BUDGET
        assert not (kept and bad), f"pruning keeps {r['kernel']} {r['dtype']} d={r['d']} {c}: {r}"


def test_smem_estimate_bounds_every_measurement() -> None:
    data = _load(90)
    assert data["records"]
    for r in data["records"]:
        if not r.get("ok"):
            continue
        c = cfgs.TileConfig(r["block_m"], r["block_n"], r["warps"], r["stages"])
        bd = cfgs.block_d(r["d"])
        est = cfgs.smem_estimate(r["kernel"], c, DTYPES[r["dtype"]], bd, bd, r["prec"])
        assert est >= r["smem"], f"{r['kernel']} {r['dtype']} d={r['d']} {c}: estimate {est} < measured {r['smem']}"
        assert est <= 2 * r["smem"] + 16384, f"{r['kernel']} {r['dtype']} d={r['d']} {c}: estimate {est} too loose"


@pytest.mark.parametrize("arch", [90, 80])
def test_results_cover_every_kept_config(arch: int) -> None:
    """Changing the candidates or the pruning needs a new compile run (the results would be stale)."""
    data = _load(arch)
    limit = data["smem_limit"]
    scope = data["meta"].get("scope") or {}
    dtypes = scope.get("dtypes") or list(DTYPES)
    dims = scope.get("dims") or HEAD_DIMS
    have = {
        (r["kernel"], r["dtype"], r["prec"], r["d"], r["block_m"], r["block_n"], r["warps"], r["stages"])
        for r in data["records"]
        if r.get("ok")
    }
    for kernel in ("fwd", "dkdv", "dq"):
        for name, dtype in DTYPES.items():
            if name not in dtypes:
                continue
            for prec in ("tf32", "tf32x3") if name == "fp32" else ("tf32",):
                for d in dims:
                    kept = _kept(kernel, dtype, d, limit, prec, arch)
                    if (name, prec, d) == ("fp32", "tf32x3", 256) and kernel != "fwd":
                        assert not kept  # documented: exact fp32 at head dim 256 runs the PyTorch path
                        continue
                    assert kept, f"no {kernel} config for {name} d={d} on sm_{arch}"
                    for c in kept:
                        key = (kernel, name, prec, d, c.block_m, c.block_n, c.warps, c.stages)
                        assert key in have, f"sm_{arch}: kept config {key} was not compiled by gpu_compile_check.py"


@pytest.mark.parametrize("arch", [90, 80])
def test_results_record_where_and_how_and_are_current(arch: int) -> None:
    import sys

    meta = _load(arch)["meta"]
    for key in ("machine", "command", "date", "commit", "triton", "kernel_source_sha"):
        assert meta.get(key), key
    assert "gpu_compile_check.py" in meta["command"]
    sys.path.insert(0, str(RESULTS.parent))
    try:
        from gpu_compile_check import kernel_source_sha
    finally:
        sys.path.pop(0)
    assert meta["kernel_source_sha"] == kernel_source_sha(), "kernels changed: rerun benchmarks/gpu_compile_check.py"


def test_autotuning_is_bounded_and_tiles_fit_the_mask_block() -> None:
    for kernel in ("fwd", "dkdv", "dq"):
        for dtype, prec in [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                            (torch.float32, "tf32x3")]:  # fmt: skip
            for bq in (16, 32, 64, 128):
                bd = 128
                kept = cfgs.prune(
                    kernel, cfgs.candidates(kernel, dtype, prec), dtype=dtype, block_d=bd, block_dv=bd, bq=bq, bk=bq,
                    prec=prec, smem_limit=232448,
                )  # fmt: skip
                assert len(kept) <= cfgs.MAX_CONFIGS["fp32" if dtype == torch.float32 else "half"]
                assert all(bq % c.block_m == 0 and bq % c.block_n == 0 for c in kept)
                if bq >= 32:
                    assert kept, (kernel, dtype, bq)
    # FlexAttention's H100 default tile is a forward candidate on 128-blocks
    assert cfgs.TileConfig(128, 64, 8, 3) in _kept("fwd", torch.bfloat16, 128, 232448)
