"""RLHFTrainer keywords defined by palm-rlhf-pytorch mean what they mean there (or the README's
porting table says why not, and these tests pin the difference)."""

import math

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.functional.logprobs import log_probs_from_logits
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.objective import ppo_objective
from palm_rlhf.rl.prompts import load_prompts
from palm_rlhf.rl.rollout import Experience
from tests.toy_ppo import base_weights, toy_palm, toy_trainer


def test_tensor_prompts_lose_every_pad_id_as_in_the_reference():
    """The reference keeps `state[state != pad_value]`: a pad id inside a padded prompt row is
    dropped too; list prompts are taken exactly as given."""
    rows = load_prompts(16, prompt_token_ids=torch.tensor([[0, 5, 0, 7, 9, 0, 0]]), pad_value=0)
    assert rows[0].tolist() == [5, 7, 9]
    rows = load_prompts(16, prompt_token_ids=[[0, 5, 0, 7]], pad_value=0)
    assert rows[0].tolist() == [0, 5, 0, 7]


def one_token_batch(old_logprob: float, new_logits: torch.Tensor) -> tuple:
    """A batch of one response token (token 1 of a 2-token sequence) and tempered logits."""
    tokens = torch.tensor([[0, 1]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    zeros = torch.zeros(1, 1)
    old = torch.full((1, 1), old_logprob)
    experience = Experience(
        tokens,
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[True, False]]),
        mask,
        old,
        zeros,
        zeros,
        zeros,
        zeros,
        torch.zeros(1),
    )
    return new_logits.reshape(1, 1, -1), experience


def test_kl_div_loss_weight_adds_the_drift_from_the_rollout_policy():
    """k3 estimate of KL(old || new) on the sampled token: exp(d) - d - 1 with d = new - old
    log-prob; with advantages, returns and values 0 the loss is -beta_s * H + weight * KL."""
    logits = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 3/4
    new = float(log_probs_from_logits(logits[None, None], torch.tensor([[1]])))
    old = math.log(0.5)
    d = new - old  # log(1.5)
    expected_kl = math.exp(d) - d - 1  # 0.5 - log 1.5 = 0.0945
    batch_logits, batch = one_token_batch(old, logits)
    critic_loss = torch.zeros(())
    config = dict(eps_clip=0.2, beta_s=0.0)
    plain, stats = ppo_objective(batch_logits, critic_loss, batch, PPOConfig(**config))
    weighted, _ = ppo_objective(
        batch_logits, critic_loss, batch, PPOConfig(**config, kl_div_loss_weight=0.5)
    )
    assert stats["kl_div_loss"] == pytest.approx(expected_kl, abs=1e-6)
    assert float(weighted - plain) == pytest.approx(0.5 * expected_kl, abs=1e-6)


def test_actor_dropout_acts_in_updates_only_and_leaves_the_palm_as_it_was():
    trainer = toy_trainer(actor_dropout=0.5, kl_coef=0.0)
    actor, palm = trainer.actor_module, trainer.actor_module.palm
    tokens = torch.randint(1, 12, (2, 6))
    actor.eval()
    with torch.no_grad():  # rollouts and scoring: never dropped
        assert_close(actor(tokens), actor(tokens), atol=0, rtol=0)
    first, second = actor(tokens), actor(tokens)  # a gradient pass: dropout at 0.5
    assert not torch.equal(first, second)
    assert palm.config.attn_dropout == palm.config.ff_dropout == 0.0 and not palm.training


def test_actor_lora_false_trains_the_callers_palm_in_place():
    palm = toy_palm()
    before = base_weights(palm)
    trainer = toy_trainer(palm=palm, actor_lora=False, critic_lora=True)
    assert trainer.actor_module.palm is palm and trainer.reference is not palm
    trainer.train(num_rollouts=64, rollouts_per_update=64, max_response_tokens=4, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, palm.palm_parameters()))
    for fixed, ref in zip(before, trainer.reference.palm_parameters()):
        assert torch.equal(fixed, ref)
    assert "critic" in trainer.reference.finetune_scopes[0] and palm.finetune_scopes == ()
