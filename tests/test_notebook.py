"""examples/quickstart.ipynb runs top to bottom (at tiny sizes) in a fresh Jupyter kernel.

The kernel is the installed `python3` one (ipykernel, from the `test` extra); it imports this
checkout's `palm_rlhf` (PYTHONPATH) and works in a temporary folder, so the notebook's
checkpoints and data never land in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def test_quickstart_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("PALM_RLHF_QUICKSTART_TINY", "1")
    monkeypatch.setenv("PALM_RLHF_DATA_DIR", str(REPO / "data"))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(REPO), path))))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one cell of our own at the end: which palm_rlhf did the kernel import?
    nb.cells.append(nbformat.v4.new_code_cell("import palm_rlhf; print(palm_rlhf.__file__)"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()

    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert Path(printed.strip()).resolve() == REPO / "palm_rlhf" / "__init__.py"
    images = [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images, "the history plot did not render inline"
    assert (tmp_path / "runs" / "quickstart" / "pretrain" / "latest").is_file()
    assert (tmp_path / "ratings.jsonl").is_file()
