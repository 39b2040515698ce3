"""Faults a long run meets: a kill in the middle of a checkpoint write, a NaN loss, a
checkpoint folder from a stranger holding a malicious pickle."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from palm_rlhf.checkpoint import CheckpointError, latest_checkpoint
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train.checkpointing import load_training_checkpoint, save_training_checkpoint
from palm_rlhf.train.pretrain import PretrainConfig, pretrain
from palm_rlhf.train.step import NonFiniteLossError
from tests.helpers import tiny_palm

REPO = Path(__file__).resolve().parents[1]

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from palm_rlhf.train.checkpointing import save_training_checkpoint
    from tests.helpers import tiny_palm

    root = Path(sys.argv[1])
    model = tiny_palm()
    save_training_checkpoint(root, 1, model)  # a complete first checkpoint

    def slow(path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
            handle.flush()
            print("WRITING", flush=True)
            time.sleep(60)

    save_training_checkpoint(root, 2, tiny_palm(seed=1), extra_files={{"big.bin": slow}})
    """
)


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER.format(repo=str(REPO)))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest == tmp_path / "ckpt" / "step-0000001"  # the half-written step 2 is never "latest"
    assert not (tmp_path / "ckpt" / "step-0000002").exists()
    model = tiny_palm(seed=5)
    load_training_checkpoint(latest, model)
    seq = torch.randint(0, 32, (1, 6))
    torch.testing.assert_close(model(seq), tiny_palm()(seq), atol=0, rtol=0)

    # the next save completes and clears the leftover staging folder
    save_training_checkpoint(tmp_path / "ckpt", 3, tiny_palm())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "latest",
        "step-0000001",
        "step-0000003",
    ]


def test_planted_pickle_in_a_checkpoint_folder_never_runs(tmp_path):
    model = tiny_palm()
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_training_checkpoint(tmp_path, 1, model, optimizer)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Payload()}, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_training_checkpoint(folder, tiny_palm(), optimizer)
    assert not marker.exists()


def _tiny_pretrain(tmp_path, **overrides):
    config = dict(
        data_dir=str(REPO / "data"),
        out_dir=str(tmp_path / "run"),
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
        seq_len=32,
        batch_size=2,
        val_batches=1,
        generate_every=0,
        log_every=1,
        num_steps=4,
        save_every=2,
        eval_every=2,
    )
    config.update(overrides)
    return PretrainConfig(**config)


def nan_at_step(monkeypatch, bad_call: int):
    """Make the model's loss NaN on its `bad_call`-th training forward."""
    calls = {"n": 0}
    original = PaLM.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("return_loss") and self.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                return out * float("nan")
        return out

    monkeypatch.setattr(PaLM, "forward", forward)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, bad_call=3)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        pretrain(_tiny_pretrain(tmp_path))
    folder = latest_checkpoint(tmp_path / "run")
    assert folder.name == "step-0000002"
    restored = PaLM.from_pretrained(folder)
    assert all(torch.isfinite(p).all() for p in restored.parameters())


def test_nan_loss_skip_policy_drops_the_step_and_goes_on(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, bad_call=2)
    result = pretrain(_tiny_pretrain(tmp_path, nan_policy="skip"))
    assert (
        len([r for r in result.history if r["loss"] != r["loss"]]) == 1
    )  # the one NaN step is logged
    assert result.valid_loss == result.valid_loss  # and the weights stayed finite
    model = PaLM.from_pretrained(latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
