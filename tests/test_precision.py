"""bf16 mixed precision on the CPU: where it can only be emulated it is slow, not wrong (warn,
never refuse); attention that will be differentiated runs in fp32 where that is faster."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from palm_rlhf.model.attention import CPU_BF16_BACKWARD_MIN_KEYS, sdpa_attention
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


def attention_inputs(keys: int, requires_grad: bool = True):
    """bf16 q (2, 4, keys, 16) and one shared head k, v (2, keys, 16), as the block passes them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *shape, 16, generator=g) for shape in ((4, keys), (keys,), (keys,)))
    return [t.bfloat16().requires_grad_(requires_grad) for t in (q, k, v)]


def bf16_kernel(q, k, v):
    k, v = k[:, None], v[:, None]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def fp32_kernel(q, k, v):
    return bf16_kernel(q.float(), k.float(), v.float()).bfloat16()


@pytest.mark.parametrize(
    "keys, requires_grad, expected",
    [
        (32, True, fp32_kernel),
        (32, False, bf16_kernel),
        (CPU_BF16_BACKWARD_MIN_KEYS, True, bf16_kernel),
    ],
)
def test_bf16_attention_to_differentiate_on_the_cpu_runs_in_fp32_only_where_that_is_faster(
    keys, requires_grad, expected
):
    """Short sequences with gradients: the fp32 kernel (2-3.5x faster there), output in bf16;
    no gradients (sampling) or long sequences: the bf16 kernel. Under autocast as in training."""
    q, k, v = attention_inputs(keys, requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, None, True, q.shape[-1] ** -0.5)
    want = expected(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    other = bf16_kernel if expected is fp32_kernel else fp32_kernel
    assert not torch.equal(out, other(q, k, v))  # the two kernels differ here, so this can fail


def test_bf16_attention_in_fp32_passes_gradients_back_in_bf16():
    q, k, v = attention_inputs(32)
    out = sdpa_attention(q, k, v, None, True, q.shape[-1] ** -0.5)
    out.float().square().sum().backward()
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    bf16_kernel(*exact).square().sum().backward()
    for ours, ref in zip((q, k, v), exact):
        assert ours.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)
