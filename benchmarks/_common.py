"""Helpers shared by the benchmark scripts (kept for the scripts; the code lives in ``attnlib.bench``)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from attnlib.bench.machine import cpu_model, machine_info
from attnlib.bench.report import markdown_table
from attnlib.bench.timing import interleaved_medians

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]

__all__ = [
    "RESULTS",
    "cpu_model",
    "default_work_dir",
    "display_path",
    "interleaved_medians",
    "machine_info",
    "markdown_table",
    "portable_paths",
    "save_records",
]


def default_work_dir(name: str) -> Path:
    """A run cache in the system's temporary directory (``$TMPDIR/<name>``)."""
    return Path(tempfile.gettempdir()) / name


def display_path(path: Path | str) -> str:
    """``path`` as it may appear in a committed result: relative to the repository or the current
    directory, ``$TMPDIR/...`` under the temporary directory, ``~/...`` under the home directory;
    never this machine's absolute path."""
    p = Path(path).expanduser().resolve()
    for base, prefix in (
        (REPO, ""),
        (Path.cwd().resolve(), ""),
        (Path(tempfile.gettempdir()).resolve(), "$TMPDIR/"),
        (Path.home().resolve(), "~/"),
    ):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        return prefix + rel.as_posix()
    return "<abs>/" + p.name


def portable_paths(obj: Any, *paths: Path | str) -> Any:
    """``obj`` (JSON-like) with every occurrence of the given absolute paths replaced by
    :func:`display_path` in all strings (e.g. a run directory recorded in an ``init_from=`` override)."""
    subs = sorted(((str(Path(p).resolve()), display_path(p)) for p in paths), key=lambda s: -len(s[0]))
    subs += [(str(p), display_path(p)) for p in paths if str(p) != str(Path(p).resolve())]

    def fix(x: Any) -> Any:
        if isinstance(x, str):
            for old, new in subs:
                x = x.replace(old, new)
            return x
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x

    return fix(obj)


def save_records(path: Path, records: dict, runs: Path, **fields: Any) -> dict:
    """Stamp a sweep's records with ``fields``, the machine, today's date and the run directory
    (as :func:`display_path`), and write them to ``path`` as JSON; returns the records."""
    records.update(**fields, machine=machine_info(), date=time.strftime("%Y-%m-%d"), runs_dir=display_path(runs))
    path.write_text(json.dumps(records, indent=2) + "\n")
    return records
