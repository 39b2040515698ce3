"""bf16 mixed precision on a CPU that can only emulate it is slow, not wrong: warn, never refuse."""

import warnings

import pytest
from accelerate.state import AcceleratorState

from palm_rlhf.train import accelerator as accelerator_module
from palm_rlhf.train.accelerator import SlowPrecisionWarning, make_accelerator


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; each precision here needs its own."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "precision, native, warned",
    [("bf16", False, True), ("bf16", True, False), ("no", False, False)],
)
def test_emulated_bf16_on_the_cpu_is_warned_about(monkeypatch, precision, native, warned):
    monkeypatch.setattr(accelerator_module, "native_cpu_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerator = make_accelerator(precision, cpu=True)
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert len(slow) == int(warned)
    if warned:
        assert "--mixed-precision no" in str(slow[0].message)
        assert slow[0].filename == __file__  # points at the caller, not at accelerator.py
    assert accelerator.mixed_precision == precision  # a warning, the run goes on
