"""The online-RL options the field expects, against values worked out by hand: loss aggregation
(verl's names, the old ones as aliases), clip-higher, dual clip, GSPO's sequence ratio, SPO,
the drift KL and the entropy bonus on the advantage, MaxRL, DAPO's overlong penalty; then the
config's one-line refusals. Training with them: tests/test_algorithm_options.py."""

import math

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.functional.advantages import max_rl_advantages, overlong_penalty
from palm_rlhf.functional.policy_losses import (
    entropy_advantage_bonus,
    full_kl_per_response,
    importance_ratio,
    policy_gradient_loss,
    reduce_token_losses,
)
from palm_rlhf.rl.ppo.config import PPOConfig

TIGHT = dict(atol=1e-6, rtol=1e-6)
T, F_ = True, False


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


# ratios [[1, 1.5, 0.5], [1.1, 2, 9 (masked)]], sequence advantages [1, -2] (as test_estimators)
RATIOS = tensor([[1.0, 1.5, 0.5], [1.1, 2.0, 9.0]])
MASK = torch.tensor([[T, T, T], [T, T, F_]])
ADV = tensor([1.0, -2.0])
OLD = torch.zeros(2, 3, dtype=torch.float64)


def loss_of(**options):
    logprobs = RATIOS.log().requires_grad_()
    loss, stats = policy_gradient_loss(logprobs, OLD, ADV, MASK, **options)
    loss.backward()
    return loss, stats, logprobs.grad


# ----------------------------------------------------------------------------- aggregation


def test_sequence_mean_skips_rows_without_tokens():
    """A filtered response (no token left) is not one of the sequences averaged over."""
    losses = tensor([[1.0, 3.0], [5.0, 7.0]])
    mask = torch.tensor([[T, T], [F_, F_]])
    assert_close(reduce_token_losses(losses, mask, "seq-mean-token-mean"), tensor(2.0), **TIGHT)
    assert_close(reduce_token_losses(losses, mask, "token-mean"), tensor(2.0), **TIGHT)
    # the constant normaliser keeps b * max_length = 2 * 2
    assert_close(reduce_token_losses(losses, mask, "seq-mean-token-sum-norm"), tensor(1.0))


def test_loss_agg_mode_old_names_are_aliases_in_the_config():
    config = PPOConfig.from_keywords(algorithm="grpo", length_norm="constant")
    assert config.loss_agg_mode == config.token_reduction == "seq-mean-token-sum-norm"
    assert PPOConfig.from_keywords(loss_agg_mode="token").loss_agg_mode == "token-mean"
    # unset: each algorithm's own (PPO's token mean, the group algorithms' sequence mean)
    assert PPOConfig().token_reduction == "token-mean"
    assert PPOConfig(algorithm="tpo").token_reduction == "seq-mean-token-mean"
    with pytest.raises(TypeError, match="give loss_agg_mode= only"):
        PPOConfig.from_keywords(length_norm="token", loss_agg_mode="token-mean")


# ----------------------------------------------------------------------------- clipping


def test_clip_higher_by_hand():
    """eps_low 0.2, eps_high 0.6: the ratio is clipped to [0.8, 1.6].
    row 0 (A = 1): -min(1, 1) = -1, -min(1.5, 1.5) = -1.5 (inside now), -min(0.5, 0.8) = -0.5
    row 1 (A = -2): 2.2, -min(-4, -3.2) = 4                          token mean 3.2 / 5"""
    loss, stats, grad = loss_of(clip_eps=0.2, clip_eps_high=0.6, loss_agg_mode="token-mean")
    assert_close(loss, tensor(0.64), **TIGHT)
    assert_close(stats.clip_fraction, tensor(0.4), **TIGHT)  # 0.5 and 2 of 5 outside
    # (0, 1) is no longer clipped: d(-rho A)/d log pi = -1.5 / 5
    assert_close(grad[0, 1], tensor(-0.3), **TIGHT)
    symmetric, _, _ = loss_of(clip_eps=0.2, loss_agg_mode="token-mean")
    assert_close(symmetric, tensor(0.7), **TIGHT)  # test_estimators' symmetric value


def test_dual_clip_bounds_a_negative_advantages_loss():
    """c = 1.5: where A < 0 the loss is at most -c A = 3; row 1's 4 becomes 3, 2.2 stays.
    (-2.7 + 2.2 + 3) / 5 = 0.5, and the bounded token passes no gradient."""
    loss, _, grad = loss_of(clip_eps=0.2, dual_clip_c=1.5, loss_agg_mode="token-mean")
    assert_close(loss, tensor(0.5), **TIGHT)
    assert grad[1, 1] == 0 and grad[1, 0] == pytest.approx(2.2 / 5)
    loose, _, _ = loss_of(clip_eps=0.2, dual_clip_c=3.0, loss_agg_mode="token-mean")
    assert_close(loose, tensor(0.7), **TIGHT)  # -c A = 6 bounds nothing here


def test_sequence_level_ratio_is_gspo():
    """GSPO: s = exp(mean_t log rho): row 0 (0.75)^(1/3) = 0.90856 (inside the clip), row 1
    sqrt(2.2) = 1.48324 (above 1.2, but with A < 0 the unclipped term is the minimum).
    seq-mean: mean(-0.90856, 2 * 1.48324); gradient per token s * (-A) / (|y| * b)."""
    s0, s1 = 0.75 ** (1 / 3), math.sqrt(2.2)
    loss, _, grad = loss_of(importance_sampling_level="sequence")
    assert_close(loss, tensor((-s0 + 2 * s1) / 2), **TIGHT)
    expected = tensor([[-s0 / 6] * 3, [2 * s1 / 4, 2 * s1 / 4, 0.0]])
    assert_close(grad, expected, **TIGHT)
    # every token of a response carries its sequence's ratio
    ratio = importance_ratio(RATIOS.log(), OLD, MASK, "sequence")
    assert_close(ratio[0], tensor([s0] * 3), **TIGHT)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(RATIOS.log(), OLD, MASK, "group")


def test_simple_policy_optimization_by_hand():
    """SPO: l = -rho A + |A| (rho - 1)^2 / (2 * 0.2).
    row 0: -1, -1.5 + 0.625, -0.5 + 0.625 -> -1.75; row 1: 2.2 + 0.05, 4 + 5 -> 11.25."""
    loss, _, grad = loss_of(simple_policy_optimization=True, loss_agg_mode="token-mean")
    assert_close(loss, tensor(9.5 / 5), **TIGHT)
    # its gradient never vanishes: d/d log pi = rho (-A + |A| (rho - 1) / 0.2), at (0, 1):
    # 1.5 * (-1 + 2.5) / 5 = 0.45, where the clip's would be 0
    assert_close(grad[0, 1], tensor(0.45), **TIGHT)


# ----------------------------------------------------------------------------- advantages


def test_full_vocabulary_drift_per_response():
    """KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln (2/3) = 1/2 ln (4/3); a masked-out
    token (whatever its values) does not count; a response of no token gets 0."""
    old = tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.5, 0.5], [0.5, 0.5]]])
    new = tensor([[[0.25, 0.75], [0.1, 0.9]], [[0.5, 0.5], [0.5, 0.5]]]).log().requires_grad_()
    mask = torch.tensor([[T, F_], [F_, F_]])
    kl = full_kl_per_response(old, new, mask)
    assert_close(kl, tensor([0.5 * math.log(4 / 3), 0.0]), **TIGHT)
    kl.sum().backward()  # d/d log p_v = -p_old(v): the gradient goes through the new policy
    assert_close(new.grad[0, 0], tensor([-0.5, -0.5]), **TIGHT)


def test_entropy_bonus_on_the_advantage_is_capped_by_it():
    """A + min(0.4 H, |A| / 2): row 0 (A = 1) bonuses 0.2, min(1.2, 0.5) = 0.5; row 1 (A = -2)
    0.4, and 0 outside the mask. The cap keeps A's gradient, 1 + 1/2 where it binds."""
    advantages = tensor([1.0, -2.0]).requires_grad_()
    entropy = tensor([[0.5, 3.0], [1.0, 0.2]]).requires_grad_()
    mask = torch.tensor([[T, T], [T, F_]])
    shaped = entropy_advantage_bonus(advantages, entropy, mask, scale=0.4, kappa=2.0)
    assert_close(shaped, tensor([[1.2, 1.5], [-1.6, -2.0]]), **TIGHT)
    shaped.sum().backward()
    assert_close(advantages.grad, tensor([2.5, 2.0]), **TIGHT)
    assert entropy.grad is None or entropy.grad.abs().sum() == 0  # H is detached


def test_max_rl_divides_by_the_groups_mean_reward():
    """[1, 3]: mean 2 -> -1/2, 1/2; [-1, -3]: mean -2, |mean| 2 -> 1/2, -1/2; [2, 2]: 0."""
    rewards = tensor([1.0, 3.0, -1.0, -3.0, 2.0, 2.0])
    expected = tensor([-0.5, 0.5, 0.5, -0.5, 0.0, 0.0])
    assert_close(max_rl_advantages(rewards, 2), expected, **TIGHT)
    zero_mean = max_rl_advantages(tensor([-1.0, 1.0]), 2)  # the reference's huge advantages
    assert_close(zero_mean, tensor([-1e8, 1e8]), **TIGHT)


def test_overlong_penalty_by_hand():
    """L_max 10, buffer 4, factor 2: 0 up to 6 tokens, then linear to -2 at 10, -2 beyond."""
    lengths = torch.tensor([5, 6, 8, 10, 12])
    penalty = overlong_penalty(lengths, torch.tensor(10), buffer_len=4, factor=2.0)
    assert_close(penalty, torch.tensor([0.0, 0.0, -1.0, -2.0, -2.0]), **TIGHT)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(dual_clip_c=1.0), "dual_clip_c > 1"),
        (dict(clip_eps_high=-0.1), "clip_eps_low, clip_eps_high > 0"),
        (dict(algorithm="tpo", clip_eps_high=0.3), "clip_eps_high only with"),
        (dict(algorithm="flowrl", importance_sampling_level="sequence"), "'sequence' only with"),
        (dict(importance_sampling_level="group"), "importance_sampling_level in"),
        (
            dict(algorithm="grpo", score_centering=True, simple_policy_optimization=True),
            "simple_policy_optimization without score_centering",
        ),
        (dict(simple_policy_optimization=True, dual_clip_c=2.0), "with simple_policy_optimization"),
        (dict(algorithm="rloo", max_rl=True), "max_rl only with grpo"),
        (dict(algorithm="grpo", max_rl=True, scale_by_std=False), "max_rl without Dr. GRPO"),
        (dict(algorithm="grpo", dr_grpo_constant=4.0), "dr_grpo_constant only with grpo and"),
        (dict(algorithm="tpo", overlong_filtering=True), "overlong_filtering only with"),
        (dict(overlong_buffer_len=0), "overlong_buffer_len >= 1"),
        (dict(dynamic_sampling=True), "dynamic_sampling only with the critic-free group"),
        (dict(algorithm="reinforce++", group_size=1, dynamic_sampling=True), "dynamic_sampling"),
        (dict(algorithm="grpo", dynamic_sampling_max_retries=-1), "max_retries >= 0"),
        (dict(algorithm="flowrl", kl_div_loss_weight=0.1), "kl_div_loss_weight only with"),
        (dict(algorithm="tpo", entropy_to_advantage_scale=0.4), "entropy_to_advantage_scale only"),
        (dict(entropy_to_advantage_kappa=0.0), "entropy_to_advantage_kappa > 0"),
        (dict(algorithm="grpo", score_centering_topk=8), "only with score_centering"),
        (dict(loss_agg_mode="tokens"), "loss_agg_mode in"),
    ],
)
def test_bad_option_values_are_one_clear_line(keywords, message):
    with pytest.raises(ValueError, match=message) as caught:
        PPOConfig(**keywords)
    assert "\n" not in str(caught.value)


def test_clip_range_defaults_to_eps_clip_and_the_weight_fn_saves_by_name():
    assert PPOConfig(eps_clip=0.3).clip_range == (0.3, 0.3)
    assert PPOConfig(eps_clip=0.3, clip_eps_high=0.28).clip_range == (0.3, 0.28)
    config = PPOConfig(algorithm="grpo", score_centering=True, score_centering_weight_fn=torch.sqrt)
    assert config.to_dict()["score_centering_weight_fn"] == "sqrt"


def test_the_old_length_norm_flag_still_works_on_the_command_line():
    from palm_rlhf.options import parse_config
    from palm_rlhf.rl.ppo.stage import PPOStageConfig

    required = ["--policy", "p", "--reward", "r", "--prompts", "q", "--algorithm", "grpo"]
    config = parse_config(PPOStageConfig, [*required, "--length-norm", "constant"])
    assert config.loss_agg_mode == "seq-mean-token-sum-norm"
    config = parse_config(PPOStageConfig, [*required, "--loss-agg-mode", "token-mean"])
    assert config.trainer_config().token_reduction == "token-mean"


def test_every_new_option_is_a_flag_but_the_weight_function():
    from palm_rlhf.options import config_parser
    from palm_rlhf.rl.ppo.stage import PPOStageConfig

    flags = config_parser(PPOStageConfig).format_help()
    for flag in (
        "--loss-agg-mode",
        "--clip-eps-low",
        "--clip-eps-high",
        "--dual-clip-c",
        "--importance-sampling-level",
        "--simple-policy-optimization",
        "--max-rl",
        "--dr-grpo-constant",
        "--entropy-to-advantage-scale",
        "--score-centering-topk",
        "--dynamic-sampling",
        "--dynamic-sampling-max-retries",
        "--overlong-filtering",
        "--overlong-buffer-len",
        "--overlong-penalty-factor",
    ):
        assert flag in flags, flag
    assert "--score-centering-weight-fn" not in flags  # code: an API keyword only
