import inspect
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.model.sampling import (
    filter_logits,
    generate,
    reference_top_p,
    sample_from_logits,
    sample_tokens,
    top_k,
    top_k_filter,
    top_p,
    top_p_filter,
)
from tests.helpers import tiny_palm

FACTS = Path(__file__).parent / "fixtures" / "reference" / "facts.json"


@pytest.fixture(scope="module")
def facts():
    """Behaviour measured on palm-rlhf-pytorch 0.8.0 (benchmarks/make_reference_fixtures.py)."""
    return json.loads(FACTS.read_text())


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
    # like the reference, seq_len at or below the prompt length still samples one token
    assert model.generate(4, prompt=prompt).shape == (2, 1)
    assert model.generate(2, prompt=prompt, return_seq_without_prompt=False).shape == (2, 5)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        model.generate(17, prompt=prompt)
    with pytest.raises(ValueError, match="not a valid token id"):
        model.generate(10, prompt=torch.tensor([[1, 40]]))


def test_generate_restores_training_mode():
    model = tiny_palm()
    model.train()
    model.generate(6, prompt=torch.zeros(1, 2, dtype=torch.long))
    assert model.training


# ----------------------------------------------------------------- the reference's decoding


def test_generate_top_k_filters_by_default_like_the_reference():
    """The reference's generate keeps ceil(0.1 * vocab) tokens by default: 4 of 32 here."""
    model = tiny_palm()  # near-uniform at initialisation: every kept token gets drawn
    prompt = torch.tensor([[3, 4, 5]]).repeat(256, 1)
    top4 = set(model(prompt[:1])[0, -1].topk(4).indices.tolist())
    torch.manual_seed(0)
    first = set(model.generate(4, prompt=prompt)[:, 0].tolist())
    assert first == top4  # 256 draws reach all 4 kept tokens, and no other
    unfiltered = set(model.generate(4, prompt=prompt, filter_logits_fn=None)[:, 0].tolist())
    assert len(unfiltered) > 4
    # our keywords take the place of the default filter
    assert len(set(model.generate(4, prompt=prompt, top_k=8)[:, 0].tolist())) > 4
    greedy = model.generate(4, prompt=prompt[:1], temperature=0.0, filter_logits_fn=None)
    assert int(greedy[0, 0]) == max(top4, key=lambda t: model(prompt[:1])[0, -1, t])


def test_generate_takes_the_reference_filter_functions():
    model = peaky_palm()
    prompt = torch.tensor([[3, 4, 5]]).repeat(200, 1)
    logits = model(prompt[:1])[0, -1]
    torch.manual_seed(0)
    out = model.generate(4, prompt=prompt, filter_logits_fn=top_k, filter_thres=0.95)
    assert set(out[:, 0].tolist()) <= set(logits.topk(2).indices.tolist())  # ceil(0.05 * 32)
    out = model.generate(4, prompt=prompt, filter_logits_fn=top_p, filter_thres=0.99)
    assert set(out[:, 0].tolist()) == {int(logits.argmax())}  # a 1% nucleus: the argmax only
    with pytest.raises(ValueError, match="either filter_logits_fn or top_k"):
        model.generate(4, prompt=prompt, filter_logits_fn=top_p, top_k=3)


def test_reference_top_p_keeps_a_nucleus_of_one_minus_thres():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # the reference drops a token once the ones above it hold more than 1 - thres
    assert top_p(logits, thres=0.9).isfinite().tolist() == [[True, False, False, False]]
    assert reference_top_p(logits, thres=0.4).isfinite().tolist() == [[True, True, False, False]]
    assert reference_top_p(logits, thres=0.1).isfinite().tolist() == [[True, True, True, False]]
    assert torch.equal(top_k(logits, thres=0.5), top_k_filter(logits, 2))


def test_generate_without_prompt_draws_a_start_token_and_returns_it():
    model = tiny_palm()
    assert model.generate(6).shape == (1, 6)


def test_generate_passes_forward_keywords():
    """finetune_scope / disable_lora / extra_embed mean what the reference's forward does."""
    model = peaky_palm()
    model.add_finetune_params("actor")
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.5)
    prompt = torch.randint(0, 32, (2, 5))
    greedy = dict(temperature=0.0, filter_logits_fn=None)
    base = model.generate(9, prompt=prompt, **greedy)
    scoped = model.generate(9, prompt=prompt, finetune_scope="actor", **greedy)
    off = model.generate(9, prompt=prompt, finetune_scope="actor", disable_lora=True, **greedy)
    assert torch.equal(off, base) and not torch.equal(scoped, base)
    extra = torch.randn(32, dtype=torch.double)
    with_extra = model.generate(9, prompt=prompt, extra_embed=extra, **greedy)
    # the uncached reference recipe: forward over the whole sequence, extra_embed every step
    seq = prompt
    for _ in range(4):
        token = model(seq, extra_embed=extra)[:, -1].argmax(-1)
        seq = torch.cat((seq, token[:, None]), dim=1)
    assert torch.equal(with_extra, seq[:, 5:])
    with pytest.raises(ValueError, match="extra_embed must broadcast"):
        model.generate(9, prompt=prompt, extra_embed=torch.randn(2, 5, 32, dtype=torch.double))


def test_generate_use_tqdm_shows_a_bar(capsys):
    tiny_palm().generate(5, prompt=torch.zeros(1, 2, dtype=torch.long), use_tqdm=True)
    assert "sampling" in capsys.readouterr().err


def test_cached_generate_equals_uncached_generate_with_the_default_filter():
    model = peaky_palm()
    prompt = torch.randint(0, 32, (3, 4))
    runs = [
        model.generate(
            16, prompt=prompt, use_cache=use_cache, generator=torch.Generator().manual_seed(5)
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_eos_stops_each_row_on_its_own_unlike_the_reference(facts):
    """Porting-table row: the reference stops only when every row holds an EOS (prompt
    included) and pads nothing until then; here each row stops at its first sampled EOS."""
    model = tiny_palm()
    forced = torch.tensor([2, 9])  # row 0 always samples EOS 2, row 1 never does

    def forced_logits(hidden):  # (b, ..., dim) -> (b, ..., 32): row i always picks forced[i]
        logits = torch.full((*hidden.shape[:-1], 32), -1e4)
        for row, token in enumerate(forced[: hidden.shape[0]].tolist()):
            logits[row, ..., token] = 1e4
        return logits

    model.to_logits = forced_logits
    prompt = torch.tensor([[3, 4], [5, 6]])
    out = model.generate(6, prompt=prompt, eos_token=2)
    assert facts["generate"]["eos_one_row_only_result"] == [[2, 2, 2, 2], [9, 9, 9, 9]]
    assert out.tolist() == [[2, 0, 0, 0], [9, 9, 9, 9]]
    # an EOS inside the prompt does not end the sample (the reference returns only padding)
    assert facts["generate"]["eos_in_prompt_result"] == [[0], [0]]
    out = model.generate(8, prompt=torch.tensor([[3, 2, 5], [6, 7, 2]]), eos_token=2)
    assert out.tolist() == [[2, 0, 0, 0, 0], [9, 9, 9, 9, 9]]


def test_generate_signature_and_shapes_match_the_measured_reference(facts):
    measured = facts["generate"]
    params = inspect.signature(generate).parameters
    for name, default in measured["signature_defaults"].items():
        ours = params[name].default
        assert ({top_k: "top_k", top_p: "top_p"}.get(ours, ours)) == default, name
    model = tiny_palm()
    prompt5 = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    for seq_len, shape in measured["returned_shape_for_prompt_len_5_by_seq_len"].items():
        assert list(model.generate(int(seq_len), prompt=prompt5).shape) == shape
    full = model.generate(3, prompt=prompt5, return_seq_without_prompt=False)
    assert list(full.shape) == measured["seq_len_3_return_seq_without_prompt_false"]
    assert list(model.generate(6).shape) == measured["no_prompt_seq_len_6"]
