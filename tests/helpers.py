"""Small shared builders for the tests."""

from pathlib import Path

import torch

from palm_rlhf.model.palm import PaLM


def tiny_palm(**overrides) -> PaLM:
    kwargs = dict(num_tokens=32, dim=32, depth=2, heads=4, dim_head=8, ff_mult=2)
    kwargs.update(overrides)
    torch.manual_seed(kwargs.pop("seed", 0))
    return PaLM(**kwargs)


def randomize_lora(model: PaLM, scope: str, std: float = 0.1) -> None:
    """Give a scope non-zero B matrices so it changes the model's outputs."""
    with torch.no_grad():
        for param in model.finetune_parameters(scope):
            param.normal_(0, std)


def on_cpu(test):
    """Run `test` as on a machine without a GPU: for a parity test whose one-process reference
    runs in the test's own process, beside `launch`ed CPU workers it is compared with."""
    import functools
    from unittest import mock

    @functools.wraps(test)
    def run(*args, **kwargs):
        from accelerate.state import AcceleratorState

        # Accelerate keeps its device in process-wide state: start and end without it
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            with mock.patch("torch.cuda.is_available", return_value=False):
                return test(*args, **kwargs)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    return run


def launch(args: list[str], num_processes: int = 2, cwd=None, timeout: int = 300):
    """Run `python ARGS` in `num_processes` processes with `accelerate launch --multi_gpu`,
    as gloo CPU processes (our Accelerator goes to the CPU by itself). GPUs are hidden from
    them: a one-GPU machine cannot give each rank its own (NCCL), and a parity test compares
    runs that must share one device type, so on a CUDA machine they run as on a CPU-only one.
    One process runs plain python. A clash on the rendezvous port is retried."""
    import os
    import socket
    import subprocess
    import sys

    # the repository root on the path, so workers can import `tests.helpers` (and this
    # checkout's palm_rlhf) whatever the caller's environment
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    for _ in range(3):
        if num_processes == 1:
            command = [sys.executable, *args]
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = str(sock.getsockname()[1])
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                str(num_processes),
                "--main_process_port",
                port,
                *args,
            ]
        run = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
        )
        if run.returncode == 0 or "address already in use" not in run.stderr.lower():
            break
    assert run.returncode == 0, run.stderr[-3000:]
    return run
