"""The data of PPO: the prompt bank, the sequence layout of a rollout, and its experience.

Layout. Prompts are sampled left-padded (so every row's next token lands in the last column
and one KV-cached loop serves prompts of different lengths). For everything after sampling a
rollout is re-laid out *left-justified*:

    tokens       [p p p r r r EOS . .]   prompt, response up to and including EOS, then padding
    mask         [T T T T T T T   F F]   real tokens
    prompt_mask  [T T T F F F F   F F]

which is the layout the reward model is trained on (see `collate.py`), and in which a causal
model needs no attention mask: padding only follows the real tokens. Per-token quantities of
the actions live in the *shifted* frame of n - 1 columns, column t describing token t + 1 (the
logits at position t predict token t + 1; the critic's value at t is that of the state before
it):

    action_mask  (b, n - 1)  = (mask & ~prompt_mask)[:, 1:]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.collate import left_pad_prompts

PromptIds = Union[Tensor, Sequence[Union[Tensor, Sequence[int]]]]


# ----------------------------------------------------------------------------- prompts


def _strip_padding(row: Tensor, pad_value: int) -> Tensor:
    """Drop runs of `pad_value` at both ends of a 1-D row (left- or right-padded input)."""
    real = (row != pad_value).nonzero().flatten()
    if real.numel() == 0:
        return row[:0]
    return row[int(real[0]) : int(real[-1]) + 1]


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


# ----------------------------------------------------------------------------- layout


class Rollout(NamedTuple):
    tokens: Tensor  # (b, n) long, left-justified: prompt, response (to EOS), padding
    mask: Tensor  # (b, n) bool, real tokens
    prompt_mask: Tensor  # (b, n) bool, prompt tokens

    @property
    def action_mask(self) -> Tensor:
        """(b, n - 1) bool: column t is True when token t + 1 is a response token."""
        return (self.mask & ~self.prompt_mask)[:, 1:]


def join_prompt_response(
    prompt: Tensor,
    prompt_mask: Tensor,
    response: Tensor,
    response_mask: Tensor,
    pad_value: int,
) -> Rollout:
    """Left-padded prompts (b, P) + sampled responses (b, M) -> left-justified `Rollout`.

    Each row is shifted left by its number of padding columns, one gather for the batch.
    """
    tokens = torch.cat((prompt, response), dim=1)
    mask = torch.cat((prompt_mask, response_mask), dim=1)
    width = tokens.shape[1]
    prompt_lengths = prompt_mask.sum(dim=1)
    shift = rearrange(prompt.shape[1] - prompt_lengths, "b -> b 1")
    source = torch.arange(width, device=tokens.device) + shift  # (b, n): column read by each
    inside = source < width
    source = source.clamp(max=width - 1)
    mask = mask.gather(1, source) & inside
    tokens = torch.where(mask, tokens.gather(1, source), pad_value)
    positions = torch.arange(width, device=tokens.device)
    prompt_mask = positions < rearrange(prompt_lengths, "b -> b 1")
    return Rollout(tokens, mask, prompt_mask)


@torch.no_grad()
def score_sequences(reward_model, tokens: Tensor, mask: Tensor, prompt_mask: Tensor) -> Tensor:
    """Reward of left-justified sequences (b, n) -> (b,) float32, without grad or dropout.

    An `nn.Module` (a RewardModel) is called as `model(seq, mask=..., prompt_mask=...)` in eval
    mode (its own mode restored afterwards); any other callable as `fn(seq, mask, prompt_mask)`.
    """
    if isinstance(reward_model, nn.Module):
        was_training = reward_model.training
        reward_model.eval()
        try:
            scores = reward_model(tokens, mask=mask, prompt_mask=prompt_mask)
        finally:
            reward_model.train(was_training)
    else:
        scores = reward_model(tokens, mask, prompt_mask)
    scores = torch.as_tensor(scores, device=tokens.device)
    if scores.shape != tokens.shape[:1]:
        raise ValueError(
            f"the reward model returned shape {tuple(scores.shape)} for {tokens.shape[0]} "
            "sequences; it must return one score per sequence, (b,)"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("the reward model returned NaN or Inf scores")
    return scores.float()


# ----------------------------------------------------------------------------- experience


class Experience(NamedTuple):
    """One batch of PPO experience; (b, n) layout fields and (b, n - 1) action-frame fields."""

    tokens: Tensor  # (b, n) long
    mask: Tensor  # (b, n) bool
    prompt_mask: Tensor  # (b, n) bool
    action_mask: Tensor  # (b, n - 1) bool
    old_logprobs: Tensor  # (b, n - 1) log pi_old(token t + 1)
    ref_logprobs: Tensor  # (b, n - 1) log pi_ref(token t + 1)
    old_values: Tensor  # (b, n - 1) V_old(state before token t + 1)
    advantages: Tensor  # (b, n - 1)
    returns: Tensor  # (b, n - 1) the critic's regression targets
    scores: Tensor  # (b,) reward model score (after penalty and clipping)

    def select(self, index: Tensor) -> Experience:
        """Rows `index`, trimmed to the columns some selected row still uses."""
        rows = Experience(*(field[index] for field in self))
        used = int(rows.mask.any(dim=0).nonzero().max()) + 1
        return Experience(
            *(
                field
                if field.dim() == 1
                else field[:, :used]
                if field.shape[1] == self.tokens.shape[1]
                else field[:, : used - 1]
                for field in rows
            )
        )


def pad_columns(x: Tensor, width: int, value) -> Tensor:
    """Right-pad the last dimension of x (b, k) to `width` with `value`."""
    return F.pad(x, (0, width - x.shape[-1]), value=value)


def concat_experience(parts: list[Experience], pad_value: int) -> Experience:
    """Stack experience of several rollout chunks, right-padding to the widest chunk."""
    width = max(part.tokens.shape[1] for part in parts)
    fields = []
    for name in Experience._fields:
        tensors = [getattr(part, name) for part in parts]
        if tensors[0].dim() == 1:
            fields.append(torch.cat(tensors))
            continue
        target = width if tensors[0].shape[1] == parts[0].tokens.shape[1] else width - 1
        value = pad_value if name == "tokens" else (False if tensors[0].dtype == torch.bool else 0)
        fields.append(torch.cat([pad_columns(t, target, value) for t in tensors]))
    return Experience(*fields)
