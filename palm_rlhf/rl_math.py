"""The math of alignment as pure tensor functions: no modules, no devices, no Accelerate.

Shapes: b = batch, n = sequence positions, v = vocabulary, K = responses per prompt.
Every mask is a bool tensor where True means "this entry counts"; masked-out entries never
reach a result, even when they hold inf or NaN (they are selected away, not multiplied by 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from beartype import BeartypeConf, beartype
from einops import rearrange
from torch import Tensor

# accept ints where floats are annotated (gamma=1, beta=1, ...), as PEP 484 intends
typechecked = beartype(conf=BeartypeConf(is_pep484_tower=True))

KL_KINDS = ("k1", "k2", "k3", "abs")


def _check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = counts), got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")


def _check_same_shape(**tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.shape != first.shape:
            shapes = f"{tuple(tensor.shape)} but {first_name} has {tuple(first.shape)}"
            raise ValueError(f"{name} has shape {shapes}")


# ----------------------------------------------------------------------------- masked stats


@typechecked
def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum of x over entries where mask is True; over all entries (scalar) or along `dim`."""
    _check_mask(mask, x)
    kept = torch.where(mask, x, 0)
    return kept.sum() if dim is None else kept.sum(dim)


@typechecked
def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """mean of x over entries where mask is True. An empty selection gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


@typechecked
def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """scalar variance of the masked entries of x (Bessel-corrected when `unbiased`)."""
    _check_mask(mask, x)
    count, needed = int(mask.sum()), 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"masked_var needs at least {needed} masked entries, got {count}")
    centred = x - masked_mean(x, mask)
    return masked_sum(centred**2, mask) / (count - 1 if unbiased else count)


@typechecked
def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var taken over masked entries only.

    With `shift_mean=False` the mean is added back (only the scale is normalised), as done for
    advantages in some PPO code. Masked-out positions of the output are 0. Statistics are local
    to this tensor; a multi-process trainer must gather before calling if it wants global ones.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


# ----------------------------------------------------------------------------- token statistics


@typechecked
def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels) under softmax(logits): (b, n, v), (b, n) int -> (b, n) float32 or wider.

    log p_t = log_softmax(logits_t)[y_t]. The fused log-softmax subtracts the row maximum before
    exponentiating (stable for large logits) and is the only (b, n, v) tensor made; the simpler
    logits[y] - logsumexp(logits) loses digits to cancellation when logits are large. Half
    precision logits are upcast one row at a time, so the float32 copy is (n, v) at most.
    Every label must be a valid id (pad masked-out positions with any id, e.g. 0).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        shapes = f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"need logits (b, n, v) and labels (b, n), got {shapes}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    index = rearrange(labels.long(), "b n -> b n 1")
    if logits.dtype in (torch.float32, torch.float64):
        taken = F.log_softmax(logits, dim=-1).gather(-1, index)
    else:
        rows = zip(logits, index)
        taken = torch.stack([F.log_softmax(row.float(), dim=-1).gather(-1, i) for row, i in rows])
    return rearrange(taken, "b n 1 -> b n")


@typechecked
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per position: (b, n, v) -> (b, n), in nats.

    H = -sum_x p(x) log p(x), with log p from the max-shifted log-softmax (stable for large
    logits, where logsumexp(l) - sum p * l would cancel). Half precision is upcast to float32.
    """
    wide = logits.dtype in (torch.float32, torch.float64)
    log_p = F.log_softmax(logits if wide else logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@typechecked
def sequence_log_probs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log p(sequence) = sum of the masked token log-probs: (b, n), (b, n) -> (b,)."""
    return masked_sum(token_logprobs, mask, dim=-1)


@typechecked
def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(p || q) from samples of p, any shape -> same shape.

    logprobs = log p (policy), ref_logprobs = log q (reference). Estimators (Schulman,
    "Approximating KL divergence", 2020), with d = log p - log q and r = q / p = exp(-d):
      k1 = d                      unbiased, can be negative
      k2 = d^2 / 2                biased, low variance, >= 0
      k3 = (r - 1) - log r        unbiased, low variance, >= 0 (computed as expm1(-d) + d)
      abs = |d|
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator kind {kind!r}; choose one of {KL_KINDS}")


# ----------------------------------------------------------------------------- PPO


@typechecked
def rewards_with_kl(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> Tensor:
    """Per-token PPO rewards (b, n): r_t = -kl_coef * KL_t, plus score (b,) at the last token.

    The reward model's score arrives once, at the final True position of each row of `mask`
    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al.
    2022, InstructGPT eq. 2). KL_t is `kl_per_token(..., kl_kind)`. Outside the mask: 0.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_mask(mask, logprobs)
    if score.shape != logprobs.shape[:1]:
        raise ValueError(
            f"score must be (b,) = {tuple(logprobs.shape[:1])}, got {tuple(score.shape)}"
        )
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have an all-False mask: no token can receive the score")
    rewards = torch.where(mask, -kl_coef * kl_per_token(logprobs, ref_logprobs, kl_kind), 0)
    # index of the last True per row: the largest position among masked ones
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).argmax(dim=-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


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
    _check_same_shape(rewards=rewards, values=values)
    _check_mask(mask, rewards)
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


class PolicyLossStats(NamedTuple):
    clip_fraction: Tensor  # fraction of masked tokens with |ratio - 1| > clip_eps
    approx_kl: Tensor  # mean k3 estimate of KL(old || new): (ratio - 1) - log ratio


@typechecked
def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss: (b, n) x4 -> scalar.

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        L = -mean_masked( min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t) )

    Stats are detached: `clip_fraction` counts tokens whose ratio left [1 - eps, 1 + eps]
    (OpenAI baselines' definition); `approx_kl` is the k3 estimator of KL(pi_old || pi).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    _check_mask(mask, logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(
            clip_fraction=masked_mean(((ratio - 1).abs() > clip_eps).to(ratio.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        )
    return loss, stats


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
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    _check_mask(mask, values)
    squared_error = (values - returns) ** 2
    if clip_eps is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        squared_error = torch.maximum(squared_error, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, mask)


@typechecked
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked entries: 1 = perfect critic, 0 = predicts the mean.

    Scalar float tensor, detached; NaN when Var[R] = 0 (undefined), as in OpenAI baselines.
    """
    _check_same_shape(values=values, returns=returns)
    values, returns = values.detach().float(), returns.detach().float()
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(math.nan, device=values.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ----------------------------------------------------------------------------- preference losses


@typechecked
def pairwise_ranking_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Union[float, Tensor, None] = None
) -> Tensor:
    """Bradley-Terry loss -mean(log sigmoid(r_c - r_r - margin)): (b,), (b,) -> scalar.

    `margin` (float or (b,)) asks the chosen reward to win by that much (Llama 2, sec. 3.2.2).
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards - (0.0 if margin is None else margin)
    return -F.logsigmoid(diff).mean()


def _ranked_pairs(scores: Tensor, ranking: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(b, K) -> s_i - s_j and a bool (b, K, K) of valid pairs where i ranks strictly above j."""
    _check_same_shape(scores=scores, ranking=ranking)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (b, K), got {tuple(scores.shape)}")
    if ranking.dtype.is_floating_point or ranking.dtype == torch.bool:
        raise TypeError(f"ranking must hold integer ranks (0 = best), got {ranking.dtype}")
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    _check_mask(mask, scores)
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
    _check_same_shape(
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


@typechecked
def shifted_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[:, t] | tokens[:, <t]) for t >= 1: logits (b, n, v), tokens (b, n) -> (b, n-1).

    Column j of the result scores token j + 1 (the logits at position j predict the next one).
    """
    return log_probs_from_logits(logits[:, :-1], tokens[:, 1:])
