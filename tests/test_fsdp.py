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
        # a shared-prefix forward (each block called twice) and its backward through the shards
        parity = record["shared_prefix"]
        sharded, twin = parity["sharded"], parity["twin"]
        close = dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(sharded["logits"]), torch.tensor(twin["logits"]))
        assert sharded["grads"].keys() == twin["grads"].keys()
        for key, grad in twin["grads"].items():
            assert any(abs(x) > 0 for x in torch.tensor(grad).flatten().tolist()), key
            torch.testing.assert_close(
                torch.tensor(sharded["grads"][key]), torch.tensor(grad), **close
            )
    # both ranks sampled the same tokens (they run the same steps together)
    assert ranks[0]["samples"] == ranks[1]["samples"]
    # the LoRA scope changes what is sampled, so the scope check above has teeth
    assert ranks[0]["samples"]["twin/sft/top_k"] != ranks[0]["samples"]["twin/None/top_k"]


PRETRAIN = [
    "--data-dir",
    str(REPO / "data"),
    "--num-steps",
    "4",
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--dim-head",
    "16",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--val-batches",
    "1",
    "--generate-every",
    "4",
    "--generate-length",
    "8",
    "--log-every",
    "1",
    "--eval-every",
    "2",
    "--save-every",
    "2",
    "--no-progress",
]


def _run(root, name, processes, *extra):
    out = root / name
    result = launch(
        [str(REPO / "train.py"), *PRETRAIN, "--out-dir", str(out), *extra], processes, cwd=root
    )
    folder = out / "step-0000004"
    state = json.loads((folder / "trainer_state.json").read_text())
    return out, result, state["history"], load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """4 steps of pretraining on 1 plain process and on 2 sharded ones (checkpoints at 2, 4)."""
    root = tmp_path_factory.mktemp("pretrain")
    return root, _run(root, "one", 1), _run(root, "sharded", 2, "--fsdp")


def test_pretraining_sharded_matches_one_process(pretrained):
    _, (_, _, history_1, weights_1), (_, result, history_2, weights_2) = pretrained
    assert "fsdp: sharded over 2 processes" in result.stderr + result.stdout
    # the same training: losses, validation and final weights of one unsharded process
    assert [r["step"] for r in history_2] == [1, 2, 3, 4]
    for key in ("loss", "valid_loss"):
        got = [r[key] for r in history_2 if key in r]
        assert got == pytest.approx([r[key] for r in history_1 if key in r], abs=1e-5), key
    assert set(weights_2) == set(weights_1)
    for name, tensor in weights_1.items():
        torch.testing.assert_close(weights_2[name], tensor, atol=1e-6, rtol=1e-5)


def test_sharded_checkpoint_is_full_written_once_and_loads_in_one_plain_process(pretrained):
    root, _, (out, *_) = pretrained
    # written once: the step folders and their pointer, no staging leftovers (and the curves)
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["history.jsonl", "latest", "step-0000002", "step-0000004"]
    for folder in ("step-0000002", "step-0000004"):
        names = {p.name for p in (out / folder).iterdir()}
        assert {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= names
        assert not any("tmp" in n or n.startswith(".") for n in names), names
    # one plain process: an unsharded PaLM with the same logits as the one-process run's
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    sharded = PaLM.from_pretrained(out / "step-0000004" / "model.safetensors").eval()
    single = PaLM.from_pretrained(root / "one" / "step-0000004" / "model.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(sharded(tokens), single(tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "source, processes, extra",
    [("sharded", 2, ("--fsdp",)), ("sharded", 1, ()), ("one", 2, ("--fsdp",))],
    ids=["sharded-to-sharded", "sharded-to-one-process", "one-process-to-sharded"],
)
def test_resume_latest_continues_with_the_identical_next_losses(
    pretrained, source, processes, extra
):
    """From the step-2 checkpoint: weights and the full optimizer state (by name from a sharded
    run, by position from a plain one) go into shards or into one plain process alike."""
    root, (_, _, history_1, weights_1), (_, _, history_2, _) = pretrained
    resumed = root / f"resumed-{source}-{processes}"
    shutil.copytree(root / source / "step-0000002", resumed / "step-0000002")
    (resumed / "latest").write_text("step-0000002")
    _, _, history, weights = _run(root, resumed.name, processes, *extra, "--resume", "latest")
    expected = history_2 if source == "sharded" else history_1
    tolerance = 1e-6 if processes == 2 and source == "sharded" else 1e-5
    assert [r["loss"] for r in history] == pytest.approx(
        [r["loss"] for r in expected], abs=tolerance
    )
    for name, tensor in weights_1.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-5)


def _stage_runs(tmp_path, args, name):
    """Run a `palm-rlhf` stage on 1 plain process and 2 sharded ones; (history, weights) each."""
    runs = {}
    for processes, extra in ((1, []), (2, ["--fsdp"])):
        out = tmp_path / f"{name}-{processes}"
        launch(["-m", "palm_rlhf", name, *args, *extra, "--out-dir", str(out)], processes, cwd=REPO)
        folder = out / (out / "latest").read_text()
        state = json.loads((folder / "trainer_state.json").read_text())
        runs[processes] = (state["history"], load_file(str(folder / "model.safetensors")))
    return runs


def _assert_same_training(runs, keys, skip=(), loose=()):
    """Losses to 1e-5, weights to atol 1e-6 / rtol 1e-5; names starting with `loose` to 1e-5."""
    (history_1, weights_1), (history_2, weights_2) = runs[1], runs[2]
    for key in keys:
        got = [r[key] for r in history_2 if key in r]
        want = [r[key] for r in history_1 if key in r]
        assert len(want) >= 2 and got == pytest.approx(want, abs=1e-5), key
    assert set(weights_2) == set(weights_1)
    for name, tensor in weights_1.items():
        if name not in skip:
            atol = 1e-5 if name.startswith(loose) else 1e-6
            torch.testing.assert_close(
                weights_2[name], tensor, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_lora_sft_sharded_matches_one_process(tmp_path):
    """LoRA on frozen, sharded base weights; the final checkpoint folds the scope into the
    gathered copy (merge under sharding) and must equal the one-process merged weights."""
    from tests.finetune_helpers import FIXTURES, make_base

    base = make_base(tmp_path / "base", depth=2)
    data = str(FIXTURES / "sft.jsonl")
    args = [
        "--base",
        str(base),
        "--data",
        data,
        "--valid-data",
        data,
        "--use-lora",
        "--lora-r",
        "4",
        "--max-len",
        "64",
        "--batch-size",
        "4",
        "--epochs",
        "8",
        "--max-steps",
        "3",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "1",
        "--save-every",
        "3",
        "--no-progress",
    ]
    runs = _stage_runs(tmp_path, args, "sft")
    _assert_same_training(runs, ("loss", "valid_loss"))
    assert not any(k.startswith("finetune_modules.") for k in runs[2][1])  # merged


def test_lora_reward_training_sharded_matches_one_process(tmp_path):
    """A LoRA scope + head on a shared PaLM, sharded; dropout off (each process would draw its
    own masks). The head's bias is blind to a ranking loss (see test_multiprocess). LoRA's A
    matrices get an exactly zero gradient at step 1 (B = 0), so from step 2 Adam divides
    rounding-sized gradient differences by their own size: two data-parallel processes WITHOUT
    sharding land on the very same 2.7e-6 offset from one process as sharded ones (measured;
    up to ~3e-6 across runs), hence atol 1e-5 for the adapters, 1e-6 for everything else."""
    data = REPO / "tests" / "fixtures" / "comparisons.jsonl"
    args = [
        "--data",
        str(data),
        "--valid-data",
        str(data),
        "--num-train",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--max-len",
        "64",
        "--dropout",
        "0",
        "--dim",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--use-lora",
        "--no-progress",
        "--log-every",
        "1",
        "--save-every",
        "3",
    ]
    runs = _stage_runs(tmp_path, args, "reward")
    _assert_same_training(runs, ("loss",), skip=("head.bias",), loose=("lora.",))
    history_1, history_2 = runs[1][0], runs[2][0]
    assert history_2[-1]["valid_accuracy"] == history_1[-1]["valid_accuracy"]
    assert history_2[-1]["valid_loss"] == pytest.approx(history_1[-1]["valid_loss"], abs=1e-5)
    assert any(k.startswith("lora.") for k in runs[2][1])  # adapters + head only


def test_gpu_route_plugin_is_fsdp2_per_parallel_block_with_full_state_dicts():
    """What GPUs get (not run here): Accelerate's FSDP2 plugin, built the same on any host."""
    from palm_rlhf.train.sharding import fsdp_plugin

    plugin = fsdp_plugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["ParallelBlock"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_every_stage_has_the_fsdp_option():
    from palm_rlhf.rl.ppo.config import PPOConfig
    from palm_rlhf.train.pretrain import PretrainConfig
    from palm_rlhf.train.reward import RewardTrainConfig
    from palm_rlhf.train.sft import SFTConfig

    for config in (PretrainConfig, RewardTrainConfig, SFTConfig, PPOConfig):
        assert config.__dataclass_fields__["fsdp"].default is False, config
