"""Where and on what a benchmark result was measured: recorded in every results JSON.

`provenance()` is the `"provenance"` entry each `benchmarks/bench_*.py` writes beside its
numbers; `benchmarks/results_page.py` prints it above each table of `docs/results.md`, so a
number always says which commit, which day and which machine it belongs to:

    {"commit": "576bfa3", "dirty": false, "date": "2026-12-03T08:00:00+00:00",
     "machine": {"cpu": "AMD EPYC 9B14", "cores": 2, "avx512": true, "avx512_bf16": true,
                 "amx_bf16": false, "torch": "2.13.0+cpu", "threads": 2}}

`dirty` is true when the checkout had uncommitted changes to tracked files (the numbers may
then belong to no commit); `commit` is None outside a git checkout.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model_and_flags() -> tuple[str, set]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux), else what
    `platform` knows and no flags."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown", flags


def provenance(threads: Optional[int] = None) -> dict:
    """Commit (short hash), dirty flag, UTC date and machine of a measurement made now."""
    import torch

    model, flags = cpu_model_and_flags()
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": model,
            "cores": os.cpu_count(),
            "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__,
            "threads": threads if threads is not None else torch.get_num_threads(),
        },
    }
