"""Build the isolated virtual environment that holds the reference project.

The reference, ``palm-rlhf-pytorch==0.8.0`` (import name ``palm_rlhf_pytorch``), is only a
point of comparison for the benchmarks: it is never a dependency of ``palm_rlhf``. It lives in
``<root>/.bench-venv`` (git-ignored), created with ``--system-site-packages`` so that it
reuses the torch already installed on the machine instead of pulling a multi-gigabyte build.

Torch is never left to pip's resolver:

1. the reference wheel is installed with ``--no-deps``;
2. its non-torch requirements (pinned below, read from the wheel's metadata) are installed
   explicitly, under a constraints file that pins torch to the version already installed, so
   pip either reuses it or fails — it cannot download another;
3. afterwards the venv must still import the system torch, else the setup is rejected.

Run ``python benchmarks/reference_env.py`` to build it by hand; it is idempotent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REFERENCE_DIST = "palm-rlhf-pytorch"
REFERENCE_VERSION = "0.8.0"
REFERENCE_MODULE = "palm_rlhf_pytorch"
VENV_DIRNAME = ".bench-venv"

# Requirements of palm-rlhf-pytorch 0.8.0 (its METADATA ``Requires-Dist``) other than torch,
# pinned to the releases that resolved when this harness was written so results are
# reproducible. accelerate, beartype, einops and tqdm usually come from the system site.
REFERENCE_REQUIREMENTS = (
    "accelerate",
    "adam-atan2-pytorch==0.4.1",
    "beartype",
    "einops>=0.8.0",
    "einx==0.4.3",
    "hl-gauss-pytorch==0.3.0",
    "memmap-replay-buffer==0.2.3",
    "torch-einops-utils==0.2.0",
    "tqdm",
    "x-mlps-pytorch==0.6.9",
)


def venv_python(root: Path) -> Path:
    """Path of the interpreter inside ``<root>/.bench-venv``."""
    bindir = "Scripts" if sys.platform == "win32" else "bin"
    exe = "python.exe" if sys.platform == "win32" else "python"
    return Path(root) / VENV_DIRNAME / bindir / exe


def _probe(python: Path) -> dict | None:
    """Ask ``python`` (isolated mode, neutral cwd) which reference and torch it imports.

    Returns ``{"reference": version, "torch": version, "torch_file": path}`` or ``None``
    when the reference cannot be imported there.
    """
    code = (
        "import json, importlib.metadata as md, torch, " + REFERENCE_MODULE + "\n"
        "print(json.dumps({'reference': md.version('" + REFERENCE_DIST + "'),"
        " 'torch': torch.__version__, 'torch_file': torch.__file__}))"
    )
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [str(python), "-I", "-c", code], cwd=cwd, capture_output=True, text=True
        )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pip(python: Path, *args: str) -> None:
    """Run ``python -m pip install ...`` and fail loudly with pip's output on error."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("[reference_env] $", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip failed ({proc.returncode}) for: {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
        )


def _system_torch_version() -> str:
    """Version of the torch installed for this interpreter, without a local tag (``+cpu``)."""
    import torch

    return torch.__version__.split("+")[0]


def ensure_torch_pinned_venv(
    folder: Path, python: Path, probe, wanted, install, tag: str, module: str
) -> tuple[dict, bool]:
    """A venv at `folder` (its interpreter `python`) over the system's site packages that
    imports the system torch, whatever else goes in. `probe(python)` reports what the venv
    imports (None: it cannot); `wanted(found)` says whether that is already what is needed;
    otherwise `install(python, constraints)` runs with a constraints file pinning torch, and
    the probe must then find `module` with the system torch. Returns (found, installed now)."""
    system_torch = _system_torch_version()
    if python.exists():
        found = probe(python)
        if found and wanted(found):
            if found["torch"].split("+")[0] != system_torch:
                raise RuntimeError(
                    f"{folder} imports torch {found['torch']} "
                    f"but the system has {system_torch}; delete the venv and rerun"
                )
            return found, False
    else:
        print(f"[{tag}] creating {folder} (system site packages)", flush=True)
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(folder)

    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "torch-constraint.txt"
        constraints.write_text(f"torch=={system_torch}\n")
        install(python, constraints)

    found = probe(python)
    if found is None:
        raise RuntimeError(f"{module} still cannot be imported by {python}")
    if found["torch"].split("+")[0] != system_torch:
        raise RuntimeError(
            f"the venv now imports torch {found['torch']} from {found['torch_file']}, "
            f"not the system's {system_torch}; delete {folder}"
        )
    return found, True


def ensure_reference_env(root: Path | str) -> Path:
    """Create ``<root>/.bench-venv`` holding palm-rlhf-pytorch 0.8.0, if not already there.

    Idempotent: when the venv imports the expected reference version together with the
    system torch, nothing is installed. Returns the path of the venv's python.
    """
    root = Path(root).resolve()
    python = venv_python(root)

    def install(python: Path, constraints: Path) -> None:
        _pip(python, "--no-deps", f"{REFERENCE_DIST}=={REFERENCE_VERSION}")
        _pip(python, "-c", str(constraints), *REFERENCE_REQUIREMENTS)

    found, installed = ensure_torch_pinned_venv(
        root / VENV_DIRNAME,
        python,
        _probe,
        lambda found: found["reference"] == REFERENCE_VERSION,
        install,
        "reference_env",
        REFERENCE_MODULE,
    )
    if installed:
        print(
            f"[reference_env] installed {REFERENCE_DIST}=={found['reference']} "
            f"(torch {found['torch']} from {found['torch_file']})",
            flush=True,
        )
    else:
        print(
            f"[reference_env] ready: {REFERENCE_DIST}=={found['reference']} "
            f"with torch {found['torch']} in {root / VENV_DIRNAME}",
            flush=True,
        )
    return python


if __name__ == "__main__":
    print(ensure_reference_env(Path(__file__).resolve().parents[1]))
