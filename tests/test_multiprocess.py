"""Two CPU processes under Accelerate (gloo) give the same training as one process with the
same global batch: same losses, same final weights (float32 tolerance)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script_args: list[str], num_processes: int, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu` on a machine without GPUs runs gloo CPU processes (our
    Accelerator goes to the CPU by itself); one process runs as plain python."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if num_processes == 1:
        command = [sys.executable, *script_args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *script_args]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo parity test")
def test_pretraining_two_processes_match_one(tmp_path):
    args = ["--data-dir", str(REPO / "data"), "--num-steps", "4", "--dim", "32", "--depth", "1", "--heads", "2",
            "--dim-head", "16", "--seq-len", "32", "--batch-size", "4", "--val-batches", "1", "--generate-every", "0",
            "--log-every", "1", "--validate-every", "4", "--save-every", "4"]  # fmt: skip
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        result = launch([str(REPO / "train.py"), *args, "--out-dir", str(out)], n, tmp_path)
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
