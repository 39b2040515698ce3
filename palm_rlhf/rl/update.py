"""Phase 4 of an RL update, one minibatch at a time: the algorithm's loss from the networks'
outputs (PPO's clipped policy + value loss, or a critic-free objective), and one optimizer step
of every trained network. The trainer calls these; the math itself lives in
`palm_rlhf.functional`, the wiring per algorithm in `rl/algorithms.py` and `rl/ppo/objective.py`."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from palm_rlhf.functional.logprobs import log_probs_from_logits
from palm_rlhf.rl import algorithms
from palm_rlhf.rl.algorithms import critic_free_objective
from palm_rlhf.rl.policies import evaluation_mode, only_these_require_grad
from palm_rlhf.rl.ppo.objective import ppo_objective
from palm_rlhf.rl.rollout import Experience, group_minibatches, shared_prompt, tempered_logits
from palm_rlhf.train.optim import make_optimizer


def make_optimizers(nets: dict[str, nn.Module], config) -> list[torch.optim.Optimizer]:
    """The one optimiser builder (`train/optim.py`) per network: the actor's learning rate and
    decay for the actor, the critic's for the critic (and for FlowRL's log Z head, which takes
    the critic's place), `config.betas` for both; decay on matrices only."""
    optimizers = []
    for name, net in nets.items():
        lr, wd = (
            (config.actor_lr, config.actor_wd)
            if name == "actor"
            else (config.critic_lr, config.critic_wd)
        )
        optimizers.append(make_optimizer(net.trainable_parameters(), lr, wd, config.betas))
    return optimizers


def minibatch_loss(
    nets: dict[str, nn.Module],
    batch: Experience,
    config,
    kl_coef: float,
    temperature: float,
    max_new_tokens: int = 1,
    features: Optional[Tensor] = None,
    sampler_probs: Optional[Tensor] = None,
    own_old_logprobs: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, stats) of one minibatch. `nets` holds the (possibly wrapped) actor and, by
    algorithm, the critic (PPO) or the log Z head (FlowRL, fed the prompts' `features`).
    `own_old_logprobs`: the rollout skipped its old log-probs (one on-policy pass,
    `scoring_passes.py`), so this forward's own, detached, stand in for them."""
    shared = shared_prompt(batch.tokens, batch.prompt_mask, config.responses_per_prompt)
    logits = nets["actor"](batch.tokens, shared_prefix=shared)[:, :-1]
    logits = tempered_logits(logits, temperature)
    if own_old_logprobs:
        old = log_probs_from_logits(logits.detach(), batch.tokens[:, 1:])
        batch = batch._replace(old_logprobs=old)
    if "critic" in nets:
        critic = nets["critic"]
        module = getattr(critic, "module", critic)  # DDP keeps the critic's methods on .module
        raw = critic(batch.tokens, batch.action_mask)
        critic_loss = module.loss(raw, batch, config.value_clip)
        return ppo_objective(logits, critic_loss, batch, config, max_new_tokens)
    log_z = nets["log_z"](features) if "log_z" in nets else None
    return critic_free_objective(
        logits, batch, config, kl_coef, max_new_tokens, log_z, sampler_probs
    )


def step_networks(
    accelerator, modules: dict[str, nn.Module], optimizers: dict, max_norm: Optional[float]
) -> dict[str, float]:
    """Clip (or, with max_norm None, only measure) each network's gradient norm, step its
    optimizer and clear its gradients; returns the pre-clip norms."""
    stats = {}
    for name, module in modules.items():
        norm = accelerator.clip_grad_norm_(module.trainable_parameters(), max_norm or math.inf)
        stats[f"{name}_grad_norm"] = float(norm)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
    return stats


def run_epochs(
    experience: Experience,
    config,
    modules: dict[str, nn.Module],
    accelerator,
    generator: torch.Generator,
    row_inputs: dict,
    step: Callable[..., Optional[dict]],
) -> dict[str, float]:
    """`config.epochs` passes over the experience in shuffled minibatches of whole groups
    (`minibatch_size` per step, split over processes); `step(batch, **extras)` runs one and
    returns its stats (None: skipped). Per-row inputs the critic-free losses need (FlowRL's
    prompt features, score centering's sampler probabilities) are computed once, before any
    update. Returns the mean of each statistic over the steps taken."""
    nets = list(modules.values())
    trainable = [p for net in nets for p in net.trainable_parameters()]
    per_process = max(1, config.minibatch_size // accelerator.num_processes)
    with evaluation_mode(nets), accelerator.autocast():  # fixed before the updates
        rows = algorithms.per_row_inputs(experience, config, actor=nets[0], **row_inputs)
    totals, count = {}, 0
    with evaluation_mode(nets), only_these_require_grad(nets, trainable):
        for _ in range(config.epochs):
            order = group_minibatches(
                experience.tokens.shape[0], config.responses_per_prompt, per_process, generator
            )
            for index in order:
                batch = experience.select(index := index.to(accelerator.device))
                extras = algorithms.select_rows(rows, index, batch.action_mask.shape[1])
                stats = step(batch, **extras)
                if stats is None:
                    continue
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
    return {key: value / max(count, 1) for key, value in totals.items()}
