"""Short-sequence attention on CPU: SDPA's key tail, rotary positions, one class-token weight row.

The shapes of a pruned ViT's blocks (batch 256, 4 heads of 16, 9-65 tokens), fp32, forward under
``torch.inference_mode``, medians of interleaved runs (a new random order each round, one untimed
call before each timed one). Three tables:

1. **Keys M** (q, k, v of shape (256, 4, M, 16)): raw ``F.scaled_dot_product_attention``; the
   ``softmax`` core's CPU path (what ``attnlib.Attention(variant="softmax")`` runs: the explicit
   path below ``attnlib.dispatch.FEW_KEYS`` keys, else SDPA with the keys padded to the vector width when
   ``cpu_key_padding`` says so); and the explicit path alone (``backend="math"``).
2. **Rotary positions** on the q and k of a (256, 65, 64) batch with 4 heads: the head-major
   rotation of q and k one by one (``RotaryEmbedding.forward``, the pre-stop-13 path) vs the
   token-major joint rotation (``RotaryEmbedding.rotate_tokens``); both give the same bits.
3. **Class-token row** of a (256, 65, 64) batch: the attention module asked for the full weights
   (explicit N x N path) vs for query 0's row only (``weights_query=0``: SDPA output + one row).

Writes benchmarks/results/cpu_small_attention.{md,json}. Run:
``python benchmarks/cpu_small_attention.py [--threads 1] [--repeats 21]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved_medians, machine_info, markdown_table

import attnlib
from attnlib.dispatch import cpu_key_padding, few_keys_explicit
from attnlib.functional import softmax_attention
from attnlib.masks import normalize_mask
from attnlib.variants.dense import SoftmaxAttention

KEYS = [9, 13, 16, 17, 24, 28, 30, 32, 33, 34, 36, 38, 48, 64, 65]
B, H, D = 256, 4, 16


def keys_table(repeats: int) -> list[dict[str, object]]:
    """SDPA / attnlib softmax / explicit path at each key count (self-attention, N = M)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    core = SoftmaxAttention(num_heads=H, head_dim=D)  # what attnlib.Attention(variant="softmax") runs
    for m in KEYS:
        q, k, v = (torch.randn(B, H, m, D, generator=g) for _ in range(3))
        torch.testing.assert_close(
            SoftmaxAttention(num_heads=H, head_dim=D)(
                q, k, v, normalize_mask(None, causal=False, batch=B, heads=H, n=m, m=m, device=q.device)
            ).out,
            F.scaled_dot_product_attention(q, k, v),
        )
        am = normalize_mask(None, causal=False, batch=B, heads=H, n=m, m=m, device=q.device)
        fns = {
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "attnlib": lambda q=q, k=k, v=v, am=am: core(q, k, v, am).out,
            "math": lambda q=q, k=k, v=v: softmax_attention(q, k, v, backend="math"),
        }
        med = interleaved_medians(fns, repeats=repeats, rewarm=True)
        pad = cpu_key_padding(m, q.device, q.dtype)
        path = "explicit" if few_keys_explicit(m, q.device) else f"SDPA, keys padded to {m + pad}"
        rows.append({"m": m, "attnlib_path": path, **{f"{k}_ms": 1e3 * t for k, t in med.items()}})
    return rows


def rotary_table(repeats: int) -> dict[str, float]:
    """Head-major q then k vs the token-major joint rotation, on a (256, 65, 2 x 4 heads, 16) projection."""
    rope = attnlib.positional.RotaryEmbedding(D)
    n = 65
    qkv = torch.randn(B, n, 3 * H * D)
    qk = qkv[..., : 2 * H * D].unflatten(-1, (2 * H, D))  # token-major (B, N, G, D) view
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # head-major views
    joint = rope.rotate_tokens(qk)
    assert torch.equal(joint[:, :, :H].transpose(1, 2), rope(q)) and torch.equal(
        joint[:, :, H:].transpose(1, 2), rope(k)
    )
    fns = {"head-major q, k": lambda: (rope(q), rope(k)), "token-major joint": lambda: rope.rotate_tokens(qk)}
    return {k: 1e3 * t for k, t in interleaved_medians(fns, repeats=repeats, rewarm=True).items()}


def row_table(repeats: int) -> dict[str, float]:
    """The attention module's call with the full weights vs with query 0's weight row only."""
    torch.manual_seed(0)
    attn = attnlib.Attention(H * D, H, rope=True).eval()
    x = torch.randn(B, 65, H * D)
    _, full = attn(x, return_extras=True, need_weights=True)
    _, one = attn(x, return_extras=True, weights_query=0)
    torch.testing.assert_close(one.weights, full.weights[:, :, :1])
    fns = {
        "no extras": lambda: attn(x),
        "full weights": lambda: attn(x, return_extras=True, need_weights=True),
        "weights_query=0": lambda: attn(x, return_extras=True, weights_query=0),
    }
    return {k: 1e3 * t for k, t in interleaved_medians(fns, repeats=repeats, rewarm=True).items()}


def main() -> None:
    """Time the three tables and write them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        keys = keys_table(args.repeats)
        rot = rotary_table(args.repeats)
        row = row_table(args.repeats)
    info = machine_info()
    t1 = markdown_table(
        [
            "M (keys = queries)",
            "raw SDPA (ms)",
            "attnlib softmax (ms)",
            "explicit (ms)",
            "attnlib path",
            "SDPA / attnlib",
        ],
        [
            [
                r["m"],
                f"{r['sdpa_ms']:.2f}",
                f"{r['attnlib_ms']:.2f}",
                f"{r['math_ms']:.2f}",
                r["attnlib_path"],
                f"{r['sdpa_ms'] / r['attnlib_ms']:.2f}x",
            ]
            for r in keys
        ],
    )
    t2 = markdown_table(["rotation", "ms"], [[k, f"{v:.2f}"] for k, v in rot.items()])
    t3 = markdown_table(["call", "ms"], [[k, f"{v:.2f}"] for k, v in row.items()])
    text = (
        "# Short-sequence attention on CPU\n\n"
        f"`python benchmarks/cpu_small_attention.py --threads {args.threads} --repeats {args.repeats}` - fp32, "
        f"forward, `torch.inference_mode`, CPU `{info['cpu']}` ({info.get('cpu_capability', '?')}), "
        f"{args.threads} thread(s), torch {info['torch']}, commit {info['commit']}; medians of {args.repeats} "
        "interleaved rounds (shuffled order, one untimed call before each timed one).\n\n"
        f"## Keys: q, k, v of shape ({B}, {H}, M, {D})\n\n{t1}\n\n"
        f"## Rotary positions on the q and k of a ({B}, 65, {H * D}) batch, {H} heads (same bits)\n\n{t2}\n\n"
        f"## Class-token weight row, Attention({H * D}, {H}, rope=True) on ({B}, 65, {H * D})\n\n{t3}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_small_attention.md").write_text(text)
    payload = {"meta": {**info, "threads": args.threads, "repeats": args.repeats}, "keys": keys, "rotary_ms": rot}
    payload["row_ms"] = row
    (RESULTS / "cpu_small_attention.json").write_text(json.dumps(payload, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
