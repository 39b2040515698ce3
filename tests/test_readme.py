"""Every ```python block of README.md runs, in order, in one namespace, at tiny sizes.

The README is the front door: a snippet that fails there fails for every new user. Blocks run
in a temporary working directory (so `palm.save("palm.safetensors")` and friends land there,
not in the repository), after a tiny `checkpoints/pretrain` run folder has been written by the
library's own pretraining loop for the blocks that load one. Sizes shrink through the
substitutions below: the README keeps its illustrative numbers, the test runs in seconds.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from palm_rlhf.train.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# illustrative sizes -> tiny ones; each pattern applies to every block
SUBSTITUTIONS = [
    (r"\bdim=\d+", "dim=32"),
    (r"\bdepth=\d+", "depth=1"),
    (r"\bdim_head=\d+", "dim_head=16"),
    (r"\bheads=\d+", "heads=2"),
    (r"\(1, 1024\)", "(1, 32)"),
    (r"\.generate\(2048\b", ".generate(48"),
    (r"\bnum_episodes=\d+", "num_episodes=4"),
    (r"\bmax_timesteps=\d+", "max_timesteps=4"),
    (r"\bupdate_timesteps=\d+", "update_timesteps=4"),
    (r"\bmax_seq_len=\d+", "max_seq_len=24"),
    (r"\bnum_rollouts=\d+", "num_rollouts=8"),
    (r"\brollouts_per_update=\d+", "rollouts_per_update=4"),
    (r"\bmax_response_tokens=\d+", "max_response_tokens=4"),
    (r"\bnum_samples=\d+", "num_samples=3"),
]


def your_data(namespace: dict) -> dict:
    """The reader's own data that snippets refer to without building it (a block that defines
    one of these names itself wins): prompt/response masks and labels for the `seq` of the
    usage block, and a few prompts' token ids."""
    seq = namespace.get("seq", torch.randint(1, 256, (1, 32)))
    prompt_mask = torch.zeros_like(seq, dtype=torch.bool)
    prompt_mask[:, : seq.shape[1] // 2] = True
    return {
        "prompt_mask": prompt_mask,
        # a rating valid whether labels are ratings 1..K or class indices 0..K-1 (K = 5)
        "ratings": torch.full((seq.shape[0],), 2),
        "prompts": [torch.randint(1, 256, (n,)) for n in (6, 9, 12)],
    }


def readme_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def shrink(code: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def write_tiny_pretrain_run(corpus: bytes) -> None:
    """checkpoints/pretrain/{latest, step-N/} in the cwd, as `python train.py` writes them."""
    Path("data").mkdir()
    Path("data/corpus.txt.gz").write_bytes(gzip.compress(corpus))
    pretrain(
        PretrainConfig(
            data_dir="data",
            out_dir="checkpoints/pretrain",
            dim=32,
            depth=1,
            heads=2,
            dim_head=16,
            seq_len=256,
            batch_size=2,
            num_steps=2,
            warmup_steps=1,
            eval_every=2,
            val_batches=1,
            generate_every=0,
            save_every=2,
            progress=False,
        )
    )


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 3


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    corpus = gzip.decompress((REPO / "data" / "corpus.txt.gz").read_bytes())[:40_000]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    write_tiny_pretrain_run(corpus)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(readme_blocks()):
        for name, value in your_data(namespace).items():
            namespace.setdefault(name, value)
        code = shrink(block)
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # name the block, show what ran
            pytest.fail(f"README python block {index + 1} failed: {error!r}\n\n{code}")
    if "RLHFTrainer" in namespace and "trainer" in namespace:
        assert namespace["trainer"].history  # the PPO block trained for real
    # files the snippets write land in the temporary cwd, not in the repository
    written = re.findall(r'save\("([^"]+)"\)', "".join(readme_blocks()))
    assert all((tmp_path / name).exists() for name in written)
