"""attnlib-bench's GPU preset: block-density rows of flex and block_sparse time the same
BlockMask, and ``max_call_s`` judges a warm call (not the first one, which autotunes / compiles)."""

from __future__ import annotations

import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from attnlib.bench import methods as bm_methods
from attnlib.bench.methods import Case, Inputs, MethodSpec, Runner
from attnlib.bench.speed import measure_case, resolve_methods
from attnlib.cli.bench import CONFIG_ROOT


def _gpu_quick_methods(**over):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT), version_base=None):
        cfg = compose(config_name="bench/config", overrides=["bench=gpu_quick"])
    kwargs = {k: dict(v) for k, v in cfg.variant_kwargs.items()}
    kwargs.update(over)
    methods, _ = resolve_methods(
        ["block_sparse"],
        baselines=["flex"],
        variant_kwargs=kwargs,
        flex_same_mask=False,
        block_densities=[0.5],
        block_density_methods=["flex", "block_sparse"],
        head_dim=128,
    )
    return {m.label: m for m in methods}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_density_rows_of_flex_and_block_sparse_time_the_same_block_mask(causal, monkeypatch) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(bm_methods, "_compiled_flex", lambda dynamic=False: flex_attention)  # eager: no compile
    specs = _gpu_quick_methods()
    assert "block_sparse[d=0.5]" in specs and "flex[d=0.5]" in specs
    case = Case("cpu", "float32", 1, 2, 32, 512, causal)
    inputs = Inputs.make(case, seed=0)
    flex = Runner(specs["flex[d=0.5]"], case, inputs)
    ours = Runner(specs["block_sparse[d=0.5]"], case, inputs)
    assert ours.core.implied_mask(512, 512, "cpu") is None, "the density row must not add the variant's own pattern"
    # the Flex BlockMask is the one the block-sparse variant builds from the same caller mask
    want = ours.caller_mask.as_block_mask((128, 128))
    from attnlib.masks import BlockMask

    assert torch.equal(BlockMask.from_flex(flex.block_mask).to_dense(), want.to_dense())
    assert torch.equal(flex.block_mask.kv_num_blocks.cpu(), want.to_flex().kv_num_blocks.cpu())
    torch.testing.assert_close(ours.forward_output(), flex.forward_output(), rtol=1e-4, atol=1e-5)


def test_density_row_of_a_variant_with_its_own_mask_is_na() -> None:
    specs = _gpu_quick_methods(**{"block_sparse[density]": {}})  # inherits pattern: sliding_window
    case = Case("cpu", "float32", 1, 2, 32, 512, False)
    row = measure_case(specs["block_sparse[d=0.5]"], case.as_dict(), {"memory": False, "runs": 5})
    assert row["status"] == "n/a" and "flex[d=0.5]" in row["reason"]


def test_max_call_s_judges_a_warm_call(monkeypatch) -> None:
    """A first call over max_call_s (autotuning, compilation) no longer stops the timing."""
    real_call = Runner.call
    seen = {"n": 0}

    def slow_first(self):
        seen["n"] += 1
        if seen["n"] == 1:
            time.sleep(0.3)
        return real_call(self)

    monkeypatch.setattr(Runner, "call", slow_first)
    spec = MethodSpec.parse("softmax")
    case = Case("cpu", "float32", 1, 1, 16, 64, False)
    row = measure_case(spec, case.as_dict(), {"memory": False, "runs": 5, "max_call_s": 0.2, "threads": 1})
    assert row["status"] == "ok" and row["first_s"] >= 0.3
    assert "max_call_s" not in row.get("reason", "") and row["median_s"] < 0.2
