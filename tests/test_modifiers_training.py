"""Modifiers through Hydra (attnlib-train's config) and the attention-entropy hook of the training loop."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import attnlib
from attnlib.models import ViT
from attnlib.modifiers import EntropyProbe
from attnlib.training import train

TINY = [
    "trainer.max_steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.warmup_steps=1",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.threads=1",
    "model.dim=16",
    "model.depth=1",
    "model.num_heads=2",
    "data.batch_size=8",
]


def _cfg(*overrides: str):
    with initialize_config_module("attnlib.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_modifiers_from_the_command_line_reach_the_model(tmp_path: Path) -> None:
    cfg = _cfg("experiment=vit_digits", "attention=local", "attention.modifiers=[{name: relaxed, gamma: 0.1}]", *TINY)
    assert list(cfg.attention.modifiers) == [{"name": "relaxed", "gamma": 0.1}]
    res = train(cfg, tmp_path / "run")
    assert math.isfinite(res["test_accuracy"])
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["config"]["attention"]["modifiers"] == [{"name": "relaxed", "gamma": 0.1}]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    ent = [r for r in rows if ",train,attn_entropy/L0H1," in r]
    assert len(ent) == 2  # logged on steps 2 and 4
    assert all(0.0 <= float(r.rsplit(",", 1)[1]) <= math.log(17) + 1e-6 for r in ent)  # 16 patches + cls
    plain = _cfg("experiment=vit_digits")
    assert list(plain.attention.modifiers) == []


def test_entropy_probe_matches_the_weights() -> None:
    torch.manual_seed(0)
    model = ViT(attention={"variant": "softmax"}, dim=16, depth=2, num_heads=2).eval()
    probe = EntropyProbe(model, rows=32)
    assert len(probe.layers) == 2
    x = torch.randn(3, 1, 8, 8)
    with probe.armed(False):
        model(x)
    assert probe.collect() == {}
    with probe.armed():
        model(x)
    got = probe.collect()
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(3, -1, -1), tokens], 1) + model.pos_embed
    blk = model.blocks[0]
    _, ex = blk.attn(blk.norm1(tokens), return_extras=True)
    w = ex.weights
    ent = -(w * w.clamp_min(1e-300).log()).sum(-1).mean((0, 2))
    for h in range(2):
        assert abs(got[f"attn_entropy/L0H{h}"] - float(ent[h].detach())) < 1e-5
    assert set(got) >= {"attn_entropy", "attn_entropy/L0", "attn_entropy/L1"}
    assert not EntropyProbe(
        ViT(attention={"variant": "aft_full", "max_len": 17}, dim=16, depth=1, num_heads=2)
    )  # no weights


def test_unsupported_modifier_in_a_model_config_names_both() -> None:
    import pytest

    with pytest.raises(attnlib.UnsupportedError, match="modifier 'ultravico' cannot be used with variant 'flow'"):
        ViT(
            attention={"variant": "flow", "modifiers": [{"name": "ultravico", "window": 4}]},
            dim=16,
            depth=1,
            num_heads=2,
        )
