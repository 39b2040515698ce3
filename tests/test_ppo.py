"""RLHFTrainer: it learns a toy task with a known optimum, and its machinery is sound.

Toy task: vocabulary 12, reward = fraction of response tokens equal to 3 (optimum 1.0, a
uniform policy gets 1/12). The tiny PaLM's embeddings are drawn with std 0.2 instead of 0.02
so its (tied) output logits can move far enough under LoRA, as a pretrained model's would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from palm_rlhf.checkpoint import CheckpointError
from palm_rlhf.functional.logprobs import log_probs_from_logits
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.kl_controller import KLController, adaptive_kl_coef
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from palm_rlhf.rl.prompts import load_prompts
from palm_rlhf.rl.rollout import join_prompt_response
from tests.helpers import launch
from tests.toy_ppo import (
    PROMPTS,
    TARGET,
    base_weights,
    final_kl,
    fraction_of_target,
    mean_reward,
    toy_palm,
    toy_trainer,
)


def test_toy_task_reward_rises_far_above_the_untrained_policy_with_kl_bounded():
    trainer = toy_trainer()
    before = mean_reward(trainer)
    trainer.train(
        num_rollouts=20 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False
    )
    after = mean_reward(trainer)
    # measured (seed 1, torch 2.13 CPU): before 0.041, after 0.81; KL 4.3 nats per response
    assert before < 0.15
    assert after > before + 0.4 and after > 0.5
    kl = final_kl(trainer)
    assert 0.5 < kl < 8.0  # moved away from the reference, but within a bounded distance
    keys = {"reward", "kl", "entropy", "clip_fraction", "approx_kl", "policy_loss"}
    keys |= {"value_loss", "explained_variance", "response_length", "kl_coef"}
    assert keys <= set(trainer.history[-1])
    assert trainer.history[-1]["response_length"] == 8.0  # no EOS: every response is 8 tokens
    assert trainer.episodes == 20 * 64 and trainer.updates == 20
    # the critic learned: it explains most of the return variance at the end
    assert trainer.history[-1]["explained_variance"] > 0.5


def test_large_kl_coef_keeps_the_policy_near_the_reference_and_zero_lets_it_move():
    run = dict(num_rollouts=12 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False)
    free, held = toy_trainer(kl_coef=0.0), toy_trainer(kl_coef=2.0)
    free.train(**run), held.train(**run)
    # measured: kl_coef 0 -> 6.3 nats per response (reward 0.96), kl_coef 2 -> 0.009 (0.07)
    assert final_kl(held) < 0.2
    assert final_kl(free) > 1.0
    assert final_kl(free) > 10 * final_kl(held)


def test_adaptive_kl_controller_by_hand_and_inside_the_trainer():
    # e = clip(KL / target - 1, -0.2, 0.2); beta' = beta (1 + 0.1 e)
    assert adaptive_kl_coef(0.1, 12.0, 6.0) == pytest.approx(0.1 * 1.02)  # e clipped to 0.2
    assert adaptive_kl_coef(0.1, 6.6, 6.0) == pytest.approx(0.1 * 1.01)  # e = 0.1
    assert adaptive_kl_coef(0.1, 3.0, 6.0) == pytest.approx(0.1 * 0.98)  # e clipped to -0.2
    assert KLController(0.1).update(100.0) == 0.1  # fixed coefficient
    with pytest.raises(ValueError, match="kl_coef=0"):
        KLController(0.0, target_kl=1.0)

    trainer = toy_trainer(kl_coef=0.05, target_kl=0.5)
    trainer.train(
        num_rollouts=6 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False
    )
    coefs = [r["kl_coef"] for r in trainer.history]
    for record, next_coef in zip(trainer.history, coefs[1:] + [trainer.kl_coef]):
        assert next_coef == pytest.approx(adaptive_kl_coef(record["kl_coef"], record["kl"], 0.5))
    assert coefs[0] == 0.05 and trainer.kl_coef != 0.05


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("lora", [True, False])
def test_reference_equals_actor_at_init_so_kl_and_ratio_are_exact(lora):
    trainer = toy_trainer(actor_lora=lora, critic_lora=lora, minibatch_size=64, epochs=1)
    experience, _ = trainer.rollout(*trainer.sample_prompts(64), 8)
    assert torch.equal(experience.old_logprobs, experience.ref_logprobs)
    record = trainer.step(64, 8)
    assert record["kl"] == 0.0 and record["kl_per_token"] == 0.0
    # one minibatch, one epoch: the update's policy is the rollout's, ratio exactly 1
    assert record["approx_kl"] == 0.0 and record["clip_fraction"] == 0.0
    # after the update the actor moved, and the reference did not
    experience, _ = trainer.rollout(*trainer.sample_prompts(64), 8)
    assert not torch.equal(experience.old_logprobs, experience.ref_logprobs)


def test_prompts_of_different_lengths_batch_like_single_prompts():
    prompts = [torch.tensor([5]), torch.tensor([8, 9, 10]), torch.tensor([4, 5, 6, 7, 8])]
    trainer = toy_trainer(prompt_token_ids=prompts, temperature=0.0)  # greedy: deterministic
    batch, _ = trainer.rollout(*trainer.prompts.select(torch.arange(3)), 6)
    assert batch.prompt_mask.sum(dim=1).tolist() == [1, 3, 5]
    for i, prompt in enumerate(prompts):
        single, _ = trainer.rollout(*trainer.prompts.select(torch.tensor([i])), 6)
        n = single.tokens.shape[1]
        assert torch.equal(batch.tokens[i, :n], single.tokens[0])  # same greedy response
        assert torch.equal(batch.tokens[i, : len(prompt)], prompt)
        assert not batch.mask[i, n:].any()
        row_mask = single.action_mask[0]
        assert_close(
            batch.old_logprobs[i, : n - 1][row_mask],
            single.old_logprobs[0][row_mask],
            atol=1e-5,
            rtol=1e-5,
        )
        assert_close(
            batch.old_values[i, : n - 1][row_mask],
            single.old_values[0][row_mask],
            atol=1e-5,
            rtol=1e-5,
        )
    # the stored old log-probs are those of the sampled tokens under the actor
    logits = trainer.actor_module(batch.tokens)[:, :-1]
    expected = log_probs_from_logits(logits, batch.tokens[:, 1:])
    assert_close(batch.old_logprobs, expected, atol=1e-6, rtol=1e-6)


def test_join_prompt_response_layout_by_hand():
    T, F = True, False
    prompt = torch.tensor([[0, 0, 5], [7, 8, 9]])
    prompt_mask = torch.tensor([[F, F, T], [T, T, T]])
    response = torch.tensor([[1, 2, 0], [3, 0, 0]])
    response_mask = torch.tensor([[T, T, F], [T, F, F]])
    out = join_prompt_response(prompt, prompt_mask, response, response_mask, pad_value=11)
    assert out.tokens.tolist() == [[5, 1, 2, 11, 11, 11], [7, 8, 9, 3, 11, 11]]
    assert out.mask.tolist() == [[T, T, T, F, F, F], [T, T, T, T, F, F]]
    assert out.prompt_mask.tolist() == [[T, F, F, F, F, F], [T, T, T, F, F, F]]
    # column t describes token t + 1
    assert out.action_mask.tolist() == [[T, T, F, F, F], [F, F, T, F, F]]


# ----------------------------------------------------------------------------- rewards


def test_missing_eos_penalty_and_reward_clip_apply_exactly_where_they_should():
    eos = 2
    trainer = toy_trainer(
        reward=lambda s, m, p: torch.ones(s.shape[0]), missing_eos_penalty=3.0, reward_clip=1.5
    )
    experience, ended = trainer.rollout(*trainer.sample_prompts(64), 4, eos_token=eos)
    responses = experience.tokens.masked_fill(~(experience.mask & ~experience.prompt_mask), -1)
    has_eos = (responses == eos).any(dim=1)
    assert torch.equal(ended, has_eos)
    assert 0 < int(has_eos.sum()) < 64  # both kinds occur in this batch
    scored, _ = trainer.rewards_and_advantages(experience, ended)
    # 1 with EOS; 1 - 3 = -2 without, clipped to -1.5
    assert torch.equal(scored.scores, torch.where(has_eos, 1.0, -1.5))
    # a response that ended has its EOS as its last token
    last = experience.action_mask.long().cumsum(1).argmax(1)
    assert torch.equal(experience.tokens[:, 1:].gather(1, last[:, None])[:, 0] == eos, has_eos)


def test_value_head_bias_starts_at_the_mean_return_of_the_first_rollout():
    trainer = toy_trainer(
        reward=lambda s, m, p: torch.full((s.shape[0],), 0.7), kl_coef=0.0, whiten_advantages=False
    )
    experience, ended = trainer.rollout(*trainer.sample_prompts(8), 5)
    assert torch.equal(experience.old_values, torch.zeros_like(experience.old_values))
    scored, stats = trainer.rewards_and_advantages(experience, ended)
    # gamma = 1, no KL: every response token's return is the final score 0.7, so the
    # initialised critic is exact and every advantage is 0
    assert_close(trainer.critic_module.value_head.bias, torch.tensor([0.7]))
    mask = scored.action_mask
    assert_close(scored.old_values[mask], torch.full_like(scored.old_values[mask], 0.7))
    assert_close(
        scored.advantages[mask], torch.zeros_like(scored.advantages[mask]), atol=1e-6, rtol=0
    )


def test_bad_reward_output_and_bad_prompts_fail_loudly(tmp_path):
    trainer = toy_trainer(reward=lambda s, m, p: torch.ones(s.shape[0], 2))
    with pytest.raises(ValueError, match="one score per sequence"):
        trainer.step(8, 4)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]\[0\] = 12"):
        toy_trainer(prompt_token_ids=[torch.tensor([1]), torch.tensor([12])])
    padded = torch.tensor([[0, 4, 5, 0], [6, 0, 0, 0]])
    assert [p.tolist() for p in load_prompts(12, padded)] == [[4, 5], [6]]
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts(12, padded, prompts=["a"])
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n\nbad \x00 line\n")

    from palm_rlhf.data.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match="prompts.txt:3"):
        load_prompts(256, prompts_path=path, tokenizer=ByteTokenizer())


# ----------------------------------------------------------------------------- machinery


def test_trainer_is_a_plain_object_that_leaves_module_modes_alone():
    palm = toy_palm()
    palm.train()
    trainer = toy_trainer(palm=palm)
    assert not isinstance(trainer, nn.Module)
    assert not hasattr(trainer, "eval") and RLHFTrainer.train is not nn.Module.train
    trainer.train(num_rollouts=16, max_response_tokens=4, rollouts_per_update=16, progress=False)
    assert palm.training  # restored after sampling and the PPO epochs
    palm.eval()
    trainer.train(num_rollouts=16, max_response_tokens=4, rollouts_per_update=16, progress=False)
    assert not palm.training


def test_two_trainers_share_one_palm_without_touching_its_weights_or_each_other():
    palm = toy_palm()
    flags = [p.requires_grad for p in palm.parameters()]
    base = base_weights(palm)
    first, second = toy_trainer(palm=palm), toy_trainer(palm=palm)
    assert (first.actor_scope, first.critic_scope) == ("actor", "critic")
    assert (second.actor_scope, second.critic_scope) == ("actor-1", "critic-1")
    second_adapters = [p.detach().clone() for p in palm.finetune_parameters("actor-1")]
    first.train(num_rollouts=128, max_response_tokens=8, rollouts_per_update=64, progress=False)
    for before, after in zip(base, palm.palm_parameters()):
        assert torch.equal(before, after) and after.grad is None  # the reference is frozen
    for before, after in zip(second_adapters, palm.finetune_parameters("actor-1")):
        assert torch.equal(before, after)
    assert any(p.abs().sum() > 0 for p in palm.finetune_parameters("actor")[1::2])  # B moved
    assert [p.requires_grad for p in palm.parameters()][: len(flags)] == flags
    second.train(num_rollouts=64, max_response_tokens=8, rollouts_per_update=64, progress=False)
    with pytest.raises(ValueError, match="already exists"):
        toy_trainer(palm=palm, actor_lora_scope="actor")


def test_max_norm_clips_the_gradients_the_optimizers_see():
    max_norm = 1e-3
    trainer = toy_trainer(max_norm=max_norm)
    seen = []
    for optim, module in (
        (trainer.actor_optim, trainer.actor_module),
        (trainer.critic_optim, trainer.critic_module),
    ):
        original = optim.step

        def step(*args, _original=original, _module=module, **kwargs):
            grads = [p.grad for p in _module.trainable_parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return _original(*args, **kwargs)

        optim.step = step
    record = trainer.step(64, 8)
    assert record["actor_grad_norm"] > 10 * max_norm  # the raw gradients were larger
    assert len(seen) == 2 * 2 * 4  # (actor, critic) x 2 epochs x 4 minibatches
    assert max(seen) <= max_norm * (1 + 1e-4)


@pytest.mark.parametrize("lora", [True, False])
def test_save_load_resumes_with_identical_updates(tmp_path, lora):
    run = dict(max_response_tokens=8, rollouts_per_update=64, progress=False)
    options = dict(actor_lora=lora, critic_lora=lora, epochs=1, minibatch_size=32)
    original = toy_trainer(**options)
    original.train(num_rollouts=128, **run)
    folder = original.save(tmp_path)
    assert folder.name == "step-0000002" and (tmp_path / "latest").read_text() == folder.name
    expected = original.train(num_rollouts=64, **run)[0]

    resumed = toy_trainer(palm=toy_palm(), **options).load(tmp_path)
    assert len(resumed.history) == 2 and resumed.episodes == 128
    got = resumed.train(num_rollouts=64, **run)[0]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(CheckpointError, match="actor_lora"):
        toy_trainer(actor_lora=not lora, critic_lora=lora).load(folder)


def test_ptx_loss_pulls_the_actor_towards_the_pretraining_text():
    stream = torch.full((400,), 5, dtype=torch.long)  # "text" that is all token 5
    trainer = toy_trainer(
        reward=lambda s, m, p: torch.zeros(s.shape[0]),
        kl_coef=0.0,
        beta_s=0.0,
        ptx_coef=1.0,
        ptx_data=stream,
        ptx_seq_len=16,
        actor_lr=1e-2,
    )
    trainer.train(
        num_rollouts=4 * 64, max_response_tokens=4, rollouts_per_update=64, progress=False
    )
    ptx = [r["ptx_loss"] for r in trainer.history]
    assert ptx[-1] < 0.5 * ptx[0]  # measured: 0.46 -> 0.029 nats per token (update means)


def test_best_of_n_returns_the_highest_scoring_sample():
    def count_target(seq, mask, prompt_mask):
        return ((seq == TARGET) & mask & ~prompt_mask).sum(dim=-1).float()

    trainer = toy_trainer(reward=count_target)
    prompt = PROMPTS[0]
    # unfiltered, so the target token can be drawn wherever this toy model ranks it
    out = trainer.generate(
        12, prompt=prompt, num_samples=16, return_scores=True, filter_logits_fn=None
    )
    assert out.scores.shape == (16,) and len(set(out.scores.tolist())) > 1
    assert out.index == int(out.scores.argmax())
    assert float(out.scores[out.index]) == float(out.scores.max())
    assert torch.equal(out.sequence, out.sequences[out.index][out.masks[out.index]])
    assert torch.equal(out.sequence[: len(prompt)], prompt) and len(out.sequence) == 12
    rescored = count_target(out.sequences, out.masks, torch.zeros_like(out.masks))
    rescored -= (prompt == TARGET).sum()
    assert torch.equal(rescored, out.scores)
    best = trainer.generate(12, prompt=prompt, num_samples=4)
    assert best.dim() == 1 and torch.equal(best[:3], prompt)


def test_best_of_n_decodes_like_the_reference_by_default():
    """Porting-table row: trainer.generate top-k filters (ceil(0.1 * vocab) tokens) as the
    reference's does; filter_logits_fn=None or top_k/top_p choose otherwise."""
    palm = toy_palm()
    trainer = toy_trainer(palm=palm)
    prompt = PROMPTS[0]
    kept = set(palm(prompt[None])[0, -1].topk(2).indices.tolist())  # ceil(0.1 * 12) = 2

    def first_tokens(**kwargs):
        out = trainer.generate(5, prompt=prompt, num_samples=64, return_scores=True, **kwargs)
        return set(out.sequences[:, len(prompt)].tolist())

    assert first_tokens() <= kept
    assert len(first_tokens(filter_logits_fn=None)) > 2
    assert len(first_tokens(top_k=6)) > 2


def test_ppo_rollouts_sample_the_full_policy_unlike_the_reference():
    """Porting-table row: the reference rolls out with generate's top-k 0.9; here rollouts are
    unfiltered so the log-probs PPO trains are those of the distribution that drew them."""
    trainer = toy_trainer(prompt_token_ids=[PROMPTS[0]])
    experience, _ = trainer.rollout(*trainer.sample_prompts(64), 1)
    first = set(experience.tokens[:, len(PROMPTS[0])].tolist())
    assert len(first) > 2  # more than the ceil(0.1 * 12) tokens top-k would keep


def test_ppo_raises_the_score_of_a_real_reward_model_sharing_the_palm():
    from palm_rlhf.model.reward import RewardModel

    palm = toy_palm()
    reward_model = RewardModel(palm, pooling="mean", dropout=0.1)  # LoRA scope on the same PaLM
    with torch.no_grad():  # a fixed, hand-made judge: reward = w . mean response hidden state
        reward_model.to_pred.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        reward_model.to_pred.bias.zero_()
    judge = [p.detach().clone() for p in reward_model.trainable_parameters()]
    trainer = toy_trainer(palm=palm, reward=reward_model)
    assert set(palm.finetune_scopes) == {"reward", "actor", "critic"}

    # scored in eval mode (dropout off, so deterministic), with the prompt mask it expects:
    # each row scores as it would alone, without padding; the model's mode is left as it was
    reward_model.train()
    experience, _ = trainer.rollout(*trainer.sample_prompts(16), 6)
    scores = trainer.score(experience.tokens, experience.mask, experience.prompt_mask)
    assert torch.equal(scores, experience.scores) and reward_model.training
    reward_model.eval()
    for i in range(16):
        real = experience.mask[i]
        alone = reward_model(
            experience.tokens[i, real][None], prompt_mask=experience.prompt_mask[i, real][None]
        )
        assert_close(alone, scores[i : i + 1], atol=1e-5, rtol=1e-5)

    before = mean_reward(trainer)
    trainer.train(
        num_rollouts=10 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False
    )
    after = mean_reward(trainer)
    # measured: 1.36 -> 2.94 (the first rollout's reward std is 0.84); KL 4.5 nats per response
    assert after > before + 1.0
    assert final_kl(trainer) < 8.0
    for fixed, now in zip(judge, reward_model.trainable_parameters()):
        assert torch.equal(fixed, now)  # PPO never trains the reward model


TWO_PROCESS_SCRIPT = """
import json, sys
import torch
sys.path[:0] = [{tests!r}, {repo!r}]
from test_ppo import toy_trainer

torch.set_num_threads(1)
ptx = torch.randint(0, 12, (500,), generator=torch.Generator().manual_seed(0))
trainer = toy_trainer(max_norm=1.0, ptx_coef=0.1, ptx_data=ptx, ptx_seq_len=8)
trainer.train(num_rollouts=2 * 64, max_response_tokens=8, rollouts_per_update=64, progress=False)
params = trainer.actor_module.trainable_parameters() + trainer.critic_module.trainable_parameters()
rank = trainer.accelerator.process_index
out = dict(
    world=trainer.accelerator.num_processes, episodes=trainer.episodes, history=trainer.history,
    params=[p.detach().double().sum().item() for p in params],
)
with open({out!r} + f"/rank{{rank}}.json", "w") as handle:
    json.dump(out, handle)
from palm_rlhf.train.accelerator import release_processes
release_processes(exit_code=0)
"""


def test_two_processes_train_one_policy_with_identical_weights(tmp_path):
    script = tmp_path / "two.py"
    tests = Path(__file__).resolve().parent
    script.write_text(
        TWO_PROCESS_SCRIPT.format(tests=str(tests), repo=str(tests.parent), out=str(tmp_path))
    )
    launch([str(script)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["episodes"] == 128  # global episode count
    # DDP averaged the gradients: both processes hold the same actor and critic
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6, abs=1e-9)
    # metrics are gathered, so every process logs the same history
    assert ranks[0]["history"] == ranks[1]["history"]


def test_records_reach_accelerate_trackers_when_configured():
    from accelerate.tracking import GeneralTracker

    class Capture(GeneralTracker):
        name, requires_logging_directory = "capture", False

        def __init__(self):
            super().__init__()
            self.config, self.logged = None, []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    capture = Capture()
    trainer = toy_trainer(accelerate_kwargs=dict(log_with=[capture]))
    trainer.train(num_rollouts=128, max_response_tokens=4, rollouts_per_update=64, progress=False)
    assert capture.config["kl_coef"] == 0.1 and capture.config["actor_lora_r"] == 4
    assert [step for step, _ in capture.logged] == [1, 2]
    assert [values for _, values in capture.logged] == trainer.history


def test_text_prompts_with_a_byte_tokenizer_and_eos_stopping():
    from palm_rlhf.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    palm = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, ff_mult=2)
    with torch.no_grad():  # make EOS (id 0) likely, so some responses stop early
        palm.token_emb.weight[0].mul_(40.0)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=fraction_of_target,
        prompts=["hi", "hello"],
        tokenizer=ByteTokenizer(),
        missing_eos_penalty=1.0,
        rollout_batch_size=16,
    )
    assert trainer.prompts.tokens.tolist() == [[0, 0, 0, 104, 105], [104, 101, 108, 108, 111]]
    experience, ended = trainer.rollout(*trainer.sample_prompts(32), 6, eos_token=0)
    lengths = experience.action_mask.sum(dim=1)
    assert 0 < int(ended.sum()) < 32 and lengths.max() <= 6
    # a response that ended stops at its EOS: nothing real follows it
    response = experience.mask & ~experience.prompt_mask
    eos_positions = (experience.tokens == 0) & response
    assert torch.equal(eos_positions.sum(dim=1), ended.long())
    after = (eos_positions.long().cumsum(dim=1) - eos_positions.long()) > 0
    assert not (after & experience.mask).any()
    record = trainer.train(
        num_rollouts=32, rollouts_per_update=32, max_response_tokens=6, eos_token=0, progress=False
    )[-1]
    assert 0 < record["missing_eos_fraction"] < 1 and record["response_length"] <= 6
