"""Where rollouts start: the prompts (token ids, texts or a file, validated once and kept
left-padded in a `PromptBank`) and the pretraining text PPO-ptx mixes in (`PtxData`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from palm_rlhf.data.collate import left_pad_prompts

PromptIds = Union[Tensor, Sequence[Union[Tensor, Sequence[int]]]]


def _strip_padding(row: Tensor, pad_value: int) -> Tensor:
    """Drop every `pad_value` of a 1-D row of a padded (N, n) tensor, wherever it stands, as
    the reference project does (`state[state != pad_value]`). Prompts that must keep such ids
    are passed as a list, taken exactly as given."""
    return row[row != pad_value]


def _encode_texts(texts: list[str], tokenizer, where: Callable[[int], str]) -> list[list[int]]:
    """Encode with a `Tokenizer` (`encode(str) -> ids`) or a reference-style callable."""
    if hasattr(tokenizer, "encode"):
        encoded = []
        for i, text in enumerate(texts):
            try:
                encoded.append(list(tokenizer.encode(text)))
            except ValueError as err:
                raise ValueError(f"{where(i)}: {err}") from None
        return encoded
    if not callable(tokenizer):
        raise TypeError("tokenizer must have an encode(str) method or be callable on a list")
    out = tokenizer(texts)  # the reference project's convention: list[str] -> ids
    return [list(map(int, row)) for row in (out.tolist() if isinstance(out, Tensor) else out)]


def load_prompts(
    num_tokens: int,
    prompt_token_ids: Optional[PromptIds] = None,
    prompts: Optional[Sequence[str]] = None,
    prompts_path: Optional[Union[str, Path]] = None,
    tokenizer=None,
    pad_value: int = 0,
) -> list[Tensor]:
    """The prompts as a list of 1-D LongTensors, from exactly one of three sources.

    - `prompt_token_ids`: a list of 1-D id tensors (or id lists), taken exactly as given, or
      a padded (N, n) tensor, whose rows lose their leading and trailing `pad_value` runs;
    - `prompts`: a list of strings, encoded with `tokenizer`;
    - `prompts_path`: a text file with one prompt a line (blank lines skipped), encoded with
      `tokenizer`; a line that cannot be encoded is reported with file and line number.
    """
    given = sum(x is not None for x in (prompt_token_ids, prompts, prompts_path))
    if given != 1:
        raise ValueError(
            f"pass exactly one of prompt_token_ids, prompts or prompts_path ({given} were given)"
        )
    if prompt_token_ids is not None:
        if isinstance(prompt_token_ids, Tensor):
            if prompt_token_ids.dim() != 2:
                raise ValueError(
                    "prompt_token_ids as a tensor must be padded (N, n), "
                    f"got shape {tuple(prompt_token_ids.shape)}; pass a list for ragged prompts"
                )
            rows = [_strip_padding(row, pad_value) for row in prompt_token_ids]
            names = [f"prompt_token_ids[{i}]" for i in range(len(rows))]
        else:
            rows = [torch.as_tensor(row) for row in prompt_token_ids]
            names = [f"prompt_token_ids[{i}]" for i in range(len(rows))]
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to encode text prompts")
        if prompts is not None:
            texts = list(prompts)
            names = [f"prompts[{i}]" for i in range(len(texts))]
        else:
            path = Path(prompts_path)
            if not path.is_file():
                raise FileNotFoundError(f"prompts_path {path} does not exist")
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
            texts = [line for _, line in kept]
            names = [f"{path}:{number}" for number, _ in kept]
        encoded = _encode_texts(texts, tokenizer, lambda i: names[i])
        rows = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
    if not rows:
        raise ValueError("no prompts were given")
    for row, name in zip(rows, names):
        if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D tensor of integer token ids")
        if row.numel() == 0:
            raise ValueError(f"{name} is empty (after removing padding {pad_value})")
        bad = (row < 0) | (row >= num_tokens)
        if bad.any():
            position = int(bad.nonzero()[0])
            raise ValueError(
                f"{name}[{position}] = {int(row[position])} is not a token id of this PaLM "
                f"(ids must be in [0, {num_tokens}))"
            )
    return [row.long() for row in rows]


class PromptBank(NamedTuple):
    """All prompts left-padded once: tokens (N, P) long, mask (N, P) bool (True = real)."""

    tokens: Tensor
    mask: Tensor

    @classmethod
    def build(cls, prompts: list[Tensor], pad_value: int) -> PromptBank:
        return cls(*left_pad_prompts([row.tolist() for row in prompts], pad_value))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Rows `index` (b,), without the leading columns that are padding in every row."""
        tokens, mask = self.tokens[index], self.mask[index]
        first = int(mask.any(dim=0).long().argmax())  # first column holding a real token
        return tokens[:, first:], mask[:, first:]


class PtxData(NamedTuple):
    """Pretraining token ids for PPO-ptx: a 1-D stream (random windows) or (N, L) rows."""

    tokens: Tensor
    seq_len: int

    @classmethod
    def build(cls, tokens: Optional[Tensor], num_tokens: int, seq_len: int) -> Optional[PtxData]:
        if tokens is None:
            return None
        if (
            tokens.dtype.is_floating_point
            or tokens.dtype == torch.bool
            or tokens.dim() not in (1, 2)
        ):
            raise ValueError("ptx_data must be integer token ids, 1-D (a stream) or 2-D (rows)")
        if tokens.dim() == 1 and tokens.numel() < seq_len + 2:
            raise ValueError(f"ptx_data has {tokens.numel()} tokens, fewer than ptx_seq_len + 2")
        if int(tokens.min()) < 0 or int(tokens.max()) >= num_tokens:
            raise ValueError(f"ptx_data holds ids outside [0, {num_tokens})")
        return cls(tokens, seq_len)

    def sample(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(batch_size, seq_len + 1) long: random windows of the stream, or random rows."""
        if self.tokens.dim() == 2:
            rows = torch.randint(self.tokens.shape[0], (batch_size,), generator=generator)
            return self.tokens[rows].long()
        last_start = self.tokens.numel() - self.seq_len - 1
        starts = torch.randint(last_start, (batch_size, 1), generator=generator)
        return self.tokens[starts + torch.arange(self.seq_len + 1)].long()
