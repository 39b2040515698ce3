"""Attention forward + backward on the CPU: fp32, bf16, and bf16 computed in fp32.

    python benchmarks/bench_attention.py           # ~1 minute on 2 cores
    python benchmarks/bench_attention.py --quick   # two shapes, a few seconds

Why `model/attention.py` runs a bf16 attention that will be differentiated in fp32 below
`CPU_BF16_BACKWARD_MIN_KEYS` keys: `scaled_dot_product_attention` on causal multi-query
shapes (8 query heads, one shared key/value head), the output summed and differentiated, median
of `--iters` after 2 warm-ups, in one process. "bf16 in fp32" casts bf16 inputs up, runs the
fp32 kernel and casts the output down, as `sdpa_attention` does. Writes
benchmarks/results/attention.json (attention-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from provenance import provenance
except ImportError:  # imported as benchmarks.bench_attention
    from benchmarks.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# (rows, query heads, sequence length, head dimension)
SHAPES = [(128, 8, 32, 32), (128, 8, 32, 64), (32, 8, 128, 32), (8, 8, 512, 32), (2, 8, 1024, 64)]
QUICK = SHAPES[:1] + SHAPES[3:4]
KINDS = ("fp32", "bf16", "bf16 in fp32")


def seconds(shape: tuple, kind: str, iters: int) -> float:
    """Median seconds of one forward + backward of causal attention at `shape`."""
    rows, heads, n, d = shape
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, heads, n, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(rows, 1, n, d, generator=g).to(dtype).requires_grad_() for _ in "kv")

    def step():
        inputs = (q.float(), k.float(), v.float()) if kind == "bf16 in fp32" else (q, k, v)
        out = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True)
        out.to(dtype).sum().backward()

    times = []
    for i in range(iters + 2):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    lines = [
        "| rows x heads x length x head dim | fp32 ms | bf16 ms | bf16 in fp32 ms | bf16 / fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = [row[kind] * 1e3 for kind in KINDS]
        lines.append(
            f"| {' x '.join(map(str, row['shape']))} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} | "
            f"{ms[1] / ms[0]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, 3 iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, iters = (QUICK, 3) if args.quick else (SHAPES, args.iters)
    rows = [
        {"shape": list(shape), **{kind: seconds(shape, kind, iters) for kind in KINDS}}
        for shape in shapes
    ]
    markdown = table(rows)
    report = {"provenance": provenance(args.threads), "iters": iters, "rows": rows}
    report["markdown"] = markdown
    name = "attention-quick.json" if args.quick else "attention.json"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown)
    print(f"wrote benchmarks/results/{name}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
