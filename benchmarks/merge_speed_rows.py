"""Replace some methods' rows of a saved speed (or approx) run with a later run's, then re-render.

    python benchmarks/merge_speed_rows.py BASE.json PATCH.json [--methods a b ...]

(approx results: their ``points`` of those methods are replaced; nothing is recomputed.)

Used when a few variants were fixed after a long ``attnlib-bench bench=cpu_full`` run: rerun
only them with the same preset (``variants=[...] name=<patch>``) and merge. Rows of BASE at a
point (method, N, causal, pass, ...) that PATCH measured for one of its methods (or ``--methods``)
are replaced by PATCH's rows; PATCH may be the ``.partial.jsonl`` of an unfinished run. Crossovers are
recomputed, ``merged_from`` in the JSON records the patch (its command, commit and date), and
the markdown and plots of BASE are rewritten (``attnlib-bench mode=render``). Baseline rows
(sdpa, flex) of PATCH are not merged: the patch's own ratios come from its paired SDPA runs
(N <= ``pair_sdpa_max_n``) or from BASE's SDPA row at the same point after the merge.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from attnlib.bench.report import write_json
from attnlib.bench.speed import crossovers

BASELINE_KINDS = ("baseline",)


def _key(r: dict) -> tuple:
    return (r["method"], r["device"], r["dtype"], r["head_dim"], r["n"], r["causal"], r["pass"])


def load(path: Path) -> dict:
    """A results JSON, or the ``<name>.partial.jsonl`` checkpoint of an unfinished speed run."""
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()[1:]
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return {"mode": "speed", "rows": rows, "command": f"(unfinished run, checkpoint {path.name})"}
    return json.loads(path.read_text())


def merge(base: dict, patch: dict, methods: set[str]) -> dict:
    """BASE with the rows of ``methods`` taken from PATCH (ratios above pairing recomputed vs BASE's SDPA)."""
    new = [r for r in patch["rows"] if r["method"] in methods]
    replaced = {_key(r) for r in new}
    keep = [r for r in base["rows"] if _key(r) not in replaced]
    sdpa = {
        (r["device"], r["dtype"], r["head_dim"], r["n"], r["causal"], r["pass"]): r
        for r in keep
        if r["method"] == "sdpa" and r.get("median_s")
    }
    for r in new:
        if r.get("median_s") and "sdpa_median_s" not in r:  # not paired: ratio to BASE's SDPA row
            s = sdpa.get((r["device"], r["dtype"], r["head_dim"], r["n"], r["causal"], r["pass"]))
            r["ratio_sdpa"] = r["median_s"] / s["median_s"] if s else None
    out = dict(base)
    out["rows"] = keep + new
    out["crossovers"] = crossovers(out["rows"])
    info = patch.get("machine", {})
    out.setdefault("merged_from", []).append(
        {
            "methods": sorted(methods),
            "command": patch.get("command"),
            "commit": info.get("commit"),
            "date": info.get("date"),
            "loadavg": info.get("loadavg"),
        }
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("patch", type=Path)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every non-baseline method of PATCH")
    a = ap.parse_args()
    base, patch = json.loads(a.base.read_text()), load(a.patch)
    if base.get("mode") != patch.get("mode") or base.get("mode") not in ("speed", "approx"):
        modes = (base.get("mode"), patch.get("mode"))
        raise SystemExit(f"both files must be speed or both approx results, got {modes}")
    key = "rows" if base["mode"] == "speed" else "points"
    found = {r["method"] for r in patch[key] if r.get("kind") not in BASELINE_KINDS}
    methods = set(a.methods) if a.methods else found
    if base["mode"] == "speed":
        merged = merge(base, patch, methods)
    else:
        merged = dict(base)
        merged["points"] = [p for p in base["points"] if p["method"] not in methods]
        merged["points"] += [p for p in patch["points"] if p["method"] in methods]
        merged.setdefault("merged_from", []).append({"methods": sorted(methods), "command": patch.get("command")})
    write_json(a.base, merged)
    print(f"merged {sorted(methods)} from {a.patch} into {a.base}")
    bench = Path(sys.executable).with_name("attnlib-bench")
    return subprocess.call([str(bench), "mode=render", f"current={a.base}"])


if __name__ == "__main__":
    raise SystemExit(main())
