"""From a rollout's scores to advantages: the step where RL algorithms differ.

The rollout (`rollout.collect`) and the per-token KL are algorithm-neutral; an algorithm
chooses how scores become per-token rewards and advantages. PPO uses GAE over a critic's
values (`gae_advantages`); critic-free estimators (group-normalised, leave-one-out, global
batch normalisation) are pure functions of the same inputs and plug in beside it.

Whitening under several processes: each process holds a shard of the experience, so the mean
and variance must be those of the GLOBAL batch, or N processes would compute other advantages
than one process on the same episodes. `whiten` takes an `all_reduce` (sum over processes) and
sums count, sum and sum of squares (float64 `estimators.masked_moments`) before normalising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from palm_rlhf.rl.estimators import Moments, global_normalized_advantages, masked_moments
from palm_rlhf.rl.rollout import Experience
from palm_rlhf.rl_math import (
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_sum,
    rewards_with_kl,
)

# all_reduce(t) -> the elementwise sum of t over every process (identity for one process)
AllReduce = Callable[[Tensor], Tensor]


def whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, all_reduce: Optional[AllReduce] = None
) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the GLOBAL batch: (b, n) -> (b, n).

    mean and Bessel-corrected var come from count, sum and sum of squares accumulated in float64
    and summed over processes by `all_reduce` (None: this tensor alone, as `rl_math.masked_whiten`
    computes). With `shift_mean=False` the mean is added back (only the scale is normalised).
    Fewer than 2 masked entries in the whole batch: x is returned unchanged. 0 outside the mask.
    """
    moments = masked_moments(x, mask)
    if all_reduce is not None:
        count, total, total_sq = all_reduce(torch.stack(moments[:3])).unbind()
        moments = Moments(count, total, total_sq)
    if moments.count < 2:  # every process sees the same global count: all take this branch
        return x
    whitened = global_normalized_advantages(x, mask, moments)
    if not shift_mean:
        mean = (moments.total / moments.count).to(x.dtype)
        whitened = torch.where(mask, whitened + mean, 0)
    return whitened


def shape_scores(
    scores: Tensor,
    ended: Tensor,
    missing_eos_penalty: Optional[float],
    reward_clip: Optional[float],
) -> Tensor:
    """Sequence scores (b,) after the penalty for responses without EOS (InstructGPT-style
    "responses without EOS penalised") and the optional clip to +-reward_clip."""
    if missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - missing_eos_penalty)
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
    all_reduce: Optional[AllReduce] = None,
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (b, n): GAE(gamma, lam) (Schulman et al. 2016) over
    per-token rewards and the critic's values, advantages whitened over the masked tokens of
    the global batch (`all_reduce` sums over processes; see `whiten`)."""
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask, all_reduce=all_reduce)
    return advantages, returns


def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: str,
    whiten_rewards: bool = False,
    all_reduce: Optional[AllReduce] = None,
) -> Tensor:
    """(b, n) rewards: -kl_coef * KL_t(policy || reference) on every response token, plus the
    sequence score at the last one (Ziegler et al. 2019); optionally scaled to unit variance
    over the global batch (`all_reduce` sums over processes; see `whiten`)."""
    rewards = rewards_with_kl(scores, logprobs, ref_logprobs, mask, kl_coef, kl_kind)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    return rewards


def pooled_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (b, n), for a critic with one value V per sequence (held at
    every position of `values`): A_t = G_t - V with G_t the gamma-discounted return from token
    t, and the critic's target G_0, the whole response's return, at every response token."""
    _, to_go = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    first = mask.long().argmax(dim=-1, keepdim=True)  # each row's first response token
    whole = to_go.gather(-1, first)
    return torch.where(mask, to_go - values, 0), torch.where(mask, whole.expand_as(to_go), 0)


def mean_return_shift(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    pooled: bool = False,
    all_reduce: Optional[AllReduce] = None,
) -> Tensor:
    """The constant that moves `values` to the GLOBAL batch's mean (gamma-discounted) return
    target: the best constant value predictor, used to start a fresh value head at the
    reward's scale. Targets are G_t per token, or G_0 for a pooled critic."""
    if pooled:
        _, targets = pooled_advantages(rewards, values, mask, gamma)
    else:
        _, targets = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    total = torch.stack((masked_sum(targets - values, mask), mask.sum().to(values.dtype)))
    total = all_reduce(total) if all_reduce is not None else total
    return total[0] / total[1].clamp(min=1)


def rollout_stats(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_kind: str,
    values: Tensor,
    returns: Tensor,
) -> dict[str, float]:
    """Score, KL per response and per token, and the critic's explained variance."""
    kl = kl_per_token(logprobs, ref_logprobs, kl_kind)
    return dict(
        score=float(scores.mean()),
        kl=float(masked_sum(kl, mask, dim=-1).mean()),  # nats per response
        kl_per_token=float(masked_mean(kl, mask)),
        explained_variance=float(explained_variance(values, returns, mask)),
    )


def ppo_advantages(
    experience: Experience,
    config,
    kl_coef: float,
    value_shift: Optional[Callable[[float], float]] = None,
    all_reduce: Optional[AllReduce] = None,
    process_rewards: bool = False,
) -> tuple[Experience, dict[str, float]]:
    """PPO's phase 3 on a rollout with shaped scores: per-token rewards (score - kl_coef *
    KL_t), then advantages over the critic's values: GAE, or one baseline per sequence with
    `config.critic_pooled_values` (`pooled_advantages`). `value_shift`, when given, receives
    the global `mean_return_shift` and returns the shift it applied to the critic (the first
    rollout starts it at the reward's scale); the rollout's values move by it too. With
    `process_rewards` the rollout's "values" are an ImplicitPRM's dense rewards: they join
    the per-token rewards and the baseline is 0. `all_reduce` makes statistics global over
    processes (see `whiten`)."""
    scores, mask = experience.scores, experience.action_mask
    old, ref = experience.old_logprobs, experience.ref_logprobs
    rewards = per_token_rewards(
        scores, old, ref, mask, kl_coef, config.kl_kind, config.whiten_rewards, all_reduce
    )
    values, pooled = experience.old_values, config.critic_pooled_values
    if process_rewards:
        rewards, values, pooled = rewards + torch.where(mask, values, 0), values * 0, False
    elif value_shift is not None:
        shift = mean_return_shift(rewards, values, mask, config.gamma, pooled, all_reduce)
        values = torch.where(mask, values + value_shift(float(shift)), 0)
    if pooled:
        advantages, returns = pooled_advantages(rewards, values, mask, config.gamma)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask, all_reduce=all_reduce)
    else:
        advantages, returns = gae_advantages(
            rewards, values, mask, config.gamma, config.lam, config.whiten_advantages, all_reduce
        )
    stats = rollout_stats(scores, old, ref, mask, config.kl_kind, values, returns)
    if process_rewards:
        stats["process_reward"] = float(masked_sum(experience.old_values, mask, dim=-1).mean())
    experience = experience._replace(old_values=values, advantages=advantages, returns=returns)
    return experience, stats
