"""A forward over groups of rows sharing a prefix runs the prefix once per group and gives the
plain forward's logits and gradients; the RL update uses it for group algorithms and trains
the policy the plain forward trains; rows that do not share are refused in one line."""

import pytest
import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.rl import update as update_module
from palm_rlhf.rl.rollout import shared_prompt
from tests.helpers import randomize_lora
from tests.toy_ppo import toy_trainer


def grouped_rows(group: int = 4, prompts: int = 3, prefix: int = 5, rest: int = 7) -> torch.Tensor:
    """`prompts` groups of `group` rows: each group's first `prefix` tokens equal, then random."""
    generator = torch.Generator().manual_seed(0)
    heads = torch.randint(0, 20, (prompts, prefix), generator=generator)
    tails = torch.randint(0, 20, (prompts * group, rest), generator=generator)
    return torch.cat((heads.repeat_interleave(group, dim=0), tails), dim=1)


def model(**options) -> PaLM:
    torch.manual_seed(0)
    palm = PaLM(num_tokens=20, dim=32, depth=2, heads=4, dim_head=8, **options)
    palm.add_finetune_params("a", lora_r=4)
    randomize_lora(palm, "a")
    return palm


def outputs_and_grads(palm: PaLM, x: torch.Tensor, **kwargs):
    logits = palm(x, finetune_scope="a", **kwargs)
    grads = torch.autograd.grad(logits.square().mean(), list(palm.parameters()))
    return logits, grads


@pytest.mark.parametrize(
    "options",
    [{}, {"rotary_xpos_scale_base": 512}, {"flash_attn": False}, {"qk_rmsnorm": True}],
    ids=["default", "xpos", "reference-attention", "qk-rmsnorm"],
)
@pytest.mark.parametrize("length", [1, 5])
def test_logits_and_gradients_are_the_plain_forwards(options, length):
    palm, x = model(**options), grouped_rows()
    plain, plain_grads = outputs_and_grads(palm, x)
    shared, shared_grads = outputs_and_grads(palm, x, shared_prefix=(4, length))
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_with_activation_checkpointing_and_embeddings_returned():
    palm, x = model(), grouped_rows()
    plain_logits, plain_embeds = palm(x, finetune_scope="a", return_logits_with_embedding=True)
    palm.checkpoint_activations = True
    logits, embeds = palm(
        x, finetune_scope="a", return_logits_with_embedding=True, shared_prefix=(4, 5)
    )
    torch.testing.assert_close(logits, plain_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(embeds, plain_embeds, atol=1e-6, rtol=1e-5)
    only = palm(x, return_only_embedding=True, shared_prefix=(4, 5))
    torch.testing.assert_close(only, palm(x, return_only_embedding=True), atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(logits.square().mean(), palm.finetune_parameters("a"))
    palm.checkpoint_activations = False
    plain = torch.autograd.grad(
        palm(x, finetune_scope="a").square().mean(), palm.finetune_parameters("a")
    )
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_prefix_runs_once_per_group():
    palm, x = model(), grouped_rows(group=4, prompts=3, prefix=5, rest=7)
    seen = []
    palm.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    palm(x, shared_prefix=(4, 5))
    assert seen == [(3, 5, 32), (12, 7, 32)]  # 3 prompts x 5 tokens, then 12 rows x 7


@pytest.mark.parametrize(
    "rows, shared, kwargs, message",
    [
        (grouped_rows(), (4, 6), {}, "not groups of 4 equal in their first 6 tokens"),
        (grouped_rows(), (5, 2), {}, "not groups of 5"),
        (grouped_rows(), (4, 12), {}, "first 12 tokens"),  # no column left after the prefix
        (grouped_rows(), (4, 5), {"return_loss": True}, "cannot be combined with return_loss"),
        (grouped_rows(), (4, 5), {"mask": torch.ones(12, 12, dtype=torch.bool)}, "with mask"),
    ],
)
def test_rows_that_do_not_share_are_refused_in_one_line(rows, shared, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model()(rows, shared_prefix=shared, **kwargs)


def test_an_encoder_is_refused():
    encoder = PaLM(num_tokens=20, dim=32, depth=1, heads=2, dim_head=8, causal=False)
    with pytest.raises(ValueError, match="needs a causal model"):
        encoder(grouped_rows(), shared_prefix=(4, 5))


def prompt_mask(tokens: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    return torch.arange(tokens.shape[1]) < torch.tensor(prompt_lengths)[:, None]


def test_the_update_shares_the_shortest_prompt_of_whole_groups_only():
    x = grouped_rows(group=2, prompts=2, prefix=5, rest=3)
    x[2:, 4] = 7  # the second prompt is 4 tokens long: column 4 is already its response
    mask = prompt_mask(x, [5, 5, 4, 4])
    assert shared_prompt(x, mask, 2) == (2, 4)
    assert shared_prompt(x, mask, 1) is None  # PPO: one response per prompt
    assert shared_prompt(x, mask, 4) is None  # two prompts, not one group of 4
    x[1, 0] = (x[0, 0] + 1) % 20  # rows of a group that differ (not the trainer's layout)
    assert shared_prompt(x, mask, 2) is None


def test_a_grpo_minibatch_has_the_plain_forwards_loss_and_gradients(monkeypatch):
    """A real GRPO rollout's minibatch of whole groups: the update's loss and the actor's
    gradients with the shared-prefix forward equal those with it switched off."""
    trainer = toy_trainer(algorithm="grpo", group_size=4, minibatch_size=16, beta_s=0.0)
    seen, rollout_calls = [], []
    trainer.learn = lambda *args, **kwargs: seen.append((args, kwargs)) or {}
    hook = trainer.actor_module.palm.layers[0].register_forward_hook(
        lambda module, args, out: rollout_calls.append(args[0].shape[0])
    )
    trainer.train(num_rollouts=16, max_response_tokens=8, rollouts_per_update=16, progress=False)
    hook.remove()
    # sampling at 16 rows, then the two scoring passes (kl_coef 0.1 reads the reference's
    # log-probs), each a prefix pass over the 4 prompts and one over the rest of 16 rows
    assert trainer.config.kl_coef > 0 and rollout_calls[-4:] == [4, 16, 4, 16]
    (experience, temperature, *rest), kwargs = seen[0]
    assert experience.advantages.abs().max() > 0  # the rewards differ within groups
    nets = {name: net for name, (net, _) in trainer.networks.items()}
    params = trainer.actor_module.trainable_parameters()
    calls = []
    trainer.actor_module.palm.layers[0].register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0])
    )
    results = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(update_module, "shared_prompt", lambda *args: None)
        loss, _ = update_module.minibatch_loss(
            nets, experience, trainer.config, trainer.kl_coef, temperature, *rest, **kwargs
        )
        results.append((loss, torch.autograd.grad(loss, params)))
    assert calls == [4, 16, 16]  # 4 prompts' prefix then 16 rows, then the plain forward
    (shared_loss, shared_grads), (loss, grads) = results
    torch.testing.assert_close(shared_loss, loss, atol=1e-7, rtol=1e-5)
    for a, b in zip(shared_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in grads)


def left_padded_groups(group: int = 3):
    """Prompts of 2, 5 and 4 tokens, left-padded to 5, each repeated `group` times."""
    generator = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, 20, (3, 5), generator=generator)
    mask = torch.arange(5) >= torch.tensor([3, 0, 1])[:, None]
    prompts = prompts.masked_fill(~mask, 0)
    return prompts.repeat_interleave(group, dim=0), mask.repeat_interleave(group, dim=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_prefills_each_group_once_and_samples_what_it_did(temperature):
    palm, (prompt, mask) = model(rotary_xpos_scale_base=512), left_padded_groups()
    shapes = []
    palm.layers[0].register_forward_hook(lambda module, args, out: shapes.append(args[0].shape))
    runs = []
    for group in (3, 1):
        shapes.clear()
        options = dict(prompt_mask=mask, temperature=temperature, finetune_scope="a")
        generator = torch.Generator().manual_seed(5)
        runs.append(
            sample_tokens(palm, prompt, 12, group_size=group, generator=generator, **options)
        )
        assert shapes[0] == (9 // group, 5, 32)  # the prefill: one row per prompt
        assert shapes[1] == (9, 1, 32)  # then every row decodes its own tokens
    grouped, plain = runs
    assert torch.equal(grouped.tokens, plain.tokens)
    # the rows of a group differ once sampled (temperature 1), so the cache was copied per row
    if temperature > 0:
        assert not torch.equal(grouped.tokens[0], grouped.tokens[1])


def test_sampling_refuses_prompts_that_are_not_groups():
    palm, (prompt, mask) = model(), left_padded_groups()
    with pytest.raises(ValueError, match="not contiguous groups of 2 equal rows"):
        sample_tokens(palm, prompt, 4, prompt_mask=mask, group_size=2)
    with pytest.raises(ValueError, match="per-row extra_embed"):
        extra = torch.zeros(9, 1, 32)
        sample_tokens(palm, prompt, 4, prompt_mask=mask, group_size=3, extra_embed=extra)
    mask = mask.clone()
    mask[1, 0] = True  # same tokens, another mask: a different prompt
    with pytest.raises(ValueError, match="not contiguous groups of 3"):
        sample_tokens(palm, prompt, 4, prompt_mask=mask, group_size=3)
