"""PPOConfig: the one place PPO's hyperparameters, defaults, validation and help text live.

`RLHFTrainer(**keywords)` builds a PPOConfig from its keywords (names as in the reference
project where one exists), `palm-rlhf ppo` builds its flags from the same fields, and the
config is saved with every checkpoint. It inherits the run options every stage shares (seed,
mixed precision, NaN policy, progress bar, sharding, trackers, checkpoints kept); `max_norm`
is the loop stages' option with the reference's default (None).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from palm_rlhf.functional.hl_gauss import HLGauss
from palm_rlhf.functional.kl import KL_KINDS
from palm_rlhf.functional.policy_losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGG_ALIASES,
    LOSS_AGG_MODES,
)
from palm_rlhf.model.sampling_options import SamplingOptions
from palm_rlhf.options import option
from palm_rlhf.rl.algorithms import ALGORITHMS, policy_gradient_objective
from palm_rlhf.train.run_options import RunOptions, default_for
from palm_rlhf.typecheck import typechecked

# the command line's choices of `algorithm`: the registry's keys ("ppo" has a critic; the others
# are critic-free, see rl/algorithms.py); validation below reads the registry itself
ALGORITHM_NAMES = tuple(ALGORITHMS)


@typechecked  # the generated __init__ checks every hyperparameter's type
@dataclass
class PPOConfig(RunOptions, SamplingOptions):
    # the algorithm: PPO (actor-critic) or a critic-free one (no critic network is built)
    algorithm: str = option("ppo", "online RL algorithm", choices=ALGORITHM_NAMES)
    group_size: int = option(
        4, "responses sampled per prompt, normalised together (all but ppo; >= 2 for groups)"
    )
    scale_by_std: bool = option(
        True, "grpo: divide by the group's reward std (--no-scale-by-std: Dr. GRPO)"
    )
    loss_agg_mode: Optional[str] = option(
        None,
        "how token losses average into one loss (verl's loss_agg_mode): token-mean (DAPO; TRL "
        "loss_type bnpo), seq-mean-token-mean (GRPO; TRL grpo) or seq-mean-token-sum-norm (Dr. "
        "GRPO, / (b * max_response_tokens); TRL dr_grpo); the old names token, sequence, "
        "constant still work; default: token-mean for ppo, seq-mean-token-mean otherwise",
        choices=(*LOSS_AGG_MODES, *LOSS_AGG_ALIASES),
        aliases=("length_norm",),  # its name before verl's, as a keyword and a flag
    )
    score_centering: bool = option(
        False, "grpo/rloo/reinforce++: centred-score policy gradient instead of the clipped one"
    )
    score_centering_topk: Optional[int] = option(
        None, "score centering over the sampler's k likeliest tokens and one tail (none: all)"
    )
    # code, not a number: an API keyword only (no flag; saved by name in the checkpoint)
    score_centering_weight_fn: Optional[Callable] = option(
        None, "score centering's weight f(pi / mu) of each token (none: 1)", cli=False
    )
    max_rl: bool = option(
        False, "grpo: MaxRL, divide the centred rewards by the group's mean reward, not its std"
    )
    dr_grpo_constant: Optional[float] = option(
        None, "grpo with --no-scale-by-std: divide the centred rewards by this constant"
    )
    dynamic_sampling: bool = option(
        False,
        "grpo/rloo/flowrl/tpo (DAPO): drop groups whose rewards are all equal and sample more "
        "prompts in their place",
    )
    dynamic_sampling_max_retries: int = option(
        10, "extra rollout rounds dynamic sampling may take per update before it stops refilling"
    )
    flowrl_beta: float = option(15.0, "flowrl: reward temperature beta of trajectory balance")
    tpo_eta: float = option(1.0, "tpo: temperature eta of the target distribution")
    # optimisation (AdamW for the actor and for the critic)
    actor_lr: float = option(1e-4, "actor learning rate")
    critic_lr: float = option(1e-4, "critic learning rate (flowrl: of the log Z head)")
    actor_wd: float = option(0.0, "actor weight decay")
    critic_wd: float = option(0.0, "critic weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    # the loop stages' option (its help declared once), with the reference's default: no clipping
    max_norm: Optional[float] = default_for("max_norm", None)
    # networks
    actor_lora: bool = option(True, "train the actor as a LoRA scope (else full weights)")
    critic_lora: bool = option(True, "train the critic as a LoRA scope (else full weights)")
    actor_lora_r: int = option(8, "actor LoRA rank")
    critic_lora_r: int = option(8, "critic LoRA rank")
    critic_pooled_values: bool = option(
        False,
        "one value per sequence (the masked mean of the response's states), the baseline of "
        "every token: A_t = G_t - V (lam unused); else a value per token for GAE",
    )
    critic_num_pred_bins: Optional[int] = option(
        None, "a classification critic over this many value bins (HL-Gauss loss); None: regression"
    )
    hl_gauss_loss_kwargs: Optional[dict] = option(
        None,
        "the bins, as JSON: min_value, max_value, sigma_to_bin_ratio, clamp_to_range, "
        "min_max_value_on_bin_center, sigma, eps (None: the reference's 0..5 on bin centres)",
    )
    # the value head starts with weight 0; "mean_return" sets its bias on the first rollout to
    # that rollout's mean return (the best constant predictor), so the first value losses
    # measure the critic's real error rather than the scale of the reward
    value_head_init: str = option(
        "mean_return",
        "value head bias: the first rollout's mean return, or zero",
        choices=("mean_return", "zero"),
    )
    # policy losses (Schulman et al. 2017): ppo, grpo, rloo, reinforce++
    eps_clip: float = option(0.2, "policy ratio clip")
    clip_eps_low: Optional[float] = option(
        None, "the ratio's lower clip, 1 - this (none: eps_clip)"
    )
    clip_eps_high: Optional[float] = option(
        None, "the ratio's upper clip, 1 + this (none: eps_clip); above the low one: clip-higher"
    )
    dual_clip_c: Optional[float] = option(
        None, "dual clip (Ye et al. 2020): a negative advantage's loss is at most -c * A; c > 1"
    )
    importance_sampling_level: str = option(
        "token",
        "policy ratio per token, or per sequence exp(mean_t log ratio) (GSPO)",
        choices=IMPORTANCE_SAMPLING_LEVELS,
    )
    simple_policy_optimization: bool = option(
        False, "SPO: the loss -r A + |A| (r - 1)^2 / (2 eps_clip) in place of the ratio clip"
    )
    entropy_to_advantage_scale: float = option(
        0.0, "add min(scale * H_t, |A| / kappa) to each token's advantage (0: off)"
    )
    entropy_to_advantage_kappa: float = option(
        2.0, "kappa of entropy_to_advantage_scale's cap |A| / kappa"
    )
    overlong_filtering: bool = option(
        False, "leave responses that never reach EOS out of the loss (DAPO; needs eos_token)"
    )
    overlong_buffer_len: Optional[int] = option(
        None,
        "DAPO's soft overlong penalty: 0 up to max_response_tokens - this, then linear down to "
        "-overlong_penalty_factor at max_response_tokens (none: off)",
    )
    overlong_penalty_factor: float = option(1.0, "the soft overlong penalty at the budget")
    value_clip: Optional[float] = option(0.4, "value clip around the rollout's values")
    beta_s: float = option(0.01, "entropy bonus (every algorithm), averaged like the loss's tokens")
    kl_div_loss_weight: float = option(
        0.0,
        "drift from the rollout policy: ppo, a loss term of weight * k3 KL per sampled token; "
        "grpo/rloo/reinforce++, weight * each response's full-vocabulary KL subtracted from its "
        "advantage (the reference's default 0.1; see the porting page)",
    )
    actor_dropout: float = option(0.0, "dropout inside the PaLM during the actor's updates")
    critic_dropout: float = option(0.0, "dropout inside the PaLM during the critic's updates")
    minibatch_size: int = option(16, "episodes per gradient step")
    epochs: int = option(1, "passes over each rollout batch")
    # rewards and advantages
    kl_coef: float = option(
        0.1,
        "KL to the frozen reference: a per-token reward penalty (ppo, reinforce++) or the "
        "weight of a k3 loss term (grpo, rloo, tpo); flowrl ignores it",
    )
    target_kl: Optional[float] = option(None, "adapt kl_coef towards this KL per response")
    kl_kind: str = option("k1", "per-token KL estimator", choices=KL_KINDS)
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "normalise advantages over the rollout")
    whiten_rewards: bool = option(False, "scale per-token rewards to unit variance")
    reward_clip: Optional[float] = option(None, "clip reward-model scores to +-this")
    missing_eos_penalty: Optional[float] = option(
        None, "subtracted from the score of a response that never ends"
    )
    # PPO-ptx (Ouyang et al. 2022): pretraining LM loss mixed into the actor's loss
    ptx_coef: float = option(0.0, "weight of the pretraining loss (PPO-ptx; needs ptx_data)")
    ptx_seq_len: int = option(128, "pretraining window length for PPO-ptx")
    # rollouts
    rollout_batch_size: int = option(32, "prompts sampled at once")
    # temperature, top_k, top_p of the rollouts: inherited from SamplingOptions
    pad_value: Union[int, float] = option(0, "token id of padding")

    def __post_init__(self):
        self.check_sampling()  # temperature, top_k, top_p
        self.betas = tuple(self.betas)
        self.pad_value = int(self.pad_value)  # the reference project's default was the float 0.
        self.loss_agg_mode = LOSS_AGG_ALIASES.get(self.loss_agg_mode, self.loss_agg_mode)
        groups = tuple(k for k, v in ALGORITHMS.items() if v.groups)  # several per prompt
        gradient = tuple(k for k, v in ALGORITHMS.items() if v.loss is policy_gradient_objective)
        surrogate = ("ppo", *gradient)  # the ratio-based policy gradient, clipped or SPO
        critic_free_groups = tuple(k for k in groups if not ALGORITHMS[k].has_critic)
        on = self.algorithm
        reshaped = {  # options that change the ratio's clip, set away from their default
            "clip_eps_low": self.clip_eps_low is not None,
            "clip_eps_high": self.clip_eps_high is not None,
            "dual_clip_c": self.dual_clip_c is not None,
            "importance_sampling_level='sequence'": self.importance_sampling_level != "token",
        }
        reshaped = [name for name, given in reshaped.items() if given]
        checks = {
            "minibatch_size >= 1": self.minibatch_size >= 1,
            "epochs >= 1": self.epochs >= 1,
            "rollout_batch_size >= 1": self.rollout_batch_size >= 1,
            "actor_lora_r >= 1 and critic_lora_r >= 1": min(self.actor_lora_r, self.critic_lora_r)
            >= 1,
            "eps_clip > 0": self.eps_clip > 0,
            "kl_div_loss_weight >= 0": self.kl_div_loss_weight >= 0,
            "0 <= actor_dropout, critic_dropout < 1": 0 <= self.actor_dropout < 1
            and 0 <= self.critic_dropout < 1,
            "value_clip > 0 or None": self.value_clip is None or self.value_clip > 0,
            "max_norm > 0 or None": self.max_norm is None or self.max_norm > 0,
            "0 <= gamma <= 1": 0 <= self.gamma <= 1,
            "0 <= lam <= 1": 0 <= self.lam <= 1,
            "kl_coef >= 0": self.kl_coef >= 0,
            "target_kl > 0 or None": self.target_kl is None or self.target_kl > 0,
            f"kl_kind in {KL_KINDS}": self.kl_kind in KL_KINDS,
            "reward_clip > 0 or None": self.reward_clip is None or self.reward_clip > 0,
            "ptx_coef >= 0": self.ptx_coef >= 0,
            "ptx_seq_len >= 1": self.ptx_seq_len >= 1,
            "value_head_init in ('mean_return', 'zero')": self.value_head_init
            in ("mean_return", "zero"),
            "nan_policy in ('raise', 'skip')": self.nan_policy in ("raise", "skip"),
            f"algorithm in {tuple(ALGORITHMS)}": self.algorithm in ALGORITHMS,
            f"group_size >= 2 for {groups}, >= 1 otherwise": self.group_size
            >= (2 if self.algorithm in groups else 1),
            f"loss_agg_mode in {LOSS_AGG_MODES} or None": self.loss_agg_mode is None
            or self.loss_agg_mode in LOSS_AGG_MODES,
            "flowrl_beta > 0": self.flowrl_beta > 0,
            "tpo_eta > 0": self.tpo_eta > 0,
            "critic_num_pred_bins >= 2 or None": self.critic_num_pred_bins is None
            or self.critic_num_pred_bins >= 2,
            f"score_centering only with {gradient}": not self.score_centering
            or self.algorithm in gradient,
            "score_centering_topk >= 1 or None": self.score_centering_topk is None
            or self.score_centering_topk >= 1,
            "score_centering_topk / _weight_fn only with score_centering": self.score_centering
            or (self.score_centering_topk is None and self.score_centering_weight_fn is None),
            "clip_eps_low, clip_eps_high > 0 or None": all(
                eps is None or eps > 0 for eps in (self.clip_eps_low, self.clip_eps_high)
            ),
            "clip_eps_low < 1": self.clip_eps_low is None or self.clip_eps_low < 1,
            "dual_clip_c > 1 or None": self.dual_clip_c is None or self.dual_clip_c > 1,
            f"importance_sampling_level in {IMPORTANCE_SAMPLING_LEVELS}": (
                self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS
            ),
            f"{', '.join(reshaped)} only with {surrogate}": not reshaped or on in surrogate,
            f"simple_policy_optimization only with {surrogate}": not self.simple_policy_optimization
            or on in surrogate,
            "simple_policy_optimization without score_centering": not (
                self.simple_policy_optimization and self.score_centering
            ),
            f"no {', '.join(reshaped)} with simple_policy_optimization or score_centering": (
                not reshaped or not (self.simple_policy_optimization or self.score_centering)
            ),
            "entropy_to_advantage_scale >= 0": self.entropy_to_advantage_scale >= 0,
            "entropy_to_advantage_kappa > 0": self.entropy_to_advantage_kappa > 0,
            f"entropy_to_advantage_scale only with {surrogate}": (
                self.entropy_to_advantage_scale == 0 or on in surrogate
            ),
            f"kl_div_loss_weight only with {surrogate}": self.kl_div_loss_weight == 0
            or on in surrogate,
            "max_rl only with grpo": not self.max_rl or on == "grpo",
            "max_rl without Dr. GRPO (scale_by_std=False)": not self.max_rl or self.scale_by_std,
            "dr_grpo_constant > 0 or None": self.dr_grpo_constant is None
            or self.dr_grpo_constant > 0,
            "dr_grpo_constant only with grpo and scale_by_std=False": (
                self.dr_grpo_constant is None or (on == "grpo" and not self.scale_by_std)
            ),
            f"overlong_filtering only with {surrogate}": not self.overlong_filtering
            or on in surrogate,
            "overlong_buffer_len >= 1 or None": self.overlong_buffer_len is None
            or self.overlong_buffer_len >= 1,
            "overlong_penalty_factor >= 0": self.overlong_penalty_factor >= 0,
            f"dynamic_sampling only with the critic-free group algorithms {critic_free_groups}": (
                not self.dynamic_sampling or on in critic_free_groups
            ),
            "dynamic_sampling_max_retries >= 0": self.dynamic_sampling_max_retries >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid PPO hyperparameters: need {'; '.join(failed)}")
        if self.critic_num_pred_bins is not None:  # bad bins fail here, not at the first update
            HLGauss.from_kwargs(self.critic_num_pred_bins, self.hl_gauss_loss_kwargs)
        if self.mixed_precision == "fp16":
            # Accelerate keeps ONE gradient scaler and steps and updates it inside every prepared
            # optimizer's step(); with the actor's and the critic's two optimizers per backward,
            # the scale would move twice per step and the second clip would unscale gradients
            # the first had already unscaled. bf16 needs no scaler.
            raise ValueError(
                "mixed_precision='fp16' is refused for PPO: its actor and critic optimizers would "
                "share one gradient scaler that Accelerate steps once per optimizer, not once per "
                "update; use mixed_precision='bf16' (or 'no')"
            )

    @classmethod
    def from_keywords(cls, base: Optional[PPOConfig] = None, **keywords: Any) -> PPOConfig:
        """`base` (default: the defaults) with `keywords` replaced; an unknown keyword is a
        TypeError naming the closest known ones, never silently ignored. A field's older
        name (its `aliases`) is read as the field."""
        renamed = {old: f.name for f in fields(cls) for old in f.metadata.get("aliases", ())}
        for old, new in renamed.items():
            if old in keywords:
                if new in keywords:
                    raise TypeError(f"give {new}= only ({old}= is its old name)")
                keywords[new] = keywords.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
            detail = ", ".join(
                f"{k!r}" + (f" (did you mean {v}?)" if v else "") for k, v in hints.items()
            )
            raise TypeError(f"RLHFTrainer got unknown keyword(s) {detail}")
        values = asdict(base) if base is not None else {}
        return cls(**{**values, **keywords})

    @property
    def has_critic(self) -> bool:
        return ALGORITHMS[self.algorithm].has_critic

    @property
    def token_reduction(self) -> str:
        """The `loss_agg_mode` in force: the one given, else the algorithm's own."""
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return "token-mean" if self.has_critic else "seq-mean-token-mean"

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high) of the ratio's clip [1 - eps_low, 1 + eps_high]."""
        low = self.eps_clip if self.clip_eps_low is None else self.clip_eps_low
        return low, self.eps_clip if self.clip_eps_high is None else self.clip_eps_high

    @property
    def responses_per_prompt(self) -> int:
        """PPO samples one response per prompt; critic-free algorithms a group of them."""
        return 1 if self.has_critic else self.group_size

    def to_dict(self) -> dict:
        """Plain values (JSON): a weight function is saved by its name, for the record."""
        weight_fn = self.score_centering_weight_fn
        name = None if weight_fn is None else getattr(weight_fn, "__name__", repr(weight_fn))
        values = {**asdict(self), "betas": list(self.betas)}
        return {**values, "score_centering_weight_fn": name}
