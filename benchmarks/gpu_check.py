"""The one-GPU check: the whole test suite on the CUDA machine, then the speed table, in one
command that exits non-zero when any test fails, any stage breaks or the budget runs out.

    bash benchmarks/gpu_check.sh                    # on the CUDA machine, from the repository root
    python benchmarks/gpu_check.py --cpu-dry-run    # every stage at minimum size on the CPU
    python benchmarks/gpu_check.py --tests tests/test_palm.py --no-bench   # a selection

1. Tests: one pytest per test file, `--jobs` at a time, all within `--test-budget` seconds.
   The files whose code reaches an Accelerator (which takes the GPU) start first with the GPU
   visible; the multi-process files run beside them with the GPU hidden, as gloo CPU processes
   (one GPU cannot give each rank its own for NCCL, and `tests/helpers.launch` hides it from
   the workers anyway); the rest follow, GPU visible. A file that fails, errors, collects no
   test or is cut off by the budget fails the check.
2. Speed, one fresh process per stage (after the tests, so nothing shares the GPU):
   train   bf16-autocast training tokens/s and MFU: FLOPs per token as bench_palm.py counts
           them (`_worker.model_flops_per_token`, 6N + 12 L H Q T) over a bf16 matmul
           measured in the same process;
   decode  KV-cached greedy decoding at batch 1 and 8, bf16 weights, against the roofline
           (bytes a step reads, `bench_decode.bytes_read`, over a read bandwidth probed in the
           same process like bench_decode.py's, with the GPU synchronised);
   ppo     bench_ppo.py's throughput task (`_ppo_worker.py`, ours, bf16): episodes/s.
Writes gpu-tests.json, gpu-train.json, gpu-decode.json, gpu-ppo.json and gpu-check.json (all
of it) to benchmarks/results/ (--cpu-dry-run: to --out-dir, a temporary folder by default) and
prints the table. The device gives 10 minutes a command: the default budget is 540 s in all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

# test files whose code builds an Accelerator (train/, rl/, the CLI) or casts to bf16: on the
# CUDA machine these are the ones that run on the GPU, so they go first
CUDA_FIRST = (
    "test_precision.py",
    "test_activation_checkpointing.py",
    "test_pretrain.py",
    "test_sft.py",
    "test_dpo.py",
    "test_coh.py",
    "test_reward.py",
    "test_ppo.py",
    "test_algorithms.py",
    "test_critics.py",
    "test_cli_pipeline.py",
    "test_decode.py",
)
# multi-process (gloo) test files: GPU hidden, CPU processes
GLOO = (
    "test_fsdp.py",
    "test_multiprocess.py",
    "test_ppo_processes.py",
)

# sizes: (GPU, --cpu-dry-run)
TRAIN = (
    dict(num_tokens=32000, dim=2048, depth=16, heads=16, dim_head=128, ff_mult=4, seq_len=2048),
    dict(num_tokens=64, dim=32, depth=1, heads=2, dim_head=16, ff_mult=2, seq_len=16),
)
TRAIN_RUN = (
    dict(batch=8, warmup=5, iters=15, matmul=8192),
    dict(batch=2, warmup=1, iters=1, matmul=64),
)
DECODE = (
    dict(dim=2048, depth=16, heads=16, dim_head=128, new_tokens=256, repeats=3, probe_mb=4096),
    dict(dim=32, depth=1, heads=2, dim_head=16, new_tokens=4, repeats=1, probe_mb=4),
)
STAGE_SECONDS = {"train": 150, "decode": 150, "ppo": 180}


def plan_test_runs(selection: list[str] | None) -> list[dict]:
    """The pytest runs of stage 1, in start order: each {name, args, gpu}."""
    if selection:
        return [dict(name=s, args=[s], gpu=True) for s in selection]
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    missing = [f for f in CUDA_FIRST + GLOO if f not in files]
    if missing:
        raise SystemExit(f"gpu_check: listed test files not found: {missing}")
    order = [f for f in CUDA_FIRST] + list(GLOO) + [f for f in files if f not in CUDA_FIRST + GLOO]
    return [dict(name=f, args=[f"tests/{f}"], gpu=f not in GLOO) for f in order]


def run_pytest(shard: dict, deadline: float, work: Path, scratch: Path, dry_run: bool) -> dict:
    """One pytest run, cut off at `deadline`; its verdict and last summary line. Its log goes
    to `work`, its temporary files (checkpoints...) under `scratch`."""
    env = dict(os.environ)  # PYTHONPATH holds the repository root (see main)
    if not shard["gpu"] or dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    slug = shard["name"].replace("/", "_").replace(":", "_")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={scratch / slug}",
        *shard["args"],
    ]
    start = time.perf_counter()
    remaining = deadline - time.monotonic()
    if remaining < 5:
        return dict(name=shard["name"], ok=False, verdict="not run: test budget spent", seconds=0)
    # its own process group, so a cut-off run takes its launched workers down with it
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=remaining)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    (work / f"{slug}.log").write_text(output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    if rc is None:
        verdict = "TIMED OUT (test budget spent)"
    elif rc == 0:
        verdict = "passed"
    elif rc == 5:
        verdict = "FAILED: no test collected"
    else:
        verdict = f"FAILED (pytest exit {rc})"
    return dict(
        name=shard["name"],
        ok=rc == 0,
        verdict=verdict,
        summary=summary,
        rc=rc,
        seconds=round(time.perf_counter() - start, 1),
        log=str(work / f"{slug}.log"),
    )


def count_outcomes(summaries) -> dict[str, int]:
    """Totals of pytest's closing lines ("3 passed, 1 skipped in 2.1s"), passed/failed first."""
    counts = {"passed": 0, "failed": 0}
    for summary in summaries:
        for number, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?|x\w+)", summary):
            outcome = "errors" if outcome.startswith("error") else outcome
            counts[outcome] = counts.get(outcome, 0) + int(number)
    return counts


def run_tests(args, work: Path) -> dict:
    shards = plan_test_runs(args.tests)
    deadline = time.monotonic() + args.test_budget
    box = f"{args.jobs} at a time, {args.test_budget:.0f} s box"
    print(f"== 1. tests: {len(shards)} pytest runs, {box}")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-tmp-"))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_pytest, s, deadline, work, scratch, args.cpu_dry_run) for s in shards
        ]
        results = []
        for future in futures:
            result = future.result()
            results.append(result)
            print(f"  {result['verdict']:<32} {result['name']}  {result.get('summary', '')}")
    shutil.rmtree(scratch, ignore_errors=True)
    counts = count_outcomes(r.get("summary", "") for r in results)
    print("tests: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    failed = [r for r in results if not r["ok"]]
    for result in failed:
        if result.get("log"):
            tail = Path(result["log"]).read_text().strip().splitlines()[-30:]
            print(f"---- {result['name']} (last lines of {result['log']})\n" + "\n".join(tail))
    return dict(ok=not failed, counts=counts, runs=results, failed=[r["name"] for r in failed])


# ---------------------------------------------------------------------------- speed stages


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Seconds per call of `fn`, the device synchronised around the timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def matmul_tflops(n: int, device) -> float:
    """bf16 TFLOP/s of an (n, n) @ (n, n) product: the peak MFU is measured against."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, 3, 20) / 1e12


def read_gbps(megabytes: int, device) -> float:
    """GB/s of a read-only pass over a buffer far larger than any cache (best of 3)."""
    import torch

    buffer = torch.empty(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    return buffer.numel() * 2 / min(timed(buffer.sum, device, 1, 1) for _ in range(3)) / 1e9


def stage_train(size: dict, run: dict, device) -> dict:
    import torch
    from _worker import model_flops_per_token

    from palm_rlhf.model.palm import PaLM

    peak = matmul_tflops(run["matmul"], device)
    torch.manual_seed(0)
    config = {k: v for k, v in size.items() if k != "seq_len"}
    model = PaLM(**config, max_seq_len=size["seq_len"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(
        1, size["num_tokens"], (run["batch"], size["seq_len"] + 1), device=device
    )

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(tokens, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed(step, device, run["warmup"], run["iters"])
    flops = model_flops_per_token(size)
    tokens_per_s = run["batch"] * size["seq_len"] / step_s
    return dict(
        size=size,
        run=run,
        matmul_bf16_tflops=peak,
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        flops_per_token=flops["flops_per_token"],
        formula=flops["formula"],
        mfu=tokens_per_s * flops["flops_per_token"] / (peak * 1e12),
    )


def stage_decode(size: dict, device) -> dict:
    import torch
    from bench_decode import PROMPT_LEN, bytes_read

    from palm_rlhf.model.palm import PaLM
    from palm_rlhf.model.sampling import iter_sample

    gbps = read_gbps(size["probe_mb"], device)
    torch.manual_seed(0)
    config = {k: size[k] for k in ("dim", "depth", "heads", "dim_head")}
    model = PaLM(num_tokens=256, **config).to(device, torch.bfloat16).eval()
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(1, 256, (batch, PROMPT_LEN), device=device)

        def decode(new_tokens, prompt=prompt):
            steps = iter_sample(model, prompt, new_tokens, temperature=0.0)
            next(steps)  # the prompt's forward and the first token, as bench_decode.py
            synchronize(device)
            start = time.perf_counter()
            count = sum(1 for _ in steps)
            synchronize(device)
            return (time.perf_counter() - start) / count

        decode(min(8, size["new_tokens"]))  # warm-up
        step_s = min(decode(size["new_tokens"]) for _ in range(size["repeats"]))
        weights, kv = bytes_read(model, batch, size["new_tokens"])
        floor_s = (weights + kv) / (gbps * 1e9)
        rows.append(
            dict(
                batch=batch,
                tokens_per_s=batch / step_s,
                ms_per_step=step_s * 1e3,
                floor_ms=floor_s * 1e3,
                fraction_of_roofline=floor_s / step_s,
            )
        )
    return dict(size=size, read_gbps=gbps, rows=rows)


def run_stage(name: str, dry_run: bool, timeout: float) -> dict:
    """A speed stage in a fresh process (`--stage NAME`), its JSON result or an error record."""
    if timeout < 10:
        return {"error": "not run: budget spent"}
    if name == "ppo":
        from bench_ppo import FULL, WORKER

        # the dry run: the smallest PaLM and run that still roll out and update
        tiny = "--num-tokens 64 --dim 32 --depth 1 --heads 2 --dim-head 16 --prompt-len 4 "
        tiny += "--response-len 4 --rollout-batch 2"
        model, episodes = (tiny, 2) if dry_run else (FULL["model"], FULL["episodes"]["ours"])
        command = [
            sys.executable,
            str(WORKER),
            "--impl",
            "ours",
            "--task",
            "throughput",
            "--threads",
            "2" if dry_run else "8",
            "--dtype",
            "bf16",
            *model.split(),
            "--episodes",
            str(episodes),
        ]
    else:
        command = [sys.executable, __file__, "--stage", name]
        command += ["--cpu-dry-run"] if dry_run else []
    # the environment as it is (bench_palm.run_worker would replace PYTHONPATH, and with it
    # the device's carried wheels); the repository root is on it already
    threads = "2" if dry_run else "8"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_main(name: str, dry_run: bool) -> None:
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    index = 1 if dry_run else 0
    if name == "train":
        result = stage_train(TRAIN[index], TRAIN_RUN[index], device)
    else:
        result = stage_decode(DECODE[index], device)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------- report


def table(report: dict) -> str:
    def fmt(value, spec):
        return "failed" if value is None else format(value, spec)

    train, decode, ppo = (report["bench"].get(k, {}) for k in ("train", "decode", "ppo"))
    tests = report["tests"]
    tests = (
        "not run"
        if not tests
        else "passed"
        if tests["ok"]
        else "FAILED: " + ", ".join(tests["failed"])
    )
    rows = [
        ("tests", tests),
        ("bf16 matmul TFLOP/s (measured peak)", fmt(train.get("matmul_bf16_tflops"), ".1f")),
        ("train bf16 tokens/s", fmt(train.get("tokens_per_s"), ",.0f")),
        ("train bf16 MFU", fmt(train.get("mfu"), ".1%")),
        ("read bandwidth GB/s (probe)", fmt(decode.get("read_gbps"), ",.0f")),
    ]
    for row in decode.get("rows", []):
        rows.append((f"decode batch {row['batch']} tokens/s", f"{row['tokens_per_s']:,.0f}"))
        rows.append(
            (f"decode batch {row['batch']} of roofline", f"{row['fraction_of_roofline']:.1%}")
        )
    rows.append(("PPO episodes/s (bf16)", fmt(ppo.get("episodes_per_s"), ".2f")))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {k:<{width}} | {v} |" for k, v in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="no GPU: every stage at minimum size on the CPU, to check the script",
    )
    p.add_argument(
        "--tests",
        nargs="*",
        default=None,
        help="pytest selections instead of the whole suite (one run each)",
    )
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--jobs", type=int, default=8, help="pytest runs at a time")
    p.add_argument("--test-budget", type=float, default=300.0, help="seconds for all tests")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--logs", type=Path, default=None, help="folder for each pytest run's log")
    p.add_argument("--stage", choices=("train", "decode"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        stage_main(args.stage, args.cpu_dry_run)
        return 0
    root = str(ROOT)
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")])
        )
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --cpu-dry-run checks the script on the CPU")
        return 2
    deadline = time.monotonic() + args.budget
    out = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.cpu_dry_run else BENCH_DIR / "results"
    )
    out.mkdir(parents=True, exist_ok=True)
    work = args.logs or Path(tempfile.mkdtemp(prefix="gpu-check-logs-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name()
    report = dict(
        device=device,
        torch=torch.__version__,
        dry_run=args.cpu_dry_run,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tests={},
        bench={},
    )
    if not args.no_tests:
        args.test_budget = min(args.test_budget, args.budget)
        report["tests"] = run_tests(args, work)
        (out / "gpu-tests.json").write_text(json.dumps(report["tests"], indent=2) + "\n")
    if not args.no_bench:
        print("== 2. speed")
        for name in ("train", "decode", "ppo"):
            timeout = min(STAGE_SECONDS[name], deadline - time.monotonic())
            result = run_stage(name, args.cpu_dry_run, timeout)
            report["bench"][name] = result
            (out / f"gpu-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"  {name}: {result['error'] if 'error' in result else 'done'}")
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    failed = (
        [f"tests ({', '.join(report['tests']['failed'])})"]
        if report["tests"] and not report["tests"]["ok"]
        else []
    )
    failed += [f"{name}: {r['error']}" for name, r in report["bench"].items() if "error" in r]
    print(f"results in {out}")
    if failed:
        print("gpu_check: FAILED: " + "; ".join(failed))
        return 1
    print("gpu_check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
