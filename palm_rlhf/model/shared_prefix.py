"""A forward over rows that come in groups sharing their first tokens, the prefix run once per
group.

Group RL (GRPO, RLOO, TPO, ...) samples `group_size` responses to each prompt, so the rows of
a rollout repeat every prompt `group_size` times. A plain forward runs every prompt token of
every row through every block. Here the first `length` tokens of each group run once, at batch
`b / group_size`; their keys and values (one shared head per layer: multi-query attention) are
repeated over the group, and the remaining columns of every row attend to them as a KV cache
with gradients. The result is the plain forward's, token for token (tests/test_shared_prefix.py
checks logits and gradients), at `(group_size - 1) * length` fewer token passes per group.

Rows are left-justified (padding only after the real tokens, as `rl/rollout.py` lays them out),
so a causal model needs no padding mask, and the same rotary positions and xPos centre as the
plain forward over n tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

from palm_rlhf.model.attention import PrefixKeys, attention_mask
from palm_rlhf.model.block import BlockInputs


class SharedPrefix(NamedTuple):
    """Rows come in contiguous groups of `group_size` whose first `length` tokens are equal."""

    group_size: int
    length: int


def groups_share(x: Tensor, group_size: int, length: int) -> bool:
    """Whether the rows of x (b, n, ...) come in contiguous groups of `group_size` whose first
    `length` columns (1..n) are equal."""
    rows, n = x.shape[:2]
    if group_size < 1 or rows % group_size or not 0 < length <= n:
        return False
    heads = rearrange(x[:, :length], "(p g) j ... -> p g j ...", g=group_size)
    return bool((heads == heads[:, :1]).all())


def check_shared_prefix(x: Tensor, shared: SharedPrefix) -> None:
    """One-line ValueError unless the rows of x (b, n) really share their prefixes."""
    if shared.length >= x.shape[1] or not groups_share(x, *shared):
        raise ValueError(
            f"shared_prefix={tuple(shared)}: the {x.shape[0]} rows of {x.shape[1]} tokens are "
            f"not groups of {shared.group_size} equal in their first {shared.length} tokens"
        )


def shared_prefix_forward(
    model, x: Tensor, shared: SharedPrefix, run_layers: Callable[[Tensor, BlockInputs], Tensor]
) -> tuple[Tensor, Tensor]:
    """x (b, n) -> final normed hidden states of the prefix, once per group (b / g, length,
    dim), and of every row's remaining columns (b, n - length, dim). `run_layers(h, inputs)`
    runs the model's blocks (with its LoRA scope and activation checkpointing)."""
    group, length = shared
    n, device = x.shape[1], x.device
    center, rows = n // 2, model.config.heads + 1  # the plain forward's xPos centre
    prefix_keys = PrefixKeys(group)
    flash = model.config.flash_attn

    positions = torch.arange(length, device=device)
    mask = None if flash else attention_mask(length, length, True, None, device)
    inputs = BlockInputs(
        model.rotary.factors(positions, rows, center), mask, flash, prefix=prefix_keys
    )
    head = run_layers(model.token_emb(x[::group, :length]), inputs)

    positions = torch.arange(length, n, device=device)
    mask = attention_mask(n - length, n, True, None, device)
    inputs = BlockInputs(
        model.rotary.factors(positions, rows, center), mask, prefix=prefix_keys.attending()
    )
    tail = run_layers(model.token_emb(x[:, length:]), inputs)
    return model.norm(head), model.norm(tail)


def expand_prefix(head: Tensor, tail: Tensor, group_size: int) -> Tensor:
    """Per-group prefix outputs (b / g, length, ...) and per-row rest (b, n - length, ...) ->
    the plain forward's (b, n, ...)."""
    head = repeat(head, "p j ... -> (p g) j ...", g=group_size)
    return torch.cat((head, tail), dim=1)


def no_prefix(**others) -> None:
    """Refuse `shared_prefix` beside the inputs it does not handle, one line naming them."""
    given = [name for name, value in others.items() if value is not None and value is not False]
    if given:
        raise ValueError(f"shared_prefix cannot be combined with {', '.join(given)}")
