"""Rewards from any Python function of the text (a verifiable reward: an answer checker, a
unit test, a regular expression), wrapped into the tensor reward function the trainers call.

    text_reward_fn(prompts: list[str], responses: list[str]) -> list[float]     (batched)

The wrapper decodes each left-justified row (prompt tokens, then response tokens up to EOS,
which is dropped) with the tokenizer and returns the scores as a (b,) float tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

TextRewardFn = Callable[[list[str], list[str]], Sequence[float]]


class TextReward:
    """`TextReward(fn, tokenizer)(seq, mask, prompt_mask) -> (b,)`: decode, call `fn`, check."""

    def __init__(self, fn: TextRewardFn, tokenizer):
        if tokenizer is None:
            raise ValueError("text_reward_fn needs a tokenizer to decode the responses")
        self.fn, self.tokenizer = fn, tokenizer

    def decode(self, tokens: Tensor, keep: Tensor) -> list[str]:
        eos = getattr(self.tokenizer, "eos_id", None)
        texts = []
        for row, row_keep in zip(tokens.tolist(), keep.tolist()):
            ids = [t for t, k in zip(row, row_keep) if k]
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            texts.append(self.tokenizer.decode(ids))
        return texts

    def __call__(self, seq: Tensor, mask: Tensor, prompt_mask: Tensor) -> Tensor:
        prompts = self.decode(seq, prompt_mask & mask)
        responses = self.decode(seq, mask & ~prompt_mask)
        scores = [float(s) for s in self.fn(prompts, responses)]
        if len(scores) != len(responses):
            raise ValueError(
                f"text_reward_fn returned {len(scores)} scores for {len(responses)} responses"
            )
        return torch.tensor(scores, dtype=torch.float32, device=seq.device)


def resolve_reward(reward_model, text_reward_fn: Optional[TextRewardFn], tokenizer):
    """The trainers' reward function: a reward model / tensor function as given, or a text
    reward wrapped to decode with `tokenizer`. Exactly one of the two must be given."""
    if (reward_model is None) == (text_reward_fn is None):
        raise ValueError("pass exactly one of reward_model and text_reward_fn")
    return reward_model if text_reward_fn is None else TextReward(text_reward_fn, tokenizer)
