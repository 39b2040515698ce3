"""The single-token decode step (model/decode.py) computes what the uncached forward does."""

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.model import cpu_tuning
from palm_rlhf.model.attention import RotaryEmbedding
from palm_rlhf.model.sampling import sample_tokens
from tests.helpers import randomize_lora, tiny_palm


def decode_logits(model, seq, prompt_len, mask=None, **kwargs):
    """Logits (b, n, v) of `seq`: the prompt in one cached forward, then one token per step."""
    cache = model.init_cache(seq.shape[0], seq.shape[1], **kwargs.pop("cache_kwargs", {}))
    prompt_mask = mask[:, :prompt_len] if mask is not None else None
    steps = [model(seq[:, :prompt_len], mask=prompt_mask, cache=cache, **kwargs)]
    steps += [
        model(seq[:, i : i + 1], cache=cache, **kwargs) for i in range(prompt_len, seq.shape[1])
    ]
    return torch.cat(steps, dim=1)


def padded_batch(num_tokens=32):
    """Two rows, the second left-padded by 3 (its mask False there), 12 tokens each."""
    seq = torch.randint(1, num_tokens, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False
    return seq.masked_fill(~mask, 0), mask


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_rmsnorm": True}, {"rotary_xpos_scale_base": 16}, {"flash_attn": False}],
    ids=["plain", "qk_rmsnorm", "xpos", "reference_attention"],
)
def test_decode_steps_equal_the_uncached_forward_with_padding_and_lora(overrides):
    model = tiny_palm(**overrides).double().eval()
    model.add_finetune_params("actor", targets=("q", "k", "v", "o", "ff_in", "ff_out"))
    randomize_lora(model, "actor")
    seq, mask = padded_batch()
    for scope in (None, "actor"):
        full = model(seq, mask=mask, finetune_scope=scope)
        cached = decode_logits(model, seq, 5, mask=mask, finetune_scope=scope)
        # padding positions are never read: compare the real tokens. The reference attention
        # takes its softmax in float32 even for a float64 model: float32-level agreement there
        tol = 1e-10 if model.config.flash_attn else 1e-6
        assert_close(cached[mask], full[mask], atol=tol, rtol=tol)
    # the scope changes the logits, so the check above did compare two different models
    assert not torch.allclose(model(seq, finetune_scope="actor"), model(seq))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("blocks", [1, 3, 4, 16])
def test_row_block_product_equals_the_linear(rows, blocks, monkeypatch):
    monkeypatch.setattr(cpu_tuning, "ROW_BLOCKS_MIN_BYTES", 0)  # the split even for a tiny weight
    linear = torch.nn.Linear(6, 12, bias=False)
    x = torch.randn(rows, 6)
    assert_close(cpu_tuning.project(x, linear, blocks), linear(x))  # 16 -> gcd(12, 16) = 4 blocks
    assert_close(cpu_tuning.row_block_product(x, linear.weight, 3), linear(x))
    strided = torch.nn.Linear(12, 6, bias=False)
    strided.weight = torch.nn.Parameter(torch.randn(12, 6).t())  # (6, 12), not contiguous
    y = torch.randn(rows, 12)
    assert_close(cpu_tuning.project(y, strided, blocks), strided(y))


def test_the_measured_choice_is_remembered_per_shape_and_equals_the_linear(monkeypatch):
    """`project` times both products on a shape's first call, keeps the faster, and returns the
    Linear's result either way; each method is taken when it is the faster."""
    monkeypatch.setattr(cpu_tuning, "ROW_BLOCKS_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_tuning, "_FASTER_SPLIT", {})
    linear = torch.nn.Linear(16, 12, bias=False)
    x = torch.randn(2, 16)
    assert_close(cpu_tuning.project(x, linear, 4), linear(x))
    assert list(cpu_tuning._FASTER_SPLIT) == [(12, 16, 2, 4, torch.get_num_threads())]
    calls = []
    monkeypatch.setattr(cpu_tuning, "row_block_product", lambda *a: calls.append(a) or a[0])
    for faster_split, expected in ((True, 1), (False, 0)):
        calls.clear()
        cpu_tuning._FASTER_SPLIT[(12, 16, 2, 4, torch.get_num_threads())] = faster_split
        cpu_tuning.project(x, linear, 4)
        assert len(calls) == expected


def test_float32_decode_with_row_blocks_equals_the_forward(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "ROW_BLOCKS_MIN_BYTES", 0)  # tiny weights: split them anyway
    monkeypatch.setattr(cpu_tuning, "MEASURE", False)  # split even where the Linear is faster
    model = tiny_palm().eval()
    assert model.init_cache(1, 4).row_blocks > 1  # the split products are in use here
    seq, mask = padded_batch()
    full = model(seq, mask=mask, extra_embed=torch.full((32,), 0.1))
    cached = decode_logits(model, seq, 4, mask=mask, extra_embed=torch.full((32,), 0.1))
    assert_close(cached[mask], full[mask], atol=2e-5, rtol=1e-5)


def test_greedy_decode_with_lora_and_left_padding_equals_uncached_decode():
    model = tiny_palm(num_tokens=64, dim=64).eval()
    model.add_finetune_params("actor")
    randomize_lora(model, "actor", std=0.3)
    with torch.no_grad():
        model.token_emb.weight.normal_(0, 1.0)  # peaky logits: no near-ties in the argmax
    prompt, mask = padded_batch(64)
    runs = [
        sample_tokens(
            model,
            prompt[:, :6],
            16,
            prompt_mask=mask[:, :6],
            temperature=0.0,
            finetune_scope="actor",
            use_cache=use_cache,
        ).tokens
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def rotate_half(t):
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@pytest.mark.parametrize("xpos", [None, 8])
def test_rotation_factors_rotate_like_the_written_out_formula(xpos):
    """`factors` and `table` (the decode step's lookup) give t * cos + rotate_half(t) * sin,
    with xPos's scale on queries and its inverse on the key."""
    rotary = RotaryEmbedding(16, xpos_scale_base=xpos)
    positions = torch.arange(10)
    cos, sin = (t[:, None].double() for t in rotary(positions))  # (n, 1, d)
    q, k = torch.randn(10, 3, 16, dtype=torch.float64), torch.randn(10, 1, 16, dtype=torch.float64)
    expected_q, expected_k = (t * cos + rotate_half(t) * sin for t in (q, k))
    if xpos is not None:
        scale = rotary.xpos(positions, 5)[:, None]
        expected_q, expected_k = expected_q * scale, expected_k / scale
    expected = torch.cat((expected_q, expected_k), dim=1)
    qk = torch.cat((q, k), dim=1)  # (n, r, d), r = 3 query heads + 1 key
    table = rotary.table(10, 4, center=5).double()  # (n, 2, r, d)
    factors = [t.double() for t in rotary.factors(positions, 4, center=5)]
    for f_cos, f_sin in ((table[:, 0], table[:, 1]), factors):
        rotated = qk * f_cos + qk.roll(8, dims=-1) * f_sin
        assert_close(rotated, expected, atol=1e-6, rtol=1e-6)


def test_compiled_decode_equals_eager_decode():
    """The compiled step (`compile_decode=True`) at a size that compiles in well under a
    minute on 2 cores: one block, so one graph of a dozen kernels."""
    model = tiny_palm(depth=1).eval()
    seq, mask = padded_batch()
    with torch.no_grad():  # the compiled step is for sampling: without autograd
        eager = decode_logits(model, seq, 8, mask=mask)
        compiled = decode_logits(model, seq, 8, mask=mask, cache_kwargs={"compile": True})
    assert_close(compiled[mask], eager[mask], atol=1e-5, rtol=1e-5)
