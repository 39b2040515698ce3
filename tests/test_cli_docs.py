"""docs/cli.md runs as written, under the convention every page follows:

the ```bash blocks of a page run in document order, interleaved with its ```python blocks (which
share one namespace per page); each bash block is its own `bash -euo pipefail` process (no
variable or `cd` carries over); all of them in one fresh temporary folder per page holding
copies of the repository's `examples/`, `data/` and `train.py`, with `palm-rlhf` on PATH.
Blocks fenced ```text or ```console are shown, not run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUN = ("bash", "python")


def runnable_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) of each ```bash / ```python block, in document order."""
    return [(lang, code) for lang, code in FENCE.findall(markdown) if lang in RUN]


def page_folder(root: Path) -> Path:
    """A fresh folder with the copies a page runs against, and a `palm-rlhf` of this checkout."""
    for name in ("examples", "data"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "train.py", root / "train.py")
    bin_dir = root.parent / f"{root.name}-bin"
    bin_dir.mkdir()
    command = bin_dir / "palm-rlhf"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m palm_rlhf "$@"\n')
    command.chmod(0o755)
    return bin_dir


def run_page(page: Path, root: Path, monkeypatch) -> None:
    bin_dir = page_folder(root)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    monkeypatch.chdir(root)
    namespace: dict = {"__name__": "__main__"}
    for index, (lang, code) in enumerate(runnable_blocks(page.read_text())):
        where = f"{page.name} block {index + 1} ({lang})"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{where} failed:\n{code}\n{done.stdout}\n{done.stderr}"


def test_the_block_reader_follows_the_convention():
    page = (
        "a\n```bash\nx 1\n```\n```text\nnot run\n```\n```python\ny = 2\n```\n```console\n$ z\n```\n"
    )
    assert runnable_blocks(page) == [("bash", "x 1\n"), ("python", "y = 2\n")]


def test_cli_page_runs_as_written(tmp_path, monkeypatch):
    run_page(REPO / "docs" / "cli.md", tmp_path / "page", monkeypatch)
    root = tmp_path / "page"
    for stage in ("sft", "reward", "reward-ratings", "ppo/final", "grpo/final", "dpo", "coh"):
        assert (root / "runs" / stage).is_dir(), stage
    # the example data teaches even these tiny models a little (a chance level is 0.5 / ln 2)
    history = {
        stage: [json.loads(line) for line in (root / "runs" / stage / "history.jsonl").open()]
        for stage in ("sft", "reward", "dpo")
    }
    assert history["sft"][-1]["loss"] < history["sft"][0]["loss"] - 0.2
    assert [r["valid_accuracy"] for r in history["reward"] if "valid_accuracy" in r][-1] >= 0.8
    assert history["dpo"][-1]["loss"] < 0.5


@pytest.mark.parametrize("name", ["sft", "comparisons", "ratings", "prompts"])
def test_every_example_file_reads_and_every_stage_command_names_one(name):
    from palm_rlhf.data import records

    read = {
        "sft": records.read_sft,
        "comparisons": records.read_comparisons,
        "ratings": lambda p: records.read_ratings(p, num_bins=5),
        "prompts": records.read_prompts,
    }[name]
    path = REPO / "examples" / "data" / f"{name}.jsonl"
    assert 24 <= len(read(path)) <= 100  # a few dozen records
    assert f"examples/data/{name}.jsonl" in (REPO / "docs" / "cli.md").read_text()
