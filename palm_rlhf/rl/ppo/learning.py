"""Phase 4 of `RLHFTrainer.step`: the trainer's networks, optimizers and PPO-ptx wired into
`rl/update.py`, which holds the minibatch loss, the optimizer steps and the epoch loop.

    run_epochs: `epochs` passes of shuffled minibatches of whole groups, each
        loss, stats = minibatch_loss(...)                       under autocast
        + ptx_coef * the actor's LM loss on pretraining windows (PPO-ptx, Ouyang et al. 2022,
          eq. 2)
        non-finite loss: stop or skip (nan_policy) -> backward -> clip and step every network
"""

from __future__ import annotations

from typing import Optional

from palm_rlhf.rl.rollout import Experience
from palm_rlhf.rl.update import minibatch_loss, run_epochs, step_networks
from palm_rlhf.train.step import guard_loss


def learn(
    trainer,  # RLHFTrainer (not imported: it imports this module)
    experience: Experience,
    temperature: float,
    max_new_tokens: int,
    own_old_logprobs: bool,
) -> dict[str, float]:
    """Every minibatch step of one update; returns the mean of each statistic."""

    def step(batch: Experience, **extras) -> Optional[dict]:
        own = dict(own_old_logprobs=own_old_logprobs)
        return minibatch_step(trainer, batch, temperature, max_new_tokens, **own, **extras)

    rows = dict(reference=trainer.reference, temperature=temperature)
    nets, generator = trainer.modules(), trainer.cpu_generator
    return run_epochs(experience, trainer.config, nets, trainer.accelerator, generator, rows, step)


def minibatch_step(trainer, batch: Experience, temperature: float, *args, **rows) -> Optional[dict]:
    """One gradient step of every trained network on a minibatch; `args`/`rows`: see
    `update.minibatch_loss`. Returns the step's stats, None when a non-finite loss is skipped."""
    accelerator, config = trainer.accelerator, trainer.config
    nets = {name: net for name, (net, _) in trainer.networks.items()}
    with accelerator.autocast():
        loss, stats = minibatch_loss(
            nets, batch, config, trainer.kl_coef, temperature, *args, **rows
        )
        if config.ptx_coef > 0:
            windows = trainer.ptx_data.sample(batch.tokens.shape[0], trainer.cpu_generator)
            ptx_loss = nets["actor"](windows.to(trainer.device), return_loss=True)
            stats["ptx_loss"] = float(ptx_loss.detach())
            loss = loss + config.ptx_coef * ptx_loss
    if not guard_loss(loss, trainer.updates, config.nan_policy):
        return None
    accelerator.backward(loss)
    optimizers = {name: optim for name, (_, optim) in trainer.networks.items()}
    stats.update(step_networks(accelerator, trainer.modules(), optimizers, config.max_norm))
    return stats
