"""Run by tests/test_fsdp.py in 2 gloo processes: shard a tiny PaLM (with a LoRA scope) the way
the trainers do, then report each rank's shard shapes and what the sharded model samples next
to its unsharded twin. Writes OUT/rank-<i>.json."""

import json
import sys
from pathlib import Path

import torch

from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.train import sharding
from palm_rlhf.train.accelerator import make_accelerator
from tests.helpers import randomize_lora, tiny_palm


def main(out: Path) -> None:
    accelerator = make_accelerator(seed=0)
    model = tiny_palm(max_seq_len=32)
    model.add_finetune_params("sft", lora_r=4)
    randomize_lora(model, "sft")
    twin = tiny_palm(max_seq_len=32)  # the same seed: the same weights, never sharded
    twin.add_finetune_params("sft", lora_r=4)
    twin.load_state_dict(model.state_dict())
    sharding.shard(model, accelerator, enabled=True)
    shapes = sharding.local_shapes(model)
    types = sorted({type(p).__name__ for p in model.parameters()})

    prompt = torch.randint(1, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    samples = {}
    for scope in (None, "sft"):
        for name, net in (("sharded", model), ("twin", twin)):
            greedy = sample_tokens(net, prompt, 10, temperature=0.0, finetune_scope=scope)
            sampled = sample_tokens(
                net,
                prompt,
                10,
                temperature=1.0,
                top_k=8,
                finetune_scope=scope,
                generator=torch.Generator().manual_seed(7),
            )
            samples[f"{name}/{scope}/greedy"] = greedy.tokens.tolist()
            samples[f"{name}/{scope}/top_k"] = sampled.tokens.tolist()
        sharding.settle(model)
    # no-cache decoding (the whole prefix re-run every step) through the shards as well
    uncached = sample_tokens(model, prompt, 6, temperature=0.0, use_cache=False).tokens
    samples["sharded/None/uncached"] = uncached.tolist()
    record = {
        "shapes": shapes,
        "types": types,
        "samples": samples,
        "world": accelerator.num_processes,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from palm_rlhf.train.accelerator import release_processes

    main(Path(sys.argv[1]))
    release_processes(exit_code=0)
