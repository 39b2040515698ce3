"""The one executor of the documentation's code blocks: README.md and docs/*.md run as a reader
copies them. tests/test_docs.py runs every page with it; tests/test_cli_docs.py runs docs/cli.md
with it and then checks what the page trained.

The convention, one for every page:
- ```python blocks run in document order in one namespace per page;
- ```bash blocks run in that order too (interleaved with the python ones), each as its own
  `bash -euo pipefail` process: no variables or `cd` carry over from one block to the next;
- all blocks of a page run in one fresh temporary directory holding copies of the
  repository's `examples/`, `data/` and `train.py`, with `python` (this interpreter) and
  `palm-rlhf` (this checkout's command) first on PATH;
- ```text and ```console blocks are not run (a server session, a multi-GPU launch, output).

Nothing is injected and no size is substituted: a page that needs a model, a file or a name
makes it in an earlier block of the same page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = ("python", "bash")
NOT_RUN = ("text", "console")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
BASH_TIMEOUT_S = 300


class Block(NamedTuple):
    language: str
    code: str
    line: int  # where the block's code starts in its page, 1-based


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def blocks(text: str) -> list[Block]:
    return [
        Block(match.group(1).strip(), match.group(2), text.count("\n", 0, match.start()) + 2)
        for match in FENCE.finditer(text)
    ]


def workspace(root: Path) -> dict:
    """Copies of examples/, data/ and train.py in `root`, and the environment bash blocks get."""
    for name in ("examples", "data"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "train.py", root / "train.py")
    bin_dir = root.parent / f"{root.name}-bin"
    bin_dir.mkdir()
    shims = {"python": 'exec "{python}" "$@"', "palm-rlhf": 'exec "{python}" -m palm_rlhf "$@"'}
    for name, line in shims.items():
        shim = bin_dir / name
        shim.write_text("#!/bin/sh\n" + line.format(python=sys.executable) + "\n")
        shim.chmod(0o755)
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), path))),
    }


def run_block(block: Block, where: str, namespace: dict, env: dict, cwd: Path) -> None:
    if block.language == "python":
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as error:  # name the block and show it
            pytest.fail(f"{where} failed: {error!r}\n\n{block.code}")
        return
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BASH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where} ran past {BASH_TIMEOUT_S} s\n\n{block.code}")
    if done.returncode != 0:
        pytest.fail(
            f"{where} exited {done.returncode}\n\n{block.code}\n--- stdout\n"
            f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


def run_page(page: Path, cwd: Path, monkeypatch) -> None:
    """Every python and bash block of `page`, in order, in the fresh folder `cwd`."""
    cwd.mkdir(parents=True)
    env = workspace(cwd)
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(page.read_text(encoding="utf-8")):
        if block.language in RUN:
            where = f"{page_id(page)}:{block.line} ({block.language} block)"
            run_block(block, where, namespace, env, cwd)
