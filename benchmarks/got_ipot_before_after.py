"""GOT attention's long-sequence IPOT: this tree's ``ot_attention`` vs the one at another commit.

Loads ``attnlib/functional/ot.py`` as it was at ``--base`` (``git show``) beside the current one
and times both, with torch SDPA as a yardstick, interleaved in one process (eval forward, no
grad, B=1, 8 heads, head dim 64, default settings: cosine cost, beta 0.5, 20 iterations),
``--rounds`` rounds, medians. The base is slow (the old blocked log-domain form): keep N and
the rounds small on a loaded machine.

    python benchmarks/got_ipot_before_after.py --base f3081bb --n 2048 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine_info, markdown_table


def main() -> None:
    import torch

    from attnlib.bench.machine import load_average
    from attnlib.functional import ot as new

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="f3081bb")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="got_ipot_before_after")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    src = subprocess.run(
        ["git", "show", f"{a.base}:attnlib/functional/ot.py"], capture_output=True, text=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ot_base.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("attnlib.functional.ot_base", path)
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, a.n, 64) for _ in range(3))
    fns = {
        "base": lambda: old.ot_attention(q, k, v),
        "new": lambda: new.ot_attention(q, k, v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    load_before = load_average()
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(a.rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "command": "python benchmarks/got_ipot_before_after.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(a.threads),
        "load_before": load_before,
        "load_after": load_average(),
        "n": a.n,
        "base": a.base,
        "times_s": times,
        "median_s": med,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    md = [
        f"# GOT attention (IPOT) at N={a.n}: commit {a.base} vs this tree",
        "",
        f"Machine: CPU `{m['cpu']}` ({m['cores']} cores, {a.threads} torch threads); torch {m['torch']}; "
        f"commit `{m['commit']}`; {result['date']}. Load average before {load_before}, after "
        f"{result['load_after']} (a shared machine: absolute times are inflated, the ratios are interleaved).",
        "",
        f"Regenerate: `{result['command']}`",
        "",
        "Eval forward, B=1, 8 heads, head dim 64, cosine cost, beta 0.5, 20 iterations; medians of "
        f"{a.rounds} interleaved rounds.",
        "",
        markdown_table(
            ["path", "median s", "vs SDPA"],
            [[name, f"{s:.3f}", f"{s / med['sdpa']:.1f}x"] for name, s in med.items()],
        ),
        "",
        f"Speed-up of this tree over {a.base}: {med['base'] / med['new']:.1f}x.",
        "",
    ]
    (RESULTS / f"{a.out}.md").write_text("\n".join(md))
    print(json.dumps(med))


if __name__ == "__main__":
    main()
