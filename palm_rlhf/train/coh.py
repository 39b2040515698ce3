"""Chain of Hindsight (Liu, Sferrazza and Abbeel 2023): learn from feedback by reading it.

A comparison (prompt, chosen, rejected) becomes one or two sequences in which each answer is
preceded by a phrase saying what kind of answer it is:

    prompt \\n A good answer: <chosen> EOS \\n A bad answer: <rejected> EOS        (mode "pn")

and the model is trained with next-token loss on the ANSWER tokens only (each answer and the
EOS that ends it), never on the prompt or the feedback phrases: it learns to produce answers
that fit the phrase, so at inference time `coh_generate` conditions on the positive phrase.
Modes, as in the paper's ablations: "p" positive only, "n" negative only, "pn" and "np" both
answers in one order, "both" one sequence of each order. A ranked list contributes its best
(lowest rank) and worst response. Optionally a share of the training sequences is plain
pretraining text with loss on every token (the paper mixes in pretraining data to keep the
model from overfitting to the feedback format).

Every segment (prompt, feedback, answer) is encoded on its own, so the mask is exact for any
tokenizer; an over-long sequence loses prompt tokens from the left.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from beartype import beartype

from palm_rlhf.data.collate import left_pad_prompts
from palm_rlhf.data.examples import TokenExample, collate_token_examples, load_examples
from palm_rlhf.data.records import ComparisonRecord, read_comparisons
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.options import option
from palm_rlhf.train.finetune import (
    FinetuneConfig,
    FinetuneMethod,
    FinetuneResult,
    run_finetune,
    token_loss_fn,
)
from palm_rlhf.train.run_options import default_for

MODES = ("p", "n", "pn", "np", "both")
POSITIVE, NEGATIVE = "A good answer:", "A bad answer:"
HINDSIGHT, PRETRAINING = 0, 1  # TokenExample.kind


@dataclass
class CoHConfig(FinetuneConfig):
    data: Optional[str] = option(
        None, "comparison data: pairs, ranked lists or HH-RLHF", required=True
    )
    out_dir: Optional[str] = default_for("out_dir", "checkpoints/coh")
    mode: str = option("both", "which answers each sequence holds, in which order", choices=MODES)
    positive_phrase: str = option(POSITIVE, "feedback phrase before a preferred answer")
    negative_phrase: str = option(NEGATIVE, "feedback phrase before a dispreferred answer")
    separator: str = option("\n", "text before each feedback phrase; a typed \\n is a newline")
    ptx_file: Optional[str] = option(None, "pretraining text (.txt or .gz) mixed into training")
    ptx_ratio: float = option(0.0, "share of training sequences drawn from ptx_file, in [0, 1)")

    def __post_init__(self):
        super().__post_init__()
        # a shell passes "\n" as two characters; read it as the newline it stands for
        self.separator = self.separator.replace("\\n", "\n").replace("\\t", "\t")
        if not 0.0 <= self.ptx_ratio < 1.0:
            raise ValueError(f"ptx_ratio must be in [0, 1), got {self.ptx_ratio}")
        if self.ptx_ratio > 0 and self.ptx_file is None:
            raise ValueError("ptx_ratio > 0 needs a ptx_file of pretraining text")


def best_and_worst(record: ComparisonRecord) -> tuple[str, str]:
    """The preferred and dispreferred response: lowest and highest rank (first on ties)."""
    ranks = record.ranking
    return record.responses[ranks.index(min(ranks))], record.responses[ranks.index(max(ranks))]


def feedback_text(phrase: str, separator: str = "\n") -> str:
    """The text put before an answer: separator + phrase + one space."""
    return f"{separator}{phrase} "


@beartype
def hindsight_sequences(
    record: ComparisonRecord,
    tokenizer=None,
    mode: str = "both",
    positive_phrase: str = POSITIVE,
    negative_phrase: str = NEGATIVE,
    separator: str = "\n",
    max_len: Optional[int] = None,
) -> list[TokenExample]:
    """Hindsight sequences of one comparison, with loss_mask True exactly on answer tokens.

    Layout of one sequence ("pn"): [prompt][sep pos ][chosen][EOS][sep neg ][rejected][EOS];
    the mask covers [chosen][EOS] and [rejected][EOS]. "both" gives the "pn" and "np" sequences.
    `max_len` cuts the prompt from the left; ValueError when the rest alone does not fit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tokenizer = tokenizer or ByteTokenizer()
    chosen, rejected = best_and_worst(record)
    answers = {"p": (positive_phrase, chosen), "n": (negative_phrase, rejected)}
    orders = ("pn", "np") if mode == "both" else (mode,)
    prompt_ids = tokenizer.encode(record.prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to 0 tokens; at least 1 is required")
    sequences = []
    for order in orders:
        ids, mask = [], []
        for key in order:
            phrase, answer = answers[key]
            feedback = tokenizer.encode(feedback_text(phrase, separator))
            answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id]
            ids += feedback + answer_ids
            mask += [False] * len(feedback) + [True] * len(answer_ids)
        room = len(prompt_ids) if max_len is None else max_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the feedback and answers take {len(ids)} tokens, leaving no room for the "
                f"prompt within max_len={max_len}"
            )
        prompt = prompt_ids[-room:]
        sequences.append(TokenExample(prompt + ids, [False] * len(prompt) + mask, HINDSIGHT))
    return sequences


def pretraining_chunks(
    path, tokenizer, num_chunks: int, length: int, seed: int, max_chars: int = 16_000_000
) -> list[TokenExample]:
    """`num_chunks` random windows of `length` tokens of a text file (its first `max_chars`
    characters), with loss on every token but the first."""
    raw = Path(path).read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "replace")
    ids = tokenizer.encode(text[:max_chars].replace("\x00", ""))
    if len(ids) < length:
        raise ValueError(f"{path} encodes to {len(ids)} tokens, fewer than one chunk of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - length + 1, (num_chunks,), generator=generator).tolist()
    return [
        TokenExample(ids[s : s + length], [False] + [True] * (length - 1), PRETRAINING)
        for s in starts
    ]


@beartype
def train_coh(config: CoHConfig) -> FinetuneResult:
    """Chain-of-Hindsight fine-tuning of `config.base` on comparison data (+ optional ptx)."""

    def build(model, tokenizer) -> FinetuneMethod:
        def encode(record: ComparisonRecord) -> list[TokenExample]:
            return hindsight_sequences(
                record,
                tokenizer,
                config.mode,
                config.positive_phrase,
                config.negative_phrase,
                config.separator,
                config.max_len,
            )

        train, valid = load_examples(config, read_comparisons, encode, "comparison")
        if config.ptx_ratio > 0:
            count = round(len(train) * config.ptx_ratio / (1 - config.ptx_ratio))
            train = train + pretraining_chunks(
                config.ptx_file, tokenizer, max(count, 1), config.max_len, config.seed
            )
        mixed = config.ptx_ratio > 0  # then the loss is reported for each kind too
        metrics = {HINDSIGHT: "answer_loss", PRETRAINING: "ptx_loss"} if mixed else {}
        scope = "coh" if config.use_lora else None
        return FinetuneMethod(
            "coh",
            train,
            valid,
            lambda b: collate_token_examples(b, tokenizer.pad_id),
            token_loss_fn(scope, metrics),
        )

    return run_finetune(config, build, "coh")


@torch.no_grad()
@beartype
def coh_generate(
    model: PaLM,
    tokenizer,
    prompts: Union[str, list[str]],
    max_new_tokens: int = 64,
    positive_phrase: str = POSITIVE,
    separator: str = "\n",
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    finetune_scope: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> Union[str, list[str]]:
    """Answer prompts as the model answers after the positive phrase: sample after
    prompt + separator + phrase + " " until EOS or max_new_tokens; returns the decoded answers.

    Prompts are cut from the left to fit the model's max_seq_len with the new tokens.
    """
    single = isinstance(prompts, str)
    feedback = tokenizer.encode(feedback_text(positive_phrase, separator))
    limit = model.config.max_seq_len
    room = None if limit is None else limit - max_new_tokens - len(feedback)
    if room is not None and room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt")
    contexts = []
    for prompt in [prompts] if single else prompts:
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("a prompt encodes to 0 tokens; at least 1 is required")
        contexts.append((ids if room is None else ids[-room:]) + feedback)
    tokens, mask = left_pad_prompts(contexts, tokenizer.pad_id)
    samples = sample_tokens(
        model,
        tokens.to(model.device),
        max_new_tokens,
        prompt_mask=mask.to(model.device),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token=tokenizer.eos_id,
        pad_value=tokenizer.pad_id,
        finetune_scope=finetune_scope,
        generator=generator,
    )
    answers = []
    for row, keep in zip(samples.tokens.tolist(), samples.mask.tolist()):
        ids = [t for t, k in zip(row, keep) if k]
        answers.append(tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids))
    return answers[0] if single else answers


def run_coh(config: CoHConfig) -> FinetuneResult:
    """`palm-rlhf coh`: train, then print one summary line."""
    result = train_coh(config)
    valid = f", valid answer loss {result.valid['loss']:.4f}" if result.valid else ""
    print(f"coh: train loss {result.train['loss']:.4f}{valid}; checkpoint {result.checkpoint}")
    return result
