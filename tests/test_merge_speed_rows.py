"""benchmarks/merge_speed_rows.py: row-keyed replacement and ratios of unpaired patch rows."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("merge_speed_rows", ROOT / "benchmarks" / "merge_speed_rows.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method: str, n: int, median: float | None, *, kind: str = "approx", status: str = "ok", **kw) -> dict:
    return {
        "method": method, "kind": kind, "device": "cpu", "dtype": "float32", "head_dim": 64, "n": n,
        "causal": False, "pass": "fwd", "median_s": median, "status": status, **kw,
    }  # fmt: skip


def test_merge_replaces_only_measured_points_and_recomputes_unpaired_ratios(tmp_path: Path) -> None:
    mod = _module()
    base = {
        "mode": "speed",
        "rows": [
            _row("sdpa", 1024, 1.0, kind="baseline"),
            _row("sdpa", 4096, 8.0, kind="baseline"),
            _row("aft", 1024, 2.0, ratio_sdpa=2.0),
            _row("aft", 4096, None, status="error"),
            _row("linear", 4096, 0.5, ratio_sdpa=0.0625),
        ],
    }
    patch_rows = [
        _row("sdpa", 4096, 99.0, kind="baseline"),  # a patch's baselines never replace BASE's
        _row("aft", 4096, 4.0),  # unpaired: ratio from BASE's SDPA row at 4096
    ]
    ck = tmp_path / "fix.partial.jsonl"  # an unfinished run's checkpoint, with a torn last line
    ck.write_text(json.dumps({"fingerprint": "x"}) + "\n" + "\n".join(map(json.dumps, patch_rows)) + '\n{"method"')
    patch = mod.load(ck)
    assert len(patch["rows"]) == 2
    out = mod.merge(base, patch, {"aft"})
    by = {(r["method"], r["n"]): r for r in out["rows"]}
    assert len(out["rows"]) == 5
    assert by[("aft", 1024)]["median_s"] == 2.0  # not measured by the patch: kept
    assert by[("aft", 4096)]["status"] == "ok" and math.isclose(by[("aft", 4096)]["ratio_sdpa"], 0.5)
    assert by[("sdpa", 4096)]["median_s"] == 8.0 and by[("linear", 4096)]["ratio_sdpa"] == 0.0625
    assert out["merged_from"][-1]["methods"] == ["aft"]
