"""PPOConfig: the hyperparameters of RLHFTrainer in one validated, JSON-friendly dataclass.

The trainer's keyword arguments (named as in the reference project where one exists) are
mirrored here; the config is saved with every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from palm_rlhf.rl_math import KL_KINDS


@dataclass(frozen=True)
class PPOConfig:
    # optimisation (AdamW for the actor and for the critic)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    actor_wd: float = 0.0
    critic_wd: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_norm: Optional[float] = None  # gradient clipping of each network; None = off
    # networks
    actor_lora: bool = True
    critic_lora: bool = True
    actor_lora_r: int = 8
    critic_lora_r: int = 8
    value_head_init: str = "mean_return"  # or "zero": see RLHFTrainer
    # PPO losses (Schulman et al. 2017)
    eps_clip: float = 0.2  # policy ratio clip
    value_clip: Optional[float] = 0.4  # value clip around the rollout's values; None = off
    beta_s: float = 0.01  # entropy bonus
    minibatch_size: int = 16
    epochs: int = 1
    # rewards and advantages
    kl_coef: float = 0.1  # per-token KL penalty against the reference policy
    target_kl: Optional[float] = None  # nats per response; set -> adaptive kl_coef
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    reward_clip: Optional[float] = None
    missing_eos_penalty: Optional[float] = None  # subtracted from the score without EOS
    # PPO-ptx (Ouyang et al. 2022): pretraining LM loss mixed into the actor's loss
    ptx_coef: float = 0.0
    ptx_seq_len: int = 128
    # rollouts
    rollout_batch_size: int = 32
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    pad_value: int = 0
    nan_policy: str = "raise"  # or "skip": drop a minibatch whose loss is not finite
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        checks = {
            "minibatch_size >= 1": self.minibatch_size >= 1,
            "epochs >= 1": self.epochs >= 1,
            "rollout_batch_size >= 1": self.rollout_batch_size >= 1,
            "actor_lora_r >= 1 and critic_lora_r >= 1": min(self.actor_lora_r, self.critic_lora_r)
            >= 1,
            "eps_clip > 0": self.eps_clip > 0,
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
            "temperature >= 0": self.temperature >= 0,
            "value_head_init in ('mean_return', 'zero')": self.value_head_init
            in ("mean_return", "zero"),
            "nan_policy in ('raise', 'skip')": self.nan_policy in ("raise", "skip"),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid PPO hyperparameters: need {'; '.join(failed)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}
