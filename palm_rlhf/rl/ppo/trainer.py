"""RLHFTrainer: PPO of a PaLM policy against a reward model, the InstructGPT way.

One PPO iteration (`step`) reads like the algorithm box of Ouyang et al. 2022 / Ziegler et al.
2019, each phase a method:

    1. rollout     sample responses to a batch of prompts from the actor (KV-cached, batched;
                   `dynamic_sampling` refills groups of equal rewards, `dynamic_sampling.py`)
    2. rewards     score prompt + response with the reward model; per-token reward
                   r_t = -kl_coef * KL_t(actor || reference), plus the score at the last token
    3. advantages  GAE(gamma, lam) over the critic's values (or the kind in `critics.py`)
    4. PPO epochs  clipped policy loss + clipped value loss - beta_s * entropy (+ PPO-ptx),
                   `ppo/learning.py`
    5. log         metrics gathered across processes into `trainer.history` (and trackers)
    6. checkpoint  `save` / `load` of everything needed to resume

`train` runs steps on the reference's episode schedule (`ppo/loop.py`).

Critic-free algorithms (`algorithm="grpo" | "rloo" | "reinforce++" | "flowrl" | "tpo"`) run
the same phases with `group_size` responses per prompt and no critic; phases 3 and 4 dispatch
to `rl/algorithms.py`. An episode is one response (counts are global over processes). The
trainer is a plain object, not an `nn.Module`; `train` is a training loop, not `Module.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from palm_rlhf.checkpoint import CheckpointError
from palm_rlhf.model.implicit_prm import ImplicitPRM
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import reference_filters, reference_top_k
from palm_rlhf.rl import rollout as rollout_module
from palm_rlhf.rl.advantages import filter_overlong, ppo_advantages, shape_scores
from palm_rlhf.rl.algorithms import critic_free_advantages
from palm_rlhf.rl.best_of_n import BestOfN, best_of_n
from palm_rlhf.rl.dynamic_sampling import Groups, roll_out
from palm_rlhf.rl.kl_controller import KLController
from palm_rlhf.rl.networks import ActorCritic, prepare_networks, trainer_options
from palm_rlhf.rl.policies import evaluation_mode
from palm_rlhf.rl.ppo import checkpoint as io
from palm_rlhf.rl.ppo import learning
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.loop import run_schedule
from palm_rlhf.rl.prompts import PromptBank, PromptIds, PtxData, load_prompts
from palm_rlhf.rl.rollout import Experience, collect
from palm_rlhf.rl.schedule import response_budget, rollout_schedule
from palm_rlhf.rl.scoring_passes import skips_scoring
from palm_rlhf.rl.text_reward import TextRewardFn, resolve_reward
from palm_rlhf.train.accelerator import make_accelerator
from palm_rlhf.train.history import tracker_config
from palm_rlhf.train.progress import mean_over_processes
from palm_rlhf.train.sharding import load_optimizer_state, optimizer_state
from palm_rlhf.typecheck import typechecked

# reward_fn(seq (b, n) long, mask (b, n) bool, prompt_mask (b, n) bool) -> (b,) float
RewardFn = Callable[..., Tensor]


class RLHFTrainer:
    """Actor-critic PPO with GAE and a per-token KL penalty against the frozen start policy,
    or a critic-free algorithm (`algorithm=`, see `algorithms.py`; no critic is built).
    The loop: the module docstring; the networks: `policies.py`; the value head's start:
    `PPOConfig.value_head_init`."""

    @typechecked  # beartype, accepting ints where floats are annotated (kl_coef=0)
    def __init__(
        self,
        *,
        palm: PaLM,
        reward_model: Optional[RewardFn] = None,  # RewardModel or fn(seq, mask, prompt_mask)
        text_reward_fn: Optional[TextRewardFn] = None,  # fn(prompts, responses) -> floats
        # prompts: exactly one of the three
        prompt_token_ids: Optional[PromptIds] = None,
        prompts: Optional[list[str]] = None,
        prompts_path: Optional[Union[str, Path]] = None,
        tokenizer=None,
        ptx_data: Optional[Tensor] = None,
        critic: Optional[Union[PaLM, ImplicitPRM]] = None,  # a separate critic, see networks.py
        actor_critic: Optional[ActorCritic] = None,  # prebuilt networks, see networks.py
        actor_lora_scope: Optional[str] = None,
        critic_lora_scope: Optional[str] = None,
        accelerate_kwargs: Optional[dict] = None,
        tracker_project_name: str = "palm-rlhf-ppo",
        config: Optional[PPOConfig] = None,
        **hyperparameters,  # any PPOConfig field: actor_lr=..., kl_coef=..., see config.py
    ):
        if actor_critic is not None:
            if actor_critic.actor.palm is not palm or critic is not None:
                raise ValueError("actor_critic= must be built on palm=, with no separate critic=")
            hyperparameters = trainer_options(actor_critic, config, hyperparameters)
        self.config = config = PPOConfig.from_keywords(config, **hyperparameters)
        reward_model = resolve_reward(reward_model, text_reward_fn, tokenizer)
        if config.ptx_coef > 0 and ptx_data is None:
            raise ValueError("ptx_coef > 0 needs ptx_data (token ids of pretraining text)")
        options = dict(mixed_precision=config.mixed_precision, cpu=config.cpu)
        options.update(accelerate_kwargs or {})  # the caller's Accelerate options win
        self.accelerator = make_accelerator(seed=config.seed, **options)
        device = self.accelerator.device
        self.pad_value = self.config.pad_value
        self.kl_controller = KLController(config.kl_coef, config.target_kl)

        # prompts first: a bad prompt must fail before any scope is added to the user's PaLM
        prompt_list = load_prompts(
            palm.num_tokens, prompt_token_ids, prompts, prompts_path, tokenizer, self.pad_value
        )
        self.prompts = PromptBank(
            *(t.to(device) for t in PromptBank.build(prompt_list, self.pad_value))
        )
        self.ptx_data = PtxData.build(ptx_data, palm.num_tokens, config.ptx_seq_len)

        # networks: actor and critic are scopes on `palm` or full copies; `palm` is the reference.
        # Critic-free algorithms build no critic; FlowRL trains a small log Z(x) head instead.
        palm.to(device)
        scopes = (actor_lora_scope, critic_lora_scope)
        self.reference, self.networks, self.sharded = prepare_networks(
            self.accelerator, palm, config, scopes, critic, actor_critic
        )  # name -> (prepared module, optimizer)
        (self.actor, self.actor_optim), (self.critic, self.critic_optim), (self.log_z, _) = (
            self.networks.get(name, (None, None)) for name in ("actor", "critic", "log_z")
        )
        self.actor_scope = self.actor_module.scope
        self.critic_scope = self.critic_module.scope if self.critic is not None else None

        self.reward_model = reward_model
        if isinstance(reward_model, nn.Module):
            reward_model.to(device)

        # sampling draws from `generator` (on the device); prompt picks, shuffles and ptx
        # windows from `cpu_generator`; both are saved, so a resumed run continues identically
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=device).manual_seed(config.seed + 1000 * rank)
        self.cpu_generator = torch.Generator().manual_seed(config.seed + 1000 * rank + 1)
        self.generators = {"generator": self.generator, "cpu_generator": self.cpu_generator}
        self.episodes, self.updates = 0, 0
        self.process_rewards = getattr(self.critic_module, "process_rewards", False)  # a PRM
        self.value_head_initialised = config.value_head_init == "zero" or self.process_rewards
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
        return None if self.critic is None else self.accelerator.unwrap_model(self.critic)

    def modules(self) -> dict:
        """The trained networks, unwrapped: name -> module (actor; critic or log_z if any)."""
        return {name: self.accelerator.unwrap_model(n) for name, (n, _) in self.networks.items()}

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def score(self, tokens: Tensor, mask: Tensor, prompt_mask: Tensor) -> Tensor:
        """Reward of left-justified sequences (b, n) -> (b,); see `rollout.score_sequences`."""
        return rollout_module.score_sequences(self.reward_model, tokens, mask, prompt_mask)

    # ------------------------------------------------------------------ phase 1: rollout

    def sample_prompts(self, num_prompts: int, group_size: int = 1) -> tuple[Tensor, Tensor]:
        """`num_prompts` prompts drawn uniformly with replacement, each repeated `group_size`
        times in contiguous rows (one group per prompt): left-padded (b, P) + mask."""
        index = torch.randint(len(self.prompts), (num_prompts,), generator=self.cpu_generator)
        return self.prompts.select(index.repeat_interleave(group_size).to(self.device))

    @torch.no_grad()
    def rollout(
        self,
        prompt: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        eos_token: Optional[int] = None,
        temperature: Optional[float] = None,
        scoring_passes: bool = True,
    ) -> tuple[Experience, Tensor]:
        """Phase 1 on left-padded prompts (b, P): see `rollout.collect`. Returns the experience
        (advantages and returns still 0) and whether each response ended with EOS (b,)."""
        temperature = self.config.temperature if temperature is None else temperature
        new_tokens = response_budget(
            prompt.shape[1], max_new_tokens, max_seq_len, self.reference.config.max_seq_len
        )
        actor, critic = self.actor_module, self.critic_module
        # mixed precision (mixed_precision="bf16") covers sampling as well
        with evaluation_mode([actor, critic or actor, self.reference]), self.accelerator.autocast():
            nets = (actor, self.reference, critic, self.reward_model)
            sampling = dict(
                temperature=temperature, top_k=self.config.top_k, top_p=self.config.top_p
            )
            return collect(
                *nets,
                prompt,
                prompt_mask,
                new_tokens,
                **sampling,
                pad_value=self.pad_value,
                eos_token=eos_token,
                generator=self.generator,
                stop_early=not self.sharded,
                scoring_passes=scoring_passes,
                group_size=self.config.responses_per_prompt,
            )

    # ------------------------------------------------------------------ phases 2 and 3

    @torch.no_grad()
    def rewards_and_advantages(
        self, experience: Experience, ended: Tensor, budgets: Optional[Tensor] = None
    ) -> tuple[Experience, dict[str, float]]:
        """Scores -> shaped scores (`shape_scores`; `budgets` (b,): each response's token
        budget, for the overlong penalty) -> per-token rewards -> GAE advantages and returns
        (whitened as configured); critic-free algorithms: `critic_free_advantages`."""
        config, kl_coef = self.config, self.kl_controller.kl_coef
        lengths = experience.action_mask.sum(dim=-1)
        scores = shape_scores(experience.scores, ended, config, lengths, budgets)
        experience = experience._replace(scores=scores)
        global_sum = lambda t: self.accelerator.reduce(t, "sum")  # noqa: E731
        if self.critic is None:
            return critic_free_advantages(experience, config, kl_coef, global_sum)
        # a fresh value head moves to the first rollout's mean return
        shift = None if self.value_head_initialised else self._init_value_head
        experience, stats = ppo_advantages(experience, config, kl_coef, shift, global_sum)
        return experience, {**stats, "kl_coef": kl_coef}

    def _init_value_head(self, shift: float) -> float:
        """Move the head (weight 0: one value) by the global shift, as nearly as a binned head
        allows; returns the shift applied."""
        self.value_head_initialised = True
        return self.critic_module.shift_start(shift)

    # ------------------------------------------------------------------ phase 4: PPO epochs

    def learn(
        self,
        experience: Experience,
        temperature: float,
        max_new_tokens: int = 1,
        own_old_logprobs: bool = False,
    ) -> dict[str, float]:
        """`epochs` passes of shuffled minibatches (of whole groups), one gradient step of every
        trained network each (`ppo/learning.py`; PPO-ptx adds the actor's LM loss); returns the
        mean of each loss statistic. `max_new_tokens`: the constant of
        "seq-mean-token-sum-norm"; `own_old_logprobs`: the rollout skipped them
        (`update.minibatch_loss`)."""
        return learning.learn(self, experience, temperature, max_new_tokens, own_old_logprobs)

    # ------------------------------------------------------------------ one iteration, loop

    def step(
        self,
        num_rollouts: int,
        max_response_tokens: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        eos_token: Optional[int] = None,
        temperature: Optional[float] = None,
        batch_size: Optional[int] = None,
        learn: bool = True,
    ) -> Optional[dict]:
        """One iteration over `num_rollouts` fresh rollouts (global, rounded up to whole groups
        of `group_size` on one process), sampled `batch_size` (default `rollout_batch_size`) at
        a time; returns the iteration's record. `learn=False` only rolls out."""
        config = self.config
        temperature = config.temperature if temperature is None else temperature
        if config.overlong_filtering and eos_token is None:
            raise ValueError("overlong_filtering needs eos_token: without it no response ends")
        batch_size = batch_size or config.rollout_batch_size
        world, group = self.accelerator.num_processes, config.responses_per_prompt
        local_prompts = max(1, math.ceil(num_rollouts / world / group))
        per_chunk = max(1, batch_size // group)
        model_limit = self.reference.config.max_seq_len
        # neither old nor reference log-probs read by this update: skip both passes
        skip = learn and skips_scoring(config, local_prompts * group, world)

        def chunk(num_prompts: int) -> Groups:  # 1. rollout, with each response's budget
            prompt, prompt_mask = self.sample_prompts(num_prompts, group)
            budget = response_budget(prompt.shape[1], max_response_tokens, max_seq_len, model_limit)
            rolled = self.rollout(
                prompt, prompt_mask, budget, None, eos_token, temperature, not skip
            )
            return Groups(*rolled, torch.full_like(rolled[0].scores, budget).long())

        rolled, sampling_stats = roll_out(
            chunk, local_prompts, per_chunk, config, self.accelerator, learn
        )
        self.episodes += local_prompts * group * world
        if not learn:
            return None
        experience, ended, raw = rolled.experience, rolled.ended, rolled.experience.scores
        experience, rollout_stats = self.rewards_and_advantages(experience, ended, rolled.budgets)
        observed_kl = torch.tensor(rollout_stats["kl"], device=self.device)
        self.kl_controller.update(float(self.accelerator.reduce(observed_kl, "mean")))
        if skip:  # the KL to the reference was not measured (scoring_passes.py)
            rollout_stats.update(kl=math.nan, kl_per_token=math.nan)
        lengths = experience.action_mask.sum(dim=-1)  # the longest: Dr. GRPO's constant
        longest, response_length = int(lengths.max()), float(lengths.float().mean())
        experience, filtered = filter_overlong(experience, ended, config)  # DAPO
        update_stats = self.learn(  # 4.
            experience, temperature, max_response_tokens or longest, own_old_logprobs=skip
        )
        self.updates += 1
        record = dict(
            reward=float(raw.mean()),
            reward_std=float(raw.std()) if raw.numel() > 1 else 0.0,
            response_length=response_length,
            missing_eos_fraction=float((~ended).float().mean()) if eos_token is not None else 0.0,
            **rollout_stats,
            **sampling_stats,
            **filtered,
            **update_stats,
        )
        return self.log(record)  # 5.

    def log(self, record: dict[str, float]) -> dict:
        """Average a record over processes, append it to `history`, send it to trackers."""
        record = {
            "update": self.updates,
            "episodes": self.episodes,
            **mean_over_processes(self.accelerator, record),
        }
        self.history.append(record)
        if self.accelerator.log_with:
            self.accelerator.log(record, step=self.updates)
        return record

    def train(
        self,
        num_episodes: int = 50000,
        max_timesteps: int = 500,
        update_timesteps: int = 5000,
        max_batch_size: Optional[int] = None,
        max_seq_len: int = 2048,
        eos_token: Optional[int] = None,
        temperature: Optional[float] = None,
        *,
        num_rollouts: Optional[int] = None,
        rollouts_per_update: Optional[int] = None,
        max_response_tokens: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        progress: Optional[bool] = None,
    ) -> list[dict]:
        """Roll out and learn, counting as the reference project does (`rl/schedule.py`):
        `num_episodes x max_timesteps` rollouts, a learning step per `update_timesteps`,
        responses filling `max_seq_len`; or in direct terms `num_rollouts`,
        `rollouts_per_update`, `max_response_tokens`. `max_batch_size` caps prompts sampled at
        once. Returns this call's records (one per learning step), also kept in `history`."""
        plan = rollout_schedule(
            num_episodes, max_timesteps, update_timesteps, num_rollouts, rollouts_per_update
        )
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        response = dict(
            max_response_tokens=max_response_tokens,
            max_seq_len=max_seq_len,
            eos_token=eos_token,
            temperature=temperature,
            batch_size=max_batch_size,
        )
        show = self.config.progress if progress is None else progress
        return run_schedule(self, plan, response, checkpoint_every, checkpoint_dir, show)

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
        filter_logits_fn: Optional[Callable[..., Tensor]] = reference_top_k,
        filter_thres: float = 0.9,
    ) -> Union[Tensor, BestOfN]:
        """Sample `num_samples` responses to one prompt (n,), return the one the reward model
        scores highest: prompt + response up to EOS, (n_best,). `max_seq_len` counts the prompt.
        With `return_scores=True`, a `BestOfN` with every sample and score. Decoding is the
        reference's (top-k 0.9, see `PaLM.generate`) unless `filter_logits_fn`, or `top_k`/
        `top_p` here or in the config, say otherwise; temperature defaults to the config's."""
        actor, config = self.actor_module, self.config
        options = dict(finetune_scope=actor.scope, pad_value=self.pad_value, eos_token=eos_token)
        options["temperature"] = config.temperature if temperature is None else temperature
        top_k = config.top_k if top_k is None else top_k
        top_p = config.top_p if top_p is None else top_p
        options.update(reference_filters(top_k, top_p, filter_logits_fn, filter_thres))
        options["generator"] = self.generator
        with evaluation_mode([actor]), self.accelerator.autocast():
            out = best_of_n(
                actor.palm, self.reward_model, prompt, max_seq_len, num_samples, **options
            )
        return out if return_scores else out.sequence

    def state_dict(self) -> dict:
        """Everything a resumed run needs: trained tensors of each network (adapters or full
        weights, named independently of the scope; no critic when the algorithm has none), its
        optimizer, both generators, counters, KL control, history and the hyperparameters.
        Tensors and plain values only (no pickled code). A collective under several
        processes: every rank's generator states are gathered."""
        return {
            **{name: module.trainable_state() for name, module in self.modules().items()},
            "optimizers": {
                name: optimizer_state(self.accelerator.unwrap_model(net), optim)
                for name, (net, optim) in self.networks.items()
            },
            "rng": io.gather_generator_states(self.generators, self.accelerator.num_processes),
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
        io.check_compatible(meta, self.reference.config, self.config.to_dict(), source)
        for name, module in self.modules().items():
            try:
                module.load_trainable_state(state[name])
            except (RuntimeError, KeyError) as err:  # missing/unexpected keys or shapes
                raise CheckpointError(f"{source}: the {name} does not fit: {err}") from err
            load_optimizer_state(module, self.networks[name][1], state["optimizers"][name])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        io.restore_generator_states(state["rng"], self.generators, rank, world, source)
        self.episodes, self.updates = meta["episodes"], meta["updates"]
        self.value_head_initialised = meta["value_head_initialised"]
        self.kl_controller.load_state_dict(meta["kl_controller"])
        self.history = list(meta["history"])

    def save(self, path: Union[str, Path]) -> Optional[Path]:
        """Write `path/step-<updates>/` and `path/latest` atomically (see `ppo/checkpoint.py`).
        Every process takes part; the main process writes. Returns the folder (None elsewhere)."""
        self.accelerator.wait_for_everyone()
        folder, state = None, self.state_dict()
        if self.accelerator.is_main_process:
            folder = io.write_trainer_state(path, self.updates, state, self.config.keep_last)
        self.accelerator.wait_for_everyone()
        return folder

    def load(self, path: Union[str, Path]) -> RLHFTrainer:
        """Restore a `save`d state (a checkpoint root or one update folder) and continue."""
        folder, state = io.read_trainer_state(path, device=self.device)
        self.load_state_dict(state, source=str(folder))
        return self
