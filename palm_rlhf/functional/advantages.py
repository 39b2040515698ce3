"""From scores to advantages: per-token rewards, GAE, returns and the critic-free baselines.

Shapes: b = responses, n = response positions, p = prompts, g = responses per prompt (the
group, laid out contiguously: b = p * g, rows 0..g-1 answer prompt 0, and so on). Sequence
scores are (b,); per-token tensors are (b, n) with a bool response mask (True = counts).

Distributed training: group estimators (GRPO, Dr. GRPO, RLOO) read the scores of one group
only, so they need no communication as long as every group lives whole on one process; batch
statistics (whitening, `mean_return_shift`) take an `all_reduce` that sums over processes.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.masked import (
    AllReduce,
    check_mask,
    check_same_shape,
    last_true_index,
    masked_sum,
)
from palm_rlhf.typecheck import typechecked

# ----------------------------------------------------------------------------- token rewards


@typechecked
def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (b, n): r_t = -kl_coef * KL_t, plus the score (b,) at the last token.

    The sequence score arrives once, at the final True position of each row of `mask` (Ziegler
    et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022,
    InstructGPT eq. 2); `kl` is a per-token estimate (`kl.kl_per_token`). PPO and REINFORCE++
    shape their rewards this way. Outside the mask: 0.
    """
    check_mask(mask, kl)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be (b,) = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have an all-False mask: no token can receive the score")
    rewards = torch.where(mask, -kl_coef * kl, 0)
    last = rearrange(last_true_index(mask), "b -> b 1")
    return rewards.scatter_add(-1, last, rearrange(scores, "b -> b 1").to(rewards.dtype))


def overlong_penalty(lengths: Tensor, max_length: Tensor, buffer_len: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13): (b,) -> (b,).

        0                                   |y| <= L_max - L_buffer
        -factor * (|y| - (L_max - L_buffer)) / L_buffer   in between (linear)
        -factor                             |y| >= L_max

    lengths: response tokens (b,); max_length: each response's budget L_max (b,) or a scalar.
    Added to the sequence score, it tells a response near the budget that length costs,
    rather than cutting it off with no signal. buffer_len >= 1 (>= L_max: every length pays).
    """
    if buffer_len < 1:
        raise ValueError(f"overlong buffer_len must be >= 1, got {buffer_len}")
    start = max_length - buffer_len
    return -factor * ((lengths - start) / buffer_len).clamp(0, 1)


# ----------------------------------------------------------------------------- GAE and returns


@typechecked
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16): (b, n) x3 -> A, R.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        R_t     = A_t + V_t          (the critic's regression target)

    m is the response mask: the value after the last response token is 0 (the episode ends), so
    ragged rows and leading prompt positions need no special handling. A False inside a row acts
    as an episode boundary. A and R are 0 at masked-out positions. Gradients are not stopped:
    call under `torch.no_grad()` when A and R must be constants.
    """
    check_same_shape(rewards=rewards, values=values)
    check_mask(mask, rewards)
    rewards, values = torch.where(mask, rewards, 0), torch.where(mask, values, 0)
    keep = mask.to(values.dtype)
    reversed_advantages = []
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[-1])):  # n is small; the batch is vectorised
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * keep[:, t]
        reversed_advantages.append(advantage)
        # V_t and A_t are already 0 where m_t = 0, so they carry the m_{t+1} factor themselves
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(reversed_advantages[::-1], dim=-1)
    return advantages, torch.where(mask, advantages + values, 0)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} (G = 0 after the last masked token): (b, n) -> (b, n).

    GAE with zero values and lambda = 1, whose advantage is exactly the discounted return."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def reinforce_pp_returns(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++ token returns (Hu 2025, "REINFORCE++"): (b,), (b, n), (b, n) -> (b, n).

        r_t = -kl_coef * KL_t  (+ score of the sequence at its last masked token)
        G_t = r_t + gamma * G_{t+1}                (G = 0 after the last masked token)

    The KL penalty is folded into the per-token reward (as in PPO-RLHF) and the return is the
    discounted sum of future rewards; there is no critic. Whitening the result over the whole
    batch (`masked.whiten`) gives REINFORCE++ advantages. 0 outside the mask.
    """
    return discounted_returns(kl_penalized_rewards(scores, kl, mask, kl_coef), mask, gamma)


def pooled_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (b, n), for a critic with one value V per sequence (held at
    every position of `values`): A_t = G_t - V with G_t the gamma-discounted return from token
    t, and the critic's target G_0, the whole response's return, at every response token."""
    to_go = discounted_returns(rewards, mask, gamma)
    first = mask.long().argmax(dim=-1, keepdim=True)  # each row's first response token
    whole = to_go.gather(-1, first)
    return torch.where(mask, to_go - values, 0), torch.where(mask, whole.expand_as(to_go), 0)


def mean_return_shift(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    pooled: bool = False,
    all_reduce: Optional[AllReduce] = None,
) -> Tensor:
    """The constant that moves `values` to the GLOBAL batch's mean (gamma-discounted) return
    target: the best constant value predictor, used to start a fresh value head at the
    reward's scale. Targets are G_t per token, or G_0 for a pooled critic. Scalar."""
    if pooled:
        _, targets = pooled_advantages(rewards, values, mask, gamma)
    else:
        targets = discounted_returns(rewards, mask, gamma)
    total = torch.stack((masked_sum(targets - values, mask), mask.sum().to(values.dtype)))
    total = all_reduce(total) if all_reduce is not None else total
    return total[0] / total[1].clamp(min=1)


# ----------------------------------------------------------------------------- group baselines


def grouped(scores: Tensor, group_size: int, minimum: int = 1) -> Tensor:
    """(b,) -> (p, g), checking that b splits into whole groups of at least `minimum`."""
    if scores.ndim != 1:
        raise ValueError(f"rewards must be one score per response (b,), got {tuple(scores.shape)}")
    if group_size < minimum:
        raise ValueError(f"group_size must be at least {minimum}, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} does not split into groups of {group_size}")
    return rearrange(scores, "(p g) -> p g", g=group_size)


def constant_groups(scores: Tensor, group_size: int) -> Tensor:
    """(b,) -> (p,) bool: groups whose responses all scored the same (no group signal)."""
    groups = grouped(scores, group_size)
    return (groups == groups[:, :1]).all(dim=-1)


def group_normalized_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-8
) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): (b,) -> (b,).

        A_i = (r_i - mean(r_group)) / std(r_group)       scale_by_std=True   (GRPO)
        A_i =  r_i - mean(r_group)                       scale_by_std=False  (Dr. GRPO)

    std is Bessel-corrected (torch's default, as in the reference trainer), clamped below at
    `eps`. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") drops
    the std division because it up-weights prompts that are too easy or too hard. A group whose
    rewards are all equal carries no learning signal: its advantages are exactly 0, never NaN.
    """
    groups = grouped(rewards, group_size, minimum=2 if scale_by_std else 1)
    centred = groups - groups.mean(dim=-1, keepdim=True)
    if scale_by_std:
        centred = centred / groups.std(dim=-1, keepdim=True).clamp(min=eps)
    # equal rewards can leave rounding noise after subtracting their mean: zero it exactly
    constant = rearrange(constant_groups(rewards, group_size), "p -> p 1")
    return rearrange(torch.where(constant, 0, centred), "p g -> (p g)")


def max_rl_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """MaxRL advantages (arXiv 2602.02710), as palm-rlhf-pytorch 0.8.0 computes them: (b,).

        A_i = (r_i - mean(r_group)) / max(|mean(r_group)|, eps)

    The group's mean reward, not its std, is the divisor: for 0/1 rewards (a pass rate p) a
    success weighs (1 - p) / p, so rarely solved prompts weigh most. A group whose rewards are
    all equal gets exactly 0; a group whose mean is 0 but whose rewards differ gets huge
    advantages (the divisor is `eps`), as in the reference.
    """
    groups = grouped(rewards, group_size)
    mean = groups.mean(dim=-1, keepdim=True)
    centred = (groups - mean) / mean.abs().clamp(min=eps)
    constant = rearrange(constant_groups(rewards, group_size), "p -> p 1")
    return rearrange(torch.where(constant, 0, centred), "p g -> (p g)")


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): (b,).

        A_i = r_i - 1/(g - 1) * sum_{j != i} r_j  =  g / (g - 1) * (r_i - mean(r_group))

    Each response's baseline is the mean reward of the other g - 1 responses to the same
    prompt, so the baseline is independent of the response it scores (unbiased gradient).
    Needs g >= 2.
    """
    if group_size < 2:
        raise ValueError(
            f"leave-one-out needs group_size >= 2 (a baseline of others), got {group_size}"
        )
    groups = grouped(rewards, group_size, minimum=2)
    others_mean = (groups.sum(dim=-1, keepdim=True) - groups) / (group_size - 1)
    return rearrange(groups - others_mean, "p g -> (p g)")
