import copy
import math

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf.cli import main as cli_main
from palm_rlhf.data.examples import split_groups
from palm_rlhf.data.records import RecordError, read_comparisons
from palm_rlhf.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train.dpo import (
    DPOConfig,
    collate_pairs,
    dpo_forward,
    dpo_pair,
    ordered_pairs,
    train_dpo,
)
from palm_rlhf.train.loading import TokenizerMismatchError
from tests.finetune_helpers import FIXTURES, make_base, toy_comparisons, write_jsonl
from tests.helpers import randomize_lora

QUICK = dict(max_len=64, batch_size=8, warmup_steps=1, log_every=1)
TOKENS = ByteTokenizer()
PROMPTS = [("Add 2 and 2.", "4", "five"), ("Hi", "Hello there!", "Go away")]


@pytest.fixture
def base(tmp_path):
    return make_base(tmp_path / "base")


def pair_batch():
    return collate_pairs([dpo_pair(TOKENS, p, c, r, 64) for p, c, r in PROMPTS], TOKENS.pad_id)


def small_model():
    torch.manual_seed(0)
    return PaLM(num_tokens=256, dim=16, depth=2, heads=2, dim_head=8)


# ------------------------------------------------------------------------- pairs and masks


def test_ordered_pairs_follow_the_ranking_and_skip_ties():
    records = read_comparisons(FIXTURES / "comparisons.jsonl")
    assert ordered_pairs(records[0]) == [("4", "5")]
    assert ordered_pairs(records[1]) == [("apple", "rock"), ("pear", "rock")]  # ranks [0, 1, 0]
    pairs = ordered_pairs(records[2])  # responses "1 2 3", "1 2", "3 2 1", "one"; ranks 0 2 3 1
    assert len(pairs) == 6 and ("1 2 3", "3 2 1") in pairs and ("one", "1 2") in pairs
    assert ("1 2", "one") not in pairs


def test_pair_batch_masks_only_each_response_and_its_eos():
    batch = pair_batch()
    assert batch["tokens"].shape[0] == 4  # chosen rows 0, 1 then rejected rows 2, 3
    prompt = len("Add 2 and 2.")
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == [prompt, prompt + 1]  # "4", EOS
    assert batch["loss_mask"][2].nonzero().flatten().tolist() == list(range(prompt, prompt + 5))
    assert bytes(batch["tokens"][2][batch["loss_mask"][2]].tolist()) == b"five\x00"


# ------------------------------------------------------------------------- the loss


def by_hand_logp(model, prompt: str, response: str, **forward) -> float:
    """log p(response + EOS | prompt), one unpadded sequence, position by position."""
    ids = list(prompt.encode()) + list(response.encode()) + [0]
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids]), **forward)[0], dim=-1)
    return sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_through_the_model_matches_a_hand_computation(label_smoothing):
    model, beta = small_model(), 0.5
    model.add_finetune_params("dpo")
    randomize_lora(model, "dpo", std=0.3)
    losses, margins = [], []
    for prompt, chosen, rejected in PROMPTS:
        policy = [by_hand_logp(model, prompt, y, finetune_scope="dpo") for y in (chosen, rejected)]
        ref = [by_hand_logp(model, prompt, y) for y in (chosen, rejected)]
        h = beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        losses.append(-(1 - label_smoothing) * log_sigmoid(h) - label_smoothing * log_sigmoid(-h))
        margins.append(h)
    out = dpo_forward(model, pair_batch(), beta, label_smoothing, scope="dpo")
    assert abs(sum(margins)) > 0.01  # the adapters make policy and reference differ
    torch.testing.assert_close(out.loss.item(), sum(losses) / 2, atol=1e-5, rtol=0)
    margin = (out.chosen_rewards - out.rejected_rewards).tolist()
    torch.testing.assert_close(margin, margins, atol=1e-5, rtol=0)


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    model = small_model()
    model.add_finetune_params("dpo")  # zero-initialised: the policy is the reference
    out = dpo_forward(model, pair_batch(), beta=0.1, scope="dpo")
    torch.testing.assert_close(out.loss.item(), math.log(2), atol=1e-6, rtol=0)
    assert out.chosen_rewards.abs().max() < 1e-6 and out.rejected_rewards.abs().max() < 1e-6
    frozen = copy.deepcopy(small_model())  # full fine-tuning: a frozen copy as reference
    out = dpo_forward(small_model(), pair_batch(), beta=0.1, reference=frozen)
    torch.testing.assert_close(out.loss.item(), math.log(2), atol=1e-6, rtol=0)


def test_only_the_policy_gets_gradients():
    model = small_model()
    model.add_finetune_params("dpo")
    randomize_lora(model, "dpo")
    dpo_forward(model, pair_batch(), beta=0.1, scope="dpo").loss.backward()
    assert all(p.grad is not None for p in model.finetune_parameters("dpo"))


# ------------------------------------------------------------------------- training


@pytest.mark.parametrize("lora", [False, True])
def test_train_dpo_learns_the_preference(base, tmp_path, lora):
    data = toy_comparisons(tmp_path / "toy.jsonl")
    config = DPOConfig(
        base=str(base),
        data=str(data),
        valid_fraction=0.25,
        out_dir=str(tmp_path / "out"),
        epochs=10,
        beta=0.5,
        use_lora=lora,
        lr=1e-2 if lora else 1e-3,
        merge_lora=False,
        eval_every=1000,
        **QUICK,
    )
    result = train_dpo(config)
    first, last = result.history[0], result.history[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["accuracy"] == 0.0
    assert last["accuracy"] == 1.0 and last["loss"] < 0.5
    assert result.valid["accuracy"] == 1.0 and result.valid["margin"] > 0.5
    assert result.valid["chosen_reward"] > 0 > result.valid["rejected_reward"]
    trained = PaLM.from_pretrained(result.checkpoint)
    if lora:  # the base weights (the reference) never moved
        reference = PaLM.from_pretrained(base)
        for ours, theirs in zip(trained.palm_parameters(), reference.palm_parameters()):
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
        assert trained.finetune_scopes == ("dpo",)


def test_resume_gives_the_same_next_losses(base, tmp_path):
    data = toy_comparisons(tmp_path / "toy.jsonl", count=24)
    common = dict(
        base=str(base),
        data=str(data),
        epochs=2,
        save_every=2,
        keep_last=5,
        lr=1e-3,
        **QUICK,
    )
    full = train_dpo(DPOConfig(out_dir=str(tmp_path / "a"), **common))
    resumed = train_dpo(
        DPOConfig(
            out_dir=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step-0000002"), **common
        )
    )
    before = {r["step"]: (r["loss"], r["margin"]) for r in full.history}
    after = {r["step"]: (r["loss"], r["margin"]) for r in resumed.history}
    for step in (3, 4, 5, 6):
        assert after[step] == pytest.approx(before[step], abs=1e-6)


# ------------------------------------------------------------------------- refusals


def test_a_tokenizer_mismatch_with_the_base_is_refused(base, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    SentencePieceTokenizer.train([corpus], tmp_path / "sp", vocab_size=300)
    config = DPOConfig(
        base=str(base),
        data=str(FIXTURES / "comparisons.jsonl"),
        tokenizer=str(tmp_path / "sp"),
        out_dir=str(tmp_path / "out"),
        **QUICK,
    )
    with pytest.raises(TokenizerMismatchError, match="tokenizer mismatch"):
        train_dpo(config)


def test_malformed_hh_record_is_reported_with_file_and_line(base, tmp_path):
    good = (FIXTURES / "hh_rlhf.jsonl").read_text().splitlines()[0]
    bad = write_jsonl(
        tmp_path / "hh.jsonl", [good, "", good, {"chosen": "Human: hi", "rejected": "Human: yo"}]
    )
    config = DPOConfig(base=str(base), data=str(bad), out_dir=str(tmp_path / "out"), **QUICK)
    with pytest.raises(RecordError, match=f"{bad}:4: HH-RLHF record without a prompt"):
        train_dpo(config)


def test_validation_file_and_command_line(base, tmp_path, capsys):
    comparisons = str(FIXTURES / "comparisons.jsonl")
    args = [
        "--base",
        str(base),
        "--data",
        comparisons,
        "--valid-data",
        str(FIXTURES / "hh_rlhf.jsonl"),
        "--out-dir",
        str(tmp_path / "out"),
        "--max-len",
        "128",
        "--batch-size",
        "4",
        "--beta",
        "0.2",
        "--use-lora",
    ]
    assert cli_main(["dpo", *args]) == 2  # a user error: one line, exit status 2
    assert (
        "palm-rlhf dpo: max_len 128 exceeds the model's max_seq_len 64" in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="max_len 128 exceeds the model's max_seq_len 64"):
        cli_main(["--debug", "dpo", *args])
    args[args.index("128")] = "64"
    args[args.index("--valid-data") + 1] = comparisons
    assert cli_main(["dpo", *args]) == 0
    out = capsys.readouterr().out
    assert "dpo: train loss" in out and "valid loss" in out and "accuracy" in out


def test_held_out_split_keeps_the_pairs_of_a_ranked_list_together():
    groups = [[f"r{i}-{k}" for k in range(i % 3 + 1)] for i in range(10)]  # 1 to 3 pairs each
    train, valid = split_groups(groups, 0.3, seed=0)
    held = {item.split("-")[0] for item in valid}
    assert len(held) == 3 and not held & {item.split("-")[0] for item in train}
    assert sorted(train + valid) == sorted(x for g in groups for x in g)
    assert split_groups(groups, 0.3, seed=0) == (train, valid)
