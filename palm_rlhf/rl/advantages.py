"""From a rollout's scores to advantages: the step where RL algorithms differ.

The rollout (`rollout.collect`) and the per-token KL are algorithm-neutral; an algorithm
chooses how scores become per-token rewards and advantages. PPO uses GAE over a critic's
values (`gae_advantages`); critic-free estimators (group-normalised, leave-one-out, global
batch normalisation) are pure functions of the same inputs and plug in beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from palm_rlhf.rl.rollout import Experience
from palm_rlhf.rl_math import (
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_sum,
    masked_whiten,
    rewards_with_kl,
)


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
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, whiten: bool
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (b, n): GAE(gamma, lam) (Schulman et al. 2016) over
    per-token rewards and the critic's values, advantages whitened over the masked tokens."""
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten and mask.sum() > 1:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: str,
    whiten: bool = False,
) -> Tensor:
    """(b, n) rewards: -kl_coef * KL_t(policy || reference) on every response token, plus the
    sequence score at the last one (Ziegler et al. 2019); optionally scaled to unit variance."""
    rewards = rewards_with_kl(scores, logprobs, ref_logprobs, mask, kl_coef, kl_kind)
    if whiten and mask.sum() > 1:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return rewards


def mean_return_shift(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """The constant that moves `values` to the batch's mean (gamma-discounted) return: the
    best constant value predictor, used to start a fresh value head at the reward's scale."""
    _, returns = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    return masked_mean(returns - values, mask)


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
    value_shift: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Experience, dict[str, float]]:
    """PPO's phase 3 on a rollout with shaped scores: per-token rewards (score - kl_coef *
    KL_t), then GAE over the critic's values. `value_shift`, when given, receives this batch's
    `mean_return_shift` and returns the shift it applied to the value head (the first rollout
    starts the critic at the reward's scale); the rollout's values are moved by it too."""
    scores, mask = experience.scores, experience.action_mask
    old, ref = experience.old_logprobs, experience.ref_logprobs
    rewards = per_token_rewards(
        scores, old, ref, mask, kl_coef, config.kl_kind, config.whiten_rewards
    )
    values = experience.old_values
    if value_shift is not None:
        shift = value_shift(mean_return_shift(rewards, values, mask, config.gamma))
        values = torch.where(mask, values + shift, 0)
    advantages, returns = gae_advantages(
        rewards, values, mask, config.gamma, config.lam, config.whiten_advantages
    )
    stats = rollout_stats(scores, old, ref, mask, config.kl_kind, values, returns)
    experience = experience._replace(old_values=values, advantages=advantages, returns=returns)
    return experience, stats
