"""Build the isolated virtual environment that holds TRL, the library users compare us with.

TRL (``trl``, Hugging Face) and ``transformers`` are only a point of comparison for
``bench_trl.py``: never a dependency of ``palm_rlhf``. They live in ``<root>/.trl-venv``
(git-ignored), handled exactly as ``reference_env.py`` handles the reference:

1. the venv is created with ``--system-site-packages``, so it reuses the installed torch;
2. TRL and transformers are installed under a constraints file that pins torch to the version
   already installed, so pip either reuses it or fails — it cannot download another;
3. afterwards the venv must import the pinned TRL together with the system torch, else the
   setup is rejected.

Nothing is fetched from the Hugging Face hub at benchmark time: the models are built from
configs and the tokenizer is built locally (``bench_trl.py``), and the worker runs with
``HF_HUB_OFFLINE=1``.

Run ``python benchmarks/trl_env.py`` to build it by hand; it is idempotent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from reference_env import _pip, ensure_torch_pinned_venv
except ImportError:  # imported as benchmarks.trl_env
    from benchmarks.reference_env import _pip, ensure_torch_pinned_venv

TRL_VERSION = "1.16.0"  # the newest 1.x when this harness was written (`pip index versions trl`)
TRANSFORMERS_VERSION = "5.24.0"  # 5.25 needs a `kernels` release not on the index here
VENV_DIRNAME = ".trl-venv"


def trl_python(root: Path) -> Path:
    """Path of the interpreter inside ``<root>/.trl-venv``."""
    bindir = "Scripts" if sys.platform == "win32" else "bin"
    exe = "python.exe" if sys.platform == "win32" else "python"
    return Path(root) / VENV_DIRNAME / bindir / exe


def probe(python: Path) -> dict | None:
    """Which trl, transformers and torch ``python`` imports (isolated mode, neutral cwd), or
    None when trl cannot be imported there."""
    code = (
        "import json, torch, trl, transformers\n"
        "print(json.dumps({'trl': trl.__version__, 'transformers': transformers.__version__,"
        " 'torch': torch.__version__, 'torch_file': torch.__file__}))"
    )
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [str(python), "-I", "-c", code], cwd=cwd, capture_output=True, text=True
        )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_trl_env(root: Path | str) -> Path:
    """Create ``<root>/.trl-venv`` holding trl and transformers, if not already there.

    Idempotent: when the venv imports the pinned trl with the system torch, nothing is
    installed. Returns the path of the venv's python.
    """
    root = Path(root).resolve()
    python = trl_python(root)

    def install(python: Path, constraints: Path) -> None:
        _pip(
            python,
            "-c",
            str(constraints),
            f"trl=={TRL_VERSION}",
            f"transformers=={TRANSFORMERS_VERSION}",
        )

    found, installed = ensure_torch_pinned_venv(
        root / VENV_DIRNAME,
        python,
        probe,
        lambda found: found["trl"] == TRL_VERSION,
        install,
        "trl_env",
        "trl",
    )
    state = "installed" if installed else "ready:"
    print(f"[trl_env] {state} trl {found['trl']}, transformers {found['transformers']}")
    return python


if __name__ == "__main__":
    print(ensure_trl_env(Path(__file__).resolve().parents[1]))
