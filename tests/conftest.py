import json
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
