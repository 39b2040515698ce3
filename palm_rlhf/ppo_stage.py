"""`palm-rlhf ppo`: the PPO stage on files — a policy checkpoint (SFT or pretrained), a reward
model checkpoint and a prompts file in, a standalone aligned model out.

The trained actor is saved with its adapters folded into the weights (`out_dir/final`), with
the tokenizer beside it, so `palm-rlhf chat --checkpoint out_dir/final` talks to it directly;
`out_dir/trainer` holds the resumable trainer state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from palm_rlhf.checkpoint import latest_checkpoint
from palm_rlhf.cli_args import option
from palm_rlhf.loading import check_tokenizer, load_base, weights_file
from palm_rlhf.palm import PaLM
from palm_rlhf.ppo import RLHFTrainer
from palm_rlhf.records import read_prompts
from palm_rlhf.reward import RewardModel


@dataclass
class PPOStageConfig:
    policy: str = option("", "policy to improve: SFT/pretrain checkpoint folder, run folder or .safetensors", required=True)  # fmt: skip
    reward: str = option("", "reward model checkpoint (palm-rlhf reward's out_dir, a folder or a file)", required=True)  # fmt: skip
    prompts: str = option("", "JSON Lines with a \"prompt\" per record (SFT, comparison or HH-RLHF files all work)", required=True)  # fmt: skip
    out_dir: str = option(
        "checkpoints/ppo", "where trainer/ (resumable state) and final/ (the model) go"
    )
    num_episodes: int = option(256, "prompts rolled out in total (one response each)")
    update_timesteps: int = option(64, "episodes per PPO update")
    max_timesteps: int = option(64, "longest response in tokens")
    rollout_batch_size: int = option(32, "prompts sampled at once")
    minibatch_size: int = option(16, "episodes per gradient step")
    epochs: int = option(1, "passes over each rollout batch")
    actor_lr: float = option(1e-4, "actor learning rate")
    critic_lr: float = option(1e-4, "critic learning rate")
    actor_lora: bool = option(True, "train the actor as a LoRA scope (else full weights)")
    critic_lora: bool = option(True, "train the critic as a LoRA scope (else full weights)")
    actor_lora_r: int = option(8, "actor LoRA rank")
    critic_lora_r: int = option(8, "critic LoRA rank")
    kl_coef: float = option(0.1, "per-token KL penalty against the frozen reference policy")
    target_kl: Optional[float] = option(None, "adapt kl_coef towards this KL per response")
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    eps_clip: float = option(0.2, "policy ratio clip")
    value_clip: Optional[float] = option(0.4, "value clip around the rollout's values")
    beta_s: float = option(0.01, "entropy bonus")
    max_norm: Optional[float] = option(1.0, "gradient clipping norm")
    missing_eos_penalty: Optional[float] = option(
        None, "added to the score of a response that never ends"
    )
    temperature: float = option(1.0, "sampling temperature of rollouts")
    top_k: Optional[int] = option(None, "top-k filter of rollouts (off-policy if set)")
    checkpoint_every: int = option(4, "updates between trainer checkpoints")
    resume: bool = option(False, "continue from out_dir/trainer's latest checkpoint")
    mixed_precision: str = option(
        "no", "Accelerate mixed precision", choices=("no", "bf16", "fp16")
    )
    seed: int = option(0, "random seed")
    progress: bool = option(True, "show the progress bar")


class PPOResult(NamedTuple):
    history: list
    reward_before: float
    reward_after: float
    kl: float
    checkpoint: Optional[Path]
    trainer: RLHFTrainer


def load_reward_model(path: str, tokenizer) -> RewardModel:
    """A reward model from its checkpoint, refused if it reads text with another tokenizer."""
    weights = weights_file(Path(path))
    check_tokenizer(weights.parent, tokenizer, "the policy checkpoint")
    return RewardModel.from_pretrained(weights).eval()


def standalone_actor(trainer: RLHFTrainer) -> PaLM:
    """The trained policy as a plain PaLM: adapters folded in, no other scopes."""
    actor = trainer.actor_module
    palm = copy.deepcopy(actor.palm)
    if actor.scope is not None:
        palm.merge_finetune_params(actor.scope)
    for scope in palm.finetune_scopes:
        palm.remove_finetune_params(scope)
    return palm


def train_ppo(config: PPOStageConfig) -> PPOResult:
    policy, tokenizer = load_base(config.policy, log=lambda *_: None)
    reward_model = load_reward_model(config.reward, tokenizer)
    keys = ("actor_lr", "critic_lr", "actor_lora", "critic_lora", "actor_lora_r", "critic_lora_r",
            "kl_coef", "target_kl", "gamma", "lam", "eps_clip", "value_clip", "beta_s", "max_norm",
            "missing_eos_penalty", "temperature", "top_k", "rollout_batch_size", "minibatch_size",
            "epochs", "seed")  # fmt: skip
    trainer = RLHFTrainer(
        palm=policy, reward_model=reward_model, prompts=read_prompts(config.prompts),
        tokenizer=tokenizer, pad_value=tokenizer.pad_id,
        accelerate_kwargs={"mixed_precision": config.mixed_precision},
        **{key: getattr(config, key) for key in keys},
    )  # fmt: skip
    state_dir = Path(config.out_dir) / "trainer"
    if config.resume and latest_checkpoint(state_dir) is not None:
        trainer.load(state_dir)
        trainer.print(
            f"resumed from {latest_checkpoint(state_dir)} after {trainer.episodes} episodes"
        )
    remaining = config.num_episodes - trainer.episodes
    if remaining > 0:
        trainer.train(
            num_episodes=remaining, max_timesteps=config.max_timesteps,
            update_timesteps=config.update_timesteps, eos_token=tokenizer.eos_id,
            checkpoint_every=config.checkpoint_every, checkpoint_dir=state_dir, progress=config.progress,
        )  # fmt: skip
    trainer.save(state_dir)
    final = None
    if trainer.accelerator.is_main_process:
        final = Path(config.out_dir) / "final"
        standalone_actor(trainer).save(final / "model.safetensors")
        tokenizer.save(final)
    trainer.accelerator.wait_for_everyone()
    history = trainer.history
    return PPOResult(
        history, history[0]["reward"], history[-1]["reward"], history[-1]["kl"], final, trainer
    )


def run_ppo(config: PPOStageConfig) -> PPOResult:
    """`palm-rlhf ppo`: train, then print reward before/after, KL and where the model went."""
    result = train_ppo(config)
    result.trainer.print(
        f"ppo: reward {result.reward_before:.4f} -> {result.reward_after:.4f} over "
        f"{len(result.history)} updates, KL {result.kl:.4f}; model {result.checkpoint}"
    )
    return result
