"""The PPO objective of one minibatch, from the networks' outputs to one scalar loss.

    loss = L_policy + L_critic - beta_s * H(policy)      (+ kl_div_loss_weight * drift, + ptx)

Shapes follow `rollout.py`: logits (b, n - 1, v) in the shifted action frame, masked to response
tokens everywhere. L_policy is the ratio-based policy gradient every such algorithm shares
(`algorithms.policy_gradient_objective`: the clip of Schulman et al. 2017 and its variants,
averaged per `loss_agg_mode`, token-mean for PPO by default). L_critic is the critic's own loss
(`critics.py`: clipped value loss, HL-Gauss, or an ImplicitPRM's outcome loss). The math is
`palm_rlhf.functional`'s; this only wires it.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.logprobs import entropy_from_logits, log_probs_from_logits
from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.rl.algorithms import LossInputs, entropy_bonus, policy_gradient_objective
from palm_rlhf.rl.rollout import Experience


def ppo_objective(
    logits: Tensor,
    critic_loss: Tensor,
    batch: Experience,
    config,
    max_length: Optional[int] = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, stats) for tempered actor logits (b, n - 1, v) and the critic's loss (scalar),
    under the PPOConfig `config`. `kl_div_loss_weight` adds KL(rollout policy || current
    policy) per response token (k3 estimate on the sampled tokens), the reference project's
    drift penalty; `max_length` is the constant of "seq-mean-token-sum-norm"."""
    mask = batch.action_mask
    logprobs = log_probs_from_logits(logits, batch.tokens[:, 1:])
    entropy = entropy_from_logits(logits)
    inputs = LossInputs(logits, logprobs, batch, config, max_length, None, None, entropy)
    policy_loss, policy_stats = policy_gradient_objective(inputs)
    bonus = entropy_bonus(entropy, mask, config, max_length)
    loss = policy_loss - config.beta_s * bonus + critic_loss
    drift = masked_mean(kl_per_token(batch.old_logprobs, logprobs, "k3"), mask)
    if config.kl_div_loss_weight > 0:
        loss = loss + config.kl_div_loss_weight * drift
    stats = dict(
        kl_div_loss=float(drift.detach()),
        policy_loss=float(policy_loss.detach()),
        value_loss=float(critic_loss.detach()),
        entropy=float(masked_mean(entropy.detach(), mask)),
        **policy_stats,
    )
    return loss, stats
