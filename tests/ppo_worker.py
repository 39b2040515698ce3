"""Run by tests/test_ppo_processes.py in 2 gloo processes. Writes OUT/rank-<i>.json with
- this rank's half of a fixed experience, whitened with global statistics;
- an uninterrupted PPO run's update-2 record, and the record of a fresh trainer that loaded
  the update-1 checkpoint and ran update 2."""

import json
import sys
from functools import partial
from pathlib import Path

import torch

from palm_rlhf.functional.advantages import gae, kl_penalized_rewards
from palm_rlhf.functional.kl import kl_per_token
from palm_rlhf.functional.masked import whiten
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from tests.toy_ppo import toy_palm, toy_trainer


def fixed_experience():
    """(x, values, mask) (8, 6): a ragged mask, every row with at least one token."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, generator=generator) * 3 + 1
    values = torch.randn(8, 6, generator=generator)
    lengths = torch.randint(1, 7, (8,), generator=generator)
    mask = torch.arange(6)[None] < lengths[:, None]
    return x, values, mask


def batch_statistics(x, values, mask, all_reduce=None) -> dict:
    """What PPO whitens over the batch, for the fixed experience (or one process's shard)."""
    advantages, _ = gae(x, values, mask, 0.9, 0.95)
    rewards = kl_penalized_rewards(x[:, 0], kl_per_token(values, values * 0.5), mask, 0.1)
    return dict(
        whiten=whiten(x, mask, all_reduce=all_reduce),
        scale_only=whiten(x, mask, shift_mean=False, all_reduce=all_reduce),
        gae=whiten(advantages, mask, all_reduce=all_reduce),
        rewards=whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce),
    )


def trainer(**overrides) -> RLHFTrainer:
    """The toy task (tests/toy_ppo.py) at depth 2, small batches, whitened rewards."""
    options = dict(minibatch_size=8, epochs=1, rollout_batch_size=16, whiten_rewards=True)
    return toy_trainer(toy_palm(depth=2), **options, progress=False, **overrides)


def sharded(out: Path, critic: dict) -> None:
    """PPO with LoRA actor and critic on one sharded PaLM, responses ending at EOS (so ranks
    finish sampling at different steps), saved and loaded into a fresh sharded trainer.
    `critic`: the critic's kind (empty: per token, regression)."""
    first = trainer(fsdp=True, **critic)
    run = dict(max_response_tokens=6, rollouts_per_update=16, progress=False, eos_token=2)
    records = first.train(num_rollouts=32, **run)
    saved = first.save(out / "ckpt")
    state = {
        k: v.tolist()
        for k, v in {
            **first.actor_module.trainable_state(),
            **first.critic_module.trainable_state(),
        }.items()
    }
    loaded = trainer(fsdp=True, **critic).load(out / "ckpt")
    again = {
        k: v.tolist()
        for k, v in {
            **loaded.actor_module.trainable_state(),
            **loaded.critic_module.trainable_state(),
        }.items()
    }
    more = loaded.train(num_rollouts=16, **run)  # a loaded sharded trainer keeps training
    params = first.actor_module.palm.named_parameters()
    record = {
        "world": first.accelerator.num_processes,
        "types": sorted({type(p).__name__ for _, p in params}),
        "records": records,
        "more": more,
        "state": state,
        "loaded": again,
        "saved": saved is not None,
    }
    rank = first.accelerator.process_index
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    first = trainer()
    accelerator = first.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    x, values, mask = fixed_experience()
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    all_reduce = partial(accelerator.reduce, reduction="sum")
    shard = batch_statistics(x[mine], values[mine], mask[mine], all_reduce)

    run = dict(max_response_tokens=6, rollouts_per_update=16, progress=False)
    first.train(num_rollouts=16, checkpoint_every=1, checkpoint_dir=out / "ckpt", **run)
    uninterrupted = first.train(num_rollouts=16, **run)[0]
    resumed = trainer().load(out / "ckpt" / "update-0000001")
    continued = resumed.train(num_rollouts=16, **run)[0]
    rng = torch.load(out / "ckpt" / "update-0000001" / "rng.pt", weights_only=True)
    record = {
        "world": world,
        "shard": {k: v.tolist() for k, v in shard.items()},
        "uninterrupted": uninterrupted,
        "continued": continued,
        "saved_ranks": len(rng["ranks"]),
        "ranks_differ": not torch.equal(
            rng["ranks"][0]["generator"], rng["ranks"][-1]["generator"]
        ),
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


# the reference project's critic: one value per sequence, HL-Gauss bins (here over 0..1)
BINNED = dict(
    critic_pooled_values=True,
    critic_num_pred_bins=6,
    hl_gauss_loss_kwargs=dict(min_value=0.0, max_value=1.0),
)

if __name__ == "__main__":
    if sys.argv[2:3] == ["fsdp"]:
        sharded(Path(sys.argv[1]), BINNED if sys.argv[3:] == ["binned"] else {})
    else:
        main(Path(sys.argv[1]))
