"""Supervised fine-tuning (InstructGPT, Ouyang et al. 2022, step 1): prompt/response pairs,
next-token loss on the response tokens and its EOS only, the prompt being context.

    loss = - sum_{t in response} log p(x_t | x_<t) / |response tokens|    (over the batch)

Examples are padded one to a row, or packed several to a row (`pack`): packed examples follow
each other after their EOS and attend to earlier ones in the row, as in GPT-style packing; the
loss still covers only response tokens. The training loop is `finetune.run_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from beartype import beartype
from torch import Tensor

from palm_rlhf.data.examples import (
    TokenExample,
    collate_token_examples,
    load_examples,
    sft_example,
)
from palm_rlhf.data.records import SFTRecord, read_sft
from palm_rlhf.functional.logprobs import shifted_log_probs
from palm_rlhf.functional.masked import masked_sum
from palm_rlhf.options import option
from palm_rlhf.train.finetune import (
    FinetuneConfig,
    FinetuneResult,
    Stage,
    run_stage,
    token_loss_fn,
)


@dataclass
class SFTConfig(FinetuneConfig):
    data: Optional[str] = option(
        None, 'SFT data: {"prompt": ..., "response": ...} lines', required=True
    )
    out_dir: str = option("checkpoints/sft", "where step-N checkpoint folders are written")
    pack: bool = option(False, "pack several examples into each max_len row instead of padding")


# ------------------------------------------------------------------------- the loss


def _check_loss_mask(tokens: Tensor, loss_mask: Tensor) -> None:
    if loss_mask.dtype != torch.bool or loss_mask.shape != tokens.shape:
        raise ValueError(
            f"loss_mask must be bool of shape {tuple(tokens.shape)}, "
            f"got {loss_mask.dtype} {tuple(loss_mask.shape)}"
        )
    if bool(loss_mask[:, 0].any()):
        raise ValueError(
            "loss_mask[:, 0] must be False: the first token has no prefix to predict it"
        )


@beartype
def response_loss_terms(logits: Tensor, tokens: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of -log p over target tokens, number of target tokens), both scalars.

    logits (b, n, v); tokens (b, n); loss_mask (b, n) bool, True on the tokens to predict.
    """
    _check_loss_mask(tokens, loss_mask)
    targets = loss_mask[:, 1:]
    return -masked_sum(shifted_log_probs(logits, tokens), targets), targets.sum()


@beartype
def response_loss(logits: Tensor, tokens: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the tokens where loss_mask is True (nats).

        loss = - sum_{b,t: mask[b,t]} log softmax(logits[b, t-1])[tokens[b, t]] / sum(mask)

    Shapes: logits (b, n, v), tokens (b, n), loss_mask (b, n) bool with loss_mask[:, 0] False.
    """
    total, count = response_loss_terms(logits, tokens, loss_mask)
    return total / count.clamp(min=1)


# ------------------------------------------------------------------------- the examples


def pack_examples(examples: list[TokenExample], max_len: int) -> list[TokenExample]:
    """Greedily concatenate examples, in order, into rows of at most max_len tokens."""
    rows: list[TokenExample] = []
    ids: list[int] = []
    mask: list[bool] = []
    for example in examples:
        if ids and len(ids) + len(example.ids) > max_len:
            rows.append(TokenExample(ids, mask))
            ids, mask = [], []
        ids, mask = ids + example.ids, mask + example.loss_mask
    if ids:
        rows.append(TokenExample(ids, mask))
    return rows


# ------------------------------------------------------------------------- the stage


@beartype
def train_sft(config: SFTConfig) -> FinetuneResult:
    """Fine-tune `config.base` on `config.data`; returns history, metrics, checkpoint."""

    def build(model, tokenizer) -> Stage:
        def encode(record: SFTRecord) -> list[TokenExample]:
            return [sft_example(tokenizer, record.prompt, record.response, config.max_len)]

        train, valid = load_examples(config, read_sft, encode, "SFT")
        if config.pack:
            train, valid = (
                pack_examples(train, config.max_len),
                pack_examples(valid, config.max_len),
            )
        scope = "sft" if config.use_lora else None
        return Stage(
            "sft",
            train,
            valid,
            lambda b: collate_token_examples(b, tokenizer.pad_id),
            token_loss_fn(scope),
        )

    return run_stage(config, build, "sft")


def run_sft(config: SFTConfig) -> FinetuneResult:
    """`palm-rlhf sft`: train, then print one summary line."""
    result = train_sft(config)
    valid = f", valid loss {result.valid['loss']:.4f}" if result.valid else ""
    print(f"sft: train loss {result.train['loss']:.4f}{valid}; checkpoint {result.checkpoint}")
    return result
