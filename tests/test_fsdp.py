"""Sharded training (FSDP2, `--fsdp`) on 2 gloo CPU processes: every parameter really split in
two, the same training as one unsharded process with the same global batch (losses and final
weights, float32), full checkpoints written once and loadable by one plain process, exact
resume under sharding, and sampling through the shards equal to the unsharded model's."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from palm_rlhf.model.palm import PaLM
from tests.helpers import launch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(
        dist.is_available() and not dist.is_gloo_available(), reason="no gloo backend"
    ),
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo parity test"),
]


def test_every_parameter_is_sharded_and_samples_like_the_unsharded_model(tmp_path):
    launch([str(REPO / "tests" / "fsdp_worker.py"), str(tmp_path)], 2, cwd=REPO)
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1)]
    for record in ranks:
        assert record["world"] == 2 and record["types"] == ["DTensor"]
        # base weights and LoRA adapters alike: dim 0 split in two (even sizes here), so each
        # rank holds exactly half of every parameter
        assert any(name.startswith("finetune_modules.sft.") for name in record["shapes"])
        for name, (full, local) in record["shapes"].items():
            assert full[0] % 2 == 0, name
            assert local == [full[0] // 2, *full[1:]], name
        samples = record["samples"]
        for scope in ("None", "sft"):
            for kind in ("greedy", "top_k"):
                assert samples[f"sharded/{scope}/{kind}"] == samples[f"twin/{scope}/{kind}"]
        assert samples["sharded/None/uncached"] == [r[:6] for r in samples["twin/None/greedy"]]
    # both ranks sampled the same tokens (they run the same steps together)
    assert ranks[0]["samples"] == ranks[1]["samples"]
    # the LoRA scope changes what is sampled, so the scope check above has teeth
    assert ranks[0]["samples"]["twin/sft/top_k"] != ranks[0]["samples"]["twin/None/top_k"]


PRETRAIN = ["--data-dir", str(REPO / "data"), "--num-steps", "4", "--dim", "32", "--depth", "2",
            "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--batch-size", "4",
            "--val-batches", "1", "--generate-every", "4", "--generate-length", "8",
            "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--no-progress"]  # fmt: skip


def _run(tmp_path, name, processes, *extra):
    out = tmp_path / name
    result = launch([str(REPO / "train.py"), *PRETRAIN, "--out-dir", str(out), *extra], processes,
                    cwd=tmp_path)  # fmt: skip
    folder = out / "step-0000004"
    state = json.loads((folder / "trainer_state.json").read_text())
    return out, result, state["history"], load_file(str(folder / "model.safetensors"))


def test_pretraining_sharded_matches_one_process_checkpoints_and_resumes(tmp_path):
    _, _, history_1, weights_1 = _run(tmp_path, "one", 1)
    out, result, history_2, weights_2 = _run(tmp_path, "sharded", 2, "--fsdp")
    assert "fsdp: sharded over 2 processes" in result.stderr + result.stdout

    # the same training: losses, validation and final weights of one unsharded process
    assert [r["step"] for r in history_2] == [1, 2, 3, 4]
    for key in ("loss", "valid_loss"):
        got = [r[key] for r in history_2 if key in r]
        assert got == pytest.approx([r[key] for r in history_1 if key in r], abs=1e-5), key
    assert set(weights_2) == set(weights_1)
    for name, tensor in weights_1.items():
        torch.testing.assert_close(weights_2[name], tensor, atol=1e-6, rtol=1e-5)

    # the checkpoint is full, written once (no temporary left behind), and one plain process
    # loads it into an unsharded PaLM with the same logits as the one-process run's
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    for folder in ("step-0000002", "step-0000004"):
        names = {p.name for p in (out / folder).iterdir()}
        assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= names
        assert not any("tmp" in n or n.startswith(".") for n in names), names
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    sharded = PaLM.from_pretrained(out / "step-0000004" / "model.safetensors").eval()
    single = PaLM.from_pretrained(tmp_path / "one" / "step-0000004" / "model.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(sharded(tokens), single(tokens), atol=1e-5, rtol=1e-4)

    # --resume latest under sharding (weights and the full optimizer state loaded into the
    # shards) continues with the identical next losses
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "step-0000002", resumed / "step-0000002")
    (resumed / "latest").write_text("step-0000002")
    _, _, history_3, weights_3 = _run(tmp_path, "resumed", 2, "--fsdp", "--resume", "latest")
    assert [r["loss"] for r in history_3] == pytest.approx([r["loss"] for r in history_2], abs=1e-6)
    for name, tensor in weights_2.items():
        torch.testing.assert_close(weights_3[name], tensor, atol=1e-6, rtol=1e-5)
