"""torch.compile: graphs and graph breaks per attention call, and compiled ViT / DecoderLM == eager.

For each variant, ``torch._dynamo.explain`` traces one causal ``attnlib.Attention`` call
(B=2, N=64, dim=64, 4 heads) and reports how many graphs it splits into and why; then a small
ViT and DecoderLM with that variant are compiled (``--backend``, default ``aot_eager``: dynamo +
AOTAutograd without code generation, fast on a CPU; ``inductor`` for the full compiler) and their
outputs compared with eager. Counts are deterministic (no timing); the load only affects wall time.

Writes ``benchmarks/results/compile_graph_breaks.{md,json}``.

    python benchmarks/compile_graph_breaks.py [--backend aot_eager|inductor|eager]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

import attnlib
from attnlib.models import DecoderLM, ViT

VARIANTS: dict[str, dict[str, Any]] = {
    "softmax": {},
    "local": {"window": 16},
    "linear": {},
    "flow": {},
    "block_sparse": {"pattern": "sliding_window", "block_size": 16, "window": 16},
}


def explain_call(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Graphs / breaks of one causal Attention call, with the distinct break reasons."""
    torch.manual_seed(0)
    attn = attnlib.Attention(64, 4, variant, causal=True, **kwargs).eval()
    x = torch.randn(2, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(attn)(x)
    reasons = sorted({str(r.reason).splitlines()[0][:90] for r in ex.break_reasons})
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count, "reasons": reasons}


def compiled_vs_eager(variant: str, kwargs: dict[str, Any], backend: str) -> dict[str, float]:
    """Max |compiled - eager| of a small ViT (non-causal) and DecoderLM (causal) with ``variant``."""
    out: dict[str, float] = {}
    cfg = {"variant": variant, **kwargs}
    torch.manual_seed(0)
    vit = ViT(attention=cfg, img_size=8, patch_size=2, num_classes=10, dim=64, depth=2, num_heads=4).eval()
    lm = DecoderLM(attention=cfg, vocab_size=50, dim=64, depth=2, num_heads=4).eval()
    img = torch.randn(2, 1, 8, 8)
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    for name, model, inp in (("vit", vit, img), ("lm", lm, ids)):
        torch._dynamo.reset()
        with torch.no_grad():
            ref = model(inp)
            got = torch.compile(model, backend=backend)(inp)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        got = got if isinstance(got, torch.Tensor) else got[0]
        out[name] = float((ref - got).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend for the model check")
    ap.add_argument("--out", type=Path, default=RESULTS / "compile_graph_breaks")
    args = ap.parse_args()
    t0 = time.time()
    info = machine_info()
    rows, data = [], {}
    for variant, kwargs in VARIANTS.items():
        ex = explain_call(variant, kwargs)
        diff = compiled_vs_eager(variant, kwargs, args.backend)
        data[variant] = {"kwargs": kwargs, **ex, "max_abs_diff": diff}
        rows.append(
            [variant, ex["graphs"], ex["breaks"], f"{diff['vit']:.1e}", f"{diff['lm']:.1e}", "; ".join(ex["reasons"])]
        )
        print(rows[-1], flush=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = f"python benchmarks/compile_graph_breaks.py --backend {args.backend}"
    md = [
        "# torch.compile: graph breaks per attention call",
        "",
        f"Machine: {info['cpu']}, {info['cores']} CPUs, torch {info['torch']}; commit {info['commit']}; "
        f"date {date}; load average {info['loadavg'][0]:.1f} (shared machine; counts do not depend on it).",
        "",
        f"Command: `{cmd}` ({time.time() - t0:.0f} s)",
        "",
        "One causal `attnlib.Attention(64, 4, variant, causal=True)` call on (2, 64, 64), traced by "
        "`torch._dynamo.explain`; then a 2-block ViT (8x8 images) and DecoderLM (64 tokens) with the variant, "
        f"`torch.compile(backend={args.backend!r})` vs eager (max |difference| of the outputs).",
        "",
        markdown_table(["variant", "graphs", "graph breaks", "ViT diff", "LM diff", "break reasons"], rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(md))
    meta = {"machine": info, "date": date, "command": cmd, "backend": args.backend}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "variants": data}, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
