"""What every trainer shares: the Accelerator, resumable checkpoints, RNG state, loss guards.

Trainers (pretraining, SFT, reward model, PPO, DPO, CoH) own Accelerate; models never see it.
A training checkpoint is a folder written atomically by `save_checkpoint_dir`:

    model.safetensors     weights + config (only the trained LoRA scopes when adapters_only)
    optimizer.pt          optimizer / scheduler state, read back with weights_only=True (keyed
                          by parameter position, or by name when written by a sharded run;
                          either kind of run resumes either: see train/sharding.py)
    rng.pt                torch (and CUDA) generator states
    trainer_state.json    step counters, the training config, metrics history
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    latest_checkpoint,
    load_json,
    load_state,
    remove_tree,
    save_checkpoint_dir,
    save_json,
    save_state,
)
from palm_rlhf.data.tokenizer import CONFIG_NAME
from palm_rlhf.options import option
from palm_rlhf.train import sharding
from palm_rlhf.train.history import check_trackers


@dataclass
class RunOptions:
    """Options every trainer shares; the stage configs inherit them (and so their CLI flags)."""

    keep_last: int = option(2, "checkpoint folders to keep")
    seed: int = option(0, "random seed (initialisation, data order, dropout)")
    mixed_precision: str = option(
        "no", "Accelerate mixed precision", choices=("no", "bf16", "fp16")
    )
    cpu: bool = option(False, "force the CPU even when a GPU is present")
    nan_policy: str = option(
        "raise", "on a NaN/Inf loss: stop, or skip the step", choices=("raise", "skip")
    )
    progress: bool = option(True, "show a progress bar (--no-progress for log files)")
    fsdp: bool = option(
        False,
        "shard parameters, gradients and optimizer state over the processes (FSDP2, one unit "
        "per ParallelBlock); checkpoints stay full",
    )
    checkpoint_activations: bool = option(
        False,
        "recompute each transformer block's activations in the backward pass instead of "
        "storing them: less peak memory for about one more forward pass of time",
    )
    log_with: Optional[str] = option(
        None,
        "also send the curves to these trackers, comma-separated: tensorboard, wandb, mlflow, "
        "comet_ml, aim, clearml, dvclive (install the package; out_dir/history.jsonl is "
        "always written)",
    )


class SlowPrecisionWarning(UserWarning):
    """Mixed precision that this machine can only emulate, far slower than float32."""


def native_cpu_bf16() -> bool:
    """True when oneDNN runs bf16 matrix products on this CPU (AVX-512 or AMX). Without them
    torch falls back to a generic bf16 GEMM: on a 2-core AVX2 EPYC, 0.3 to 18 GFLOP/s against
    125 for float32, and a bf16-autocast training step about 45 times slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: assume nothing
        return True


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN or Inf and the trainer's policy is to stop."""


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


def stage_accelerator(config) -> Accelerator:
    """`make_accelerator` for a training stage's config: its RunOptions plus `grad_accum`,
    with trackers writing under `out_dir`."""
    return make_accelerator(
        config.mixed_precision,
        config.cpu,
        config.grad_accum,
        config.seed,
        fsdp=config.fsdp,
        log_with=config.log_with,
        project_dir=config.out_dir,
    )


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu is not None and xpu.is_available())
    )


def guard_loss(loss: torch.Tensor, step: int, policy: str = "raise") -> bool:
    """True when the loss is finite. Otherwise raise (policy "raise") or return False ("skip")
    so the caller drops the step; the last good checkpoint is never overwritten by NaN weights."""
    if policy not in ("raise", "skip"):
        raise ValueError(f"nan policy must be 'raise' or 'skip', got {policy!r}")
    value = float(loss.detach())
    if math.isfinite(value):
        return True
    if policy == "raise":
        raise NonFiniteLossError(
            f"loss is {value} at step {step}; stopping (the last checkpoint is kept). "
            f"Lower the learning rate, or pass --nan-policy skip to drop such steps."
        )
    return False


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    root: PathLike,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    trainer_state: Optional[dict] = None,
    scopes: Optional[tuple[str, ...]] = None,
    keep_last: int = 2,
    extra_states: Optional[dict[str, Any]] = None,
    extra_files: Optional[dict[str, Any]] = None,
    optimizer_state: Optional[dict] = None,
) -> Path:
    """Write `root/step-XXXXXXX` atomically, point `root/latest` at it, prune old ones.

    `model` is the unwrapped PaLM (or any module with `save(path, scopes=...)`); `scopes` saves
    adapters only. `extra_states` are more tensor dicts (e.g. a value head), saved as .pt files.
    `optimizer_state` replaces `optimizer.state_dict()` (a sharded run's gathered full state).
    """
    name = f"step-{step:07d}"
    writers = {
        "model.safetensors": lambda p: (
            model.save(p) if scopes is None else model.save(p, scopes=scopes)
        ),
        "rng.pt": lambda p: save_state(p, rng_state()),
        "trainer_state.json": lambda p: save_json(p, {"step": step, **(trainer_state or {})}),
    }
    if optimizer is not None:
        states = {"optimizer": optimizer_state or optimizer.state_dict()}
        if scheduler is not None:
            states["scheduler"] = scheduler.state_dict()
        writers["optimizer.pt"] = lambda p: save_state(p, states)
    for filename, state in (extra_states or {}).items():
        writers[filename] = lambda p, state=state: save_state(p, state)
    writers.update(extra_files or {})
    folder = save_checkpoint_dir(root, name, writers)
    _prune(Path(root), keep_last)
    return folder


def checkpoint_on_main(
    accelerator,
    root: PathLike,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int,
    tokenizer,
    template=None,
    before_save=None,
) -> Optional[Path]:
    """The main process writes a training checkpoint with the tokenizer beside the weights;
    every process waits for it. Returns the folder on the main process, None elsewhere.

    A sharded model's full weights and optimizer state are gathered first (every process takes
    part) into `template`, its unsharded twin on the main process, which is what gets written.
    `before_save(module)` runs on the module about to be written (e.g. folding a LoRA scope)."""
    path, optimizer_state = None, None
    if sharding.is_sharded(model):
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
        model = sharding.gather_weights(model, template)
    if accelerator.is_main_process:
        if before_save is not None:
            before_save(model)
        path = save_training_checkpoint(
            root,
            step,
            model,
            optimizer,
            scheduler,
            trainer_state=trainer_state,
            keep_last=keep_last,
            extra_files={CONFIG_NAME: lambda p: tokenizer.save(p.parent)},
            optimizer_state=optimizer_state,
        )
    accelerator.wait_for_everyone()
    return path


def guarded_step(
    accelerator,
    loss,
    step: int,
    params,
    optimizer,
    max_norm,
    nan_policy: str,
    monitored: Optional[torch.Tensor] = None,
    ok: bool = True,
) -> tuple[torch.Tensor, bool]:
    """One micro-step inside `accelerator.accumulate`: backward, and on the last micro-step of
    an optimizer step clip, step and zero the gradients.

    The loss checked for NaN/Inf is `monitored` when given (a value already reduced over
    processes), else `loss` reduced over processes, so every process takes the same branch.
    A non-finite loss (policy "skip") runs no backward; `ok=False` says an earlier micro-step of
    this optimizer step was skipped, so the whole step is dropped. Returns (monitored, ok)."""
    monitored = accelerator.reduce(loss.detach(), "mean") if monitored is None else monitored
    ok = ok and guard_loss(monitored, step, nan_policy)
    if ok:
        accelerator.backward(loss)
    if accelerator.sync_gradients:
        if ok and max_norm is not None:
            accelerator.clip_grad_norm_(params, max_norm)
        if ok:
            optimizer.step()
        optimizer.zero_grad()
    return monitored, ok


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; norms' gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def load_training_checkpoint(
    folder: PathLike,
    model=None,
    optimizer=None,
    scheduler=None,
    restore_rng: bool = True,
    template=None,
) -> dict:
    """Restore what `save_training_checkpoint` wrote; returns the trainer_state dict.

    A sharded model (every process calls this) loads the full weights through `template`, its
    unsharded twin on the main process, and its optimizer from the full name-keyed state."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    state = load_json(folder / "trainer_state.json")
    sharded = model is not None and sharding.is_sharded(model)
    if sharded:
        sharding.load_weights(model, template, folder / "model.safetensors")
    elif model is not None:
        model.load(folder / "model.safetensors")
    if optimizer is not None:
        states = load_state(folder / "optimizer.pt")
        # either kind of run resumes either kind of checkpoint (by name or by position)
        if model is not None:
            sharding.load_optimizer_state(model, optimizer, states["optimizer"])
        else:
            optimizer.load_state_dict(states["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(states["scheduler"])
    if restore_rng:
        set_rng_state(load_state(folder / "rng.pt"))
    return state


def resume_folder(root: PathLike, resume: Union[bool, str, None]) -> Optional[Path]:
    """`resume=True` -> latest checkpoint under root (None if there is none); a path -> it."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(root)
    return Path(resume)


class Resumed(NamedTuple):
    step: int
    history: list
    state: Optional[dict]  # the checkpoint's trainer_state.json
    folder: Optional[Path]


def resume_training(
    out_dir: Optional[PathLike],
    resume: Union[bool, str, None],
    model,
    optimizer=None,
    scheduler=None,
    log=print,
    check=None,
    template=None,
) -> Resumed:
    """Restore `resume` ('latest' under out_dir, or a folder) into model/optimizer/scheduler/RNG.

    Returns Resumed(step, history, trainer_state, folder); step 0 when there is nothing to resume.
    `check(folder)` may refuse a folder (e.g. one written with another tokenizer) first.
    """
    if resume and out_dir is None and resume in (True, "latest"):
        raise ValueError("resume needs out_dir, where the checkpoints are")
    folder = resume_folder(out_dir, resume) if resume else None
    if resume and folder is None:
        log(f"no checkpoint under {out_dir}: starting from scratch")
    if folder is None:
        return Resumed(0, [], None, None)
    if check is not None:
        check(folder)
    state = load_training_checkpoint(folder, model, optimizer, scheduler, template=template)
    log(f"resumed from {folder} at step {state['step']}")
    return Resumed(state["step"], state.get("history", []), state, folder)


def _prune(root: Path, keep_last: int) -> None:
    current = latest_checkpoint(root)
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for folder in folders[:-keep_last] if keep_last > 0 else []:
        if folder != current:
            remove_tree(folder)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warm-up then cosine decay to `min_ratio` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def progress_bar(accelerator, enabled: bool, **tqdm_options):
    """A tqdm.auto bar (a widget in Jupyter) shown by the main process only, when enabled."""
    return tqdm(disable=not (enabled and accelerator.is_local_main_process), **tqdm_options)


def mean_over_processes(accelerator, record: dict[str, float]) -> dict[str, float]:
    """Each number of a metrics record averaged over processes (NaN entries ignored)."""
    keys = sorted(record)
    local = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local[None]).reshape(-1, len(keys))
    return dict(zip(keys, gathered.nanmean(dim=0).tolist()))
