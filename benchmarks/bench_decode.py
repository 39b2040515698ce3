"""KV-cached decoding speed against the memory-bandwidth roofline (issue #11).

    python benchmarks/bench_decode.py                      # the whole table (many minutes)
    python benchmarks/bench_decode.py --quick              # dims 128 and 256, 32 new tokens
    python benchmarks/bench_decode.py --jobs eager --dims 256,512 --batches 1 --dtypes float32
    python benchmarks/bench_decode.py --jobs ppo           # PPO episodes/s, main vs this tree

A decode step reads every weight once (and the cached keys and values), so its time cannot
fall below (weight bytes + KV bytes read) / memory bandwidth. The bandwidth is probed in the
same run, just before each row, by a read-only `sum` over a 256 MB float32 buffer (far larger
than the caches; best of 3), since on a shared machine it varies from run to run. The
fraction of the roofline is floor / measured time per step (a step decodes one token for
each of the `batch` rows, so tokens/s = batch / step time).

Sizes: dim 128, 256, 512, 1024 at depth 2, 4, 8, 8; heads = dim / 64 of width 64, ff_mult 4,
256-token vocabulary (bytes); a 32-token random prompt, then `--new-tokens` greedy tokens
(`sample_tokens`, the loop PPO rollouts and chat use). Time per step is timed from the first
sampled token to the last (the prompt's forward excluded). `bf16` stores the weights in
bfloat16 (no autocast). `compiled` samples with `compile_decode=True`; its first call, which
compiles, is reported as compile s and not timed.

Job `ppo`: `_ppo_worker.py`'s throughput task (rollout + PPO update episodes/s, float32) at
the pretraining preset's shape (dim 256, depth 4, heads 4), once with the library of
`--ppo-base` (a git revision, extracted with `git archive`) and once with this checkout.

Prints Markdown tables and writes them with every raw result to benchmarks/results/decode.json
(decode-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf.model.palm import PaLM  # noqa: E402
from palm_rlhf.model.sampling import iter_sample  # noqa: E402

DEPTHS = {128: 2, 256: 4, 512: 8, 1024: 8}
PROMPT_LEN = 32
PROBE_BYTES = 256 * 2**20
PPO_MODEL = (
    "--num-tokens 256 --dim 256 --depth 4 --heads 4 --dim-head 64 "
    "--prompt-len 64 --response-len 128 --rollout-batch 32 --episodes 32"
)


def probe_bandwidth(buffer: torch.Tensor) -> float:
    """GB/s of a read-only pass over `buffer` (best of 3, after one warm-up pass)."""
    buffer.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best / 1e9


def make_model(dim: int, dtype: torch.dtype) -> PaLM:
    torch.manual_seed(0)
    model = PaLM(num_tokens=256, dim=dim, depth=DEPTHS[dim], heads=dim // 64, dim_head=64)
    return model.to(dtype).eval()


def time_decode(model: PaLM, prompt: torch.Tensor, new_tokens: int, compile_decode: bool):
    """Seconds per decode step, from the first sampled token to the last."""
    steps = iter_sample(model, prompt, new_tokens, temperature=0.0, compile_decode=compile_decode)
    next(steps)  # the prompt's forward and the first token
    start = time.perf_counter()
    count = sum(1 for _ in steps)
    return (time.perf_counter() - start) / count


def bytes_read(model: PaLM, batch: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) one decode step reads."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    mean_keys = PROMPT_LEN + new_tokens / 2
    element = next(model.parameters()).element_size()
    kv = config.depth * batch * 2 * config.dim_head * mean_keys * element
    return weights, int(kv)


def decode_row(args, mode: str, dim: int, batch: int, dtype: str, buffer) -> dict:
    model = make_model(dim, torch.bfloat16 if dtype == "bf16" else torch.float32)
    prompt = torch.randint(1, 256, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    compiled = mode == "compiled"
    start = time.perf_counter()
    time_decode(model, prompt, min(8, args.new_tokens), compiled)  # warm-up (and compile)
    warmup_s = time.perf_counter() - start
    gbps = probe_bandwidth(buffer)
    step_s = min(time_decode(model, prompt, args.new_tokens, compiled) for _ in range(args.repeats))
    weights, kv = bytes_read(model, batch, args.new_tokens)
    floor_s = (weights + kv) / (gbps * 1e9)
    return {
        "mode": mode,
        "dim": dim,
        "depth": DEPTHS[dim],
        "batch": batch,
        "dtype": dtype,
        "tokens_per_s": batch / step_s,
        "ms_per_step": step_s * 1e3,
        "weight_mb": weights / 1e6,
        "kv_mb": kv / 1e6,
        "probe_gbps": gbps,
        "floor_ms": floor_s * 1e3,
        "fraction": floor_s / step_s,
        "compile_s": warmup_s if compiled else None,
    }


def decode_table(rows: list[dict]) -> str:
    lines = [
        "| mode | dim x depth | batch | weights | tokens/s | ms/step | weight MB | probe GB/s "
        "| floor ms/step | roofline | compile s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['dim']} x {r['depth']} | {r['batch']} | {r['dtype']} "
            f"| {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['weight_mb']:.1f} "
            f"| {r['probe_gbps']:.1f} | {r['floor_ms']:.2f} | {r['fraction']:.0%} | {compile_s} |"
        )
    return "\n".join(lines)


def ppo_rate(tree: Path, threads: int) -> dict:
    """Episodes/s of `_ppo_worker.py --impl ours` (this checkout's worker) on `tree`'s library."""
    cmd = [sys.executable, str(BENCH_DIR / "_ppo_worker.py"), "--impl", "ours"]
    cmd += ["--task", "throughput", "--threads", str(threads), *PPO_MODEL.split()]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ppo_rows(base: str, threads: int) -> list[dict]:
    """PPO throughput with the library at `base`, then with this checkout (ABAB: twice each)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", base], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="palm-decode-base-") as tmp:
        archive = subprocess.run(["git", "archive", base], cwd=ROOT, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for _ in range(2):
            for label, tree in ((f"{base} ({commit})", Path(tmp)), ("this checkout", ROOT)):
                result = ppo_rate(tree, threads)
                rows.append({"library": label, **result})
                print(f"ppo {label}: {result.get('episodes_per_s', result)}", file=sys.stderr)
    return rows


def ppo_table(rows: list[dict]) -> str:
    lines = ["| library | episodes/s (runs) |", "|---|---|"]
    for label in dict.fromkeys(r["library"] for r in rows):
        rates = [r.get("episodes_per_s") for r in rows if r["library"] == label]
        lines.append(
            f"| {label} | " + ", ".join(f"{x:.3f}" if x else "error" for x in rates) + " |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="KV-cached decode speed vs the bandwidth roofline"
    )
    p.add_argument("--jobs", default="eager,compiled,ppo", help="subset of eager,compiled,ppo")
    p.add_argument("--quick", action="store_true", help="dims 128,256; 32 new tokens; no ppo")
    p.add_argument("--dims", default="128,256,512,1024")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32,bf16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (best kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppo-base", default="main", help="git revision the ppo job compares with")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.new_tokens = "128,256", 32
        args.jobs = ",".join(j for j in args.jobs.split(",") if j != "ppo")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    jobs = args.jobs.split(",")
    unknown = sorted(set(jobs) - {"eager", "compiled", "ppo"})
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; choose from eager, compiled, ppo")
    buffer = torch.ones(PROBE_BYTES // 4)
    rows = []
    for mode in (j for j in ("eager", "compiled") if j in jobs):
        for dim in (int(d) for d in args.dims.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                for dtype in args.dtypes.split(","):
                    rows.append(decode_row(args, mode, dim, batch, dtype, buffer))
                    print(decode_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    ppo = ppo_rows(args.ppo_base, args.threads) if "ppo" in jobs else []

    load = os.getloadavg()
    header = (
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load "
        f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; prompt {PROMPT_LEN}, "
        f"{args.new_tokens} new tokens, greedy"
    )
    text = header
    if rows:
        text += "\n\n" + decode_table(rows)
    if ppo:
        text += f"\n\nPPO rollout + update, float32 ({PPO_MODEL}):\n\n" + ppo_table(ppo)
    print(text)
    name = "decode-quick.json" if args.quick else "decode.json"
    out = args.out or BENCH_DIR / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "provenance": provenance(args.threads),
        "settings": vars(args) | {"out": str(out)},
        "rows": rows,
        "ppo": ppo,
        "markdown": text,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
