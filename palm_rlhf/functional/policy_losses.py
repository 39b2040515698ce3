"""Policy losses as pure tensor functions: the clipped policy gradient (PPO, GRPO, Dr. GRPO,
DAPO, RLOO, REINFORCE++) with its token reductions (`loss_agg_mode`), its ratio per token or
per sequence (GSPO), clip-higher, the dual clip and SPO's penalty; the reference trainer's
reshapings of the advantage (drift KL, entropy bonus); score centering, FlowRL trajectory
balance and TPO cross-entropy.

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
    counts = mask.sum(dim=-1)
    per_sequence = masked_sum(losses, mask, dim=-1) / counts.clamp(min=1)
    return masked_mean(per_sequence, counts > 0)  # a row with no token (filtered) is not counted


def _token_mean(losses: Tensor, mask: Tensor, max_length: Optional[int]) -> Tensor:
    return masked_mean(losses, mask)


def _constant_mean(losses: Tensor, mask: Tensor, max_length: Optional[int]) -> Tensor:
    length = losses.shape[-1] if max_length is None else max_length
    return masked_sum(losses, mask) / (losses.shape[0] * length)


# loss_agg_mode (verl's names) -> reduction of per-token losses (b, n) + mask (+ max_length) to
# a scalar; a new aggregation is one function and one entry here, and its key a choice of
# `loss_agg_mode`. TRL's `loss_type`: "token-mean" = "bnpo" (= "dapo" on one process),
# "seq-mean-token-mean" = "grpo", "seq-mean-token-sum-norm" = "dr_grpo".
TOKEN_REDUCTIONS: dict[str, Callable[[Tensor, Tensor, Optional[int]], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _sequence_mean,
    "seq-mean-token-sum-norm": _constant_mean,
}
LOSS_AGG_MODES = tuple(TOKEN_REDUCTIONS)
# the names this library used before (`length_norm="sequence" | "token" | "constant"`)
LOSS_AGG_ALIASES = {
    "sequence": "seq-mean-token-mean",
    "token": "token-mean",
    "constant": "seq-mean-token-sum-norm",
}


def loss_agg_mode_name(name: str) -> str:
    """The canonical `loss_agg_mode` of `name` (an old alias maps to its new name)."""
    name = LOSS_AGG_ALIASES.get(name, name)
    if name not in TOKEN_REDUCTIONS:
        choices = (*LOSS_AGG_MODES, *LOSS_AGG_ALIASES)
        raise ValueError(f"unknown loss_agg_mode {name!r}; choose one of {choices}")
    return name


def reduce_token_losses(
    losses: Tensor, mask: Tensor, loss_agg_mode: str, max_length: Optional[int] = None
) -> Tensor:
    """Average per-token losses (b, n) into a scalar, the three ways the literature does it.

      "seq-mean-token-mean":     mean over sequences of each sequence's token mean (GRPO,
                                 Shao et al. 2024 eq. 3): a token of a short answer weighs
                                 more than one of a long answer; a sequence with no token
                                 (filtered out) is not counted. TRL loss_type "grpo".
      "token-mean":              sum over all masked tokens / their number (DAPO, Yu et al.
                                 2025, token-level policy gradient loss): every token weighs
                                 the same. TRL "bnpo" (its "dapo" on one process).
      "seq-mean-token-sum-norm": sum over all masked tokens / (b * max_length) (Dr. GRPO, Liu
                                 et al. 2025): no length bias at all; `max_length` defaults
                                 to n. TRL "dr_grpo".

    The old names "sequence", "token", "constant" are accepted (`LOSS_AGG_ALIASES`). Across
    processes the sequence modes average exactly (equal per-process b, no filtered rows);
    "token-mean" is the mean of this shard's tokens, not of the global batch's, unless every
    shard holds the same number of tokens.
    """
    if mask.dtype != torch.bool or mask.shape != losses.shape:
        raise ValueError(f"need a bool mask shaped like the losses {tuple(losses.shape)}")
    return TOKEN_REDUCTIONS[loss_agg_mode_name(loss_agg_mode)](losses, mask, max_length)


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def importance_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token"
) -> Tensor:
    """Per-token importance ratios (b, n) of the current policy to the rollout policy.

    "token":    rho_t = exp(log pi(y_t) - log pi_old(y_t))                    (PPO)
    "sequence": s_t = exp(sg[m] + log pi(y_t) - sg[log pi(y_t)]),  m = mean_t of the log
                ratio over the response (GSPO-token, Zheng et al. 2025, arXiv 2507.18071,
                eq. 13): its value is the sequence ratio exp(m) on every token, so it is
                clipped at sequence level, and its gradient is exp(m) grad log pi(y_t) per
                token; with sequence advantages and "seq-mean-token-mean" this is GSPO.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio.exp()
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}"
        )
    lengths = mask.sum(dim=-1).clamp(min=1)
    sequence = rearrange((masked_sum(log_ratio, mask, dim=-1) / lengths).detach(), "b -> b 1")
    return (sequence + logprobs - logprobs.detach()).exp()


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip_c: Optional[float] = None,
) -> Tensor:
    """Per-token losses of the clipped surrogate (Schulman et al. 2017, eq. 7), (b, n):

        l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
        l_t = min(l_t, -c A)   where A < 0, with dual_clip_c = c > 1

    `clip_eps_high` > `clip_eps_low` is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476:
    lets unlikely tokens grow); None = `clip_eps_low`. The dual clip (Ye et al. 2020, arXiv
    1912.09729, eq. 5) bounds the loss of a negative advantage when rho is huge.
    """
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    clipped = ratio.clamp(1 - clip_eps_low, 1 + high)
    losses = -torch.minimum(ratio * advantages, clipped * advantages)
    if dual_clip_c is not None:
        bounded = torch.minimum(losses, -dual_clip_c * advantages)
        losses = torch.where(advantages < 0, bounded, losses)
    return losses


def spo_surrogate(ratio: Tensor, advantages: Tensor, eps: float = 0.2) -> Tensor:
    """Simple Policy Optimization (Xie et al., arXiv 2401.16025, Algorithm 1 line 14), (b, n):

        l_t = -rho A + |A| / (2 eps) (rho - 1)^2

    A quadratic penalty in place of the clip: its optimum in rho is 1 + sign(A) eps, and its
    gradient never vanishes (the clip's does outside the trust region)."""
    return -ratio * advantages + (ratio - 1).square() * advantages.abs() / (2 * eps)


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    loss_agg_mode: str = "seq-mean-token-mean",
    max_length: Optional[int] = None,
    *,
    clip_eps_high: Optional[float] = None,
    dual_clip_c: Optional[float] = None,
    importance_sampling_level: str = "token",
    simple_policy_optimization: bool = False,
) -> tuple[Tensor, PolicyLossStats]:
    """The clipped surrogate of PPO, GRPO, RLOO, REINFORCE++ (Schulman et al. 2017, eq. 7).

        rho_t = importance_ratio(logprobs, old_logprobs, mask, importance_sampling_level)
        l_t   = clipped_surrogate(rho, A, clip_eps, clip_eps_high, dual_clip_c)
                (or spo_surrogate(rho, A, clip_eps) with simple_policy_optimization)
        loss  = reduce_token_losses(l, mask, loss_agg_mode, max_length)

    logprobs, old_logprobs, mask: (b, n); advantages (b,) for outcome estimators (broadcast to
    every token of the response) or (b, n) for token-level ones (REINFORCE++). With
    old_logprobs = logprobs.detach() it is plain REINFORCE with a baseline. Stats are detached
    token means: clip fraction (rho outside [1 - eps, 1 + eps_high], OpenAI baselines'
    definition) and the k3 estimate of KL(pi_old || pi). PPO uses it with per-token advantages
    and "token-mean" (a masked mean over the minibatch's tokens).
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    check_mask(mask, logprobs)
    advantages = _per_token(advantages, logprobs)
    ratio = importance_ratio(logprobs, old_logprobs, mask, importance_sampling_level)
    if simple_policy_optimization:
        losses = spo_surrogate(ratio, advantages, clip_eps)
    else:
        losses = clipped_surrogate(ratio, advantages, clip_eps, clip_eps_high, dual_clip_c)
    loss = reduce_token_losses(losses, mask, loss_agg_mode, max_length)
    with torch.no_grad():
        high = clip_eps if clip_eps_high is None else clip_eps_high
        outside = (ratio < 1 - clip_eps) | (ratio > 1 + high)
        stats = PolicyLossStats(
            clip_fraction=masked_mean(outside.to(ratio.dtype), mask),
            approx_kl=masked_mean(kl_per_token(old_logprobs, logprobs, "k3"), mask),
        )
    return loss, stats


def full_kl_per_response(old_probs: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """KL(pi_old || pi) over the whole vocabulary, averaged over each response: -> (b,).

        KL_b = mean_{t in response} sum_v p_old(v) (log p_old(v) - log p(v))

    old_probs (b, n, v): the rollout policy's probabilities (detached); log_probs (b, n, v):
    the current policy's log-softmax (with grad). Both probabilities are clamped at 1e-20
    before their log, as the reference trainer's `masked_kl_div` does (the clamp cuts the
    gradient of a token below 1e-20). A response with no token gets 0."""
    check_mask(mask, log_probs[..., 0])
    old_probs = old_probs.detach()
    new_log = log_probs.exp().clamp(min=1e-20).log()
    per_token = (old_probs * (old_probs.clamp(min=1e-20).log() - new_log)).sum(dim=-1)
    return masked_sum(per_token, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1)


def entropy_advantage_bonus(
    advantages: Tensor, entropy: Tensor, mask: Tensor, scale: float, kappa: float = 2.0
) -> Tensor:
    """Entropy added to the advantage (Cheng et al. 2025, "Reasoning with Exploration: An
    Entropy Perspective", arXiv 2506.14758, eq. 5), (b, n):

        A_t <- A_t + min(scale * sg[H_t], |A_t| / kappa)     on response tokens

    The bonus is capped by |A| / kappa so it never flips the advantage's sign; the cap keeps
    A's gradient (when A itself carries one), the entropy is detached. advantages (b,) or
    (b, n); entropy (b, n) of the current policy."""
    advantages = _per_token(advantages, entropy)
    bonus = torch.where(mask, scale * entropy.detach(), 0.0)
    return advantages + torch.minimum(bonus, advantages.abs() / kappa)


def score_centering_loss(
    log_probs: Tensor,
    sampler_probs: Tensor,
    actions: Tensor,
    advantages: Tensor,
    mask: Tensor,
    topk: Optional[int] = None,
    weight_fn: Optional[Callable[[Tensor], Tensor]] = None,
    loss_agg_mode: str = "token-mean",
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
    ("token-mean" matches the reference trainer).
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
    return reduce_token_losses(per_token, mask, loss_agg_mode)


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
