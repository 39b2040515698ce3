"""The one training loop of pretraining, SFT, DPO, CoH and reward-model training.

A stage brings its data, its loss and its evaluation as a `LoopParts`; the loop owns the rest,
the same for every stage:

    for each optimizer step k (from the resumed step to num_steps):
        for each of its grad_accum micro-batches:           (inside accelerator.accumulate)
            LossTerms = parts.loss(batch)                   a sum over items and their count
            reduce sum and count over processes             the monitored loss = sum / count
            guard (NaN policy) -> backward of sum * N / global count -> on the last: clip, step
        schedule step; record {step, loss, metrics..., lr}
        evaluate every eval_every steps and at the end      (0: at the end only)
        history entry every log_every steps, at evaluations and at the end
        parts.after_step (e.g. a text sample)
        checkpoint every save_every steps and at the end    (0: at the end only)
        stop after max_minutes (evaluated and saved) or on Ctrl-C / SIGTERM (saved)

A loss is a sum normalised by the GLOBAL count of its items (tokens, pairs, records, batches),
so N processes get the gradient one process gets from the whole batch, and the recorded loss
of a step is the mean over all its micro-batches. Resuming a run that has already finished
trains nothing and says so in one line, with the results of its last step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from palm_rlhf.train.checkpointing import Resumed
from palm_rlhf.train.continuing import continue_command
from palm_rlhf.train.history import HistoryLog
from palm_rlhf.train.progress import main_process_log, progress_bar
from palm_rlhf.train.run_options import LoopOptions
from palm_rlhf.train.step import guarded_step
from palm_rlhf.train.stopping import StopOnSignal, TrainingInterrupted


class LossTerms(NamedTuple):
    """A stage's loss on one micro-batch: loss_sum over `count` items (tokens, pairs, or 1 for
    a batch mean), plus metrics as name -> (sum, count); the loop reduces both over processes
    and reports sum / count."""

    loss_sum: Tensor
    count: Any  # Tensor or number
    metrics: Optional[dict[str, tuple[Any, Any]]] = None


class LoopParts(NamedTuple):
    """What a stage plugs into `train_loop`."""

    name: str  # the stage: progress label, tracker run, the command that continues it
    num_steps: int  # optimizer steps in the whole run
    micro_batches: Callable[[int], Iterable]  # step k -> its grad_accum micro-batches
    loss: Callable[[Any], LossTerms]  # one micro-batch -> LossTerms (on the prepared model)
    evaluate: Callable[[], dict[str, float]]  # -> record entries named valid_* ({}: no data)
    checkpoint: Callable[[int, bool], Optional[Path]]  # (step, run finished) -> folder or None
    after_step: Optional[Callable[[int, bool], None]] = None  # (step, last step of this call)
    length_flag: str = "--max-steps"  # the option that makes the run longer


class LoopResult(NamedTuple):
    step: int
    history: list
    train: dict  # the last step's training metrics (loss, ...)
    valid: dict  # the last evaluation's valid_* entries ({} without held-out data)
    checkpoint: Optional[Path]  # the last folder written (the resumed one if nothing ran)
    finished_before: bool  # resumed a run that had already finished: nothing was trained


def reduce_terms(terms: LossTerms, accelerator, weight: float = 1.0) -> dict[str, list[float]]:
    """Global {name: [sum, count]} for the loss and every metric, in one reduction."""
    pairs = {"loss": (terms.loss_sum, terms.count), **(terms.metrics or {})}
    flat = (
        torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float32, device=accelerator.device)
                for pair in pairs.values()
                for v in pair
            ]
        ).detach()
        * weight
    )
    flat = accelerator.reduce(flat, "sum").tolist()
    return {name: flat[2 * i : 2 * i + 2] for i, name in enumerate(pairs)}


def add_totals(totals: dict, more: dict) -> dict:
    for name, (total, count) in more.items():
        old = totals.get(name, [0.0, 0.0])
        totals[name] = [old[0] + total, old[1] + count]
    return totals


def means(totals: dict) -> dict[str, float]:
    return {k: (s / c if c else math.nan) for k, (s, c) in totals.items()}


def every(step: int, interval: int) -> bool:
    """Whether `step` is on an `interval` (0: never; the loop adds the last step itself)."""
    return interval > 0 and step % interval == 0


def describe(name: str, record: dict) -> str:
    shown = ", ".join(
        f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in record.items()
        if k != "step"
    )
    return f"{name} step {record['step']}: {shown}"


def _finished_before(parts: LoopParts, resumed: Resumed, log) -> LoopResult:
    """The result of a resumed run that had already finished: its last record, its folder."""
    last = resumed.history[-1] if resumed.history else {}
    valid = {k: v for k, v in last.items() if k.startswith("valid_")}
    train = {k: v for k, v in last.items() if k not in ("step", "lr") and k not in valid}
    log(
        f"{parts.name}: the run in {resumed.folder.parent} already finished at step "
        f"{resumed.step} (of {parts.num_steps}); nothing to train, its checkpoint is "
        f"{resumed.folder}. To continue another run, name it (--out-dir DIR --resume latest); "
        f"to train this one longer, raise {parts.length_flag}."
    )
    return LoopResult(resumed.step, resumed.history, train, valid, resumed.folder, True)


def train_loop(
    accelerator,
    model,
    optimizer,
    scheduler,
    config: LoopOptions,
    parts: LoopParts,
    resumed: Resumed,
) -> LoopResult:
    """Run `parts` from `resumed` (step 0 for a fresh run) to `parts.num_steps` as the module
    docstring says; `model` is the prepared (possibly wrapped or sharded) model."""
    log = main_process_log(accelerator)
    step, history = resumed.step, resumed.history
    if resumed.folder is not None and step >= parts.num_steps:
        return _finished_before(parts, resumed, log)
    params = [p for p in model.parameters() if p.requires_grad]
    world = accelerator.num_processes
    train, valid, saved, start = {}, {}, None, time.monotonic()
    bar = progress_bar(
        accelerator, config.progress, total=parts.num_steps, initial=step, desc=parts.name
    )
    model.train()
    run_log = HistoryLog(accelerator, config.out_dir, history, parts.name, asdict(config))
    with run_log, StopOnSignal() as stop:
        while step < parts.num_steps:
            totals, step_ok = {}, True
            for batch in parts.micro_batches(step):
                with accelerator.accumulate(model):
                    terms = parts.loss(batch)
                    reduced = reduce_terms(terms, accelerator)
                    total, count = reduced["loss"]
                    add_totals(totals, reduced)
                    # a sum over the global count: N processes' gradients average to one's
                    loss = terms.loss_sum * world / max(count, 1.0)
                    _, step_ok = guarded_step(
                        accelerator,
                        loss,
                        step,
                        params,
                        optimizer,
                        config.max_norm,
                        config.nan_policy,
                        monitored=torch.tensor(total / max(count, 1.0)),
                        ok=step_ok,
                    )
            scheduler.step()
            step += 1
            bar.update(1)
            train = means(totals)
            record = {"step": step, **train, "lr": scheduler.get_last_lr()[0]}
            finished = step == parts.num_steps
            out_of_time = (
                config.max_minutes is not None
                and time.monotonic() - start > 60 * config.max_minutes
            )
            last = finished or out_of_time
            evaluated = every(step, config.eval_every) or last
            if evaluated:
                valid = parts.evaluate()
                record.update(valid)
                log(describe(parts.name, record))
            if every(step, config.log_every) or evaluated:
                run_log.append(record)
                bar.set_postfix(loss=f"{train['loss']:.3f}")
            if parts.after_step is not None:
                parts.after_step(step, last)
            saved_now = every(step, config.save_every) or last
            if saved_now:
                saved = parts.checkpoint(step, finished)
            if out_of_time and not finished:
                log(
                    f"stopping after {config.max_minutes} minutes at step {step}; continue "
                    f"with: {continue_command(config, parts.name)}"
                )
                break
            signum = stop.requested(accelerator)
            if signum and not last:  # Ctrl-C / SIGTERM: the step is done; save it and stop
                bar.close()
                if not saved_now:
                    saved = parts.checkpoint(step, False)
                command = continue_command(config, parts.name)
                raise TrainingInterrupted(parts.name, step, saved, signum, command)
    bar.close()
    return LoopResult(step, history, train, valid, saved, False)
