"""Policy losses as pure tensor functions: the clipped policy gradient (PPO, GRPO, Dr. GRPO,
DAPO, RLOO, REINFORCE++) with its token reductions, score centering, FlowRL trajectory balance
and TPO cross-entropy.

Shapes: b = responses, n = response positions, v = vocabulary, p = prompts, g = responses per
prompt with groups laid out contiguously (b = p * g). Per-token log-probs are (b, n) with a
bool mask (True = response token that counts). Per-token KL estimators live in `kl.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.advantages import group_normalized_advantages
from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.masked import check_mask, check_same_shape, masked_mean, masked_sum


class PolicyLossStats(NamedTuple):
    clip_fraction: Tensor  # fraction of masked tokens with |ratio - 1| > clip_eps
    approx_kl: Tensor  # mean k3 estimate of KL(old || new): (ratio - 1) - log ratio


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """(b,) sequence advantages broadcast over positions; (b, n) passed through."""
    if advantages.shape == like.shape:
        return advantages
    if advantages.shape == like.shape[:1]:
        return rearrange(advantages, "b -> b 1").expand_as(like)
    raise ValueError(
        f"advantages must be (b,) or (b, n) for {tuple(like.shape)}, got {tuple(advantages.shape)}"
    )


def _sequence_mean(losses: Tensor, mask: Tensor, max_length: Optional[int]) -> Tensor:
    per_sequence = masked_sum(losses, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return per_sequence.mean()


def _token_mean(losses: Tensor, mask: Tensor, max_length: Optional[int]) -> Tensor:
    return masked_mean(losses, mask)


def _constant_mean(losses: Tensor, mask: Tensor, max_length: Optional[int]) -> Tensor:
    length = losses.shape[-1] if max_length is None else max_length
    return masked_sum(losses, mask) / (losses.shape[0] * length)


# length_norm -> reduction of per-token losses (b, n) + mask (+ max_length) to a scalar; a new
# aggregation is one function and one entry here, and its key a choice of `length_norm`
TOKEN_REDUCTIONS: dict[str, Callable[[Tensor, Tensor, Optional[int]], Tensor]] = {
    "sequence": _sequence_mean,
    "token": _token_mean,
    "constant": _constant_mean,
}
LENGTH_NORMS = tuple(TOKEN_REDUCTIONS)


def reduce_token_losses(
    losses: Tensor, mask: Tensor, length_norm: str, max_length: Optional[int] = None
) -> Tensor:
    """Average per-token losses (b, n) into a scalar, the three ways the literature does it.

      "sequence": mean over sequences of each sequence's token mean (GRPO, Shao et al. 2024
                  eq. 3): a token of a short answer weighs more than one of a long answer.
      "token":    sum over all masked tokens / their number (DAPO, Yu et al. 2025, token-level
                  policy gradient loss): every token weighs the same.
      "constant": sum over all masked tokens / (b * max_length) (Dr. GRPO, Liu et al.
                  2025): no length bias at all; `max_length` defaults to n.

    Across processes "sequence" and "constant" average exactly (equal per-process b); "token"
    is the mean of this shard's tokens (the reference trainer's masked mean is per minibatch),
    not of the global batch's, unless every shard holds the same number of tokens.
    """
    if mask.dtype != torch.bool or mask.shape != losses.shape:
        raise ValueError(f"need a bool mask shaped like the losses {tuple(losses.shape)}")
    if length_norm not in TOKEN_REDUCTIONS:
        raise ValueError(f"unknown length_norm {length_norm!r}; choose one of {LENGTH_NORMS}")
    return TOKEN_REDUCTIONS[length_norm](losses, mask, max_length)


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    length_norm: str = "sequence",
    max_length: Optional[int] = None,
) -> tuple[Tensor, PolicyLossStats]:
    """The clipped surrogate of PPO, GRPO, RLOO, REINFORCE++ (Schulman et al. 2017, eq. 7).

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        l_t   = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
        loss  = reduce_token_losses(l, mask, length_norm, max_length)

    logprobs, old_logprobs, mask: (b, n); advantages (b,) for outcome estimators (broadcast to
    every token of the response) or (b, n) for token-level ones (REINFORCE++). With
    old_logprobs = logprobs.detach() it is plain REINFORCE with a baseline. Stats are detached
    token means: clip fraction (|rho - 1| > eps, OpenAI baselines' definition) and the k3
    estimate of KL(pi_old || pi). PPO uses it with per-token advantages and "token" (a masked
    mean over the minibatch's tokens).
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    check_mask(mask, logprobs)
    advantages = _per_token(advantages, logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    surrogate = torch.minimum(
        ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    )
    loss = reduce_token_losses(-surrogate, mask, length_norm, max_length)
    with torch.no_grad():
        stats = PolicyLossStats(
            clip_fraction=masked_mean(((ratio - 1).abs() > clip_eps).to(ratio.dtype), mask),
            approx_kl=masked_mean(kl_per_token(old_logprobs, logprobs, "k3"), mask),
        )
    return loss, stats


def score_centering_loss(
    log_probs: Tensor,
    sampler_probs: Tensor,
    actions: Tensor,
    advantages: Tensor,
    mask: Tensor,
    topk: Optional[int] = None,
    weight_fn: Optional[Callable[[Tensor], Tensor]] = None,
    length_norm: str = "token",
    eps: float = 1e-6,
) -> Tensor:
    """Policy gradient with a centred score (Marek & Ryabinin 2026, arXiv 2609.20807): -> scalar.

    log_probs (b, n, v): the trainer's log-softmax (with grad); sampler_probs (b, n, v): the
    probabilities the rollout engine sampled `actions` (b, n) from; advantages (b,) or (b, n).
    With f = weight_fn (default 1) and w(a) = f(pi(a) / mu(a)) on detached ratios:

        l_t = -A_t * ( w(a_t) log pi(a_t) - sum_k sg[mu_k w(k)] log pi_k )

    Its gradient is A * (w(a) grad log pi(a) - E_{k~mu}[w(k) grad log pi_k]): the sampled score
    minus its own mean under the sampler. When the trainer's pi drifts from the sampler's mu
    (training-inference mismatch) the plain score no longer has mean 0 under mu, so a constant
    advantage would push the policy; centring cancels that drift. With mu = pi and f = 1 the
    subtracted term has zero gradient (sum_k grad pi_k = 0) and this is plain REINFORCE.

    `topk`: keep only the sampler's k likeliest tokens in the sum and treat the rest as one
    tail token T, whose term mu_T w(T) grad log pi_T = -(w(T) / r_T) sum_head pi_k grad log pi_k
    with r_T = pi_T / mu_T. The per-token losses are reduced with `reduce_token_losses`
    ("token" matches the reference trainer).
    """
    weight_fn = torch.ones_like if weight_fn is None else weight_fn
    vocab = log_probs.shape[-1]
    sampler_probs = sampler_probs.detach()
    index = rearrange(actions.long(), "b n -> b n 1")
    action_log_prob = rearrange(log_probs.gather(-1, index), "b n 1 -> b n")
    action_sampler_prob = rearrange(sampler_probs.gather(-1, index), "b n 1 -> b n")
    ratio = (action_log_prob.exp() / action_sampler_prob.clamp(min=eps)).detach()
    sampled_score = weight_fn(ratio) * action_log_prob

    head_mu, head_log_pi = sampler_probs, log_probs
    if topk is not None and topk < vocab:
        head_mu, head_ids = sampler_probs.topk(topk, dim=-1)
        head_log_pi = log_probs.gather(-1, head_ids)
    head_pi = head_log_pi.exp()
    coefficients = head_mu * weight_fn(head_pi / head_mu.clamp(min=eps))
    if topk is not None and topk < vocab:
        tail_ratio = (1 - head_pi.sum(-1)).clamp(min=eps) / (1 - head_mu.sum(-1)).clamp(min=eps)
        tail_scale = rearrange(weight_fn(tail_ratio) / tail_ratio, "b n -> b n 1")
        coefficients = coefficients - tail_scale * head_pi
    baseline_score = (coefficients.detach() * head_log_pi).sum(dim=-1)
    per_token = -_per_token(advantages, action_log_prob) * (sampled_score - baseline_score)
    return reduce_token_losses(per_token, mask, length_norm)


class FlowRLStats(NamedTuple):
    trajectory_balance: Tensor  # mean residual log Z + log pi/|y| - beta r - log ref/|y| (b,) mean
    importance_weight: Tensor  # mean clipped sequence ratio
    log_z: Tensor  # mean learned log partition value


def flowrl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    log_z: Tensor,
    beta: float = 15.0,
    clip_eps: float = 0.2,
) -> tuple[Tensor, FlowRLStats]:
    """FlowRL trajectory balance (Zhu et al. 2025, "FlowRL: Matching Reward Distributions",
    eq. 6 with its importance weight): (b, n) x3 + mask, rewards (b,), log_z (b,) -> scalar.

        delta = log Z(x) + (1/|y|) log pi(y|x) - beta * r_hat(x, y) - (1/|y|) log ref(y|x)
        w     = sg[clip(pi(y|x) / pi_old(y|x), 1 - eps, 1 + eps)]     (whole-sequence ratio)
        loss  = mean_b(w * delta^2)

    At delta = 0, (1/|y|) log pi = (1/|y|) log ref + beta * r_hat - log Z: the policy matches
    the reward-tilted reference distribution (per token) instead of maximising reward.
    log Z(x) comes from a learned head and gets its gradient from the same loss. r_hat is the
    reward normalised within the prompt's group (`group_normalized_advantages`, as the
    reference does). beta = 15 and eps = 0.2 are the reference's defaults. |y| counts masked
    tokens.
    """
    if not (logprobs.shape == ref_logprobs.shape == old_logprobs.shape == mask.shape):
        raise ValueError(
            "logprobs, ref_logprobs, old_logprobs and mask must share one (b, n) shape"
        )
    if rewards.shape != logprobs.shape[:1] or log_z.shape != rewards.shape:
        raise ValueError(f"rewards and log_z must be (b,) = {tuple(logprobs.shape[:1])}")
    lengths = mask.sum(dim=-1).clamp(min=1)
    policy = masked_sum(logprobs, mask, dim=-1)
    reference = masked_sum(ref_logprobs, mask, dim=-1)
    log_ratio = (policy - masked_sum(old_logprobs, mask, dim=-1)).detach()
    # clip in log space: exp of a long sequence's summed log-ratio may overflow
    weight = log_ratio.clamp(math.log(1 - clip_eps), math.log1p(clip_eps)).exp()
    delta = log_z + policy / lengths - beta * rewards - reference / lengths
    loss = (weight * delta**2).mean()
    stats = FlowRLStats(delta.detach().mean(), weight.mean(), log_z.detach().mean())
    return loss, stats


def tpo_targets(
    old_sequence_logprobs: Tensor, rewards: Tensor, group_size: int, eta: float = 1.0
) -> Tensor:
    """TPO target distribution over each group (Kaddour 2026, "Target Policy Optimization",
    arXiv 2604.06159, sec. 2): (b,), (b,) -> (b,), each group of g entries summing to 1.

        u_i = z-score of r_i within its group     (0 for a group whose rewards are all equal)
        q_i = p_old(i) exp(u_i / eta) / sum_j p_old(j) exp(u_j / eta)

    p_old(i) is the behaviour policy renormalised over the group's g samples, i.e.
    softmax(log pi_old(y_i | x)) over the group; `old_sequence_logprobs` are summed token
    log-probs (`logprobs.sequence_log_probs`). A group with equal rewards gets q = p_old: no
    change asked. eta = 1 is the reference's default. The result is detached.
    """
    scores = group_normalized_advantages(rewards.detach().double(), group_size) / eta
    old = rearrange(old_sequence_logprobs.detach().double(), "(p g) -> p g", g=group_size)
    grouped_scores = rearrange(scores, "(p g) -> p g", g=group_size)
    targets = (F.log_softmax(old, dim=-1) + grouped_scores).softmax(dim=-1)
    return rearrange(targets, "p g -> (p g)").to(old_sequence_logprobs.dtype)


def tpo_loss(sequence_logprobs: Tensor, targets: Tensor, group_size: int) -> Tensor:
    """TPO fit (Kaddour 2026, arXiv 2604.06159, sec. 2): cross-entropy to the group target.

        loss = mean_groups( -sum_i q_i log softmax_group(log pi(y_i | x))_i )

    sequence_logprobs (b,): summed token log-probs under the current policy (with grad);
    targets (b,) from `tpo_targets`. The gradient with respect to each sampled completion's
    sequence log-prob is p_theta(i) - q_i (group-renormalised), which vanishes once the policy
    matches the target: the update cannot overshoot it.
    """
    if sequence_logprobs.shape != targets.shape or sequence_logprobs.ndim != 1:
        raise ValueError("sequence_logprobs and targets must both be (b,)")
    logits = rearrange(sequence_logprobs, "(p g) -> p g", g=group_size)
    grouped_targets = rearrange(targets.detach(), "(p g) -> p g", g=group_size)
    return -(grouped_targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
