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
        "shared_prefix": shared_prefix_parity(model, twin, prompt),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(record))


def shared_prefix_parity(model, twin, prompt) -> dict:
    """Logits and LoRA gradients of groups of 2 rows sharing each prompt: the sharded model
    runs every block twice per forward (prefix, then the rest), the twin the plain forward."""
    rest = torch.randint(1, 32, (6, 4), generator=torch.Generator().manual_seed(2))
    x = torch.cat((prompt.repeat_interleave(2, dim=0), rest), dim=1)
    record = {}
    for name, net, shared in (("sharded", model, (2, 5)), ("twin", twin, None)):
        logits = net(x, finetune_scope="sft", shared_prefix=shared)
        logits.square().mean().backward()
        grads = {
            key: getattr(p.grad, "full_tensor", lambda g=p.grad: g)().tolist()
            for key, p in net.finetune_modules.named_parameters()
        }
        record[name] = {"logits": logits.detach().tolist(), "grads": grads}
        net.zero_grad(set_to_none=True)
        sharding.settle(net)
    return record


if __name__ == "__main__":
    from palm_rlhf.train.accelerator import release_processes

    main(Path(sys.argv[1]))
    release_processes(exit_code=0)
