"""The RL options in training: combined as a DAPO or GSPO recipe they still learn the toy task of
tests/toy_ppo.py; dynamic sampling refills constant groups (a pure function, checked on made-up
groups) and counts what it did; overlong filtering leaves truncated responses out of the loss
and the soft overlong penalty shapes their scores. The math: tests/test_policy_options.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.functional.logprobs import entropy_from_logits
from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.functional.policy_losses import reduce_token_losses
from palm_rlhf.rl import algorithms
from palm_rlhf.rl.dynamic_sampling import Groups, refill
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.rollout import Experience, tempered_logits
from palm_rlhf.rl.update import minibatch_loss
from tests.helpers import launch
from tests.toy_ppo import TARGET, final_kl, mean_reward, toy_palm, toy_trainer

EOS = 4  # a token the untrained toy policy samples often: about a third of responses end
RUN = dict(max_response_tokens=8, rollouts_per_update=64, eos_token=EOS, progress=False)


def share_before_eos(seq, mask, prompt_mask):
    """(b,) share of TARGET among the response's tokens other than EOS (optimum 1)."""
    return masked_mean((seq == TARGET).float(), mask & ~prompt_mask & (seq != EOS), dim=-1)


RECIPES = {  # name -> options, learning steps of 64 responses
    # DAPO (Yu et al. 2025): token-mean, clip-higher, dynamic sampling, overlong filtering and
    # the soft overlong penalty, no KL term
    "dapo": (
        dict(
            algorithm="grpo",
            loss_agg_mode="token-mean",
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            dynamic_sampling=True,
            overlong_filtering=True,
            overlong_buffer_len=2,
            overlong_penalty_factor=0.1,
            kl_coef=0.0,
        ),
        10,
    ),
    # GSPO's sequence ratio (its clip sized for this toy), dual clip, the reference's drift
    # KL and entropy-to-advantage, MaxRL advantages
    "gspo": (
        dict(
            algorithm="grpo",
            importance_sampling_level="sequence",
            clip_eps_low=0.1,
            clip_eps_high=0.15,
            dual_clip_c=3.0,
            kl_div_loss_weight=0.1,
            entropy_to_advantage_scale=0.4,
            max_rl=True,
        ),
        10,
    ),
    # PPO with clip-higher and the dual clip, sequence-mean tokens
    "ppo": (dict(clip_eps_high=0.3, dual_clip_c=3.0, loss_agg_mode="seq-mean-token-mean"), 10),
    # SPO's penalty pulls the ratio back hardest: a wider eps and more steps
    "grpo-spo": (dict(algorithm="grpo", simple_policy_optimization=True, eps_clip=0.4), 16),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_combined_options_learn_the_toy_task(recipe):
    options, updates = RECIPES[recipe]
    trainer = toy_trainer(palm=toy_palm(), reward=share_before_eos, group_size=4, **options)
    before = mean_reward(trainer, episodes=256)
    trainer.train(num_rollouts=updates * 64, **RUN)
    after = mean_reward(trainer, episodes=256)
    # measured (seed 1, torch 2.13 CPU), reward 0.068 -> dapo 0.70, gspo 0.76, ppo 0.78,
    # grpo-spo 0.58
    assert before < 0.15
    assert after > 0.45 and after > before + 0.3, (before, after)
    assert final_kl(trainer) < 10.0
    record = trainer.history[-1]
    assert trainer.episodes == updates * 64 and len(trainer.history) == updates
    if options.get("dynamic_sampling"):
        counters = ("dynamic_sampling_dropped", "dynamic_sampling_retries")
        assert set(counters) <= set(record)
        assert sum(r["dynamic_sampling_dropped"] for r in trainer.history) > 0
    if options.get("overlong_filtering"):
        assert "overlong_filtered_fraction" in record
    if options.get("kl_div_loss_weight"):
        assert "kl_div_loss" in record


# ----------------------------------------------------------------------------- dynamic sampling


def made_up_groups(scores: list[float], group_size: int = 2) -> Groups:
    """Rows whose only content is a score and a first token naming the row (for order)."""
    b = len(scores)
    tokens = torch.stack([torch.arange(b), torch.ones(b, dtype=torch.long)], dim=-1)
    mask = torch.ones(b, 2, dtype=torch.bool)
    prompt_mask = torch.tensor([[True, False]]).expand(b, 2)
    zeros = torch.zeros(b, 1)
    experience = Experience(
        tokens, mask, prompt_mask, mask[:, 1:], zeros, zeros, zeros, zeros, zeros,
        torch.tensor(scores),
    )  # fmt: skip
    return Groups(experience, torch.ones(b, dtype=torch.bool), torch.full((b,), 4))


def test_refill_keeps_informative_groups_and_counts_what_it_did():
    config = PPOConfig(algorithm="grpo", group_size=2, dynamic_sampling=True)
    # first round: groups (1, 1) constant, (0, 1) informative, (2, 2) constant
    first = made_up_groups([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    later = iter([made_up_groups([3.0, 3.0, 5.0, 4.0]), made_up_groups([0.0, 9.0, 7.0, 7.0])])
    asked = []

    def sample(n):
        asked.append(n)
        return next(later)

    groups, stats = refill(sample, first, 3, config, largest=lambda k: k)
    assert asked == [2, 1]  # each round asks for the groups still missing
    assert groups.experience.scores.tolist() == [0.0, 1.0, 5.0, 4.0, 0.0, 9.0]
    assert stats == dict(
        dynamic_sampling_dropped=4.0, dynamic_sampling_retries=2.0, dynamic_sampling_filled=0.0
    )


def test_refill_stops_after_its_retries_and_fills_with_dropped_groups():
    config = PPOConfig(
        algorithm="grpo", group_size=2, dynamic_sampling=True, dynamic_sampling_max_retries=1
    )
    first = made_up_groups([1.0, 1.0, 0.0, 1.0])
    groups, stats = refill(
        lambda n: made_up_groups([2.0, 2.0] * n), first, 2, config, largest=lambda k: k
    )
    # the informative group first, then the oldest dropped one: the batch keeps its size
    assert groups.experience.scores.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert stats["dynamic_sampling_retries"] == 1.0 and stats["dynamic_sampling_filled"] == 1.0
    # another process still short: this one rolls out as many rounds, with as many groups
    asked = []
    refill(
        lambda n: asked.append(n) or made_up_groups([2.0, 3.0] * n),
        made_up_groups([0.0, 1.0, 0.0, 1.0]),
        2,
        config,
        largest=lambda k: 2,
    )
    assert asked == [2]


# ----------------------------------------------------------------------------- overlong


def test_overlong_filtering_masks_truncated_responses_out_of_the_update():
    trainer = toy_trainer(
        algorithm="grpo", group_size=4, overlong_filtering=True, overlong_buffer_len=2
    )
    seen = []
    trainer.learn = lambda experience, *args, **kwargs: seen.append(experience) or {}
    record = trainer.train(num_rollouts=64, **{**RUN, "max_response_tokens": 3})[-1]
    experience = seen[0]
    lengths = experience.action_mask.sum(-1)
    response = experience.mask & ~experience.prompt_mask
    ended = ((experience.tokens == EOS) & response).any(-1)
    assert (lengths[~ended] == 0).all() and (lengths[ended] > 0).all()
    assert 0 < record["overlong_filtered_fraction"] < 1
    assert record["overlong_filtered_fraction"] == pytest.approx(float((~ended).float().mean()))
    with pytest.raises(ValueError, match="overlong_filtering needs eos_token"):
        trainer.train(num_rollouts=64, **{**RUN, "eos_token": None})


def test_soft_overlong_penalty_shapes_the_scores_by_length():
    trainer = toy_trainer(
        algorithm="grpo", group_size=4, overlong_buffer_len=4, overlong_penalty_factor=1.0
    )
    prompt, prompt_mask = trainer.sample_prompts(8, 4)
    experience, ended = trainer.rollout(prompt, prompt_mask, 8)
    budgets = torch.full_like(experience.scores, 8).long()
    shaped, _ = trainer.rewards_and_advantages(experience, ended, budgets)
    lengths = experience.action_mask.sum(-1).float()
    penalty = -((lengths - 4) / 4).clamp(0, 1)  # 0 up to 4 tokens, -1 at 8
    torch.testing.assert_close(shaped.scores, experience.scores + penalty)
    unshaped, _ = trainer.rewards_and_advantages(experience, ended)  # no budgets: no penalty
    torch.testing.assert_close(unshaped.scores, experience.scores)


# ----------------------------------------------------------------------------- processes

TWO_PROCESSES = """
import json, sys
import torch
sys.path[:0] = [{repo!r}]
from tests.toy_ppo import toy_trainer

torch.set_num_threads(1)
trainer = toy_trainer(algorithm="grpo", group_size=4, minibatch_size=16, dynamic_sampling=True,
                      dynamic_sampling_max_retries=3)
trainer.train(num_rollouts=64, max_response_tokens=6, rollouts_per_update=32, progress=False)
params = [p.detach().double().sum().item() for p in trainer.actor_module.trainable_parameters()]
rank = trainer.accelerator.process_index
with open({out!r} + f"/rank{{rank}}.json", "w") as handle:
    json.dump(dict(history=trainer.history, params=params), handle)
from palm_rlhf.train.accelerator import release_processes
release_processes(exit_code=0)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test")
def test_dynamic_sampling_keeps_two_processes_in_step(tmp_path):
    """Each process refills its own groups, but every round is taken by both (the largest
    shortfall decides), so the updates stay in step and DDP keeps the actors identical."""
    script = tmp_path / "two.py"
    repo = Path(__file__).resolve().parent.parent
    script.write_text(TWO_PROCESSES.format(repo=str(repo), out=str(tmp_path)))
    launch([str(script)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6, abs=1e-9)
    history = ranks[0]["history"]
    assert len(history) == 2 and history[-1]["episodes"] == 64
    assert sum(r["dynamic_sampling_dropped"] for r in history) > 0  # some groups were refilled


# ----------------------------------------------------------------------------- entropy bonus


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "reinforce++", "flowrl", "tpo"])
def test_beta_s_is_the_same_entropy_bonus_in_every_algorithm(algorithm):
    """loss(beta_s) = loss(0) - beta_s * H, H the policy's entropy averaged like the loss's
    tokens (PPO: over all tokens; the group algorithms: over responses of each one's mean)."""
    trainer = toy_trainer(algorithm=algorithm, group_size=4, beta_s=0.0, value_head_init="zero")
    group = trainer.config.responses_per_prompt
    prompt, prompt_mask = trainer.sample_prompts(16 // group, group)
    experience, ended = trainer.rollout(prompt, prompt_mask, 6, eos_token=EOS)  # ragged
    experience, _ = trainer.rewards_and_advantages(experience, ended)
    nets = {name: net for name, (net, _) in trainer.networks.items()}
    rows = algorithms.per_row_inputs(
        experience, trainer.config, trainer.reference, nets["actor"], 1.0
    )

    def loss(beta_s):
        config = dataclasses.replace(trainer.config, beta_s=beta_s)
        torch.manual_seed(0)
        return minibatch_loss(nets, experience, config, trainer.kl_coef, 1.0, 6, **rows)

    (plain, _), (bonus, _) = loss(0.0), loss(0.5)
    logits = tempered_logits(nets["actor"](experience.tokens)[:, :-1], 1.0)
    entropy, mask = entropy_from_logits(logits), experience.action_mask
    expected = reduce_token_losses(entropy, mask, trainer.config.token_reduction)
    assert_close(plain - bonus, 0.5 * expected, atol=1e-5, rtol=1e-5)
    by_response = (entropy * mask).sum(-1) / mask.sum(-1)
    assert not torch.isclose(by_response.mean(), masked_mean(entropy, mask))  # they differ
