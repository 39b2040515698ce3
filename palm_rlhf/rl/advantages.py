"""Phase 3 wiring: shaping the rollout's scores, and PPO's advantages over its critic.

The rollout (`rollout.collect`) and the per-token KL are algorithm-neutral; an algorithm
chooses how scores become per-token rewards and advantages. PPO (here) shapes per-token rewards
with the KL penalty and runs GAE over the critic's values; the critic-free estimators are in
`algorithms.py`. The math is `palm_rlhf.functional`'s; statistics that read the whole batch
(whitening, the value head's start) are made global over processes by `all_reduce`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.advantages import (
    gae,
    kl_penalized_rewards,
    mean_return_shift,
    overlong_penalty,
    pooled_advantages,
)
from palm_rlhf.functional.kl import kl_per_token, kl_stats
from palm_rlhf.functional.masked import AllReduce, masked_sum, whiten
from palm_rlhf.functional.value_losses import explained_variance
from palm_rlhf.rl.rollout import Experience


def shape_scores(
    scores: Tensor,
    ended: Tensor,
    config,
    lengths: Optional[Tensor] = None,
    budgets: Optional[Tensor] = None,
) -> Tensor:
    """Sequence scores (b,) after, in this order: the penalty for responses without EOS
    (InstructGPT-style "responses without EOS penalised", `missing_eos_penalty`), DAPO's soft
    overlong penalty (`overlong_buffer_len`, `overlong_penalty_factor`; needs the responses'
    `lengths` and token `budgets`, both (b,)) and the optional clip to +-`reward_clip`."""
    if config.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - config.missing_eos_penalty)
    if config.overlong_buffer_len is not None and lengths is not None and budgets is not None:
        buffer, factor = config.overlong_buffer_len, config.overlong_penalty_factor
        scores = scores + overlong_penalty(lengths, budgets, buffer, factor).to(scores.dtype)
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    return scores


def filter_overlong(
    experience: Experience, ended: Tensor, config
) -> tuple[Experience, dict[str, float]]:
    """DAPO's overlong filtering (Yu et al. 2025, sec. 3.4) with `config.overlong_filtering`:
    responses that never reached EOS (`ended` (b,) False) keep no token in the loss, their
    truncation being no fault of their content. Returns the experience and the fraction."""
    if not config.overlong_filtering:
        return experience, {}
    kept = experience.action_mask & rearrange(ended, "b -> b 1")
    fraction = float((~ended).float().mean())
    return experience._replace(action_mask=kept), {"overlong_filtered_fraction": fraction}


def ppo_advantages(
    experience: Experience,
    config,
    kl_coef: float,
    value_shift: Optional[Callable[[float], float]] = None,
    all_reduce: Optional[AllReduce] = None,
) -> tuple[Experience, dict[str, float]]:
    """PPO's phase 3 on a rollout with shaped scores: per-token rewards (score - kl_coef *
    KL_t), then advantages over the critic's values: GAE, or one baseline per sequence with
    `config.critic_pooled_values` (`pooled_advantages`). `value_shift`, when given, receives
    the global `mean_return_shift` and returns the shift it applied to the critic (the first
    rollout starts it at the reward's scale); the rollout's values move by it too. An
    ImplicitPRM critic's dense `experience.process_rewards` join the per-token rewards and
    the baseline is 0 (it values no state). `all_reduce` makes statistics global over
    processes (see `functional.masked.whiten`)."""
    scores, mask = experience.scores, experience.action_mask
    kl = kl_per_token(experience.old_logprobs, experience.ref_logprobs, config.kl_kind)
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)
    if config.whiten_rewards:  # scale only: the mean stays
        rewards = whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    values, pooled = experience.old_values, config.critic_pooled_values
    process_rewards = experience.process_rewards
    if process_rewards is not None:
        rewards, pooled = rewards + torch.where(mask, process_rewards, 0), False
    elif value_shift is not None:
        shift = mean_return_shift(rewards, values, mask, config.gamma, pooled, all_reduce)
        values = torch.where(mask, values + value_shift(float(shift)), 0)
    if pooled:
        advantages, returns = pooled_advantages(rewards, values, mask, config.gamma)
    else:
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask, all_reduce=all_reduce)
    stats = dict(
        score=float(scores.mean()),
        **kl_stats(kl, mask),
        explained_variance=float(explained_variance(values, returns, mask)),
    )
    if process_rewards is not None:
        stats["process_reward"] = float(masked_sum(process_rewards, mask, dim=-1).mean())
    experience = experience._replace(old_values=values, advantages=advantages, returns=returns)
    return experience, stats
