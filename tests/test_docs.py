"""The documentation: the site builds, every variant is documented, the code in it runs, the
commands it quotes exist, and nothing committed carries machine paths or process notes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnlib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"

NO_RUN = "<!-- no-run -->"  # put on the line before a ```python block that is not meant to run
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["NO_MKDOCS_2_WARNING"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced ``lang`` blocks of ``path`` (those marked ``<!-- no-run -->`` left out)."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].strip() == NO_RUN:
            continue
        out.append(m.group(2))
    return out


# -- (a) the site builds ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docs_build_strict(tmp_path: Path) -> None:
    for mod in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[docs]')")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,  # generous: CI machines may be loaded
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    html = (tmp_path / "site" / "variants" / "index.html").read_text()
    for name in attnlib.available():  # generated capability lines made it into the page
        assert f"attnlib.variant_info(&#39;{name}&#39;)" in html or f"attnlib.variant_info('{name}')" in html


# -- (b) every registered variant is documented ------------------------------------------------


@pytest.mark.parametrize("name", attnlib.available())
def test_every_variant_has_a_section(name: str) -> None:
    text = (DOCS / "variants.md").read_text()
    assert re.search(rf"^#{{2,4}} `{name}`\s*$", text, re.M), f"docs/variants.md has no '### `{name}`' section"
    assert f"<!-- capabilities: {name} -->" in text, f"docs/variants.md: no generated capabilities line for {name}"


def test_readme_variant_table_is_generated() -> None:
    sys.path.insert(0, str(DOCS))
    try:
        import gen_variant_table
    finally:
        sys.path.remove(str(DOCS))
    text = README.read_text()
    assert gen_variant_table.render_readme(text) == text, "run `python docs/gen_variant_table.py`"
    for name in attnlib.available():
        assert f"[`{name}`](docs/variants.md#{name})" in text


# -- (c) the code in README and docs runs, and uses public APIs only ---------------------------


PY_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.mark.parametrize("page", PY_PAGES, ids=[p.name for p in PY_PAGES])
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    code = "\n\n".join(blocks(page, "python"))
    private = re.findall(r"\battnlib(?:\.\w+)*\._\w+|from attnlib[\w.]* import [^\n]*\b_\w+", code)
    assert not private, f"{page.name}: documentation code must use public APIs, found {private}"
    script = tmp_path / f"{page.stem}_blocks.py"
    script.write_text("import torch\ntorch.manual_seed(0)\n\n" + code)
    res = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"{page.name}: its python blocks failed\n{res.stderr[-4000:]}"


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))


def _console_scripts() -> set[str]:
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))


ALLOWED = {"pip", "torchrun", "tensorboard", "apt-get", "git", "cd", "export"}


def _check_command(line: str, where: str) -> None:
    words = line.split()
    cmd = words[0]
    if cmd == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        missing = set(targets) - _make_targets()
        assert not missing, f"{where}: `{line}` names Makefile targets that do not exist: {missing}"
    elif cmd.startswith("attnlib-"):
        assert cmd in _console_scripts(), f"{where}: `{line}`: no console script {cmd!r} in pyproject.toml"
    elif cmd in ("python", "python3"):
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2].split(".")[0]), f"{where}: `{line}`: no module {words[2]}"
        else:
            assert (ROOT / words[1]).is_file(), f"{where}: `{line}`: no file {words[1]}"
    else:
        assert cmd in ALLOWED, f"{where}: `{line}`: unknown command {cmd!r} (add it to ALLOWED if it is real)"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_quoted_commands_exist(page: Path) -> None:
    checked = 0
    for block in blocks(page, "bash"):
        for raw in block.splitlines():
            line = raw.split(" #")[0].strip()
            if line and not line.startswith("#"):
                _check_command(line, page.name)
                checked += 1
    text = page.read_text()
    for target in re.findall(r"`make ([A-Za-z0-9_.-]+)", text):
        assert target in _make_targets(), f"{page.name}: `make {target}` is not a Makefile target"
        checked += 1
    for script in re.findall(r"`(attnlib-[a-z]+)", text):
        assert script in _console_scripts(), f"{page.name}: `{script}` is not a console script"
    if page == README:
        assert checked >= 2 and "make demo" in text and "make test" in text


# -- (d) no machine paths or process notes in what is committed --------------------------------

ABS_PATH = re.compile(r"(?<![\w$~.])/(?:tmp|work|root|home)/")
PROCESS_NOTE = re.compile(r"\b(?:stop \d+|issue\s*#?\d+|issue's|patch-\d+|step \d+ of the plan)\b", re.I)


def _committed_text_files() -> list[Path]:
    files = [README, *sorted(p for p in DOCS.rglob("*") if p.suffix in (".md", ".py", ".yml"))]
    files += sorted(p for p in RESULTS.rglob("*") if p.suffix in (".md", ".json"))
    return files


@pytest.mark.parametrize("path", _committed_text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_paths_or_process_notes(path: Path) -> None:
    text = path.read_text()
    for n, line in enumerate(text.splitlines(), 1):
        assert not ABS_PATH.search(line), f"{path.relative_to(ROOT)}:{n}: absolute machine path: {line[:200]}"
        assert not PROCESS_NOTE.search(line), f"{path.relative_to(ROOT)}:{n}: process note: {line[:200]}"


def test_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.encode()) < 15_000, f"README.md is {len(text.encode())} bytes; move detail into docs/"
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to missing {link}"
