import os

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    save_checkpoint_dir,
    save_state,
    step_folder_name,
    step_folders,
)
from palm_rlhf.model.palm import PaLM
from tests.helpers import randomize_lora, tiny_palm


def test_save_load_gives_identical_logits(tmp_path):
    model = tiny_palm()
    model.add_finetune_params("actor", lora_r=2)
    randomize_lora(model, "actor")
    path = model.save(tmp_path / "palm.safetensors")
    seq = torch.randint(0, 32, (2, 9))
    restored = PaLM.from_pretrained(path)
    assert restored.config == model.config and restored.finetune_scopes == ("actor",)
    assert_close(
        restored(seq, finetune_scope="actor"), model(seq, finetune_scope="actor"), atol=0, rtol=0
    )
    other = tiny_palm(seed=1).load(path)
    assert_close(other(seq), model(seq), atol=0, rtol=0)


def test_directory_path_and_adapter_only_checkpoints(tmp_path):
    model = tiny_palm()
    model.save(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    model.add_finetune_params("reward")
    randomize_lora(model, "reward")
    adapters = model.save(tmp_path / "reward.safetensors", scopes=("reward",))
    fresh = PaLM.from_pretrained(tmp_path / "run")
    fresh.load(adapters)
    seq = torch.randint(0, 32, (1, 7))
    assert_close(
        fresh(seq, finetune_scope="reward"), model(seq, finetune_scope="reward"), atol=0, rtol=0
    )
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        PaLM.from_pretrained(adapters)


def test_truncated_file_raises_and_leaves_the_model_untouched(tmp_path):
    model = tiny_palm()
    path = model.save(tmp_path / "palm.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = tiny_palm(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        target.load(path)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_other_config_is_refused_naming_the_mismatch(tmp_path):
    path = tiny_palm().save(tmp_path / "palm.safetensors")
    with pytest.raises(CheckpointError, match="dim: checkpoint 32 vs model 48"):
        tiny_palm(dim=48).load(path)
    with pytest.raises(CheckpointError, match="num_tokens: checkpoint 32 vs model 40"):
        tiny_palm(num_tokens=40).load(path)


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    model = tiny_palm()
    path = model.save(tmp_path / "palm.safetensors")
    good = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("palm_rlhf.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_palm(seed=3).save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["palm.safetensors"]  # no temporary file left behind


def test_state_files_refuse_pickled_code(tmp_path):
    save_state(tmp_path / "ok.pt", {"step": 3, "rng": torch.get_rng_state()})
    assert load_state(tmp_path / "ok.pt")["step"] == 3

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_folders_and_latest_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint_dir(tmp_path, "step-1", {"a.json": lambda p: p.write_text("1")})
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"

    def failing(path):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint_dir(
            tmp_path, "step-2", {"a.json": lambda p: p.write_text("2"), "b": failing}
        )
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


def test_one_folder_scheme_prunes_old_names_by_number(tmp_path):
    """step-N for every stage; an older PPO run's update-N folders count in pruning by their
    number, and the folder `latest` names is never removed."""
    for name in ("update-0000001", "update-0000002", "step-0000003", "step-notanumber"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("update-0000001")  # e.g. pointing at an old folder
    assert [p.name for p in step_folders(tmp_path)] == [
        "update-0000001",
        "update-0000002",
        "step-0000003",
    ]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step-0000003",
        "step-notanumber",
        "update-0000001",
    ]
    assert step_folder_name(12) == "step-0000012"


def test_rlhf_trainer_uses_step_folders_keeps_the_last_ones_and_reads_old_names(tmp_path):
    """PPO's folders were update-N (and never pruned); they are step-N now, pruned to
    keep_last, and a run saved under the old name still loads and resumes."""
    import shutil

    from tests.toy_ppo import toy_palm, toy_trainer

    run = dict(max_response_tokens=4, rollouts_per_update=32, progress=False)
    trainer = toy_trainer(keep_last=2, minibatch_size=32)
    trainer.train(num_rollouts=96, checkpoint_every=1, checkpoint_dir=tmp_path / "new", **run)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "latest",
        "step-0000002",
        "step-0000003",
    ]
    # the same state as an old run wrote it: update-0000003 and latest naming it
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new" / "step-0000003", old / "update-0000003")
    (old / "latest").write_text("update-0000003")
    expected = trainer.train(num_rollouts=32, **run)[0]
    resumed = toy_trainer(palm=toy_palm(), keep_last=2, minibatch_size=32).load(old)
    assert resumed.updates == 3 and resumed.history == trainer.history[:3]
    got = resumed.train(num_rollouts=32, checkpoint_every=1, checkpoint_dir=old, **run)[0]
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    # the resumed run writes the new name next to the old one, which is pruned in turn
    assert sorted(p.name for p in old.iterdir()) == ["latest", "step-0000004", "update-0000003"]
