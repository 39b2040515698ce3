"""RLHFTrainer: PPO of a PaLM policy against a reward model, the InstructGPT way.

One PPO iteration (`step`) reads like the algorithm box of Ouyang et al. 2022 / Ziegler et al.
2019, each phase a method:

    1. rollout     sample responses to a batch of prompts from the actor (KV-cached, batched)
    2. rewards     score prompt + response with the reward model; per-token reward
                   r_t = -kl_coef * KL_t(actor || reference), plus the score at the last token
    3. advantages  GAE(gamma, lam) over the critic's values; whitening
    4. PPO epochs  clipped policy loss + clipped value loss - beta_s * entropy (+ PPO-ptx)
    5. log         metrics gathered across processes into `trainer.history` (and trackers)
    6. checkpoint  `save` / `load` of everything needed to resume

An episode is one prompt rolled out into one response (see `train` for the counts, global
over processes). The trainer is a plain object, not an `nn.Module`: it owns modules, optimisers and the
Accelerator, and `train` is a training loop, not `Module.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from palm_rlhf.checkpoint import CheckpointError
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.advantages import (
    gae_advantages,
    mean_return_shift,
    per_token_rewards,
    rollout_stats,
    shape_scores,
)
from palm_rlhf.rl.best_of_n import BestOfN, best_of_n
from palm_rlhf.rl.kl_controller import KLController
from palm_rlhf.rl.policies import (
    build_actor_critic,
    evaluation_mode,
    only_these_require_grad,
    prepare_each,
)
from palm_rlhf.rl.ppo.checkpoint import check_compatible, read_trainer_state, write_trainer_state
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.objective import ppo_objective
from palm_rlhf.rl.prompts import PromptBank, PromptIds, PtxData, load_prompts
from palm_rlhf.rl.rollout import (
    Experience,
    collect,
    concat_experience,
    score_sequences,
    tempered_logits,
)
from palm_rlhf.rl_math import (
    typechecked,
)
from palm_rlhf.train.history import tracker_config
from palm_rlhf.train.run import guard_loss, make_accelerator

# reward_fn(seq (b, n) long, mask (b, n) bool, prompt_mask (b, n) bool) -> (b,) float
RewardFn = Callable[..., Tensor]


class RLHFTrainer:
    """Actor-critic PPO with GAE and a per-token KL penalty against the frozen start policy.

    See the module docstring for the loop and `actor_critic.py` for the three networks. Values
    are per token (b, n); the value head starts with weight 0 and, with the default
    `value_head_init="mean_return"`, its bias is set on the first rollout to the mean return
    of that rollout (the best constant predictor), so the first value losses measure the
    critic's real error rather than the scale of the reward. `value_head_init="zero"` keeps 0.
    """

    @typechecked  # beartype, accepting ints where floats are annotated (kl_coef=0)
    def __init__(
        self,
        *,
        palm: PaLM,
        reward_model: RewardFn,  # a RewardModel, or reward_fn(seq, mask, prompt_mask) -> (b,)
        # prompts: exactly one of the three
        prompt_token_ids: Optional[PromptIds] = None,
        prompts: Optional[list[str]] = None,
        prompts_path: Optional[Union[str, Path]] = None,
        tokenizer=None,
        ptx_data: Optional[Tensor] = None,
        actor_lora_scope: Optional[str] = None,
        critic_lora_scope: Optional[str] = None,
        accelerate_kwargs: Optional[dict] = None,
        tracker_project_name: str = "palm-rlhf-ppo",
        config: Optional[PPOConfig] = None,
        **hyperparameters,  # any PPOConfig field: actor_lr=..., kl_coef=..., see config.py
    ):
        self.config = config = PPOConfig.from_keywords(config, **hyperparameters)
        if config.ptx_coef > 0 and ptx_data is None:
            raise ValueError("ptx_coef > 0 needs ptx_data (token ids of pretraining text)")
        self.accelerator = make_accelerator(
            seed=config.seed,
            **{
                "mixed_precision": config.mixed_precision,
                "cpu": config.cpu,
                **(accelerate_kwargs or {}),
            },
        )
        device = self.accelerator.device
        self.pad_value = self.config.pad_value
        self.kl_controller = KLController(config.kl_coef, config.target_kl)

        # prompts first: a bad prompt must fail before any scope is added to the user's PaLM
        prompt_list = load_prompts(
            palm.num_tokens, prompt_token_ids, prompts, prompts_path, tokenizer, self.pad_value
        )
        self.prompts = PromptBank.build(prompt_list, self.pad_value)
        self.prompts = PromptBank(*(t.to(device) for t in self.prompts))
        self.ptx_data = PtxData.build(ptx_data, palm.num_tokens, config.ptx_seq_len)

        # networks: actor and critic are scopes on `palm` or full copies; `palm` is the reference
        palm.to(device)
        actor, self.reference, critic = build_actor_critic(
            palm, config.actor_lora, config.critic_lora, config.actor_lora_r,
            config.critic_lora_r, actor_lora_scope, critic_lora_scope,
        )  # fmt: skip
        actor.to(device), critic.to(device)  # the critic's value head is new
        self.actor_scope, self.critic_scope = actor.scope, critic.scope
        optimizers = [
            torch.optim.AdamW(net.trainable_parameters(), lr, config.betas, weight_decay=wd)
            for net, lr, wd in ((actor, config.actor_lr, config.actor_wd),
                                (critic, config.critic_lr, config.critic_wd))
        ]  # fmt: skip
        (self.actor, self.actor_optim), (self.critic, self.critic_optim) = prepare_each(
            self.accelerator, [actor, critic], optimizers
        )

        self.reward_model = reward_model
        if isinstance(reward_model, nn.Module):
            reward_model.to(device)

        # sampling draws from `generator` (on the device); prompt picks, shuffles and ptx
        # windows from `cpu_generator`; both are saved, so a resumed run continues identically
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=device).manual_seed(config.seed + 1000 * rank)
        self.cpu_generator = torch.Generator().manual_seed(config.seed + 1000 * rank + 1)
        self.episodes, self.updates = 0, 0
        self.value_head_initialised = config.value_head_init == "zero"
        self.history: list[dict] = []
        if self.accelerator.log_with:
            config = tracker_config(self.config.to_dict())  # TensorBoard refuses None
            self.accelerator.init_trackers(tracker_project_name, config=config)

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def kl_coef(self) -> float:
        """The current KL coefficient (fixed, or as adapted by the controller)."""
        return self.kl_controller.kl_coef

    @property
    def actor_module(self):
        return self.accelerator.unwrap_model(self.actor)

    @property
    def critic_module(self):
        return self.accelerator.unwrap_model(self.critic)

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def score(self, tokens: Tensor, mask: Tensor, prompt_mask: Tensor) -> Tensor:
        """Reward of left-justified sequences (b, n) -> (b,); see `experience.score_sequences`."""
        return score_sequences(self.reward_model, tokens, mask, prompt_mask)

    # ------------------------------------------------------------------ phase 1: rollout

    def sample_prompts(self, num_prompts: int) -> tuple[Tensor, Tensor]:
        """`num_prompts` prompts drawn uniformly with replacement: left-padded (b, P) + mask."""
        index = torch.randint(len(self.prompts), (num_prompts,), generator=self.cpu_generator)
        return self.prompts.select(index.to(self.device))

    @torch.no_grad()
    def rollout(
        self, prompt: Tensor, prompt_mask: Tensor, max_new_tokens: int,
        max_seq_len: Optional[int] = None, eos_token: Optional[int] = None,
        temperature: Optional[float] = None,
    ) -> tuple[Experience, Tensor]:  # fmt: skip
        """Sample responses to left-padded prompts (b, P), lay out, score and evaluate them.

        Returns the experience (scores raw, advantages and returns still 0) and whether each
        response ended with EOS (b,). Sampling is KV-cached and batched; the actor, reference
        and critic each run one forward over the whole batch.
        """
        temperature = self.config.temperature if temperature is None else temperature
        limit = max_seq_len or self.reference.config.max_seq_len
        new_tokens = (
            max_new_tokens if limit is None else min(max_new_tokens, limit - prompt.shape[1])
        )
        if new_tokens < 1:
            raise ValueError(
                f"max_seq_len={limit} leaves no room for a response after prompts of "
                f"{prompt.shape[1]} tokens; raise max_seq_len or shorten the prompts"
            )
        actor, critic = self.actor_module, self.critic_module
        # mixed precision (mixed_precision="bf16") covers sampling as well
        with evaluation_mode([actor, critic]), self.accelerator.autocast():
            return collect(
                actor, self.reference, critic, self.reward_model, prompt, prompt_mask,
                new_tokens, temperature=temperature, pad_value=self.pad_value,
                eos_token=eos_token, generator=self.generator, top_k=self.config.top_k,
                top_p=self.config.top_p,
            )  # fmt: skip

    # ------------------------------------------------------------------ phases 2 and 3

    @torch.no_grad()
    def rewards_and_advantages(
        self, experience: Experience, ended: Tensor
    ) -> tuple[Experience, dict[str, float]]:
        """Scores -> per-token rewards -> GAE advantages and returns (whitened as configured)."""
        config, mask = self.config, experience.action_mask
        scores = shape_scores(
            experience.scores, ended, config.missing_eos_penalty, config.reward_clip
        )
        kl_coef = self.kl_controller.kl_coef
        old, ref = experience.old_logprobs, experience.ref_logprobs
        rewards = per_token_rewards(
            scores, old, ref, mask, kl_coef, config.kl_kind, config.whiten_rewards
        )
        values = experience.old_values
        if not self.value_head_initialised:
            # the head's weight is 0, so V = bias everywhere: move the bias to the mean return
            shift = mean_return_shift(rewards, values, mask, config.gamma)
            shift = self.accelerator.reduce(shift, "mean")
            self.critic_module.value_head.bias.add_(shift)
            values = torch.where(mask, values + shift, 0)
            self.value_head_initialised = True
        advantages, returns = gae_advantages(
            rewards, values, mask, config.gamma, config.lam, config.whiten_advantages
        )
        stats = rollout_stats(scores, old, ref, mask, config.kl_kind, values, returns)
        stats["kl_coef"] = kl_coef
        experience = experience._replace(
            old_values=values, advantages=advantages, returns=returns, scores=scores
        )
        return experience, stats

    # ------------------------------------------------------------------ phase 4: PPO epochs

    def learn(self, experience: Experience, temperature: float) -> dict[str, float]:
        """`epochs` passes of shuffled minibatches; returns the mean of each loss statistic."""
        actor, critic = self.actor_module, self.critic_module
        trainable = [*actor.trainable_parameters(), *critic.trainable_parameters()]
        per_process = max(1, self.config.minibatch_size // self.accelerator.num_processes)
        totals: dict[str, float] = {}
        count = 0
        with evaluation_mode([actor, critic]), only_these_require_grad([actor, critic], trainable):
            for _ in range(self.config.epochs):
                order = torch.randperm(experience.tokens.shape[0], generator=self.cpu_generator)
                for index in order.split(per_process):
                    stats = self._minibatch_step(
                        experience.select(index.to(self.device)), temperature
                    )
                    if stats is None:
                        continue
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value
                    count += 1
        return {key: value / max(count, 1) for key, value in totals.items()}

    def _minibatch_step(self, batch: Experience, temperature: float) -> Optional[dict]:
        with self.accelerator.autocast():
            logits = tempered_logits(self.actor(batch.tokens)[:, :-1], temperature)
            values = self.critic(batch.tokens)[:, :-1]
        config = self.config
        loss, stats = ppo_objective(
            logits, values, batch, config.eps_clip, config.value_clip, config.beta_s
        )
        if self.config.ptx_coef > 0:
            ptx_loss = self._ptx_loss(batch.tokens.shape[0])
            loss = loss + self.config.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        if not guard_loss(loss, self.updates, self.config.nan_policy):
            return None
        self.accelerator.backward(loss)
        for name, module, optim in (
            ("actor", self.actor_module, self.actor_optim),
            ("critic", self.critic_module, self.critic_optim),
        ):
            # pre-clip gradient norm; with max_norm None the norm is measured, not clipped
            norm = self.accelerator.clip_grad_norm_(
                module.trainable_parameters(), self.config.max_norm or math.inf
            )
            stats[f"{name}_grad_norm"] = float(norm)
            optim.step()
            optim.zero_grad(set_to_none=True)
        return stats

    def _ptx_loss(self, batch_size: int) -> Tensor:
        """PPO-ptx (Ouyang et al. 2022, eq. 2): the actor's LM loss on pretraining text."""
        windows = self.ptx_data.sample(batch_size, self.cpu_generator).to(self.device)
        with self.accelerator.autocast():
            return self.actor(windows, return_loss=True)

    # ------------------------------------------------------------------ one iteration, loop

    def step(
        self, num_episodes: int, max_timesteps: int, max_seq_len: Optional[int] = None,
        eos_token: Optional[int] = None, temperature: Optional[float] = None,
        batch_size: Optional[int] = None,
    ) -> dict:  # fmt: skip
        """One PPO iteration over `num_episodes` fresh episodes (global), sampled `batch_size`
        (default `rollout_batch_size`) prompts at a time; returns the iteration's record."""
        temperature = self.config.temperature if temperature is None else temperature
        batch_size = batch_size or self.config.rollout_batch_size
        world = self.accelerator.num_processes
        local = max(1, math.ceil(num_episodes / world))
        parts, ended = [], []
        for start in range(0, local, batch_size):  # 1. rollout
            prompt, prompt_mask = self.sample_prompts(min(batch_size, local - start))
            part, part_ended = self.rollout(
                prompt, prompt_mask, max_timesteps, max_seq_len, eos_token, temperature
            )
            parts.append(part), ended.append(part_ended)
        experience = concat_experience(parts, self.pad_value)
        raw, ended = experience.scores, torch.cat(ended)
        experience, rollout_stats = self.rewards_and_advantages(experience, ended)  # 2., 3.
        observed_kl = torch.tensor(rollout_stats["kl"], device=self.device)
        self.kl_controller.update(float(self.accelerator.reduce(observed_kl, "mean")))
        update_stats = self.learn(experience, temperature)  # 4.
        self.episodes += local * world
        self.updates += 1
        record = dict(
            reward=float(raw.mean()),
            reward_std=float(raw.std()) if raw.numel() > 1 else 0.0,
            response_length=float(experience.action_mask.sum(dim=-1).float().mean()),
            missing_eos_fraction=float((~ended).float().mean()) if eos_token is not None else 0.0,
            **rollout_stats,
            **update_stats,
        )
        return self.log(record)  # 5.

    def log(self, record: dict[str, float]) -> dict:
        """Average a record over processes, append it to `history`, send it to trackers."""
        keys = sorted(record)
        local = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(local[None]).reshape(-1, len(keys))
        means = gathered.nanmean(dim=0).tolist()
        record = {"update": self.updates, "episodes": self.episodes, **dict(zip(keys, means))}
        self.history.append(record)
        if self.accelerator.log_with:
            self.accelerator.log(record, step=self.updates)
        return record

    def train(
        self,
        num_episodes: int = 256,
        max_timesteps: int = 64,
        update_timesteps: int = 64,
        max_seq_len: Optional[int] = None,
        eos_token: Optional[int] = None,
        temperature: Optional[float] = None,
        checkpoint_every: Optional[int] = None,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        progress: Optional[bool] = None,
        max_batch_size: Optional[int] = None,
    ) -> list[dict]:
        """Roll out `num_episodes` episodes, one PPO update per `update_timesteps` of them.

        Responses stop at `eos_token` (None: never) and after `max_timesteps` tokens, and prompt
        + response never exceed `max_seq_len` (default: the PaLM's own limit, if any). With
        `checkpoint_every` (updates) and `checkpoint_dir`, the trainer saves itself (phase 6).
        `max_batch_size` (the reference's keyword) caps the prompts sampled at once for this
        call (default: `rollout_batch_size`). Returns this call's records, also in `history`.
        """
        if min(num_episodes, max_timesteps, update_timesteps) < 1:
            raise ValueError("num_episodes, max_timesteps and update_timesteps must be >= 1")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        records = []
        bar = tqdm(
            total=num_episodes, desc="PPO episodes", unit="ep",
            disable=not (
                (self.config.progress if progress is None else progress)
                and self.accelerator.is_local_main_process
            ),
        )  # fmt: skip
        done = 0
        while done < num_episodes:
            size = min(update_timesteps, num_episodes - done)
            record = self.step(
                size, max_timesteps, max_seq_len, eos_token, temperature, max_batch_size
            )
            records.append(record)
            done += size
            bar.update(size)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            if checkpoint_every and self.updates % checkpoint_every == 0:
                self.save(checkpoint_dir)  # 6.
        bar.close()
        return records

    # ------------------------------------------------------------------ best of n, save, load

    def generate(
        self,
        max_seq_len: int,
        *,
        prompt: Tensor,
        num_samples: int = 4,
        eos_token: Optional[int] = None,
        return_scores: bool = False,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        filter_thres: Optional[float] = None,
    ) -> Union[Tensor, BestOfN]:
        """Sample `num_samples` responses to one prompt (n,), return the one the reward model
        scores highest: prompt + response up to EOS, (n_best,). `max_seq_len` counts the prompt.
        With `return_scores=True`, a `BestOfN` with every sample and score. Sampling options
        default to the trainer's; `filter_thres` is the reference project's top-k spelling."""
        actor = self.actor_module
        with evaluation_mode([actor]), self.accelerator.autocast():
            out = best_of_n(
                actor.palm, self.reward_model, prompt, max_seq_len, num_samples,
                finetune_scope=actor.scope, pad_value=self.pad_value, eos_token=eos_token,
                temperature=self.config.temperature if temperature is None else temperature,
                top_k=top_k if top_k is not None else self.config.top_k,
                top_p=top_p if top_p is not None else self.config.top_p,
                filter_thres=filter_thres, generator=self.generator,
            )  # fmt: skip
        return out if return_scores else out.sequence

    def state_dict(self) -> dict:
        """Everything a resumed run needs: trained tensors (adapters or full weights, named
        independently of the scope), both optimizers, both generators, counters, KL control,
        history and the hyperparameters. Tensors and plain values only (no pickled code)."""
        return {
            "actor": self.actor_module.trainable_state(),
            "critic": self.critic_module.trainable_state(),
            "optimizers": {
                "actor": self.actor_optim.state_dict(),
                "critic": self.critic_optim.state_dict(),
            },
            "rng": {
                "generator": self.generator.get_state(),
                "cpu_generator": self.cpu_generator.get_state(),
            },
            "meta": {
                "episodes": self.episodes,
                "updates": self.updates,
                "value_head_initialised": self.value_head_initialised,
                "kl_controller": self.kl_controller.state_dict(),
                "history": self.history,
                "config": self.config.to_dict(),
                "palm_config": self.reference.config.to_dict(),
                "scopes": {"actor": self.actor_scope, "critic": self.critic_scope},
            },
        }

    def load_state_dict(self, state: dict, source: str = "state") -> None:
        """Restore `state_dict()`; refuses another PaLM shape or another actor/critic kind."""
        meta = state["meta"]
        check_compatible(meta, self.reference.config, self.config.to_dict(), source)
        for name, module in (("actor", self.actor_module), ("critic", self.critic_module)):
            try:
                module.load_trainable_state(state[name])
            except RuntimeError as err:  # missing/unexpected keys or shapes (e.g. another rank)
                raise CheckpointError(f"{source}: the {name} does not fit: {err}") from err
        self.actor_optim.load_state_dict(state["optimizers"]["actor"])
        self.critic_optim.load_state_dict(state["optimizers"]["critic"])
        self.generator.set_state(state["rng"]["generator"])
        self.cpu_generator.set_state(state["rng"]["cpu_generator"])
        self.episodes, self.updates = meta["episodes"], meta["updates"]
        self.value_head_initialised = meta["value_head_initialised"]
        self.kl_controller.load_state_dict(meta["kl_controller"])
        self.history = list(meta["history"])

    def save(self, path: Union[str, Path]) -> Optional[Path]:
        """Write `path/update-XXXXXXX/` (and the `path/latest` pointer) atomically; see
        `ppo/checkpoint.py`. Returns the folder (None on processes other than the main one)."""
        self.accelerator.wait_for_everyone()
        folder = None
        if self.accelerator.is_main_process:
            folder = write_trainer_state(path, f"update-{self.updates:07d}", self.state_dict())
        self.accelerator.wait_for_everyone()
        return folder

    def load(self, path: Union[str, Path]) -> RLHFTrainer:
        """Restore a `save`d state (a checkpoint root or one update folder) and continue."""
        folder, state = read_trainer_state(path, device=str(self.device))
        self.load_state_dict(state, source=str(folder))
        return self
