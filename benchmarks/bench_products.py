"""How fast a few-row weight product reads its weights on the CPU (the decode step's products).

    python benchmarks/bench_products.py                 # dims 256 and 512, 1 and 8 rows
    python benchmarks/bench_products.py --rows 1 --threads 2

A decode step multiplies one row per sequence by every block weight once, so its speed is the
speed at which these products read weights. For a PaLM of the given dim and depth (the shapes of
`benchmarks/bench_decode.py`: fused input projection, attention out, feed-forward out) this
times one pass of products over all block weights, cycling through them as decoding does, by:

    linear       nn.Linear's own product, x @ W^T
    input-major  x @ W_t with a contiguous (in, out) copy of the weight (what decode used to do)
    blocks C     `cpu_tuning.row_block_product`: one batched product over C row blocks of W

and the read-only bandwidth probe of bench_decode.py (a `sum` over 256 MB) just before each
size. Prints a Markdown table of ms per pass and GB/s (weight bytes / time); best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_decode import DEPTHS, PROBE_BYTES, probe_bandwidth  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf.model.cpu_tuning import row_block_product  # noqa: E402


def block_weights(dim: int) -> list[torch.Tensor]:
    """One block's (out, in) weights at heads = dim / 64 of width 64, ff_mult 4."""
    fused = dim + 2 * 64 + 2 * 4 * dim  # q | k | v | ff halves
    return [torch.randn(fused, dim), torch.randn(dim, dim), torch.randn(dim, 4 * dim)]


def time_pass(products, repeats: int) -> float:
    """Best seconds of one pass over every (function, x, weight)."""
    for f, x, w in products:  # warm-up
        f(x, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for f, x, w in products:
            f(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="few-row weight products: GB/s by method"
    )
    p.add_argument("--dims", default="256,512")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--blocks", default="2,4,8")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "products.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    buffer = torch.ones(PROBE_BYTES // 4)
    methods = {
        "linear": lambda x, w: F.linear(x, w),
        "input-major": lambda x, w_t: x @ w_t,
    }
    for c in (int(b) for b in args.blocks.split(",")):
        methods[f"blocks {c}"] = lambda x, w, c=c: row_block_product(x, w, c)
    lines = [
        "| dim x depth | rows | weight MB | probe GB/s | "
        + " | ".join(f"{m} ms (GB/s)" for m in methods)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for dim in (int(d) for d in args.dims.split(",")):
        weights = [w for _ in range(DEPTHS[dim]) for w in block_weights(dim)]
        transposed = [w.t().contiguous() for w in weights]
        total = sum(w.numel() * w.element_size() for w in weights)
        for rows in (int(r) for r in args.rows.split(",")):
            gbps = probe_bandwidth(buffer)
            xs = [torch.randn(rows, w.shape[1]) for w in weights]
            cells = []
            for name, f in methods.items():
                ws = transposed if name == "input-major" else weights
                seconds = time_pass([(f, x, w) for x, w in zip(xs, ws)], args.repeats)
                cells.append(f"{seconds * 1e3:.2f} ({total / seconds / 1e9:.1f})")
            lines.append(
                f"| {dim} x {DEPTHS[dim]} | {rows} | {total / 1e6:.1f} | {gbps:.1f} | "
                + " | ".join(cells)
                + " |"
            )
            print(lines[-1], file=sys.stderr)
    load = os.getloadavg()
    text = (
        f"torch {torch.__version__}, {args.threads} thread(s), load average {load[0]:.2f} at "
        f"the end\n\n" + "\n".join(lines)
    )
    print(text)
    report = {
        "provenance": provenance(args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "markdown": text,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
