"""Critic-free algorithms in RLHFTrainer (`algorithm=...`): each learns the toy task of
test_ppo.py (reward = share of token 3 in the response), builds no critic, resumes exactly,
keeps a prompt's group together (on one process), and takes rewards from text functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.cli import main
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.functional.advantages import (
    group_normalized_advantages,
    leave_one_out_advantages,
    reinforce_pp_returns,
)
from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.masked import masked_mean, whiten
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from tests.helpers import launch
from tests.test_cli_pipeline import FIXTURES, pipeline  # noqa: F401  (the module fixture)
from tests.toy_ppo import final_kl, mean_reward, toy_palm, toy_trainer

RUN = dict(max_response_tokens=8, rollouts_per_update=64, progress=False)


def grouped(algorithm: str, **overrides) -> RLHFTrainer:
    return toy_trainer(**{"algorithm": algorithm, "group_size": 4, **overrides})


def rollout_with_advantages(trainer: RLHFTrainer, prompts: int = 8):
    """Phases 1-3 as `step` runs them: prompts sampled, each repeated group_size times."""
    prompt, prompt_mask = trainer.sample_prompts(prompts, trainer.config.group_size)
    experience, ended = trainer.rollout(prompt, prompt_mask, 8)
    return trainer.rewards_and_advantages(experience, ended)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    "algorithm, options, own_metrics",
    [
        ("grpo", {}, {"clip_fraction", "kl_loss"}),
        # Dr. GRPO
        ("grpo", dict(scale_by_std=False, loss_agg_mode="seq-mean-token-sum-norm"), {"kl_loss"}),
        ("grpo", dict(score_centering=True), {"kl_loss"}),
        ("rloo", {}, {"clip_fraction", "kl_loss"}),
        ("reinforce++", {}, {"clip_fraction", "approx_kl"}),
        ("flowrl", {}, {"trajectory_balance", "log_z", "log_z_grad_norm"}),
        ("tpo", {}, {"kl_loss"}),
    ],
)
def test_each_algorithm_raises_the_toy_reward_far_above_the_untrained_policy(
    algorithm, options, own_metrics
):
    palm = toy_palm()
    trainer = grouped(algorithm, palm=palm, **options)
    # no critic network: no critic scope on the PaLM, no critic module or optimizer
    assert trainer.critic is None and trainer.critic_optim is None
    assert palm.finetune_scopes == ("actor",) and "critic" not in trainer.state_dict()
    before = mean_reward(trainer, episodes=256)
    trainer.train(num_rollouts=10 * 64, **RUN)
    after = mean_reward(trainer, episodes=256)
    kl = final_kl(trainer)
    # measured (seed 1, torch 2.13 CPU, 10 updates of 64, beta_s 0.01 in every algorithm),
    # reward 0.055 -> after, KL nats: grpo 0.89 (5.1), Dr. GRPO 0.63 (2.6), grpo + score
    # centering 0.94 (6.3), rloo 0.66 (3.8), reinforce++ 0.77 (4.6), flowrl 0.97 (6.7),
    # tpo 0.68 (5.1)
    assert before < 0.15
    assert after > 0.5 and after > before + 0.35, (before, after)
    assert 0.3 < kl < 10.0, kl  # moved away from the reference, but within a bounded distance
    assert trainer.episodes == 640 and trainer.updates == 10
    record = trainer.history[-1]
    assert {
        "reward",
        "kl",
        "entropy",
        "policy_loss",
        "constant_group_fraction",
    } | own_metrics <= set(record)
    assert "value_loss" not in record and "explained_variance" not in record
    best = trainer.generate(12, prompt=torch.tensor([5, 6, 7]), num_samples=4)  # best of n
    assert best.shape[0] == 12


# ----------------------------------------------------------------------------- groups


def test_a_group_shares_one_prompt_and_its_advantages_are_the_pure_functions():
    for algorithm in ("grpo", "rloo"):
        trainer = grouped(algorithm, scale_by_std=algorithm == "grpo")
        experience, stats = rollout_with_advantages(trainer)
        tokens, prompt_mask = experience.tokens, experience.prompt_mask
        for start in range(0, 32, 4):  # every row of a group answers the same prompt
            first = tokens[start][prompt_mask[start]]
            for row in range(start + 1, start + 4):
                assert torch.equal(tokens[row][prompt_mask[row]], first)
        expected = (
            group_normalized_advantages(experience.scores, 4)
            if algorithm == "grpo"
            else leave_one_out_advantages(experience.scores, 4)
        )
        mask = experience.action_mask
        # the sequence advantage sits on every response token, 0 elsewhere
        assert_close(experience.advantages, torch.where(mask, expected[:, None], 0), atol=0, rtol=0)
        assert expected.abs().sum() > 0  # the rewards differ within some group


def test_reinforce_pp_whitens_kl_shaped_returns_over_the_batch():
    trainer = grouped("reinforce++", group_size=1)
    experience, _ = rollout_with_advantages(trainer, prompts=16)
    mask = experience.action_mask
    kl = kl_per_token(experience.old_logprobs, experience.ref_logprobs, "k1")
    returns = reinforce_pp_returns(experience.scores, kl, mask, 0.1)
    assert_close(experience.returns, returns, atol=1e-6, rtol=1e-6)
    assert_close(experience.advantages, whiten(returns, mask), atol=1e-6, rtol=1e-6)


def test_config_validates_group_options_and_names_the_algorithms():
    with pytest.raises(ValueError, match="group_size >= 2"):
        PPOConfig(algorithm="grpo", group_size=1)
    with pytest.raises(ValueError, match="score_centering"):
        PPOConfig(algorithm="tpo", score_centering=True)
    with pytest.raises(ValueError, match="algorithm in"):
        PPOConfig(algorithm="dpo")
    assert PPOConfig(algorithm="reinforce++", group_size=1).responses_per_prompt == 1
    assert PPOConfig(group_size=8).responses_per_prompt == 1  # ppo: one response per prompt


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("algorithm", ["grpo", "flowrl"])
def test_save_load_resumes_with_identical_updates(tmp_path, algorithm):
    options = dict(epochs=1, minibatch_size=32)
    original = grouped(algorithm, **options)
    original.train(num_rollouts=64, **RUN)
    folder = original.save(tmp_path)
    assert not (folder / "critic.safetensors").exists()  # no critic to save
    assert (folder / "log_z.safetensors").exists() == (algorithm == "flowrl")
    expected = original.train(num_rollouts=64, **RUN)[0]

    resumed = grouped(algorithm, palm=toy_palm(), **options).load(tmp_path)
    assert resumed.episodes == 64 and len(resumed.history) == 1
    got = resumed.train(num_rollouts=64, **RUN)[0]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(Exception, match="algorithm"):
        toy_trainer().load(folder)  # a PPO trainer refuses a GRPO checkpoint


def test_full_fine_tuning_without_lora_trains_the_callers_palm_in_place():
    """actor_lora=False means what it means in the reference project: the user's PaLM itself
    is trained; the frozen reference policy is a copy taken at construction."""
    palm = toy_palm()
    before = [p.detach().clone() for p in palm.palm_parameters()]
    trainer = grouped("grpo", palm=palm, actor_lora=False, actor_lr=1e-3)
    assert trainer.actor_module.palm is palm and trainer.reference is not palm
    trainer.train(num_rollouts=64, **RUN)
    assert palm.finetune_scopes == ()  # no scope at all, no critic
    assert any(not torch.equal(a, b) for a, b in zip(before, palm.palm_parameters()))
    for fixed, ref in zip(before, trainer.reference.palm_parameters()):
        assert torch.equal(fixed, ref)  # the reference copy is untouched


# ----------------------------------------------------------------------------- text rewards


def test_a_python_function_of_the_text_is_a_reward():
    torch.manual_seed(0)
    palm = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, ff_mult=2)
    seen = []

    def count_a(prompts: list[str], responses: list[str]) -> list[float]:
        seen.append((prompts, responses))
        return [response.count("a") / max(len(response), 1) for response in responses]

    trainer = RLHFTrainer(
        palm=palm,
        text_reward_fn=count_a,
        prompts=["hi", "hello"],
        tokenizer=ByteTokenizer(),
        algorithm="grpo",
        group_size=4,
        rollout_batch_size=8,
        minibatch_size=8,
    )
    experience, _ = rollout_with_advantages(trainer, prompts=2)
    prompts, responses = seen[-1]
    assert set(prompts) <= {"hi", "hello"} and len(responses) == 8
    tokenizer = ByteTokenizer()
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        real = experience.mask[row]
        ids = experience.tokens[row][real & ~experience.prompt_mask[row]].tolist()
        assert tokenizer.decode(ids) == response
        assert (
            tokenizer.decode(experience.tokens[row][experience.prompt_mask[row]].tolist()) == prompt
        )
        assert experience.scores[row] == pytest.approx(count_a([prompt], [response])[0])
    record = trainer.train(
        num_rollouts=8, rollouts_per_update=8, max_response_tokens=6, progress=False
    )[-1]
    assert record["episodes"] == 8
    with pytest.raises(ValueError, match="exactly one"):
        RLHFTrainer(palm=palm, prompts=["hi"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        RLHFTrainer(palm=palm, text_reward_fn=count_a, prompt_token_ids=[torch.tensor([1])])


# ----------------------------------------------------------------------------- processes

TWO_PROCESS_SCRIPT = """
import json, sys
import torch
sys.path[:0] = [{tests!r}, {repo!r}]
from test_ppo import toy_trainer

torch.set_num_threads(1)
out = {{}}
for algorithm in ("grpo", "reinforce++"):
    trainer = toy_trainer(algorithm=algorithm, group_size=4, minibatch_size=16)
    prompt, prompt_mask = trainer.sample_prompts(4, 4)
    experience, ended = trainer.rollout(prompt, prompt_mask, 8)
    experience, _ = trainer.rewards_and_advantages(experience, ended)
    if algorithm == "grpo":  # one update: the processes must stay identical
        trainer.train(
            num_rollouts=32, max_response_tokens=8, rollouts_per_update=32, progress=False
        )
    params = trainer.actor_module.trainable_parameters()
    out[algorithm] = dict(
        tokens=experience.tokens.tolist(), mask=experience.action_mask.tolist(),
        scores=experience.scores.tolist(), returns=experience.returns.tolist(),
        advantages=experience.advantages.tolist(), episodes=trainer.episodes,
        params=[p.detach().double().sum().item() for p in params],
    )
rank = trainer.accelerator.process_index
with open({out!r} + f"/rank{{rank}}.json", "w") as handle:
    json.dump(out, handle)
from palm_rlhf.train.accelerator import release_processes
release_processes(exit_code=0)
"""


def test_two_processes_give_the_advantages_one_process_computes_for_the_same_samples(tmp_path):
    script = tmp_path / "two.py"
    tests = Path(__file__).resolve().parent
    script.write_text(
        TWO_PROCESS_SCRIPT.format(tests=str(tests), repo=str(tests.parent), out=str(tmp_path))
    )
    launch([str(script)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for algorithm in ("grpo", "reinforce++"):
        shards = [rank[algorithm] for rank in ranks]
        assert shards[0]["tokens"] != shards[1]["tokens"]  # each process sampled its own groups
        # the processes stay identical (DDP averaged the gradients)
        assert shards[0]["params"] == pytest.approx(shards[1]["params"], rel=1e-6, abs=1e-9)
        if algorithm == "grpo":
            assert (
                shards[0]["episodes"] == 32
            )  # global count  # whole groups on each process: local normalisation is exact
            for shard in shards:
                scores, mask = torch.tensor(shard["scores"]), torch.tensor(shard["mask"])
                expected = group_normalized_advantages(scores, 4)[:, None] * mask
                assert_close(torch.tensor(shard["advantages"]), expected, atol=1e-6, rtol=1e-6)
            continue
        # REINFORCE++: one process whitening both shards' returns together gives the same
        width = max(len(s["mask"][0]) for s in shards)
        returns, mask, got = (
            torch.tensor([r + [0] * (width - len(r)) for s in shards for r in s[key]])
            for key in ("returns", "mask", "advantages")
        )
        mask = mask.bool()
        together = whiten(returns, mask)
        assert_close(got, together, atol=1e-5, rtol=1e-5)
        local = whiten(returns[:16], mask[:16])
        assert not torch.allclose(local, together[:16], atol=1e-3)  # the sum of moments matters


# ----------------------------------------------------------------------------- command line


def test_cli_trains_grpo_on_the_pipeline_fixtures(pipeline, capsys):  # noqa: F811
    root = pipeline
    assert (
        main(
            [
                "ppo",
                "--policy",
                str(root / "sft"),
                "--reward",
                str(root / "rm"),
                "--prompts",
                str(FIXTURES / "sft.jsonl"),
                "--out-dir",
                str(root / "grpo"),
                "--algorithm",
                "grpo",
                "--group-size",
                "4",
                "--num-rollouts",
                "8",
                "--rollouts-per-update",
                "4",
                "--max-response-tokens",
                "4",
                "--rollout-batch-size",
                "4",
                "--minibatch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "ppo: reward" in capsys.readouterr().out
    final = PaLM.from_pretrained(root / "grpo" / "final")
    assert final.finetune_scopes == ()
    trainer_dir = root / "grpo" / "trainer"
    latest = trainer_dir / (trainer_dir / "latest").read_text()
    assert not (latest / "critic.safetensors").exists()
    assert json.loads((latest / "trainer_state.json").read_text())["config"]["algorithm"] == "grpo"


# ----------------------------------------------------------------------------- docs/extending.md


def test_the_extending_page_python_blocks_run_as_written_and_can_fail(tmp_path):
    """Every ```python block of docs/extending.md, in order, in a fresh interpreter (its
    registration must not leak into the other tests), with no names injected."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/extending.md has no python block"

    def run(code: str) -> subprocess.CompletedProcess:
        script = tmp_path / "blocks.py"
        script.write_text(code)
        env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    done = run("\n".join(blocks))
    assert done.returncode == 0, done.stderr[-2000:]
    # the page's own assertion bites: a wrong expected advantage fails the run
    broken = run("\n".join(blocks).replace("[2.0, 0.0]", "[2.5, 0.0]"))
    assert broken.returncode != 0 and "AssertionError" in broken.stderr


def test_a_one_token_batch_gives_ppo_and_reinforce_pp_their_raw_advantage_alike():
    """Whitening has one tiny-batch rule for every algorithm: with fewer than 2 tokens in the
    batch the entries pass through (REINFORCE++ used to raise where PPO passed through)."""
    from types import SimpleNamespace

    from palm_rlhf.rl.algorithms import AdvantageInputs, reinforce_pp_advantages

    config = SimpleNamespace(gamma=1.0, group_size=1)
    scores, kl, mask = (
        torch.tensor([2.0]),
        torch.tensor([[0.5, 9.0]]),
        torch.tensor([[True, False]]),
    )
    # r = -0.1 * 0.5 + 2 = 1.95 at the one token; G = 1.95; whitening leaves it as it is
    inputs = AdvantageInputs(scores, kl, mask, config, 0.1, lambda t: t)
    advantages, returns = reinforce_pp_advantages(inputs)
    assert_close(returns, torch.tensor([[1.95, 0.0]]), atol=1e-6, rtol=0)
    assert_close(advantages, torch.tensor([[1.95, 0.0]]), atol=1e-6, rtol=0)
    # the same batch one process sees when another holds a second token (return 0.95):
    # mean 1.45, var 0.5 -> (1.95 - 1.45) / sqrt(0.5)
    other = torch.tensor([1.0, 0.95, 0.95**2], dtype=torch.float64)
    inputs = inputs._replace(all_reduce=lambda t: t + other)
    advantages, _ = reinforce_pp_advantages(inputs)
    assert_close(advantages, torch.tensor([[0.5 / 0.5**0.5, 0.0]]), atol=1e-5, rtol=0)


COPY_PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([4, 5, 6, 7, 10])]


def copy_last_prompt_token(seq, mask, prompt_mask):
    """(b,) share of response tokens equal to the row's last prompt token: the best response
    depends on the prompt (left-justified rows: the prompt's last True)."""
    last_position = prompt_mask.long().cumsum(-1) == prompt_mask.sum(-1, keepdim=True)
    last = (seq * (last_position & prompt_mask)).sum(-1, keepdim=True)
    return masked_mean((seq == last).float(), mask & ~prompt_mask, dim=-1)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_reward_that_depends_on_the_prompt_is_learned(algorithm):
    """Rewards, advantages and log-probs stay with their own prompt's rows: a policy that must
    answer each prompt differently learns to (measured: about 0.35 -> 0.9 in 15 updates)."""
    extra = dict(group_size=4) if algorithm == "grpo" else {}
    trainer = toy_trainer(
        reward=copy_last_prompt_token,
        algorithm=algorithm,
        prompt_token_ids=COPY_PROMPTS,
        epochs=1,
        **extra,
    )
    records = trainer.train(
        num_rollouts=64 * 15, max_response_tokens=6, rollouts_per_update=64, progress=False
    )
    first, last = records[0]["reward"], sum(r["reward"] for r in records[-3:]) / 3
    assert first < 0.5 and last > 0.75, (first, last)
