"""`palm-rlhf ppo`: the PPO stage (or, with `--algorithm`, GRPO, RLOO, REINFORCE++, FlowRL,
TPO) on files — a policy checkpoint (SFT or pretrained), a reward
model checkpoint and a prompts file in, a standalone aligned model out.

The trained actor is saved with its adapters folded into the weights (`out_dir/final`), with
the tokenizer beside it, so `palm-rlhf chat --checkpoint out_dir/final` talks to it directly;
`out_dir/trainer` holds the resumable trainer state.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

from palm_rlhf.checkpoint import find_weights, latest_checkpoint
from palm_rlhf.data.records import read_prompts
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.options import option
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from palm_rlhf.train.continuing import continue_command
from palm_rlhf.train.history import HISTORY_NAME, write_history
from palm_rlhf.train.loading import check_tokenizer, load_base
from palm_rlhf.train.stopping import TrainingInterrupted


@dataclass
class PPOStageConfig(PPOConfig):
    """The trainer's hyperparameters (PPOConfig, with the shared run options) plus what the
    command line needs to find its inputs and to schedule the run."""

    policy: str = option(
        "",
        "policy to improve: SFT/pretrain checkpoint folder, run folder or .safetensors",
        required=True,
    )
    reward: str = option(
        "",
        "reward model checkpoint (palm-rlhf reward's out_dir, a folder or a file)",
        required=True,
    )
    prompts: str = option(
        "",
        'JSON Lines with a "prompt" per record (SFT, comparison or HH-RLHF files all work)',
        required=True,
    )
    out_dir: str = option(
        "checkpoints/ppo", "where trainer/ (resumable state) and final/ (the model) go"
    )
    num_rollouts: int = option(
        256, "responses rolled out in total (ppo: one per prompt; else group_size per prompt)"
    )
    rollouts_per_update: int = option(64, "responses per learning step")
    max_response_tokens: int = option(64, "longest response in tokens")
    checkpoint_every: int = option(4, "updates between trainer checkpoints")
    resume: Optional[str] = option(
        None, "'latest' (out_dir/trainer's newest checkpoint) or a trainer checkpoint folder"
    )

    def trainer_config(self) -> PPOConfig:
        """The PPOConfig part of this stage config."""
        names = {f.name for f in fields(PPOConfig)}
        return PPOConfig(**{k: v for k, v in asdict(self).items() if k in names})


class PPOResult(NamedTuple):
    history: list
    reward_before: float
    reward_after: float
    kl: float
    checkpoint: Optional[Path]
    trainer: RLHFTrainer


def load_reward_model(path: str, tokenizer) -> RewardModel:
    """A reward model from its checkpoint, refused if it reads text with another tokenizer."""
    weights = find_weights(path)
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
    trainer = RLHFTrainer(
        palm=policy,
        reward_model=reward_model,
        prompts=read_prompts(config.prompts),
        tokenizer=tokenizer,
        config=config.trainer_config(),
        pad_value=tokenizer.pad_id,
        accelerate_kwargs={"log_with": config.log_with, "project_dir": config.out_dir},
    )
    state_dir = Path(config.out_dir) / "trainer"
    if config.resume is not None:
        source = state_dir if config.resume == "latest" else Path(config.resume)
        if latest_checkpoint(source) is not None or (source / "trainer_state.json").is_file():
            trainer.load(source)
            trainer.print(f"resumed from {source} after {trainer.episodes} episodes")
        elif config.resume != "latest":
            raise FileNotFoundError(f"--resume {config.resume}: no trainer checkpoint there")
    remaining = config.num_rollouts - trainer.episodes
    if remaining <= 0 and trainer.episodes:
        trainer.print(
            f"ppo: the run in {config.out_dir} already finished ({trainer.episodes} of "
            f"{config.num_rollouts} rollouts); nothing to train. To continue another run, name "
            f"it (--out-dir DIR --resume latest); to train this one longer, raise --num-rollouts."
        )
    try:
        if remaining > 0:
            trainer.train(
                num_rollouts=remaining,
                max_response_tokens=config.max_response_tokens,
                rollouts_per_update=config.rollouts_per_update,
                eos_token=tokenizer.eos_id,
                checkpoint_every=config.checkpoint_every,
                checkpoint_dir=state_dir,
                progress=config.progress,
            )
    except TrainingInterrupted as stopped:  # say how to continue this run, flags and all
        command = continue_command(config, "ppo")
        where = (stopped.stage, stopped.step, stopped.checkpoint, stopped.signum)
        raise TrainingInterrupted(*where, command) from None
    finally:  # the curves so far, even when stopped by Ctrl-C or an error
        if trainer.accelerator.is_main_process:
            write_history(Path(config.out_dir) / HISTORY_NAME, trainer.history)
    trainer.save(state_dir)
    if trainer.accelerator.log_with:  # --log-with: the trainer logged each update to them
        trainer.accelerator.end_training()
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
