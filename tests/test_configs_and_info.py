"""Every registered variant has a YAML under configs/attention/ that builds, and a row in the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import attnlib
from attnlib.cli.info import capability_matrix, main

CONFIGS = Path(attnlib.__file__).parent / "configs" / "attention"


@pytest.mark.parametrize("name", attnlib.available())
def test_every_variant_has_a_config_that_builds(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert path.exists(), f"missing {path}: add configs/attention/{name}.yaml for variant {name!r}"
    cfg = OmegaConf.load(path)
    assert cfg.variant == name
    attn = attnlib.build_attention(cfg, dim=32, num_heads=4)
    assert attn(torch.randn(2, 16, 32)).shape == (2, 16, 32)


def test_configs_name_only_registered_variants() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert names <= set(attnlib.available()), names - set(attnlib.available())


def test_capability_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    table = capability_matrix()
    for name in attnlib.available():
        assert f"`{name}`" in table
    main([])
    assert capsys.readouterr().out.strip() == table
