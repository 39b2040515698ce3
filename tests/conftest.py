import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # tiny models: more threads only add contention on a 2-core CI machine
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


REFERENCE_FIXTURES = Path(__file__).parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def outputs():
    """Fixed inputs and the reference project's outputs for them (make_reference_fixtures.py)."""
    return load_file(str(REFERENCE_FIXTURES / "outputs.safetensors"))


@pytest.fixture(scope="session")
def facts():
    """Behaviour of the reference project, measured by running it (make_reference_fixtures.py)."""
    return json.loads((REFERENCE_FIXTURES / "facts.json").read_text())


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench(request):
    """The benchmark script a test module names in `BENCH` (e.g. "bench_trl"), as a module."""
    path = BENCHMARKS / f"{request.module.BENCH}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module
