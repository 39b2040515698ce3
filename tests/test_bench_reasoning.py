"""The reasoning benchmark's task: held-out problems never trained on, right answers, and an
exact-match reward that reaches the trainer through the library's text-reward path."""

import json
import math

import pytest
import torch

from palm_rlhf import ByteTokenizer
from palm_rlhf.rl.text_reward import resolve_reward

BENCH = "bench_reasoning"  # loaded by the `bench` fixture (conftest.py)


def test_held_out_and_train_are_disjoint_and_deterministic(bench):
    task = bench.Addition(digits=2, held_out=300, seed=0)
    held = task.held_out_pairs()
    assert len(held) == len(set(held)) == 300
    assert held == bench.Addition(digits=2, held_out=300, seed=0).held_out_pairs()
    assert held != bench.Addition(digits=2, held_out=300, seed=1).held_out_pairs()
    train = task.train_pairs(40_000, seed=1)
    assert len(train) == 40_000
    assert not set(train) & set(held)
    # the training draw covers almost all of the 9,700 other pairs, so disjointness is not luck
    assert len(set(train)) > 9_300  # of 9,700; expected about 9,540


def test_prompts_and_answers(bench):
    task = bench.Addition(digits=3, held_out=10)
    assert task.prompt(7, 45) == "007+045="
    assert bench.Addition.answer("007+045=") == "52"
    assert bench.Addition.answer("999+999=") == "1998"
    assert bench.Addition.answer("000+000=") == "0"
    for a, b in task.train_pairs(200, seed=3):
        assert int(bench.Addition.answer(task.prompt(a, b))) == a + b
        assert len(task.prompt(a, b)) == 2 * 3 + 2  # every prompt the same length


def test_bad_task_sizes_are_refused(bench):
    with pytest.raises(ValueError, match="held_out"):
        bench.Addition(digits=1, held_out=60)  # more than half of the 100 pairs


def test_exact_match_through_the_text_reward_path(bench):
    """Left-justified rows as the trainer lays them out: prompt, response, EOS, padding."""
    tokenizer = ByteTokenizer()
    reward = resolve_reward(None, bench.exact_match, tokenizer)
    prompt = tokenizer.encode("047+005=")
    rows = [
        prompt + tokenizer.encode("52") + [tokenizer.eos_id, 0],  # right, then EOS and padding
        prompt + tokenizer.encode("53") + [tokenizer.eos_id, 0],  # wrong digit
        prompt + tokenizer.encode("520") + [tokenizer.eos_id],  # right prefix, extra digit
        prompt + tokenizer.encode("5") + [tokenizer.eos_id, 0, 0],  # too short
    ]
    lengths = [len(prompt) + n for n in (3, 3, 4, 2)]
    seq = torch.tensor(rows)
    positions = torch.arange(seq.shape[1])
    mask = positions < torch.tensor(lengths)[:, None]
    prompt_mask = positions < len(prompt)
    scores = reward(seq, mask, prompt_mask.expand_as(mask))
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=0, rtol=0)


def test_pass_at_k_matches_hand_values(bench):
    # n = 4 samples, c = 1 right: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
    assert math.isclose(bench.pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(bench.pass_at_k(4, 1, 2), 0.5)
    assert bench.pass_at_k(4, 0, 4) == 0.0
    assert bench.pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong: some draw of k is right


def test_quick_run_end_to_end(bench, tmp_path):
    """SFT and one RL method at toy sizes through the public API, the JSON written: catches
    a renamed trainer keyword or entry point before a long run does."""
    results = bench.main(
        ["--quick", "--methods", "grpo", "--settings", "shared", "--out-dir", str(tmp_path)]
    )
    written = json.loads((tmp_path / "reasoning-quick.json").read_text())
    assert list(written["runs"]) == ["shared"]
    assert written["runs"]["shared"]["keywords"] == bench.SETTINGS["shared"]
    method = written["runs"]["shared"]["methods"]["grpo"]
    assert method["episodes"] == bench.QUICK.episodes
    assert [p["episodes"] for p in method["curve"]] == [0, bench.QUICK.episodes]
    assert set(written["sft"]["eval"]) == {
        "pass1_greedy",
        "pass1_sampled",
        "pass_at_k",
        "kl_to_sft",
    }
    assert written["provenance"]["commit"] and "avx512_bf16" in written["provenance"]["machine"]
    before = results["runs"]["shared"]["methods"]["grpo"]["before"]
    assert before["kl_to_sft"] == 0.0  # the SFT model itself
    assert before == results["sft"]["eval"] | {"episodes": 0}
    assert "Best: grpo (shared)" in bench.table(written)
    # --add: another method beside the first, from the same (re-made, deterministic) SFT model
    bench.main(
        ["--quick", "--methods", "dapo", "--settings", "shared", "--out-dir", str(tmp_path)]
        + ["--add"]
    )
    added = json.loads((tmp_path / "reasoning-quick.json").read_text())
    assert list(added["runs"]["shared"]["methods"]) == ["grpo", "dapo"]
    assert added["runs"]["shared"]["methods"]["grpo"] == method
    assert added["added"][0]["methods"] == "dapo"
    with pytest.raises(SystemExit):  # a different shared setting is not the same experiment
        bench.main(
            ["--quick", "--methods", "rloo", "--settings", "shared", "--out-dir", str(tmp_path)]
            + ["--add", "--set", "actor_lr=1e-3"]
        )


def test_the_careless_demonstrator_forgets_every_carry(bench):
    assert bench.Addition.slip("047+005=") == "42"  # 7 + 5 = 12: the carry into 4 is lost
    assert bench.Addition.slip("123+456=") == "579" == bench.Addition.answer("123+456=")
    assert bench.Addition.slip("999+001=") == "990"  # 1000 with every carry forgotten
    assert bench.Addition.slip("500+500=") == "0"
