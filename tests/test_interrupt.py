"""Ctrl-C never loses work: a real `train.py` process sent SIGINT mid-run saves a checkpoint at
the step it finished, says where, exits 130 without a traceback, and `--resume latest` then
continues with exactly the losses of an uninterrupted run."""

import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palm_rlhf.checkpoint import latest_checkpoint
from palm_rlhf.options import config_parser, dataclass_from_args
from palm_rlhf.train.history import read_history
from palm_rlhf.train.pretrain import PretrainConfig, pretrain
from palm_rlhf.train.stopping import StopOnSignal, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    dim=32,
    depth=1,
    heads=2,
    dim_head=8,
    seq_len=64,
    batch_size=2,
    val_batches=1,
    generate_every=0,
    log_every=1,
    warmup_steps=2,
    eval_every=1000,
    save_every=1000,
    num_steps=150,
)


def _args(config: dict) -> list[str]:
    args = []
    for key, value in config.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


@pytest.fixture
def corpus_dir(tmp_path):
    text = gzip.decompress((REPO / "data" / "corpus.txt.gz").read_bytes())[:30_000]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "corpus.txt.gz").write_bytes(gzip.compress(text))
    return data_dir


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_the_step_and_resume_continues_exactly(corpus_dir, tmp_path):
    out = tmp_path / "run"
    # one thread, as in-process tests run: the resumed and the reference runs must agree bitwise
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--no-progress", *_args(TINY)]
        + ["--data-dir", str(corpus_dir), "--out-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    history = out / "history.jsonl"
    deadline = time.monotonic() + 120
    while not (history.is_file() and history.read_text().count("\n") >= 3):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step logged within 2 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    folder = latest_checkpoint(out)
    step = json.loads((folder / "trainer_state.json").read_text())["step"]
    assert 3 <= step < TINY["num_steps"], "the run must stop early, at the step it finished"
    assert f"checkpoint saved in {folder}" in stderr and "--resume latest" in stderr
    # the exact command that continues THIS run: `--resume latest` alone resumed the default
    # run (checkpoints/pretrain), so the printed line names the out_dir and every flag given
    command = stderr.split("continue with: ")[1].splitlines()[0]
    words = shlex.split(command)
    assert words[:2] == ["python", str(REPO / "train.py")], command
    parser = config_parser(PretrainConfig)
    given = dict(TINY, data_dir=str(corpus_dir), out_dir=str(out), progress=False)
    assert dataclass_from_args(PretrainConfig, parser.parse_args(words[2:])) == PretrainConfig(
        **given, resume="latest"
    )
    assert [r["step"] for r in read_history(out)] == list(range(1, step + 1))

    # an uninterrupted run with the same schedule, and the interrupted one resumed in-process
    config = dict(data_dir=str(corpus_dir), progress=False, **TINY)
    reference = pretrain(PretrainConfig(out_dir=str(tmp_path / "ref"), **config))
    resumed = pretrain(PretrainConfig(out_dir=str(out), resume="latest", **config))
    expected = {r["step"]: r["loss"] for r in reference.history}
    got = {r["step"]: r["loss"] for r in resumed.history}
    assert got[step + 1] == expected[step + 1]  # the very next loss, bit for bit
    assert got == expected  # and every one after it (the history carried over too)
    assert [r["step"] for r in read_history(out)] == sorted(expected)


def test_stop_on_signal_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) != before[0]
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested() == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_in_reward_training_saves_and_resumes_exactly(tmp_path, monkeypatch):
    import palm_rlhf.train.reward as reward
    from palm_rlhf.train.reward import RewardTrainConfig, train_reward_model

    fixtures = Path(__file__).parent / "fixtures"
    config = dict(
        data=str(fixtures / "comparisons.jsonl"),
        num_train=2,
        batch_size=2,
        max_steps=5,
        max_len=64,
        lr=1e-2,
        progress=False,
        log_every=1,
        warmup_steps=1,
    )
    straight = train_reward_model(RewardTrainConfig(out_dir=str(tmp_path / "a"), **config))
    calls, loss = [], reward.batch_loss

    def signalled_at_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # mid-step: the step must still finish before the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    monkeypatch.setattr(reward, "batch_loss", signalled_at_second_step)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_reward_model(RewardTrainConfig(out_dir=str(tmp_path / "b"), **config))
    assert stopped.value.step == 2 and stopped.value.exit_code == 128 + signal.SIGTERM
    command = stopped.value.command  # every stage says how to continue it, with its out_dir
    assert command.startswith("palm-rlhf reward ") and command.endswith("--resume latest")
    assert f"--out-dir {tmp_path / 'b'}" in command and "--max-steps 5" in command
    assert stopped.value.checkpoint == latest_checkpoint(tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(reward, "batch_loss", loss)
    resumed = train_reward_model(
        RewardTrainConfig(out_dir=str(tmp_path / "b"), resume="latest", **config)
    )
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert read_history(tmp_path / "b") == straight.history


def test_ctrl_c_in_sft_saves_the_step_and_resumes_exactly(tmp_path, monkeypatch):
    import palm_rlhf.train.finetune as finetune
    from palm_rlhf.train.sft import SFTConfig, train_sft
    from tests.finetune_helpers import make_base, toy_sft

    base, data = make_base(tmp_path / "base"), toy_sft(tmp_path / "sft.jsonl")
    config = dict(base=str(base), data=str(data), batch_size=4, max_steps=4, max_len=64)
    config.update(lr=1e-3, progress=False, log_every=1, save_every=100, eval_every=100)
    straight = train_sft(SFTConfig(out_dir=str(tmp_path / "a"), **config))
    calls, to_device = [], finetune._to_device

    def signalled_in_step_two(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return to_device(*args)

    monkeypatch.setattr(finetune, "_to_device", signalled_in_step_two)
    with pytest.raises(TrainingInterrupted) as stopped:
        train_sft(SFTConfig(out_dir=str(tmp_path / "b"), **config))
    assert stopped.value.step == 2 and stopped.value.exit_code == 130
    assert stopped.value.checkpoint == latest_checkpoint(tmp_path / "b")
    monkeypatch.setattr(finetune, "_to_device", to_device)
    resumed = train_sft(SFTConfig(out_dir=str(tmp_path / "b"), resume="latest", **config))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


def test_ctrl_c_in_rlhf_training_finishes_the_update_saves_and_resumes(tmp_path):
    """A SIGINT arriving mid-rollout lets the running PPO update finish, saves the trainer, and
    raises TrainingInterrupted (a KeyboardInterrupt); the saved state resumes where it stopped."""
    from tests.toy_ppo import fraction_of_target, toy_trainer

    calls = []

    def reward(seq, mask, prompt_mask):
        calls.append(1)
        if len(calls) == 3:  # during the second update's rollouts
            os.kill(os.getpid(), signal.SIGINT)
        return fraction_of_target(seq, mask, prompt_mask)

    trainer = toy_trainer(reward=reward, rollout_batch_size=32)
    run = dict(num_rollouts=6 * 64, rollouts_per_update=64, max_response_tokens=4, progress=False)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train(**run, checkpoint_dir=tmp_path / "ppo")
    assert trainer.updates == 2 and stopped.value.step == 2  # the update in flight finished
    assert stopped.value.checkpoint == latest_checkpoint(tmp_path / "ppo")
    resumed = toy_trainer().load(tmp_path / "ppo")
    assert resumed.updates == 2 and resumed.history == trainer.history
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
