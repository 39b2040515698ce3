"""PPO side by side: palm_rlhf's RLHFTrainer (ours) vs palm-rlhf-pytorch 0.8.0 (reference).

    python benchmarks/bench_ppo.py            # full run (many minutes; run on a quiet machine)
    python benchmarks/bench_ppo.py --quick    # tiny smoke run (about a minute)

Two measurements (details in `_ppo_worker.py`), each in a fresh worker process per
implementation, alternating ABBA across jobs and rounds like `bench_palm.py`:

- rollout + update throughput in episodes per second (an episode = one prompt rolled out and
  learned from), at PaLM(num_tokens=256, dim=512, depth=8, heads=8, dim_head=64), prompts of
  64 tokens and responses of 128, each library with its own LoRA RewardModel; float32, and
  bf16 autocast;
- the toy task (reward = share of token 3 in the response, optimum 1) on a tiny PaLM: the
  reward each library's policy reaches within the same wall-clock training budget;
- model-FLOPs utilisation of the whole rollout + update loop (`episode_flops`) against a
  float32 and a bf16 matmul measured in the same run, before and after the jobs (the higher
  reading is the peak), so the distance to the machine's limit is visible.

Threads default to 1: on a small shared machine two OpenMP threads per process thrash (tiny
per-token kernels wait on a descheduled sibling); pass --threads N on a quiet machine.
Prints a Markdown table (ratio = ours / reference) and writes it with every raw result to
benchmarks/results/ppo.json (ppo-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

try:
    from bench_palm import machine_info, run_worker
    from provenance import provenance
    from reference_env import ensure_reference_env
except ImportError:  # imported as benchmarks.bench_ppo
    from benchmarks.bench_palm import machine_info, run_worker
    from benchmarks.provenance import provenance
    from benchmarks.reference_env import ensure_reference_env

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "_ppo_worker.py"
MATMUL_WORKER = BENCH_DIR / "_worker.py"
IMPLS = ("ours", "reference")

FULL = {
    "model": "--num-tokens 256 --dim 512 --depth 8 --heads 8 --dim-head 64 "
    "--prompt-len 64 --response-len 128 --rollout-batch 32",
    # the reference needs ~15 s per episode at this size: fewer episodes give the same rate
    "episodes": {"ours": 32, "reference": 4},
    "budget": 120.0,
}
QUICK = {
    "model": "--num-tokens 256 --dim 64 --depth 2 --heads 4 --dim-head 16 "
    "--prompt-len 8 --response-len 16 --rollout-batch 8",
    "episodes": {"ours": 8, "reference": 4},
    "budget": 3.0,
}

# (job name, worker task, extra worker arguments)
JOBS = (
    ("throughput-float32", "throughput", "--dtype float32"),
    ("throughput-bf16", "throughput", "--dtype bf16"),
    ("toy", "toy", ""),
)


def worker_command(impl: str, task: str, extra: str, sizes: dict, threads: int, python: Path):
    args = [str(WORKER), "--impl", impl, "--task", task, "--threads", str(threads)]
    if task == "throughput":
        args += sizes["model"].split() + ["--episodes", str(sizes["episodes"][impl])]
    else:
        args += ["--budget", str(sizes["budget"])]
    args += extra.split()
    return [str(python), *(["-I"] if impl == "reference" else []), *args]


def matmul_command(dtype: str, threads: int) -> list[str]:
    task = ["--impl", "ours", "--task", "matmul", "--dtype", dtype, "--threads", str(threads)]
    return [sys.executable, str(MATMUL_WORKER), *task]


def episode_flops(config: dict, params: int, passes: dict) -> float:
    """Model FLOPs of one episode (PaLM appendix B, N = all parameters, attention over the
    whole sequence T = prompt + response): a forward pass costs 2N + 4 L H Q T per token, and
    the backward of a LoRA scope, whose frozen weights need no gradient, 2N + 8 L H Q T
    (activation gradients only). `passes` counts whole-sequence passes: sampling with a KV
    cache is one forward; the scoring forwards; the update's forwards and backwards.
    Recomputation (the reference samples without a cache) is not model FLOPs."""
    seq = config["prompt_len"] + config["response_len"]
    attention = config["depth"] * config["heads"] * config["dim_head"] * seq
    forward, backward = 2 * params + 4 * attention, 2 * params + 8 * attention
    forwards = passes["sampling"] + passes["scoring"] + passes["update_forward"]
    return seq * (forwards * forward + passes["update_backward"] * backward)


def achieved_gflops(results: list[dict]):
    """Median model GFLOP/s of throughput runs (`episode_flops` x episodes/s)."""
    values = [
        episode_flops(r["config"], r["parameters"], r["passes"]) * r["episodes_per_s"] / 1e9
        for r in results
        if "error" not in r and "passes" in r
    ]
    return statistics.median(values) if values else None


def median_of(results: list[dict], key: str):
    values = [r[key] for r in results if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def build_rows(raw: dict, peak: dict | None = None) -> list[dict]:
    # (label, job, key, higher is better)
    peak = peak or {}

    def mfu(dtype):
        def of(results):
            achieved = achieved_gflops(results)
            return achieved / peak[dtype] if achieved and peak.get(dtype) else None

        return of

    def gflop_per_episode(results):
        ok = [r for r in results if "error" not in r and "passes" in r]
        return (
            episode_flops(ok[0]["config"], ok[0]["parameters"], ok[0]["passes"]) / 1e9
            if ok
            else None
        )

    specs = [
        ("rollout+update episodes/s, float32", "throughput-float32", "episodes_per_s", True),
        ("rollout+update episodes/s, bf16 autocast", "throughput-bf16", "episodes_per_s", True),
        ("model GFLOP per episode (episode_flops)", "throughput-float32", gflop_per_episode, None),
        ("rollout+update MFU, float32", "throughput-float32", mfu("float32"), True),
        ("rollout+update MFU, bf16 autocast", "throughput-bf16", mfu("bf16"), True),
        ("toy task: reward of the untrained policy", "toy", "reward_before", None),
        ("toy task: reward after the training budget", "toy", "reward_after", True),
        ("toy task: PPO updates within the budget", "toy", "updates", True),
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
    return rows


def fmt(value) -> str:
    if value is None:
        return "error"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def limit_lines(raw: dict, peak: dict, readings: dict) -> list[str]:
    """The measured matmul peaks, and what they allow ours' rollout + update loop."""
    text = ", ".join(
        f"{dtype} {peak[dtype]:,.1f} GFLOP/s (readings "
        + " / ".join("failed" if g is None else f"{g:,.1f}" for g in readings[dtype])
        + ")"
        for dtype in peak
        if peak[dtype]
    )
    lines = [f"Matmul peak, this run, before / after the jobs: {text or 'not measured'}."]
    for dtype, job in (("float32", "throughput-float32"), ("bf16", "throughput-bf16")):
        ours = [r for r in raw.get(job, {}).get("ours", []) if "passes" in r]
        if not ours or not peak.get(dtype):
            continue
        flops = episode_flops(ours[0]["config"], ours[0]["parameters"], ours[0]["passes"])
        rate = statistics.median(r["episodes_per_s"] for r in ours)
        ceiling = peak[dtype] * 1e9 / flops
        lines.append(
            f"At the {dtype} peak an episode of ours needs at least {1 / ceiling:.3g} s: at "
            f"most {ceiling:.3g} episodes/s; ours runs {rate:.3g} ({rate / ceiling:.0%})."
        )
    return lines


def markdown(
    rows: list[dict], machine: dict, settings: dict, limits: list[str] | None = None
) -> str:
    lines = [
        f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), "
        f"{machine['threads']} torch thread(s), torch {machine['torch']}, Python "
        f"{machine['python']}; reference {machine['reference']}; ours at "
        f"{machine['ours_commit']}; {machine['date']}",
        f"Settings: {settings['mode']} sizes, {settings['rounds']} round(s); model: "
        f"{settings['model']}; episodes timed: {settings['episodes']}; toy budget "
        f"{settings['budget']} s",
        "",
        "| metric | ours | reference | ratio (ours/ref) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"| {row['metric']} | {fmt(row['ours'])} | {fmt(row['reference'])} | {ratio} |"
        )
    if limits:
        lines += ["", *limits]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="PPO: palm_rlhf vs palm-rlhf-pytorch 0.8.0 on CPU"
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few episodes, 3 s budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="repeat every job; report medians")
    p.add_argument("--jobs", default=",".join(j[0] for j in JOBS), help="comma-separated subset")
    p.add_argument("--budget", type=float, default=None, help="toy-task seconds of training")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker run")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.budget is not None:
        sizes["budget"] = args.budget
    wanted = args.jobs.split(",")
    unknown = sorted(set(wanted) - {j[0] for j in JOBS})
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; choose from {[j[0] for j in JOBS]}")
    pythons = {"ours": Path(sys.executable), "reference": ensure_reference_env(ROOT)}

    jobs = [j for j in JOBS if j[0] in wanted]
    raw = {name: {impl: [] for impl in IMPLS} for name, _, _ in jobs}
    readings = {dtype: [] for dtype in ("float32", "bf16")}

    def measure_matmul():  # before and after the jobs, at the jobs' thread count
        for dtype, values in readings.items():
            result = run_worker("ours", matmul_command(dtype, args.threads), args.threads, 600)
            values.append(result.get("gflops"))

    measure_matmul()
    for rnd in range(args.rounds):
        for index, (name, task, extra) in enumerate(jobs):
            order = IMPLS if (rnd + index) % 2 == 0 else IMPLS[::-1]
            for impl in order:
                cmd = worker_command(impl, task, extra, sizes, args.threads, pythons[impl])
                result = run_worker(impl, cmd, args.threads, args.timeout)
                raw[name][impl].append(result)
                status = result.get("error", "ok")[:300]
                print(f"[round {rnd + 1}] {name:18s} {impl:9s} {status}", file=sys.stderr)

    measure_matmul()
    peak = {dtype: max(filter(None, v), default=None) for dtype, v in readings.items()}
    rows = build_rows(raw, peak)
    machine = machine_info(args.threads)
    settings = {"mode": "quick" if args.quick else "full", "rounds": args.rounds, **sizes}
    table = markdown(rows, machine, settings, limit_lines(raw, peak, readings))
    print(table)

    out = args.out or BENCH_DIR / "results" / ("ppo-quick.json" if args.quick else "ppo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "provenance": provenance(args.threads),
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "matmul_gflops_before_after": readings,
        "peak_gflops": peak,
        "markdown": table,
        "raw": raw,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    failed = any("error" in r for impls in raw.values() for rs in impls.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
