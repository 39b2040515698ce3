"""The one training loop (train/loop.py), the one optimiser builder (train/optim.py), the run
options declared once (train/run_options.py) and the command that continues a run
(train/continuing.py), each checked against values worked out by hand."""

import shlex
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import nn

from palm_rlhf.checkpoint import load_state
from palm_rlhf.options import config_parser, dataclass_from_args
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.stage import PPOStageConfig
from palm_rlhf.rl.update import make_optimizers
from palm_rlhf.train.accelerator import make_accelerator
from palm_rlhf.train.checkpointing import Resumed
from palm_rlhf.train.continuing import continue_command
from palm_rlhf.train.loop import LoopParts, LossTerms, train_loop
from palm_rlhf.train.optim import make_optimizer
from palm_rlhf.train.pretrain import PretrainConfig
from palm_rlhf.train.reward import RewardTrainConfig, train_reward_model
from palm_rlhf.train.run_options import LoopOptions
from palm_rlhf.train.sft import SFTConfig
from tests.helpers import tiny_palm

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test's Accelerator has its own accumulation steps."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- the loop


def toy_run(tmp_path, num_steps=3, resumed=None, **options):
    """w x with w = 1, SGD at lr 0.05, two micro-batches a step whose mean losses are
    (w * 1)^2 and (w * 3)^2. Returns (result, w, evaluations, checkpoints)."""
    config = LoopOptions(
        out_dir=str(tmp_path), progress=False, max_norm=None, **{"grad_accum": 2, **options}
    )
    accelerator = make_accelerator(cpu=True, gradient_accumulation_steps=config.grad_accum)
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    evaluations, checkpoints = [], []

    def evaluate():
        evaluations.append(1)
        return {"valid_w": float(model.weight.detach())}

    def checkpoint(step, finished):
        checkpoints.append((step, finished))
        return tmp_path / f"step-{step}"

    parts = LoopParts(
        "toy",
        num_steps,
        micro_batches=lambda step: [torch.tensor([[1.0]]), torch.tensor([[3.0]])],
        loss=lambda x: LossTerms(model(x).pow(2).mean(), 1.0),
        evaluate=evaluate,
        checkpoint=checkpoint,
    )
    resumed = resumed or Resumed(0, [], None, None)
    result = train_loop(accelerator, model, optimizer, scheduler, config, parts, resumed)
    return result, float(model.weight.detach()), evaluations, checkpoints


def test_a_step_is_the_mean_over_its_micro_batches(tmp_path):
    # step 1: losses 1 and 9 -> recorded 5; gradient mean(2w, 18w) = 10 -> w = 1 - 0.05 * 10
    # step 2: w = 0.5, losses 0.25 and 2.25 -> 1.25; w = 0.25; step 3: 0.3125; w = 0.125
    result, w, _, _ = toy_run(tmp_path, log_every=1)
    assert [r["loss"] for r in result.history] == [5.0, 1.25, 0.3125]
    assert w == 0.125 and result.train == {"loss": 0.3125} and result.step == 3


def test_zero_intervals_mean_at_the_end_only_and_the_last_step_is_always_logged(tmp_path):
    result, _, evaluations, checkpoints = toy_run(
        tmp_path, eval_every=0, save_every=0, log_every=10
    )
    assert [r["step"] for r in result.history] == [3]  # off the log interval, but the last
    assert evaluations == [1] and checkpoints == [(3, True)]
    assert result.valid == {"valid_w": 0.125} and result.checkpoint == tmp_path / "step-3"


def test_out_of_time_evaluates_saves_a_resumable_checkpoint_and_stops(tmp_path, capsys):
    result, _, evaluations, checkpoints = toy_run(tmp_path, max_minutes=1e-9, eval_every=0)
    assert result.step == 1 and evaluations == [1]
    assert checkpoints == [(1, False)]  # not the finished run: a LoRA scope stays unmerged
    assert "--resume latest" in capsys.readouterr().out


def test_resuming_a_finished_run_trains_nothing_and_returns_its_last_step(tmp_path, capsys):
    history = [{"step": 3, "loss": 0.5, "lr": 0.05, "valid_w": 0.25}]
    resumed = Resumed(3, history, {"step": 3}, tmp_path / "step-3")
    result, w, evaluations, checkpoints = toy_run(tmp_path, resumed=resumed)
    assert (w, evaluations, checkpoints) == (1.0, [], [])
    assert result.finished_before and result.checkpoint == tmp_path / "step-3"
    assert result.train == {"loss": 0.5} and result.valid == {"valid_w": 0.25}
    out = capsys.readouterr().out
    assert "already finished at step 3" in out and "nan" not in out


# ----------------------------------------------------------------------------- the optimiser


def _groups(optimizer):
    return [
        ({tuple(p.shape) for p in group["params"]}, group["weight_decay"], group["betas"])
        for group in optimizer.param_groups
    ]


def test_the_builder_decays_matrices_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))  # weight (4, 3); biases, gain (4,)
    model[1].bias.requires_grad_(False)  # frozen: not in the optimizer at all
    optimizer = make_optimizer(model, 1e-3, 0.1)
    assert _groups(optimizer) == [({(4, 3)}, 0.1, (0.9, 0.95)), ({(4,)}, 0.0, (0.9, 0.95))]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3


def test_ppo_networks_use_the_builder_with_the_reference_betas():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))

        def trainable_parameters(self):
            return [self.weight, self.bias]

    config = PPOConfig(actor_wd=0.1, critic_wd=0.2, critic_lr=3e-4)
    actor, critic = make_optimizers({"actor": Net(), "critic": Net()}, config)
    assert _groups(actor) == [({(2, 2)}, 0.1, (0.9, 0.999)), ({(2,)}, 0.0, (0.9, 0.999))]
    assert _groups(critic)[0][1] == 0.2 and critic.param_groups[0]["lr"] == 3e-4


def test_reward_training_no_longer_decays_vectors_and_uses_the_shared_betas(tmp_path):
    """Its own AdamW once decayed every parameter with betas (0.9, 0.999); the checkpointed
    optimizer state says which groups and betas it ran with."""
    config = RewardTrainConfig(
        data=str(FIXTURES / "comparisons.jsonl"),
        num_train=2,
        batch_size=2,
        max_steps=1,
        max_len=64,
        weight_decay=0.1,
        out_dir=str(tmp_path),
        progress=False,
    )
    result = train_reward_model(config)
    groups = load_state(result.checkpoint / "optimizer.pt")["optimizer"]["param_groups"]
    trainable = result.model.trainable_parameters()
    matrices = sum(p.dim() >= 2 for p in trainable)
    assert [(g["weight_decay"], tuple(g["betas"]), len(g["params"])) for g in groups] == [
        (0.1, (0.9, 0.95), matrices),
        (0.0, (0.9, 0.95), len(trainable) - matrices),
    ]
    assert len(trainable) > matrices  # the head's bias is a vector: the split is real


def test_a_tiny_palm_puts_norm_gains_in_the_undecayed_group():
    palm = tiny_palm()
    optimizer = make_optimizer(palm, 1e-3, 0.1)
    decayed, undecayed = (group["params"] for group in optimizer.param_groups)
    assert decayed and undecayed
    assert all(p.dim() >= 2 for p in decayed) and all(p.dim() < 2 for p in undecayed)


# ----------------------------------------------------------------------------- options


def test_run_options_are_declared_once_with_stage_defaults():
    assert (PretrainConfig().lr, SFTConfig.__dataclass_fields__["lr"].default) == (2e-3, 1e-4)
    help_text = {
        cls.__dataclass_fields__["lr"].metadata["help"]
        for cls in (PretrainConfig, SFTConfig, RewardTrainConfig, LoopOptions)
    }
    assert help_text == {"peak learning rate (AdamW)"}
    with pytest.raises(ValueError, match="grad_accum must be at least 1"):
        LoopOptions(grad_accum=0)


@pytest.mark.parametrize(
    "cls, values",
    [
        (
            PretrainConfig,
            dict(dim=32, out_dir="runs/my run", progress=False, max_norm=None, seed=3),
        ),
        (
            SFTConfig,
            dict(base="b", data="d.jsonl", use_lora=True, lora_targets=("q", "v"), lr=3e-4),
        ),
        (
            PPOStageConfig,
            dict(policy="p", reward="r", prompts="x.jsonl", betas=(0.9, 0.99), actor_lora=False),
        ),
    ],
)
def test_the_continue_command_parses_back_to_the_same_run(cls, values):
    config = cls(**values)
    words = shlex.split(continue_command(config, "stage"))
    assert words[:2] == ["palm-rlhf", "stage"]  # under pytest: not a script of its own
    parser = config_parser(cls)
    again = dataclass_from_args(cls, parser.parse_args(words[2:]))
    assert again == cls(**{**values, "resume": "latest"})
    assert "--out-dir" in words  # always, so the command can never resume another run
