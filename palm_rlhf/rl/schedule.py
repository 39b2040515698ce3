"""How much work `RLHFTrainer.train` does, as a pure function of its arguments.

The reference project (palm-rlhf-pytorch 0.8.0) counts like this, and its keywords keep that
meaning here: `num_episodes x max_timesteps` rollouts (one prompt -> one response each), a
learning step after every `update_timesteps` rollouts, and rollouts after the last multiple of
`update_timesteps` never learned from. This library's own, clearer keywords say the same in
direct terms — `num_rollouts`, `rollouts_per_update` — and take precedence when given.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional


class Schedule(NamedTuple):
    rollouts: int  # responses sampled in total
    per_update: int  # rollouts collected for each learning step
    updates: int  # learning steps
    leftover: int  # rollouts after the last learning step (sampled, never learned from)


def rollout_schedule(
    num_episodes: int,
    max_timesteps: int,
    update_timesteps: int,
    num_rollouts: Optional[int] = None,
    rollouts_per_update: Optional[int] = None,
) -> Schedule:
    """The rollouts and learning steps of one `train` call (see the module docstring)."""
    total = num_episodes * max_timesteps if num_rollouts is None else num_rollouts
    per_update = update_timesteps if rollouts_per_update is None else rollouts_per_update
    for name, value in (("rollouts", total), ("rollouts per update", per_update)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    updates, leftover = divmod(total, per_update)
    if leftover:
        warnings.warn(
            f"{leftover} of {total} rollouts come after the last learning step and are never "
            f"learned from (as in the reference project); use a multiple of {per_update}",
            stacklevel=3,
        )
    return Schedule(total, per_update, updates, leftover)


def response_budget(
    prompt_len: int,
    max_response_tokens: Optional[int],
    max_seq_len: Optional[int],
    model_max_seq_len: Optional[int],
) -> int:
    """New tokens a rollout may sample: up to `max_seq_len` in total (prompt included, as the
    reference counts; like the reference, at least one token even when the prompt already
    fills it), capped by `max_response_tokens` when given and never past the model's own
    limit: a prompt that leaves no room there is refused."""
    limits = [] if max_seq_len is None else [max(1, max_seq_len - prompt_len)]
    if max_response_tokens is not None:
        limits.append(max_response_tokens)
    if model_max_seq_len is not None:
        limits.append(model_max_seq_len - prompt_len)
    if not limits:
        raise ValueError("give max_seq_len or max_response_tokens: responses need a length limit")
    if min(limits) < 1:
        raise ValueError(
            f"the model's max_seq_len={model_max_seq_len} leaves no room for a response after "
            f"prompts of {prompt_len} tokens; shorten the prompts"
        )
    return min(limits)
