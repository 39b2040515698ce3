import dataclasses
import inspect

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.palm import PaLM
from tests.helpers import tiny_palm


def test_logits_and_loss_shapes():
    model = tiny_palm()
    seq = torch.randint(0, 32, (3, 12))
    assert model(seq).shape == (3, 12, 32)
    loss = model(seq, return_loss=True)
    assert loss.dim() == 0
    # an untrained model with small init is close to uniform: loss near log(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(32.0)).item()) < 0.5


def test_loss_equals_hand_computed_cross_entropy():
    model = tiny_palm(cross_entropy_ignore_index=-1)
    seq = torch.randint(0, 32, (2, 9))
    logits = model(seq[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), seq[:, 1:].reshape(-1))
    assert_close(model(seq, return_loss=True), expected, atol=1e-6, rtol=1e-6)


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_palm()
    seq = torch.randint(0, 32, (2, 16))
    changed = seq.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 32
    a, b = model(seq), model(changed)
    assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3  # and the future does change


def test_non_causal_model_sees_the_future():
    model = tiny_palm(causal=False)
    seq = torch.randint(0, 32, (1, 8))
    changed = seq.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 32
    assert (model(seq)[:, 0] - model(changed)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("qk_rmsnorm", [False, True])
def test_fast_attention_matches_reference_attention(causal, qk_rmsnorm):
    fast = tiny_palm(causal=causal, qk_rmsnorm=qk_rmsnorm, flash_attn=True)
    slow = tiny_palm(causal=causal, qk_rmsnorm=qk_rmsnorm, flash_attn=False)
    with torch.no_grad():  # large embeddings make attention peaked, so masking errors show
        fast.token_emb.weight.normal_(0, 1.0)
    slow.load_state_dict(fast.state_dict())
    seq = torch.randint(0, 32, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    assert_close(fast(seq), slow(seq), atol=1e-5, rtol=1e-5)
    assert_close(fast(seq, mask=mask), slow(seq, mask=mask), atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_real_positions():
    model = tiny_palm(causal=False)
    seq = torch.randint(1, 32, (1, 6))
    padded = torch.cat((seq, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    mask = padded != 0
    assert_close(model(padded, mask=mask)[:, :6], model(seq), atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_same_logits_as_no_padding():
    model = tiny_palm()
    seq = torch.randint(1, 32, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), seq), dim=1)
    mask = padded != 0
    assert_close(model(padded, mask=mask)[:, 3:], model(seq), atol=1e-5, rtol=1e-5)


def test_embeddings_are_tied_and_there_are_no_biases():
    model = tiny_palm()
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith("bias") for name in names)
    # the output projection is the embedding matrix itself, not a second (num_tokens, dim) matrix
    model = tiny_palm(num_tokens=48)
    assert [p.shape for p in model.parameters()].count((48, 32)) == 1
    seq = torch.randint(0, 48, (1, 5))
    embeds = model(seq, return_only_embedding=True)
    assert_close(model(seq), embeds @ model.token_emb.weight.T, atol=1e-6, rtol=1e-6)


def test_multi_query_projection_has_one_key_value_head():
    model = tiny_palm(heads=4, dim_head=8)
    block = model.layers[0]
    # queries: heads * dim_head; key and value: one head each; SwiGLU: 2 * ff_inner
    assert block.fused_dims == (32, 8, 8, 2 * 64)
    cache = model.init_cache(batch=2, max_len=10)
    assert cache.keys.shape == (2, 2, 10, 8)  # (layers, batch, len, dim_head): no head axis


def test_overfits_one_small_batch():
    model = tiny_palm(dim=64, depth=2, num_tokens=16)
    seq = torch.randint(0, 16, (4, 24))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = model(seq, return_loss=True).item()
    for _ in range(150):
        loss = model(seq, return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert start > 2.5 and loss.item() < 0.2 * start


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[1, 2, 32]]), r"seq\[0, 2\] = 32 is not a valid token id"),
        (torch.tensor([[1, -1, 3]]), r"seq\[0, 1\] = -1 is not a valid token id"),
        (torch.tensor([[1.0, 2.0]]), "integer token ids"),
        (torch.tensor([1, 2, 3]), r"shape \(batch, seq_len\)"),
    ],
)
def test_bad_token_inputs_raise_clear_errors(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_palm()(bad)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = tiny_palm(max_seq_len=8)
    with pytest.raises(ValueError, match="longer than max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_mask_is_refused():
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        tiny_palm()(torch.zeros(1, 4, dtype=torch.long), mask=torch.ones(1, 4))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="dim_head must be even"):
        PaLM(num_tokens=10, dim=16, depth=1, dim_head=7)


def test_init_std_draws_every_projection_from_that_normal_and_default_stays_pytorchs():
    """init_std=0.02 is the Hugging Face Llama / GPT-2 init (what a TRL user's model gets);
    None keeps nn.Linear's Kaiming-uniform bound 1/sqrt(fan_in), as the reference does."""
    normal = tiny_palm(dim=128, heads=4, dim_head=32, init_std=0.02)
    default = tiny_palm(dim=128, heads=4, dim_head=32)
    for (name, a), (_, b) in zip(normal.layers.named_modules(), default.layers.named_modules()):
        if isinstance(a, torch.nn.Linear):
            fan_in = a.weight.shape[1]
            assert abs(a.weight.std().item() - 0.02) < 0.001, name
            assert a.weight.abs().max().item() > 3 * 0.02, name  # normal tails, not uniform
            assert b.weight.abs().max().item() <= 1 / fan_in**0.5, name
            assert abs(b.weight.std().item() - 1 / (3 * fan_in) ** 0.5) < 0.002, name
    # the embeddings and norms are the same either way
    assert_close(normal.token_emb.weight, default.token_emb.weight, atol=0, rtol=0)
    assert normal.config.init_std == 0.02 and default.config.init_std is None


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (0, ValueError, "init_std must be a positive number or None, got 0"),
        (-0.1, ValueError, "init_std must be a positive number or None, got -0.1"),
        (True, TypeError, r"PaLM\(init_std=...\) must be Optional\[float\], got True"),
        ("0.02", TypeError, r"must be Optional\[float\], got '0.02'"),
    ],
)
def test_a_bad_init_std_names_the_field(bad, error, message):
    with pytest.raises(error, match=message):
        PaLM(num_tokens=10, dim=16, depth=1, dim_head=8, init_std=bad)


# ----------------------------------------------------------------- the reference's surface


def test_reference_constructor_spellings_are_accepted():
    """finetune_scopes as a list and integer dropout rates, as palm-rlhf-pytorch takes them."""
    model = tiny_palm(finetune_scopes=["actor", "critic"], attn_dropout=0, ff_dropout=0)
    assert model.finetune_scopes == ("actor", "critic")
    assert (model.dim_head, model.heads, model.lora_r, model.cross_entropy_ignore_index) == (
        8,
        4,
        8,
        0,
    )


def test_options_are_declared_once_by_the_config():
    """PaLM's signature is PaLMConfig's fields with their defaults (plus finetune_scopes), and
    a call binds against it: a default cannot drift between the model and its saved config."""
    shown = inspect.signature(PaLM).parameters
    fields = dataclasses.fields(PaLMConfig)
    assert list(shown) == [f.name for f in fields] + ["finetune_scopes"]
    for field in fields:
        expected = (
            inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        )
        assert shown[field.name].default == expected
    assert tiny_palm().config == PaLMConfig(
        num_tokens=32, dim=32, depth=2, heads=4, dim_head=8, ff_mult=2
    )
    # positionally, in the config's order, as before
    assert PaLM(32, 16, 1, 8, 2).config == PaLMConfig(32, 16, 1, 8, 2)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(dimhead=8), r"unknown keyword\(s\) 'dimhead' \(did you mean \['dim_head'"),
        (dict(attn_dropout="0.1"), r"PaLM\(attn_dropout=\.\.\.\) must be float, got '0.1'"),
        (dict(causal=1), r"PaLM\(causal=\.\.\.\) must be bool"),
        (dict(finetune_scopes="actor"), r"PaLM\(finetune_scopes=\.\.\.\) must be"),
    ],
)
def test_a_bad_option_is_one_clear_type_error(kwargs, error):
    with pytest.raises(TypeError, match=error):
        PaLM(num_tokens=10, dim=16, depth=1, dim_head=8, **kwargs)
    with pytest.raises(TypeError, match="missing a required argument: 'depth'"):
        PaLM(num_tokens=10, dim=16)


def test_load_takes_on_the_files_rotary_positions_and_attention_scale(tmp_path):
    """A file saved with xPos (or another rotary base, or qk_scale) loaded into a model built
    without: the model computes what the saved one did, never a silently different function."""
    saved = tiny_palm(rotary_xpos_scale_base=8, rotary_base=500.0, qk_rmsnorm=True, qk_scale=4.0)
    saved.eval()
    path = saved.save(tmp_path / "palm.safetensors")
    loaded = tiny_palm(qk_rmsnorm=True, seed=1).load(path).eval()
    assert loaded.config == saved.config
    seq = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        assert_close(loaded(seq), saved(seq), atol=0, rtol=0)
        # and that mattered: the same weights in the default model differ
        plain = tiny_palm(qk_rmsnorm=True).eval()
        plain.load_state_dict(saved.state_dict())
        assert (plain(seq) - saved(seq)).abs().max() > 1e-3


def test_set_dropout_sets_every_dropout_and_returns_the_model():
    model = tiny_palm()
    seq = torch.randint(0, 32, (2, 8))
    model.train()
    assert torch.equal(model(seq), model(seq))  # no dropout yet
    assert model.set_dropout(0.5) is model
    assert model.config.attn_dropout == model.config.ff_dropout == 0.5
    assert all(layer.config.ff_dropout == 0.5 for layer in model.layers)
    assert not torch.equal(model(seq), model(seq))  # training mode now drops
    model.eval()
    assert torch.equal(model(seq), model(seq))  # eval mode never does
    model.set_dropout(0)
    model.train()
    assert torch.equal(model(seq), model(seq))


def test_an_encoder_masks_negative_ids_like_the_reference():
    model = tiny_palm(causal=False)
    seq = torch.randint(1, 32, (2, 6))
    padded = seq.clone()
    padded[1, 4:] = -1
    mask = padded >= 0
    expected = model(seq.masked_fill(~mask, 0), mask=mask)
    assert_close(model(padded), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a valid token id"):
        tiny_palm()(padded)  # a causal model still refuses them
