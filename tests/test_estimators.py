"""Critic-free estimators and losses against values worked out by hand, plus invariances and a
4-armed bandit that every estimator must solve."""

import math

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.functional.advantages import (
    group_normalized_advantages,
    leave_one_out_advantages,
    max_rl_advantages,
    reinforce_pp_returns,
)
from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.masked import whiten
from palm_rlhf.functional.policy_losses import (
    flowrl_loss,
    policy_gradient_loss,
    reduce_token_losses,
    score_centering_loss,
    tpo_loss,
    tpo_targets,
)

TIGHT = dict(atol=1e-6, rtol=1e-6)
T, F_ = True, False
LOG2 = math.log(2)


def tensor(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- group baselines

# three prompts, three responses each: ties, a zero-variance group, an evenly spread group
GROUPED = tensor([1.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.0, 2.0, 4.0])


def test_group_normalized_advantages_by_hand():
    # group 1: mean 2/3, deviations 1/3 1/3 -2/3; unbiased var (1/9+1/9+4/9)/2 = 1/3
    #          -> A = (1/3)/sqrt(1/3) = 1/sqrt(3) twice (ties stay tied), -2/sqrt(3)
    # group 2: all 0.3 -> no signal -> exactly 0 (0.3 is inexact in binary: no NaN, no noise)
    # group 3: mean 2, unbiased var (4+0+4)/2 = 4, std 2 -> -1 0 1
    s = 1 / math.sqrt(3)
    expected = tensor([s, s, -2 * s, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0])
    advantages = group_normalized_advantages(GROUPED, group_size=3)
    assert_close(advantages, expected, **TIGHT)
    assert torch.equal(advantages[3:6], torch.zeros(3, dtype=torch.float64))


def test_dr_grpo_advantages_only_centre():
    # Dr. GRPO: r - mean(group), no std: 1-2/3, 1-2/3, 0-2/3 | 0 0 0 | 0-2, 2-2, 4-2
    expected = tensor([1 / 3, 1 / 3, -2 / 3, 0.0, 0.0, 0.0, -2.0, 0.0, 2.0])
    advantages = group_normalized_advantages(GROUPED, group_size=3, scale_by_std=False)
    assert_close(advantages, expected, **TIGHT)


def test_leave_one_out_by_hand_and_its_errors():
    # A_i = r_i - mean of the other two: 1 - (4+7)/2 = -4.5, 4 - (1+7)/2 = 0, 7 - (1+4)/2 = 4.5
    advantages = leave_one_out_advantages(tensor([1.0, 4.0, 7.0]), group_size=3)
    assert_close(advantages, tensor([-4.5, 0.0, 4.5]), **TIGHT)
    # = g/(g-1) * (r - mean) = 1.5 * Dr. GRPO's advantage
    assert_close(advantages, 1.5 * group_normalized_advantages(tensor([1.0, 4.0, 7.0]), 3, False))
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match="does not split"):
        leave_one_out_advantages(tensor([1.0, 2.0, 3.0]), group_size=2)
    with pytest.raises(ValueError, match="at least 2"):
        group_normalized_advantages(tensor([1.0, 2.0]), group_size=1)


# ----------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_returns_with_ragged_masks_and_discount():
    kl = tensor([[1.0, 2.0, 3.0, 9.0], [4.0, -2.0, 9.0, 9.0], [9.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[T, T, T, F_], [T, T, F_, F_], [F_, T, T, T]])
    rewards = tensor([1.0, 2.0, -1.0])
    # kl_coef 0.1, gamma 0.5; masked-out KL (the 9s) never counts
    # row 0: r = -0.1, -0.2, -0.3 + 1 = 0.7   G2 = 0.7, G1 = -0.2 + 0.35 = 0.15,
    #        G0 = -0.1 + 0.075 = -0.025
    # row 1: r = -0.4, 0.2 + 2 = 2.2           G1 = 2.2, G0 = -0.4 + 1.1 = 0.7
    # row 2 (leading prompt position): r = -0.1, -0.1, -0.1 - 1 = -1.1
    #        G3 = -1.1, G2 = -0.1 - 0.55 = -0.65, G1 = -0.1 - 0.325 = -0.425
    expected = tensor([[-0.025, 0.15, 0.7, 0.0], [0.7, 2.2, 0.0, 0.0], [0.0, -0.425, -0.65, -1.1]])
    returns = reinforce_pp_returns(rewards, kl, mask, kl_coef=0.1, gamma=0.5)
    assert_close(returns, expected, **TIGHT)
    # gamma = 1, no KL: every token of a response carries its reward
    flat = reinforce_pp_returns(rewards, kl, mask, kl_coef=0.0)
    assert_close(flat, torch.where(mask, rewards[:, None], 0), **TIGHT)


def test_global_normalization_by_hand():
    # masked values 1 2 3: mean 2, unbiased var (1+0+1)/2 = 1 -> -1 0 1; masked-out inf -> 0
    values = tensor([[1.0, 2.0], [3.0, math.inf]])
    mask = torch.tensor([[T, T], [T, F_]])
    assert_close(whiten(values, mask), tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_global_normalization_from_two_shards_matches_one_process():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator) * 3 + 10
    mask = torch.rand(6, 5, generator=generator) > 0.3
    whole = whiten(values, mask)
    kept = values[mask].double()
    expected = torch.where(mask, (values - kept.mean()) / (kept.var() + 1e-8).sqrt(), 0)
    assert_close(whole, expected.float(), atol=1e-5, rtol=1e-5)
    # two "processes" each hold 3 rows; the all-reduce SUM of their moments, played by hand
    shards = [(values[:3], mask[:3]), (values[3:], mask[3:])]
    moments = []
    for v, m in shards:
        whiten(v, m, all_reduce=lambda t: moments.append(t) or t)
    reduced = sum(moments)
    assert int(reduced[0]) == int(mask.sum())  # the count of masked entries is global
    per_process = [whiten(v, m, all_reduce=lambda _: reduced) for v, m in shards]
    assert_close(torch.cat(per_process), whole, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- policy losses

# ratios [[1, 1.5, 0.5], [1.1, 2, 9 (masked)]], advantages per sequence [1, -2], eps 0.2
RATIOS = tensor([[1.0, 1.5, 0.5], [1.1, 2.0, 9.0]])
PG_MASK = torch.tensor([[T, T, T], [T, T, F_]])
PG_ADV = tensor([1.0, -2.0])
# token losses -min(rho A, clip(rho) A):
#   row 0 (A = 1):  -min(1, 1) = -1, -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5  sum -2.7
#   row 1 (A = -2): -min(-2.2, -2.2) = 2.2, -min(-4, -2.4) = 4                    sum 6.2


@pytest.mark.parametrize(
    "loss_agg_mode, max_length, expected",
    [
        ("seq-mean-token-mean", None, 1.1),  # mean(-2.7 / 3, 6.2 / 2) = mean(-0.9, 3.1)
        ("token-mean", None, 0.7),  # (-2.7 + 6.2) / 5 tokens
        ("seq-mean-token-sum-norm", None, 3.5 / 6),  # 3.5 / (b = 2 * n = 3)
        ("seq-mean-token-sum-norm", 4, 0.4375),  # 3.5 / (2 * 4)
        ("sequence", None, 1.1),  # the old names still mean the same
        ("token", None, 0.7),
        ("constant", 4, 0.4375),
    ],
)
def test_policy_gradient_loss_by_hand(loss_agg_mode, max_length, expected):
    old = torch.zeros(2, 3, dtype=torch.float64)
    loss, stats = policy_gradient_loss(
        RATIOS.log(), old, PG_ADV, PG_MASK, 0.2, loss_agg_mode, max_length
    )
    assert_close(loss, tensor(expected), **TIGHT)
    # |rho - 1| > 0.2 at 1.5, 0.5 and 2 of the 5 counted tokens
    assert_close(stats.clip_fraction, tensor(0.6), **TIGHT)
    # (b, n) advantages equal to the broadcast (b,) ones give the same loss
    per_token = PG_ADV[:, None].expand(2, 3)
    same, _ = policy_gradient_loss(
        RATIOS.log(), old, per_token, PG_MASK, 0.2, loss_agg_mode, max_length
    )
    assert_close(same, loss, **TIGHT)


def test_clipping_engages_and_cuts_the_gradient():
    logprobs = RATIOS.log().requires_grad_()
    loss, _ = policy_gradient_loss(
        logprobs, torch.zeros(2, 3, dtype=torch.float64), PG_ADV, PG_MASK, 0.2, "token"
    )
    loss.backward()
    # d(-rho A)/d log pi = -rho A, over 5 tokens where the unclipped term is the minimum:
    #   (0,0): -1/5 = -0.2; (0,1): clipped (1.5 > 1.2 with A > 0) -> 0; (0,2): -0.5/5 = -0.1
    #   (1,0): 2.2/5 = 0.44; (1,1): pessimistic unclipped -4 -> 4/5 = 0.8; (1,2) masked -> 0
    expected = tensor([[-0.2, 0.0, -0.1], [0.44, 0.8, 0.0]])
    assert_close(logprobs.grad, expected, **TIGHT)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'tokens'"):
        reduce_token_losses(RATIOS, PG_MASK, "tokens")


def test_k3_kl_values_from_functional_kl():
    # k3 = exp(ref - lp) - (ref - lp) - 1
    # lp 0, ref ln 2: 2 - ln 2 - 1 = 1 - ln 2;  lp ln 2, ref 0: 1/2 + ln 2 - 1;  equal: 0
    logprobs, ref = tensor([0.0, LOG2, -3.0]), tensor([LOG2, 0.0, -3.0])
    expected = tensor([1 - LOG2, LOG2 - 0.5, 0.0])
    assert_close(kl_per_token(logprobs, ref, "k3"), expected, **TIGHT)


# ----------------------------------------------------------------------------- score centering


def _one_token(probs):
    return tensor(probs).log().reshape(1, 1, -1)


def test_score_centering_loss_by_hand():
    # pi = [1/2, 1/4, 1/4], sampler mu = [1/4, 1/2, 1/4], action 0, A = 2
    # sum_k mu_k log pi_k = -ln2 * (1/4 + 2/2 + 2/4) = -1.75 ln 2
    # l = -A (log pi(0) - sum) = -2 (-ln 2 + 1.75 ln 2) = -1.5 ln 2
    loss = score_centering_loss(
        _one_token([0.5, 0.25, 0.25]),
        _one_token([0.25, 0.5, 0.25]).exp(),
        torch.tensor([[0]]),
        tensor([2.0]),
        torch.tensor([[T]]),
    )
    assert_close(loss, tensor(-1.5 * LOG2), **TIGHT)


def _centering_grad(logits, sampler, action, advantage, **kwargs):
    logits = logits.clone().requires_grad_()
    log_probs = logits.log_softmax(-1).reshape(1, 1, -1)
    loss = score_centering_loss(
        log_probs,
        sampler.reshape(1, 1, -1),
        torch.tensor([[action]]),
        tensor([advantage]),
        torch.tensor([[T]]),
        **kwargs,
    )
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_score_centering_cancels_drift_and_is_reinforce_on_policy():
    logits = tensor([0.3, -1.0, 0.5, 2.0])
    pi = logits.softmax(-1)
    mu = tensor([0.4, 0.3, 0.2, 0.1])  # a mismatched sampler
    # constant advantage: E_{a~mu}[gradient] is exactly 0 once centred ...
    centred = sum(mu[a] * _centering_grad(logits, mu, a, 1.0) for a in range(4))
    assert_close(centred, torch.zeros(4, dtype=torch.float64), **TIGHT)
    # ... while the plain score drifts: E_mu[-grad log pi(a)] = pi - mu (softmax score) != 0
    onehots = torch.eye(4, dtype=torch.float64)
    plain = sum(mu[a] * -(onehots[a] - pi) for a in range(4))
    assert_close(plain, pi - mu, **TIGHT)
    assert plain.abs().max() > 0.1
    # with mu = pi it is REINFORCE: gradient -A (onehot(a) - pi)
    assert_close(_centering_grad(logits, pi, 2, 3.0), -3.0 * (onehots[2] - pi), **TIGHT)
    # top-k = v - 1 leaves a one-token tail, which the tail correction models exactly
    full = _centering_grad(logits, mu, 1, 1.5)
    assert_close(_centering_grad(logits, mu, 1, 1.5, topk=3), full, **TIGHT)
    # on policy, a two-token head plus a two-token tail is still exactly REINFORCE
    assert_close(_centering_grad(logits, pi, 0, 2.0, topk=2), -2.0 * (onehots[0] - pi), **TIGHT)


# ----------------------------------------------------------------------------- FlowRL

FLOW_LP = tensor([[-1.0, -2.0], [-3.0, -5.0]])
FLOW_REF = tensor([[-1.5, -1.5], [-2.0, 0.0]])
FLOW_MASK = torch.tensor([[T, T], [T, F_]])
FLOW_REWARDS = tensor([1.0, -1.0])
# beta 2. row 0: |y| 2, policy -3/2, ref -3/2; row 1: |y| 1, policy -3, ref -2 (-5, 0 masked)
# delta_0 = log Z - 1.5 - 2 + 1.5 = log Z - 2;  delta_1 = log Z - 3 + 2 + 2 = log Z + 1
# so the best shared log Z is the mean of 2 and -1: 0.5, where delta = -1.5 and +1.5


def test_flowrl_loss_by_hand():
    log_z = tensor([0.5, 0.5])
    loss, stats = flowrl_loss(FLOW_LP, FLOW_REF, FLOW_LP, FLOW_MASK, FLOW_REWARDS, log_z, beta=2.0)
    assert_close(loss, tensor(2.25), **TIGHT)  # mean(1.5^2, 1.5^2)
    assert_close(stats.trajectory_balance, tensor(0.0), **TIGHT)
    # importance weights pi/pi_old: row 0 sums -3 vs -4 -> e^1, clipped to 1.2;
    # row 1 -3 vs -3.05 -> e^0.05 = 1.051, inside [0.8, 1.2]
    old = FLOW_LP - tensor([[0.5, 0.5], [0.05, 7.0]])  # the masked 7 never counts
    loss, stats = flowrl_loss(FLOW_LP, FLOW_REF, old, FLOW_MASK, FLOW_REWARDS, log_z, beta=2.0)
    assert_close(loss, tensor((1.2 * 2.25 + math.exp(0.05) * 2.25) / 2), **TIGHT)
    assert_close(stats.importance_weight, tensor((1.2 + math.exp(0.05)) / 2), **TIGHT)


def test_flowrl_gradients_point_the_right_way():
    logprobs = FLOW_LP.clone().requires_grad_()
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    loss, _ = flowrl_loss(
        logprobs, FLOW_REF, FLOW_LP, FLOW_MASK, FLOW_REWARDS, log_z.expand(2), beta=2.0
    )
    loss.backward()
    # dL/dlogZ = mean(2 delta) = 2 * ((0 - 2) + (0 + 1)) / 2 = -1: descent raises log Z toward 0.5
    assert_close(log_z.grad, tensor(-1.0), **TIGHT)
    # dL/dlp_t = 2 delta / |y| / b: row 0 2(-2)/2/2 = -1 (raise the under-weighted sequence),
    # row 1 2(1)/1/2 = 1 (lower it); masked token: 0
    assert_close(logprobs.grad, tensor([[-1.0, -1.0], [1.0, 0.0]]), **TIGHT)
    # plain gradient descent on log Z alone converges to the hand-computed optimum 0.5
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([log_z], lr=0.25)
    for _ in range(50):
        optimizer.zero_grad()
        flowrl_loss(FLOW_LP, FLOW_REF, FLOW_LP, FLOW_MASK, FLOW_REWARDS, log_z.expand(2), 2.0)[
            0
        ].backward()
        optimizer.step()
    assert_close(log_z.detach(), tensor(0.5), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- TPO


def test_tpo_targets_and_loss_by_hand():
    # group of two, rewards 1, 0: z-scores +-0.5 / sqrt(0.5) = +-1/sqrt(2); p_old = 1/2, 1/2
    # q_0 = e^{1/sqrt2} / (e^{1/sqrt2} + e^{-1/sqrt2}) = sigmoid(sqrt 2)
    q0 = 1 / (1 + math.exp(-math.sqrt(2)))
    old = tensor([math.log(0.2), math.log(0.2)])
    targets = tpo_targets(old, tensor([1.0, 0.0]), group_size=2)
    assert_close(targets, tensor([q0, 1 - q0]), **TIGHT)
    # eta = 2 halves the scores: sigmoid(sqrt(2) / 2)
    q0_soft = 1 / (1 + math.exp(-math.sqrt(2) / 2))
    assert_close(tpo_targets(old, tensor([1.0, 0.0]), 2, eta=2.0), tensor([q0_soft, 1 - q0_soft]))
    # equal rewards: target = p_old renormalised over the group: 0.3 / 0.4, 0.1 / 0.4
    unequal = tensor([math.log(0.3), math.log(0.1)])
    assert_close(tpo_targets(unequal, tensor([3.0, 3.0]), 2), tensor([0.75, 0.25]), **TIGHT)
    # loss at the old policy: cross-entropy of q against (1/2, 1/2) = ln 2; grad = p - q
    logprobs = old.clone().requires_grad_()
    loss = tpo_loss(logprobs, targets, group_size=2)
    assert_close(loss, tensor(LOG2), **TIGHT)
    loss.backward()
    assert_close(logprobs.grad, tensor([0.5 - q0, q0 - 0.5]), **TIGHT)
    # at the target the gradient vanishes: no overshoot
    at_target = targets.log().clone().requires_grad_()
    tpo_loss(at_target, targets, 2).backward()
    assert_close(at_target.grad, torch.zeros(2, dtype=torch.float64), **TIGHT)


# ----------------------------------------------------------------------------- bandit

ARM_REWARDS = torch.tensor([0.2, 0.5, 0.1, 0.8])  # arm 3 is best
PROMPTS, GROUP = 4, 8
ESTIMATORS = (
    "grpo", "dr_grpo", "max_rl", "rloo", "reinforce_pp", "score_centering", "flowrl", "tpo"
)  # fmt: skip


def _bandit_loss(name, logits, log_z, arms, rewards):
    """One on-policy update's loss for a 4-armed bandit (every 'response' is one token)."""
    log_pi = logits.log_softmax(-1)
    logprobs = log_pi[arms][:, None]  # (b, 1)
    old, mask = logprobs.detach(), torch.ones_like(logprobs, dtype=torch.bool)
    if name in ("grpo", "dr_grpo", "max_rl", "rloo"):
        if name == "rloo":
            advantages, norm = leave_one_out_advantages(rewards, GROUP), "token-mean"
        elif name == "max_rl":
            advantages, norm = max_rl_advantages(rewards, GROUP), "seq-mean-token-mean"
        else:
            grpo = name == "grpo"
            advantages = group_normalized_advantages(rewards, GROUP, scale_by_std=grpo)
            norm = "seq-mean-token-mean" if grpo else "seq-mean-token-sum-norm"
        return policy_gradient_loss(logprobs, old, advantages, mask, loss_agg_mode=norm)[0]
    if name == "reinforce_pp":
        ref = torch.full_like(old, math.log(0.25))
        kl = kl_per_token(old, ref, "k1")
        returns = reinforce_pp_returns(rewards, kl, mask, kl_coef=0.01)
        advantages = whiten(returns, mask)
        return policy_gradient_loss(logprobs, old, advantages, mask, loss_agg_mode="token")[0]
    if name == "score_centering":
        sampler = log_pi.detach().exp().expand(arms.shape[0], 1, 4)
        advantages = group_normalized_advantages(rewards, GROUP)
        return score_centering_loss(
            log_pi.expand(arms.shape[0], 1, 4), sampler, arms[:, None], advantages, mask
        )
    if name == "flowrl":
        normalized = group_normalized_advantages(rewards, GROUP)
        ref = torch.full_like(old, math.log(0.25))
        batch_log_z = log_z.expand(arms.shape[0])
        return flowrl_loss(logprobs, ref, old, mask, normalized, batch_log_z)[0]
    targets = tpo_targets(old[:, 0], rewards, GROUP)
    return tpo_loss(logprobs[:, 0], targets, GROUP)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_bandit_learns_the_best_arm(name):
    generator = torch.Generator().manual_seed(1)
    logits = torch.zeros(4, requires_grad=True)
    log_z = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([logits, log_z], lr=0.1)
    for _ in range(200):
        with torch.no_grad():
            probs = logits.softmax(-1)
        arms = torch.multinomial(probs, PROMPTS * GROUP, replacement=True, generator=generator)
        loss = _bandit_loss(name, logits, log_z, arms, ARM_REWARDS[arms])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    best = logits.softmax(-1)[3].item()
    assert best > 0.9, f"{name}: p(best arm) = {best:.3f} after 200 steps"
