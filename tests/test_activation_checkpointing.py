"""`--checkpoint-activations`: each block's activations are recomputed in the backward pass
instead of stored. It must change memory and time only, never the numbers."""

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.cli import build_parser
from palm_rlhf.model.palm import ParallelBlock
from palm_rlhf.options import config_parser, dataclass_from_args
from palm_rlhf.train.pretrain import PretrainConfig, pretrain
from palm_rlhf.train.sft import SFTConfig, train_sft
from tests.finetune_helpers import make_base, toy_sft
from tests.helpers import randomize_lora, tiny_palm
from tests.test_pretrain import TINY, corpus_dir  # noqa: F401 (a fixture)

TRAINING_STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "coh")


@pytest.fixture
def block_calls(monkeypatch):
    """Counts ParallelBlock.forward calls: a recomputation is one more call per block."""
    calls = []
    forward = ParallelBlock.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ParallelBlock, "forward", counted)
    return calls


def loss_and_grads(model, seq, mask, scope, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both models
    loss = model(seq, return_loss=True, mask=mask, finetune_scope=scope)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_loss_and_gradients_equal_stored_ones(dropout):
    stored = tiny_palm(depth=3, attn_dropout=dropout, ff_dropout=dropout).train()
    stored.add_finetune_params("lora")
    randomize_lora(stored, "lora")
    recomputed = tiny_palm(depth=3, attn_dropout=dropout, ff_dropout=dropout).train()
    recomputed.add_finetune_params("lora")
    recomputed.load_state_dict(stored.state_dict())
    recomputed.checkpoint_activations = True
    seq = torch.randint(1, 32, (3, 17))
    mask = torch.ones_like(seq, dtype=torch.bool)
    mask[2, 12:] = False  # padding: the masked attention path, not only the causal kernel

    expected_loss, expected = loss_and_grads(stored, seq, mask, "lora", seed=7)
    loss, grads = loss_and_grads(recomputed, seq, mask, "lora", seed=7)
    assert_close(loss, expected_loss, atol=1e-7, rtol=1e-6)
    assert grads.keys() == expected.keys() and len(grads) == len(list(stored.parameters()))
    for name, grad in grads.items():
        assert_close(grad, expected[name], atol=1e-7, rtol=1e-6, msg=name)
    if dropout > 0:  # the masks really differ between seeds, so equal masks were restored
        other_loss, _ = loss_and_grads(stored, seq, mask, "lora", seed=8)
        assert (other_loss - expected_loss).abs() > 1e-4


def test_blocks_run_again_in_backward_only_when_gradients_are_wanted(block_calls):
    model = tiny_palm(depth=3)
    model.checkpoint_activations = True
    seq = torch.randint(1, 32, (2, 9))
    loss = model(seq, return_loss=True)
    assert len(block_calls) == 3
    loss.backward()
    assert block_calls == [True] * 6  # each block once more, during backward
    block_calls.clear()
    with torch.no_grad():
        model(seq)
    model.generate(12, prompt=seq[:, :4], top_k=1)  # KV-cached: the cache is written once
    assert len(block_calls) == 3 + 3 * 8 and not any(block_calls)


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_training_stage_takes_the_flag(stage):
    parser = build_parser()
    required = required_args(parser, stage)
    for argv, expected in (
        ([], False),
        (["--checkpoint-activations"], True),
        (["--checkpoint-activations", "--no-checkpoint-activations"], False),
    ):
        args = parser.parse_args([stage, *required, *argv])
        assert dataclass_from_args(args.config_cls, args).checkpoint_activations is expected
    assert "--checkpoint-activations" in args.subparser.format_help()


def required_args(parser, stage: str) -> list[str]:
    """A placeholder value for each option the stage requires (the parser only checks types)."""
    subparser = parser._subparsers._group_actions[0].choices[stage]
    return [
        arg
        for action in subparser._actions
        if action.required and action.option_strings
        for arg in (action.option_strings[0], "x")
    ]


def test_train_py_takes_the_flag():
    parser = config_parser(PretrainConfig)
    args = parser.parse_args(["--checkpoint-activations"])
    assert dataclass_from_args(PretrainConfig, args).checkpoint_activations is True


def test_pretraining_with_checkpointing_has_the_same_losses(corpus_dir, tmp_path, block_calls):  # noqa: F811
    sizes = {**TINY, "depth": 2}
    common = dict(data_dir=str(corpus_dir), num_steps=3, eval_every=3, save_every=3, **sizes)
    plain = pretrain(PretrainConfig(out_dir=str(tmp_path / "a"), **common))
    plain_calls = len(block_calls)
    block_calls.clear()
    recomputed = pretrain(
        PretrainConfig(out_dir=str(tmp_path / "b"), checkpoint_activations=True, **common)
    )
    # one recomputation per block per optimizer step, nothing else changes
    assert len(block_calls) - plain_calls == 2 * 3
    for a, b in zip(plain.history, recomputed.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert recomputed.valid_loss == pytest.approx(plain.valid_loss, abs=1e-6)


def test_sft_with_checkpointing_has_the_same_losses(tmp_path, block_calls):
    base, data = make_base(tmp_path / "base"), toy_sft(tmp_path / "sft.jsonl")
    common = dict(base=str(base), data=str(data), max_len=64, batch_size=4, max_steps=2)
    plain = train_sft(SFTConfig(out_dir=str(tmp_path / "a"), **common))
    plain_calls = len(block_calls)
    block_calls.clear()
    recomputed = train_sft(
        SFTConfig(out_dir=str(tmp_path / "b"), checkpoint_activations=True, **common)
    )
    assert len(block_calls) - plain_calls == 1 * 2  # the tiny base has one block; 2 steps
    for a, b in zip(plain.history, recomputed.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
