"""PPO under several processes, exactly: whitening with global statistics, every rank's
sampling generators saved and restored, and fp16 (two optimizers, one scaler) refused."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from palm_rlhf.functional.masked import whiten
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from tests.helpers import launch
from tests.ppo_worker import batch_statistics, fixed_experience
from tests.toy_ppo import PROMPTS
from tests.toy_ppo import fraction_of_target as reward

REPO = Path(__file__).resolve().parents[1]


def test_whiten_alone_uses_the_tensors_own_statistics_and_shards_with_summed_moments_the_whole():
    x, _, mask = fixed_experience()
    kept = x[mask].double()
    expected = torch.where(mask, (x - kept.mean()) / (kept.var() + 1e-8).sqrt(), 0)
    assert_close(whiten(x, mask), expected.float(), atol=1e-6, rtol=1e-6)
    assert_close(
        whiten(x, mask, shift_mean=False),
        torch.where(mask, expected + kept.mean(), 0).float(),
        atol=1e-6,
        rtol=1e-6,
    )
    # an all-reduce over two shards, played by hand: the sum of both shards' moments
    shards = (slice(0, 3), slice(3, 8))
    moments = []
    for s in shards:  # record what each shard would send to the all-reduce
        whiten(x[s], mask[s], all_reduce=lambda t: moments.append(t) or t)
    summed = sum(moments)
    parts = [whiten(x[s], mask[s], all_reduce=lambda _: summed) for s in shards]
    assert_close(torch.cat(parts), whiten(x, mask), atol=1e-6, rtol=1e-6)
    # local statistics would NOT agree: the shards' means differ
    local = torch.cat([whiten(x[s], mask[s]) for s in shards])
    assert (local - whiten(x, mask)).abs().max() > 0.1


def test_whiten_leaves_a_batch_with_fewer_than_two_tokens_alone():
    # the masked entry passes through; the masked-out 5.0 is 0, as whiten's output always is
    x, mask = torch.tensor([[2.0, 5.0]]), torch.tensor([[True, False]])
    assert_close(whiten(x, mask), torch.tensor([[2.0, 0.0]]), atol=0, rtol=0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_whiten_globally_and_resume_with_every_ranks_generators(tmp_path):
    launch([str(REPO / "tests" / "ppo_worker.py"), str(tmp_path)], 2, cwd=REPO)
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["world"] == 2

    # 1. the fixed experience split over 2 processes is whitened as one process whitens it
    x, values, mask = fixed_experience()
    for key, expected in batch_statistics(x, values, mask).items():
        got = torch.tensor(ranks[0]["shard"][key] + ranks[1]["shard"][key])
        assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=key)

    # 2. resumed from update 1, update 2 is the uninterrupted run's update 2 on both ranks,
    # because each rank got its own generators back (and they really are different streams)
    for record in ranks:
        assert record["saved_ranks"] == 2 and record["ranks_differ"]
        expected, got = record["uninterrupted"], record["continued"]
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-8), key
    assert ranks[0]["continued"] == ranks[1]["continued"]  # metrics are gathered


def test_fp16_is_refused_for_ppo_with_the_reason():
    with pytest.raises(ValueError, match="fp16.*one gradient scaler.*bf16"):
        PPOConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="fp16"):
        RLHFTrainer(
            palm=__import__("tests.helpers").helpers.tiny_palm(num_tokens=12),
            reward_model=reward,
            prompt_token_ids=PROMPTS,
            mixed_precision="fp16",
        )
    assert PPOConfig(mixed_precision="bf16").mixed_precision == "bf16"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.parametrize("critic", ["per-token", "binned"])
def test_sharded_ppo_with_lora_scopes_on_one_palm(tmp_path, critic):
    """`binned`: the reference's pooled HL-Gauss critic, whose first-rollout start writes the
    whole (sharded) bias of its value head."""
    kind = ["binned"] if critic == "binned" else []
    launch([str(REPO / "tests" / "ppo_worker.py"), str(tmp_path), "fsdp", *kind], 2, cwd=REPO)
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1)]
    for record in ranks:
        assert record["world"] == 2 and record["types"] == ["DTensor"]  # every PaLM weight
        # the actor starts as the reference (LoRA B = 0): KL exactly 0 on the first rollout
        assert record["records"][0]["kl"] == 0.0
        assert len(record["records"]) == 2 and len(record["more"]) == 1
        # the adapters trained, and a fresh sharded trainer loads exactly what was saved
        assert any(
            abs(x) > 0
            for k, v in record["state"].items()
            if k.endswith(".B")
            for row in v
            for x in row
        )
        assert record["loaded"] == record["state"]
    assert ranks[0]["saved"] and not ranks[1]["saved"]  # written once, by the main process
    # both ranks end with identical gathered weights, and log identical (gathered) records
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["records"] == ranks[1]["records"]
