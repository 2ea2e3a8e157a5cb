"""MoSA's compute and memory saving against dense softmax attention (CPU, no timing).

    python benchmarks/mosa_savings.py [--dim 256] [--heads 8] [--lengths 256 1024 2048]

For one causal attention layer (``attnlib.Attention(dim, heads, rope=True)``) and each sequence
length N, compares ``variant="softmax"`` with ``variant="mosa"`` at several sparsities (pure MoSA,
and the hybrid with 2 dense heads):

* FLOPs of one forward and of one forward + backward, counted by ``torch.utils.flop_counter``
  (the operations that actually run: MoSA projects only the k = N / sparsity picked tokens of
  each head);
* activation memory of training: bytes of the tensors autograd saves for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded);
* key/value entries a decoding cache would hold for the layer (k per MoSA head, N per dense head).

Writes benchmarks/results/mosa_savings.{json,md}. Counts, not times: they do not depend on the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, markdown_table

import attnlib
from attnlib.functional.sparse import mosa_k


def measure(attn: attnlib.Attention, x: torch.Tensor) -> dict[str, float]:
    """Forward FLOPs, forward+backward FLOPs and saved-activation bytes of one call."""
    params = {p.data_ptr() for p in attn.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        attn(x)
    xx = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as both:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = attn(xx)
        y.square().mean().backward()
    return {
        "fwd_flops": fwd.get_total_flops(),
        "train_flops": both.get_total_flops(),
        "saved_bytes": sum(saved.values()),
    }


def main() -> None:
    """Run the comparison and write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 2048])
    ap.add_argument("--sparsities", type=float, nargs="*", default=[4.0, 8.0, 16.0])
    args = ap.parse_args()
    torch.manual_seed(0)
    configs = [("softmax", {})]
    for rho in args.sparsities:
        configs.append((f"mosa rho={rho:g}", {"variant": "mosa", "sparsity": rho}))
        configs.append((f"mosa rho={rho:g} + 2 dense", {"variant": "mosa", "sparsity": rho, "num_dense_heads": 2}))
    rows, records = [], []
    for n in args.lengths:
        x = torch.randn(1, n, args.dim)
        base = None
        for name, kw in configs:
            kw = {"variant": "softmax", **kw}
            attn = attnlib.Attention(args.dim, args.heads, causal=True, rope=True, **kw)
            m = measure(attn, x)
            dense = kw.get("num_dense_heads", args.heads if kw["variant"] == "softmax" else 0)
            kv = dense * n + (args.heads - dense) * (mosa_k(n, kw["sparsity"]) if "sparsity" in kw else 0)
            m["kv_entries"] = kv
            base = base or m
            rec = {"n": n, "config": name, **m}
            records.append(rec)
            rows.append([
                str(n), name, f"{m['fwd_flops'] / 1e6:.1f}", f"{m['fwd_flops'] / base['fwd_flops']:.3f}",
                f"{m['train_flops'] / base['train_flops']:.3f}", f"{m['saved_bytes'] / 2**20:.2f}",
                f"{m['saved_bytes'] / base['saved_bytes']:.3f}", str(kv), f"{kv / base['kv_entries']:.3f}",
            ])  # fmt: skip
    info = machine_info()
    cmd = "python benchmarks/mosa_savings.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mosa_savings.json").write_text(
        json.dumps({"machine": info, "command": cmd.strip(), "args": vars(args), "rows": records}, indent=2) + "\n"
    )
    text = (
        "# MoSA: compute and memory against dense attention\n\n"
        f"One causal `attnlib.Attention(dim={args.dim}, num_heads={args.heads}, rope=True)` layer, batch 1, float32. "
        "FLOPs counted by `torch.utils.flop_counter` (matmuls only: the operations that run), activation "
        "memory = bytes autograd saves for the backward pass, KV entries = keys a decoding cache would hold "
        "(k = N / sparsity per MoSA head). Ratios are against `softmax` at the same N. Counts, not times, so "
        "the machine's load does not enter.\n\n"
        f"Command: `{cmd.strip()}`. Machine: `{info['cpu']}`, torch {info['torch']}, commit {info['commit']}, "
        f"load average {info['loadavg']}.\n\n"
        + markdown_table(
            [
                "N",
                "layer",
                "fwd MFLOP",
                "fwd ratio",
                "fwd+bwd ratio",
                "saved MiB",
                "saved ratio",
                "KV entries",
                "KV ratio",
            ],
            rows,
        )
        + "\n"
    )
    (RESULTS / "mosa_savings.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
