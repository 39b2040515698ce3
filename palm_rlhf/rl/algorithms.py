"""The online RL algorithms by name: what each `algorithm=` choice does in phases 3 and 4.

    ALGORITHMS[name] = Algorithm(advantages, loss, ...)       its keys are PPOConfig's choices

    advantages  (phase 3)  shaped scores (b,) + per-token KL -> advantages and returns (b, n - 1)
        grpo         group-normalised scores (Shao et al. 2024); Dr. GRPO without the std (or
                     over `dr_grpo_constant`); MaxRL over the group's mean reward
        rloo         leave-one-out baseline within the group (Ahmadian et al. 2024)
        reinforce++  discounted returns of score - kl_coef * KL_t, whitened over the global
                     batch (Hu 2025)
        flowrl, tpo  none: their losses read the group's scores directly
        ppo          none here: GAE over the critic's values (`advantages.ppo_advantages`)
    loss        (phase 4)  one minibatch of whole groups -> a scalar
        grpo, rloo, reinforce++   clipped policy gradient (clip-higher, dual clip, per-token or
                                  per-sequence ratio (GSPO), or SPO's quadratic penalty; or the
                                  centred-score gradient), on advantages less each response's
                                  drift `kl_div_loss_weight` and plus the entropy bonus
                                  `entropy_to_advantage_*`; token losses averaged per
                                  `loss_agg_mode` (ppo's policy term is this same function)
        flowrl       trajectory balance against the reference with a learned log Z(x)
        tpo          cross-entropy to the reward-tilted target distribution over the group
        ppo          none here: clipped policy + critic loss (`ppo/objective.py`)
        `kl_in_loss` algorithms add kl_coef * KL_k3(policy || reference) as a loss term;
        every algorithm subtracts beta_s * the policy's entropy (averaged like its tokens)

A new algorithm is one advantage function and/or one loss function here plus one line in
`ALGORITHMS` (see docs/extending.md). All the math lives in `palm_rlhf.functional` (pure,
hand-tested); this module only chooses and wires. A group is the `group_size` contiguous rows
answering one prompt; it is sampled, scored and normalised on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.advantages import (
    constant_groups,
    group_normalized_advantages,
    leave_one_out_advantages,
    max_rl_advantages,
    reinforce_pp_returns,
)
from palm_rlhf.functional.kl import kl_per_token, kl_stats
from palm_rlhf.functional.logprobs import (
    entropy_from_logits,
    log_probs_from_logits,
    sequence_log_probs,
)
from palm_rlhf.functional.masked import AllReduce, masked_mean, whiten
from palm_rlhf.functional.policy_losses import (
    entropy_advantage_bonus,
    flowrl_loss,
    full_kl_per_response,
    policy_gradient_loss,
    reduce_token_losses,
    score_centering_loss,
    tpo_loss,
    tpo_targets,
)
from palm_rlhf.rl.flowrl import prompt_features
from palm_rlhf.rl.rollout import Experience, tempered_logits

# ----------------------------------------------------------------------------- phase 3


class AdvantageInputs(NamedTuple):
    """What an advantage estimator may read (action frame: n - 1 columns)."""

    scores: Tensor  # (b,) shaped sequence scores
    kl: Tensor  # (b, n - 1) per-token KL(policy || reference), `config.kl_kind`
    mask: Tensor  # (b, n - 1) bool response tokens
    config: Any  # the PPOConfig
    kl_coef: float  # the current KL coefficient
    all_reduce: AllReduce  # sums a tensor over processes (identity for one)


def broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """(b,) sequence advantages on every response token of (b, n), 0 elsewhere."""
    return torch.where(mask, rearrange(per_sequence, "b -> b 1"), 0)


def grpo_advantages(inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GRPO: z-scores within the group; Dr. GRPO (`scale_by_std=False`) only centres them,
    over `dr_grpo_constant` if given; MaxRL (`max_rl`) divides by the group's mean reward."""
    config = inputs.config
    if config.max_rl:
        scores = max_rl_advantages(inputs.scores, config.group_size)
    else:
        scores = group_normalized_advantages(inputs.scores, config.group_size, config.scale_by_std)
    if config.dr_grpo_constant is not None:
        scores = scores / config.dr_grpo_constant
    return broadcast(scores, inputs.mask), torch.zeros_like(inputs.kl)


def rloo_advantages(inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    scores = leave_one_out_advantages(inputs.scores, inputs.config.group_size)
    return broadcast(scores, inputs.mask), torch.zeros_like(inputs.kl)


def reinforce_pp_advantages(inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    scores, kl, mask, config = inputs.scores, inputs.kl, inputs.mask, inputs.config
    returns = reinforce_pp_returns(scores, kl, mask, inputs.kl_coef, config.gamma)
    return whiten(returns, mask, all_reduce=inputs.all_reduce), returns


def no_advantages(inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """FlowRL and TPO: the loss reads the group's scores itself."""
    return torch.zeros_like(inputs.kl), torch.zeros_like(inputs.kl)


# ----------------------------------------------------------------------------- phase 4


class LossInputs(NamedTuple):
    """What a policy loss may read for one minibatch (action frame: n - 1 columns)."""

    logits: Tensor  # (b, n - 1, v) tempered actor logits (with grad)
    logprobs: Tensor  # (b, n - 1) log pi of the sampled tokens (with grad)
    batch: Experience
    config: Any
    max_length: int  # the response budget, the constant of "seq-mean-token-sum-norm"
    log_z: Optional[Tensor]  # (b,) FlowRL's log-partition head on the batch's prompts
    sampler_probs: Optional[Tensor]  # (b, n - 1, v) the rollout policy's (score centering, drift)
    entropy: Optional[Tensor] = None  # (b, n - 1) the policy's entropy per position (with grad)


def shaped_advantages(inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """The minibatch's advantages (b, n - 1) as the reference's grpo learn() reshapes them,
    recomputed at every minibatch (they move with the policy):

        A'  = A - kl_div_loss_weight * KL_b       KL(rollout || current), full vocabulary,
                                                  each response's token mean (critic-free)
        A'' = A' + min(scale * sg[H_t], |A'| / kappa)   entropy_to_advantage_scale > 0
                                                  (Cheng et al. 2025, arXiv 2506.14758)

    The KL keeps its gradient (through A' it joins the surrogate, not a loss term of its own).
    """
    batch, config, mask = inputs.batch, inputs.config, inputs.batch.action_mask
    advantages, stats = batch.advantages, {}
    if config.kl_div_loss_weight > 0 and not config.has_critic:
        log_probs = F.log_softmax(inputs.logits, dim=-1)
        drift = full_kl_per_response(inputs.sampler_probs, log_probs, mask)
        advantages = advantages - config.kl_div_loss_weight * rearrange(drift, "b -> b 1")
        stats["kl_div_loss"] = float(drift.detach().mean())
    if config.entropy_to_advantage_scale > 0:
        scale, kappa = config.entropy_to_advantage_scale, config.entropy_to_advantage_kappa
        entropy = (
            inputs.entropy if inputs.entropy is not None else entropy_from_logits(inputs.logits)
        )
        advantages = entropy_advantage_bonus(advantages, entropy, mask, scale, kappa)
    return advantages, stats


def policy_gradient_objective(inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """GRPO / RLOO / REINFORCE++ (and PPO's policy term): the ratio-based policy gradient on
    `shaped_advantages`, clipped as configured (`clip_range`, `dual_clip_c`, per token or per
    sequence) or SPO's penalty; with `score_centering` the centred-score gradient against the
    rollout policy's probabilities."""
    batch, config = inputs.batch, inputs.config
    advantages, stats = shaped_advantages(inputs)
    if config.score_centering:
        loss = score_centering_loss(
            F.log_softmax(inputs.logits, dim=-1),
            inputs.sampler_probs,
            batch.tokens[:, 1:],
            advantages,
            batch.action_mask,
            config.score_centering_topk,
            config.score_centering_weight_fn,
            loss_agg_mode=config.token_reduction,
        )
        return loss, stats
    low, high = config.clip_range
    loss, policy = policy_gradient_loss(
        inputs.logprobs,
        batch.old_logprobs,
        advantages,
        batch.action_mask,
        low,
        config.token_reduction,
        inputs.max_length,
        clip_eps_high=high,
        dual_clip_c=config.dual_clip_c,
        importance_sampling_level=config.importance_sampling_level,
        simple_policy_optimization=config.simple_policy_optimization,
    )
    stats.update(clip_fraction=float(policy.clip_fraction), approx_kl=float(policy.approx_kl))
    return loss, stats


def flowrl_objective(inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    batch, config = inputs.batch, inputs.config
    rewards = group_normalized_advantages(batch.scores, config.group_size)
    loss, flow = flowrl_loss(
        inputs.logprobs,
        batch.ref_logprobs,
        batch.old_logprobs,
        batch.action_mask,
        rewards,
        inputs.log_z,
        config.flowrl_beta,
        config.eps_clip,
    )
    return loss, dict(
        trajectory_balance=float(flow.trajectory_balance),
        importance_weight=float(flow.importance_weight),
        log_z=float(flow.log_z),
    )


def tpo_objective(inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    batch, config, mask = inputs.batch, inputs.config, inputs.batch.action_mask
    old = sequence_log_probs(batch.old_logprobs, mask)
    targets = tpo_targets(old, batch.scores, config.group_size, config.tpo_eta)
    return tpo_loss(sequence_log_probs(inputs.logprobs, mask), targets, config.group_size), {}


# ----------------------------------------------------------------------------- the registry


class Algorithm(NamedTuple):
    """One `algorithm=` choice. `advantages` and `loss` None: PPO's critic does that work."""

    advantages: Optional[Callable[[AdvantageInputs], tuple[Tensor, Tensor]]]
    loss: Optional[Callable[[LossInputs], tuple[Tensor, dict[str, float]]]]
    groups: bool = True  # scores several responses per prompt together: group_size >= 2
    kl_in_loss: bool = False  # kl_coef weighs a k3 loss term (else a reward penalty, or unused)

    @property
    def has_critic(self) -> bool:
        return self.loss is None


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(None, None, groups=False),
    "grpo": Algorithm(grpo_advantages, policy_gradient_objective, kl_in_loss=True),
    "rloo": Algorithm(rloo_advantages, policy_gradient_objective, kl_in_loss=True),
    "reinforce++": Algorithm(reinforce_pp_advantages, policy_gradient_objective, groups=False),
    "flowrl": Algorithm(no_advantages, flowrl_objective),
    "tpo": Algorithm(no_advantages, tpo_objective, kl_in_loss=True),
}


# ----------------------------------------------------------------------------- wiring


def critic_free_advantages(
    experience: Experience, config, kl_coef: float, all_reduce_sum: AllReduce
) -> tuple[Experience, dict[str, float]]:
    """Phase 3 of a critic-free algorithm on a rollout whose scores are already shaped:
    advantages and returns (b, n - 1) from `ALGORITHMS[config.algorithm].advantages`;
    `all_reduce_sum` sums a tensor over processes (global batch statistics)."""
    scores, mask = experience.scores, experience.action_mask
    kl = kl_per_token(experience.old_logprobs, experience.ref_logprobs, config.kl_kind)
    estimator = ALGORITHMS[config.algorithm].advantages
    advantages, returns = estimator(
        AdvantageInputs(scores, kl, mask, config, kl_coef, all_reduce_sum)
    )
    stats = dict(
        score=float(scores.mean()),
        **kl_stats(kl, mask),
        kl_coef=kl_coef,
        # groups whose responses all scored the same carry no signal for group estimators
        constant_group_fraction=float(constant_groups(scores, config.group_size).float().mean()),
        advantage_abs=float(masked_mean(advantages.abs(), mask)),
    )
    return experience._replace(advantages=advantages, returns=returns), stats


def critic_free_objective(
    logits: Tensor,
    batch: Experience,
    config,
    kl_coef: float,
    max_length: int,
    log_z: Optional[Tensor] = None,
    sampler_probs: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, float]]:
    """Phase 4 of a critic-free algorithm, (loss, stats) of a minibatch of whole groups:
    tempered actor logits (b, n - 1, v); `log_z`, `sampler_probs`, `max_length`: `LossInputs`."""
    algorithm, mask = ALGORITHMS[config.algorithm], batch.action_mask
    logprobs = log_probs_from_logits(logits, batch.tokens[:, 1:])
    # with grad only when the bonus needs it (the (b, n, v) softmax is kept for backward)
    entropy = entropy_from_logits(logits if config.beta_s > 0 else logits.detach())
    inputs = LossInputs(logits, logprobs, batch, config, max_length, log_z, sampler_probs, entropy)
    loss, stats = algorithm.loss(inputs)
    stats["policy_loss"] = float(loss.detach())
    if algorithm.kl_in_loss and kl_coef > 0:
        kl = kl_per_token(logprobs, batch.ref_logprobs, "k3")
        kl_loss = reduce_token_losses(kl, mask, config.token_reduction, max_length)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = float(kl_loss.detach())
    if config.beta_s > 0:
        loss = loss - config.beta_s * entropy_bonus(entropy, mask, config, max_length)
    stats["entropy"] = float(masked_mean(entropy.detach(), mask))
    return loss, stats


def entropy_bonus(entropy: Tensor, mask: Tensor, config, max_length: Optional[int]) -> Tensor:
    """The entropy that `beta_s` weighs, averaged like the policy loss's tokens (PPO's token
    mean; the reference grpo's and tpo's mean over responses of each one's token mean)."""
    return reduce_token_losses(entropy, mask, config.token_reduction, max_length)


@torch.no_grad()
def per_row_inputs(
    experience: Experience, config, reference, actor, temperature: float
) -> dict[str, Tensor]:
    """Inputs the losses need beside the experience, fixed before any update: FlowRL's prompt
    features (b, d), the rollout policy's probabilities (b, n - 1, v) for score centering and
    the critic-free drift term (memory: one float per vocabulary entry per token of the
    rollout). Empty for PPO."""
    rows = {}
    if config.algorithm == "flowrl":
        rows["features"] = prompt_features(reference, experience.tokens, experience.prompt_mask)
    if config.score_centering or (config.kl_div_loss_weight > 0 and not config.has_critic):
        logits = actor(experience.tokens)[:, :-1]
        rows["sampler_probs"] = tempered_logits(logits, temperature).softmax(dim=-1)
    return rows


def select_rows(rows: dict[str, Tensor], index: Tensor, width: int) -> dict[str, Tensor]:
    """`per_row_inputs` of a minibatch: rows `index`, per-token ones trimmed to `width`."""
    return {k: v[index][:, :width] if v.dim() > 2 else v[index] for k, v in rows.items()}
