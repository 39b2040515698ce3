"""Compatibility with the reference project, palm-rlhf-pytorch 0.8.0, from committed fixtures.

`tests/fixtures/reference/` was written by the reference itself
(`python benchmarks/make_reference_fixtures.py`); these tests need only our package.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from palm_rlhf.checkpoint import CheckpointError
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reference_weights import (
    ReferenceCheckpointError,
    checkpoint_format,
    palm_from_reference_state_dict,
    read_torch_state_dict,
    reference_reward_head,
    strip_prefix,
)
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.model.sampling import filter_logits

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- PaLM logits


@pytest.mark.parametrize("flash_attn", [True, False])
def test_reference_palm_gives_reference_logits(outputs, facts, flash_attn):
    palm = load_palm_checkpoint(FIXTURES / "palm.pt", flash_attn=flash_attn).eval()
    config = palm.config
    inferred = {k: getattr(config, k) for k in facts["palm.pt"]["config"]}
    assert inferred == facts["palm.pt"]["config"]
    assert config.rotary_xpos_scale_base == 512  # the reference's default
    with torch.no_grad():
        torch.testing.assert_close(palm(outputs["palm.seq"]), outputs["palm.logits"], **TOL)
        loss = palm(outputs["palm.seq"], return_loss=True)
    torch.testing.assert_close(loss.reshape(1), outputs["palm.loss"], **TOL)


def load_palm_checkpoint(path, prefix="", **overrides):
    """A PaLM from either kind of file, with explicit config overrides (xPos base...) and a
    `prefix` selecting a sub-model of a reference file (e.g. "actor_palm.")."""
    if checkpoint_format(path) == "safetensors":
        return PaLM.from_pretrained(path)
    state = read_torch_state_dict(path)
    return palm_from_reference_state_dict(
        PaLM, strip_prefix(state, prefix) if prefix else state, **overrides
    )


def test_palm_from_pretrained_and_load_read_reference_files(outputs):
    """The porting user's path: `PaLM.from_pretrained("palm.pt")` and `palm.load("palm.pt")`
    read a torch.save'd reference state dict safely and give the reference's logits."""
    palm = PaLM.from_pretrained(FIXTURES / "palm.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(palm(outputs["palm.seq"]), outputs["palm.logits"], **TOL)
    fresh = load_palm_checkpoint(FIXTURES / "palm.pt")
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    fresh.load(FIXTURES / "palm.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(outputs["palm.seq"]), outputs["palm.logits"], **TOL)


def test_default_constructed_palm_then_load_gives_the_reference_logits():
    """Issue 19 section 1, exactly the porting snippet: `PaLM(num_tokens, dim, depth)` then
    `palm.load("palm.pt")` of a file a default reference PaLM wrote. Our default has no xPos;
    the reference's always has it (scale base 512), so `load` takes it on from the file."""
    recorded = load_file(FIXTURES / "default_load.safetensors")
    with safe_open(FIXTURES / "default_load.safetensors", "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    assert config == dict(num_tokens=32, dim=16, depth=1)  # nothing else passed
    palm = PaLM(**config)
    assert palm.config.rotary_xpos_scale_base is None
    palm.load(FIXTURES / "palm_default.pt")
    palm.eval()
    assert palm.config.rotary_xpos_scale_base == 512
    with torch.no_grad():
        torch.testing.assert_close(palm(recorded["seq"]), recorded["logits"], **TOL)
        loss = palm(recorded["seq"], return_loss=True)
    torch.testing.assert_close(loss.reshape(1), recorded["loss"], **TOL)
    # the xPos it took on matters at this length: plain rotary would be off by far more
    plain = PaLM(**config).eval()
    plain.load_state_dict(palm.state_dict())
    with torch.no_grad():
        assert (plain(recorded["seq"]) - recorded["logits"]).abs().max() > 1e-3
    # the model's own scale base, when given, is kept (it is not in the file)
    kept = PaLM(**config, rotary_xpos_scale_base=64)
    assert kept.load(FIXTURES / "palm_default.pt").config.rotary_xpos_scale_base == 64


def test_reference_file_into_another_shape_names_the_keywords_to_pass():
    with pytest.raises(CheckpointError, match=r"PaLM\(\.\.\., qk_rmsnorm=True\)"):
        PaLM(**REFERENCE_SHAPE, depth=1).load(FIXTURES / "palm_qk_rmsnorm.pt")
    with pytest.raises(CheckpointError, match=r"PaLM\(\.\.\., depth=2\)"):
        PaLM(**REFERENCE_SHAPE, depth=3).load(FIXTURES / "palm.pt")
    with pytest.raises(CheckpointError, match=r"rotary_base=10000\.0"):
        PaLM(**REFERENCE_SHAPE, depth=2, rotary_base=500).load(FIXTURES / "palm.pt")


def test_reference_qk_rmsnorm_file_loads_with_the_reference_attention_scale(outputs):
    """Our qk_rmsnorm default scale (8) is not the reference's (dim_head ** -0.5, whatever its
    qk_scale says): `load` takes the reference's on."""
    palm = PaLM(**REFERENCE_SHAPE, depth=1, qk_rmsnorm=True)
    palm.load(FIXTURES / "palm_qk_rmsnorm.pt").eval()
    assert palm.config.qk_scale == 8**-0.5
    with torch.no_grad():
        torch.testing.assert_close(
            palm(outputs["palm.seq"]), outputs["palm_qk_rmsnorm.logits"], **TOL
        )


REFERENCE_SHAPE = dict(num_tokens=32, dim=16, dim_head=8, heads=2, ff_mult=2)


def test_reference_lora_scope_and_xpos_scale_base(outputs):
    palm = load_palm_checkpoint(FIXTURES / "palm_lora.pt", rotary_xpos_scale_base=8).eval()
    assert palm.finetune_scopes == ("actor",)
    assert palm.lora_specs["actor"]["r"] == 4
    seq = outputs["palm.seq"]
    with torch.no_grad():
        torch.testing.assert_close(palm(seq), outputs["palm_lora.logits"], **TOL)
        with_scope = palm(seq, finetune_scope="actor")
    torch.testing.assert_close(with_scope, outputs["palm_lora.logits_actor"], **TOL)
    # the adapters are not a no-op, so this checked the LoRA mapping
    assert (outputs["palm_lora.logits_actor"] - outputs["palm_lora.logits"]).abs().max() > 0.1


def test_reference_qk_rmsnorm_uses_the_plain_attention_scale(outputs):
    palm = load_palm_checkpoint(FIXTURES / "palm_qk_rmsnorm.pt").eval()
    assert palm.config.qk_rmsnorm and palm.config.qk_scale == 8**-0.5
    with torch.no_grad():
        torch.testing.assert_close(
            palm(outputs["palm.seq"]), outputs["palm_qk_rmsnorm.logits"], **TOL
        )
    # our own qk_rmsnorm default (qk_scale=8) would not reproduce the reference
    other = load_palm_checkpoint(FIXTURES / "palm_qk_rmsnorm.pt", qk_scale=8.0).eval()
    with torch.no_grad():
        assert (other(outputs["palm.seq"]) - outputs["palm_qk_rmsnorm.logits"]).abs().max() > 1e-3


def test_plain_rotary_or_wrong_scale_base_does_not_match(outputs):
    """The fixtures are sensitive to xPos: without it (or with another base) logits differ."""
    seq = outputs["palm.seq"]
    for path, base, expected in (
        ("palm.pt", None, "palm.logits"),
        ("palm_lora.pt", None, "palm_lora.logits"),
        ("palm_lora.pt", 512, "palm_lora.logits"),
    ):
        palm = load_palm_checkpoint(FIXTURES / path, rotary_xpos_scale_base=base).eval()
        with torch.no_grad():
            assert (palm(seq) - outputs[expected]).abs().max() > 1e-3


def test_mapping_rules_on_the_reference_state_dict():
    state = read_torch_state_dict(FIXTURES / "palm.pt")
    palm = load_palm_checkpoint(FIXTURES / "palm.pt")
    ours = palm.state_dict()
    # LayerNorm: the reference stores gamma and applies gamma + 1
    torch.testing.assert_close(ours["layers.1.norm.weight"], state["layers.1.fn.norm.gamma"] + 1)
    torch.testing.assert_close(ours["norm.weight"], state["norm.gamma"] + 1)
    # the fused projection keeps its layout; the feed-forward output loses its Sequential index
    assert torch.equal(
        ours["layers.0.fused_attn_ff_proj.weight"], state["layers.0.fn.fused_attn_ff_proj.weight"]
    )
    assert torch.equal(ours["layers.0.ff_out.weight"], state["layers.0.fn.ff_out.2.weight"])
    lora = read_torch_state_dict(FIXTURES / "palm_lora.pt")
    mapped = load_palm_checkpoint(FIXTURES / "palm_lora.pt", rotary_xpos_scale_base=8).state_dict()
    for slot, name in enumerate("qkvo"):
        for ab in "AB":
            assert torch.equal(
                mapped[f"finetune_modules.actor.1.{name}.{ab}"],
                lora[f"finetune_modules.actor.1.{slot}.{ab}"],
            )


def test_unknown_or_inconsistent_reference_tensors_are_refused(tmp_path):
    state = read_torch_state_dict(FIXTURES / "palm.pt")
    for change, message in (
        ({"layers.0.fn.extra.weight": torch.zeros(2)}, "unknown reference PaLM tensor"),
        ({"norm.beta": torch.ones(16)}, "is not zero"),
        ({"to_logits.weight": torch.zeros(32, 16)}, "tied to token_emb"),
        ({"layers.1.fn.rotary_emb.scale": torch.ones(4)}, "xPos scale"),
    ):
        path = tmp_path / "bad.pt"
        torch.save({**state, **change}, path)
        with pytest.raises(ReferenceCheckpointError, match=message):
            load_palm_checkpoint(path)


def test_prefixed_state_dict_is_found_with_prefix(tmp_path):
    state = read_torch_state_dict(FIXTURES / "palm.pt")
    path = tmp_path / "actor_critic.pt"
    torch.save({f"actor_palm.{k}": v for k, v in state.items()}, path)
    with pytest.raises(ReferenceCheckpointError, match="prefix"):
        load_palm_checkpoint(path)
    palm = load_palm_checkpoint(path, prefix="actor_palm.")
    assert palm.config.depth == 2


def test_our_safetensors_file_loads_through_the_same_entry_point(tmp_path):
    palm = load_palm_checkpoint(FIXTURES / "palm.pt")
    path = palm.save(tmp_path / "ours.safetensors")
    assert checkpoint_format(path) == "safetensors"
    assert checkpoint_format(FIXTURES / "palm.pt") == "torch"
    again = load_palm_checkpoint(path)
    assert again.config == palm.config  # xPos base travels in our config metadata
    x = torch.randint(0, 32, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), palm.eval()(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- xPos


@pytest.mark.parametrize("flash_attn", [True, False])
def test_xpos_cached_decode_equals_uncached_forward(flash_attn):
    torch.manual_seed(0)
    palm = PaLM(
        num_tokens=32,
        dim=16,
        depth=2,
        dim_head=8,
        heads=2,
        flash_attn=flash_attn,
        rotary_xpos_scale_base=4,  # a fast decay, so a wrong position shows
    ).eval()
    x = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        full = palm(x)
        cache = palm.init_cache(2, 16)  # another centre than the uncached n // 2: it cancels
        steps = [palm(x[:, :4], cache=cache)] + [
            palm(x[:, i : i + 1], cache=cache) for i in range(4, 11)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_xpos_left_padded_rows_match_unpadded_rows():
    torch.manual_seed(0)
    palm = PaLM(num_tokens=32, dim=16, depth=2, dim_head=8, heads=2, rotary_xpos_scale_base=4)
    palm.eval()
    row = torch.randint(1, 32, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), row), dim=1)
    mask = torch.arange(9)[None] >= 3
    with torch.no_grad():
        torch.testing.assert_close(palm(padded, mask=mask)[:, 3:], palm(row), **TOL)


def test_xpos_greedy_generation_same_with_and_without_cache():
    palm = load_palm_checkpoint(FIXTURES / "palm_lora.pt", rotary_xpos_scale_base=8)
    prompt = torch.tensor([[3, 4, 5], [9, 1, 7]])
    cached = palm.generate(14, prompt=prompt, temperature=0.0, use_cache=True)
    uncached = palm.generate(14, prompt=prompt, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_xpos_is_off_by_default_and_changes_no_checkpoint_keys():
    assert PaLMConfig(num_tokens=8, dim=8, depth=1).rotary_xpos_scale_base is None
    plain = PaLM(num_tokens=8, dim=8, depth=1, dim_head=4, heads=2)
    xpos = PaLM(num_tokens=8, dim=8, depth=1, dim_head=4, heads=2, rotary_xpos_scale_base=64)
    assert set(plain.state_dict()) == set(xpos.state_dict())
    # a config saved before the field existed still loads (as plain rotary)
    old = {k: v for k, v in plain.config.to_dict().items() if k != "rotary_xpos_scale_base"}
    assert PaLMConfig.from_dict(old).rotary_xpos_scale_base is None


def test_xpos_config_is_validated():
    with pytest.raises(ValueError, match="causal"):
        PaLMConfig(num_tokens=8, dim=8, depth=1, causal=False, rotary_xpos_scale_base=512)
    with pytest.raises(ValueError, match="rotary_xpos_scale_base"):
        PaLMConfig(num_tokens=8, dim=8, depth=1, rotary_xpos_scale_base=0)


# ----------------------------------------------------------------------------- unsafe / wrong files


@pytest.mark.parametrize(
    "name, content, described",
    [
        ("notes.pt", b"hello, these are notes\n", "text file"),
        ("config.pt", b'{"dim": 16}', "JSON file"),
        ("empty.pt", b"", "empty file"),
        ("weights.pt", gzip.compress(b"x" * 100), "gzip archive"),
        ("lfs.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS"),
        ("random.bin", bytes(range(200, 256)) * 4, "unrecognised binary"),
    ],
)
def test_a_file_that_is_no_checkpoint_gets_a_clear_error(tmp_path, name, content, described):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReferenceCheckpointError, match=described) as err:
        load_palm_checkpoint(path)
    assert "expected a palm-rlhf-pytorch checkpoint written by torch.save" in str(err.value)
    assert "safetensors" in str(err.value)


def test_missing_path_and_directory_get_a_clear_error(tmp_path):
    with pytest.raises(ReferenceCheckpointError, match="does not exist"):
        load_palm_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ReferenceCheckpointError, match="is a directory"):
        load_palm_checkpoint(tmp_path)


class _Payload:
    """Unpickling this calls os.makedirs(marker): harmless, and visible if it ever runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    state = read_torch_state_dict(FIXTURES / "palm.pt")
    path = tmp_path / "palm.pt"
    torch.save({**state, "token_emb.weight": _Payload(str(marker))}, path)
    assert checkpoint_format(path) == "torch"
    with pytest.raises(ReferenceCheckpointError, match="refusing to load"):
        load_palm_checkpoint(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.is_dir()


def test_a_pickle_of_something_else_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ReferenceCheckpointError, match="not a state dict of tensors"):
        load_palm_checkpoint(path)


# ----------------------------------------------------------------------------- reward models


@pytest.mark.parametrize("kind", ["scalar", "binned"])
def test_reference_reward_model_weights_reproduce_its_head_output(outputs, facts, kind):
    """Our PaLM with the mapped weights + the reference's pooling (mean over `mask`, prompt
    included) + its head give the reference's head output: the mapping, by hand."""
    state = read_torch_state_dict(FIXTURES / f"reward_{kind}.pt")
    palm = load_palm_checkpoint(FIXTURES / f"reward_{kind}.pt", prefix="palm.").eval()
    assert palm.finetune_scopes == ("reward",)
    head = reference_reward_head(state)
    seq, mask, prompt_mask = (outputs[f"reward.{k}"] for k in ("seq", "mask", "prompt_mask"))
    extra = torch.where(prompt_mask[..., None], head["prompt_embed"], head["response_embed"])
    with torch.no_grad():
        embeds = palm(seq, extra_embed=extra, finetune_scope="reward", return_only_embedding=True)
    pooled = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pred = pooled @ head["head.weight"].T + head["head.bias"]
    expected = outputs[f"reward_{kind}.head_output"]
    torch.testing.assert_close(pred if kind == "binned" else pred[:, 0], expected, **TOL)
    if kind == "scalar":  # the reference returns the head output itself
        torch.testing.assert_close(outputs["reward_scalar.default_output"], expected, **TOL)
        assert "to_pred.0.bias" not in state  # its scalar head has no bias
    else:  # ... but for bins, a Gumbel-sampled class index 0..K-1 (long)
        sampled = outputs["reward_binned.default_output"]
        assert sampled.dtype == torch.long and bool(((sampled >= 0) & (sampled < 5)).all())
        row = facts["reward_binned.pt"]
        assert row["loss_is_cross_entropy_with_class_indices"]
        assert row["label_equal_to_K"].startswith("IndexError")


def reward_inputs(outputs):
    return {k: outputs[f"reward.{k}"] for k in ("mask", "prompt_mask")}, outputs["reward.seq"]


def test_reference_scalar_reward_file_through_our_reward_model(outputs, facts):
    """`RewardModel.from_pretrained("reward.pt")`: pooling "mean_all" (the reference's), the
    reference's outputs, with and without `mask` (no mask: the mean over all positions), and
    its MSE loss for float labels."""
    model = RewardModel.from_pretrained(FIXTURES / "reward_scalar.pt").eval()
    row = facts["reward_scalar.pt"]
    assert model.config.pooling == "mean_all" and model.reward_lora_scope == "reward"
    assert model.config.lora_r == row["config"]["lora_r"] and not model.binned_output
    masks, seq = reward_inputs(outputs)
    with torch.no_grad():
        reward = model(seq, **masks)
        no_mask = model(seq, prompt_mask=masks["prompt_mask"])
        loss = model(seq, **masks, labels=torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(reward, outputs["reward_scalar.head_output"], **TOL)
    torch.testing.assert_close(no_mask, outputs["reward_scalar.no_mask_output"], **TOL)
    assert float(loss) == pytest.approx(row["loss_with_labels"], abs=1e-5)
    assert list(reward.shape) == row["default_output_shape"]


def test_reference_binned_reward_file_through_our_reward_model(outputs, facts):
    """Binned: `sample_from_bins=False` gives the reference's logits; `True` the reference's
    sampled class index (same Gumbel draw for the same seed); labels 0..K-1 give its
    cross-entropy and K is refused. Our default (None) is the expected class index."""
    model = RewardModel.from_pretrained(FIXTURES / "reward_binned.pt").eval()
    row = facts["reward_binned.pt"]
    assert model.config.num_binned_output == row["config"]["num_binned_output"] == 5
    masks, seq = reward_inputs(outputs)
    logits = outputs["reward_binned.head_output"]
    with torch.no_grad():
        model.sample_from_bins = False
        torch.testing.assert_close(model(seq, **masks), logits, **TOL)
        model.sample_from_bins = True
        torch.manual_seed(5)  # the seed the reference's default output was drawn with
        sampled = model(seq, **masks)
        assert str(sampled.dtype) == row["default_output_dtype"] == "torch.int64"
        assert torch.equal(sampled, outputs["reward_binned.default_output"])
        model.sample_from_bins = None  # ours: deterministic, on the labels' 0..K-1 scale
        expected = (logits.softmax(-1) * torch.arange(5.0)).sum(-1)
        torch.testing.assert_close(model(seq, **masks), expected, **TOL)
        loss = model(seq, **masks, labels=torch.tensor([0, 4, 2]))
    assert float(loss) == pytest.approx(row["loss_with_class_index_labels_0_4_2"], abs=1e-5)
    with pytest.raises(ValueError, match=r"class indices 0\.\.4"):
        model(seq, **masks, labels=torch.tensor([1, 5, 2]))  # the reference: IndexError


def test_reference_reward_file_loads_into_a_reward_model_on_its_base(outputs):
    """`reward_model.load("reward.pt")` (the reference's call) into a RewardModel built on the
    same base PaLM: adapters, head and embeddings are copied; a shared base is never
    overwritten, so a file trained on another base is refused."""
    palm = load_palm_checkpoint(FIXTURES / "reward_scalar.pt", prefix="palm.")
    palm.remove_finetune_params("reward")
    model = RewardModel(palm, lora_r=4, pooling="mean_all").eval()
    model.load(FIXTURES / "reward_scalar.pt")
    masks, seq = reward_inputs(outputs)
    with torch.no_grad():
        torch.testing.assert_close(model(seq, **masks), outputs["reward_scalar.head_output"], **TOL)
    shape = dict(num_tokens=32, dim=16, depth=1, heads=2, dim_head=8)
    other = RewardModel(PaLM(**shape, ff_mult=2, rotary_xpos_scale_base=512), lora_r=4)
    with pytest.raises(CheckpointError, match="never overwrites a shared PaLM"):
        other.load(FIXTURES / "reward_scalar.pt")
    # another shape: the keyword that would fit, named
    with pytest.raises(CheckpointError, match=r"build the model with PaLM\(\.\.\., ff_mult=2\)"):
        RewardModel(PaLM(**shape), lora_r=4).load(FIXTURES / "reward_scalar.pt")
    # the same weights on a base built without xPos: refused, never a silent difference
    plain = PaLM(**shape, ff_mult=2).eval()
    plain.load_state_dict({k: v for k, v in palm.state_dict().items() if "finetune" not in k})
    with pytest.raises(CheckpointError, match="rotary_xpos_scale_base"):
        RewardModel(plain, lora_r=4).load(FIXTURES / "reward_scalar.pt")
    with pytest.raises(CheckpointError, match="another reward model"):
        RewardModel(palm, lora_r=4, num_binned_output=5).load(FIXTURES / "reward_scalar.pt")


# ----------------------------------------------------------------------------- measured facts


def test_filter_thres_keeps_as_many_tokens_as_the_reference(facts):
    for vocab, kept in facts["generate"]["top_k_kept_tokens_by_vocab"].items():
        logits = torch.randn(1, int(vocab))  # continuous: no ties
        assert int(torch.isfinite(filter_logits(logits, filter_thres=0.9)).sum()) == kept


def test_recorded_train_counts_follow_one_formula(facts):
    """rollouts = E*T (one sequence each); learn() every U rollouts (time % U == 0, leftovers
    dropped); each learn: epochs * ceil(U / minibatch_size) actor and critic steps."""
    for run in facts["train_counts"]:
        E, T, U = run["num_episodes"], run["max_timesteps"], run["update_timesteps"]
        learns = E * T // U
        steps = learns * run["epochs"] * -(-U // run["minibatch_size"])
        assert run["rollouts"] == run["palm_generate_calls"] == E * T
        assert run["learn_calls"] == learns and run["memories_per_learn"] == [U] * learns
        assert run["actor_optim_steps"] == run["critic_optim_steps"] == steps
        new = run["new_tokens_per_rollout"]
        assert new == [max(1, run["max_seq_len"] - run["prompt_len"])]


def counted_trainer(run: dict):
    """A tiny trainer whose optimizer steps and rollout lengths are recorded."""
    from palm_rlhf import RLHFTrainer
    from tests.helpers import tiny_palm

    trainer = RLHFTrainer(
        palm=tiny_palm(num_tokens=32),
        prompt_token_ids=torch.randint(1, 32, (4, run["prompt_len"])),
        reward_model=lambda seq, mask, prompt_mask: mask.float().mean(-1),
        minibatch_size=run["minibatch_size"],
        epochs=run["epochs"],
        rollout_batch_size=1,
        progress=False,
    )
    steps, lengths = [], []
    real_step, real_rollout = trainer.actor_optim.step, trainer.rollout

    def step(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    def rollout(*args, **kwargs):
        experience, ended = real_rollout(*args, **kwargs)
        lengths.append(int(experience.action_mask.sum(-1).max()))
        return experience, ended

    trainer.actor_optim.step, trainer.rollout = step, rollout
    return trainer, steps, lengths


def test_train_does_the_reference_amount_of_work(facts):
    """Side by side with the counts measured on palm-rlhf-pytorch 0.8.0: the same `train()`
    call samples the same number of rollouts, of the same length, and runs the same number of
    learning steps and optimizer steps."""
    for run in facts["train_counts"]:
        trainer, steps, lengths = counted_trainer(run)
        E, T, U = run["num_episodes"], run["max_timesteps"], run["update_timesteps"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # leftover rollouts are warned about
            records = trainer.train(
                num_episodes=E, max_timesteps=T, update_timesteps=U, max_seq_len=run["max_seq_len"]
            )
        assert trainer.episodes == run["rollouts"] == len(lengths)
        assert len(records) == run["learn_calls"]
        assert len(steps) == run["actor_optim_steps"]
        assert sorted(set(lengths)) == run["new_tokens_per_rollout"]
