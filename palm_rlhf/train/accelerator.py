"""The Accelerator every trainer makes (trainers own Accelerate; models never see it), and the
probe that warns before bf16 on a CPU that can only emulate it."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed

from palm_rlhf.train import sharding
from palm_rlhf.train.history import check_trackers


class SlowPrecisionWarning(UserWarning):
    """Mixed precision that this machine can only emulate, far slower than float32."""


def native_cpu_bf16() -> bool:
    """True when oneDNN runs bf16 matrix products on this CPU (AVX-512 or AMX). Without them
    torch falls back to a generic bf16 GEMM, many times slower than float32 (measured in
    benchmarks, not here)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: assume nothing
        return True


def make_accelerator(
    mixed_precision: str = "no",
    cpu: bool = False,
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    fsdp: bool = False,
    log_with: Optional[str] = None,
    **accelerate_kwargs,
) -> Accelerator:
    """An Accelerator whose batch size means the GLOBAL batch: each process gets its slice
    (`split_batches=True`), so one process and N processes see the same data per step.

    `fsdp` on GPUs hands Accelerate its FSDP2 plugin; on CPU processes Accelerate cannot shard,
    and the trainer shards the model itself with `sharding.shard` (see `train/sharding.py`).
    `log_with` names Accelerate trackers ("tensorboard", "wandb,tensorboard"); a missing
    package is a ValueError saying what to install."""
    from accelerate.utils import DataLoaderConfiguration

    trackers = check_trackers(log_with)
    if trackers is not None:
        accelerate_kwargs["log_with"] = trackers

    accelerate_kwargs.setdefault("dataloader_config", DataLoaderConfiguration(split_batches=True))
    # Accelerate only sets up multi-process CPU training (gloo) when told it is on the CPU, so a
    # machine without an accelerator says so itself: `accelerate launch` / torchrun just work.
    cpu = cpu or not _has_accelerator()
    if fsdp and not cpu:
        accelerate_kwargs.setdefault("fsdp_plugin", sharding.fsdp_plugin())
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **accelerate_kwargs,
    )
    set_seed(seed)
    if mixed_precision == "bf16" and accelerator.device.type == "cpu" and not native_cpu_bf16():
        warnings.warn(
            "bf16 mixed precision on a CPU without AVX-512 or AMX: torch emulates bf16 matrix "
            "products there, many times slower than float32; use --mixed-precision no",
            SlowPrecisionWarning,
            stacklevel=2,
        )
    return accelerator


def loop_accelerator(options) -> Accelerator:
    """`make_accelerator` for a `LoopOptions` config: its run options plus `grad_accum`, with
    trackers writing under `out_dir`."""
    return make_accelerator(
        options.mixed_precision,
        options.cpu,
        options.grad_accum,
        options.seed,
        fsdp=options.fsdp,
        log_with=options.log_with,
        project_dir=options.out_dir,
    )


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu is not None and xpu.is_available())
    )


def release_processes(exit_code: Optional[int] = None) -> None:
    """End a multi-process run (one that `accelerate launch` started): tear down its process
    group and, given `exit_code`, leave at once with it (stdout and stderr flushed). A no-op in
    one process.

    Leaving without the interpreter's own teardown is deliberate: after a finished gloo run a
    C++ thread can still be alive at finalization and abort the process (SIGABRT, "terminate
    called without an active exception"; about one launch in eight on our 2-core machine,
    after the group is destroyed and every file is written), turning a run that succeeded into
    a failed one for the launcher."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
