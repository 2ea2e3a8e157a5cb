"""Regression gate: compare a speed run with a saved one (xFormers' ``--compare`` / fail-if-regression).

A row (same method, device, dtype, B, H, D, N, causal, pass) *regressed* when

    new_median > old_median · (1 + rel_tol + noise) + abs_floor_s

where ``noise`` is the larger relative interquartile range of the repeated timed runs of the two
rows (so a noisy measurement needs a bigger slowdown to count) and ``abs_floor_s`` absorbs timer
resolution on tiny calls (xFormers uses 5 % + 30 µs). It got *faster* under the mirrored
condition. A row that was timed before and is FAILED / error now is also a regression.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnlib.bench.report import fmt_time, markdown_table
from attnlib.bench.timing import quantile

__all__ = ["compare_markdown", "compare_rows", "load_rows", "row_key", "row_noise"]

KEY_FIELDS = ("method", "device", "dtype", "batch", "heads", "head_dim", "n", "causal", "pass")


def row_key(r: dict[str, Any]) -> tuple:
    """The identity of a speed row."""
    return tuple(r.get(k) for k in KEY_FIELDS)


def row_noise(r: dict[str, Any]) -> float:
    """Relative spread (IQR / median) of a row's timed runs (0 if unknown)."""
    if r.get("noise") is not None:
        return float(r["noise"])
    times = r.get("times_s") or []
    med = r.get("median_s")
    if len(times) >= 2 and med:
        return (quantile(times, 0.75) - quantile(times, 0.25)) / med
    return 0.0


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The speed rows of a saved ``attnlib-bench`` JSON file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--compare: no such results file {str(p)!r} (a <name>.json written by attnlib-bench)")
    data = json.loads(p.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"--compare: {str(p)!r} has no 'rows' list; is it a speed-mode results file?")
    return rows


def compare_rows(
    old: Iterable[dict[str, Any]],
    new: Iterable[dict[str, Any]],
    *,
    rel_tol: float = 0.05,
    abs_floor_s: float = 30e-6,
) -> list[dict[str, Any]]:
    """Verdict per row: "REGRESSION", "faster", "same", "missing" (only in old) or "new" (only in new)."""
    old_by = {row_key(r): r for r in old}
    new_by = {row_key(r): r for r in new}
    out: list[dict[str, Any]] = []
    for key in list(old_by) + [k for k in new_by if k not in old_by]:
        o, n = old_by.get(key), new_by.get(key)
        rec: dict[str, Any] = dict(zip(KEY_FIELDS, key))
        if n is None:
            rec["verdict"] = "missing"
            out.append(rec)
            continue
        if o is None:
            rec["verdict"] = "new"
            out.append(rec)
            continue
        o_ok = o.get("status") == "ok" and o.get("median_s")
        n_ok = n.get("status") == "ok" and n.get("median_s")
        if o_ok and not n_ok:
            rec.update(verdict="REGRESSION", reason=f"was timed, now {n.get('status')}: {n.get('reason', '')}")
        elif not o_ok:
            rec.update(verdict="same" if not n_ok else "new", reason=f"was {o.get('status')}")
        else:
            t0, t1 = float(o["median_s"]), float(n["median_s"])
            noise = max(row_noise(o), row_noise(n))
            limit = t0 * (1 + rel_tol + noise) + abs_floor_s
            lower = t0 * (1 - rel_tol - noise) - abs_floor_s
            verdict = "REGRESSION" if t1 > limit else ("faster" if t1 < lower else "same")
            rec.update(verdict=verdict, old_s=t0, new_s=t1, ratio=t1 / t0, noise=noise, limit_s=limit)
        out.append(rec)
    return out


def compare_markdown(results: list[dict[str, Any]], *, against: str, rel_tol: float, abs_floor_s: float) -> str:
    """A markdown summary: counts, then every regression and improvement."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    lines = [
        f"## Regression gate vs `{against}`",
        "",
        f"Rule: slower than the saved median by more than {rel_tol:.0%} + noise + {abs_floor_s * 1e6:.0f} µs "
        "(noise = larger relative IQR of the repeated timed runs of the two rows).",
        "",
        "Summary: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
    ]
    flagged = [r for r in results if r["verdict"] in ("REGRESSION", "faster")]
    if flagged:
        lines.append(
            markdown_table(
                ["verdict", "method", "device", "dtype", "d", "N", "causal", "pass", "old", "new", "ratio", "noise"],
                [
                    [
                        f"**{r['verdict']}**" if r["verdict"] == "REGRESSION" else r["verdict"],
                        r["method"],
                        r["device"],
                        r["dtype"],
                        r["head_dim"],
                        r["n"],
                        r["causal"],
                        r["pass"],
                        fmt_time(r.get("old_s")),
                        fmt_time(r.get("new_s")) if r.get("new_s") else r.get("reason", ""),
                        f"{r['ratio']:.3f}" if r.get("ratio") else "",
                        f"{r['noise']:.1%}" if r.get("noise") is not None else "",
                    ]
                    for r in flagged
                ],
            )
        )
    else:
        lines.append("No row is slower or faster beyond the threshold.")
    return "\n".join(lines) + "\n"
