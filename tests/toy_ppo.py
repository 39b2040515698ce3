"""The toy PPO task the RL tests share: a tiny PaLM over 12 tokens, three prompts, and a reward
that is the share of response tokens equal to TARGET (optimum 1). Imported by the tests and by
tests/ppo_worker.py (run in several processes)."""

from __future__ import annotations

import torch

from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.ppo.trainer import RLHFTrainer

TARGET = 3
PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([4, 5, 6, 7, 8])]


def fraction_of_target(seq, mask, prompt_mask):
    """(b,) share of response tokens equal to TARGET."""
    return masked_mean((seq == TARGET).float(), mask & ~prompt_mask, dim=-1)


def toy_palm(seed: int = 1, embed_std: float = 0.2, depth: int = 1) -> PaLM:
    torch.manual_seed(seed)
    palm = PaLM(num_tokens=12, dim=32, depth=depth, heads=2, dim_head=16, ff_mult=2)
    with torch.no_grad():
        palm.token_emb.weight.normal_(0, embed_std)
    return palm


def toy_trainer(palm=None, reward=fraction_of_target, **overrides) -> RLHFTrainer:
    kwargs = dict(
        palm=palm if palm is not None else toy_palm(),
        reward_model=reward,
        prompt_token_ids=PROMPTS,
        actor_lr=3e-3,
        critic_lr=3e-3,
        actor_lora_r=4,
        critic_lora_r=4,
        minibatch_size=16,
        epochs=2,
        rollout_batch_size=64,
        kl_coef=0.1,
        seed=1,
    )
    kwargs.update(overrides)
    return RLHFTrainer(**kwargs)


def mean_reward(trainer: RLHFTrainer, episodes: int = 512, new_tokens: int = 8) -> float:
    """Mean score of `episodes` fresh rollouts of the current policy."""
    experience, _ = trainer.rollout(*trainer.sample_prompts(episodes), new_tokens)
    return float(experience.scores.mean())


def final_kl(trainer: RLHFTrainer, last: int = 3) -> float:
    return sum(r["kl"] for r in trainer.history[-last:]) / last


def base_weights(palm: PaLM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in palm.palm_parameters()]


# ----------------------------------------------------------------------------- learning
