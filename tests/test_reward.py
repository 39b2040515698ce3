import argparse
import dataclasses
import inspect
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.checkpoint import CheckpointError, load_tensors, save_tensors
from palm_rlhf.cli import main as cli_main
from palm_rlhf.data.collate import collate_comparisons
from palm_rlhf.data.records import ComparisonRecord, RatingRecord
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.functional.preference import pairwise_ranking_loss, ranking_loss_from_scores
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.model.reward_config import RewardConfig
from palm_rlhf.options import add_dataclass_arguments
from palm_rlhf.train.reward import (
    RewardTrainConfig,
    fit_records,
    prompts_cut,
    split_records,
    train_reward_model,
)
from palm_rlhf.train.reward_metrics import score_comparisons
from tests.helpers import randomize_lora, tiny_palm

FIXTURES = Path(__file__).parent / "fixtures"


class Bytes32:
    """A tokenizer for the 32-token test PaLM: one id per character, 'a' -> 1, ..., 0 = pad."""

    pad_id = eos_id = 0
    vocab_size = 32

    def encode(self, text):
        return [(ord(c) % 31) + 1 for c in text]


def batch(b=3, n=10, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 32, (b, n), generator=g)
    prompt_mask = torch.zeros(b, n, dtype=torch.bool)
    prompt_mask[:, :prompt] = True
    return seq, prompt_mask


def trained_looking(model: RewardModel) -> RewardModel:
    """Non-zero adapters and prompt/response embeddings, so every part changes outputs."""
    randomize_lora(model.palm, model.reward_lora_scope)
    with torch.no_grad():
        model.prompt_embed.normal_(0, 0.5)
        model.response_embed.normal_(0, 0.5)
    return model.eval()


# ----------------------------------------------------------------------------- heads


def test_scalar_and_binned_outputs_shapes_and_types():
    seq, prompt_mask = batch()
    scalar = RewardModel(tiny_palm(), num_binned_output=0)
    binned = RewardModel(tiny_palm(), num_binned_output=5)
    for model in (scalar, binned):
        reward = model(seq, prompt_mask=prompt_mask)
        assert reward.shape == (3,) and reward.dtype == torch.float32
    assert binned.logits(seq, prompt_mask=prompt_mask).shape == (3, 5)
    rewards = binned(seq, prompt_mask=prompt_mask)
    assert ((rewards > 0) & (rewards < 4)).all()  # expected class index, the labels' scale
    assert scalar(seq, labels=torch.tensor([0.5, 1.0, 2.0])).shape == ()
    assert binned(seq, labels=torch.tensor([0, 2, 4])).shape == ()


def test_expected_class_and_losses_match_hand_computation():
    seq, prompt_mask = batch()
    model = RewardModel(tiny_palm(), num_binned_output=4).eval()
    with torch.no_grad():
        model.to_pred.weight.normal_(0, 1.0)
    logits = model.logits(seq, prompt_mask=prompt_mask)
    by_hand = []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        by_hand.append(sum(math.exp(v) / z * k for k, v in enumerate(row)))  # k = 0..K-1
    assert_close(model(seq, prompt_mask=prompt_mask), torch.tensor(by_hand), atol=1e-5, rtol=0)

    labels = torch.tensor([0, 3, 1])  # class indices 0..K-1, as in the reference
    ce = (
        -sum(
            row[c] - math.log(sum(math.exp(v) for v in row))
            for row, c in zip(logits.tolist(), labels.tolist())
        )
        / 3
    )
    loss = model(seq, prompt_mask=prompt_mask, labels=labels)
    assert_close(loss, torch.tensor(ce), atol=1e-5, rtol=0)
    for bad in ([1, 2, 4], [-1, 0, 0]):  # K is out of range (a 1..K rating is not a label)
        with pytest.raises(ValueError, match=r"class indices 0\.\.3 \(a 1\.\.4 rating r is class"):
            model(seq, labels=torch.tensor(bad))
    with pytest.raises(TypeError, match="integer class indices 0..3"):
        model(seq, labels=torch.tensor([0.0, 1.0, 2.0]))

    sampler = RewardModel(tiny_palm(), num_binned_output=4, sample_from_bins=True).eval()
    with torch.no_grad():
        sampler.to_pred.bias.copy_(torch.tensor([0.0, 0.0, 30.0, 0.0]))
    sampled = sampler(seq)
    assert sampled.dtype == torch.long and sampled.tolist() == [2, 2, 2]  # a class index
    with torch.no_grad():
        sampler.to_pred.bias.zero_()
        sampler.to_pred.weight.zero_()
    samples = sampler(torch.randint(1, 32, (400, 5)))
    assert set(samples.tolist()) == {0, 1, 2, 3}


def test_sample_from_bins_keywords_mean_what_they_mean_in_the_reference():
    """None (our default): expected class index; True: a Gumbel-sampled class index (the
    reference's default); False: the bin logits. Settable as an attribute, as there."""
    seq, prompt_mask = batch()
    model = trained_looking(RewardModel(tiny_palm(), num_binned_output=5))
    assert model.sample_from_bins is None
    logits = model.logits(seq, prompt_mask=prompt_mask)
    expected = (logits.softmax(-1) * torch.arange(5.0)).sum(-1)
    assert_close(model(seq, prompt_mask=prompt_mask), expected, atol=1e-6, rtol=0)
    assert_close(model(seq, prompt_mask=prompt_mask), model(seq, prompt_mask=prompt_mask))
    model.sample_from_bins = False
    assert_close(model(seq, prompt_mask=prompt_mask), logits, atol=0, rtol=0)
    model.sample_from_bins = True
    torch.manual_seed(0)
    sampled = model(seq, prompt_mask=prompt_mask)
    torch.manual_seed(0)
    u = torch.rand(3, 5)
    by_hand = (logits - torch.log(-torch.log(u + 1e-20) + 1e-20)).argmax(-1)
    assert sampled.dtype == torch.long and torch.equal(sampled, by_hand)
    # the scalar head ignores it: it always returns the reward
    scalar = RewardModel(tiny_palm(), sample_from_bins=True).eval()
    assert scalar(seq).dtype == torch.float32

    scalar = RewardModel(tiny_palm()).eval()
    targets = torch.tensor([0.5, -1.0, 2.0])
    pred = scalar(seq, prompt_mask=prompt_mask)
    mse = sum((p - t) ** 2 for p, t in zip(pred.tolist(), targets.tolist())) / 3
    assert_close(
        scalar(seq, prompt_mask=prompt_mask, labels=targets), torch.tensor(mse), atol=1e-5, rtol=0
    )


# ----------------------------------------------------------------------------- comparisons

RECORDS = [
    ComparisonRecord("add", ["four", "five"], [0, 1]),
    ComparisonRecord("count", ["abc", "ab", "cba", "z"], [0, 2, 3, 1]),
    ComparisonRecord("fruit", ["apple", "rock", "pear"], [0, 1, 0]),  # a tie; K = 3 < 4
]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_ranking_losses_by_hand_with_one_forward_per_response():
    model = trained_looking(RewardModel(tiny_palm()))
    comparisons = collate_comparisons(Bytes32(), RECORDS, max_len=16)
    rows = []
    hook = model.palm.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    scores = score_comparisons(model, comparisons)
    hook.remove()
    assert rows == [9]  # one forward over all 2 + 4 + 3 responses, not one per pair
    assert scores.shape == (3, 4) and scores[2, 3] == 0  # the missing response is not run

    # each response alone, unpadded, gives the same score
    alone = []
    for record in RECORDS:
        row = []
        for response in record.responses:
            ids = Bytes32().encode(record.prompt) + Bytes32().encode(response) + [0]
            seq = torch.tensor([ids])
            with torch.no_grad():
                row.append(float(model(seq, prompt_lengths=torch.tensor([len(record.prompt)]))))
        alone.append(row)
    for i, row in enumerate(alone):
        assert_close(scores[i, : len(row)], torch.tensor(row), atol=1e-5, rtol=0)

    # InstructGPT loss: per prompt, mean over its ranked pairs of -log sigmoid(s_i - s_j - m)
    margin, per_prompt = 0.3, []
    for record, row in zip(RECORDS, alone):
        terms = [
            -log_sigmoid(row[i] - row[j] - margin)
            for i in range(len(row))
            for j in range(len(row))
            if record.ranking[i] < record.ranking[j]
        ]
        per_prompt.append(sum(terms) / len(terms))
    assert [len(r.responses) for r in RECORDS] == [2, 4, 3]
    loss = ranking_loss_from_scores(scores, comparisons.ranking, comparisons.response_mask, margin)
    assert_close(loss, torch.tensor(sum(per_prompt) / 3), atol=1e-5, rtol=0)
    # the pairwise (Bradley-Terry) case is the K = 2 record alone
    pair = pairwise_ranking_loss(scores[:1, 0], scores[:1, 1], margin=margin)
    assert_close(pair, torch.tensor(per_prompt[0]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- what is read


def hidden_grad(model, seq, mask, prompt_mask):
    """Gradient of the summed reward w.r.t. the PaLM's final hidden states (b, n, d)."""
    kept = {}

    def keep(_, __, out):
        out.retain_grad()
        kept["hidden"] = out

    hook = model.palm.register_forward_hook(keep)
    model(seq, mask=mask, prompt_mask=prompt_mask).sum().backward()
    hook.remove()
    return kept["hidden"].grad.abs().sum(-1)


def test_the_score_reads_only_the_documented_positions():
    seq, prompt_mask = batch(b=2, n=9, prompt=3)
    mask = torch.ones_like(prompt_mask)
    mask[1, 7:] = False  # row 1 is padded
    mean_model = RewardModel(tiny_palm(), pooling="mean").eval()
    grad = hidden_grad(mean_model, seq, mask, prompt_mask)
    response = mask & ~prompt_mask
    assert (grad[response] > 0).all() and (grad[~response] == 0).all()

    last_model = RewardModel(tiny_palm(), pooling="last").eval()
    grad = hidden_grad(last_model, seq, mask, prompt_mask)
    last = torch.zeros_like(mask)
    last[0, 8] = last[1, 6] = True
    assert (grad[last] > 0).all() and (grad[~last] == 0).all()

    # documented: prompt tokens are context (responses attend to them), padding is nothing
    for model in (mean_model, last_model):
        changed_prompt, changed_pad = seq.clone(), seq.clone()
        changed_prompt[:, 0] = changed_prompt[:, 0] % 31 + 1
        changed_pad[1, 7:] = changed_pad[1, 7:] % 31 + 1
        before = model(seq, mask=mask, prompt_mask=prompt_mask)
        assert (
            model(changed_prompt, mask=mask, prompt_mask=prompt_mask) - before
        ).abs().min() > 1e-6
        assert_close(
            model(changed_pad, mask=mask, prompt_mask=prompt_mask), before, atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
@pytest.mark.parametrize("bins", [0, 5])
def test_padding_left_or_right_does_not_change_the_reward(pooling, bins):
    model = trained_looking(RewardModel(tiny_palm(), pooling=pooling, num_binned_output=bins))
    seq, prompt_mask = batch(b=2, n=7, prompt=3)
    reward = model(seq, prompt_mask=prompt_mask)
    pad = torch.zeros(2, 4, dtype=torch.long)
    no, yes = torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    right = model(
        torch.cat([seq, pad], 1),
        mask=torch.cat([yes, no], 1),
        prompt_mask=torch.cat([prompt_mask, no], 1),
    )
    left = model(
        torch.cat([pad, seq], 1),
        mask=torch.cat([no, yes], 1),
        prompt_mask=torch.cat([no, prompt_mask], 1),
    )
    assert_close(right, reward, atol=1e-5, rtol=0)
    assert_close(left, reward, atol=1e-5, rtol=0)


def test_prompt_and_response_embeddings_and_prompt_lengths():
    model = trained_looking(RewardModel(tiny_palm()))
    seq, prompt_mask = batch(prompt=4)
    by_mask = model(seq, prompt_mask=prompt_mask)
    assert_close(model(seq, prompt_lengths=torch.tensor([4, 4, 4])), by_mask, atol=0, rtol=0)
    assert (model(seq, prompt_lengths=torch.tensor([2, 2, 2])) - by_mask).abs().min() > 1e-5
    with torch.no_grad():  # the embeddings are what tells prompt from response
        model.prompt_embed.zero_()
        model.response_embed.zero_()
    assert_close(
        model(seq, prompt_lengths=torch.tensor([2, 2, 2])), model(seq, prompt_mask=prompt_mask)
    )


def test_bad_inputs_fail_with_clear_messages():
    model = RewardModel(tiny_palm())
    seq, prompt_mask = batch()
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        model(seq, mask=torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(seq, mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match="prompt covers every real token"):
        model(seq, prompt_mask=torch.ones_like(prompt_mask))
    mask = torch.ones_like(prompt_mask)
    mask[0, :5] = False
    with pytest.raises(ValueError, match=r"prompt_mask\[0, 0\] is True on a padding position"):
        model(seq, mask=mask, prompt_mask=prompt_mask)
    with pytest.raises(ValueError, match="not both"):
        model(seq, prompt_mask=prompt_mask, prompt_lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no real token"):
        model(seq, mask=torch.zeros_like(prompt_mask))
    with pytest.raises(ValueError, match="not a valid token id"):
        model(seq + 40)
    with pytest.raises(ValueError, match="num_binned_output"):
        RewardModel(tiny_palm(), num_binned_output=1)
    with pytest.raises(ValueError, match="full fine-tuning pass use_lora=False"):
        RewardModel(tiny_palm(), freeze_base=False)


# ----------------------------------------------------------------------------- what trains


def adam_steps(model, steps=3):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    seq, prompt_mask = batch()
    labels = torch.tensor([0, 2, 4]) if model.binned_output else torch.tensor([1.0, -1.0, 0.0])
    for _ in range(steps):
        optimizer.zero_grad()
        model(seq, prompt_mask=prompt_mask, labels=labels).backward()
        optimizer.step()


def test_lora_mode_trains_only_its_scope_and_head_on_a_shared_palm():
    palm = tiny_palm()
    palm.add_finetune_params("actor")
    randomize_lora(palm, "actor")
    before = {k: v.clone() for k, v in palm.state_dict().items()}
    model = RewardModel(palm)
    assert model.palm is palm  # shared, not copied
    seq, prompt_mask = batch()
    model(seq, prompt_mask=prompt_mask, labels=torch.zeros(3)).backward()
    trained = {id(p) for p in model.trainable_parameters()}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in trained), name
    assert model.palm.finetune_modules["reward"][0]["q"].B.grad.abs().sum() > 0  # B starts at 0
    adam_steps(model)
    after = palm.state_dict()
    for key, value in before.items():  # base and actor scope bit-identical
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in palm.finetune_parameters("reward"))


def test_lora_mode_leaves_the_callers_palm_trainable():
    """Issue #10: building a RewardModel on a PaLM must not freeze the PaLM. The caller's
    `palm(seq, return_loss=True).backward()` still reaches every base weight, and the reward
    loss still reaches only the reward model's own parameters."""
    palm = tiny_palm()
    assert all(p.requires_grad for p in palm.parameters())
    model = RewardModel(palm)
    assert model.palm is palm and all(p.requires_grad for p in palm.palm_parameters())
    seq, prompt_mask = batch()
    palm(seq, return_loss=True).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in palm.palm_parameters())
    palm.zero_grad(set_to_none=True)
    model(seq, prompt_mask=prompt_mask, labels=torch.zeros(3)).backward()
    trained = {id(p) for p in model.trainable_parameters()}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in trained), name
    assert all(p.requires_grad for p in palm.palm_parameters())  # restored after the forward
    base = {k: v.clone() for k, v in palm.state_dict().items() if "finetune" not in k}
    adam_steps(model)
    assert all(torch.equal(palm.state_dict()[k], v) for k, v in base.items())
    # and the caller's own optimizer still trains the base afterwards
    optimizer = torch.optim.SGD(palm.palm_parameters(), lr=0.1)
    optimizer.zero_grad()
    palm(seq, return_loss=True).backward()
    optimizer.step()
    assert not torch.equal(palm.token_emb.weight, base["token_emb.weight"])


def test_mean_all_pooling_is_the_reference_mean_over_mask_prompt_included():
    seq, prompt_mask = batch(b=2, n=9, prompt=3)
    mask = torch.ones_like(prompt_mask)
    mask[1, 7:] = False
    model = RewardModel(tiny_palm(), pooling="mean_all").eval()
    grad = hidden_grad(model, seq, mask, prompt_mask)
    assert (grad[mask] > 0).all() and (grad[~mask] == 0).all()  # prompt tokens read too
    extra = torch.where(prompt_mask[..., None], model.prompt_embed, model.response_embed)
    hidden = model.palm(
        seq, mask=mask, extra_embed=extra, finetune_scope="reward", return_only_embedding=True
    )
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    by_hand = (pooled @ model.to_pred.weight.T + model.to_pred.bias)[:, 0]
    assert_close(model(seq, mask=mask, prompt_mask=prompt_mask), by_hand, atol=1e-6, rtol=1e-6)


def test_full_finetuning_copies_the_palm_and_freeze_base_trains_the_head_only():
    palm = tiny_palm()
    before = {k: v.clone() for k, v in palm.state_dict().items()}
    full = RewardModel(palm, use_lora=False)
    assert full.palm is not palm and full.reward_lora_scope is None
    adam_steps(full)
    assert all(torch.equal(palm.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(full.palm.token_emb.weight, palm.token_emb.weight)

    probe = RewardModel(palm, use_lora=False, freeze_base=True)
    assert len(probe.trainable_parameters()) == 4  # head weight + bias, two embeddings
    adam_steps(probe)
    assert torch.equal(probe.palm.token_emb.weight, palm.token_emb.weight)


def test_two_reward_models_on_one_palm_have_separate_scopes():
    palm = tiny_palm()
    first, second = RewardModel(palm), RewardModel(palm, num_binned_output=5)
    assert (first.reward_lora_scope, second.reward_lora_scope) == ("reward", "reward-1")
    assert not {id(p) for p in first.trainable_parameters()} & {
        id(p) for p in second.trainable_parameters()
    }
    first = trained_looking(first)
    seq, prompt_mask = batch()
    reward = first(seq, prompt_mask=prompt_mask)
    adam_steps(second.train())
    assert_close(first(seq, prompt_mask=prompt_mask), reward, atol=0, rtol=0)


def synthetic_pairs(count, generator):
    """Prompt of 4 random tokens; the better response holds token 2, the worse one does not."""
    prompt = torch.randint(3, 32, (count, 4), generator=generator)
    better, worse = torch.randint(3, 32, (2, count, 6), generator=generator)
    better[torch.arange(count), torch.randint(0, 6, (count,), generator=generator)] = 2
    eos = torch.zeros(count, 1, dtype=torch.long)
    return torch.cat([prompt, better, eos], 1), torch.cat([prompt, worse, eos], 1)


def test_a_tiny_reward_model_learns_a_synthetic_rule():
    model = RewardModel(tiny_palm(), dropout=0.0)
    prompt_mask = torch.zeros(256, 11, dtype=torch.bool)
    prompt_mask[:, :4] = True
    test_better, test_worse = synthetic_pairs(256, torch.Generator().manual_seed(99))

    def accuracy():
        with torch.no_grad():
            return float(
                (
                    model(test_better, prompt_mask=prompt_mask)
                    > model(test_worse, prompt_mask=prompt_mask)
                )
                .float()
                .mean()
            )

    assert accuracy() < 0.8
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        better, worse = synthetic_pairs(32, generator)
        chosen = model(better, prompt_mask=prompt_mask[:32])
        loss = pairwise_ranking_loss(chosen, model(worse, prompt_mask=prompt_mask[:32]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() >= 0.95


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    seq, prompt_mask = batch()
    base = tiny_palm()
    base.save(tmp_path / "base.safetensors")
    model = trained_looking(RewardModel(base, num_binned_output=5, pooling="mean"))
    with torch.no_grad():
        model.to_pred.bias.normal_()
    model.base_checkpoint = str(tmp_path / "base.safetensors")
    reward = model(seq, prompt_mask=prompt_mask)
    path = model.save(tmp_path / "rm")
    assert path.name == "model.safetensors"
    # onto the same shared PaLM (a second scope), onto a fresh copy of the base, from the record
    for palm in (base, tiny_palm(), None):
        loaded = RewardModel.from_pretrained(path, palm=palm).eval()
        assert loaded.config == model.config
        assert_close(loaded(seq, prompt_mask=prompt_mask), reward, atol=0, rtol=0)

    full = RewardModel(tiny_palm(), use_lora=False).eval()
    adam_steps(full)
    full.eval()
    full.save(tmp_path / "full.safetensors")
    loaded = RewardModel.from_pretrained(tmp_path / "full.safetensors").eval()
    assert_close(loaded(seq), full(seq), atol=0, rtol=0)

    other = tiny_palm(dim=48)
    with pytest.raises(CheckpointError, match="palm.dim: file 32 vs model 48"):
        RewardModel.from_pretrained(path, palm=other)
    assert other.finetune_scopes == () and all(p.requires_grad for p in other.parameters())
    with pytest.raises(CheckpointError, match="num_binned_output"):
        RewardModel(tiny_palm()).load(path)
    with pytest.raises(CheckpointError, match="not a reward model checkpoint"):
        RewardModel.from_pretrained(tmp_path / "base.safetensors")
    with pytest.warns(UserWarning, match="another base PaLM"):
        RewardModel(tiny_palm(seed=1), num_binned_output=5, pooling="mean").load(path)


def test_inference_settings_round_trip_and_old_files_keep_their_meaning(tmp_path):
    """`sample_from_bins` set as an attribute is saved; in a version-1 file (before issue #10)
    `sample_from_bins: false` meant the expected rating, which is None now, never the logits."""
    base = tiny_palm()
    model = RewardModel(base, num_binned_output=5)
    model.sample_from_bins, model.sample_temperature = True, 0.5
    path = model.save(tmp_path / "rm.safetensors")
    loaded = RewardModel.from_pretrained(path, palm=tiny_palm())
    assert (loaded.sample_from_bins, loaded.sample_temperature) == (True, 0.5)

    model.sample_from_bins = False
    tensors, metadata = load_tensors(model.save(tmp_path / "v1.safetensors"))
    del metadata["format_version"]
    save_tensors(tmp_path / "v1.safetensors", tensors, metadata)
    old = RewardModel.from_pretrained(tmp_path / "v1.safetensors", palm=tiny_palm())
    assert old.sample_from_bins is None and old(batch()[0]).shape == (3,)


# ----------------------------------------------------------------------------- the trainer


def test_long_responses_are_skipped_truncated_or_refused():
    records = [RatingRecord("p" * 20, "r" * 30, 3), RatingRecord("p", "ok", 1)]
    kept, changed = fit_records(records, Bytes32(), 16, "skip", "ratings")
    assert kept == records[1:] and changed == 1
    kept, changed = fit_records(records, Bytes32(), 16, "truncate", "ratings")
    assert changed == 1 and kept[0].response == "r" * 11  # 16 - eos - 16 // 4 prompt tokens
    with pytest.raises(ValueError, match="ratings record 0"):
        fit_records(records, Bytes32(), 16, "raise", "ratings")


def test_prompts_cut_to_fit_are_counted_and_reported(tmp_path):
    records = [RatingRecord("p" * 20, "ok", 3), RatingRecord("p", "ok", 1)]
    # 16 - 2 response bytes - EOS leaves 13 of the 20 prompt bytes: 7 cut; the short one fits
    assert prompts_cut(records, ByteTokenizer(), 16, "ratings") == [7]
    data = tmp_path / "ratings.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r.prompt, "response": r.response, "rating": r.rating}) + "\n"
            for r in records * 2
        )
    )
    config = RewardTrainConfig(data=str(data), kind="ratings", num_bins=5, max_len=16, num_train=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split_records(config, ByteTokenizer())
    assert [str(w.message) for w in caught] == [
        f"1 of 2 {part} record(s) had their prompt cut from the left to fit max_len=16 (by up "
        "to 7 tokens): raise --max-len to score whole prompts"
        for part in ("training", "held-out")
    ]


def run(tmp_path, **overrides):
    kwargs = dict(
        data=str(FIXTURES / "comparisons.jsonl"),
        num_train=2,
        batch_size=2,
        max_steps=4,
        max_len=64,
        out_dir=str(tmp_path),
        lr=1e-2,
        progress=False,
        log_every=1,
        warmup_steps=1,
    )
    kwargs.update(overrides)
    return train_reward_model(RewardTrainConfig(**kwargs))


def test_train_reward_model_checkpoints_and_resumes_exactly(tmp_path):
    straight = run(tmp_path / "a")
    assert [h["step"] for h in straight.history] == [1, 2, 3, 4]
    assert straight.metrics["valid_count"] == 6  # the third record: 4 distinct ranks, 6 pairs
    assert 0.0 <= straight.metrics["valid_accuracy"] <= 1.0

    run(tmp_path / "b", save_every=2)
    for folder in (tmp_path / "b").glob("step-0000004"):  # killed after the step-2 checkpoint
        folder.rename(tmp_path / "b" / "gone")
    (tmp_path / "b" / "latest").write_text("step-0000002")
    resumed = run(tmp_path / "b", resume="latest")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    seq, prompt_mask = batch(n=12)
    a, b = (r.model.eval()(seq, prompt_mask=prompt_mask) for r in (straight, resumed))
    assert_close(a, b, atol=1e-6, rtol=0)

    # the checkpoint is self-describing: it names the base PaLM it was trained on
    loaded = RewardModel.from_pretrained(straight.checkpoint / "model.safetensors").eval()
    assert_close(loaded(seq, prompt_mask=prompt_mask), a, atol=0, rtol=0)


def test_train_reward_model_on_ratings(tmp_path, capsys):
    result = run(
        tmp_path, data=str(FIXTURES / "ratings.jsonl"), kind="ratings", num_train=3, max_steps=3
    )
    out = capsys.readouterr().out  # the 1..K -> 0..K-1 mapping is said once
    assert out.count("ratings 1..K in the file train class indices 0..K-1") == 1
    assert result.model.config.num_binned_output == 5 and result.num_valid == 1
    assert set(result.metrics) == {"valid_accuracy", "valid_loss", "valid_count", "valid_mae"}
    # the held-out record ("Say hello.", "Goodbye.", rated 2) scored by hand
    tokenizer = ByteTokenizer()
    prompt, response = tokenizer.encode("Say hello."), tokenizer.encode("Goodbye.") + [0]
    model = result.model.eval()
    logits = model.logits(
        torch.tensor([prompt + response]), prompt_lengths=torch.tensor([len(prompt)])
    )
    reward = float(
        model(
            torch.tensor([prompt + response]), prompt_lengths=torch.tensor([len(prompt)])
        ).detach()
    )
    # rating 2 in the file is class index 1: the reward (expected class index) is compared to it
    assert 0 <= reward <= 4
    assert result.metrics["valid_mae"] == pytest.approx(abs(reward - 1), abs=1e-5)
    assert result.metrics["valid_accuracy"] == float(int(logits.argmax()) == 1)


def test_command_line(tmp_path, capsys):
    parser = add_dataclass_arguments(argparse.ArgumentParser(), RewardTrainConfig)
    for action in parser._actions:
        assert action.help, action.dest
    args = [
        "--data",
        str(FIXTURES / "comparisons.jsonl"),
        "--num-train",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--max-len",
        "64",
        "--out-dir",
        str(tmp_path),
        "--no-progress",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["reward", *args]) == 0
    out = capsys.readouterr().out
    # records and pairs said apart: 2 records trained on, 1 held out with 6 ranked pairs (its
    # 4 responses have distinct ranks: 6 pairs), the accuracy being a share of those pairs
    summary = next(line for line in out.splitlines() if line.startswith("reward: trained"))
    assert summary.startswith(
        "reward: trained on 2 records; held out 1 record (6 ranked pairs): accuracy "
    ), summary
    assert "count" not in summary and (tmp_path / "latest").is_file()
    with pytest.raises(SystemExit):
        cli_main(["reward", "--kind", "ratings"])  # --data is required


def test_lora_reward_checkpoint_still_loads_after_its_folder_moves(tmp_path):
    """The base is recorded relative to the reward file too: moving the run folder (base and
    reward checkpoints together) keeps it loadable; a lost base gets an actionable message."""
    palm = tiny_palm()
    base = palm.save(tmp_path / "run" / "base" / "model.safetensors")
    model = RewardModel(palm, use_lora=True)
    randomize_lora(palm, model.reward_lora_scope)
    model.base_checkpoint = str(base)
    model.save(tmp_path / "run" / "reward" / "model.safetensors")
    seq = torch.randint(1, 32, (2, 6))
    expected = model.eval()(seq)
    (tmp_path / "run").rename(tmp_path / "moved")
    again = RewardModel.from_pretrained(tmp_path / "moved" / "reward").eval()
    assert_close(again(seq), expected)
    (tmp_path / "moved" / "base" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="keep the base checkpoint folder beside"):
        RewardModel.from_pretrained(tmp_path / "moved" / "reward")


# ----------------------------------------------------------------------------- constructor


def test_reward_model_options_are_the_configs_in_the_references_order():
    """RewardModel's options and defaults are RewardConfig's; the positional order is the
    reference's (palm, dropout, num_binned_output, use_lora, lora_r, reward_lora_scope,
    sample_from_bins, sample_temperature), our own options keyword-only after them."""
    shown = inspect.signature(RewardModel).parameters
    reference = ["palm", "dropout", "num_binned_output", "use_lora", "lora_r"]
    reference += ["reward_lora_scope", "sample_from_bins", "sample_temperature"]
    assert list(shown)[: len(reference)] == reference
    defaults = RewardConfig()
    for field in dataclasses.fields(RewardConfig):
        assert shown[field.name].default == field.default
    assert all(shown[name].kind is inspect.Parameter.KEYWORD_ONLY for name in list(shown)[8:])
    palm = tiny_palm()
    model = RewardModel(palm, 0.0, 3, True, 4, "judge", True, 0.5)
    assert model.reward_lora_scope == "judge" and model.sample_from_bins is True
    assert (model.config.num_binned_output, model.config.lora_r) == (3, 4)
    assert model.config.sample_temperature == 0.5 and model.config.freeze_base
    # freeze_base follows use_lora unless given, resolved in the config (saved resolved)
    assert RewardModel(palm, use_lora=False).config.freeze_base is False
    assert defaults.freeze_base is True
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'poling'"):
        RewardModel(palm, poling="mean")
    with pytest.raises(TypeError, match=r"RewardModel\(palm=\.\.\.\) must be PaLM"):
        RewardModel("not a palm")
