"""benchmarks/pruning_cpu.py: every setting's runs compose and prune to the token counts its rows claim.

Untrained tiny-data models (random weights, 8 random images): checks the settings and the row
builder, never accuracy or speed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from attnlib.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {"img_size": 8, "in_chans": 1, "num_classes": 10}


def _module():
    spec = importlib.util.spec_from_file_location("pruning_cpu", ROOT / "benchmarks" / "pruning_cpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


class _Data:
    def model_kwargs(self) -> dict[str, Any]:
        return dict(DIGITS)


def _checkpoints(setting: Any) -> dict[str, dict[str, Any]]:
    """Fake checkpoints (config + randomly initialised weights) of every run of ``setting``."""
    cks = {}
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        for key, overrides in setting.runs.items():
            extra = ["init_from=/nowhere"] if key.endswith("_ft") else []
            cfg = OmegaConf.to_container(compose("train", overrides=[*overrides, *extra]), resolve=True)
            torch.manual_seed(0)
            model = build_model(cfg["model"], cfg["attention"], **DIGITS)
            cks[key] = {"config": cfg, "model": model.state_dict()}
    return cks


def test_px2_setting_is_the_original_table() -> None:
    mod = _module()
    px2 = mod.SETTINGS["px2"]
    assert px2.runs is mod.RUNS and px2.out_stem == "pruning_cpu" and px2.patches == 16
    assert mod.SETTINGS["px1"].out_stem == "pruning_cpu_px1"


@pytest.mark.parametrize("name", ["px2", "px1"])
def test_setting_rows_prune_to_the_stated_token_counts(name: str) -> None:
    mod = _module()
    setting = mod.SETTINGS[name]
    cks = _checkpoints(setting)
    patch = {16: 2, 64: 1}[setting.patches]
    assert all(ck["config"]["model"]["patch_size"] == patch for ck in cks.values())
    base_steps = cks["base"]["config"]["trainer"]["max_steps"]
    assert {k: ck["config"]["trainer"]["max_steps"] for k, ck in cks.items() if k != "base"} == dict.fromkeys(
        [k for k in cks if k != "base"], {2500: 1000, 2400: 800}[base_steps]
    )
    models = mod.build_models(cks, _Data(), setting)
    n0, half = setting.patches + 1, setting.patches // 2
    p1 = setting.patches * 5 // 8
    p2 = p1 * 7 // 10
    expect = {
        "none (baseline)": [n0] * 4,
        "none, fine-tuned (control)": [n0] * 4,
        "topk r=0.5": [n0] + [half + 1] * 3,
        "topk r=0.75": [n0] + [setting.patches * 3 // 4 + 1] * 3,
        "topk r=0.25": [n0] + [setting.patches // 4 + 1] * 3,
        f"topk progressive {p1} -> {p2} patches": [n0, p1 + 1, p2 + 1, p2 + 1],
        "topk r=0.5 post-hoc": [n0] + [half + 1] * 3,
    }
    if "topk_fuse_ft" in setting.runs:  # px2 only (px1 has rotary positions: fused tokens have none)
        expect[f"topk {half - 1} + fused (EViT)"] = [n0] + [half + 1] * 3
    # the progressive run keeps the same tokens per later block on average as topk r=0.5
    assert sum(expect[f"topk progressive {p1} -> {p2} patches"][1:]) == 3 * (half + 1)
    assert set(expect) < set(models) and {"ltp", "ltp, padded batch"} < set(models)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for label, (m, note) in models.items():
            counter = mod.TokenCounter(m)
            assert m(x).shape == (8, 10) and note
            if label in expect:
                assert counter.per_block(n0)[1] == [float(v) for v in expect[label]], label


def test_ft_steps_budget_and_run_names() -> None:
    """``--ft-steps N``: every fine-tune (control included) gets N steps and its own run dir; the
    dense base is shared."""
    mod = _module()
    runs = mod.with_ft_steps(mod.SETTINGS["px1"].runs, 2400)
    assert runs["base"] == mod.SETTINGS["px1"].runs["base"]
    assert all(v[-1] == "trainer.max_steps=2400" for k, v in runs.items() if k != "base")
    assert mod.with_ft_steps(mod.RUNS, None) is mod.RUNS
    assert mod.run_name("base", 1, 2400) == "base_s1"
    assert mod.run_name("topk_ft", 0, 2400) == "topk_ft_ft2400"
    assert mod.run_name("ltp_ft", 2, 2400) == "ltp_ft_s2_ft2400"
    assert mod.run_name("ltp_ft", 2) == "ltp_ft_s2"
