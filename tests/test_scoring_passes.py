"""A rollout skips its old and reference log-prob passes only where the update reads neither,
and the update it feeds is then the one the full rollout would have fed."""

import math

import pytest
import torch

from palm_rlhf.rl import scoring_passes
from palm_rlhf.rl.ppo import trainer as trainer_module
from palm_rlhf.rl.ppo.config import PPOConfig
from tests.toy_ppo import toy_trainer

SKIPPING = dict(algorithm="grpo", group_size=4, kl_coef=0.0, epochs=1, minibatch_size=32)


@pytest.mark.parametrize(
    "change, rows, world, skips",
    [
        ({}, 32, 1, True),
        ({}, 16, 2, True),  # 32 rows over 2 processes: 16 per process, one minibatch each
        ({}, 33, 1, False),  # a second minibatch: its rows' old policy is not the current one
        ({"epochs": 2}, 32, 1, False),
        ({"kl_coef": 0.1}, 32, 1, False),  # the KL penalty reads the reference
        ({"kl_div_loss_weight": 0.1}, 32, 1, False),
        ({"target_kl": 1.0}, 32, 1, False),  # the adaptive controller reads the rollout's KL
        ({"algorithm": "flowrl"}, 32, 1, False),  # its loss holds the reference
        ({"minibatch_size": 30}, 32, 1, False),  # rounds down to 28 rows of whole groups
    ],
)
def test_skips_only_where_nothing_reads_the_passes(change, rows, world, skips):
    config = PPOConfig.from_keywords(**{**SKIPPING, **change})
    assert scoring_passes.skips_scoring(config, rows, world) is skips


def test_skipping_the_passes_trains_the_same_policy(monkeypatch):
    """Two updates with the passes skipped (the update's own detached log-probs as the old
    ones) give the parameters and rewards of two updates with them made; the skipped run's
    KL to the reference reads nan (not measured), the full run's 0 (reference = actor)."""
    runs = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(trainer_module, "skips_scoring", lambda *args: False)
        trainer = toy_trainer(**SKIPPING, beta_s=0.0)
        start = [p.detach().clone() for p in trainer.actor_module.trainable_parameters()]
        records = trainer.train(
            num_rollouts=64, max_response_tokens=8, rollouts_per_update=32, progress=False
        )
        params = [p.detach().clone() for p in trainer.actor_module.trainable_parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(start, params))  # it learned
        runs[skip] = records, params
    (skipped, params_skipped), (full, params_full) = runs[True], runs[False]
    assert [r["reward"] for r in skipped] == [r["reward"] for r in full]
    assert all(math.isnan(r["kl"]) for r in skipped) and full[0]["kl"] == 0.0
    assert skipped[-1]["approx_kl"] == 0.0 and skipped[-1]["clip_fraction"] == 0.0
    for a, b in zip(params_skipped, params_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
