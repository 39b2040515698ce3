"""What `--checkpoint-activations` buys and costs: peak memory and time of one training step.

    python benchmarks/bench_checkpointing.py            # context 1024, ~3 minutes on 2 cores
    python benchmarks/bench_checkpointing.py --quick    # tiny smoke run (seconds)

Ours only (the reference has no such option). Each measurement is a fresh `_worker.py`
process: `memory` (resident-set growth of a warm training step, VmHWM - VmRSS, glibc's mmap
threshold fixed so freed tensors leave RSS) and `train` (median step time); off and on
alternate so a drift in machine load does not favour one. Prints a Markdown table and writes
it, with every raw result, to benchmarks/results/checkpointing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    from bench_palm import WORKER, machine_info, run_worker
    from provenance import provenance
except ImportError:  # imported as benchmarks.bench_checkpointing
    from benchmarks.bench_palm import WORKER, machine_info, run_worker
    from benchmarks.provenance import provenance

BENCH_DIR = Path(__file__).resolve().parent

FULL = {
    "model": "--num-tokens 256 --dim 512 --depth 8 --heads 8 --dim-head 64 --seq-len 1024",
    "train": "--batch 2 --warmup 1 --iters 3",
    "memory": "--batch 2",
}
QUICK = {
    "model": "--num-tokens 256 --dim 64 --depth 2 --heads 4 --dim-head 16 --seq-len 128",
    "train": "--batch 2 --warmup 1 --iters 2",
    "memory": "--batch 2",
}
MODES = {"stored": "", "recomputed": "--checkpoint-activations"}


def command(task: str, mode: str, dtype: str, sizes: dict, threads: int) -> list[str]:
    args = ["--impl", "ours", "--task", task, "--threads", str(threads), "--dtype", dtype]
    args += sizes["model"].split() + sizes[task].split() + MODES[mode].split()
    return [sys.executable, str(WORKER), *args]


def table(raw: dict, dtypes: list[str]) -> list[str]:
    lines = [
        "| dtype | activations | step peak memory MiB | step time s | tokens/s |",
        "|---|---|---:|---:|---:|",
    ]
    for dtype in dtypes:
        for mode in MODES:
            memory, train = raw[dtype][mode]["memory"], raw[dtype][mode]["train"]
            lines.append(
                f"| {dtype} | {mode} | {memory.get('step_peak_mib', float('nan')):,.0f} | "
                f"{train.get('median_s', float('nan')):.2f} | "
                f"{train.get('tokens_per_s', float('nan')):,.0f} |"
            )
        stored, recomputed = raw[dtype]["stored"], raw[dtype]["recomputed"]
        try:
            saved = 1 - recomputed["memory"]["step_peak_mib"] / stored["memory"]["step_peak_mib"]
            slower = recomputed["train"]["median_s"] / stored["train"]["median_s"] - 1
            lines.append(f"| {dtype} | saving / cost | {saved:.0%} less | {slower:+.0%} | |")
        except KeyError:  # a failed run: its error is in the JSON
            pass
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bf16", help="comma-separated: float32, bf16")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    dtypes = args.dtypes.split(",")
    load_before = os.getloadavg()[0]
    raw = {dtype: {mode: {} for mode in MODES} for dtype in dtypes}
    for index, (dtype, task) in enumerate((d, t) for d in dtypes for t in ("memory", "train")):
        for mode in list(MODES)[:: 1 if index % 2 == 0 else -1]:
            cmd = command(task, mode, dtype, sizes, args.threads)
            result = run_worker("ours", cmd, args.threads, args.timeout)
            raw[dtype][mode][task] = result
            print(f"{dtype} {task} {mode}: {result.get('error', 'ok')[:200]}", file=sys.stderr)
    machine = machine_info(args.threads)
    machine["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    lines = [
        f"Model: {sizes['model']}; batch: {sizes['train']}; {args.threads} threads, "
        f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after",
        "",
        *table(raw, dtypes),
    ]
    print("\n".join(lines))
    out = args.out or BENCH_DIR / "results" / (
        "checkpointing-quick.json" if args.quick else "checkpointing.json"
    )
    report = {
        "provenance": provenance(args.threads),
        "machine": machine,
        "sizes": sizes,
        "markdown": "\n".join(lines),
        "raw": raw,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    failed = any("error" in r for d in raw.values() for m in d.values() for r in m.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
