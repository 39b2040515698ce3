"""Preference losses as pure tensor functions: Bradley-Terry pairs, InstructGPT's ranking loss
over K responses, and DPO. Shapes: b = prompts (or pairs), K = responses per prompt.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.masked import check_mask, check_same_shape, masked_mean
from palm_rlhf.typecheck import typechecked


@typechecked
def pairwise_ranking_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Union[float, Tensor, None] = None
) -> Tensor:
    """Bradley-Terry loss -mean(log sigmoid(r_c - r_r - margin)): (b,), (b,) -> scalar.

    `margin` (float or (b,)) asks the chosen reward to win by that much (Llama 2, sec. 3.2.2).
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return -F.logsigmoid(diff).mean()


def _ranked_pairs(scores: Tensor, ranking: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(b, K) -> s_i - s_j and a bool (b, K, K) of valid pairs where i ranks strictly above j."""
    check_same_shape(scores=scores, ranking=ranking)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (b, K), got {tuple(scores.shape)}")
    if ranking.dtype.is_floating_point or ranking.dtype == torch.bool:
        raise TypeError(f"ranking must hold integer ranks (0 = best), got {ranking.dtype}")
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    check_mask(mask, scores)
    better = rearrange(ranking, "b i -> b i 1") < rearrange(ranking, "b j -> b 1 j")
    both = rearrange(mask, "b i -> b i 1") & rearrange(mask, "b j -> b 1 j")
    diff = rearrange(scores, "b i -> b i 1") - rearrange(scores, "b j -> b 1 j")
    return diff, better & both  # ties are never "better", so they form no pair


@typechecked
def ranking_loss_from_scores(
    scores: Tensor, ranking: Tensor, mask: Optional[Tensor] = None, margin: float = 0.0
) -> Tensor:
    """InstructGPT reward-model loss (Ouyang et al. 2022, eq. 1): (b, K) scores, ranks -> scalar.

        loss(prompt) = -1 / C(K, 2) * sum_{i ranked above j} log sigmoid(s_i - s_j - margin)

    Ranks are integers, 0 = best; equal ranks form no pair; `mask` (b, K) drops missing
    responses. C(K, 2) is the number of valid pairs of that prompt, so each prompt weighs the
    same; the batch loss is the mean over prompts that have at least one pair.
    """
    diff, pairs = _ranked_pairs(scores, ranking, mask)
    pair_count = pairs.sum(dim=(1, 2))
    has_pairs = pair_count > 0
    if not has_pairs.any():
        raise ValueError("no prompt in the batch has two responses of different rank")
    pair_losses = torch.where(pairs, -F.logsigmoid(diff - margin), 0)
    per_prompt = pair_losses.sum(dim=(1, 2)) / pair_count.clamp(min=1)
    return per_prompt[has_pairs].mean()


@typechecked
def ranking_accuracy(scores: Tensor, ranking: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Fraction of all valid ranked pairs in the batch with s_better > s_worse (strictly)."""
    diff, pairs = _ranked_pairs(scores.detach(), ranking, mask)
    return masked_mean((diff > 0).to(diff.dtype), pairs)


@typechecked
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7): (b,) summed log-probs x4.

        h = beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)))
        loss = mean( -(1 - ls) * log sigmoid(h) - ls * log sigmoid(-h) )

    `label_smoothing` ls in [0, 0.5) assumes that fraction of labels is flipped (conservative
    DPO, Mitchell 2023). The loss is log 2 when policy == reference. Returns (loss, chosen
    rewards, rejected rewards), the implicit rewards beta * (log pi - log ref) (b,), detached.
    """
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen_log_ratio - rejected_log_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses.mean(), beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()
