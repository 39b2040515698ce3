import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.model.sampling import (
    filter_logits,
    sample_from_logits,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)
from tests.helpers import tiny_palm


def peaky_palm(**overrides):
    """A tiny model with large embeddings, so its sampling distributions are far from uniform."""
    model = tiny_palm(**overrides).double()
    with torch.no_grad():
        model.token_emb.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_sampling_equals_uncached_sampling(temperature):
    model = peaky_palm()
    prompt = torch.randint(0, 32, (3, 5))
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(123)
        runs.append(
            sample_tokens(
                model, prompt, 20, temperature=temperature, use_cache=use_cache, generator=generator
            )
        )
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].tokens.shape == (3, 20)


def test_cached_logits_equal_full_forward_logits():
    model = peaky_palm()
    seq = torch.randint(0, 32, (2, 12))
    cache = model.init_cache(2, 12)
    first = model.to_logits(model.embed(seq[:, :7], cache=cache))
    rest = [model.to_logits(model.embed(seq[:, i : i + 1], cache=cache)) for i in range(7, 12)]
    assert_close(torch.cat([first, *rest], dim=1), model(seq), atol=1e-10, rtol=1e-10)


def test_left_padded_batch_samples_like_each_prompt_alone():
    model = peaky_palm()
    long_prompt = torch.randint(1, 32, (1, 6))
    short_prompt = torch.randint(1, 32, (1, 3))
    batch = torch.zeros(2, 6, dtype=torch.long)
    batch[0], batch[1, 3:] = long_prompt[0], short_prompt[0]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    together = sample_tokens(model, batch, 10, prompt_mask=mask, temperature=0.0).tokens
    alone = [
        sample_tokens(model, p, 10, temperature=0.0).tokens[0] for p in (long_prompt, short_prompt)
    ]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])


def test_eos_stops_each_row_and_pads_after_it():
    # a near-uniform model over 6 tokens makes EOS (5) frequent; pad with 4
    model = tiny_palm(num_tokens=6)
    prompt = torch.randint(0, 6, (8, 3))
    generator = torch.Generator().manual_seed(0)
    out = sample_tokens(model, prompt, 40, eos_token=5, pad_value=4, generator=generator)
    hit = 0
    for row, mask in zip(out.tokens, out.mask):
        eos_positions = (row == 5).nonzero()
        if len(eos_positions):
            hit += 1
            first = int(eos_positions[0])
            assert (
                (row[first + 1 :] == 4).all()
                and mask[: first + 1].all()
                and not mask[first + 1 :].any()
            )
        else:
            assert mask.all()
    assert hit > 0
    # the loop stops once every row has ended: the output is no longer than needed
    if hit == 8:
        assert out.mask[:, -1].any()


def test_greedy_is_deterministic_and_is_the_argmax():
    model = peaky_palm()
    prompt = torch.randint(0, 32, (2, 4))
    out = sample_tokens(model, prompt, 1, temperature=0.0).tokens
    assert torch.equal(out[:, 0], model(prompt)[:, -1].argmax(-1))


def test_top_k_only_samples_the_k_most_likely():
    logits = torch.randn(4, 50)
    allowed = logits.topk(5, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        token = sample_from_logits(logits, 1.5, generator, top_k=5)
        assert (allowed == token[:, None]).any(dim=-1).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert top_p_filter(logits, 0.1).isfinite().tolist() == [[True, False, False, False]]
    generator = torch.Generator().manual_seed(0)
    samples = {int(sample_from_logits(logits, 1.0, generator, top_p=0.7)) for _ in range(300)}
    assert samples == {0, 1}


def test_filter_thres_is_the_reference_top_k():
    logits = torch.randn(2, 100)
    assert torch.equal(filter_logits(logits, filter_thres=0.9), top_k_filter(logits, 10))


def test_generate_returns_only_new_tokens_and_checks_lengths():
    model = tiny_palm(max_seq_len=16)
    prompt = torch.randint(0, 32, (2, 4))
    assert model.generate(10, prompt=prompt).shape == (2, 6)
    assert model.generate(10, prompt=prompt[0]).shape == (6,)
    with pytest.raises(ValueError, match="prompt has 4 tokens"):
        model.generate(4, prompt=prompt)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        model.generate(17, prompt=prompt)
    with pytest.raises(ValueError, match="not a valid token id"):
        model.generate(10, prompt=torch.tensor([[1, 40]]))


def test_generate_restores_training_mode():
    model = tiny_palm()
    model.train()
    model.generate(6, prompt=torch.zeros(1, 2, dtype=torch.long))
    assert model.training
