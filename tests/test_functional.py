"""palm_rlhf.functional against values worked out by hand (arithmetic in the comments) and
invariances."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from palm_rlhf.functional.advantages import gae, kl_penalized_rewards
from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.logprobs import (
    entropy_from_logits,
    log_probs_from_logits,
    sequence_log_probs,
)
from palm_rlhf.functional.masked import masked_mean, masked_sum, masked_var, whiten
from palm_rlhf.functional.policy_losses import policy_gradient_loss
from palm_rlhf.functional.preference import (
    dpo_loss,
    pairwise_ranking_loss,
    ranking_accuracy,
    ranking_loss_from_scores,
)
from palm_rlhf.functional.value_losses import explained_variance, value_loss

TIGHT = dict(atol=1e-6, rtol=1e-6)
T, F_ = True, False


def tensor(*rows, dtype=torch.float64):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype)


# ----------------------------------------------------------------------------- masked stats

X = tensor([1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), float("inf")])
X_MASK = torch.tensor([[T, T, T, F_], [T, T, F_, F_]])  # kept values: 1 2 3 4 5


def test_masked_sum_mean_var_by_hand_and_ignore_nonfinite_masked_values():
    assert_close(masked_sum(X, X_MASK), tensor(15.0), **TIGHT)  # 1+2+3+4+5
    assert_close(masked_sum(X, X_MASK, dim=1), tensor([6.0, 9.0]), **TIGHT)
    assert_close(masked_mean(X, X_MASK), tensor(3.0), **TIGHT)  # 15 / 5
    assert_close(masked_mean(X, X_MASK, dim=1), tensor([2.0, 4.5]), **TIGHT)  # 6/3, 9/2
    # squared deviations from 3: 4 1 0 1 4 -> sum 10; unbiased 10/4, biased 10/5
    assert_close(masked_var(X, X_MASK), tensor(2.5), **TIGHT)
    assert_close(masked_var(X, X_MASK, unbiased=False), tensor(2.0), **TIGHT)
    # an empty row has mean 0, not NaN
    assert_close(
        masked_mean(X, torch.tensor([[T, T, F_, F_], [F_] * 4]), dim=1), tensor([1.5, 0.0])
    )


def test_masked_var_rejects_too_few_entries_and_bad_masks():
    one = torch.tensor([[T, F_, F_, F_], [F_] * 4])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    assert_close(masked_var(X, one, unbiased=False), tensor(0.0))
    with pytest.raises(TypeError, match="bool"):
        masked_mean(X, X_MASK.float())
    with pytest.raises(ValueError, match="shape"):
        masked_mean(X, X_MASK[:, :3])


def test_whiten_by_hand_and_statistics():
    out = whiten(X, X_MASK, eps=0.0)
    # mean 3, unbiased var 2.5: (x - 3) / sqrt(2.5); masked-out positions are 0
    s = math.sqrt(2.5)
    expected = tensor([-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0])
    assert_close(out, expected, **TIGHT)
    assert_close(masked_mean(out, X_MASK), tensor(0.0), atol=1e-12, rtol=0)
    assert_close(masked_var(out, X_MASK), tensor(1.0), **TIGHT)
    # shift_mean=False keeps the mean: (x - 3) / sqrt(2.5) + 3
    assert_close(
        whiten(X, X_MASK, shift_mean=False, eps=0.0),
        torch.where(X_MASK, expected + 3, 0),
        **TIGHT,
    )


def test_whiten_ignores_masked_out_values():
    x = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.4
    mask[0, :2] = True
    changed = torch.where(mask, x, x + 1e3 * torch.randn_like(x))
    assert torch.any(changed != x)
    assert_close(whiten(changed, mask), whiten(x, mask), atol=0, rtol=0)


def test_whiten_below_two_entries_passes_them_through_and_the_global_count_decides():
    # one masked entry: Bessel's variance needs 2, so the entry passes through unchanged (2.0);
    # the masked-out 5.0 is 0 as in every other output. PPO and REINFORCE++ both get this.
    x, mask = tensor([[2.0, 5.0]]), torch.tensor([[T, F_]])
    assert_close(whiten(x, mask), tensor([[2.0, 0.0]]), atol=0, rtol=0)
    assert_close(whiten(x, mask, shift_mean=False), tensor([[2.0, 0.0]]), atol=0, rtol=0)
    assert_close(whiten(x, torch.zeros_like(mask)), tensor([[0.0, 0.0]]), atol=0, rtol=0)
    # the same shard when another process holds the entry 4.0 (count 1, sum 4, sum sq 16):
    # global count 2, mean 3, var ((2-3)^2 + (4-3)^2) / 1 = 2 -> (2 - 3) / sqrt(2)
    other = tensor([1.0, 4.0, 16.0])
    out = whiten(x, mask, all_reduce=lambda moments: moments + other, eps=0.0)
    assert_close(out, tensor([[-1 / math.sqrt(2), 0.0]]), **TIGHT)


# ----------------------------------------------------------------------------- token statistics


def test_log_probs_from_logits_by_hand_and_stable_for_large_logits():
    # softmax([0, log 3]) = [1/4, 3/4]
    logits = tensor([[[0.0, math.log(3.0)]] * 2])
    out = log_probs_from_logits(logits, torch.tensor([[0, 1]]))
    assert_close(out, tensor([[math.log(0.25), math.log(0.75)]]), **TIGHT)
    # float32 logits [1000, 1001] would overflow exp(): log p = -log(1 + e), -log(1 + e^-1)
    big = torch.tensor([[[1000.0, 1001.0]] * 2])
    out = log_probs_from_logits(big, torch.tensor([[0, 1]]))
    expected = torch.tensor([[-math.log1p(math.e), -math.log1p(math.exp(-1))]])
    assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_log_probs_from_logits_equals_direct_softmax_and_half_path():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    probs = logits.exp() / logits.exp().sum(-1, keepdim=True)
    direct = probs.gather(-1, labels[..., None]).squeeze(-1).log()
    assert_close(log_probs_from_logits(logits, labels), direct, atol=1e-12, rtol=1e-12)
    # bfloat16 logits are upcast row by row; compare against the float32 path on the same values
    low = logits.to(torch.bfloat16)
    out = log_probs_from_logits(low, labels)
    assert out.dtype == torch.float32
    assert_close(out, log_probs_from_logits(low.float(), labels), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        log_probs_from_logits(logits, labels[:, :4])


def test_entropy_from_logits_by_hand():
    # uniform over 7 -> log 7; [1/4, 3/4] -> -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446
    uniform = torch.full((1, 1, 7), 3.0, dtype=torch.float64)
    assert_close(entropy_from_logits(uniform), tensor([[math.log(7.0)]]), **TIGHT)
    skew = tensor([[[500.0, 500.0 + math.log(3.0)]]])
    assert_close(entropy_from_logits(skew), tensor([[0.5623351446188083]]), **TIGHT)
    # float32 [1000, 1001]: p1 = sigmoid(1), p0 = 1 - p1; no cancellation at large logits
    p1 = 1 / (1 + math.exp(-1))
    h = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))  # 0.5822031...
    big = torch.tensor([[[1000.0, 1001.0]]])
    assert_close(entropy_from_logits(big), torch.tensor([[h]]), atol=1e-6, rtol=1e-6)
    # bfloat16 [0, 1] is exact; the result comes back in float32 with the same value
    low = entropy_from_logits(torch.tensor([[[0.0, 1.0]]], dtype=torch.bfloat16))
    assert_close(low, torch.tensor([[h]]), atol=1e-6, rtol=1e-6)


def test_sequence_log_probs_sums_masked_tokens():
    lp = tensor([-1.0, -2.0, -3.0], [-0.5, float("-inf"), -0.25])
    mask = torch.tensor([[T, T, F_], [T, F_, T]])
    assert_close(sequence_log_probs(lp, mask), tensor([-3.0, -0.75]), **TIGHT)  # -1-2, -0.5-0.25


def test_kl_estimators_by_hand():
    logp = tensor([math.log(0.5), math.log(0.2)])
    logq = tensor([math.log(0.25), math.log(0.4)])
    ln2 = math.log(2.0)
    assert_close(kl_per_token(logp, logq), tensor([ln2, -ln2]), **TIGHT)  # log(.5/.25), log(.2/.4)
    assert_close(kl_per_token(logp, logq, "k2"), tensor([0.5 * ln2**2] * 2), **TIGHT)
    # r = q/p = 0.5 -> (0.5 - 1) - log 0.5 = ln2 - 0.5; r = 2 -> 1 - ln2
    assert_close(kl_per_token(logp, logq, "k3"), tensor([ln2 - 0.5, 1 - ln2]), **TIGHT)
    assert_close(kl_per_token(logp, logq, "abs"), tensor([ln2, ln2]), **TIGHT)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, logq, "k4")


def test_kl_zero_at_equality_k3_nonnegative_and_k1_k3_unbiased():
    logp = torch.randn(4, 6, dtype=torch.float64)
    for kind in ("k1", "k2", "k3", "abs"):
        assert_close(kl_per_token(logp, logp.clone(), kind), torch.zeros_like(logp), atol=0, rtol=0)
    assert (kl_per_token(logp, torch.randn_like(logp) * 3, "k3") >= 0).all()
    # expectation under p of k1 and of k3 is the exact KL(p || q)
    logp, logq = (
        torch.randn(9, dtype=torch.float64).log_softmax(0),
        torch.randn(9).double().log_softmax(0),
    )
    exact = (logp.exp() * (logp - logq)).sum()
    for kind in ("k1", "k3"):
        assert_close((logp.exp() * kl_per_token(logp, logq, kind)).sum(), exact, **TIGHT)


# ----------------------------------------------------------------------------- PPO


def test_kl_penalized_rewards_places_score_at_last_mask_position():
    logp = tensor([0.2, -0.4, 9.0], [9.0, 0.5, 1.0])
    ref = torch.zeros_like(logp)  # k1 = logp
    mask = torch.tensor([[T, T, F_], [F_, T, T]])
    out = kl_penalized_rewards(tensor([3.0, -1.0]), kl_per_token(logp, ref), mask, kl_coef=0.1)
    # row 0: [-0.1*0.2, -0.1*(-0.4) + 3, 0] ; row 1: [0, -0.1*0.5, -0.1*1.0 - 1]
    assert_close(out, tensor([-0.02, 3.04, 0.0], [0.0, -0.05, -1.1]), **TIGHT)
    # a single-token response (position 0) receives the score too: -0.1*0.2 + 3
    single = torch.tensor([[T, F_, F_], [F_, F_, T]])
    out = kl_penalized_rewards(tensor([3.0, -1.0]), kl_per_token(logp, ref), single, kl_coef=0.1)
    assert_close(out, tensor([2.98, 0.0, 0.0], [0.0, 0.0, -1.1]), **TIGHT)


def test_kl_penalized_rewards_rejects_empty_rows():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        kl_penalized_rewards(torch.ones(2), logp, torch.tensor([[T, F_, F_], [F_] * 3]), 0.1)


def test_gae_1x3_by_hand():
    rewards, values = tensor([[1.0, 0.0, 2.0]]), tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    # gamma*lam = 0.72; bootstrap after the last token is 0
    # t=2: delta = 2 - 1.5 = 0.5                     A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35         A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4          A0 = 1.4 + 0.72*0.71  = 1.9112
    assert_close(adv, tensor([[1.9112, 0.71, 0.5]]), **TIGHT)
    assert_close(ret, tensor([[2.4112, 1.71, 2.0]]), **TIGHT)  # A + V


def test_gae_2x4_ragged_with_prompt_positions_by_hand():
    # row 0 ends one step early; row 1 starts after a prompt position. Masked entries hold junk.
    rewards = tensor([0.0, 0.0, 1.0, 99.0], [50.0, 1.0, 0.0, 2.0])
    values = tensor([1.0, 2.0, 3.0, 100.0], [7.0, 0.5, 1.0, 1.5])
    mask = torch.tensor([[T, T, T, F_], [F_, T, T, T]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: t=2: delta = 1 + 0 - 3 = -2 (V after the end counts as 0)       A2 = -2
    #        t=1: delta = 0 + 0.9*3 - 2 = 0.7      A1 = 0.7 + 0.72*(-2)   = -0.74
    #        t=0: delta = 0 + 0.9*2 - 1 = 0.8      A0 = 0.8 + 0.72*(-0.74) = 0.2672
    # row 1: positions 1..3 are the 1x3 example above; position 0 is prompt -> 0
    assert_close(adv, tensor([0.2672, -0.74, -2.0, 0.0], [0.0, 1.9112, 0.71, 0.5]), **TIGHT)
    assert_close(ret, tensor([1.2672, 1.26, 1.0, 0.0], [0.0, 2.4112, 1.71, 2.0]), **TIGHT)


def test_gae_limits_lambda_one_is_monte_carlo_lambda_zero_is_td():
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([[T] * 6, [F_, F_, T, T, T, F_], [F_, T, T, T, T, T]])
    gamma, m = 0.9, mask.double()
    adv1, ret1 = gae(rewards, values, mask, gamma=gamma, lam=1)
    # lam = 1: returns are the discounted sum of future in-response rewards
    mc = torch.zeros_like(rewards)
    for t in range(6):
        for k in range(t, 6):
            alive = mask[:, t : k + 1].all(dim=1).double()
            mc[:, t] += alive * gamma ** (k - t) * rewards[:, k]
    assert_close(ret1, mc * m, **TIGHT)
    # lam = 0: one-step TD error r_t + gamma V_{t+1} m_{t+1} - V_t
    adv0, _ = gae(rewards, values, mask, gamma=gamma, lam=0)
    next_v = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    assert_close(adv0, (rewards + gamma * next_v - values) * m, **TIGHT)


def _ppo(ratios, advantages, mask=None, eps=0.2):
    old = torch.zeros(1, len(ratios), dtype=torch.float64)
    logprobs = tensor([math.log(r) for r in ratios])[None].requires_grad_()
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor([mask])
    loss, stats = policy_gradient_loss(logprobs, old, tensor([advantages]), mask, eps, "token")
    return loss, stats, logprobs


@pytest.mark.parametrize(
    "ratio, advantage, expected, clipped",
    [
        (1.1, 2.0, -2.2, False),  # inside [0.8, 1.2]: min(2.2, 2.2)
        (1.5, 2.0, -2.4, True),  # A > 0, r > 1.2: min(3.0, 1.2*2) = 2.4
        (0.5, -1.0, 0.8, True),  # A < 0, r < 0.8: min(-0.5, 0.8*-1) = -0.8
        (1.5, -1.0, 1.5, False),  # A < 0, r > 1.2: min(-1.5, -1.2) = -1.5, unclipped side wins
        (0.5, 2.0, -1.0, False),  # A > 0, r < 0.8: min(1.0, 1.6) = 1.0, unclipped side wins
    ],
)
def test_ppo_clipped_loss_points_by_hand(ratio, advantage, expected, clipped):
    loss, _, logprobs = _ppo([ratio], [advantage])
    assert_close(loss, tensor(expected), **TIGHT)
    loss.backward()
    # d(-r A)/d log p = -r A where the unclipped term is active, 0 where the clip is active
    grad = 0.0 if clipped else -ratio * advantage
    assert_close(logprobs.grad, tensor([[grad]]), **TIGHT)


def test_ppo_clipped_loss_masked_batch_and_stats():
    loss, stats, _ = _ppo([1.1, 1.5, 0.5, 7.0], [2.0, 2.0, -1.0, 5.0], mask=[T, T, T, F_])
    assert_close(loss, tensor(-(2.2 + 2.4 - 0.8) / 3), **TIGHT)
    assert_close(stats.clip_fraction, tensor(2 / 3), **TIGHT)  # |r-1| > 0.2 for 1.5 and 0.5
    # k3 = (r - 1) - log r, averaged over the three masked tokens
    k3 = ((0.1 - math.log(1.1)) + (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3
    assert_close(stats.approx_kl, tensor(k3), **TIGHT)
    assert not stats.approx_kl.requires_grad


def test_value_loss_clipped_and_unclipped_by_hand():
    values = tensor([[1.5, 1.1, 0.5, 9.0]])
    old = tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[T, T, T, F_]])
    # unclipped squared errors: 0.25, 1.21, 2.25
    assert_close(
        value_loss(values, old, returns, mask), tensor(0.5 * (0.25 + 1.21 + 2.25) / 3), **TIGHT
    )
    # eps 0.2: V_clip = 1.2, 1.1, 0.8 -> (V_clip - R)^2 = 0.64, 1.21, 1.44
    # max with unclipped: 0.64, 1.21, 2.25
    clipped = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert_close(clipped, tensor(0.5 * (0.64 + 1.21 + 2.25) / 3), **TIGHT)


def test_explained_variance_by_hand():
    returns, mask = tensor([[1.0, 2.0, 3.0, 4.0, 50.0]]), torch.tensor([[T, T, T, T, F_]])
    assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    assert_close(explained_variance(torch.zeros_like(returns), returns, mask), torch.tensor(0.0))
    # R - V = [0, 0, 0, 1]: var = 0.1875 ; Var[R] = 1.25 -> 1 - 0.15 = 0.85
    values = tensor([[1.0, 2.0, 3.0, 3.0, 0.0]])
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.85), atol=1e-6, rtol=0)
    assert explained_variance(returns, torch.ones_like(returns), mask).isnan()


# ----------------------------------------------------------------------------- preference losses


def test_pairwise_ranking_loss_by_hand():
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286 ; with margin 1: log 2
    chosen, rejected = tensor([1.0, 3.0]), tensor([0.0, 2.0])
    assert_close(pairwise_ranking_loss(chosen, rejected), tensor(0.31326168751822286), **TIGHT)
    assert_close(
        pairwise_ranking_loss(chosen, rejected, margin=1.0), tensor(math.log(2.0)), **TIGHT
    )


SCORES = tensor([2.0, 0.0, 1.0], [0.5, 3.0, -7.0])
RANKING = torch.tensor([[0, 2, 1], [1, 0, 5]])
MASK = torch.tensor([[T, T, T], [T, T, F_]])  # second prompt has only two responses


def test_ranking_loss_k3_by_hand():
    # prompt 0: order 0 > 2 > 1; pairs s0-s1 = 2, s0-s2 = 1, s2-s1 = 1
    #   (log(1+e^-2) + 2 log(1+e^-1)) / 3
    # prompt 1: only 1 > 0 is valid: s1 - s0 = 2.5 -> log(1+e^-2.5)
    p0 = (math.log1p(math.exp(-2)) + 2 * math.log1p(math.exp(-1))) / 3
    p1 = math.log1p(math.exp(-2.5))
    assert_close(ranking_loss_from_scores(SCORES, RANKING, MASK), tensor((p0 + p1) / 2), **TIGHT)
    # margin 1 shifts every difference: prompt 0 diffs 1, 0, 0 ; prompt 1 diff 1.5
    p0 = (math.log1p(math.exp(-1)) + 2 * math.log(2)) / 3
    p1 = math.log1p(math.exp(-1.5))
    out = ranking_loss_from_scores(SCORES, RANKING, MASK, margin=1.0)
    assert_close(out, tensor((p0 + p1) / 2), **TIGHT)


def test_ranking_loss_ties_form_no_pair_and_empty_batches_fail():
    ranking = torch.tensor([[0, 0, 1]])  # pairs: 0 > 2 and 1 > 2 only
    scores = tensor([[2.0, 0.0, 1.0]])  # diffs 1 and -1
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert_close(ranking_loss_from_scores(scores, ranking), tensor(expected), **TIGHT)
    with pytest.raises(ValueError, match="different rank"):
        ranking_loss_from_scores(scores, torch.tensor([[1, 1, 1]]))
    with pytest.raises(TypeError, match="integer"):
        ranking_loss_from_scores(scores, ranking.float())


def test_ranking_loss_k2_equals_pairwise_loss():
    chosen, rejected = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    scores = torch.stack([rejected, chosen], dim=1)  # chosen listed second: rank 0
    ranking = torch.tensor([[1, 0]] * 5)
    assert_close(
        ranking_loss_from_scores(scores, ranking), pairwise_ranking_loss(chosen, rejected), **TIGHT
    )


def test_ranking_loss_and_accuracy_invariant_to_listing_order():
    scores, ranking = (
        torch.randn(2, 4, dtype=torch.float64),
        torch.tensor([[3, 0, 2, 1], [0, 1, 1, 2]]),
    )
    mask = torch.tensor([[T, T, T, T], [T, F_, T, T]])
    loss, acc = (
        ranking_loss_from_scores(scores, ranking, mask),
        ranking_accuracy(scores, ranking, mask),
    )
    for perm in itertools.permutations(range(4)):
        p = list(perm)
        assert_close(
            ranking_loss_from_scores(scores[:, p], ranking[:, p], mask[:, p]), loss, **TIGHT
        )
        assert_close(ranking_accuracy(scores[:, p], ranking[:, p], mask[:, p]), acc, **TIGHT)


def test_ranking_accuracy_by_hand():
    # order 0 > 1 > 2 with scores 2, 0, 1: pairs (0,1) ok, (0,2) ok, (1,2) wrong -> 2/3
    scores, ranking = tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0, 1, 2]])
    assert_close(ranking_accuracy(scores, ranking), tensor(2 / 3), **TIGHT)
    # pooled over the batch: prompt 0 of SCORES has 3/3 right, prompt 1 has 1/1 -> 4/4
    assert_close(ranking_accuracy(SCORES, RANKING, MASK), tensor(1.0), **TIGHT)


def test_dpo_loss_log2_at_equality_and_by_hand():
    logps = torch.randn(3, dtype=torch.float64)
    other = torch.randn(3, dtype=torch.float64)
    for ls in (0.0, 0.2):
        loss, rc, rr = dpo_loss(logps, other, logps, other, beta=0.5, label_smoothing=ls)
        assert_close(loss, tensor(math.log(2.0)), **TIGHT)
        assert_close(rc, torch.zeros(3, dtype=torch.float64), atol=0, rtol=0)
    # beta 0.1: chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11) = -1 -> h = 0.1 * 2 = 0.2
    pc, pr, rc, rr = tensor([-10.0]), tensor([-12.0]), tensor([-11.0]), tensor([-11.0])
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, tensor(math.log1p(math.exp(-0.2))), **TIGHT)  # 0.598138869381592
    assert_close(chosen_reward, tensor([0.1]), **TIGHT)
    assert_close(rejected_reward, tensor([-0.1]), **TIGHT)
    # smoothing 0.1: 0.9 log(1+e^-0.2) + 0.1 log(1+e^0.2)
    smooth = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert_close(
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)[0], tensor(smooth), **TIGHT
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = tensor([-3.0]).requires_grad_(), tensor([-3.0]).requires_grad_()
    loss, _, _ = dpo_loss(pc, pr, tensor([-3.0]), tensor([-3.0]), beta=0.5)
    loss.backward()
    # d/dh -log sigmoid(h) at h = 0 is -1/2; dh/dpc = beta, dh/dpr = -beta
    assert_close(pc.grad, tensor([-0.25]), **TIGHT)
    assert_close(pr.grad, tensor([0.25]), **TIGHT)


def test_sequence_log_probs_of_logits_matches_log_softmax():
    # log-probs from logits -> summed over the response, cross-checked with F.log_softmax
    logits = torch.randn(2, 4, 6)
    labels = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[F_, T, T, T], [F_, F_, T, T]])
    token_lp = log_probs_from_logits(logits, labels)
    ref = F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(sequence_log_probs(token_lp, mask), (ref * mask).sum(-1), atol=1e-5, rtol=1e-5)
