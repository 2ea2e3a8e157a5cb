"""``attnlib-train``: train and test a backbone with any attention variant (a Hydra app).

Examples::

    attnlib-train experiment=vit_digits                        # ViT on digits, softmax
    attnlib-train experiment=vit_digits attention=local        # the same with another attention
    attnlib-train -m experiment=vit_digits attention=softmax,flow,local    # a sweep
    torchrun --nproc_per_node=2 -m attnlib.cli.train experiment=vit_digits # DDP (gloo on CPU)
    attnlib-train -m hydra/launcher=slurm experiment=lm_chars attention=a,b # Slurm (submitit)
    attnlib-train experiment=lm_chars hydra.run.dir=runs/lm resume=true    # continue a run

The configs ship inside the package (``attnlib/configs``); ``--cfg job`` prints the composed
config, ``--help`` lists the groups. Results go to ``<run dir>/results.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

import hydra
from omegaconf import DictConfig

from attnlib.training.loop import NonFiniteLossError, train

__all__ = ["main"]

log = logging.getLogger("attnlib.train")
_RANK_DIR: list[str] = []


def _program() -> str:
    """How the user invoked the app: ``attnlib-train`` when that is on PATH, else the script's path."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "attnlib-train":
        on_path = shutil.which("attnlib-train")
        if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
            return "attnlib-train"
        rel = os.path.relpath(argv0)
        return rel if not rel.startswith("..") else os.path.abspath(argv0)
    return "attnlib-train"


def _swap_hint(overrides: list[str], variant: str) -> str:
    """The same command line with another attention variant."""
    import attnlib

    kept = [o for o in overrides if not o.startswith(("attention=", "attention.", "hydra.", "resume="))]
    alt = next((v for v in ("flow", "local", "softmax") if v != variant and v in attnlib.available()), "softmax")
    return " ".join([_program(), *kept, f"attention={alt}"])


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = train(cfg, hc.runtime.output_dir)
    except NonFiniteLossError as e:
        log.error("%s", e)
        if multirun:
            return None
        sys.exit(1)
    if not multirun and int(os.environ.get("RANK", "0")) == 0:
        import attnlib

        print(
            "\nSwap the attention with one word (any of: " + ", ".join(attnlib.available()) + "):\n  "
            + _swap_hint(list(hc.overrides.task), str(results.get("variant", "")))
        )  # fmt: skip
    # an objective for Hydra sweepers: the main test metric
    for key in ("test_accuracy", "test_bpc", "test_cer"):
        if key in results:
            return float(results[key])
    return None


def main() -> None:
    """Console entry point. Under torchrun, ranks > 0 write into a temporary Hydra dir (rank 0 owns the run dir)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0 and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]) and "-m" not in sys.argv:
        tmp = tempfile.mkdtemp(prefix=f"attnlib-rank{rank}-")
        _RANK_DIR.append(tmp)
        sys.argv += [f"hydra.run.dir={tmp}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    try:
        _app()
    finally:
        for d in _RANK_DIR:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
