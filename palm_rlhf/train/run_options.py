"""The options of a training run, declared once: every stage's config inherits them, so the API
keywords and the command-line flags (`--seed`, `--lr`, `--resume`...) come from these fields.

- `RunOptions`: what every stage shares, PPO included (seed, precision, devices, NaN policy,
  progress bar, sharding, trackers, checkpoints kept).
- `LoraOptions`: LoRA or full weights, and the rank, where a stage can train adapters.
- `LoopOptions`: what the one training loop (`train/loop.py`) reads, for pretraining, SFT,
  DPO, CoH and reward training: the optimiser and its schedule, accumulation, clipping, when to
  evaluate, log and save, when to stop, where the run lives and where it resumes from.

A stage that wants another default says so with `default_for(name, value)`, which keeps the
field's help text; the help is never written twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from palm_rlhf.options import option


@dataclass
class RunOptions:
    """Options every stage shares; the stage configs inherit them (and so their CLI flags)."""

    keep_last: int = option(2, "checkpoint folders to keep (0: all)")
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


@dataclass
class LoopOptions(RunOptions):
    """What the training loop reads (see the module docstring)."""

    out_dir: Optional[str] = option(
        "checkpoints/run",
        "where step-N checkpoint folders and history.jsonl are written ('none': no saving)",
    )
    resume: Optional[str] = option(None, "'latest' (under out_dir) or a checkpoint folder")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(
        0.1, "final learning rate as a fraction of the peak (cosine decay)"
    )
    warmup_steps: int = option(10, "linear warm-up steps")
    weight_decay: float = option(
        0.0, "AdamW weight decay on matrices (never on norm gains, biases or other vectors)"
    )
    grad_accum: int = option(1, "micro-steps of batch_size per optimizer step")
    max_norm: Optional[float] = option(1.0, "gradient clipping norm ('none' disables)")
    max_minutes: Optional[float] = option(None, "stop (evaluate and save) after this many minutes")
    eval_every: int = option(100, "steps between evaluations (0: at the end only)")
    save_every: int = option(200, "steps between checkpoints (0: at the end only)")
    log_every: int = option(10, "steps between history entries")

    def __post_init__(self):
        for name in ("grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "keep_last", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_norm is not None and self.max_norm <= 0:
            raise ValueError(f"max_norm must be positive or none, got {self.max_norm}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive or none, got {self.max_minutes}")


@dataclass
class LoraOptions:
    """Low-rank adapters, for the stages that can train them (SFT, DPO, CoH, reward)."""

    use_lora: bool = option(
        False, "train a LoRA scope (a reward model: and its head) on frozen base weights"
    )
    lora_r: int = option(8, "LoRA rank")


def default_for(name: str, value: Any, cls: Optional[type] = None) -> Any:
    """The option `name` of `cls` with another default, for a stage whose default differs
    (`lr: float = default_for("lr", 2e-3)`); the help text stays the one declared above."""
    options = [cls] if cls is not None else [LoopOptions, LoraOptions]
    declared = {f.name: f for option_cls in options for f in dataclasses.fields(option_cls)}[name]
    return dataclasses.field(default=value, metadata=declared.metadata)
