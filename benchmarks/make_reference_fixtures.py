"""Write the reference-compatibility fixtures in ``tests/fixtures/reference/``.

The fixtures are produced by the reference project itself, palm-rlhf-pytorch 0.8.0, so that
``tests/test_reference_compat.py`` can check our loader and model against it in CI without the
reference installed. Rerun (deterministic: fixed seeds, CPU, float32) with::

    python benchmarks/make_reference_fixtures.py

from the repository root. That builds or reuses ``.bench-venv`` (``benchmarks/reference_env.py``)
and runs this same file there as ``.bench-venv/bin/python -I make_reference_fixtures.py
--worker --out <dir>`` from a temporary directory, so nothing of ours can be imported next to
the reference (the worker also refuses to start if ``palm_rlhf`` is importable). Rewriting the
files gives byte-identical tensors; ``git diff`` shows any change of the reference's behaviour.

What is written (all tiny):

- ``palm.pt``: ``torch.save(palm.state_dict())`` of a reference ``PaLM(num_tokens=32, dim=16,
  depth=2, dim_head=8, heads=2, ff_mult=2)`` with the reference defaults otherwise (xPos rotary,
  ``rotary_xpos_scale_base=512``, ``flash_attn=False``). The reference 0.8.0 has no
  ``PaLM.save``: its ``PaLM.load`` reads exactly this (``load_state_dict(torch.load(path))``).
  Weights are re-randomised (LayerNorm gammas too) so every tensor matters to the logits.
- ``palm_lora.pt``: the same kind of model with ``rotary_xpos_scale_base=8`` (a strong xPos
  decay) and a LoRA scope ``"actor"`` (r=4) whose ``B`` is non-zero.
- ``palm_qk_rmsnorm.pt``: a depth-1 reference PaLM with ``qk_rmsnorm=True`` (its attention
  scale is ``dim_head ** -0.5`` even then: the block's ``qk_scale`` never reaches ``Attention``).
- ``reward_scalar.pt``, ``reward_binned.pt``: ``torch.save(reward_model.state_dict())`` of
  reference ``RewardModel``s (LoRA scope ``"reward"``, r=4; the second with
  ``num_binned_output=5``) over a depth-1 PaLM; the reference's ``RewardModel.load`` reads it.
- ``outputs.safetensors``: fixed inputs and the reference's outputs for them (eval mode), incl.
  its HL-Gauss critic loss (``hl-gauss-pytorch``) and ``ImplicitPRM`` rewards.
- ``facts.json``: configs of the fixtures and behaviour of the reference measured by running
  and instrumenting it (``RLHFTrainer.train`` work counts, ``generate`` defaults, prompt
  padding, what ``actor_lora=False`` trains, the reward model's outputs and labels).
- ``dropin.json``, ``dropin.safetensors``: the reference's other trainers (``grpo``, ``flowrl``,
  ``tpo``) for ``tests/test_dropin_trainers.py``: their keyword defaults and ``train()`` counts,
  the advantages / TPO targets each stores for fixed group rewards, one ``learn()`` loss and
  its gradient of each (grpo: under each loss option), and the top-level
  ``score_centering_loss``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"

PALM_CONFIG = dict(num_tokens=32, dim=16, depth=2, dim_head=8, heads=2, ff_mult=2)
PALM_LORA_CONFIG = dict(PALM_CONFIG, rotary_xpos_scale_base=8)
REWARD_PALM_CONFIG = dict(num_tokens=32, dim=16, depth=1, dim_head=8, heads=2, ff_mult=2)


# ----------------------------------------------------------------------------- host side


def main_host() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_env import ensure_reference_env

    python = ensure_reference_env(ROOT)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [str(python), "-I", str(Path(__file__).resolve()), "--worker", "--out", str(FIXTURES)]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"fixture worker failed ({proc.returncode})")
    for path in sorted(FIXTURES.iterdir()):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size} bytes")


# ----------------------------------------------------------------------------- worker side


class _BlockOurs(importlib.abc.MetaPathFinder):
    """Refuse to import palm_rlhf (ours) in the reference worker."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "palm_rlhf" or fullname.startswith("palm_rlhf."):
            raise ImportError(f"{fullname} is blocked in the reference fixture worker")
        return None


def _randomise(module, seed: int) -> None:
    """Give every parameter a value of order one (trained-looking), LayerNorm gammas included."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            std = 0.3 if name.endswith(("gamma", ".B")) else 0.5 if "emb" in name else 0.25
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _counting(fn, counter: dict, key: str, record=None):
    def wrapped(*args, **kwargs):
        counter[key] = counter.get(key, 0) + 1
        out = fn(*args, **kwargs)
        if record is not None:
            record(args, kwargs, out)
        return out

    return wrapped


def measure_train(E, T, U, L, minibatch_size=2, epochs=1, prompt_len=3):
    """Run RLHFTrainer.train on a tiny model and count what it does."""
    import random

    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer

    torch.manual_seed(0)
    random.seed(0)
    palm = PaLM(**REWARD_PALM_CONFIG)
    reward_model = RewardModel(palm, use_lora=True, lora_r=4)
    prompts = torch.randint(1, 32, (3, prompt_len))
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=reward_model,
        prompt_token_ids=prompts,
        minibatch_size=minibatch_size,
        epochs=epochs,
    )
    counts: dict = {}
    lengths, learn_sizes = [], []

    def on_generate(args, kwargs, out):
        lengths.append(int(out.actions.shape[-1]))

    trainer.actor_critic_generate = _counting(
        trainer.actor_critic_generate, counts, "rollouts", on_generate
    )
    palm_generate = PaLM.generate
    PaLM.generate = _counting(palm_generate, counts, "palm_generate_calls")
    learn = trainer.learn

    def counting_learn(memories):
        learn_sizes.append(len(memories))
        return learn(memories)

    trainer.learn = counting_learn
    trainer.actor_optim.step = _counting(trainer.actor_optim.step, counts, "actor_optim_steps")
    trainer.critic_optim.step = _counting(trainer.critic_optim.step, counts, "critic_optim_steps")
    try:
        trainer.train(num_episodes=E, max_timesteps=T, update_timesteps=U, max_seq_len=L)
    finally:
        PaLM.generate = palm_generate
    return dict(
        num_episodes=E,
        max_timesteps=T,
        update_timesteps=U,
        max_seq_len=L,
        minibatch_size=minibatch_size,
        epochs=epochs,
        prompt_len=prompt_len,
        rollouts=counts.get("rollouts", 0),
        palm_generate_calls=counts.get("palm_generate_calls", 0),
        sequences_per_rollout=1,
        new_tokens_per_rollout=sorted(set(lengths)),
        learn_calls=len(learn_sizes),
        memories_per_learn=learn_sizes,
        actor_optim_steps=counts.get("actor_optim_steps", 0),
        critic_optim_steps=counts.get("critic_optim_steps", 0),
    )


def measure_generate():
    import inspect
    import math

    import torch
    from palm_rlhf_pytorch import PaLM
    from palm_rlhf_pytorch.utils import top_k

    torch.manual_seed(0)
    palm = PaLM(**REWARD_PALM_CONFIG).eval()
    _randomise(palm, 7)
    # generate is wrapped by torch.no_grad and the reference's eval_decorator (no functools.wraps)
    fn = inspect.unwrap(PaLM.generate)
    while fn.__name__ != "generate":
        fn = next(c.cell_contents for c in fn.__closure__ if callable(c.cell_contents))
    sig = inspect.signature(fn)
    defaults = {
        name: (p.default.__name__ if callable(p.default) else p.default)
        for name, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    kept = {}
    for vocab in (10, 20, 30, 32, 100, 256, 1000, 20000, 50257):
        logits = torch.randn(1, vocab)
        kept[str(vocab)] = int(torch.isfinite(top_k(logits, thres=0.9)).sum())
    formula = {str(v): math.ceil((1 - 0.9) * v) for v in (10, 20, 30, 32, 100, 256, 1000, 20000)}

    # distinct first tokens sampled from one prompt with the default filter
    prompt = torch.tensor([[3, 4, 5]]).repeat(512, 1)
    first = palm.generate(4, prompt=prompt)[:, 0]
    logits = palm(prompt[:1])[0, -1]
    top4 = set(logits.topk(4).indices.tolist())

    shapes = {}
    prompt5 = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    for seq_len in (3, 5, 6, 8):
        shapes[str(seq_len)] = list(palm.generate(seq_len, prompt=prompt5).shape)
    with_prompt = list(palm.generate(3, prompt=prompt5, return_seq_without_prompt=False).shape)
    no_prompt = list(palm.generate(6).shape)

    # EOS: the stop test reads the whole sequence, prompt included; rows are only cleaned up
    # (everything after the first EOS -> pad_value) when EVERY row holds an EOS
    eos = 2
    eos_in_prompt = palm.generate(8, prompt=torch.tensor([[3, eos, 5], [6, 7, eos]]), eos_token=eos)

    forced = torch.tensor([eos, 9])  # row 0 always samples EOS, row 1 never does

    def forced_forward(x, return_logits_with_embedding=False, **kwargs):
        logits = torch.full((x.shape[0], x.shape[1], 32), -1e4)
        logits[torch.arange(x.shape[0]), -1, forced[: x.shape[0]]] = 1e4
        return logits, torch.zeros(x.shape[0], x.shape[1], 16)

    palm.forward = forced_forward
    one_row_eos = palm.generate(6, prompt=torch.tensor([[3, 4], [5, 6]]), eos_token=eos)
    forced[1] = eos
    all_rows_eos = palm.generate(6, prompt=torch.tensor([[3, 4], [5, 6]]), eos_token=eos)
    del palm.forward
    return dict(
        signature_defaults=defaults,
        top_k_kept_tokens_by_vocab=kept,
        top_k_formula_ceil_0_1_v=formula,
        distinct_first_tokens_of_512_samples_vocab32=len(set(first.tolist())),
        those_are_the_top4_logits=set(first.tolist()) <= top4,
        returned_shape_for_prompt_len_5_by_seq_len=shapes,
        seq_len_3_return_seq_without_prompt_false=with_prompt,
        no_prompt_seq_len_6=no_prompt,
        eos_in_prompt_result=eos_in_prompt.tolist(),
        eos_one_row_only_result=one_row_eos.tolist(),
        eos_all_rows_result=all_rows_eos.tolist(),
    )


def measure_actor_lora():
    import torch
    from palm_rlhf_pytorch import PaLM
    from palm_rlhf_pytorch.ppo import ActorCritic

    def names(module, params):
        ids = {id(p) for p in params}
        return sorted(n for n, p in module.named_parameters() if id(p) in ids)

    out = {}
    for actor_lora, critic_lora in ((True, True), (False, True), (False, False), (True, False)):
        torch.manual_seed(0)
        palm = PaLM(**REWARD_PALM_CONFIG)
        ac = ActorCritic(palm, actor_lora=actor_lora, critic_lora=critic_lora)
        key = f"actor_lora={actor_lora},critic_lora={critic_lora}"
        row = dict(
            actor_is_callers_palm=ac.actor_palm is palm,
            callers_palm_scopes_after=sorted(palm.finetune_modules.keys()),
            critic_is_copy=ac.critic is not palm,
        )
        row["actor_parameters"] = names(ac, list(ac.actor_parameters()))
        try:
            row["critic_parameters"] = names(ac, list(ac.critic_parameters()))
        except AssertionError as err:
            row["critic_parameters_error"] = f"AssertionError: {err}"
        out[key] = row
    return out


def measure_pad_handling():
    import random

    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer

    torch.manual_seed(0)
    random.seed(0)
    palm = PaLM(**REWARD_PALM_CONFIG)
    reward_model = RewardModel(palm, use_lora=True, lora_r=4)
    prompt = torch.tensor([[0, 5, 0, 7, 9, 0, 0]])
    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompt)
    seen = []
    generate = trainer.actor_critic_generate

    def spy(state, **kwargs):
        seen.append(state.tolist())
        return generate(state, **kwargs)

    trainer.actor_critic_generate = spy
    trainer.train(num_episodes=1, max_timesteps=1, update_timesteps=10, max_seq_len=8)
    return dict(prompt_token_ids=prompt.tolist(), pad_value=0, state_given_to_generate=seen[0])


def measure_max_norm():
    import random

    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer

    torch.manual_seed(0)
    random.seed(0)
    palm = PaLM(**REWARD_PALM_CONFIG)
    reward_model = RewardModel(palm, use_lora=True, lora_r=4)
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=reward_model,
        prompt_token_ids=torch.randint(1, 32, (2, 3)),
        max_norm=1.0,
        minibatch_size=2,
    )
    try:
        trainer.train(num_episodes=1, max_timesteps=2, update_timesteps=2, max_seq_len=6)
    except AttributeError as err:
        return f"AttributeError: {err}"
    return "no error"


def build_palm_fixtures(out: Path, tensors: dict, facts: dict) -> None:
    import torch
    from palm_rlhf_pytorch import PaLM

    torch.manual_seed(0)
    seq = torch.randint(0, 32, (2, 12))
    tensors["palm.seq"] = seq

    palm = PaLM(**PALM_CONFIG)
    _randomise(palm, 1)
    palm.eval()
    with torch.no_grad():
        tensors["palm.logits"] = palm(seq)
        tensors["palm.loss"] = palm(seq, return_loss=True).reshape(1)
    torch.save(palm.state_dict(), out / "palm.pt")

    torch.manual_seed(1)
    lora = PaLM(**PALM_LORA_CONFIG, finetune_scopes=("actor",), lora_r=4)
    _randomise(lora, 2)
    lora.eval()
    with torch.no_grad():
        tensors["palm_lora.logits"] = lora(seq)
        tensors["palm_lora.logits_actor"] = lora(seq, finetune_scope="actor")
    torch.save(lora.state_dict(), out / "palm_lora.pt")

    torch.manual_seed(2)
    qk = PaLM(**REWARD_PALM_CONFIG, qk_rmsnorm=True)
    _randomise(qk, 3)
    qk.eval()
    with torch.no_grad():
        tensors["palm_qk_rmsnorm.logits"] = qk(seq)
    torch.save(qk.state_dict(), out / "palm_qk_rmsnorm.pt")

    facts["palm.pt"] = dict(config=PALM_CONFIG, keys=sorted(palm.state_dict()))
    facts["palm_qk_rmsnorm.pt"] = dict(
        config=dict(REWARD_PALM_CONFIG, qk_rmsnorm=True), keys=sorted(qk.state_dict())
    )
    facts["palm_lora.pt"] = dict(
        config=PALM_LORA_CONFIG, lora_scope="actor", lora_r=4, keys=sorted(lora.state_dict())
    )


def build_critic_fixtures(out: Path, tensors: dict, facts: dict) -> None:
    """HL-Gauss (the trainer's critic loss, default and custom bins) and ImplicitPRM rewards of
    palm.pt against the base of palm_lora.pt (both written above)."""
    import torch
    from hl_gauss_pytorch import HLGaussLoss
    from palm_rlhf_pytorch import PaLM
    from palm_rlhf_pytorch.implicit_process_reward import ImplicitPRM

    defaults = dict(
        min_value=0.0,
        max_value=5.0,
        min_max_value_on_bin_center=True,
        clamp_to_range=True,
        sigma_to_bin_ratio=1.0,
    )
    custom = dict(min_value=-1.0, max_value=3.0)
    targets = torch.tensor([-1.0, 0.0, 0.3, 2.5, 5.0, 7.0])
    torch.manual_seed(3)
    tensors["hl_gauss.targets"], tensors["hl_gauss.logits"] = targets, torch.randn(6, 6)
    tensors["hl_gauss.values"] = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 4.5])
    for name, kwargs, bins in (("default", defaults, 6), ("custom", custom, 4)):
        loss = HLGaussLoss(num_bins=bins, **kwargs)
        tensors[f"hl_gauss.{name}.probs"] = loss.transform_to_probs(targets)
        if bins == 6:
            logits = tensors["hl_gauss.logits"]
            tensors[f"hl_gauss.{name}.value"] = loss(logits)
            tensors[f"hl_gauss.{name}.loss"] = loss(logits, targets, reduction="none")
            values = tensors["hl_gauss.values"]
            tensors[f"hl_gauss.{name}.value_loss"] = loss(values, targets, reduction="none")
    facts["hl_gauss"] = dict(default=dict(defaults, num_bins=6), custom=dict(custom, num_bins=4))

    model, ref = PaLM(**PALM_CONFIG).eval(), PaLM(**PALM_LORA_CONFIG).eval()
    model.load_state_dict(torch.load(out / "palm.pt"))
    ref.load_state_dict(torch.load(out / "palm_lora.pt"), strict=False)
    prm = ImplicitPRM(model, ref_model=ref, beta=0.1)
    seq = tensors["palm.seq"]
    with torch.no_grad():
        tensors["prm.rewards"] = prm(seq)
        labels = torch.tensor([1.0, 0.0])
        tensors["prm.reference_loss"] = prm(seq, labels).reshape(1)
        padded = seq.clone()
        padded[1, -3:] = -1  # its docstring's padding: ids < 0
        try:
            prm(padded)
            padding = "runs"
        except Exception as err:  # noqa: BLE001 - the fact recorded is the failure
            padding = f"{type(err).__name__}: {err}"
    facts["implicit_prm"] = dict(
        model="palm.pt", ref_model="palm_lora.pt (base)", beta=0.1, negative_ids=padding
    )


def measure_critic_paths():
    """Which of the reference trainer's critic options run: one update on a tiny task."""
    import random

    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer
    from palm_rlhf_pytorch.implicit_process_reward import ImplicitPRM

    out = {}
    cases = dict(
        pooled=dict(critic_pooled_values=True),
        per_token=dict(critic_pooled_values=False),
        implicit_prm=dict(critic="prm"),
    )
    for name, kwargs in cases.items():
        torch.manual_seed(0)
        random.seed(0)
        palm = PaLM(**REWARD_PALM_CONFIG)
        reward_model = RewardModel(PaLM(**REWARD_PALM_CONFIG), num_binned_output=5)
        if kwargs.get("critic") == "prm":
            kwargs = dict(critic=ImplicitPRM(PaLM(**REWARD_PALM_CONFIG)))
        prompts = torch.randint(1, 32, (4, 4))
        try:
            trainer = RLHFTrainer(
                palm=palm, reward_model=reward_model, prompt_token_ids=prompts, **kwargs
            )
            trainer.minibatch_size = 2
            trainer.train(num_episodes=1, max_timesteps=2, update_timesteps=2, max_seq_len=8)
            out[name] = "runs"
        except Exception as err:  # noqa: BLE001 - the fact recorded is the failure
            out[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return out


def build_reward_fixtures(out: Path, tensors: dict, facts: dict) -> None:
    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel
    from palm_rlhf_pytorch.utils import gumbel_sample

    torch.manual_seed(2)
    seq = torch.randint(1, 32, (3, 10))
    prompt_mask = torch.arange(10)[None] < torch.tensor([[3], [4], [2]])
    mask = torch.arange(10)[None] < torch.tensor([[10], [8], [6]])  # right padding
    tensors.update({"reward.seq": seq, "reward.prompt_mask": prompt_mask, "reward.mask": mask})

    for kind, bins in (("scalar", 0), ("binned", 5)):
        torch.manual_seed(3)
        palm = PaLM(**REWARD_PALM_CONFIG)
        model = RewardModel(palm, num_binned_output=bins, use_lora=True, lora_r=4)
        _randomise(model, 4)
        model.eval()
        dropouts = sorted({m.p for m in model.palm.modules() if isinstance(m, torch.nn.Dropout)})
        with torch.no_grad():
            torch.manual_seed(5)
            default = model(seq, prompt_mask=prompt_mask, mask=mask)
            tensors[f"reward_{kind}.default_output"] = default
            embeds = model.palm(
                seq,
                extra_embed=torch.where(
                    prompt_mask[..., None], model.prompt_embed, model.response_embed
                ),
                return_only_embedding=True,
                finetune_scope="reward",
            )
            pooled = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            head = model.to_pred(pooled)
            tensors[f"reward_{kind}.head_output"] = head
            no_mask = model(seq, prompt_mask=prompt_mask) if bins == 0 else None
            row = dict(
                config=dict(
                    num_binned_output=bins, use_lora=True, lora_r=4, palm=REWARD_PALM_CONFIG
                ),
                keys=sorted(model.state_dict()),
                dropout_p_inside_palm_after_init=dropouts,
                default_output_dtype=str(default.dtype),
                default_output_shape=list(default.shape),
                finetune_parameter_count=len(model.finetune_parameters()),
                prompt_and_response_embed_in_finetune_parameters=any(
                    p is model.prompt_embed or p is model.response_embed
                    for p in model.finetune_parameters()
                ),
            )
            if bins == 0:
                row["output_equals_head_of_masked_mean_over_mask_incl_prompt"] = bool(
                    torch.allclose(head, default, atol=1e-6, rtol=0)
                )
                tensors["reward_scalar.no_mask_output"] = no_mask
                row["no_mask_means_mean_over_all_positions"] = bool(
                    torch.allclose(
                        no_mask,
                        model.to_pred(
                            model.palm(
                                seq,
                                extra_embed=torch.where(
                                    prompt_mask[..., None], model.prompt_embed, model.response_embed
                                ),
                                return_only_embedding=True,
                                finetune_scope="reward",
                            ).mean(1)
                        ),
                    )
                )
                labels = torch.tensor([0.5, -1.0, 2.0])
                row["loss_with_labels"] = float(
                    model(seq, prompt_mask=prompt_mask, mask=mask, labels=labels)
                )
                row["loss_is_mse_vs_head_output"] = (
                    abs(row["loss_with_labels"] - float(torch.nn.functional.mse_loss(head, labels)))
                    < 1e-6
                )
            else:
                labels = torch.tensor([0, 4, 2])
                loss = float(model(seq, prompt_mask=prompt_mask, mask=mask, labels=labels))
                row["loss_with_class_index_labels_0_4_2"] = loss
                row["loss_is_cross_entropy_with_class_indices"] = (
                    abs(loss - float(torch.nn.functional.cross_entropy(head, labels))) < 1e-6
                )
                try:
                    model(seq, prompt_mask=prompt_mask, mask=mask, labels=torch.tensor([1, 5, 2]))
                    row["label_equal_to_K"] = "accepted"
                except Exception as err:  # noqa: BLE001 - we record whatever the reference does
                    row["label_equal_to_K"] = f"{type(err).__name__}: {str(err)[:80]}"
                model.sample_from_bins = False
                row["sample_from_bins_false_returns_head_logits"] = bool(
                    torch.equal(model(seq, prompt_mask=prompt_mask, mask=mask), head)
                )
                torch.manual_seed(5)
                row["default_output_equals_gumbel_sample_of_head_logits_same_seed"] = bool(
                    torch.equal(default, gumbel_sample(head, temperature=1.0, dim=-1))
                )
        torch.save(model.state_dict(), out / f"reward_{kind}.pt")
        facts[f"reward_{kind}.pt"] = row


# ----------------------------------------------------------------------------- drop-in trainers
# palm_rlhf_pytorch.grpo.RLHFTrainer, .flowrl.FlowRLTrainer and .tpo.RLHFTrainer, recorded for
# palm_rlhf.grpo / .flowrl / .tpo (tests/test_dropin_trainers.py). Written to dropin.json and
# dropin.safetensors so the files above stay as they were.

DROPIN_MODULES = dict(grpo="RLHFTrainer", flowrl="FlowRLTrainer", tpo="RLHFTrainer")
DROPIN_GROUP_KEYWORD = dict(
    grpo="grpo_num_times_sample_rewards",
    flowrl="flowrl_num_times_sample",
    tpo="num_times_sample_rewards",
)


def _dropin_class(kind: str):
    import importlib

    return getattr(importlib.import_module(f"palm_rlhf_pytorch.{kind}"), DROPIN_MODULES[kind])


def _dropin_trainer(kind: str, reward_model=None, prompts=None, **kwargs):
    """A reference `kind` trainer over a tiny PaLM (its log Z MLP sized to the PaLM for flowrl)."""
    import torch
    from palm_rlhf_pytorch import PaLM, RewardModel

    palm = PaLM(**REWARD_PALM_CONFIG)
    if reward_model is None:
        reward_model = RewardModel(PaLM(**REWARD_PALM_CONFIG), use_lora=True, lora_r=4)
    if kind == "flowrl":
        kwargs.setdefault("partition_function_hidden_dim", REWARD_PALM_CONFIG["dim"])
    prompts = torch.randint(1, 32, (3, 3)) if prompts is None else prompts
    return _dropin_class(kind)(
        palm=palm, reward_model=reward_model, prompt_token_ids=prompts, **kwargs
    )


def _signature_defaults(fn) -> dict:
    import inspect

    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.default is inspect.Parameter.empty:
            continue
        value = param.default
        out[name] = (
            value.__name__
            if callable(value)
            else list(value)
            if isinstance(value, tuple)
            else value
        )
    return out


def measure_dropin_train(kind, E, T, U, L, samples, minibatch_size, epochs=1, prompt_len=3):
    """Run a reference drop-in trainer's train() on a tiny model and count what it does:
    generate calls (one prompt each), sequences per call, learn calls, optimizer steps."""
    import random

    import torch

    torch.manual_seed(0)
    random.seed(0)
    trainer = _dropin_trainer(
        kind,
        prompts=torch.randint(1, 32, (3, prompt_len)),
        minibatch_size=minibatch_size,
        epochs=epochs,
        **{DROPIN_GROUP_KEYWORD[kind]: samples},
    )
    counts: dict = {}
    batch, lengths, per_learn = [], [], []

    def on_generate(args, kwargs, out):
        batch.append(int(args[0].shape[0]))
        lengths.append(int(out[1].shape[-1]) - int(args[0].shape[-1]))

    if kind == "tpo":
        trainer.actor.generate = _counting(trainer.actor.generate, counts, "rollouts", on_generate)
    else:
        trainer.actor_generate = _counting(trainer.actor_generate, counts, "rollouts", on_generate)
    learn = trainer.learn

    def counting_learn(memories):
        per_learn.append(counts.get("rollouts", 0) - sum(per_learn))
        return learn(memories)

    trainer.learn = counting_learn
    trainer.actor_optim.step = _counting(trainer.actor_optim.step, counts, "actor_optim_steps")
    if kind == "flowrl":
        optim = trainer.partition_function_optim
        optim.step = _counting(optim.step, counts, "partition_function_optim_steps")
    trainer.train(num_episodes=E, max_timesteps=T, update_timesteps=U, max_seq_len=L)
    return dict(
        trainer=kind,
        num_episodes=E,
        max_timesteps=T,
        update_timesteps=U,
        max_seq_len=L,
        prompt_len=prompt_len,
        samples_keyword=DROPIN_GROUP_KEYWORD[kind],
        samples_keyword_value=samples,
        minibatch_size=minibatch_size,
        epochs=epochs,
        rollouts=counts.get("rollouts", 0),
        sequences_per_rollout=sorted(set(batch)),
        new_tokens_per_rollout=sorted(set(lengths)),
        learn_calls=len(per_learn),
        rollouts_per_learn=per_learn,
        actor_optim_steps=counts.get("actor_optim_steps", 0),
        partition_function_optim_steps=counts.get("partition_function_optim_steps"),
    )


class _StopTraining(Exception):
    pass


def _fixed_reward_model(rewards):
    import torch

    class FixedRewards(torch.nn.Module):
        """Returns the given (g,) rewards for every group, whatever the sequences."""

        def __init__(self):
            super().__init__()
            self.register_buffer("rewards", rewards.clone())

        def forward(self, seq, prompt_mask=None, mask=None):
            return self.rewards[: seq.shape[0]].clone()

    return FixedRewards()


def _recording_buffer(base):
    """The reference TPO's replay buffer class, keeping what `store` is given."""

    class RecordingBuffer(base):
        stored: list = []

        def store(self, **data):
            RecordingBuffer.stored.append(data)
            return super().store(**data)

    return RecordingBuffer


def record_dropin_advantages(tensors: dict) -> None:
    """The advantages (grpo, flowrl) and TPO targets each reference trainer stores for fixed
    group rewards: one train() step of one prompt, learn() replaced by a recorder."""
    import random

    import torch
    from palm_rlhf_pytorch import tpo

    groups = dict(
        mixed=torch.tensor([1.0, 2.0, 2.0, 4.0, 0.5]),
        negative_mean=torch.tensor([-1.0, -3.0, 0.5, -2.0, 1.0]),
        constant=torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0]),
    )
    options = dict(
        grpo=dict(
            default={},
            dr_grpo=dict(use_dr_grpo=True),
            dr_grpo_constant_3=dict(dr_grpo_constant=3.0),
            max_rl=dict(use_max_rl=True),
        ),
        flowrl=dict(default={}),
    )
    for name, rewards in groups.items():
        tensors[f"dropin.rewards.{name}"] = rewards
        for kind, cases in options.items():
            for case, kwargs in cases.items():
                torch.manual_seed(0)
                random.seed(0)
                trainer = _dropin_trainer(
                    kind, _fixed_reward_model(rewards), **{DROPIN_GROUP_KEYWORD[kind]: 4}, **kwargs
                )
                seen = []

                def capture(memories, seen=seen):
                    seen.append(torch.stack([m[5] for m in memories]))
                    raise _StopTraining

                trainer.learn = capture
                try:
                    trainer.train(
                        num_episodes=1, max_timesteps=1, update_timesteps=1, max_seq_len=6
                    )
                except _StopTraining:
                    pass
                tensors[f"dropin.{kind}.{case}.advantages.{name}"] = seen[0]

        # TPO: the target distribution over the group, and the old sequence log-probs it tilts
        torch.manual_seed(0)
        random.seed(0)
        trainer = _dropin_trainer(
            "tpo", _fixed_reward_model(rewards), num_times_sample_rewards=4, tpo_eta=0.5
        )
        real_buffer = tpo.ReplayBuffer
        tpo.ReplayBuffer = _recording_buffer(real_buffer)
        trainer.learn = lambda buffer: (_ for _ in ()).throw(_StopTraining())
        try:
            trainer.train(num_episodes=1, max_timesteps=1, update_timesteps=1, max_seq_len=6)
        except _StopTraining:
            pass
        finally:
            stored, tpo.ReplayBuffer = tpo.ReplayBuffer.stored, real_buffer
        data = stored[0]
        with torch.no_grad():
            action_masks = ~data["prompt_mask"] & data["mask"]
            per_token, _ = trainer.get_log_probs(data["sequence"], action_masks)
        tensors[f"dropin.tpo.eta_0.5.old_sequence_logprobs.{name}"] = per_token.sum(-1)
        tensors[f"dropin.tpo.eta_0.5.targets.{name}"] = data["target_q"].float()


def _memories(tensors: dict, prefix: str):
    """A fixed batch of 4 rows (prompt 2 tokens, lengths 6/5/4/6, vocabulary 5) as the grpo
    reference stores it: sequence, prompt mask, mask, old probs (b, n, v), old log-probs,
    advantages. Row i starts with token i, so a stand-in actor can look its logits up."""
    import torch

    gen = torch.Generator().manual_seed(11)
    b, n, v = 4, 6, 5
    seq = torch.randint(0, v, (b, n), generator=gen)
    seq[:, 0] = torch.arange(b)
    prompt_mask = torch.arange(n)[None].expand(b, n) < 2
    mask = torch.arange(n)[None] < torch.tensor([[6], [5], [4], [6]])
    old_probs = (torch.randn(b, n, v, generator=gen) * 0.8).softmax(-1)
    old_log_prob = old_probs.gather(-1, seq[..., None])[..., 0].log()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    logits = torch.randn(b, n, v, generator=gen) * 0.8
    for key, value in dict(
        seq=seq,
        prompt_mask=prompt_mask,
        mask=mask,
        old_probs=old_probs,
        old_log_prob=old_log_prob,
        advantages=advantages,
        logits=logits,
    ).items():
        tensors[f"{prefix}.{key}"] = value
    return seq, prompt_mask, mask, old_probs, old_log_prob, advantages, logits


def _table_actor(trainer, logits):
    """Replace a reference trainer's actor by a table of logits, looked up by each row's first
    token (rows arrive shuffled), and record each loss at its backward. Returns (table, losses)."""
    table, losses = logits.clone().requires_grad_(), []
    trainer.actor.forward = lambda x, mask=None: table[x[:, 0]]

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    trainer.accelerate.backward = backward
    return table, losses


def record_grpo_losses(tensors: dict) -> dict:
    """The loss and its gradient with respect to the actor's logits, of one reference grpo
    learn() minibatch on `_memories`, under each loss option (learn() as written: the actor
    replaced by a table of logits, indexed by each row's first token)."""
    import random

    import torch
    from palm_rlhf_pytorch.grpo import Memory

    seq, prompt_mask, mask, old_probs, old_log_prob, advantages, logits = _memories(
        tensors, "dropin.grpo.batch"
    )
    plain = dict(kl_div_loss_weight=0.0, beta_s=0.0)
    cases = dict(
        clipped=plain,
        kl_div_loss_weight=dict(plain, kl_div_loss_weight=0.1),
        beta_s=dict(plain, beta_s=0.01),
        reference_defaults={},
        simple_policy_optimization=dict(plain, use_simple_policy_optimization=True),
        score_centering=dict(plain, use_score_centering=True),
        score_centering_topk=dict(plain, use_score_centering=True, score_centering_topk=2),
        entropy_to_advantage=dict(plain, add_entropy_to_advantage=True),
        entropy_to_advantage_kl=dict(
            plain,
            add_entropy_to_advantage=True,
            kl_div_loss_weight=0.1,
            entropy_to_advantage_kappa=4.0,
            entropy_to_advantage_scale=0.5,
        ),
    )
    for case, kwargs in cases.items():
        torch.manual_seed(0)
        random.seed(0)
        trainer = _dropin_trainer("grpo", minibatch_size=4, epochs=1, **kwargs)
        table, losses = _table_actor(trainer, logits)
        memories = [
            Memory(*row) for row in zip(seq, prompt_mask, mask, old_probs, old_log_prob, advantages)
        ]
        trainer.learn(memories)
        tensors[f"dropin.grpo.loss.{case}"] = losses[0].reshape(1)
        tensors[f"dropin.grpo.grad.{case}"] = table.grad
    return cases


class _OneBatch:
    """Stands in for TPO's replay buffer: its dataloader yields the one given batch."""

    def __init__(self, *batch):
        self.batch = batch

    def dataloader(self, **kwargs):
        return [self.batch]


def record_tpo_losses(tensors: dict) -> None:
    """One reference TPO learn() minibatch (2 groups of 3, prompt 2, vocabulary 6) with the
    actor replaced by a table of logits: the loss and its gradient, with and without beta_s."""
    import random

    import torch

    gen = torch.Generator().manual_seed(13)
    groups, k, n, v = 2, 3, 6, 6
    seq = torch.randint(0, v, (groups, k, n), generator=gen)
    seq[..., 0] = torch.arange(groups * k).reshape(groups, k)  # row i starts with token i
    prompt_mask = (torch.arange(n) < 2).expand(groups, k, n)
    mask = torch.arange(n) < torch.tensor([[6, 5, 4], [6, 6, 3]])[..., None]
    target_q = (torch.randn(groups, k, generator=gen)).softmax(-1)
    logits = torch.randn(groups * k, n, v, generator=gen) * 0.8
    batch = dict(seq=seq, prompt_mask=prompt_mask, mask=mask, target_q=target_q, logits=logits)
    tensors.update({f"dropin.tpo.batch.{key}": value for key, value in batch.items()})
    for case, beta_s in (("plain", 0.0), ("beta_s", 0.01)):
        torch.manual_seed(0)
        random.seed(0)
        trainer = _dropin_trainer("tpo", minibatch_size=2, beta_s=beta_s)
        table, losses = _table_actor(trainer, logits)
        trainer.learn(_OneBatch(seq, prompt_mask, mask, target_q))
        tensors[f"dropin.tpo.loss.{case}"] = losses[0].reshape(1)
        tensors[f"dropin.tpo.grad.{case}"] = table.grad


def record_flowrl_loss(tensors: dict) -> None:
    """One reference FlowRL learn() minibatch (one group of 4 full-length responses) with the
    actor, the reference PaLM and log Z replaced by tables: the loss and its gradients. The
    stored "log-probs" are probabilities there, as its train() stores them."""
    import random

    import torch
    from palm_rlhf_pytorch.flowrl import Memory

    gen = torch.Generator().manual_seed(14)
    b, n, v, prompt = 4, 6, 5, 2
    seq = torch.randint(0, v, (b, n), generator=gen)
    seq[:, 0] = torch.arange(b)
    prompt_mask = torch.arange(n)[None].expand(b, n) < prompt
    mask = torch.ones(b, n, dtype=torch.bool)
    old_probs = (torch.randn(b, n, v, generator=gen) * 0.8).softmax(-1)
    old_action_prob = old_probs.gather(-1, seq[..., None])[..., 0][:, prompt:]
    rewards = torch.tensor([0.5, -1.2, 1.4, -0.7])
    logits, ref_logits = (torch.randn(b, n, v, generator=gen) * 0.8 for _ in range(2))
    log_z = torch.tensor([0.3, 0.3, -0.2, -0.2])
    batch = dict(
        seq=seq,
        prompt_mask=prompt_mask,
        mask=mask,
        old_probs=old_probs,
        old_action_prob=old_action_prob,
        rewards=rewards,
        logits=logits,
        ref_logits=ref_logits,
        log_z=log_z,
    )
    tensors.update({f"dropin.flowrl.batch.{key}": value for key, value in batch.items()})
    torch.manual_seed(0)
    random.seed(0)
    trainer = _dropin_trainer("flowrl", minibatch_size=4, beta=2.0, eps_clip=0.2)
    table, losses = _table_actor(trainer, logits)
    z = log_z.clone().requires_grad_()

    def palm_forward(x, return_only_embedding=False, **kwargs):
        if return_only_embedding:  # log Z's features: each row's id (its first token)
            features = torch.zeros(*x.shape, REWARD_PALM_CONFIG["dim"])
            features[..., 0] = x[:, :1].float()
            return features
        return ref_logits[x[:, 0]]

    # rows arrive shuffled: each row's log Z is looked up by its id
    trainer.palm.forward = palm_forward
    trainer.partition_function.forward = lambda features: z[features[:, 0].long()]
    trainer.learn(
        [Memory(*row) for row in zip(seq, prompt_mask, mask, old_probs, old_action_prob, rewards)]
    )
    tensors["dropin.flowrl.loss"] = losses[0].reshape(1)
    tensors["dropin.flowrl.grad"] = table.grad
    tensors["dropin.flowrl.log_z_grad"] = z.grad


def record_score_centering(tensors: dict) -> None:
    """The reference's top-level score_centering_loss: per-token losses (b, n) and the
    gradient of a fixed weighting of them, full vocabulary and top-k, with and without a
    weight function."""
    import torch
    from palm_rlhf_pytorch import score_centering_loss

    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 3, 6, generator=gen)
    samp_probs = (logits + 0.5 * torch.randn(2, 3, 6, generator=gen)).softmax(-1)
    actions = torch.randint(0, 6, (2, 3), generator=gen)
    weights = torch.randn(2, 3, generator=gen)
    tensors.update(
        {
            "dropin.score_centering.logits": logits,
            "dropin.score_centering.samp_probs": samp_probs,
            "dropin.score_centering.actions": actions,
            "dropin.score_centering.weights": weights,
        }
    )
    for adv_name, adv in (
        ("seq", torch.tensor([1.5, -0.7])),
        ("token", torch.randn(2, 3, generator=gen)),
    ):
        tensors[f"dropin.score_centering.advantages_{adv_name}"] = adv
        for topk in (None, 2):
            for weight_name, weight_fn in (
                ("ones", torch.ones_like),
                ("clamp2", lambda r: r.clamp(max=2.0)),
            ):
                x = logits.clone().requires_grad_()
                out = score_centering_loss(
                    x.log_softmax(-1), samp_probs, actions, adv, topk=topk, weight_fn=weight_fn
                )
                (out * weights).sum().backward()
                key = f"dropin.score_centering.{adv_name}.topk_{topk}.{weight_name}"
                tensors[f"{key}.loss"] = out.detach()
                tensors[f"{key}.grad"] = x.grad


def build_dropin_fixtures(out: Path) -> None:
    """dropin.json (train() counts, keyword defaults) and dropin.safetensors (option math)."""
    from safetensors.torch import save_file

    facts = dict(
        defaults={
            kind: dict(
                init=_signature_defaults(_dropin_class(kind).__init__),
                train=_signature_defaults(_dropin_class(kind).train),
            )
            for kind in DROPIN_MODULES
        },
        train_counts=[
            measure_dropin_train("grpo", 2, 3, 2, 6, samples=2, minibatch_size=3),
            measure_dropin_train("grpo", 1, 5, 2, 6, samples=1, minibatch_size=4, epochs=2),
            measure_dropin_train("flowrl", 2, 3, 2, 6, samples=2, minibatch_size=3),
            measure_dropin_train("flowrl", 1, 3, 3, 5, samples=1, minibatch_size=2, epochs=2),
            measure_dropin_train("tpo", 2, 3, 2, 6, samples=2, minibatch_size=2),
            measure_dropin_train("tpo", 1, 5, 2, 6, samples=1, minibatch_size=1, epochs=2),
        ],
    )
    tensors: dict = {}
    record_dropin_advantages(tensors)
    facts["grpo_loss_cases"] = record_grpo_losses(tensors)  # the keywords of each case
    record_score_centering(tensors)
    record_tpo_losses(tensors)
    record_flowrl_loss(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "dropin.safetensors"))
    (out / "dropin.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


def main_worker(out: Path) -> None:
    import importlib.metadata
    import random

    # an editable install of palm_rlhf may sit in the system site the venv shares: block it,
    # and keep this repository off sys.path, so only the reference can produce the fixtures
    sys.meta_path.insert(0, _BlockOurs())
    if ROOT in {Path(p or ".").resolve() for p in sys.path}:
        raise SystemExit(f"{ROOT} is on sys.path: run the worker with python -I elsewhere")
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    facts: dict = dict(
        reference=f"palm-rlhf-pytorch=={importlib.metadata.version('palm-rlhf-pytorch')}",
        torch=torch.__version__.split("+")[0],
        regenerate="python benchmarks/make_reference_fixtures.py",
    )
    tensors: dict = {}
    build_palm_fixtures(out, tensors, facts)
    build_reward_fixtures(out, tensors, facts)
    build_critic_fixtures(out, tensors, facts)
    facts["train_counts"] = [
        measure_train(2, 3, 2, 6),
        measure_train(1, 5, 5, 6, minibatch_size=2, epochs=2),
        measure_train(3, 2, 4, 5, minibatch_size=3),
        measure_train(1, 3, 1, 2, prompt_len=3),
    ]
    facts["generate"] = measure_generate()
    facts["actor_critic_parameters"] = measure_actor_lora()
    facts["prompt_padding"] = measure_pad_handling()
    facts["max_norm_path"] = measure_max_norm()
    facts["critic_paths"] = measure_critic_paths()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "outputs.safetensors"))
    (out / "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    build_dropin_fixtures(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run inside the reference venv")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    main_worker(args.out) if args.worker else main_host()
