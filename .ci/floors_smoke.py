"""Smoke run for `.ci/floors`: the library on the oldest dependency versions setup.py allows.

    python .ci/floors_smoke.py NAME==VERSION ...

First checks that each NAME is installed at exactly VERSION (so the floor really is what ran),
then exercises the API each floor was chosen for: a tiny PaLM's forward and backward (SDPA with
enable_gqa, causal and masked), one Accelerate-prepared AdamW step, KV-cached sampling equal to
uncached sampling, FSDP2 (`fully_shard` on a one-process gloo mesh, then a full state dict) and
Accelerate's FSDP2 plugin. Exits non-zero, naming the failed check, on any difference.
"""

import os
import sys
import tempfile
from importlib.metadata import version

import torch


def check_versions(pins: list[str]) -> None:
    for pin in pins:
        name, wanted = pin.split("==")
        found = version(name)
        # "0.7" pins 0.7.0; a torch wheel may carry a local tag (2.6.0+cpu)
        if found.split("+")[0] not in (wanted, wanted + ".0"):
            raise SystemExit(f"floors: {name} is {found}, not the floor {wanted}")
        print(f"floors: {name} {found}")


def main(pins: list[str]) -> None:
    check_versions(pins)
    import palm_rlhf
    from palm_rlhf.model.palm import PaLM
    from palm_rlhf.model.sampling import sample_tokens

    print(f"floors: palm_rlhf {palm_rlhf.__version__} imported on torch {torch.__version__}")
    torch.manual_seed(0)
    model = PaLM(num_tokens=32, dim=32, depth=2, heads=4, dim_head=8, ff_mult=2)
    seq = torch.randint(1, 32, (2, 12))

    # forward/backward: the causal SDPA call, then the masked one (padding mask)
    loss = model(seq, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters()), "grads"
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False
    assert torch.isfinite(model(seq, mask=mask)).all(), "masked forward"
    model.zero_grad(set_to_none=True)

    # one Accelerate-prepared optimiser step changes the weights
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    before = [p.detach().clone() for p in prepared.parameters()]
    accelerator.backward(prepared(seq, return_loss=True))
    optimizer.step()
    optimizer.zero_grad()
    assert any(not torch.equal(a, p) for a, p in zip(before, prepared.parameters())), "step"
    model = accelerator.unwrap_model(prepared).eval()

    # greedy sampling with the KV cache equals sampling that re-runs the prefix
    prompt = seq[:, :4]
    cached = sample_tokens(model, prompt, 6, temperature=0.0)
    uncached = sample_tokens(model, prompt, 6, temperature=0.0, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens), "cached vs uncached sampling"

    # FSDP2: fully_shard on a one-process gloo mesh, a sharded forward, a full state dict
    import torch.distributed as dist

    from palm_rlhf.train.sharding import fsdp_plugin, full_state, is_sharded, shard_modules

    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{os.path.join(tmp, 'rendezvous')}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        try:
            reference = model(seq)
            shard_modules([model], accelerator)
            assert is_sharded(model), "fully_shard"
            torch.testing.assert_close(model(seq), reference, atol=1e-6, rtol=1e-6)
            state = full_state(model)
            assert all(not hasattr(t, "device_mesh") for t in state.values()), "full state"
        finally:
            dist.destroy_process_group()
    assert fsdp_plugin().fsdp_version == 2, "accelerate FSDP2 plugin"
    print("floors: smoke passed")


if __name__ == "__main__":
    main(sys.argv[1:])
