"""The slim install: core dependencies only, the rest in extras, and ``import attnlib`` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("sklearn", "tensorboard", "matplotlib", "transformers", "triton", "scipy", "ot", "entmax", "submitit")


def test_core_dependencies_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"])
    assert names == ["einops", "hydra-core", "numpy", "torch"]
    extras = project["optional-dependencies"]
    assert {"train", "bench", "hf", "kernels", "dev"} <= set(extras)
    assert any(d.startswith("transformers") for d in extras["hf"])
    dev = " ".join(extras["dev"])
    for extra in ("train", "bench", "hf", "kernels", "docs"):
        assert extra in dev.split("attnlib[", 1)[1].split("]", 1)[0], f"the dev extra must pull [{extra}]"


def test_import_attnlib_loads_no_optional_dependency():
    code = (
        "import sys, attnlib, attnlib.integrations, attnlib.multihead\n"
        f"print(','.join(m for m in {EXTRAS_ONLY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"import attnlib loaded optional dependencies: {out.stdout.strip()}"
