"""Pretraining a byte-level PaLM on enwik8 (or the embedded corpus): the loop behind train.py.

The loop is `train/loop.py`'s; this stage brings the data (random windows of the training
split), the next-token loss, validation loss and bits per character, and a text sample now and
then.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Subset

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
from palm_rlhf.train.accelerator import loop_accelerator
from palm_rlhf.train.checkpointing import LoopSaver, resume_training
from palm_rlhf.train.loop import LoopParts, LossTerms, train_loop
from palm_rlhf.train.optim import cosine_schedule, make_optimizer
from palm_rlhf.train.progress import main_process_log
from palm_rlhf.train.run_options import LoopOptions, default_for


@dataclass
class PretrainConfig(LoopOptions):
    data_dir: str = option("data", "folder with enwik8.gz, else the embedded corpus.txt.gz is used")
    tokenizer: Optional[str] = option(
        None, "sentencepiece tokenizer folder (palm-rlhf tokenizer); default: bytes"
    )
    dim: int = option(256, "model width")
    depth: int = option(4, "number of parallel transformer blocks")
    heads: int = option(4, "query heads (one shared key/value head)")
    dim_head: int = option(64, "width of each attention head")
    ff_mult: int = option(4, "feed-forward expansion factor")
    init_std: Optional[float] = option(
        None,
        "draw every projection from normal(0, init_std), as Llama's initializer_range 0.02; "
        "default: PyTorch's init, as the reference",
    )
    seq_len: int = option(256, "training context length in bytes (also the model's max_seq_len)")
    batch_size: int = option(16, "GLOBAL batch size per micro-step (split over processes)")
    num_steps: int = option(800, "optimizer steps in the whole run")
    val_batches: int = option(8, "validation batches per run (the same batches every time)")
    generate_every: int = option(500, "steps between text samples (0 disables)")
    generate_length: int = option(200, "bytes to sample")
    out_dir: Optional[str] = default_for("out_dir", "checkpoints/pretrain")
    lr: float = default_for("lr", 2e-3)
    warmup_steps: int = default_for("warmup_steps", 100)
    weight_decay: float = default_for("weight_decay", 0.1)
    eval_every: int = default_for("eval_every", 250)
    save_every: int = default_for("save_every", 500)

    def __post_init__(self):
        super().__post_init__()
        for name in ("dim", "depth", "heads", "dim_head", "seq_len", "batch_size", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


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
        init_std=config.init_std,
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
    accelerator = loop_accelerator(config)
    log = main_process_log(accelerator)
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

    resumed = resume_training(
        config.out_dir, config.resume, unwrapped, optimizer, scheduler, log, template=template
    )
    if resumed.step:
        train_loader = accelerator.skip_first_batches(
            train_loader, resumed.step * config.grad_accum
        )
    batches = iter(train_loader)

    def evaluate() -> dict[str, float]:
        valid_loss = validation_loss(model, val_loader, accelerator)
        sharding.settle(unwrapped)
        return {"valid_loss": valid_loss, "valid_bpc": valid_loss / math.log(2) / bytes_per_token}

    def sample(step: int, last: bool) -> None:
        # a sharded model samples on every process together (each holds part of the weights)
        due = config.generate_every and (step % config.generate_every == 0 or last)
        if due and (accelerator.is_main_process or sharded):
            log(sample_text(unwrapped, splits.valid, config, tokenizer, seed=config.seed + step))
            sharding.settle(unwrapped)

    saver = LoopSaver(
        accelerator, config.out_dir, unwrapped, optimizer, scheduler, config.keep_last,
        tokenizer, template,
    )  # fmt: skip

    def checkpoint(step: int, finished: bool) -> Optional[Path]:
        return saver.save(step, {"config": asdict(config), "history": resumed.history})

    parts = LoopParts(
        "pretrain",
        config.num_steps,
        micro_batches=lambda step: (next(batches) for _ in range(config.grad_accum)),
        loss=lambda batch: LossTerms(model(batch, return_loss=True), 1.0),
        evaluate=evaluate,
        checkpoint=checkpoint,
        after_step=sample,
        length_flag="--num-steps",
    )
    result = train_loop(accelerator, model, optimizer, scheduler, config, parts, resumed)
    valid_loss = result.valid.get("valid_loss", math.nan)
    return PretrainResult(
        result.history, valid_loss, valid_loss / math.log(2) / bytes_per_token, result.checkpoint
    )


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
