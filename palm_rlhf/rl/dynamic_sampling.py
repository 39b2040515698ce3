"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, sec. 3.2): a group whose responses
all scored the same has advantage 0 under every group baseline, so it only dilutes the batch.
Such groups are dropped and more prompts are rolled out in their place, for at most
`max_retries` extra rounds; if the batch is still short then, dropped groups fill it (the
update stays the size it was asked to be, as without dynamic sampling). The trainer counts the
responses it learns from as episodes, not the extra ones rolled out and dropped.

Under several processes every process takes part in every round (rounds and rows per round are
the largest any process needs), so sharded models, whose forward passes are collectives, stay
in step; a process that is already full keeps the extra groups as spares it never uses.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.advantages import constant_groups
from palm_rlhf.rl.advantages import shape_scores
from palm_rlhf.rl.rollout import Experience, concat_experience


class Groups(NamedTuple):
    """Rolled-out groups (rows of whole groups, contiguous) and what shaping needs of them."""

    experience: Experience
    ended: Tensor  # (b,) bool: the response reached EOS
    budgets: Tensor  # (b,) long: the new tokens it was allowed

    def rows(self, groups: Tensor, group_size: int) -> Groups:
        """The rows of the groups `groups` (p,) long, in that order."""
        offsets = torch.arange(group_size, device=groups.device)
        index = rearrange(rearrange(groups, "p -> p 1") * group_size + offsets, "p g -> (p g)")
        return Groups(self.experience.select(index), self.ended[index], self.budgets[index])


def concat_groups(parts: list[Groups], pad_value: int) -> Groups:
    return Groups(
        concat_experience([p.experience for p in parts], pad_value),
        torch.cat([p.ended for p in parts]),
        torch.cat([p.budgets for p in parts]),
    )


def sample_groups(
    rollout: Callable[[int], Groups], num_groups: int, per_chunk: int, pad_value: int
) -> Groups:
    """`num_groups` groups rolled out `per_chunk` at a time by `rollout(n)`, concatenated."""
    starts = range(0, num_groups, per_chunk)
    parts = [rollout(min(per_chunk, num_groups - start)) for start in starts]
    return concat_groups(parts, pad_value)


def roll_out(
    rollout: Callable[[int], Groups],
    num_groups: int,
    per_chunk: int,
    config,
    accelerator,
    learn: bool = True,
) -> tuple[Groups, dict[str, float]]:
    """Phase 1 of an update: `num_groups` groups rolled out `per_chunk` at a time by
    `rollout(n)`; with `config.dynamic_sampling` (and `learn`), refilled (`refill`) with
    the maximum over `accelerator`'s processes deciding each round."""
    sample = partial(sample_groups, rollout, per_chunk=per_chunk, pad_value=config.pad_value)
    rolled = sample(num_groups)
    if not (config.dynamic_sampling and learn):
        return rolled, {}

    def largest(count: int) -> int:
        return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "max"))

    return refill(sample, rolled, num_groups, config, largest)


def refill(
    sample: Callable[[int], Groups],
    first: Groups,
    num_groups: int,
    config,
    largest: Callable[[int], int],
) -> tuple[Groups, dict[str, float]]:
    """`num_groups` groups, starting from the rolled-out `first` and calling `sample(n)` (n
    more groups) while groups are missing, keeping those whose shaped scores (`shape_scores`
    under the PPOConfig `config`) differ within the group. `largest(k)` is the maximum of k
    over processes (identity for one). Returns the groups and the counters logged per update:
    `dynamic_sampling_dropped` (constant groups seen), `dynamic_sampling_retries` (extra
    rounds) and `dynamic_sampling_filled` (constant groups learned from anyway)."""
    group_size, pad_value = config.group_size, config.pad_value
    kept, spare, retries, dropped, batch = [], [], 0, 0, first
    while True:
        lengths = batch.experience.action_mask.sum(dim=-1)
        scores = shape_scores(batch.experience.scores, batch.ended, config, lengths, batch.budgets)
        constant = constant_groups(scores, group_size)
        dropped += int(constant.sum())
        for into, chosen in ((kept, ~constant), (spare, constant)):
            if chosen.any():  # a selection of no rows has no columns to trim to
                into.append(batch.rows(chosen.nonzero().flatten(), group_size))
        have = sum(len(part.ended) for part in kept) // group_size
        want = largest(max(num_groups - have, 0))
        if want == 0 or retries == config.dynamic_sampling_max_retries:
            break
        retries += 1
        batch = sample(want)
    pool = concat_groups([*kept, *spare], pad_value)  # informative groups first
    taken = pool.rows(torch.arange(num_groups, device=pool.ended.device), group_size)
    stats = dict(
        dynamic_sampling_dropped=float(dropped),
        dynamic_sampling_retries=float(retries),
        dynamic_sampling_filled=float(max(num_groups - have, 0)),
    )
    return taken, stats
