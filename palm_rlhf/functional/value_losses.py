"""The critic's losses and its quality measure, as pure tensor functions: (b, n) in, scalar out.

The binned (HL-Gauss) critic's clipped loss lives beside its bins in `hl_gauss.py`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from palm_rlhf.functional.masked import check_mask, check_same_shape, masked_mean, masked_var
from palm_rlhf.typecheck import typechecked


@typechecked
def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: Optional[float] = None,
) -> Tensor:
    """Critic loss 0.5 * mean_masked(max((V - R)^2, (V_clip - R)^2)): (b, n) x4 -> scalar.

    V_clip = V_old + clamp(V - V_old, -eps, eps), the pessimistic clipped value loss of PPO2
    (OpenAI baselines; Andrychowicz et al. 2021 sec. 3.3). With clip_eps None: 0.5 * masked MSE.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns)
    check_mask(mask, values)
    squared_error = (values - returns) ** 2
    if clip_eps is not None:
        clipped_values = clip_values(values, old_values, clip_eps)
        squared_error = torch.maximum(squared_error, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, mask)


def clip_values(values: Tensor, old_values: Tensor, clip_eps: float) -> Tensor:
    """V_clip = V_old + clamp(V - V_old, -eps, eps): the value kept near the rollout's."""
    return old_values + (values - old_values).clamp(-clip_eps, clip_eps)


@typechecked
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked entries: 1 = perfect critic, 0 = predicts the mean.

    Scalar float tensor, detached; NaN when Var[R] = 0 (undefined), as in OpenAI baselines.
    """
    check_same_shape(values=values, returns=returns)
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(math.nan, device=values.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns
