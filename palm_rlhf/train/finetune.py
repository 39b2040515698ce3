"""What SFT, Chain of Hindsight and DPO share: the base model and its tokenizer, LoRA or full
fine-tuning, the batch schedule, and how a fine-tuning method plugs into the training loop
(`train/loop.py`, the one every stage uses).

A method is a `FinetuneMethod`: encoded examples, a `collate` to padded tensors, and a
`loss_fn` returning `LossTerms` (a sum over items, their count, and extra metrics). The loop
owns the rest: accumulation, the learning-rate schedule, validation, checkpoints, exact resume.

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
- LoRA: a method trains one scope named after it ("sft", "coh", "dpo") on frozen base weights.
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

from palm_rlhf.checkpoint import CheckpointError, load_json
from palm_rlhf.data.examples import step_rows
from palm_rlhf.functional.logprobs import shifted_log_probs
from palm_rlhf.functional.masked import masked_sum
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS
from palm_rlhf.model.palm import PaLM
from palm_rlhf.options import option
from palm_rlhf.train import sharding
from palm_rlhf.train.accelerator import loop_accelerator
from palm_rlhf.train.checkpointing import LoopSaver, resume_training
from palm_rlhf.train.loading import check_tokenizer, load_base
from palm_rlhf.train.loop import LoopParts, LossTerms, add_totals, means, reduce_terms, train_loop
from palm_rlhf.train.optim import cosine_schedule, make_optimizer
from palm_rlhf.train.progress import main_process_log
from palm_rlhf.train.run_options import LoopOptions, LoraOptions, default_for


@dataclass
class FinetuneConfig(LoopOptions, LoraOptions):
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
    max_len: int = option(
        256, "longest sequence in tokens; over-long prompts are cut from the left"
    )
    on_error: str = option(
        "raise", "a malformed or over-long record: stop, or skip it", choices=("raise", "skip")
    )
    lora_alpha: Optional[float] = option(None, "LoRA alpha; the update is scaled by alpha / r")
    lora_targets: tuple[str, ...] = option(
        DEFAULT_LORA_TARGETS, "projections given adapters (q k v o ff_in ff_out)"
    )
    merge_lora: bool = option(True, "fold the LoRA scope into the weights in the final checkpoint")
    base_scope: Optional[str] = option(None, "LoRA scope to fold in when the base carries several")
    batch_size: int = option(8, "GLOBAL batch size per micro-step (split over processes)")
    epochs: float = option(1.0, "passes over the training examples")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps")
    out_dir: Optional[str] = default_for("out_dir", "checkpoints/finetune")

    def __post_init__(self):
        super().__post_init__()
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        for name in ("max_len", "lora_r", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 or None, got {self.max_steps}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


class FinetuneMethod(NamedTuple):
    """What SFT, DPO or CoH brings to the fine-tuning loop."""

    name: str  # the stage it is: progress label and LoRA scope name
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


# ------------------------------------------------------------------- batches


def _my_slice(rows: list[int], accelerator) -> list[int]:
    """This process's contiguous share of a global batch."""
    shares = torch.tensor_split(torch.arange(len(rows)), accelerator.num_processes)
    return [rows[i] for i in shares[accelerator.process_index].tolist()]


def _to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate_method(
    method: FinetuneMethod, unwrapped: PaLM, accelerator, batch_size: int
) -> dict[str, float]:
    """Metrics over method.valid; each process takes a slice of every batch (exact, no
    repeats)."""
    if not method.valid:
        return {}
    was_training = unwrapped.training
    unwrapped.eval()
    totals: dict = {}
    for start in range(0, len(method.valid), batch_size):
        rows = list(range(start, min(start + batch_size, len(method.valid))))
        rows = _my_slice(rows, accelerator)
        weight = 1.0 if rows else 0.0  # a process left without rows joins the reduction with 0s
        batch = method.collate([method.valid[i] for i in (rows or [start])])
        with accelerator.autocast():
            terms = method.loss_fn(unwrapped, _to_device(batch, accelerator.device), unwrapped)
        add_totals(totals, reduce_terms(terms, accelerator, weight))
    unwrapped.train(was_training)
    return means(totals)


# ------------------------------------------------------------------- the run


def _check_resume(folder: Path, config: FinetuneConfig, name: str, tokenizer) -> None:
    saved = load_json(folder / "trainer_state.json")
    if saved.get("stage") != name:
        raise CheckpointError(f"{folder} is a {saved.get('stage')!r} checkpoint, not {name!r}")
    if saved.get("lora_merged"):
        raise CheckpointError(
            f"{folder} is a finished run (its LoRA scope is merged): nothing to resume; start "
            f"a new run with --base {folder}, or pass the --out-dir of the run to continue"
        )
    if saved.get("config", {}).get("use_lora") != config.use_lora:
        raise CheckpointError(
            f"{folder} was trained with use_lora={not config.use_lora}; pass the same"
        )
    check_tokenizer(folder, tokenizer, f"the base {config.base}")


def run_finetune(
    config: FinetuneConfig, build: Callable[[PaLM, Any], FinetuneMethod], name: str
) -> FinetuneResult:
    """Load the base, build the method (data, loss), train it, and checkpoint it.

    `build(model, tokenizer)` runs before LoRA is added and before Accelerate sees the model.
    """
    for required in ("base", "data"):
        if getattr(config, required) is None:
            raise ValueError(f"--{required.replace('_', '-')} is required for {name}")
    accelerator = loop_accelerator(config)
    log = main_process_log(accelerator)
    if config.batch_size < accelerator.num_processes:
        raise ValueError(f"batch_size {config.batch_size} < {accelerator.num_processes} processes")
    model, tokenizer = load_base(config.base, config.tokenizer, config.base_scope, log)
    model.checkpoint_activations = config.checkpoint_activations
    if model.config.max_seq_len is not None and config.max_len > model.config.max_seq_len:
        raise ValueError(
            f"max_len {config.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}"
        )
    method = build(model, tokenizer)
    if not method.train:
        raise ValueError(f"{config.data}: no training examples left after the split")
    log(f"{name}: {len(method.train)} training / {len(method.valid)} validation examples")

    scope = name if config.use_lora else None
    if scope is not None:
        model.requires_grad_(False)
        model.add_finetune_params(scope, config.lora_r, config.lora_alpha, config.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{name}: training {trainable:,} parameters ({'LoRA scope ' + scope if scope else 'all'})")
    per_step = config.batch_size * config.grad_accum
    num_steps = max(1, math.ceil(config.epochs * len(method.train) / per_step))
    num_steps = min(num_steps, config.max_steps or num_steps)
    # sharded (--fsdp): split before the optimizer is made, so it holds the shards
    template = sharding.shard(model, accelerator, config.fsdp)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.warmup_steps, num_steps, config.min_lr_ratio)
    model, optimizer, scheduler = sharding.prepare(accelerator, model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    for module in method.frozen:
        module.to(accelerator.device).eval().requires_grad_(False)

    resumed = resume_training(
        config.out_dir,
        config.resume,
        unwrapped,
        optimizer,
        scheduler,
        log,
        check=lambda folder: _check_resume(folder, config, name, tokenizer),
        template=template,
    )

    def micro_batches(step: int):
        rows = step_rows(step, per_step, len(method.train), config.seed)
        for micro in range(config.grad_accum):
            mine = _my_slice(
                rows[micro * config.batch_size : (micro + 1) * config.batch_size], accelerator
            )
            yield _to_device(method.collate([method.train[i] for i in mine]), accelerator.device)

    def loss(batch) -> LossTerms:
        with accelerator.autocast():  # the method may run models Accelerate did not wrap
            return method.loss_fn(model, batch, unwrapped)

    def evaluate() -> dict[str, float]:
        metrics = evaluate_method(method, unwrapped, accelerator, config.batch_size)
        sharding.settle(unwrapped)
        return {f"valid_{k}": v for k, v in metrics.items()}

    saver = LoopSaver(
        accelerator, config.out_dir, unwrapped, optimizer, scheduler, config.keep_last,
        tokenizer, template,
    )  # fmt: skip

    def checkpoint(step: int, finished: bool) -> Optional[Path]:
        if config.out_dir is None:
            return None
        merged = finished and scope is not None and config.merge_lora
        fold = (lambda module: module.merge_finetune_params(scope)) if merged else None
        if fold is not None and not sharding.is_sharded(unwrapped):
            fold(unwrapped)  # training is over: fold the adapters in
            fold = None  # (sharded: folded into the gathered copy the checkpoint is written from)
        trainer_state = {
            "config": asdict(config),
            "history": resumed.history,
            "stage": name,
            "lora_merged": merged,
            "num_steps": num_steps,
        }
        return saver.save(step, trainer_state, before_save=fold)

    longer = "--epochs or --max-steps"
    parts = LoopParts(name, num_steps, micro_batches, loss, evaluate, checkpoint, None, longer)
    result = train_loop(accelerator, model, optimizer, scheduler, config, parts, resumed)
    valid = {k.removeprefix("valid_"): v for k, v in result.valid.items()}
    return FinetuneResult(
        result.history, result.train, valid, result.checkpoint, unwrapped, tokenizer
    )


def token_loss_fn(scope: Optional[str], kinds: dict[int, str] | None = None):
    """A `FinetuneMethod.loss_fn`: masked next-token loss; `kinds` names per-kind metrics."""

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
