"""The coefficient of the per-token KL penalty in PPO: fixed, or adapted to a target KL.

Adaptive control follows Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2: after each rollout with observed KL_t (nats per response),

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),        K_beta = 0.1 in the paper

so the coefficient grows while the policy drifts further than wanted and shrinks while it stays
closer, by at most a factor (1 +- 0.2 K_beta) per rollout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


def adaptive_kl_coef(
    kl_coef: float, observed_kl: float, target_kl: float, rate: float = 0.1
) -> float:
    """One step of the Ziegler et al. (2019) proportional controller (equations above)."""
    if target_kl <= 0:
        raise ValueError(f"target_kl must be positive, got {target_kl}")
    if not math.isfinite(observed_kl):
        return kl_coef  # a NaN KL says nothing about the direction to move
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + rate * error)


@dataclass
class KLController:
    """Holds the current KL coefficient; `update` adapts it when `target_kl` is set."""

    kl_coef: float
    target_kl: Optional[float] = None
    rate: float = 0.1

    def __post_init__(self):
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be positive or None, got {self.target_kl}")
        if self.target_kl is not None and self.kl_coef == 0:
            raise ValueError(
                "an adaptive KL controller (target_kl set) cannot start from kl_coef=0: "
                "it scales the coefficient multiplicatively, so 0 would stay 0"
            )

    def update(self, observed_kl: float) -> float:
        """Adapt to the KL of the last rollout (no-op for a fixed coefficient); new value."""
        if self.target_kl is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, observed_kl, self.target_kl, self.rate)
        return self.kl_coef

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef, self.target_kl, self.rate = (
            float(state["kl_coef"]),
            state["target_kl"],
            float(state["rate"]),
        )
