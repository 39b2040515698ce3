"""The dependency floors are stated once and checked: every dependency in setup.py has a '>='
floor that .ci/floors installs exactly (CI runs it before the tests), the torch floor is the
one the package refuses below at import, and the floors' smoke run refuses a wrong version."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_requires() -> list[str]:
    import setuptools  # noqa: F401, I001  (first: provides distutils on any Python)
    from distutils.core import run_setup

    return run_setup(str(REPO / "setup.py"), stop_after="init").install_requires


def test_every_dependency_has_a_floor_and_torch_s_is_the_import_check_s():
    import palm_rlhf

    requirements = install_requires()
    assert {r.partition(">=")[0] for r in requirements} >= {
        "torch", "einops", "beartype", "accelerate", "tqdm", "sentencepiece", "safetensors"
    }  # fmt: skip
    assert all(">=" in r and r.partition(">=")[2] for r in requirements), requirements
    assert f"torch>={palm_rlhf.TORCH_FLOOR}" in requirements


def test_ci_proves_the_floors_before_the_readme_s_test_command():
    run = (REPO / ".ci" / "run").read_text().splitlines()
    assert run.index("bash .ci/floors") < run.index("python3 -m pytest -q") == len(run) - 1


def test_an_old_torch_is_refused_at_import_in_one_line():
    code = "import torch; torch.__version__ = '2.4.1'; import palm_rlhf"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    import palm_rlhf

    floor = palm_rlhf.TORCH_FLOOR
    assert result.stderr.strip().splitlines()[-1] == (
        f"ImportError: palm-rlhf needs torch>={floor}, found 2.4.1: pip install 'torch>={floor}'"
    )


def test_the_floor_smoke_run_refuses_a_version_that_is_not_the_floor():
    from importlib.metadata import version

    result = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "floors_smoke.py"), "einops==0.0.1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"floors: einops is {version('einops')}, not the floor 0.0.1"
