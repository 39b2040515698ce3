"""The reference project's other trainers as front doors onto our one `RLHFTrainer`.

palm-rlhf-pytorch 0.8.0 has, beside its PPO `RLHFTrainer`, `grpo.RLHFTrainer`,
`flowrl.FlowRLTrainer` and `tpo.RLHFTrainer`. `palm_rlhf.grpo`, `.flowrl` and `.tpo` take every
keyword of theirs with its meaning there and build `RLHFTrainer(algorithm=...)`; this module is
what the three share:

- `ReferenceTrainer`: a subclass of our trainer whose constructor reads the reference's keywords
  (their defaults, declared once per front door and pinned against the reference's signature
  in `tests/fixtures/reference/dropin.json`), turns them into `PPOConfig` keywords with the
  front door's `to_config`, and refuses unknown ones in one line;
- `train(num_episodes, max_timesteps, update_timesteps, ...)` counted as theirs: each timestep
  takes ONE prompt and samples it `group_size` times (the reference's `*_num_times_sample + 1`),
  a learning step follows every `update_timesteps` timesteps (prompts, not responses), and the
  prompts after the last multiple are sampled and never learned from;
- `score_centering_loss` with the reference's signature (per-token losses, no mask).

Our own keywords that the front door does not set (`seed`, `progress`, `rollout_batch_size`,
`mixed_precision`, ...) pass through; those it sets are refused (use `palm_rlhf.RLHFTrainer`
with `algorithm=` for full control).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Optional

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional import policy_losses
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from palm_rlhf.typecheck import typechecked

# Constructor keywords of ours that are not PPOConfig fields (prompts, networks, Accelerate)
TRAINER_KEYWORDS = tuple(
    name for name in inspect.signature(RLHFTrainer.__init__).parameters if name != "self"
)
CONFIG_FIELDS = tuple(f.name for f in fields(PPOConfig))
# passed through unchanged: the reference's names for these mean what ours do
SHARED_INPUTS = ("prompts", "prompts_path", "prompt_token_ids", "tokenizer", "accelerate_kwargs")
# keyword defaults all three reference trainers share (beside palm and reward_model)
SHARED_DEFAULTS = dict(
    prompts=None,
    prompts_path=None,
    prompt_token_ids=None,
    tokenizer=None,
    actor_lr=1e-4,
    actor_wd=0.0,
    actor_lora=True,
    actor_lora_r=8,
    actor_dropout=0.0,
    betas=(0.9, 0.999),
    max_norm=None,
    beta_s=0.01,
    pad_value=0.0,
    minibatch_size=16,
    epochs=1,
    accelerate_kwargs={},
)
SAME_MEANING = (
    "actor_lr",
    "actor_wd",
    "actor_lora",
    "actor_lora_r",
    "actor_dropout",
    "betas",
    "max_norm",
    "pad_value",
    "epochs",
)


def group_size(trainer: str, keyword: str, value: int) -> int:
    """The reference samples each prompt `value + 1` times; a group needs at least two."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{trainer}: {keyword} must be an int >= 1 (each prompt is sampled {keyword} + 1 "
            f"times and normalised as a group), got {value!r}"
        )
    return value + 1


@typechecked
def score_centering_loss(
    train_log_probs: Tensor,
    samp_probs: Tensor,
    actions: Tensor,
    advantages: Tensor,
    topk: Optional[int] = None,
    weight_fn: Callable[[Tensor], Tensor] = torch.ones_like,
    eps: float = 1e-6,
) -> Tensor:
    """The reference's `score_centering_loss` (its top-level export): per-token losses (b, n)
    from log-probs and sampler probabilities (b, n, v), actions (b, n) and advantages (b,) or
    (b, n); the caller masks and reduces them. The math is `policy_losses.score_centering_loss`
    (Marek & Ryabinin 2026), applied to each token on its own."""
    b, n = actions.shape
    if train_log_probs.shape[:2] != (b, n) or samp_probs.shape != train_log_probs.shape:
        raise ValueError("train_log_probs and samp_probs must be (b, n, v) for actions (b, n)")
    if advantages.shape == (b,):
        advantages = rearrange(advantages, "b -> b 1").expand(b, n)
    if advantages.shape != (b, n):
        raise ValueError(
            f"advantages must be (b,) or (b, n) = {(b, n)}, got {tuple(advantages.shape)}"
        )

    def one_token(log_probs, sampler_probs, action, advantage):  # each (1, 1, ...)
        mask = torch.ones_like(action, dtype=torch.bool)
        return policy_losses.score_centering_loss(
            log_probs, sampler_probs, action, advantage, mask, topk, weight_fn, "token", eps
        )

    tokens = [
        rearrange(t, "b n ... -> (b n) 1 1 ...")
        for t in (train_log_probs, samp_probs, actions, advantages)
    ]
    return rearrange(torch.func.vmap(one_token)(*tokens), "(b n) -> b n", b=b)


class ReferenceTrainer(RLHFTrainer):
    """`RLHFTrainer` built from a reference trainer's keywords. A front door sets `name` (the
    reference's dotted name), `algorithm`, `reference_defaults` (its keyword defaults, beside
    `palm` and `reward_model`) and `to_config(keywords, given, palm) -> PPOConfig keywords`."""

    name: str = ""
    algorithm: str = ""
    reference_defaults: dict[str, Any] = {}
    to_config: Callable[[dict, dict, PaLM], dict]

    def __init__(self, *, palm: PaLM, reward_model: Optional[Callable] = None, **keywords):
        theirs = {k: v for k, v in keywords.items() if k in self.reference_defaults}
        ours = {k: v for k, v in keywords.items() if k not in self.reference_defaults}
        resolved = {**self.reference_defaults, **theirs}
        config = type(self).to_config(resolved, theirs, palm)  # the same keys whatever the values
        self._check_ours(ours, set(config) | {"algorithm"})
        inputs = {k: resolved[k] for k in SHARED_INPUTS if resolved[k] is not None}
        inputs["accelerate_kwargs"] = resolved["accelerate_kwargs"] or None
        super().__init__(
            palm=palm,
            reward_model=reward_model,
            algorithm=self.algorithm,
            **inputs,
            **config,
            **ours,
        )

    def _check_ours(self, ours: dict, owned: set) -> None:
        refused = sorted(set(ours) & owned)
        if refused:
            raise TypeError(
                f"{self.name} sets {', '.join(refused)} from the reference's keywords; pass those "
                "(or use palm_rlhf.RLHFTrainer(algorithm=...) for our own options)"
            )
        known = set(self.reference_defaults) | set(TRAINER_KEYWORDS) | set(CONFIG_FIELDS)
        unknown = sorted(set(ours) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
            detail = ", ".join(
                f"{k!r}" + (f" (did you mean {v}?)" if v else "") for k, v in hints.items()
            )
            raise TypeError(f"{self.name} got unknown keyword(s) {detail}")

    def reference_train(
        self,
        num_episodes: int,
        max_timesteps: int,
        update_timesteps: int,
        max_seq_len: int,
        eos_token: Optional[int],
        temperature: float,
        **ours,
    ) -> list[dict]:
        """`num_episodes x max_timesteps` prompts, each sampled `group_size` times; a learning
        step after every `update_timesteps` prompts (see the module docstring)."""
        for name, value in (
            ("num_episodes", num_episodes),
            ("max_timesteps", max_timesteps),
            ("update_timesteps", update_timesteps),
        ):
            if value < 1:
                raise ValueError(f"{self.name}.train: {name} must be at least 1, got {value}")
        group = self.config.group_size
        return super().train(
            max_seq_len=max_seq_len,
            eos_token=eos_token,
            temperature=temperature,
            num_rollouts=num_episodes * max_timesteps * group,
            rollouts_per_update=update_timesteps * group,
            **ours,
        )

    def train(
        self,
        num_episodes: int = 50000,
        max_timesteps: int = 500,
        update_timesteps: int = 5000,
        max_batch_size: Optional[int] = 16,
        max_seq_len: int = 2048,
        eos_token: Optional[int] = None,
        temperature: float = 1.0,
        **ours,
    ) -> list[dict]:
        """The reference's `train` (grpo, flowrl): `max_batch_size` is accepted and, as there,
        unused (`rollout_batch_size` sets how many responses are sampled at once here). Our
        own keyword-only options (`checkpoint_every`, `checkpoint_dir`, `progress`) pass on.
        Returns one record per learning step."""
        del max_batch_size  # the reference never reads it
        return self.reference_train(
            num_episodes,
            max_timesteps,
            update_timesteps,
            max_seq_len,
            eos_token,
            temperature,
            **ours,
        )
