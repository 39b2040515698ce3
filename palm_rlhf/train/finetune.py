"""What SFT, Chain of Hindsight and DPO share: the base model and its tokenizer, LoRA or full
fine-tuning, and one training loop into which each stage plugs its data and its loss.

A stage is a `Stage`: encoded examples, a `collate` to padded tensors, and a `loss_fn`
returning `LossTerms` (a sum over items, their count, and extra metrics). The loop owns the
rest, in the order of `pretrain.py`: Accelerate, the batch schedule, gradient accumulation,
the learning-rate schedule, validation, checkpoints and exact resume.

Decisions:
- The batch schedule is fixed by the seed: epoch e visits the examples in a permutation seeded
  by (seed, e), and optimizer step k takes the next batch_size * grad_accum of them (epochs run
  on into each other so every step is full). Resuming at step k restarts at the same indices.
- batch_size is GLOBAL. Each process collates its own slice of a step's rows, and a loss is a
  sum normalised by the global count of items (tokens, or pairs for DPO), so N processes get
  the gradient one process gets from the whole batch.
- Validation runs every `eval_every` steps and at the end, on `valid_data`, or on
  `valid_fraction` of the training records held out (whole records, so a ranked list never
  straddles the split).
- LoRA: a stage trains one scope named after it ("sft", "coh", "dpo") on frozen base weights.
  Step checkpoints hold base weights plus the unmerged scope, so resuming is exact; the final
  checkpoint folds the scope into the weights (a standalone model for the next stage) unless
  `merge_lora` is off. `load_base` folds a single scope found in a base checkpoint, so any
  stage's checkpoint can be the next stage's base.
- The tokenizer travels inside every checkpoint folder; a stage handed a different one (by
  `--tokenizer`, or in a folder it resumes from) refuses to start.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from palm_rlhf.checkpoint import CheckpointError, load_json
from palm_rlhf.data.examples import step_rows
from palm_rlhf.functional.logprobs import shifted_log_probs
from palm_rlhf.functional.masked import masked_sum
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS
from palm_rlhf.model.palm import PaLM
from palm_rlhf.options import option
from palm_rlhf.train import sharding
from palm_rlhf.train.history import HistoryLog
from palm_rlhf.train.loading import check_tokenizer, load_base
from palm_rlhf.train.run import (
    RunOptions,
    checkpoint_on_main,
    cosine_schedule,
    guarded_step,
    make_optimizer,
    progress_bar,
    resume_training,
    stage_accelerator,
)
from palm_rlhf.train.stopping import StopOnSignal, TrainingInterrupted


@dataclass
class FinetuneConfig(RunOptions):
    base: Optional[str] = option(
        None, "checkpoint folder (or .safetensors file) to start from", required=True
    )
    data: Optional[str] = option(
        None, "training data, JSON Lines (.jsonl or gzipped)", required=True
    )
    valid_data: Optional[str] = option(None, "validation data (default: valid_fraction held out)")
    valid_fraction: float = option(0.0, "share of data records held out when no valid_data")
    tokenizer: Optional[str] = option(
        None, "folder with tokenizer.json to encode with; must match the base checkpoint's"
    )
    out_dir: str = option("checkpoints/finetune", "where step-N checkpoint folders are written")
    max_len: int = option(
        256, "longest sequence in tokens; over-long prompts are cut from the left"
    )
    on_error: str = option(
        "raise", "a malformed or over-long record: stop, or skip it", choices=("raise", "skip")
    )
    use_lora: bool = option(
        False, "train a LoRA scope on frozen base weights instead of all weights"
    )
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: Optional[float] = option(None, "LoRA alpha; the update is scaled by alpha / r")
    lora_targets: tuple[str, ...] = option(
        DEFAULT_LORA_TARGETS, "projections given adapters (q k v o ff_in ff_out)"
    )
    merge_lora: bool = option(True, "fold the LoRA scope into the weights in the final checkpoint")
    base_scope: Optional[str] = option(None, "LoRA scope to fold in when the base carries several")
    batch_size: int = option(8, "GLOBAL batch size per micro-step (split over processes)")
    grad_accum: int = option(1, "micro-steps of batch_size per optimizer step")
    epochs: float = option(1.0, "passes over the training examples")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps")
    lr: float = option(1e-4, "peak learning rate (AdamW); LoRA usually wants about 10x more")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = option(10, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices")
    max_norm: Optional[float] = option(1.0, "gradient clipping norm ('none' disables)")
    eval_every: int = option(100, "steps between validation runs")
    save_every: int = option(200, "steps between checkpoints")
    log_every: int = option(10, "steps between history entries")
    resume: Optional[str] = option(None, "'latest' or a checkpoint folder to continue from")

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        for name in ("max_len", "lora_r", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 or None, got {self.max_steps}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


class LossTerms(NamedTuple):
    """A stage's loss on one batch: loss_sum over `count` items (tokens or pairs), plus metrics
    as name -> (sum, count); the loop reduces both over processes and reports sum / count."""

    loss_sum: Tensor
    count: Tensor
    metrics: Optional[dict[str, tuple[Tensor, Tensor]]] = None


class Stage(NamedTuple):
    name: str  # progress label and LoRA scope name
    train: Sequence[Any]  # encoded examples
    valid: Sequence[Any]
    collate: Callable[[list], dict[str, Tensor]]
    loss_fn: Callable[[nn.Module, dict[str, Tensor], PaLM], LossTerms]  # (model, batch, unwrapped)
    frozen: tuple[nn.Module, ...] = ()  # e.g. a reference copy: put on the device, never trained


class FinetuneResult(NamedTuple):
    history: list  # dicts: step, lr, loss and metrics (+ valid_* on validation steps)
    train: dict  # the last step's training metrics
    valid: dict  # the last validation metrics (empty without validation data)
    checkpoint: Optional[Path]
    model: PaLM
    tokenizer: Any


# ------------------------------------------------------------------- base model and tokenizer


# ------------------------------------------------------------------- batches


def _my_slice(rows: list[int], accelerator) -> list[int]:
    """This process's contiguous share of a global batch."""
    shares = torch.tensor_split(torch.arange(len(rows)), accelerator.num_processes)
    return [rows[i] for i in shares[accelerator.process_index].tolist()]


def _to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _reduce(terms: LossTerms, accelerator, weight: float = 1.0) -> dict[str, list[float]]:
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


def _add(totals: dict, more: dict) -> dict:
    for name, (total, count) in more.items():
        old = totals.get(name, [0.0, 0.0])
        totals[name] = [old[0] + total, old[1] + count]
    return totals


def _train_names(record: dict) -> list[str]:
    """The training metrics of a history record (not step, lr or valid_*)."""
    return [k for k in record if k not in ("step", "lr") and not k.startswith("valid_")]


def _means(totals: dict, prefix: str = "") -> dict[str, float]:
    return {prefix + k: (s / c if c else math.nan) for k, (s, c) in totals.items()}


@torch.no_grad()
def evaluate_stage(stage: Stage, unwrapped: PaLM, accelerator, batch_size: int) -> dict[str, float]:
    """Metrics over stage.valid; each process takes a slice of every batch (exact, no repeats)."""
    if not stage.valid:
        return {}
    was_training = unwrapped.training
    unwrapped.eval()
    totals: dict = {}
    for start in range(0, len(stage.valid), batch_size):
        rows = _my_slice(list(range(start, min(start + batch_size, len(stage.valid)))), accelerator)
        weight = 1.0 if rows else 0.0  # a process left without rows joins the reduction with 0s
        batch = stage.collate([stage.valid[i] for i in (rows or [start])])
        with accelerator.autocast():
            terms = stage.loss_fn(unwrapped, _to_device(batch, accelerator.device), unwrapped)
        _add(totals, _reduce(terms, accelerator, weight))
    unwrapped.train(was_training)
    return _means(totals)


# ------------------------------------------------------------------- the loop


def _check_resume(folder: Path, config: FinetuneConfig, stage: Stage, tokenizer) -> None:
    saved = load_json(folder / "trainer_state.json")
    if saved.get("stage") != stage.name:
        raise CheckpointError(
            f"{folder} is a {saved.get('stage')!r} checkpoint, not {stage.name!r}"
        )
    if saved.get("lora_merged"):
        raise CheckpointError(
            f"{folder} is a finished run whose LoRA scope was merged; start a new run with "
            f"--base {folder} instead of resuming it"
        )
    if saved.get("config", {}).get("use_lora") != config.use_lora:
        raise CheckpointError(
            f"{folder} was trained with use_lora={not config.use_lora}; pass the same"
        )
    check_tokenizer(folder, tokenizer, f"the base {config.base}")


def run_stage(
    config: FinetuneConfig, build: Callable[[PaLM, Any], Stage], name: str
) -> FinetuneResult:
    """Load the base, build the stage (data, loss), train it, and checkpoint it.

    `build(model, tokenizer)` runs before LoRA is added and before Accelerate sees the model.
    """
    for required in ("base", "data"):
        if getattr(config, required) is None:
            raise ValueError(f"--{required.replace('_', '-')} is required for {name}")
    accelerator = stage_accelerator(config)
    log = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    if config.batch_size < accelerator.num_processes:
        raise ValueError(f"batch_size {config.batch_size} < {accelerator.num_processes} processes")
    model, tokenizer = load_base(config.base, config.tokenizer, config.base_scope, log)
    model.checkpoint_activations = config.checkpoint_activations
    if model.config.max_seq_len is not None and config.max_len > model.config.max_seq_len:
        raise ValueError(
            f"max_len {config.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}"
        )
    stage = build(model, tokenizer)
    if not stage.train:
        raise ValueError(f"{config.data}: no training examples left after the split")
    log(f"{name}: {len(stage.train)} training / {len(stage.valid)} validation examples")

    scope = name if config.use_lora else None
    if scope is not None:
        model.requires_grad_(False)
        model.add_finetune_params(scope, config.lora_r, config.lora_alpha, config.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{name}: training {trainable:,} parameters ({'LoRA scope ' + scope if scope else 'all'})")
    per_step = config.batch_size * config.grad_accum
    num_steps = max(1, math.ceil(config.epochs * len(stage.train) / per_step))
    num_steps = min(num_steps, config.max_steps or num_steps)
    # sharded (--fsdp): split before the optimizer is made, so it holds the shards
    template = sharding.shard(model, accelerator, config.fsdp)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.warmup_steps, num_steps, config.min_lr_ratio)
    model, optimizer, scheduler = sharding.prepare(accelerator, model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    for module in stage.frozen:
        module.to(accelerator.device).eval().requires_grad_(False)

    step, history, state, folder = resume_training(
        config.out_dir,
        config.resume,
        unwrapped,
        optimizer,
        scheduler,
        log,
        check=lambda folder: _check_resume(folder, config, stage, tokenizer),
        template=template,
    )

    def checkpoint(final: bool) -> Optional[Path]:
        merged = final and scope is not None and config.merge_lora
        fold = (lambda module: module.merge_finetune_params(scope)) if merged else None
        if fold is not None and not sharding.is_sharded(unwrapped):
            fold(unwrapped)  # training is over: fold the adapters in
            fold = None  # (sharded: folded into the gathered copy the checkpoint is written from)
        trainer_state = {
            "config": asdict(config),
            "history": history,
            "stage": name,
            "lora_merged": merged,
            "num_steps": num_steps,
        }
        return checkpoint_on_main(
            accelerator,
            config.out_dir,
            step,
            unwrapped,
            optimizer,
            scheduler,
            trainer_state,
            config.keep_last,
            tokenizer,
            template,
            before_save=fold,
        )

    train_metrics, valid_metrics, saved = {}, {}, None
    bar = progress_bar(accelerator, config.progress, total=num_steps, initial=step, desc=name)
    model.train()
    run_log = HistoryLog(accelerator, config.out_dir, history, name, asdict(config))
    with run_log, StopOnSignal() as stop:
        while step < num_steps:
            rows, totals, step_ok = (
                step_rows(step, per_step, len(stage.train), config.seed),
                {},
                True,
            )
            for micro in range(config.grad_accum):
                mine = _my_slice(
                    rows[micro * config.batch_size : (micro + 1) * config.batch_size], accelerator
                )
                batch = _to_device(
                    stage.collate([stage.train[i] for i in mine]), accelerator.device
                )
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        terms = stage.loss_fn(model, batch, unwrapped)
                    reduced = _reduce(terms, accelerator)
                    total, count = reduced["loss"]
                    _add(totals, reduced)
                    # a sum over the global count: N processes' gradients average to one process's
                    loss = terms.loss_sum * accelerator.num_processes / max(count, 1.0)
                    _, step_ok = guarded_step(
                        accelerator,
                        loss,
                        step,
                        model.parameters(),
                        optimizer,
                        config.max_norm,
                        config.nan_policy,
                        monitored=torch.tensor(total / max(count, 1.0)),
                        ok=step_ok,
                    )
            scheduler.step()
            step += 1
            bar.update(1)
            train_metrics = _means(totals)
            record = {"step": step, "lr": scheduler.get_last_lr()[0], **train_metrics}
            last = step == num_steps
            if step % config.eval_every == 0 or last:
                valid_metrics = evaluate_stage(stage, unwrapped, accelerator, config.batch_size)
                sharding.settle(unwrapped)
                record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
                shown = ", ".join(
                    f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}"
                    for k, v in record.items()
                    if k != "step"
                )
                log(f"{name} step {step}: {shown}")
            if step % config.log_every == 0 or last or any(k.startswith("valid_") for k in record):
                run_log.append(record)
                bar.set_postfix(loss=f"{train_metrics['loss']:.3f}")
            if step % config.save_every == 0 or last:
                saved = checkpoint(final=last)
            signum = stop.requested(accelerator)
            if signum and not last:  # Ctrl-C / SIGTERM: the step is done; save it and stop
                bar.close()
                if not (step % config.save_every == 0 or last):
                    saved = checkpoint(final=False)
                raise TrainingInterrupted(name, step, saved, signum)
    bar.close()
    if state is not None and step == state["step"]:  # resumed a finished run: nothing ran
        last_record = history[-1] if history else {}
        train_metrics = {k: v for k, v in last_record.items() if k in _train_names(last_record)}
        valid_metrics, saved = (
            evaluate_stage(stage, unwrapped, accelerator, config.batch_size),
            folder,
        )
    return FinetuneResult(history, train_metrics, valid_metrics, saved, unwrapped, tokenizer)


def token_loss_fn(scope: Optional[str], kinds: dict[int, str] | None = None):
    """A `Stage.loss_fn` for masked next-token loss; `kinds` names per-kind loss metrics."""

    def loss_fn(model, batch: dict[str, Tensor], unwrapped) -> LossTerms:
        logits = model(batch["tokens"], mask=batch["mask"], finetune_scope=scope)
        nll = -shifted_log_probs(logits, batch["tokens"])
        targets = batch["loss_mask"][:, 1:]
        metrics = {}
        for kind, name in (kinds or {}).items():
            rows = (batch["kind"] == kind)[:, None] & targets
            metrics[name] = (masked_sum(nll, rows), rows.sum())
        return LossTerms(masked_sum(nll, targets), targets.sum(), metrics)

    return loss_fn
