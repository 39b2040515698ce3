"""Pretraining a byte-level PaLM on enwik8 (or the embedded corpus): the loop behind train.py.

Phases per step: batch -> loss (reduced over processes) -> guard -> backward -> clip -> step;
now and then: validation loss and bits per character, a text sample, a checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from palm_rlhf.data.corpus import (
    RandomChunkDataset,
    SequentialChunkDataset,
    Splits,
    load_pretraining_data,
)
from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.options import option
from palm_rlhf.train import sharding
from palm_rlhf.train.history import HistoryLog
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
class PretrainConfig(RunOptions):
    data_dir: str = option("data", "folder with enwik8.gz, else the embedded corpus.txt.gz is used")
    tokenizer: Optional[str] = option(
        None, "sentencepiece tokenizer folder (palm-rlhf tokenizer); default: bytes"
    )
    out_dir: str = option("checkpoints/pretrain", "where step-N checkpoint folders are written")
    dim: int = option(256, "model width")
    depth: int = option(4, "number of parallel transformer blocks")
    heads: int = option(4, "query heads (one shared key/value head)")
    dim_head: int = option(64, "width of each attention head")
    ff_mult: int = option(4, "feed-forward expansion factor")
    seq_len: int = option(256, "training context length in bytes (also the model's max_seq_len)")
    batch_size: int = option(16, "GLOBAL batch size per optimizer step (split over processes)")
    grad_accum: int = option(1, "gradient accumulation steps (each a batch of batch_size)")
    num_steps: int = option(
        800, "optimizer steps (the default takes about 10 minutes on 2 CPU cores)"
    )
    max_minutes: Optional[float] = option(None, "stop (validate and save) after this many minutes")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(
        0.1, "final learning rate as a fraction of the peak (cosine decay)"
    )
    warmup_steps: int = option(100, "linear warm-up steps")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not norms)")
    max_norm: Optional[float] = option(1.0, "gradient clipping norm ('none' disables)")
    eval_every: int = option(250, "steps between validation runs")
    val_batches: int = option(8, "validation batches per run (the same batches every time)")
    generate_every: int = option(500, "steps between text samples (0 disables)")
    generate_length: int = option(200, "bytes to sample")
    save_every: int = option(500, "steps between checkpoints")
    resume: Optional[str] = option(None, "'latest' or a checkpoint folder to continue from")
    log_every: int = option(10, "steps between history entries")


class PretrainResult(NamedTuple):
    history: list  # dicts with step, loss, lr (and valid_loss, valid_bpc on validation steps)
    valid_loss: float
    valid_bpc: float
    checkpoint: Optional[Path]


def build_model(config: PretrainConfig, num_tokens: int = 256) -> PaLM:
    model = PaLM(
        num_tokens=num_tokens,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        dim_head=config.dim_head,
        ff_mult=config.ff_mult,
        max_seq_len=config.seq_len,
    )
    model.checkpoint_activations = config.checkpoint_activations
    return model


@torch.no_grad()
def validation_loss(model, loader, accelerator) -> float:
    """Mean next-token loss (nats) over the loader's batches, averaged across processes."""
    was_training = model.training
    model.eval()
    losses = [
        accelerator.reduce(model(batch, return_loss=True).detach(), "mean") for batch in loader
    ]
    model.train(was_training)
    return float(torch.stack(losses).mean())


def pretrain(config: PretrainConfig) -> PretrainResult:
    accelerator = stage_accelerator(config)
    log = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    splits, source = load_pretraining_data(config.data_dir)
    log(f"data: {source}; {accelerator.num_processes} process(es) on {accelerator.device}")
    tokenizer = ByteTokenizer() if config.tokenizer is None else load_tokenizer(config.tokenizer)
    # bits per character are bits per byte of text: a token-level loss is scaled by the
    # validation split's bytes per token (1 for the byte tokenizer)
    splits, bytes_per_token = tokenize_splits(splits, tokenizer)

    model = build_model(config, tokenizer.vocab_size)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {model.config}")
    # sharded (--fsdp): split before the optimizer is made, so it holds the shards
    template = sharding.shard(model, accelerator, config.fsdp)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = cosine_schedule(
        optimizer, config.warmup_steps, config.num_steps, config.min_lr_ratio
    )
    train_set = RandomChunkDataset(
        splits.train,
        config.seq_len,
        config.num_steps * config.batch_size * config.grad_accum,
        config.seed,
    )
    val_set = SequentialChunkDataset(splits.valid, config.seq_len)
    val_set = Subset(val_set, range(min(len(val_set), config.val_batches * config.batch_size)))
    # private generators: making a loader's iterator must not draw from the global RNG, or a
    # resumed run (RNG restored, then iterator made) would drift from the uninterrupted one
    train_loader = DataLoader(train_set, batch_size=config.batch_size, generator=torch.Generator())
    val_loader = DataLoader(val_set, batch_size=config.batch_size, generator=torch.Generator())
    model, optimizer, train_loader, val_loader, scheduler = sharding.prepare(
        accelerator, model, optimizer, train_loader, val_loader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    sharded = sharding.is_sharded(unwrapped)
    if config.fsdp:
        where = f"sharded over {accelerator.num_processes} processes"
        log(f"fsdp: {where if sharded else 'one process, nothing to shard'}")

    step, history, *_ = resume_training(
        config.out_dir, config.resume, unwrapped, optimizer, scheduler, log, template=template
    )
    if step:
        train_loader = accelerator.skip_first_batches(train_loader, step * config.grad_accum)

    def checkpoint() -> Optional[Path]:
        trainer_state = {"config": asdict(config), "history": history}
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
        )

    valid_loss, saved, start = math.nan, None, time.monotonic()
    bar = progress_bar(
        accelerator, config.progress, total=config.num_steps, initial=step, desc="pretrain"
    )
    model.train()
    batches = iter(train_loader)
    run_log = HistoryLog(accelerator, config.out_dir, history, "pretrain", asdict(config))
    with run_log, StopOnSignal() as stop:
        while step < config.num_steps:
            for _ in range(config.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(model):
                    loss = model(batch, return_loss=True)
                    mean_loss, _ = guarded_step(
                        accelerator,
                        loss,
                        step,
                        model.parameters(),
                        optimizer,
                        config.max_norm,
                        config.nan_policy,
                    )
            scheduler.step()
            step += 1
            bar.update(1)
            record = {"step": step, "loss": float(mean_loss), "lr": scheduler.get_last_lr()[0]}
            out_of_time = (
                config.max_minutes is not None
                and time.monotonic() - start > 60 * config.max_minutes
            )
            last = step == config.num_steps or out_of_time
            if step % config.eval_every == 0 or last:
                valid_loss = validation_loss(model, val_loader, accelerator)
                sharding.settle(unwrapped)
                record.update(
                    valid_loss=valid_loss, valid_bpc=valid_loss / math.log(2) / bytes_per_token
                )
                log(
                    f"step {step}: train loss {record['loss']:.4f}, valid loss "
                    f"{valid_loss:.4f}, bpc {record['valid_bpc']:.4f}"
                )
            if step % config.log_every == 0 or "valid_loss" in record:
                run_log.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            # a sharded model samples on every process together (each holds part of the weights)
            if (
                config.generate_every
                and (step % config.generate_every == 0 or last)
                and (accelerator.is_main_process or sharded)
            ):
                log(
                    sample_text(unwrapped, splits.valid, config, tokenizer, seed=config.seed + step)
                )
                sharding.settle(unwrapped)
            if step % config.save_every == 0 or last:
                saved = checkpoint()
            if out_of_time:
                log(f"stopping after {config.max_minutes} minutes at step {step}")
                break
            signum = stop.requested(accelerator)
            if signum and not last:  # Ctrl-C / SIGTERM: the step is done; save it and stop
                bar.close()
                if not (step % config.save_every == 0 or last):
                    saved = checkpoint()
                raise TrainingInterrupted("pretrain", step, saved, signum)
    bar.close()
    return PretrainResult(history, valid_loss, valid_loss / math.log(2) / bytes_per_token, saved)


def tokenize_splits(splits: Splits, tokenizer) -> tuple[Splits, float]:
    """Byte splits as the tokenizer's ids (unchanged for bytes), and the validation split's
    bytes per token."""
    if isinstance(tokenizer, ByteTokenizer):
        return splits, 1.0
    encoded = Splits(
        *(
            torch.tensor(
                tokenizer.encode(split.numpy().tobytes().decode("utf-8", "replace")),
                dtype=torch.long,
            )
            for split in splits
        )
    )
    return encoded, len(splits.valid) / max(1, len(encoded.valid))


def sample_text(
    model: PaLM, data: torch.Tensor, config: PretrainConfig, tokenizer, seed: int
) -> str:
    """Continue a stretch of validation text; a private generator keeps training RNG untouched."""
    prime_len = min(64, config.seq_len // 2)
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(len(data) - prime_len, (1,), generator=generator))
    prime = data[start : start + prime_len].long()[None].to(model.device)
    new = min(config.generate_length, config.seq_len - prime_len)
    tokens = sample_tokens(model, prime, new, temperature=1.0, top_k=25, generator=generator).tokens
    prime_text, sample_text = (
        tokenizer.decode(prime[0].tolist()),
        tokenizer.decode(tokens[0].tolist()),
    )
    return f"--- prime ---\n{prime_text}\n--- sample ---\n{sample_text}"
