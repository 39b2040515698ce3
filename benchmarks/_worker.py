"""One benchmark measurement in a fresh process; prints one JSON line.

Run by either interpreter (ours: the project's python with PYTHONPATH=<repo root>; reference:
``.bench-venv/bin/python -I`` from a neutral directory), e.g.::

    python benchmarks/_worker.py --impl ours --task train --threads 2 --dtype float32

The other implementation's package is blocked from import, so nothing can mix:
``--impl ours`` cannot import ``palm_rlhf_pytorch``, ``--impl reference`` cannot import
``palm_rlhf`` and refuses to start if the repository root is on ``sys.path``.

Tasks (times are ``time.perf_counter`` per iteration, warm-up excluded, median reported):

- ``train``: ``model.zero_grad(); model(seq, return_loss=True).backward()`` on a (batch,
  seq_len + 1) batch of token ids (both libraries shift inside: inputs ``seq[:, :-1]``, targets
  ``seq[:, 1:]``); ``--dtype bf16`` runs the forward under ``torch.autocast("cpu", bfloat16)``.
  tokens/s = batch * seq_len / step time.
- ``sample``: ``generate`` from a random (batch, prompt_len) prompt to prompt_len + new_tokens
  total tokens, top-k filtered, temperature 1, no EOS. new tokens/s = batch * new_tokens / time.
- ``memory``: resident-set growth of one training step, read from ``/proc/self/status``
  (VmRSS before, VmHWM after, the high-water mark reset through ``/proc/self/clear_refs``).
- ``matmul``: ``torch.mm`` of two (size, size) matrices; GFLOP/s = 2 size^3 / time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ours": "palm_rlhf", "reference": "palm_rlhf_pytorch"}
# glibc keeps freed heap memory and raises its mmap threshold dynamically, which hides
# allocations from RSS; fixed thresholds make every large tensor an mmap returned on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class _BlockPackage(importlib.abc.MetaPathFinder):
    """Refuse to import `name` (and its submodules) in this process."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} is blocked in this benchmark worker (other impl)")
        return None


def isolate(impl: str) -> None:
    """Block the other implementation; for the reference, also keep the repo off sys.path."""
    other = PACKAGES["reference" if impl == "ours" else "ours"]
    sys.meta_path.insert(0, _BlockPackage(other))
    if impl == "reference":
        entries = {Path(p or os.getcwd()).resolve() for p in sys.path}
        if REPO_ROOT in entries:
            raise SystemExit(
                f"reference worker has the repository {REPO_ROOT} on sys.path; "
                "run it with `python -I` from another directory"
            )


def model_flops_per_token(cfg: dict) -> dict:
    """Training FLOPs per token, PaLM paper (Chowdhery et al. 2022) appendix B: 6N + 12 L H Q T.

    N counts the non-embedding parameters of this architecture (multi-query attention: one
    key and one value head; SwiGLU feed-forward of width ff_mult * dim; bias-free LayerNorm):
        per layer  dim * (H Q + 2 Q + 2 F)   fused q, k, v and SwiGLU input projection
                 + H Q * dim + F * dim      attention and feed-forward output projections
                 + dim                      LayerNorm gain
        + dim (final LayerNorm),   F = ff_mult * dim.
    L = depth, H = heads, Q = dim_head, T = sequence length. The tied output projection
    (6 * dim * num_tokens per token) is excluded, as in the paper; it is reported separately.
    """
    dim, depth, heads, q = cfg["dim"], cfg["depth"], cfg["heads"], cfg["dim_head"]
    ff = cfg["ff_mult"] * dim
    per_layer = dim * (heads * q + 2 * q + 2 * ff) + heads * q * dim + ff * dim + dim
    n_params = depth * per_layer + dim
    attention = 12 * depth * heads * q * cfg["seq_len"]
    return {
        "params_non_embedding": n_params,
        "flops_per_token": 6 * n_params + attention,
        "flops_per_token_logits": 6 * dim * cfg["num_tokens"],
        "formula": "6N + 12*L*H*Q*T (PaLM appendix B), N = non-embedding parameters",
    }


def import_palm(impl: str):
    """The PaLM class of one implementation (its import also loads the whole package)."""
    if impl == "ours":
        from palm_rlhf.model.palm import PaLM

        if not Path(module_file(impl)).resolve().is_relative_to(REPO_ROOT):
            raise SystemExit(f"ours resolved to {module_file(impl)}, outside {REPO_ROOT}")
    else:
        from palm_rlhf_pytorch.palm import PaLM
    return PaLM


def build_model(impl: str, cfg: dict):
    """The same PaLM configuration from either library (keyword arguments both accept)."""
    kwargs = {
        k: cfg[k] for k in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "causal")
    }
    kwargs["flash_attn"] = cfg["flash_attn"]
    model = import_palm(impl)(**kwargs)
    if cfg["checkpoint_activations"]:
        if impl != "ours":
            raise SystemExit("--checkpoint-activations: the reference has no such option")
        model.checkpoint_activations = True
    return model


def module_file(impl: str) -> str:
    return sys.modules[PACKAGES[impl]].__file__


def count_params(model) -> dict:
    """Unique parameters (tied weights once) and those outside the token embedding."""
    params = dict(model.named_parameters())  # named_parameters() already skips tied duplicates
    total = sum(p.numel() for p in params.values())
    embedding = sum(p.numel() for n, p in params.items() if "token_emb" in n or "to_logits" in n)
    return {"params_total": total, "params_non_embedding_counted": total - embedding}


def random_tokens(batch: int, length: int, num_tokens: int, generator):
    """Token ids in [1, num_tokens): both libraries ignore target id 0 in the loss by default."""
    import torch

    return torch.randint(1, num_tokens, (batch, length), generator=generator)


def autocast(dtype: str):
    import contextlib

    import torch

    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, seq, dtype: str) -> float:
    model.zero_grad(set_to_none=True)
    with autocast(dtype):
        loss = model(seq, return_loss=True)
    loss.backward()
    return loss.item()


def summarize(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "times_s": [round(t, 6) for t in times],
    }


def timed(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def task_matmul(args) -> dict:
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    a = torch.randn(args.matmul_size, args.matmul_size).to(dtype)
    b = torch.randn(args.matmul_size, args.matmul_size).to(dtype)
    out = torch.empty_like(a)
    times = timed(lambda: torch.mm(a, b, out=out), args.warmup, args.iters)
    stats = summarize(times)
    stats["gflops"] = 2 * args.matmul_size**3 / stats["median_s"] / 1e9
    stats["size"] = args.matmul_size
    return stats


def task_train(args, cfg) -> dict:
    model = build_model(args.impl, cfg).train()
    seq = random_tokens(args.batch, cfg["seq_len"] + 1, cfg["num_tokens"], args.generator)
    losses = []
    times = timed(
        lambda: losses.append(train_step(model, seq, args.dtype)), args.warmup, args.iters
    )
    stats = summarize(times)
    tokens = args.batch * cfg["seq_len"]
    flops = model_flops_per_token(cfg)
    stats.update(count_params(model), **flops)
    stats["tokens_per_s"] = tokens / stats["median_s"]
    stats["achieved_gflops"] = stats["tokens_per_s"] * flops["flops_per_token"] / 1e9
    stats["first_loss"] = losses[0]  # ~ln(num_tokens) at initialisation on uniform random ids
    stats["loss_finite"] = all(math.isfinite(x) for x in losses)
    return stats


def generate(impl: str, model, prompt, total_len: int, top_k: int):
    """Sample total_len - prompt_len tokens, top-k filtered, temperature 1, no EOS."""
    if impl == "ours":
        return model.generate(total_len, prompt=prompt, temperature=1.0, top_k=top_k)
    from palm_rlhf_pytorch.utils import top_k as top_k_filter

    # the reference keeps ceil((1 - thres) * vocab) logits; pick thres so that equals top_k
    thres = 1.0 - top_k / model.num_tokens
    assert math.ceil(round((1 - thres) * model.num_tokens, 6)) == top_k
    return model.generate(
        total_len, prompt, temperature=1.0, filter_logits_fn=top_k_filter, filter_thres=thres
    )


def task_sample(args, cfg) -> dict:
    import torch

    model = build_model(args.impl, cfg).eval()
    if args.dtype == "bf16":  # weights stored in bf16 for inference (no autocast re-casting)
        model = model.to(torch.bfloat16)
    prompt = random_tokens(args.batch, args.prompt_len, cfg["num_tokens"], args.generator)
    total = args.prompt_len + args.new_tokens
    shapes = []

    def run(length):
        with torch.no_grad():
            out = generate(args.impl, model, prompt, length, args.top_k)
        shapes.append(tuple(out.shape))

    # warm-up on a short generation so the slow, uncached path does not dominate run time
    for _ in range(args.warmup):
        run(args.prompt_len + min(8, args.new_tokens))
    shapes.clear()
    stats = summarize(timed(lambda: run(total), 0, args.iters))
    expected = (args.batch, args.new_tokens)
    if any(s != expected for s in shapes):
        raise RuntimeError(f"generate returned shapes {shapes}, expected {expected}")
    stats["new_tokens_per_s"] = args.batch * args.new_tokens / stats["median_s"]
    stats["top_k"] = args.top_k
    return stats


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0


def task_memory(args, cfg) -> dict:
    mib = 1024.0
    gc.collect()
    rss_start = _proc_status_kib("VmRSS")
    model = build_model(args.impl, cfg).train()
    seq = random_tokens(args.batch, cfg["seq_len"] + 1, cfg["num_tokens"], args.generator)
    gc.collect()
    rss_model = _proc_status_kib("VmRSS")
    result = {"model_mib": (rss_model - rss_start) / mib, "method": "VmHWM - VmRSS"}
    for label in ("first_step_peak_mib", "step_peak_mib"):  # cold step, then a warm one
        model.zero_grad(set_to_none=True)
        gc.collect()
        before = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        train_step(model, seq, args.dtype)
        result[label] = (_proc_status_kib("VmHWM") - before) / mib
    result["malloc_env"] = {k: os.environ.get(k) for k in MALLOC_ENV}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=sorted(PACKAGES), required=True)
    p.add_argument("--task", choices=("train", "sample", "memory", "matmul"), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--num-tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--ff-mult", type=int, default=4)
    p.add_argument("--no-flash-attn", dest="flash_attn", action="store_false")
    p.add_argument("--checkpoint-activations", action="store_true", help="ours only")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512, help="training input length T")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--top-k", type=int, default=26, help="ceil(0.1 * 256): reference default")
    p.add_argument("--matmul-size", type=int, default=2048)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.task == "memory" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # malloc reads its tunables at start-up: restart this process with them set
        flags = ["-I"] if sys.flags.isolated else []
        argv = getattr(sys, "orig_argv", None) or [sys.executable, *flags, *sys.argv]
        os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **MALLOC_ENV})
    isolate(args.impl)
    warnings.simplefilter("ignore")  # e.g. the reference's deprecated sdp_kernel context

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.generator = torch.Generator().manual_seed(args.seed)
    cfg = {
        "num_tokens": args.num_tokens,
        "dim": args.dim,
        "depth": args.depth,
        "heads": args.heads,
        "dim_head": args.dim_head,
        "ff_mult": args.ff_mult,
        "causal": True,
        "flash_attn": args.flash_attn,
        "checkpoint_activations": args.checkpoint_activations,
        "seq_len": args.seq_len,
    }
    if args.task == "matmul":
        result = task_matmul(args)
    else:
        import_palm(args.impl)  # before any measurement: memory baselines exclude imports
        tasks = {"train": task_train, "sample": task_sample, "memory": task_memory}
        result = tasks[args.task](args, cfg)
    header = {
        "impl": args.impl,
        "task": args.task,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.executable,
        "batch": args.batch,
        "config": cfg,
    }
    if args.task != "matmul":
        header["module_file"] = module_file(args.impl)
    print(json.dumps({**header, **result}), flush=True)


if __name__ == "__main__":
    main()
