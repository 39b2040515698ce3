"""One PPO benchmark measurement in a fresh process; prints one JSON line (the last line).

Run by either interpreter, as `_worker.py` is (ours: PYTHONPATH=<repo root>; reference:
``.bench-venv/bin/python -I`` from a neutral directory); the other package is blocked.

Tasks:

- ``throughput``: episodes per second of rollout + update. A PaLM, a LoRA reward model on it
  (each library's own `RewardModel`), random prompts of ``--prompt-len`` tokens (ids 1..V-1,
  so the reference's pad stripping never shortens them) and responses of exactly
  ``--response-len`` tokens (no EOS). After a small warm-up run, ``--episodes`` episodes are
  rolled out and learned from in one PPO update (minibatch 16, one epoch), timed end to end.
  Ours samples ``--rollout-batch`` prompts at a time; the reference one at a time (its loop).
  ``--dtype bf16``: ours with ``mixed_precision="bf16"``, the reference's whole ``train`` call
  under ``torch.autocast("cpu", bfloat16)`` (its Accelerator would not autocast generation).
- ``toy``: the reward reached within a wall-clock ``--budget``. Vocabulary 12, reward = share
  of response tokens equal to 3 (optimum 1), 8-token responses to 3-token prompts, a tiny
  PaLM whose embeddings are drawn with std 0.2 (so LoRA can move the tied output logits, as
  for a pretrained model). Training runs one 64-episode PPO update at a time until the
  budget is spent (evaluation excluded); the policy is then evaluated on 256 fresh samples at
  temperature 1 without logit filtering (and, for the reference, also with the top-k filter
  its trainer samples with).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _worker (not the repo root)

from _worker import isolate  # noqa: E402

TOY_PROMPTS = [[5, 6, 7], [8, 9, 10], [4, 5, 6]]
TARGET = 3


def toy_fraction(seq, mask, prompt_mask):
    response = mask & ~prompt_mask
    return ((seq == TARGET) & response).sum(-1).float() / response.sum(-1).clamp(min=1)


def make_palm(impl: str, args, embed_std=None):
    import torch

    PaLM = __import__(
        "palm_rlhf.model.palm" if impl == "ours" else "palm_rlhf_pytorch", fromlist=["PaLM"]
    ).PaLM
    torch.manual_seed(0)
    palm = PaLM(
        num_tokens=args.num_tokens,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim_head,
        ff_mult=4 if embed_std is None else 2,
    )
    if embed_std is not None:
        with torch.no_grad():
            palm.token_emb.weight.normal_(0, embed_std)
    return palm


def reference_trainer(palm, reward_model, prompts, **kwargs):
    from palm_rlhf_pytorch import RLHFTrainer

    return RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts, **kwargs)


def quiet():
    """The reference prints every minibatch loss and a tqdm bar per generation: swallow both."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


# ----------------------------------------------------------------------------- throughput


def throughput(impl: str, args) -> dict:
    import torch

    palm = make_palm(impl, args)
    parameters = sum(p.numel() for p in palm.parameters())  # before any LoRA scope is added
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.num_tokens, (64, args.prompt_len), generator=generator)
    max_seq_len = args.prompt_len + args.response_len
    common = dict(minibatch_size=16, epochs=1)
    bf16 = args.dtype == "bf16"
    if impl == "ours":
        from palm_rlhf.model.reward import RewardModel
        from palm_rlhf.rl.ppo.trainer import RLHFTrainer
        from palm_rlhf.rl.scoring_passes import skips_scoring

        trainer = RLHFTrainer(
            palm=palm,
            reward_model=RewardModel(palm),
            prompt_token_ids=prompts,
            rollout_batch_size=args.rollout_batch,
            **common,
            accelerate_kwargs=dict(mixed_precision="bf16" if bf16 else "no"),
        )

        def run(episodes, response_len):
            trainer.train(
                num_rollouts=episodes,
                max_response_tokens=response_len,
                rollouts_per_update=episodes,
                max_seq_len=args.prompt_len + response_len,
                progress=False,
            )

        # reward + critic, and the old and reference log-probs unless the settings skip them
        skips = skips_scoring(trainer.config, args.episodes, num_processes=1)
        passes = dict(scoring=2 if skips else 4)
    else:
        from palm_rlhf_pytorch import RewardModel

        trainer = reference_trainer(palm, RewardModel(palm), prompts, **common)
        passes = dict(scoring=3)  # actor_critic (actor, critic) after generate, reward model

        def run(episodes, response_len):
            # its Accelerator autocasts forward() only, not generation: autocast everything
            with quiet(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                trainer.train(
                    num_episodes=episodes,
                    max_timesteps=1,
                    update_timesteps=episodes,
                    max_seq_len=args.prompt_len + response_len,
                )

    run(min(2, args.episodes), 4)  # warm-up: allocator, kernels, first optimizer step
    start = time.perf_counter()
    run(args.episodes, args.response_len)
    seconds = time.perf_counter() - start
    return dict(
        episodes=args.episodes,
        seconds=seconds,
        episodes_per_s=args.episodes / seconds,
        tokens_per_s=args.episodes * args.response_len / seconds,
        max_seq_len=max_seq_len,
        parameters=parameters,
        # forward passes over the whole sequence per episode, for the FLOP model
        # (bench_ppo.episode_flops): sampling with a cache is one; both libraries train the
        # actor and the critic as LoRA scopes, once (epochs=1)
        passes=dict(sampling=1, **passes, update_forward=2, update_backward=2),
    )


# ----------------------------------------------------------------------------- toy task


def toy(impl: str, args) -> dict:
    import torch

    args.num_tokens, args.dim, args.depth, args.heads, args.dim_head = 12, 32, 1, 2, 16
    palm = make_palm(impl, args, embed_std=0.2)
    prompts = torch.tensor(TOY_PROMPTS)
    settings = dict(
        actor_lr=3e-3, critic_lr=3e-3, actor_lora_r=4, critic_lora_r=4, minibatch_size=16, epochs=2
    )
    new_tokens, eval_rows = 8, 256
    eval_prompts = prompts.repeat(eval_rows // len(TOY_PROMPTS) + 1, 1)[:eval_rows]
    eval_mask = torch.ones_like(eval_prompts, dtype=torch.bool)
    if impl == "ours":
        from palm_rlhf.rl.ppo.trainer import RLHFTrainer

        trainer = RLHFTrainer(
            palm=palm,
            reward_model=toy_fraction,
            prompt_token_ids=prompts,
            rollout_batch_size=64,
            **settings,
        )

        def update():
            trainer.train(
                num_rollouts=64,
                max_response_tokens=new_tokens,
                rollouts_per_update=64,
                progress=False,
            )

        def evaluate(**_):
            with torch.no_grad():
                experience, _ = trainer.rollout(eval_prompts, eval_mask, new_tokens)
            return float(experience.scores.mean())
    else:
        from palm_rlhf_pytorch import RewardModel

        class ToyReward(RewardModel):  # the reference trainer type-checks for a RewardModel
            def forward(self, x, mask=None, prompt_mask=None, **_):
                mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
                return toy_fraction(x, mask, prompt_mask)

        trainer = reference_trainer(palm, ToyReward(palm), prompts, **settings)
        actor = trainer.actor_critic.actor_palm
        scope = trainer.actor_critic.actor_lora_scope

        def update():
            with quiet():
                trainer.train(
                    num_episodes=64,
                    max_timesteps=1,
                    update_timesteps=64,
                    max_seq_len=3 + new_tokens,
                )

        def evaluate(**filters):
            with torch.no_grad(), quiet():
                actor.eval()
                out = actor.generate(
                    3 + new_tokens, prompt=eval_prompts, finetune_scope=scope, **filters
                )
            seq = torch.cat((eval_prompts, out), dim=1)
            prompt_mask = torch.arange(seq.shape[1]) < 3
            prompt_mask = prompt_mask.expand_as(seq)
            return float(toy_fraction(seq, torch.ones_like(prompt_mask), prompt_mask).mean())

    plain = {"filter_logits_fn": None}  # both generate top-k filter by default; measure unfiltered
    before = evaluate(**plain)
    spent, updates = 0.0, 0
    while spent < args.budget:
        start = time.perf_counter()
        update()
        spent += time.perf_counter() - start
        updates += 1
    result = dict(
        budget_s=args.budget,
        spent_s=spent,
        updates=updates,
        episodes=64 * updates,
        reward_before=before,
        reward_after=evaluate(**plain),
    )
    if impl == "reference":
        result["reward_after_as_trained_topk"] = evaluate()  # its default filter_thres=0.9
    return result


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--impl", choices=("ours", "reference"), required=True)
    p.add_argument("--task", choices=("throughput", "toy"), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--rollout-batch", type=int, default=32)
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    args = p.parse_args()
    isolate(args.impl)

    import torch

    torch.set_num_threads(args.threads)
    result = throughput(args.impl, args) if args.task == "throughput" else toy(args.impl, args)
    result.update(
        impl=args.impl,
        task=args.task,
        threads=args.threads,
        dtype=args.dtype,
        torch=torch.__version__,
    )
    if args.task == "throughput":
        result["config"] = {
            k: getattr(args, k)
            for k in (
                "num_tokens",
                "dim",
                "depth",
                "heads",
                "dim_head",
                "prompt_len",
                "response_len",
                "rollout_batch",
            )
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
