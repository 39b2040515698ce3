"""Critic-free online RL on PPO's rollout machinery: the two places where the algorithms differ.

    advantages  (phase 3)  `critic_free_advantages`: scores -> advantages, per algorithm
        grpo         group-normalised scores (Shao et al. 2024); Dr. GRPO without the std
        rloo         leave-one-out baseline within the group (Ahmadian et al. 2024)
        reinforce++  discounted returns of score - kl_coef * KL_t, whitened over the global
                     batch with all-reduced moments (Hu 2025)
        flowrl, tpo  nothing here: their losses read the group's scores directly
    loss        (phase 4)  `critic_free_objective`: one minibatch of whole groups -> a scalar
        grpo, rloo, reinforce++   clipped policy gradient (or the centred-score gradient),
                                  token losses averaged per `length_norm`
        flowrl       trajectory balance against the reference with a learned log Z(x)
        tpo          cross-entropy to the reward-tilted target distribution over the group
        grpo, rloo, tpo add kl_coef * KL_k3(policy || reference) as a loss term

All the math lives in `estimators.py` and `losses.py` (pure, hand-tested); this module only
chooses and wires. A group is the `group_size` contiguous rows answering one prompt; it is
sampled, scored and normalised on one process, so group estimators need no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.rl.estimators import (
    Moments,
    global_normalized_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    masked_moments,
    reinforce_pp_returns,
)
from palm_rlhf.rl.flowrl import prompt_features
from palm_rlhf.rl.losses import (
    flowrl_loss,
    policy_gradient_loss,
    reduce_token_losses,
    score_centering_loss,
    tpo_loss,
    tpo_targets,
)
from palm_rlhf.rl.rollout import Experience, tempered_logits
from palm_rlhf.rl_math import (
    entropy_from_logits,
    kl_per_token,
    log_probs_from_logits,
    masked_mean,
    masked_sum,
    sequence_log_probs,
)

KL_IN_LOSS = ("grpo", "rloo", "tpo")  # kl_coef weighs a k3 loss term; reinforce++: in reward


def sequence_advantages(scores: Tensor, config) -> Tensor:
    """(b,) advantages of the group estimators (grpo, rloo) from shaped scores (b,)."""
    if config.algorithm == "rloo":
        return leave_one_out_advantages(scores, config.group_size)
    return group_normalized_advantages(scores, config.group_size, config.scale_by_std)


def critic_free_advantages(
    experience: Experience,
    config,
    kl_coef: float,
    all_reduce_sum: Callable[[Tensor], Tensor],
) -> tuple[Experience, dict[str, float]]:
    """Advantages (b, n - 1) of a rollout whose scores are already shaped; `all_reduce_sum`
    sums a tensor over processes (REINFORCE++'s global whitening needs the whole batch)."""
    scores, mask = experience.scores, experience.action_mask
    old, ref = experience.old_logprobs, experience.ref_logprobs
    kl = kl_per_token(old, ref, config.kl_kind)
    returns = torch.zeros_like(old)
    if config.algorithm == "reinforce++":
        returns = reinforce_pp_returns(scores, kl, mask, kl_coef, config.gamma)
        local = masked_moments(returns, mask)
        count, total, total_sq = all_reduce_sum(torch.stack(local[:3])).unbind()
        advantages = global_normalized_advantages(returns, mask, Moments(count, total, total_sq))
    elif config.algorithm in ("grpo", "rloo"):
        per_sequence = sequence_advantages(scores, config)
        advantages = torch.where(mask, rearrange(per_sequence, "b -> b 1"), 0)
    else:  # flowrl, tpo: the loss reads the group's scores itself
        advantages = torch.zeros_like(old)
    groups = rearrange(scores, "(p g) -> p g", g=config.group_size)
    stats = dict(
        score=float(scores.mean()),
        kl=float(masked_sum(kl, mask, dim=-1).mean()),  # nats per response
        kl_per_token=float(masked_mean(kl, mask)),
        kl_coef=kl_coef,
        # groups whose responses all scored the same carry no signal for group estimators
        constant_group_fraction=float((groups == groups[:, :1]).all(dim=-1).float().mean()),
        advantage_abs=float(masked_mean(advantages.abs(), mask)),
    )
    return experience._replace(advantages=advantages, returns=returns), stats


@torch.no_grad()
def per_row_inputs(
    experience: Experience, config, reference, actor, temperature: float
) -> dict[str, Tensor]:
    """Inputs the losses need beside the experience, fixed before any update: FlowRL's prompt
    features (b, d), the rollout policy's probabilities (b, n - 1, v) for score centering
    (memory: one float per vocabulary entry per token of the rollout)."""
    rows = {}
    if config.algorithm == "flowrl":
        rows["features"] = prompt_features(reference, experience.tokens, experience.prompt_mask)
    if config.score_centering:
        logits = actor(experience.tokens)[:, :-1]
        rows["sampler_probs"] = tempered_logits(logits, temperature).softmax(dim=-1)
    return rows


def select_rows(rows: dict[str, Tensor], index: Tensor, width: int) -> dict[str, Tensor]:
    """`per_row_inputs` of a minibatch: rows `index`, per-token ones trimmed to `width`."""
    return {k: v[index][:, :width] if v.dim() > 2 else v[index] for k, v in rows.items()}


def critic_free_objective(
    logits: Tensor,
    batch: Experience,
    config,
    kl_coef: float,
    max_length: int,
    log_z: Optional[Tensor] = None,
    sampler_probs: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, stats) of a minibatch of whole groups: tempered actor logits (b, n - 1, v).

    `log_z` (b,): FlowRL's log-partition head on this batch's prompts. `sampler_probs`
    (b, n - 1, v): the rollout policy's probabilities, for `score_centering`. `max_length`:
    the response budget, the constant of `length_norm="constant"` (Dr. GRPO)."""
    algorithm, group_size, mask = config.algorithm, config.group_size, batch.action_mask
    actions = batch.tokens[:, 1:]
    logprobs = log_probs_from_logits(logits, actions)
    stats: dict[str, float] = {}
    if algorithm == "flowrl":
        rewards = group_normalized_advantages(batch.scores, group_size)
        loss, flow = flowrl_loss(
            logprobs,
            batch.ref_logprobs,
            batch.old_logprobs,
            mask,
            rewards,
            log_z,
            config.flowrl_beta,
            config.eps_clip,
        )
        stats.update(
            trajectory_balance=float(flow.trajectory_balance),
            importance_weight=float(flow.importance_weight),
            log_z=float(flow.log_z),
        )
    elif algorithm == "tpo":
        old = sequence_log_probs(batch.old_logprobs, mask)
        targets = tpo_targets(old, batch.scores, group_size, config.tpo_eta)
        loss = tpo_loss(sequence_log_probs(logprobs, mask), targets, group_size)
    elif config.score_centering:
        loss = score_centering_loss(
            F.log_softmax(logits, dim=-1),
            sampler_probs,
            actions,
            batch.advantages,
            mask,
            length_norm=config.length_norm,
        )
    else:
        loss, policy_stats = policy_gradient_loss(
            logprobs,
            batch.old_logprobs,
            batch.advantages,
            mask,
            config.eps_clip,
            config.length_norm,
            max_length,
        )
        stats.update(
            clip_fraction=float(policy_stats.clip_fraction),
            approx_kl=float(policy_stats.approx_kl),
        )
    stats["policy_loss"] = float(loss.detach())
    if algorithm in KL_IN_LOSS and kl_coef > 0:
        kl = kl_per_token(logprobs, batch.ref_logprobs, "k3")
        kl_loss = reduce_token_losses(kl, mask, config.length_norm, max_length)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = float(kl_loss.detach())
    with torch.no_grad():
        stats["entropy"] = float(masked_mean(entropy_from_logits(logits), mask))
    return loss, stats
