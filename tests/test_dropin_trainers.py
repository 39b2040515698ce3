"""The reference's other trainers (palm-rlhf-pytorch 0.8.0: `grpo.RLHFTrainer`,
`flowrl.FlowRLTrainer`, `tpo.RLHFTrainer`, the top-level `score_centering_loss`) run here with
the import changed: the same keywords with their meaning, the same amount of work per `train()`
call, and the same option math, checked against what the reference itself recorded
(`tests/fixtures/reference/dropin.*`, written by `benchmarks/make_reference_fixtures.py`).
Every option of theirs is applied with its meaning there."""

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from palm_rlhf import PaLM, RewardModel, flowrl, grpo, tpo
from palm_rlhf.functional.advantages import group_normalized_advantages
from palm_rlhf.functional.policy_losses import flowrl_loss, tpo_targets
from palm_rlhf.rl.rollout import Experience
from palm_rlhf.rl.update import minibatch_loss

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
FACTS = json.loads((FIXTURES / "dropin.json").read_text())
TRAINERS = {"grpo": grpo.RLHFTrainer, "flowrl": flowrl.FlowRLTrainer, "tpo": tpo.RLHFTrainer}
SAMPLES = {
    "grpo": "grpo_num_times_sample_rewards",
    "flowrl": "flowrl_num_times_sample",
    "tpo": "num_times_sample_rewards",
}
PALM = dict(num_tokens=32, dim=16, depth=1, dim_head=8, heads=2, ff_mult=2)


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(FIXTURES / "dropin.safetensors"))


def build(kind: str, reward_model=None, prompts=None, **keywords):
    """A front door over a tiny PaLM, as a notebook builds it (a RewardModel by default)."""
    torch.manual_seed(0)
    palm = PaLM(**PALM)
    if reward_model is None:
        reward_model = RewardModel(PaLM(**PALM), use_lora=True, lora_r=4)
    prompts = torch.randint(1, 32, (3, 3)) if prompts is None else prompts
    return TRAINERS[kind](
        palm=palm, reward_model=reward_model, prompt_token_ids=prompts, progress=False, **keywords
    )


# ----------------------------------------------------------------------------- keywords


def test_each_front_door_declares_the_references_keywords_and_defaults():
    """Every keyword of the reference's constructor and train(), with its default."""

    def plain(value):
        return (
            value.__name__
            if callable(value)
            else list(value)
            if isinstance(value, tuple)
            else value
        )

    for kind, trainer in TRAINERS.items():
        recorded = FACTS["defaults"][kind]
        ours = {k: plain(v) for k, v in trainer.reference_defaults.items()}
        assert ours == recorded["init"], kind
        signature = inspect.signature(trainer.train).parameters.values()
        train = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
        assert train == recorded["train"], kind


MEANINGS = {  # reference keyword and value -> our config field and value
    "grpo": [
        ("grpo_num_times_sample_rewards", 3, "group_size", 4),
        ("use_dr_grpo", True, "scale_by_std", False),
        ("dr_grpo_constant", 3.0, "scale_by_std", False),
        ("use_score_centering", True, "score_centering", True),
        ("eps_clip", 0.3, "eps_clip", 0.3),
        ("minibatch_size", 8, "minibatch_size", 8),
        ("dr_grpo_constant", 3.0, "dr_grpo_constant", 3.0),
        ("use_dr_grpo", True, "dr_grpo_constant", 11),  # theirs: the group size by default
        ("beta_s", 0.0, "beta_s", 0.0),
        ("beta_s", 0.05, "beta_s", 0.05),
        ("kl_div_loss_weight", 0.0, "kl_div_loss_weight", 0.0),
        ("kl_div_loss_weight", 0.3, "kl_div_loss_weight", 0.3),
        # without add_entropy_to_advantage the reference never reads these two
        ("entropy_to_advantage_kappa", 3.0, "entropy_to_advantage_scale", 0.0),
        ("entropy_to_advantage_scale", 0.1, "entropy_to_advantage_scale", 0.0),
        ("add_entropy_to_advantage", True, "entropy_to_advantage_scale", 0.4),
        ("use_max_rl", False, "scale_by_std", True),
        ("use_max_rl", True, "max_rl", True),
        ("use_simple_policy_optimization", False, "score_centering", False),
        ("use_simple_policy_optimization", True, "simple_policy_optimization", True),
        ("add_entropy_to_advantage", False, "algorithm", "grpo"),
        # read by score centering only, as there
        ("score_centering_topk", None, "score_centering", False),
        ("score_centering_topk", 32, "score_centering_topk", None),
        ("score_centering_weight_fn", torch.ones_like, "score_centering", False),
    ],
    "flowrl": [
        ("flowrl_num_times_sample", 2, "group_size", 3),
        ("beta", 5.0, "flowrl_beta", 5.0),
        ("partition_function_lr", 3e-4, "critic_lr", 3e-4),
        ("partition_function_hidden_dim", 16, "algorithm", "flowrl"),
        ("eps_clip", 0.1, "eps_clip", 0.1),
        ("minibatch_size", 8, "minibatch_size", 8),
        # the reference FlowRL stores these two and never reads them
        ("beta_s", 0.5, "beta_s", 0.0),
        ("kl_div_loss_weight", 0.3, "kl_div_loss_weight", 0.0),
    ],
    "tpo": [
        ("num_times_sample_rewards", 3, "group_size", 4),
        ("tpo_eta", 0.5, "tpo_eta", 0.5),
        ("minibatch_size", 2, "minibatch_size", 22),  # theirs counts groups (of 11)
        ("beta_s", 0.0, "beta_s", 0.0),
        ("beta_s", 0.05, "beta_s", 0.05),
    ],
}
SHARED = [  # the actor keywords every reference trainer has, meaning what ours do
    ("actor_lr", 2e-4, "actor_lr", 2e-4),
    ("actor_wd", 0.01, "actor_wd", 0.01),
    ("actor_lora", False, "actor_lora", False),
    ("actor_lora_r", 4, "actor_lora_r", 4),
    ("actor_dropout", 0.1, "actor_dropout", 0.1),
    ("betas", (0.8, 0.99), "betas", (0.8, 0.99)),
    ("max_norm", 1.0, "max_norm", 1.0),
    ("pad_value", 0.0, "pad_value", 0),
    ("epochs", 2, "epochs", 2),
]
KEYWORD_CASES = [(kind, *case) for kind, cases in MEANINGS.items() for case in [*cases, *SHARED]]


@pytest.mark.parametrize("kind, keyword, value, field, expected", KEYWORD_CASES)
def test_every_reference_keyword_is_accepted_with_its_meaning(
    kind, keyword, value, field, expected
):
    trainer = build(kind, **{keyword: value})
    assert getattr(trainer.config, field) == expected
    assert trainer.config.algorithm == kind


def test_every_reference_keyword_has_a_case():
    """Each reference keyword (beside the prompt and Accelerate inputs) is exercised above."""
    inputs = {"prompts", "prompts_path", "prompt_token_ids", "tokenizer", "accelerate_kwargs"}
    for kind, trainer in TRAINERS.items():
        covered = {case[0] for case in [*MEANINGS[kind], *SHARED]}
        assert set(trainer.reference_defaults) - inputs == covered, kind


@pytest.mark.parametrize("kind", TRAINERS)
def test_fixed_settings_follow_the_reference(kind):
    """No frozen-reference KL term in grpo and tpo (the reference keeps no reference policy);
    grpo averages each response's tokens, then the responses, as the reference's masked mean."""
    config = build(kind).config
    if kind in ("grpo", "tpo"):
        assert config.kl_coef == 0.0
    if kind == "grpo":
        assert config.loss_agg_mode == "seq-mean-token-mean"
    assert config.group_size == FACTS["defaults"][kind]["init"][SAMPLES[kind]] + 1


@pytest.mark.parametrize("kind", TRAINERS)
def test_the_reference_defaults_apply_without_a_warning(kind):
    """beta_s and kl_div_loss_weight at the reference's defaults apply with its meaning (grpo
    both, tpo beta_s; FlowRL never reads them there): no warning that something is off."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = TRAINERS[kind](
            palm=PaLM(**PALM),
            reward_model=lambda s, m, p: m.float().mean(-1),
            prompt_token_ids=[[1, 2]],
            progress=False,
        )
    config = trainer.config
    assert config.beta_s == (0.0 if kind == "flowrl" else 0.01)
    assert config.kl_div_loss_weight == (0.1 if kind == "grpo" else 0.0)


def test_dr_grpo_with_gradient_clipping_divides_by_its_constant():
    """Once beta_s, the drift KL or a gradient clip join the loss, 1/c no longer cancels: the
    divisor is the config's `dr_grpo_constant`, as the reference divides."""
    config = build("grpo", use_dr_grpo=True, max_norm=1.0).config
    assert (config.dr_grpo_constant, config.max_norm, config.scale_by_std) == (11, 1.0, False)


@pytest.mark.parametrize(
    "kind, keywords, error, match",
    [
        (
            "grpo",
            dict(grpo_num_times_sample_reward=3),
            TypeError,
            r"unknown keyword\(s\) 'grpo_num_times_sample_reward' "
            r"\(did you mean \['grpo_num_times_sample_rewards'",
        ),
        ("tpo", dict(tpo_etta=1.0), TypeError, r"unknown keyword\(s\) 'tpo_etta'"),
        ("grpo", dict(group_size=4), TypeError, "sets group_size from the reference's keywords"),
        ("flowrl", dict(flowrl_beta=2.0), TypeError, "sets flowrl_beta"),
        ("tpo", dict(algorithm="ppo"), TypeError, "sets algorithm"),
        (
            "grpo",
            dict(grpo_num_times_sample_rewards=0),
            ValueError,
            "grpo_num_times_sample_rewards must be an int >= 1",
        ),
        (
            "flowrl",
            dict(partition_function_hidden_dim=20),
            ValueError,
            "partition_function_hidden_dim=20 must equal the PaLM's dim 16",
        ),
        (
            "grpo",
            dict(use_dr_grpo=True, use_max_rl=True),
            ValueError,
            "cannot use both Dr. GRPO and MaxRL",
        ),
        (
            "grpo",
            dict(use_simple_policy_optimization=True, use_score_centering=True),
            ValueError,
            "cannot use both SPO and Score Centering",
        ),
    ],
)
def test_bad_keywords_are_one_clear_error(kind, keywords, error, match):
    with pytest.raises(error, match=match) as caught:
        build(kind, **keywords)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- train() counts


@pytest.mark.parametrize(
    "run",
    FACTS["train_counts"],
    ids=lambda r: (
        f"{r['trainer']}-E{r['num_episodes']}T{r['max_timesteps']}U{r['update_timesteps']}"
    ),
)
def test_a_reference_notebook_does_the_same_work(run):
    """The reference notebook with the import changed: the same prompts sampled, the same
    responses per prompt and new tokens per response, the same learning steps, the same prompts
    per learning step and optimizer steps (minibatches here are whole groups: the recorded
    minibatch sizes are multiples of the group size). Best-of-n `generate` works after it."""
    kind, group = run["trainer"], run["sequences_per_rollout"][0]
    trainer = build(
        kind,
        prompts=torch.randint(1, 32, (3, run["prompt_len"])),
        minibatch_size=run["minibatch_size"],
        epochs=run["epochs"],
        **{run["samples_keyword"]: run["samples_keyword_value"]},
    )
    steps = {name: 0 for name in trainer.networks}
    for name, (_, optimizer) in trainer.networks.items():
        real = optimizer.step

        def counted(*args, _real=real, _name=name, **kwargs):
            steps[_name] += 1
            return _real(*args, **kwargs)

        optimizer.step = counted
    prompts, lengths = [], []
    real_sample, real_rollout = trainer.sample_prompts, trainer.rollout

    def sample_prompts(num_prompts, group_size=1):
        prompts.append((num_prompts, group_size))
        return real_sample(num_prompts, group_size)

    def rollout(*args, **kwargs):
        experience, ended = real_rollout(*args, **kwargs)
        lengths.extend(experience.action_mask.sum(-1).tolist())
        return experience, ended

    trainer.sample_prompts, trainer.rollout = sample_prompts, rollout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rollouts after the last learning step are warned about
        records = trainer.train(
            run["num_episodes"],
            run["max_timesteps"],
            run["update_timesteps"],
            max_seq_len=run["max_seq_len"],
        )
    assert sum(n for n, _ in prompts) == run["rollouts"]
    assert {g for _, g in prompts} == {group} == {trainer.config.group_size}
    assert trainer.episodes == run["rollouts"] * group
    assert sorted(set(lengths)) == run["new_tokens_per_rollout"]
    assert len(records) == run["learn_calls"]
    learned = [b["episodes"] - a for a, b in zip([0] + [r["episodes"] for r in records], records)]
    assert learned == [n * group for n in run["rollouts_per_learn"]]
    assert steps["actor"] == run["actor_optim_steps"]
    if kind == "flowrl":
        assert steps["log_z"] == run["partition_function_optim_steps"]
    best = trainer.generate(8, prompt=torch.tensor([3, 4, 5]), num_samples=2)
    assert best.shape[0] <= 8 and best[:3].tolist() == [3, 4, 5]


# ----------------------------------------------------------------------------- option math


def front_door(kind: str, **keywords):
    """A front door over a tiny PaLM and a length reward, for the loss tests."""
    torch.manual_seed(0)
    return TRAINERS[kind](
        palm=PaLM(**PALM),
        reward_model=lambda s, m, p: m.float().mean(-1),
        prompt_token_ids=[[1, 2]],
        progress=False,
        **keywords,
    )


def one_batch(tokens, mask, prompt_mask, old_logprobs, advantages=None) -> Experience:
    """A recorded batch as our Experience: action-frame fields (b, n - 1), scores 0."""
    action_mask = (~prompt_mask & mask)[:, 1:]
    zeros = torch.zeros(action_mask.shape)
    return Experience(
        tokens=tokens,
        mask=mask,
        prompt_mask=prompt_mask,
        action_mask=action_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs,
        old_values=zeros,
        advantages=zeros if advantages is None else advantages,
        returns=zeros,
        scores=torch.zeros(len(tokens)),
    )


def fixed_rewards(rewards: torch.Tensor):
    """A reward function giving the group's rows the recorded rewards, in row order."""
    return lambda seq, mask, prompt_mask: rewards[: seq.shape[0]].clone()


def stored_advantages(trainer) -> torch.Tensor:
    """The per-response advantages of one train() step of one prompt (learn() recorded)."""
    seen = []
    trainer.learn = lambda experience, *args, **kwargs: seen.append(experience) or {}
    trainer.train(1, 1, 1, max_seq_len=6)
    experience = seen[0]
    mask = experience.action_mask
    return (experience.advantages * mask).sum(-1) / mask.sum(-1)


GROUPS = ("mixed", "negative_mean", "constant")
ADVANTAGE_CASES = [  # fixture case, reference keywords, our advantage x this = theirs
    ("default", {}, 1.0),
    ("dr_grpo", dict(use_dr_grpo=True), 1.0),  # theirs divides by the group size, 5
    ("dr_grpo_constant_3", dict(dr_grpo_constant=3.0), 1.0),
    ("max_rl", dict(use_max_rl=True), 1.0),
]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("case, keywords, factor", ADVANTAGE_CASES)
def test_grpo_advantages_match_the_reference(tensors, group, case, keywords, factor):
    """The advantages the reference stores: z-scores, Dr. GRPO's centred rewards over the
    group size or `dr_grpo_constant`, MaxRL's over the group's mean reward (a constant
    group: 0 everywhere)."""
    rewards = tensors[f"dropin.rewards.{group}"]
    trainer = build(
        "grpo", reward_model=fixed_rewards(rewards), grpo_num_times_sample_rewards=4, **keywords
    )
    expected = tensors[f"dropin.grpo.{case}.advantages.{group}"]
    assert_close(stored_advantages(trainer) * factor, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group", GROUPS)
def test_flowrl_and_tpo_read_the_references_group_z_scores(tensors, group):
    """FlowRL's r_hat and TPO's target q_i = softmax(log p_old + z / eta) over the group."""
    rewards = tensors[f"dropin.rewards.{group}"]
    assert_close(
        group_normalized_advantages(rewards, 5),
        tensors[f"dropin.flowrl.default.advantages.{group}"],
        atol=1e-6,
        rtol=1e-5,
    )
    eta = build("tpo", tpo_eta=0.5).config.tpo_eta
    old = tensors[f"dropin.tpo.eta_0.5.old_sequence_logprobs.{group}"]
    targets = tpo_targets(old, rewards, 5, eta)
    assert_close(targets, tensors[f"dropin.tpo.eta_0.5.targets.{group}"], atol=1e-6, rtol=1e-5)


LOSS_CASES = list(FACTS["grpo_loss_cases"])


@pytest.mark.parametrize("case", LOSS_CASES)
def test_grpo_loss_and_gradient_match_the_references_learn_step(tensors, case):
    """One minibatch of the recorded batch through our trainer's loss (`minibatch_loss`, the
    front door's config) against the reference's learn(): the loss and its gradient with
    respect to the actor's logits. Their frame: logits shifted right, position t scores token
    t; ours: position t scores token t + 1, so ours is theirs without the first column."""
    recorded = FACTS["grpo_loss_cases"][case]  # the reference's defaults where not given
    keywords = {"beta_s": 0.01, "kl_div_loss_weight": 0.1, **recorded}
    trainer = front_door("grpo", **keywords)
    batch = {
        k: tensors[f"dropin.grpo.batch.{k}"]
        for k in ("seq", "prompt_mask", "mask", "old_probs", "old_log_prob", "advantages", "logits")
    }
    action_mask = (~batch["prompt_mask"] & batch["mask"])[:, 1:]
    advantages = torch.where(action_mask, batch["advantages"][:, None], 0.0)
    experience = one_batch(
        batch["seq"], batch["mask"], batch["prompt_mask"], batch["old_log_prob"][:, 1:], advantages
    )
    table = batch["logits"].clone().requires_grad_()
    actor = lambda tokens, **_: table[tokens[:, 0]]  # noqa: E731 - row i starts with token i
    loss, _ = minibatch_loss(
        {"actor": actor},
        experience,
        trainer.config,
        trainer.kl_coef,
        1.0,
        action_mask.shape[1],
        sampler_probs=batch["old_probs"][:, 1:],
    )
    loss.backward()
    assert_close(
        loss.detach().reshape(1), tensors[f"dropin.grpo.loss.{case}"], atol=1e-6, rtol=1e-5
    )
    assert_close(table.grad, tensors[f"dropin.grpo.grad.{case}"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("advantages", ("seq", "token"))
@pytest.mark.parametrize("topk", (None, 2))
@pytest.mark.parametrize("weight", ("ones", "clamp2"))
def test_top_level_score_centering_loss_is_the_references(tensors, advantages, topk, weight):
    """`from palm_rlhf import score_centering_loss`: their signature and per-token (b, n)
    losses, values and gradients, full vocabulary or top-k, with or without a weight f(r)."""
    from palm_rlhf import score_centering_loss

    assert score_centering_loss is grpo.score_centering_loss
    prefix = "dropin.score_centering."
    logits = tensors[prefix + "logits"].clone().requires_grad_()
    weight_fn = torch.ones_like if weight == "ones" else (lambda r: r.clamp(max=2.0))
    out = score_centering_loss(
        logits.log_softmax(-1),
        tensors[prefix + "samp_probs"],
        tensors[prefix + "actions"],
        tensors[prefix + f"advantages_{advantages}"],
        topk=topk,
        weight_fn=weight_fn,
    )
    (out * tensors[prefix + "weights"]).sum().backward()
    key = f"{prefix}{advantages}.topk_{topk}.{weight}"
    assert out.shape == (2, 3)
    assert_close(out.detach(), tensors[key + ".loss"], atol=1e-6, rtol=1e-5)
    assert_close(logits.grad, tensors[key + ".grad"], atol=1e-6, rtol=1e-5)


def recorded_batch(tensors: dict, prefix: str, grouped: tuple = ()) -> dict:
    """A recorded batch by name; the `grouped` ones (g, k, ...) flattened to rows (g k, ...)."""
    out = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v.flatten(0, 1) if k in grouped else v for k, v in out.items()}


@pytest.mark.parametrize("case", ["plain", "beta_s"])
def test_tpo_loss_and_gradient_match_the_references_learn_step(tensors, case):
    """The reference TPO's learn() on a recorded batch of 2 groups of 3 with given targets q,
    through our loss (`minibatch_loss`, the front door's config). Ours builds q from the old
    sequence log-probs and the scores: with equal scores (z = 0) and old sequence log-probs
    log q, its q is the recorded one."""
    batch = recorded_batch(
        tensors, "dropin.tpo.batch.", grouped=("seq", "prompt_mask", "mask", "target_q")
    )
    beta_s = 0.01 if case == "beta_s" else 0.0
    trainer = front_door("tpo", num_times_sample_rewards=2, beta_s=beta_s)
    action_mask = (~batch["prompt_mask"] & batch["mask"])[:, 1:]
    first = action_mask.int().argmax(-1)  # each row's first response position
    old = torch.zeros(action_mask.shape)
    old[torch.arange(len(first)), first] = batch["target_q"].flatten().log()
    experience = one_batch(batch["seq"], batch["mask"], batch["prompt_mask"], old)
    table = batch["logits"].clone().requires_grad_()
    actor = lambda tokens, **_: table[tokens[:, 0]]  # noqa: E731 - row i starts with token i
    loss, _ = minibatch_loss(
        {"actor": actor}, experience, trainer.config, trainer.kl_coef, 1.0, action_mask.shape[1]
    )
    loss.backward()
    assert_close(loss.detach().reshape(1), tensors[f"dropin.tpo.loss.{case}"], atol=1e-6, rtol=1e-5)
    assert_close(table.grad, tensors[f"dropin.tpo.grad.{case}"], atol=1e-6, rtol=1e-5)


def test_flowrl_reference_loss_is_ours_with_probabilities_for_log_probabilities(tensors):
    """The reference FlowRL's learn() (one group of 4 full-length responses, beta 2, clip 0.2)
    equals our trajectory balance `flowrl_loss` fed token PROBABILITIES where the paper (and
    ours) has log-probabilities, for the policy, the reference and the importance weight:
    the one way their loss differs from ours (the porting table's FlowRL row). Gradients too."""
    batch = recorded_batch(tensors, "dropin.flowrl.batch.")
    tokens, prompt = batch["seq"], int(batch["prompt_mask"][0].sum())
    table, log_z = batch["logits"].clone().requires_grad_(), batch["log_z"].clone().requires_grad_()

    def token_probs(logits):  # our frame: position t scores token t + 1; response part only
        probs = logits[tokens[:, 0]][:, :-1].softmax(-1)
        return probs.gather(-1, tokens[:, 1:, None])[..., 0][:, prompt - 1 :]

    policy, reference = token_probs(table), token_probs(batch["ref_logits"])
    mask = torch.ones(policy.shape, dtype=torch.bool)
    config = build("flowrl", beta=2.0, eps_clip=0.2).config
    loss, _ = flowrl_loss(
        policy,
        reference,
        batch["old_action_prob"],
        mask,
        batch["rewards"],
        log_z,
        config.flowrl_beta,
        config.eps_clip,
    )
    loss.backward()
    assert_close(loss.detach().reshape(1), tensors["dropin.flowrl.loss"], atol=1e-6, rtol=1e-5)
    assert_close(table.grad, tensors["dropin.flowrl.grad"], atol=1e-6, rtol=1e-5)
    assert_close(log_z.grad, tensors["dropin.flowrl.log_z_grad"], atol=1e-6, rtol=1e-5)
    with_log_probs, _ = flowrl_loss(
        policy.log(),
        reference.log(),
        batch["old_action_prob"].log(),
        mask,
        batch["rewards"],
        log_z,
        2.0,
        0.2,
    )
    assert abs(float(with_log_probs.detach()) - float(tensors["dropin.flowrl.loss"])) > 0.1


NOTEBOOK = """
import torch
from palm_rlhf import PaLM, RewardModel
{import_line}

palm = PaLM(num_tokens=32, dim=16, depth=1, heads=2, dim_head=8)
reward_model = RewardModel(palm, num_binned_output=5)
prompts = torch.randint(1, 32, (4, 3))
trainer = {trainer}(palm=palm, reward_model=reward_model, prompt_token_ids=prompts,
                    {samples}=2, minibatch_size={minibatch}{extra})
trainer.train(num_episodes=1, max_timesteps=2, update_timesteps=2, max_seq_len=6)
answer = trainer.generate(8, prompt=prompts[0], num_samples=4)
"""


@pytest.mark.parametrize(
    "import_line, trainer, samples, minibatch, extra",
    [
        ("from palm_rlhf.grpo import RLHFTrainer", "RLHFTrainer", SAMPLES["grpo"], 3, ""),
        (
            "from palm_rlhf.flowrl import FlowRLTrainer",
            "FlowRLTrainer",
            SAMPLES["flowrl"],
            3,
            ", partition_function_hidden_dim=16",
        ),
        ("from palm_rlhf.tpo import RLHFTrainer", "RLHFTrainer", SAMPLES["tpo"], 1, ""),
    ],
)
def test_a_reference_notebook_runs_with_only_the_import_changed(
    import_line, trainer, samples, minibatch, extra
):
    """The reference's usage, word for word but for `palm_rlhf_pytorch` -> `palm_rlhf`."""
    namespace = {}
    code = NOTEBOOK.format(
        import_line=import_line, trainer=trainer, samples=samples, minibatch=minibatch, extra=extra
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference's defaults apply: nothing to warn
        exec(compile(code, "notebook", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.episodes == 2 * 3 and len(trainer.history) == 1
    assert namespace["answer"][:3].tolist() == namespace["prompts"][0].tolist()


def test_score_centering_loss_refuses_advantages_of_another_shape():
    from palm_rlhf import score_centering_loss

    log_probs = torch.randn(2, 3, 6).log_softmax(-1)
    with pytest.raises(ValueError, match=r"advantages must be \(b,\) or \(b, n\) = \(2, 3\)"):
        score_centering_loss(log_probs, log_probs.exp(), torch.zeros(2, 3).long(), torch.ones(3))
