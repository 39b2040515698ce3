"""Two CPU processes under Accelerate (gloo) give the same training as one process with the
same global batch: same losses, same final weights (float32 tolerance)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import launch

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_two_processes_match_one(tmp_path):
    args = [
        "--data-dir",
        str(REPO / "data"),
        "--num-steps",
        "4",
        "--dim",
        "32",
        "--depth",
        "1",
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
        "0",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--save-every",
        "4",
    ]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        result = launch([str(REPO / "train.py"), *args, "--out-dir", str(out)], n, cwd=tmp_path)
        assert f"{n} process(es)" in result.stderr + result.stdout
        state = json.loads((out / "step-0000004" / "trainer_state.json").read_text())
        runs[n] = (
            [r["loss"] for r in state["history"]],
            load_file(str(out / "step-0000004" / "model.safetensors")),
        )
    (losses_1, weights_1), (losses_2, weights_2) = runs[1], runs[2]
    assert losses_1 == pytest.approx(losses_2, abs=1e-5)
    for name, tensor in weights_1.items():
        torch.testing.assert_close(weights_2[name], tensor, atol=1e-6, rtol=1e-5)


def test_reward_training_two_processes_match_one(tmp_path):
    """Dropout is off: with it, each process would draw its own masks for its half."""
    data = Path(__file__).parent / "fixtures" / "comparisons.jsonl"
    args = [
        "-m",
        "palm_rlhf",
        "reward",
        "--data",
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
        "1",
        "--heads",
        "2",
        "--no-progress",
        "--log-every",
        "1",
        "--save-every",
        "3",
    ]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        launch([*args, "--out-dir", str(out)], n, cwd=REPO)
        folder = out / (out / "latest").read_text()
        state = json.loads((folder / "trainer_state.json").read_text())
        runs[n] = (
            [r["loss"] for r in state["history"] if "loss" in r],
            load_file(str(folder / "model.safetensors")),
        )
    (losses_1, weights_1), (losses_2, weights_2) = runs[1], runs[2]
    assert len(losses_1) == 3 and losses_1 == pytest.approx(losses_2, abs=1e-5)
    # a ranking loss is blind to the head's bias (it cancels in every score difference), so the
    # bias gradient is rounding noise that Adam scales up to lr-sized steps: not compared
    assert set(weights_1) == set(weights_2) and "head.bias" in weights_1
    for name, tensor in weights_1.items():
        if name != "head.bias":
            torch.testing.assert_close(weights_2[name], tensor, atol=1e-6, rtol=1e-5)
