"""Training a RewardModel on ranked comparisons or on ratings: the loop behind `palm-rlhf reward`.

Phases per step: batch -> scores (one forward per response) -> loss (ranking loss over all
K-choose-2 pairs, or cross-entropy / MSE on ratings) -> guard -> backward -> clip -> step;
now and then: held-out accuracy (+ MAE of the expected rating for ratings) and a checkpoint.

Ratings: a file's human 1..K `rating` r trains class index r - 1 (RewardModel's labels are
0..K-1, as in the reference), so a binned model's reward, the expected class index, is the
expected rating minus one (the log says so once).

Data: the file's records in order; the first `num_train` (else all but the last
`valid_fraction`) train, the rest are held out, unless `valid_data` names a held-out file. The
training stream is the records reshuffled every pass with `seed`, so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from palm_rlhf.checkpoint import find_weights
from palm_rlhf.data.collate import (
    collate_comparisons,
    collate_ratings,
    encode_prompt_response,
    encode_prompt_response_cut,
)
from palm_rlhf.data.records import read_comparisons, read_ratings
from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.options import option
from palm_rlhf.train import sharding
from palm_rlhf.train.accelerator import loop_accelerator
from palm_rlhf.train.checkpointing import LoopSaver, resume_training
from palm_rlhf.train.loading import load_base
from palm_rlhf.train.loop import LoopParts, LossTerms, train_loop
from palm_rlhf.train.optim import cosine_schedule, make_optimizer
from palm_rlhf.train.progress import main_process_log
from palm_rlhf.train.reward_metrics import batch_loss, evaluate_reward
from palm_rlhf.train.run_options import LoopOptions, LoraOptions, default_for

KINDS = ("comparisons", "ratings")


@dataclass
class RewardTrainConfig(LoopOptions, LoraOptions):
    data: str = option(
        "", "JSON Lines file of comparisons or ratings (.jsonl or .jsonl.gz)", required=True
    )
    kind: str = option("comparisons", "what the file holds", choices=KINDS)
    valid_data: Optional[str] = option(None, "held-out file (default: split --data, see below)")
    num_train: Optional[int] = option(None, "train on the first N records; the rest are held out")
    valid_fraction: float = option(0.1, "without --num-train: hold out this last fraction")
    num_valid: Optional[int] = option(None, "use at most this many held-out records")
    num_bins: Optional[int] = option(
        None,
        "K rating bins (ratings 1..K train class indices 0..K-1; reward = expected class "
        "index); 0 = scalar head; default 5 for ratings, 0 for comparisons",
    )
    base: Optional[str] = option(
        None,
        "pretrained PaLM: .safetensors file, checkpoint folder or train.py out_dir (its "
        "latest); none = random PaLM of these sizes:",
    )
    tokenizer: Optional[str] = option(None, "tokenizer folder (default: beside --base, else bytes)")
    dim: int = option(64, "model width (random base only)")
    depth: int = option(2, "blocks (random base only)")
    heads: int = option(4, "query heads (random base only)")
    dim_head: int = option(16, "head width (random base only)")
    max_len: int = option(256, "longest sequence in tokens; prompts are cut from the left")
    long_responses: str = option(
        "skip",
        "a response longer than max_len allows: drop its record, cut its end, or stop",
        choices=("skip", "truncate", "raise"),
    )
    batch_size: int = option(16, "GLOBAL records per step (split over processes)")
    eval_batch_size: Optional[int] = option(None, "records per held-out batch (default batch_size)")
    epochs: float = option(1.0, "passes over the training records")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps")
    margin: float = option(0.0, "ranking loss margin: better responses must win by this much")
    use_lora: bool = default_for("use_lora", True)
    pooling: str = option(
        "last", "score from the last token or the response mean", choices=("last", "mean")
    )
    dropout: float = option(0.1, "dropout on the pooled features before the head")
    on_error: str = option(
        "raise", "malformed records: stop, or skip with a warning", choices=("raise", "skip")
    )
    out_dir: Optional[str] = default_for("out_dir", "checkpoints/reward")
    lr: float = default_for("lr", 5e-4)
    save_every: int = default_for("save_every", 0)
    eval_every: int = default_for("eval_every", 0)

    def __post_init__(self):
        super().__post_init__()
        if not self.data or self.kind not in KINDS:
            raise ValueError(f"data (a JSON Lines file) is required and kind one of {KINDS}")
        if self.num_bins is None:
            self.num_bins = 5 if self.kind == "ratings" else 0
        if self.num_bins == 1 or self.num_bins < 0:
            raise ValueError(f"num_bins must be 0 (scalar) or >= 2, got {self.num_bins}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        for name in ("batch_size", "max_len", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


class RewardTrainResult(NamedTuple):
    model: RewardModel  # unwrapped, on the training device
    history: list  # dicts: step, loss, lr (+ valid_* on evaluation steps)
    metrics: dict  # final held-out metrics: valid_accuracy, valid_loss (+ valid_mae), valid_count
    checkpoint: Optional[Path]
    num_train: int
    num_valid: int


# ----------------------------------------------------------------------------- data


def _fit_response(tokenizer, prompt: str, response: str, max_len: int) -> str:
    """The longest prefix of `response` that, with its EOS and min(len(prompt), max_len // 4)
    prompt tokens, fits in max_len tokens."""
    budget = max_len - 1 - min(len(tokenizer.encode(prompt)), max_len // 4)
    low, high = 0, len(response)  # binary search on characters: encodings grow with prefixes
    while low < high:
        middle = (low + high + 1) // 2
        fits = len(tokenizer.encode(response[:middle])) <= budget
        low, high = (middle, high) if fits else (low, middle - 1)
    return response[:low]


def fit_records(records: list, tokenizer, max_len: int, policy: str, kind: str) -> tuple[list, int]:
    """Apply the `long_responses` policy; returns (records, number skipped or truncated)."""
    kept, changed = [], 0
    for index, record in enumerate(records):
        responses = record.responses if kind == "comparisons" else [record.response]
        fitted = []
        for response in responses:
            try:
                encode_prompt_response(tokenizer, record.prompt, response, max_len)
                fitted.append(response)
            except ValueError as err:
                if policy == "raise":
                    raise ValueError(f"{kind} record {index}: {err}") from None
                cut = policy == "truncate"
                fitted.append(
                    _fit_response(tokenizer, record.prompt, response, max_len) if cut else None
                )
        if any(r is None or r != o for r, o in zip(fitted, responses)):
            changed += 1
            if policy == "skip":
                continue
        fields = {"responses": fitted} if kind == "comparisons" else {"response": fitted[0]}
        kept.append(record._replace(**fields))
    return kept, changed


def prompts_cut(records: list, tokenizer, max_len: int, kind: str) -> list[int]:
    """Per (fitted) record that loses prompt tokens from the left to fit, the most it loses."""
    cut = []
    for record in records:
        responses = record.responses if kind == "comparisons" else [record.response]
        lost = max(
            encode_prompt_response_cut(tokenizer, record.prompt, r, max_len)[2] for r in responses
        )
        if lost:
            cut.append(lost)
    return cut


def split_records(config: RewardTrainConfig, tokenizer) -> tuple[list, list]:
    """(train, valid) records, read, split as the module docstring says, and fitted to max_len."""

    def read(path):
        if config.kind == "comparisons":
            return read_comparisons(path, on_error=config.on_error)
        return read_ratings(path, num_bins=config.num_bins or None, on_error=config.on_error)

    records = read(config.data)
    if config.valid_data is not None:
        train, valid = records[: config.num_train], read(config.valid_data)
    elif config.num_train is not None:
        train, valid = records[: config.num_train], records[config.num_train :]
    else:
        num_valid = math.ceil(config.valid_fraction * len(records))
        train, valid = records[: len(records) - num_valid], records[len(records) - num_valid :]
    valid = valid[: config.num_valid] if config.num_valid is not None else valid
    fitted = []
    for name, part in (("training", train), ("held-out", valid)):
        part, changed = fit_records(
            part, tokenizer, config.max_len, config.long_responses, config.kind
        )
        if changed:
            what = "skipped" if config.long_responses == "skip" else "truncated"
            problem = f"a response is longer than max_len={config.max_len}"
            warnings.warn(f"{changed} {name} record(s) {what}: {problem}", stacklevel=2)
        cut = prompts_cut(part, tokenizer, config.max_len, config.kind)
        if cut:  # documented, but a silent cut would score damaged prompts
            warnings.warn(
                f"{len(cut)} of {len(part)} {name} record(s) had their prompt cut from the left "
                f"to fit max_len={config.max_len} (by up to {max(cut)} tokens): raise --max-len "
                "to score whole prompts",
                stacklevel=2,
            )
        fitted.append(part)
    if not fitted[0]:
        raise ValueError(f"no training records left in {config.data} (raise --max-len?)")
    return fitted[0], fitted[1]


def _collate(records: list, tokenizer, max_len: int, kind: str):
    fn = collate_comparisons if kind == "comparisons" else collate_ratings
    return fn(tokenizer, list(records), max_len)


def training_stream(records: list, num_records: int, seed: int) -> list:
    """`num_records` records: passes over `records`, each in a fresh seeded order."""
    stream, epoch = [], 0
    while len(stream) < num_records:
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(len(records), generator=generator)
        stream += [records[i] for i in order.tolist()]
        epoch += 1
    return stream[:num_records]


# ----------------------------------------------------------------------------- model


def reward_base(config: RewardTrainConfig):
    """(PaLM, tokenizer, base weights path) from `base`. Without one, a random PaLM is saved once
    as out_dir/base-palm.safetensors (reused on resume) so adapter checkpoints name a real base."""
    if config.base is not None:
        # the same loader as every stage: latest of a run folder, LoRA scopes folded, and the
        # tokenizer stored with the weights (a different --tokenizer is refused)
        palm, tokenizer = load_base(config.base, config.tokenizer, log=lambda *_: None)
        path = find_weights(config.base)
    else:
        palm = PaLM(
            num_tokens=ByteTokenizer.vocab_size,
            dim=config.dim,
            depth=config.depth,
            heads=config.heads,
            dim_head=config.dim_head,
            max_seq_len=config.max_len,
        )
        path = None
        if config.out_dir is not None:
            path = Path(config.out_dir) / "base-palm.safetensors"
            if config.resume and path.is_file():
                palm = PaLM.from_pretrained(path)
            elif PartialState().is_main_process:
                palm.save(path)
            PartialState().wait_for_everyone()
        tokenizer = (
            load_tokenizer(config.tokenizer) if config.tokenizer is not None else ByteTokenizer()
        )
    limit = palm.config.max_seq_len
    if tokenizer.vocab_size > palm.num_tokens or (limit is not None and config.max_len > limit):
        raise ValueError(
            f"the PaLM (num_tokens={palm.num_tokens}, max_seq_len={limit}) cannot read "
            f"{tokenizer.vocab_size}-id tokens or max_len={config.max_len}"
        )
    return palm, tokenizer, path


# ----------------------------------------------------------------------------- the loop


def train_reward_model(config: RewardTrainConfig) -> RewardTrainResult:
    """Train a reward model as `config` says; see the module docstring for data and phases."""
    accelerator = loop_accelerator(config)
    log = main_process_log(accelerator)
    palm, tokenizer, base_path = reward_base(config)
    palm.checkpoint_activations = config.checkpoint_activations  # a copy made below keeps it
    train, valid = split_records(config, tokenizer)
    model = RewardModel(
        palm,
        dropout=config.dropout,
        num_binned_output=config.num_bins,
        use_lora=config.use_lora,
        lora_r=config.lora_r,
        pooling=config.pooling,
    )
    model.base_checkpoint = str(base_path.resolve()) if base_path is not None else None
    wanted = {id(p) for p in model.trainable_parameters()}
    for param in model.parameters():  # the trainer owns this model: freeze all it does not train
        param.requires_grad_(id(param) in wanted)
    # sharded (--fsdp): split before the optimizer is made; sharding replaces the parameters
    template = sharding.shard(model, accelerator, config.fsdp)
    trainable = model.trainable_parameters()
    trained, total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    log(
        f"reward model: {len(train)} training / {len(valid)} held-out {config.kind} records, "
        f"{trained:,} of {total:,} parameters trained"
    )
    if config.kind == "ratings":
        log(
            "ratings 1..K in the file train class indices 0..K-1 (label = rating - 1); the "
            "reward model scores on that 0..K-1 scale"
        )

    per_step = config.batch_size * config.grad_accum
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(train) / per_step))
    optimizer = make_optimizer(trainable, config.lr, config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    collate = partial(_collate, tokenizer=tokenizer, max_len=config.max_len, kind=config.kind)
    stream = training_stream(train, total_steps * per_step, config.seed)
    # a private generator: making a loader's iterator must not draw from the global RNG, or a
    # resumed run (which makes its iterator after restoring the RNG) would drift from dropout's
    loader_rng = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        stream, batch_size=config.batch_size, collate_fn=collate, generator=loader_rng
    )
    eval_size = config.eval_batch_size or config.batch_size
    valid_loader = DataLoader(valid, batch_size=eval_size, collate_fn=collate) if valid else None
    model, optimizer, train_loader, scheduler = sharding.prepare(
        accelerator, model, optimizer, train_loader, scheduler
    )
    valid_loader = accelerator.prepare(valid_loader) if valid_loader is not None else None
    unwrapped = accelerator.unwrap_model(model)

    resumed = resume_training(
        config.out_dir, config.resume, unwrapped, optimizer, scheduler, log, template=template
    )
    if resumed.step:
        skipped = resumed.step * config.grad_accum
        train_loader = accelerator.skip_first_batches(train_loader, skipped)
    batches = iter(train_loader)

    saver = LoopSaver(
        accelerator, config.out_dir, unwrapped, optimizer, scheduler, config.keep_last,
        tokenizer, template,
    )  # fmt: skip

    def checkpoint(step: int, finished: bool) -> Optional[Path]:
        return saver.save(step, {"config": asdict(config), "history": resumed.history})

    parts = LoopParts(
        "reward",
        total_steps,
        micro_batches=lambda step: (next(batches) for _ in range(config.grad_accum)),
        # `batch_loss` looked up at each call (a test may wrap it)
        loss=lambda batch: LossTerms(batch_loss(model, batch, config.kind, config.margin), 1.0),
        evaluate=lambda: evaluate_reward(
            model, valid_loader, accelerator, config.kind, config.margin
        ),
        checkpoint=checkpoint,
        length_flag="--max-steps or --epochs",
    )
    result = train_loop(accelerator, model, optimizer, scheduler, config, parts, resumed)
    return RewardTrainResult(
        unwrapped, result.history, result.valid, result.checkpoint, len(train), len(valid)
    )


# ----------------------------------------------------------------------------- command line


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def summary_line(result: RewardTrainResult, kind: str) -> str:
    """One line: records trained on and held out (and, for comparisons, the ranked pairs the
    held-out accuracy is a share of), then the held-out metrics."""
    metrics = dict(result.metrics)
    pairs = metrics.pop("valid_count", None)  # pairs (comparisons) or records (ratings)
    held_out = _counted(result.num_valid, "record")
    if kind == "comparisons" and pairs is not None:
        held_out += f" ({_counted(pairs, 'ranked pair')})"
    shown = ", ".join(f"{k.removeprefix('valid_')} {v:.4f}" for k, v in metrics.items())
    return (
        f"reward: trained on {_counted(result.num_train, 'record')}; held out "
        f"{held_out}: {shown or 'no held-out metrics'}"
    )


def run_reward(config: RewardTrainConfig) -> RewardTrainResult:
    """`palm-rlhf reward`: train, then print the held-out metrics and the checkpoint."""
    result = train_reward_model(config)
    if PartialState().is_main_process:
        print(summary_line(result, config.kind))
        if result.checkpoint is not None:
            print(f"checkpoint: {result.checkpoint}")
    return result
