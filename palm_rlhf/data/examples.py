"""Data for the fine-tuning stages: encoded examples, the held-out split, padding, the order.

Records come from the JSON Lines readers of `records.py` (which report malformed lines with
file and line); here each record is encoded into examples by a stage-specific function, and a
record that cannot be encoded (a response longer than max_len, say) is reported the same way.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from palm_rlhf.data.collate import encode_prompt_response_cut, pad_sequences
from palm_rlhf.data.records import RecordError, RecordWarning, iter_jsonl, skip_summary


class TokenExample(NamedTuple):
    """One training sequence: ids, which positions are trained (loss_mask) and its kind."""

    ids: list[int]
    loss_mask: list[bool]  # True where the token is a target of the loss
    kind: int = 0  # a stage's label for metrics (CoH: 0 hindsight, 1 pretraining text)
    prompt_cut: int = 0  # prompt tokens cut from the left to fit max_len


def _prompt_cut(item) -> int:
    """The most prompt tokens any example of an encoded record lost (pairs included)."""
    if isinstance(item, TokenExample):
        return item.prompt_cut
    if isinstance(item, (list, tuple)):
        return max((_prompt_cut(part) for part in item), default=0)
    return 0


def _record_lines(path, count: int) -> Optional[list[int]]:
    """The line number of each of the `count` records read from `path`, or None where the
    reader skipped lines (then a record's index no longer tells its line)."""
    try:
        lines = [line for line, _ in iter_jsonl(path)]
    except RecordError:
        return None
    return lines if len(lines) == count else None


def encode_file(
    path, records: list, encode: Callable[[Any], list], on_error: str, what: str
) -> list[list]:
    """Encode each record into a list of examples; a ValueError (e.g. an over-long response)
    names the file and line of its record, or skips it (on_error="skip") with one warning
    counting them and naming the first few `path:line`s."""
    groups, skipped, lines, cut = [], [], None, []
    for index, record in enumerate(records):
        try:
            groups.append(encode(record))
            lost = _prompt_cut(groups[-1])
            if lost:
                cut.append((index, lost))
        except ValueError as error:
            lines = lines or _record_lines(path, len(records))
            where = f"{path}:{lines[index]}" if lines else f"{path} record {index + 1}"
            if on_error == "raise":
                raise RecordError(f"{where}: {error}") from None
            skipped.append(f"{where}: {error}")
    if skipped:
        summary = skip_summary(skipped, what, path, " that could not be encoded")
        warnings.warn(summary, RecordWarning, stacklevel=2)
    if cut:  # documented behaviour, but a silent one would train on damaged prompts
        lines = lines or _record_lines(path, len(records))
        first = f"{path}:{lines[cut[0][0]]}" if lines else f"{path} record {cut[0][0] + 1}"
        warnings.warn(
            f"{len(cut)} of {len(records)} {what} records in {path} had their prompt cut from "
            f"the left to fit max_len (up to {max(c for _, c in cut)} tokens; the first at "
            f"{first}): raise max_len to train on whole prompts",
            RecordWarning,
            stacklevel=2,
        )
    if not groups:
        raise RecordError(f"{path}: no {what} record could be encoded")
    return groups


def split_groups(groups: list[list], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out int(len * fraction) whole records (seeded), flatten each side to examples."""
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[: int(len(groups) * fraction)])
    train = [ex for i, group in enumerate(groups) if i not in held for ex in group]
    valid = [ex for i, group in enumerate(groups) if i in held for ex in group]
    return train, valid


def load_examples(config, read: Callable, encode: Callable, what: str):
    """(train, valid) examples of a FinetuneConfig's data and valid_data (or held-out share)."""
    train_groups = encode_file(
        config.data,
        read(config.data, on_error=config.on_error),
        encode,
        config.on_error,
        what,
    )
    if config.valid_data is None:
        return split_groups(train_groups, config.valid_fraction, config.seed)
    valid_records = read(config.valid_data, on_error=config.on_error)
    valid_groups = encode_file(config.valid_data, valid_records, encode, config.on_error, what)
    return [ex for g in train_groups for ex in g], [ex for g in valid_groups for ex in g]


def collate_token_examples(examples: list[TokenExample], pad_id: int) -> dict[str, Tensor]:
    """Right-pad examples: tokens, mask (real ids), loss_mask (targets) (b, n); kind (b,)."""
    tokens, mask = pad_sequences([ex.ids for ex in examples], pad_id)
    loss_mask, _ = pad_sequences([[int(m) for m in ex.loss_mask] for ex in examples], 0)
    kind = torch.tensor([ex.kind for ex in examples], dtype=torch.long)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask.bool() & mask, "kind": kind}


@lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=generator).tolist())


def step_rows(step: int, per_step: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: epochs of seeded permutations, end to end."""
    positions = range(step * per_step, (step + 1) * per_step)
    return [
        _epoch_order(num_examples, seed, p // num_examples)[p % num_examples] for p in positions
    ]


def sft_example(tokenizer, prompt: str, response: str, max_len: int) -> TokenExample:
    """prompt + response + EOS with the loss on response and EOS (prompt cut from the left)."""
    ids, num_prompt, cut = encode_prompt_response_cut(tokenizer, prompt, response, max_len)
    return TokenExample(ids, [False] * num_prompt + [True] * (len(ids) - num_prompt), 0, cut)
