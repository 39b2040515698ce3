"""The online RL algorithms by name: what each `algorithm=` choice does in phases 3 and 4.

    ALGORITHMS[name] = Algorithm(advantages, loss, ...)       its keys are PPOConfig's choices

    advantages  (phase 3)  shaped scores (b,) + per-token KL -> advantages and returns (b, n - 1)
        grpo         group-normalised scores (Shao et al. 2024); Dr. GRPO without the std
        rloo         leave-one-out baseline within the group (Ahmadian et al. 2024)
        reinforce++  discounted returns of score - kl_coef * KL_t, whitened over the global
                     batch (Hu 2025)
        flowrl, tpo  none: their losses read the group's scores directly
        ppo          none here: GAE over the critic's values (`advantages.ppo_advantages`)
    loss        (phase 4)  one minibatch of whole groups -> a scalar
        grpo, rloo, reinforce++   clipped policy gradient (or the centred-score gradient),
                                  token losses averaged per `length_norm`
        flowrl       trajectory balance against the reference with a learned log Z(x)
        tpo          cross-entropy to the reward-tilted target distribution over the group
        ppo          none here: clipped policy + critic loss (`ppo/objective.py`)
        `kl_in_loss` algorithms add kl_coef * KL_k3(policy || reference) as a loss term

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
    flowrl_loss,
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
    config = inputs.config
    scores = group_normalized_advantages(inputs.scores, config.group_size, config.scale_by_std)
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
    """What a critic-free loss may read for one minibatch (action frame: n - 1 columns)."""

    logits: Tensor  # (b, n - 1, v) tempered actor logits (with grad)
    logprobs: Tensor  # (b, n - 1) log pi of the sampled tokens (with grad)
    batch: Experience
    config: Any
    max_length: int  # the response budget, the constant of length_norm="constant"
    log_z: Optional[Tensor]  # (b,) FlowRL's log-partition head on the batch's prompts
    sampler_probs: Optional[Tensor]  # (b, n - 1, v) the rollout policy's, for score centering


def policy_gradient_objective(inputs: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """GRPO / RLOO / REINFORCE++: the clipped policy gradient, or with `score_centering` the
    centred-score gradient against the rollout policy's probabilities."""
    batch, config = inputs.batch, inputs.config
    if config.score_centering:
        loss = score_centering_loss(
            F.log_softmax(inputs.logits, dim=-1),
            inputs.sampler_probs,
            batch.tokens[:, 1:],
            batch.advantages,
            batch.action_mask,
            length_norm=config.length_norm,
        )
        return loss, {}
    loss, stats = policy_gradient_loss(
        inputs.logprobs,
        batch.old_logprobs,
        batch.advantages,
        batch.action_mask,
        config.eps_clip,
        config.length_norm,
        inputs.max_length,
    )
    return loss, dict(clip_fraction=float(stats.clip_fraction), approx_kl=float(stats.approx_kl))


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
    inputs = LossInputs(logits, logprobs, batch, config, max_length, log_z, sampler_probs)
    loss, stats = algorithm.loss(inputs)
    stats["policy_loss"] = float(loss.detach())
    if algorithm.kl_in_loss and kl_coef > 0:
        kl = kl_per_token(logprobs, batch.ref_logprobs, "k3")
        kl_loss = reduce_token_losses(kl, mask, config.length_norm, max_length)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = float(kl_loss.detach())
    with torch.no_grad():
        stats["entropy"] = float(masked_mean(entropy_from_logits(logits), mask))
    return loss, stats


@torch.no_grad()
def per_row_inputs(
    experience: Experience, config, reference, actor, temperature: float
) -> dict[str, Tensor]:
    """Inputs the losses need beside the experience, fixed before any update: FlowRL's prompt
    features (b, d), the rollout policy's probabilities (b, n - 1, v) for score centering
    (memory: one float per vocabulary entry per token of the rollout). Empty for PPO."""
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
