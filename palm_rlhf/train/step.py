"""One guarded optimizer step: a NaN/Inf loss never reaches the weights (stop, or drop the
step), gradients are clipped, and every process takes the same branch."""

from __future__ import annotations

import math
from typing import Optional

import torch


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss is NaN or Inf and the trainer's policy is to stop."""


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
