"""The reference's critic options: pooled values, an HL-Gauss classification critic, a separate
critic model, an ImplicitPRM as the critic, and a prebuilt ActorCritic. Against the
reference's own outputs (tests/fixtures/reference) where it has them, by hand elsewhere, and on
the toy task of test_ppo.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf import ActorCritic, ImplicitPRM, PaLM
from palm_rlhf.cli import build_parser
from palm_rlhf.functional.advantages import pooled_advantages
from palm_rlhf.functional.hl_gauss import HLGauss, hl_gauss_clipped_loss
from palm_rlhf.rl.ppo.config import PPOConfig
from tests.test_reference_compat import load_palm_checkpoint
from tests.toy_ppo import fraction_of_target, mean_reward, toy_palm, toy_trainer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"


# ----------------------------------------------------------------------------- HL-Gauss


@pytest.mark.parametrize("name", ["default", "custom"])
def test_hl_gauss_equals_the_reference_package_exactly(outputs, facts, name):
    kwargs = dict(facts["hl_gauss"][name])
    bins = kwargs.pop("num_bins")
    hl = HLGauss.from_kwargs(bins, None if name == "default" else kwargs)
    targets = outputs["hl_gauss.targets"]
    assert_close(hl.probs(targets), outputs[f"hl_gauss.{name}.probs"], atol=1e-6, rtol=0)
    if name == "default":  # the trainer's bins: 0..5 on bin centres, sigma = one bin
        logits, values = outputs["hl_gauss.logits"], outputs["hl_gauss.values"]
        assert_close(hl.value(logits), outputs["hl_gauss.default.value"])
        assert_close(hl.loss(logits, targets), outputs["hl_gauss.default.loss"])
        assert_close(hl.value_loss(values, targets), outputs["hl_gauss.default.value_loss"])


def test_hl_gauss_by_hand():
    # 2 bins on [0, 2]: a target at 1 sits on the shared edge, half the mass on each side
    hl = HLGauss.build(2, 0.0, 2.0, sigma=0.5)
    assert_close(hl.probs(torch.tensor(1.0)), torch.tensor([0.5, 0.5]))
    # bin centres 0.5 and 1.5; equal logits predict their mean, a confident head its centre
    assert float(hl.value(torch.zeros(2))) == pytest.approx(1.0)
    assert float(hl.value(torch.tensor([0.0, 30.0]))) == pytest.approx(1.5)
    # a tiny sigma puts all of a target's mass in its own bin (a one-hot cross-entropy)
    sharp = HLGauss.build(4, 0.0, 4.0, sigma=1e-3)
    assert_close(sharp.probs(torch.tensor(2.5)), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = -math.log(math.exp(3) / sum(math.exp(k) for k in (1, 2, 3, 4)))
    assert float(sharp.loss(logits, torch.tensor(2.5))) == pytest.approx(expected, rel=1e-6)
    # with the bins on the centres (the reference's default), min and max are centres
    centred = HLGauss.build(6, 0.0, 5.0, min_max_value_on_bin_center=True)
    assert_close(centred.centers(torch.zeros(1)), torch.arange(6.0))


def test_hl_gauss_clipped_loss_is_the_worse_of_plain_and_clipped():
    hl = HLGauss.from_kwargs(6, None)
    logits = torch.tensor([[[0.0, 0, 0, 0, 0, 9.0]]])  # predicts ~5
    old, target, mask = torch.tensor([[1.0]]), torch.tensor([[1.0]]), torch.ones(1, 1).bool()
    plain = hl.loss(logits, target)
    clipped = hl.value_loss(torch.tensor([[1.4]]), target)  # V_old + clip 0.4
    loss = hl_gauss_clipped_loss(hl, logits, old, target, mask, 0.4)
    assert float(loss) == pytest.approx(max(float(plain), float(clipped)), rel=1e-5)
    assert float(hl_gauss_clipped_loss(hl, logits, old, target, mask, None)) == pytest.approx(
        float(plain), rel=1e-6
    )


def test_bad_bins_fail_when_the_config_is_built():
    with pytest.raises(ValueError, match="unsupported key"):
        PPOConfig(critic_num_pred_bins=6, hl_gauss_loss_kwargs=dict(min_value=0, max_valu=1))
    with pytest.raises(ValueError, match="max_value > min_value"):
        PPOConfig(critic_num_pred_bins=6, hl_gauss_loss_kwargs=dict(min_value=1, max_value=0))
    with pytest.raises(ValueError, match="critic_num_pred_bins >= 2"):
        PPOConfig(critic_num_pred_bins=1)


def test_bins_reach_the_command_line_as_json():
    parser = build_parser()
    required = ["--policy", "p", "--reward", "r", "--prompts", "x"]
    bins = ["--critic-num-pred-bins", "4", "--critic-pooled-values"]
    kwargs = ["--hl-gauss-loss-kwargs", '{"max_value": 1, "min_value": 0}']
    args = parser.parse_args(["ppo", *required, *bins, *kwargs])
    assert args.critic_num_pred_bins == 4 and args.critic_pooled_values
    assert args.hl_gauss_loss_kwargs == {"max_value": 1, "min_value": 0}
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", *required, "--hl-gauss-loss-kwargs", "[1, 2]"])


# ----------------------------------------------------------------------------- pooled values


def test_pooled_advantages_by_hand():
    # one row, three response tokens after one prompt column; KL-shaped rewards
    rewards = torch.tensor([[0.0, -0.1, 0.0, 1.0]])
    mask = torch.tensor([[False, True, True, True]])
    values = torch.full((1, 4), 0.4)
    advantages, returns = pooled_advantages(rewards, values, mask, gamma=1.0)
    # G_t = 0.9, 1.0, 1.0 from each response token; the target is G_0 = 0.9 everywhere
    assert_close(advantages, torch.tensor([[0.0, 0.5, 0.6, 0.6]]))
    assert_close(returns, torch.tensor([[0.0, 0.9, 0.9, 0.9]]))
    _, discounted = pooled_advantages(rewards, values, mask, gamma=0.5)
    assert_close(discounted, torch.tensor([[0.0, 0.15, 0.15, 0.15]]))  # -0.1 + 0.25 * 1


def test_a_pooled_critic_gives_one_value_per_sequence_from_its_response_states():
    trainer = toy_trainer(critic_pooled_values=True)
    critic = trainer.critic_module
    torch.nn.init.normal_(critic.value_head.weight)
    tokens = torch.tensor([[5, 6, 7, 3, 3, 0, 0], [8, 9, 3, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    with torch.no_grad():
        values = critic.values(critic(tokens, mask))
        hidden = critic.palm(tokens, finetune_scope=critic.scope, return_only_embedding=True)
    assert torch.equal(values, values[:, :1].expand_as(values))  # one value per row
    expected = critic.value_head(hidden[0, 2:4].mean(dim=0))  # states before tokens 3 and 4
    assert_close(values[0, 0], expected[0])
    with torch.no_grad():  # what follows the response cannot change its value
        other = critic.values(critic(torch.cat((tokens[:1, :5], tokens[1:2, 5:]), 1), mask[:1]))
    assert_close(other[0, 0], values[0, 0])


def test_a_binned_head_starts_at_the_first_rollouts_mean_return():
    trainer = toy_trainer(
        reward=lambda s, m, p: torch.full((s.shape[0],), 2.0),
        kl_coef=0.0,
        critic_num_pred_bins=6,
        critic_pooled_values=True,
    )
    experience, ended = trainer.rollout(*trainer.sample_prompts(8), 5)
    assert_close(experience.old_values, torch.full_like(experience.old_values, 2.5))  # mid bins
    scored, _ = trainer.rewards_and_advantages(experience, ended)
    mask = scored.action_mask
    assert_close(scored.old_values[mask], torch.full_like(scored.old_values[mask], 2.0))
    assert trainer.critic_module.constant_value() == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize(
    "critic",
    [
        dict(critic_pooled_values=True, critic_num_pred_bins=6),  # the reference's defaults
        dict(critic_num_pred_bins=11, hl_gauss_loss_kwargs=dict(min_value=0.0, max_value=1.0)),
    ],
    ids=["pooled-binned", "per-token-binned"],
)
def test_reference_style_critics_learn_the_toy_task(critic):
    trainer = toy_trainer(**critic)
    before = mean_reward(trainer)
    trainer.train(
        num_rollouts=12 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False
    )
    after = mean_reward(trainer)
    assert after > before + 0.3, (before, after)


# ----------------------------------------------------------------------------- critic=


@pytest.mark.parametrize("lora", [True, False])
def test_a_separate_critic_palm_is_the_one_that_trains(lora):
    palm, critic_palm = toy_palm(), toy_palm(seed=2)
    before = [p.clone() for p in critic_palm.palm_parameters()]
    trainer = toy_trainer(palm=palm, critic=critic_palm, critic_lora=lora)
    assert trainer.critic_module.palm is critic_palm
    assert not any("critic" in scope for scope in palm.finetune_scopes)
    assert (trainer.critic_scope in critic_palm.finetune_scopes) == lora
    trainer.train(num_rollouts=64, rollouts_per_update=64, max_response_tokens=4, progress=False)
    moved = [not torch.equal(a, b) for a, b in zip(before, critic_palm.palm_parameters())]
    assert any(moved) == (not lora)  # LoRA leaves the critic's base alone; full training moves it


def test_a_critic_for_another_vocabulary_is_refused():
    other = PaLM(num_tokens=20, dim=16, depth=1, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="num_tokens"):
        toy_trainer(critic=other)


# ----------------------------------------------------------------------------- ImplicitPRM


def fixture_prm() -> ImplicitPRM:
    model = load_palm_checkpoint(FIXTURES / "palm.pt").eval()
    ref = load_palm_checkpoint(FIXTURES / "palm_lora.pt", rotary_xpos_scale_base=8).eval()
    return ImplicitPRM(model, ref_model=ref, beta=0.1)


def test_implicit_prm_rewards_equal_the_references(outputs):
    prm = fixture_prm()
    with torch.no_grad():
        rewards = prm(outputs["palm.seq"])
    assert_close(rewards, outputs["prm.rewards"], atol=1e-5, rtol=1e-5)


def test_implicit_prm_loss_is_the_cross_entropy_of_the_sequence_reward(outputs):
    prm, seq = fixture_prm(), outputs["palm.seq"]
    labels = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        loss = prm(seq, labels)
        r = prm(seq).sum(dim=-1)
    by_hand = -(torch.log(torch.sigmoid(r[0])) + torch.log(torch.sigmoid(-r[1]))) / 2
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    # the reference returns +log-likelihood per token (its sign and level; README porting table)
    assert float(outputs["prm.reference_loss"]) < 0 < float(loss)


def test_implicit_prm_padding_gets_no_reward_and_labels_are_checked():
    prm = ImplicitPRM(toy_palm())
    seq = torch.tensor([[5, 6, 7, 3], [8, 9, -1, -1]])  # ids < 0: padding, as in the reference
    with torch.no_grad():
        rewards = prm(seq)
    assert rewards[1, 1:].abs().sum() == 0 and rewards.shape == (2, 3)
    assert list(prm.parameters()) == list(prm.model.parameters())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prm(seq, torch.tensor([2.0, 0.0]))


def test_implicit_prm_learns_which_sequences_succeed():
    """Outcome labels only (1 when the sequence holds token 3): afterwards the sequence reward
    separates the two kinds, and the per-token reward concentrates on token 3."""
    torch.manual_seed(0)
    prm = ImplicitPRM(toy_palm(), beta=0.5)
    optimizer = torch.optim.AdamW(prm.parameters(), lr=3e-3)
    for _ in range(60):
        seq = torch.randint(4, 12, (16, 6))
        labels = torch.rand(16) < 0.5
        seq[labels, torch.randint(1, 6, (int(labels.sum()),))] = 3
        loss = prm(seq, labels.float())
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    good, bad = torch.tensor([[5, 6, 3, 7, 8, 9]]), torch.tensor([[5, 6, 4, 7, 8, 9]])
    with torch.no_grad():
        assert float(prm(good).sum()) > 0.5 > -0.5 > float(prm(bad).sum())
        assert int(prm(good).argmax()) == 1  # the step that placed token 3 earns the most


def test_implicit_prm_as_the_critic_gives_process_rewards_and_trains_on_outcomes():
    prm = ImplicitPRM(toy_palm(seed=3))
    before = [p.clone() for p in prm.model.parameters()]
    reward = lambda s, m, p: (fraction_of_target(s, m, p) > 0).float()  # noqa: E731 (0/1)
    trainer = toy_trainer(critic=prm, reward=reward)
    assert trainer.config.critic_lora is True and trainer.process_rewards
    records = trainer.train(
        num_rollouts=128, rollouts_per_update=64, max_response_tokens=4, progress=False
    )
    assert "process_reward" in records[0] and "value_loss" in records[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, prm.model.parameters()))
    below_zero = lambda s, m, p: fraction_of_target(s, m, p) - 1.0  # noqa: E731
    with pytest.raises(ValueError, match=r"outcome labels in \[0, 1\]"):
        toy_trainer(critic=ImplicitPRM(toy_palm(seed=3)), reward=below_zero).train(
            num_rollouts=64, rollouts_per_update=64, max_response_tokens=4, progress=False
        )


# ----------------------------------------------------------------------------- actor_critic=


def test_a_prebuilt_actor_critic_is_used_and_its_options_win():
    palm = toy_palm()
    bundle = ActorCritic(palm, pooled_values=True, critic_dim_out=6, actor_lora_r=2)
    trainer = toy_trainer(palm=palm, actor_critic=bundle, critic_pooled_values=False)
    assert trainer.actor_module is bundle.actor and trainer.critic_module is bundle.critic
    assert trainer.config.critic_pooled_values and trainer.config.critic_num_pred_bins == 6
    assert trainer.config.actor_lora_r == 2
    trainer.train(num_rollouts=64, rollouts_per_update=64, max_response_tokens=4, progress=False)
    with pytest.raises(ValueError, match="built on palm="):
        toy_trainer(palm=toy_palm(), actor_critic=ActorCritic(toy_palm()))
