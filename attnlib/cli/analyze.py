"""``attnlib-analyze <run dir>``: figures and a markdown summary of a trained run's attention.

Examples::

    attnlib-analyze outputs/vit-digits-softmax/2026-01-01_12-00-00
    attnlib-analyze runs/lm --out figures/lm --examples 4 --split test

Writes ``attention_maps.png``, ``rollout.png``, ``attention_distance.png``, ``head_entropy.png``,
``head_importance.png``, ``head_ablation.png`` (and ``induction.png`` for language models) and
``summary.md`` into ``<run dir>/analysis`` (or ``--out``); see :mod:`attnlib.analysis.report`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="attnlib-analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by attnlib-train (or its checkpoint file)")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/analysis)")
    p.add_argument("--examples", type=int, default=6, help="evaluation examples shown / per batch (default 6)")
    p.add_argument("--batches", type=int, default=2, help="batches for head importance (default 2)")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes' random inputs")
    args = p.parse_args(argv)
    if args.examples <= 0 or args.batches <= 0:
        p.error("--examples and --batches must be positive")
    from attnlib.analysis.report import analyze_run

    try:
        path = analyze_run(
            args.run_dir,
            args.out,
            examples=args.examples,
            batches=args.batches,
            split=args.split,
            device=args.device,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"attnlib-analyze: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and its figures in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
