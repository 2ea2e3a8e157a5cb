"""``variant="block_sparse"`` with right-padding key padding: time and aten ops per call (CPU).

One ``attnlib.Attention`` (dim 512, 8 heads, sliding window +-256, block 128, B=2, N=4096, fp32,
2 threads) called with ``key_padding_mask`` (example 1 padded after 3000 tokens) and without it,
interleaved (``torch.utils.benchmark`` blocks, medians): eval forward and training forward+backward.
The aten op count of one call comes from ``torch.profiler``. Run it in two checkouts to compare
(``--label`` names the row); the JSON rows of several runs merge into one markdown table.

    python benchmarks/block_sparse_key_padding.py --label after --out block_sparse_key_padding
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from _common import RESULTS, machine_info, markdown_table


def measure(threads: int, runs: int) -> dict[str, Any]:
    """Medians (s) and aten op counts of the padded and unpadded calls, eval fwd and train fwd+bwd."""
    import torch

    import attnlib
    from attnlib.bench.timing import aten_op_counts, time_cpu_interleaved

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = 4096
    mod = attnlib.Attention(dim=512, num_heads=8, variant="block_sparse", window=256, block_size=128)
    x = torch.randn(2, n, 512)
    valid = torch.arange(n)[None, :] < torch.tensor([n, 3000])[:, None]

    def call(mode: str, padded: bool) -> Any:
        kw = {"key_padding_mask": valid} if padded else {}

        def fwd() -> None:
            mod.eval()
            with torch.no_grad():
                mod(x, **kw)

        def fwd_bwd() -> None:
            mod.train()
            mod(x, **kw).sum().backward()
            mod.zero_grad(set_to_none=True)

        return fwd if mode == "fwd" else fwd_bwd

    out: dict[str, Any] = {}
    for mode in ("fwd", "fwd+bwd"):
        fns = {"padded": call(mode, True), "unpadded": call(mode, False)}
        t = time_cpu_interleaved(fns, runs=runs, warmup=1, threads=threads, shuffle=0, block_s=0.2)
        ops = aten_op_counts(fns)
        out[mode] = {name: {"median_s": t[name].median_s, "aten_ops": ops[name]} for name in fns}
    return out


def main() -> None:
    from attnlib.bench.machine import load_average

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--label", default="this checkout")
    p.add_argument("--out", default="block_sparse_key_padding")
    a = p.parse_args()
    load = load_average()
    row = {"label": a.label, "load_before": load, **measure(a.threads, a.runs), "load_after": load_average()}
    path = RESULTS / f"{a.out}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    rows = [r for r in old["rows"] if r["label"] != a.label] + [row]
    result = {
        "command": "python benchmarks/block_sparse_key_padding.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(a.threads),
        "rows": rows,
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_table(
        ["checkout", "pass", "padded ms", "unpadded ms", "padded / unpadded", "aten ops padded", "unpadded", "load"],
        [
            [
                r["label"],
                mode,
                f"{r[mode]['padded']['median_s'] * 1e3:.0f}",
                f"{r[mode]['unpadded']['median_s'] * 1e3:.0f}",
                f"{r[mode]['padded']['median_s'] / r[mode]['unpadded']['median_s']:.2f}",
                r[mode]["padded"]["aten_ops"],
                r[mode]["unpadded"]["aten_ops"],
                f"{r['load_before'][0]:.1f}" if r["load_before"] else "",
            ]
            for r in rows
            for mode in ("fwd", "fwd+bwd")
        ],
    )
    m = result["machine"]
    (RESULTS / f"{a.out}.md").write_text(
        "# block_sparse with right-padding key padding (CPU)\n\n"
        f"Machine: CPU `{m['cpu']}` ({m['cores']} cores, {m['threads']} torch threads); torch {m['torch']}; "
        f"{result['date']}. Load average (1 min) per row below: **taken under load**, times are provisional; "
        "the op counts are load-independent.\n\n"
        f"Regenerate: `{result['command']}` in each checkout (rows merge by `--label`).\n\n"
        "B=2, N=4096, dim 512, 8 heads, sliding window +-256, block 128, fp32; example 1 padded after 3000 "
        "tokens. Interleaved medians of the padded and unpadded calls of one module.\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
