"""Side-by-side benchmark of palm_rlhf (ours) and palm-rlhf-pytorch 0.8.0 (reference).

    python benchmarks/bench_palm.py            # full run (minutes; run on a quiet machine)
    python benchmarks/bench_palm.py --quick    # tiny smoke run (seconds)

Every measurement runs in a fresh worker process (`_worker.py`); ours under this interpreter
with PYTHONPATH=<repo root>, the reference under `.bench-venv/bin/python -I` from a temporary
directory, so neither package can see the other. The two implementations alternate (ABBA
order across jobs and rounds) so drifting machine load does not favour one side. Prints a
Markdown table (ratio = ours / reference) and writes the same, with every raw worker result,
to benchmarks/results/palm.json (palm-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from provenance import cpu_model_and_flags, git, provenance
    from reference_env import REFERENCE_DIST, REFERENCE_VERSION, ensure_reference_env
except ImportError:  # imported as benchmarks.bench_palm
    from benchmarks.provenance import cpu_model_and_flags, git, provenance
    from benchmarks.reference_env import REFERENCE_DIST, REFERENCE_VERSION, ensure_reference_env

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "_worker.py"
IMPLS = ("ours", "reference")

# model and run sizes: full is the brief's PaLM(256, dim 512, depth 8, heads 8, dim_head 64)
FULL = {
    "model": "--num-tokens 256 --dim 512 --depth 8 --heads 8 --dim-head 64 --seq-len 512",
    "train": "--batch 4 --warmup 2 --iters 10",
    # the reference needs minutes per call
    "sample": "--prompt-len 64 --new-tokens 256 --warmup 1 --iters 1",
    "matmul": "--matmul-size 2048 --warmup 3 --iters 20",
    "memory": "--batch 4",
}
QUICK = {
    "model": "--num-tokens 256 --dim 64 --depth 2 --heads 4 --dim-head 16 --seq-len 64",
    "train": "--batch 2 --warmup 1 --iters 3",
    "sample": "--prompt-len 8 --new-tokens 16 --warmup 1 --iters 2",
    "matmul": "--matmul-size 256 --warmup 2 --iters 5",
    "memory": "--batch 2",
}

# (job name, worker task, extra worker arguments)
JOBS = (
    ("matmul-float32", "matmul", "--dtype float32"),
    ("matmul-bf16", "matmul", "--dtype bf16"),
    ("train-float32", "train", "--dtype float32"),
    ("train-bf16", "train", "--dtype bf16"),
    ("sample-b1", "sample", "--batch 1"),
    ("sample-b8", "sample", "--batch 8"),
    ("sample-b1-bf16", "sample", "--batch 1 --dtype bf16"),
    ("memory-float32", "memory", "--dtype float32"),
    ("memory-bf16", "memory", "--dtype bf16"),
)


def worker_command(impl: str, task: str, extra: str, sizes: dict, threads: int, python: Path):
    """argv of one worker run; the reference interpreter runs isolated (-I: no cwd, no env)."""
    args = [str(WORKER), "--impl", impl, "--task", task, "--threads", str(threads)]
    args += sizes["model"].split() + sizes[task].split() + extra.split()
    return [str(python), *(["-I"] if impl == "reference" else []), *args]


def run_worker(impl: str, cmd: list[str], threads: int, timeout: float) -> dict:
    """Run one worker; its last stdout line is the JSON result, or an error record."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="palm-bench-") as neutral:
        if impl == "ours":
            env["PYTHONPATH"] = str(ROOT)
        cwd = ROOT if impl == "ours" else neutral
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(threads: int) -> dict:
    import torch

    cpu, _ = cpu_model_and_flags()
    commit = git("rev-parse", "--short", "HEAD")
    try:  # oneDNN's bf16 kernels need AVX-512 or AMX; elsewhere torch emulates bf16 matmuls
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = None
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "reference": f"{REFERENCE_DIST}=={REFERENCE_VERSION}",
        "ours_commit": commit or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median_of(results: list[dict], key: str):
    values = [r[key] for r in results if "error" not in r and key in r]
    return statistics.median(values) if values else None


def build_rows(raw: dict) -> tuple[list[dict], dict]:
    """Table rows (median over rounds) and the measured matmul peak per dtype."""
    peak = {}
    for dtype in ("float32", "bf16"):
        gflops = [
            r["gflops"]
            for impl in IMPLS
            for r in raw.get(f"matmul-{dtype}", {}).get(impl, [])
            if "gflops" in r
        ]
        peak[dtype] = max(gflops) if gflops else None

    def mfu(results, dtype):
        achieved = median_of(results, "achieved_gflops")
        return achieved / peak[dtype] if achieved and peak[dtype] else None

    # (label, job, extractor, higher is better)
    specs = [
        ("matmul float32 GFLOP/s (machine check)", "matmul-float32", "gflops", True),
        ("matmul bf16 GFLOP/s (machine check)", "matmul-bf16", "gflops", True),
        ("train float32 tokens/s", "train-float32", "tokens_per_s", True),
        ("train float32 step time s", "train-float32", "median_s", False),
        ("train float32 MFU", "train-float32", lambda r: mfu(r, "float32"), True),
        ("train bf16-autocast tokens/s", "train-bf16", "tokens_per_s", True),
        ("train bf16-autocast MFU", "train-bf16", lambda r: mfu(r, "bf16"), True),
        ("sample batch 1 new tokens/s", "sample-b1", "new_tokens_per_s", True),
        ("sample batch 8 new tokens/s", "sample-b8", "new_tokens_per_s", True),
        ("sample batch 1, bf16 weights, new tokens/s", "sample-b1-bf16", "new_tokens_per_s", True),
        ("train step peak memory float32 MiB", "memory-float32", "step_peak_mib", False),
        ("train step peak memory bf16 MiB", "memory-bf16", "step_peak_mib", False),
        (
            "first (cold) step peak memory float32 MiB",
            "memory-float32",
            "first_step_peak_mib",
            False,
        ),
        ("model weights RSS MiB", "memory-float32", "model_mib", False),
        ("parameters (unique)", "train-float32", "params_total", None),
    ]
    rows = []
    for label, job, key, higher in specs:
        if job not in raw:
            continue
        get = key if callable(key) else (lambda results, k=key: median_of(results, k))
        ours, ref = get(raw[job]["ours"]), get(raw[job]["reference"])
        ratio = ours / ref if ours is not None and ref else None
        arrow = {True: " (higher is better)", False: " (lower is better)", None: ""}[higher]
        rows.append({"metric": label + arrow, "ours": ours, "reference": ref, "ratio": ratio})
    return rows, peak


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) < 1:
        return f"{value:.3f}"
    return f"{value:,.1f}" if abs(value) < 1e4 else f"{value:,.0f}"


def peak_text(gflops) -> str:
    return "not measured" if gflops is None else f"{gflops:,.1f} GFLOP/s"


def failures(raw: dict) -> list[str]:
    """One line per failed worker run: job, implementation, round and the error's tail."""
    return [
        f"- {job} / {impl} / round {i + 1}: {r['error'].splitlines()[-1][:300]}"
        for job, impls in raw.items()
        for impl, results in impls.items()
        for i, r in enumerate(results)
        if "error" in r
    ]


def noise_warnings(raw: dict, load_before: float, threads: int) -> list[str]:
    """Signs that other processes shared the CPUs: the matmul check varying between runs
    (every run multiplies the same matrices) or a high load average before the start."""
    notes = []
    for job, impls in raw.items():
        gflops = [r["gflops"] for rs in impls.values() for r in rs if "gflops" in r]
        if job.startswith("matmul") and len(gflops) > 1 and max(gflops) > 1.25 * min(gflops):
            notes.append(
                f"- {job}: GFLOP/s ranged {min(gflops):,.1f} to {max(gflops):,.1f} between runs"
            )
    if load_before > 0.5:
        notes.append(f"- 1-minute load average was {load_before:.2f} before the run started")
    if notes:
        notes.insert(
            0, f"Warning: the machine looked busy; {threads}-thread timings are unreliable:"
        )
    return notes


def markdown(rows: list[dict], machine: dict, settings: dict, peak: dict, failed: list) -> str:
    lines = [
        f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), "
        f"{machine['threads']} torch threads, torch {machine['torch']}, "
        f"Python {machine['python']}; reference {machine['reference']}; "
        f"ours at {machine['ours_commit']}; {machine['date']}",
        f"Settings: {settings['mode']} sizes, {settings['rounds']} round(s); model: "
        f"{settings['model']}",
        "MFU = model FLOPs/token (6N + 12·L·H·Q·T) × tokens/s ÷ measured matmul peak "
        f"(float32 {peak_text(peak['float32'])}, bf16 {peak_text(peak['bf16'])}).",
        "",
        "| metric | ours | reference | ratio (ours/ref) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"| {row['metric']} | {fmt(row['ours'])} | {fmt(row['reference'])} | {ratio} |"
        )
    if machine.get("native_bf16") is False:
        lines += [
            "",
            f"Note: this CPU ({machine['cpu_capability']}) has no AVX-512 or AMX, so torch "
            "emulates bf16 matrix products: the bf16 rows and bf16 MFU measure that fallback "
            "(whose speed depends on operand layout), not the model.",
        ]
    if machine["noise"]:
        lines += ["", *machine["noise"]]
    if failed:
        lines += ["", "Failed runs (n/a above):", *failed]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="palm_rlhf vs palm-rlhf-pytorch 0.8.0 on CPU"
    )
    p.add_argument("--quick", action="store_true", help="tiny model and few iterations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="repeat every job; report medians")
    p.add_argument("--jobs", default=",".join(j[0] for j in JOBS), help="comma-separated subset")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker run")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument(
        "--no-flash-attn", action="store_true", help="both sides use their plain attention path"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.no_flash_attn:
        sizes["model"] += " --no-flash-attn"
    wanted = args.jobs.split(",")
    unknown = sorted(set(wanted) - {j[0] for j in JOBS})
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; choose from {[j[0] for j in JOBS]}")
    if not any(j.startswith("matmul") for j in wanted):
        print("note: no matmul job selected, MFU will be missing", file=sys.stderr)
    pythons = {"ours": Path(sys.executable), "reference": ensure_reference_env(ROOT)}

    load_before = os.getloadavg()[0]
    jobs = [j for j in JOBS if j[0] in wanted]
    raw = {name: {impl: [] for impl in IMPLS} for name, _, _ in jobs}
    for rnd in range(args.rounds):
        for index, (name, task, extra) in enumerate(jobs):
            order = IMPLS if (rnd + index) % 2 == 0 else IMPLS[::-1]
            for impl in order:
                cmd = worker_command(impl, task, extra, sizes, args.threads, pythons[impl])
                result = run_worker(impl, cmd, args.threads, args.timeout)
                raw[name][impl].append(result)
                status = result.get("error", "ok")[:200]
                print(f"[round {rnd + 1}] {name:15s} {impl:9s} {status}", file=sys.stderr)

    rows, peak = build_rows(raw)
    machine = machine_info(args.threads)
    machine["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    machine["noise"] = noise_warnings(raw, load_before, args.threads)
    settings = {"mode": "quick" if args.quick else "full", "rounds": args.rounds, **sizes}
    failed = failures(raw)
    table = markdown(rows, machine, settings, peak, failed)
    print(table)

    out = args.out or BENCH_DIR / "results" / ("palm-quick.json" if args.quick else "palm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "provenance": provenance(args.threads),
        "machine": machine,
        "settings": settings,
        "peak_gflops": peak,
        "rows": rows,
        "markdown": table,
        "raw": raw,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
