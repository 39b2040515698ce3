"""The PPO objective of one minibatch, from the networks' outputs to one scalar loss.

    loss = L_clip(policy) + L_critic - beta_s * H(policy)      (+ ptx, by caller)

Shapes follow `rollout.py`: logits (b, n - 1, v) in the shifted action frame, masked to response
tokens everywhere. L_critic is the critic's own loss (`critics.py`: clipped value loss,
HL-Gauss, or an ImplicitPRM's outcome loss). The math is `palm_rlhf.functional`'s; this only
wires it.
"""

from __future__ import annotations

from torch import Tensor

from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.logprobs import entropy_from_logits, log_probs_from_logits
from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.functional.policy_losses import policy_gradient_loss
from palm_rlhf.rl.rollout import Experience


def ppo_objective(
    logits: Tensor,
    critic_loss: Tensor,
    batch: Experience,
    eps_clip: float,
    beta_s: float,
    kl_div_loss_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, stats) for tempered actor logits (b, n - 1, v) and the critic's loss (scalar).
    `kl_div_loss_weight` adds KL(rollout policy || current policy) per response token (k3
    estimate on the sampled tokens), the reference project's drift penalty."""
    mask = batch.action_mask
    logprobs = log_probs_from_logits(logits, batch.tokens[:, 1:])
    entropy = masked_mean(entropy_from_logits(logits), mask)
    policy_loss, policy_stats = policy_gradient_loss(
        logprobs, batch.old_logprobs, batch.advantages, mask, eps_clip, length_norm="token"
    )
    loss = policy_loss - beta_s * entropy + critic_loss
    drift = masked_mean(kl_per_token(batch.old_logprobs, logprobs, "k3"), mask)
    if kl_div_loss_weight > 0:
        loss = loss + kl_div_loss_weight * drift
    stats = dict(
        kl_div_loss=float(drift.detach()),
        policy_loss=float(policy_loss.detach()),
        value_loss=float(critic_loss.detach()),
        entropy=float(entropy.detach()),
        clip_fraction=float(policy_stats.clip_fraction),
        approx_kl=float(policy_stats.approx_kl),
    )
    return loss, stats
