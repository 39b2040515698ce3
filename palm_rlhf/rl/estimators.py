"""Critic-free advantage estimators as pure tensor functions: GRPO, Dr. GRPO, RLOO, REINFORCE++.

Shapes: b = batch of responses, n = response positions, p = prompts, g = responses per prompt
(the group). A batch of grouped responses is laid out contiguously, b = p * g: rows 0..g-1
answer prompt 0, rows g..2g-1 answer prompt 1, and so on. Rewards are one score per response
(b,); per-token tensors are (b, n) with a bool response mask (True = this token counts).

Distributed training: group estimators (GRPO, Dr. GRPO, RLOO) only read the rewards of one
group, so they need no communication as long as every group lives whole on one process. Batch
whitening (REINFORCE++) reads every token of the global batch: each process computes
`masked_moments` of its shard, the moments are summed across processes (all-reduce, SUM), and
the summed moments are passed to `global_normalized_advantages`. Moments accumulate in float64,
so N processes agree with one process up to float64 rounding of the summation order.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from einops import rearrange
from torch import Tensor

from palm_rlhf.rl_math import gae

# ----------------------------------------------------------------------------- group baselines


def _grouped(rewards: Tensor, group_size: int, minimum: int = 1) -> Tensor:
    """(b,) -> (p, g), checking that b splits into whole groups of at least `minimum`."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be one score per response (b,), got {tuple(rewards.shape)}")
    if group_size < minimum:
        raise ValueError(f"group_size must be at least {minimum}, got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"batch of {rewards.shape[0]} does not split into groups of {group_size}")
    return rearrange(rewards, "(p g) -> p g", g=group_size)


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
    Needs no cross-process statistics when each group sits whole on one process.
    """
    grouped = _grouped(rewards, group_size, minimum=2 if scale_by_std else 1)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale_by_std:
        centred = centred / grouped.std(dim=-1, keepdim=True).clamp(min=eps)
    # equal rewards can leave rounding noise after subtracting their mean: zero it exactly
    constant = (grouped == grouped[:, :1]).all(dim=-1, keepdim=True)
    return rearrange(torch.where(constant, 0, centred), "p g -> (p g)")


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): (b,).

        A_i = r_i - 1/(g - 1) * sum_{j != i} r_j  =  g / (g - 1) * (r_i - mean(r_group))

    Each response's baseline is the mean reward of the other g - 1 responses to the same
    prompt, so the baseline is independent of the response it scores (unbiased gradient).
    Needs g >= 2. No cross-process statistics when each group sits whole on one process.
    """
    if group_size < 2:
        raise ValueError(
            f"leave-one-out needs group_size >= 2 (a baseline of others), got {group_size}"
        )
    grouped = _grouped(rewards, group_size, minimum=2)
    others_mean = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return rearrange(grouped - others_mean, "p g -> (p g)")


# ----------------------------------------------------------------------------- REINFORCE++


def reinforce_pp_returns(
    rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++ token returns (Hu 2025, "REINFORCE++"): (b,), (b, n), (b, n) -> (b, n).

        r_t = -kl_coef * KL_t  (+ reward of the sequence at its last masked token)
        G_t = r_t + gamma * G_{t+1}                (G = 0 after the last masked token)

    The KL penalty is folded into the per-token reward (as in PPO-RLHF) and the return is the
    discounted sum of future rewards; there is no critic. `kl` is a per-token estimate such as
    `rl_math.kl_per_token(logprobs, ref_logprobs, "k1")`. Returns are 0 outside the mask; a
    False inside a row ends an episode there. Whiten the result over the whole batch with
    `global_normalized_advantages` to get REINFORCE++ advantages.
    """
    if kl.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"need kl (b, n) and a bool mask of the same shape, got {tuple(kl.shape)}")
    if rewards.shape != kl.shape[:1]:
        raise ValueError(
            f"rewards must be (b,) = {tuple(kl.shape[:1])}, got {tuple(rewards.shape)}"
        )
    if not mask.any(dim=-1).all():
        raise ValueError("every row needs at least one masked token to receive its reward")
    token_rewards = torch.where(mask, -kl_coef * kl, 0)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).argmax(dim=-1, keepdim=True)  # last True per row
    token_rewards = token_rewards.scatter_add(-1, last, rearrange(rewards, "b -> b 1").to(kl.dtype))
    # with zero values and lambda = 1, GAE's advantage is exactly the discounted return
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0)
    return returns


class Moments(NamedTuple):
    """Sufficient statistics of the masked entries of a tensor, in float64 (0-dim tensors).

    count, total = sum(x - shift), total_sq = sum((x - shift)^2). Moments of disjoint shards
    (same shift) add field by field: all-reduce each with SUM across processes."""

    count: Tensor
    total: Tensor
    total_sq: Tensor
    shift: float = 0.0


def masked_moments(x: Tensor, mask: Tensor, shift: float = 0.0) -> Moments:
    """count, sum and sum of squares of the masked entries of (x - shift), float64 scalars.

    `shift` only guards precision: choose any value near the mean (the same on every process),
    e.g. the previous batch's mean, when |mean| is much larger than the spread."""
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"need a bool mask shaped like x {tuple(x.shape)}")
    kept = torch.where(mask, x.double() - shift, 0)
    return Moments(mask.sum().double(), kept.sum(), (kept**2).sum(), shift)


def sum_moments(*moments: Moments) -> Moments:
    """Moments of the union of disjoint shards (what an all-reduce SUM produces)."""
    if len({m.shift for m in moments}) != 1:
        raise ValueError("moments must share one shift to be added")
    count, total, total_sq = (sum(m[i] for m in moments) for i in range(3))
    return Moments(count, total, total_sq, moments[0].shift)


def global_normalized_advantages(
    values: Tensor, mask: Tensor, moments: Optional[Moments] = None, eps: float = 1e-8
) -> Tensor:
    """Whiten (b, n) over every masked token of the global batch (REINFORCE++, Hu 2025).

        A_t = (G_t - mean) / sqrt(var + eps)      mean, Bessel-corrected var over all masked t

    With `moments=None` the statistics are this tensor's own (then it equals
    `rl_math.masked_whiten`). A multi-process caller passes the all-reduced
    `masked_moments(values, mask)` of every shard, so each process whitens with the same global
    mean and variance as a single process holding the whole batch. 0 outside the mask.
    """
    moments = masked_moments(values, mask) if moments is None else moments
    count = moments.count
    if count < 2:
        raise ValueError(f"whitening needs at least 2 masked entries, got {int(count)}")
    mean_shifted = moments.total / count
    var = (moments.total_sq - count * mean_shifted**2) / (count - 1)
    mean = mean_shifted + moments.shift
    whitened = (values.double() - mean) * torch.rsqrt(var.clamp(min=0) + eps)
    return torch.where(mask, whitened.to(values.dtype), 0)
