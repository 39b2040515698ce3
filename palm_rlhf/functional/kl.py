"""Per-token KL estimators and the KL statistics every RL loop logs.

Estimators of KL(p || q) from samples of p (Schulman, "Approximating KL divergence", 2020),
with d = log p - log q and r = q / p = exp(-d):

    k1  = d                      unbiased, can be negative
    k2  = d^2 / 2                biased, low variance, >= 0
    k3  = (r - 1) - log r        unbiased, low variance, >= 0 (computed as expm1(-d) + d)
    abs = |d|

A new estimator is one entry of `KL_ESTIMATORS`; its key becomes a choice of `kl_kind`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from palm_rlhf.functional.masked import masked_mean, masked_sum
from palm_rlhf.typecheck import typechecked

# name -> estimator of the per-token KL from d = log p - log q (any shape -> same shape)
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d**2,
    "k3": lambda d: torch.expm1(-d) + d,
    "abs": lambda d: d.abs(),
}
KL_KINDS = tuple(KL_ESTIMATORS)


@typechecked
def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(p || q): logprobs = log p (policy), ref_logprobs = log q
    (reference), any shape -> same shape; `kind` names one of `KL_ESTIMATORS`."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; choose one of {KL_KINDS}")
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)


@typechecked
def kl_stats(kl: Tensor, mask: Tensor) -> dict[str, float]:
    """The logged KL of a rollout from per-token estimates (b, n) and the response mask:
    `kl` in nats per response (mean over rows of each row's sum) and `kl_per_token`."""
    return dict(
        kl=float(masked_sum(kl, mask, dim=-1).mean()),
        kl_per_token=float(masked_mean(kl, mask)),
    )
