"""Sharded training (FSDP2): every parameter, gradient and optimizer state split across processes.

Two routes to the same thing, PyTorch's `fully_shard` with each `ParallelBlock` one unit and the
root model the last one (embeddings, final norm, LoRA scopes, heads):

    GPUs        Accelerate's FSDP2 plugin (`fsdp_plugin`) is handed to the Accelerator, and
                `accelerator.prepare` shards the model (and mixed precision follows the plugin).
    CPU procs   Accelerate refuses to shard on the CPU (it reports MULTI_CPU and keeps every
                parameter whole), so `shard` calls `fully_shard` itself on a
                `init_device_mesh("cpu", (world,))` over gloo, BEFORE the optimizer is made (the
                optimizer must hold the sharded DTensor parameters), and `prepare` keeps the model
                away from Accelerate so it is not wrapped in DDP as well.

Checkpoints stay full and unsharded, readable by one process: `gather_weights` collects the full
state dict (a collective: every rank calls it) into an unsharded CPU twin kept by the main
process (`template`), from which the ordinary atomic writers save; `load_weights` loads a file
into that twin with the model's own checks and broadcasts it into the shards. The optimizer
state is gathered and restored as a full, parameter-name-keyed dict (`full_optimizer_state`).

Sampling goes through the model's forward (see `model/sampling.py`), so FSDP's hooks gather each
unit's parameters for the step, the KV cache included; every rank must sample together.

Costs and limits: the twin is one full copy of the model in the main process's CPU memory (the
gathered checkpoint needs that much there anyway). PPO, whose actor, critic and reference share
one PaLM, shards with `shard_modules` on every device type (Accelerate prepares one model per
call and cannot express the sharing), and saves only trained tensors, gathered with
`full_state` and restored slice by slice with `load_full_state`.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from palm_rlhf.model.palm import ParallelBlock


def _full(cpu_offload: bool, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True, cpu_offload=cpu_offload, broadcast_from_rank0=broadcast
    )


def fsdp_plugin():
    """Accelerate's FSDP2 plugin for GPUs: one unit per ParallelBlock, full state dicts."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["ParallelBlock"],
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
    )


def by_accelerate(accelerator) -> bool:
    """True when Accelerate itself shards (its FSDP plugin is active: GPUs)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, accelerator, enabled: bool) -> Optional[nn.Module]:
    """Prepare `model` for sharded training; returns the main process's unsharded CPU twin.

    Call before the optimizer is made. On CPU processes the model is sharded here, in place;
    under Accelerate's plugin `accelerator.prepare` shards it later (also when the plugin came
    from an `accelerate launch` FSDP config rather than `enabled`). None when not sharding
    (`enabled` False without such a config, or a single process: there is nothing to split).
    """
    if not (enabled or by_accelerate(accelerator)) or accelerator.num_processes == 1:
        return None
    template = copy.deepcopy(model).cpu() if accelerator.is_main_process else None
    if not by_accelerate(accelerator):
        shard_modules([model], accelerator)
    return template


def shard_modules(roots: list[nn.Module], accelerator) -> None:
    """`fully_shard` every ParallelBlock inside `roots`, then each root, on one device mesh
    over all processes. Roots may share nothing; a PaLM shared by several networks is one root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for root in roots:
        for module in root.modules():
            if isinstance(module, ParallelBlock) and not is_sharded(module):
                fully_shard(module, mesh=mesh)
        fully_shard(root, mesh=mesh)


def holds_shards(module: nn.Module) -> bool:
    """True when any parameter of `module` is a DTensor shard (the module or a part sharded)."""
    return any(hasattr(param, "device_mesh") for param in module.parameters())


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered into its full tensor (collective when
    sharded: every rank calls it, in the same order)."""
    return {name: gathered_tensor(value) for name, value in module.state_dict().items()}


@torch.no_grad()
def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state, strict=True)` for full tensors into a possibly sharded
    module: each rank copies in its own slice (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, target in own.items():
        full = state[name].to(device=target.device, dtype=target.dtype)
        if hasattr(target, "device_mesh"):
            piece = distribute_tensor(
                full, target.device_mesh, target.placements, src_data_rank=None
            )
            target.to_local().copy_(piece.to_local())
        else:
            target.copy_(full)


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """What a checkpoint stores: the full state by name when `model` holds shards (collective;
    the main process gets it, the others {}), else `optimizer.state_dict()`."""
    return full_optimizer_state(model, optimizer) if holds_shards(model) else optimizer.state_dict()


def prepare(accelerator, model: nn.Module, *objects):
    """`accelerator.prepare(model, *objects)`, except that a model this module sharded itself
    stays out of it (Accelerate would wrap it in DDP too). Returns (model, *objects)."""
    if is_sharded(model) and not by_accelerate(accelerator):
        prepared = accelerator.prepare(*objects) if objects else ()
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        return (model, *prepared)
    return accelerator.prepare(model, *objects)


def settle(model: nn.Module) -> None:
    """Return a sharded model to its shards. FSDP2 leaves the root's parameters gathered after
    a forward (it expects a backward next); after no-grad passes (evaluation, sampling) this
    frees them and puts every parameter back to the DTensor shard the state-dict and
    optimizer code expect. A no-op for a model that is not sharded."""
    if is_sharded(model):
        model.reshard()


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one


def gather_weights(model: nn.Module, template: Optional[nn.Module]) -> Optional[nn.Module]:
    """Collect the full weights (collective: call on every rank) into `template` on the main
    process; returns the template there, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    settle(model)
    full = get_model_state_dict(model, options=_full(cpu_offload=True))
    if template is None:
        return None
    template.load_state_dict(full, strict=True)
    return template


def load_weights(model: nn.Module, template: Optional[nn.Module], path) -> None:
    """Load a weights file into a sharded model (collective). The main process reads it into
    the unsharded twin with the model's own `load` checks; the result is broadcast to shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    settle(model)
    full = {}
    if template is not None:
        template.load(path)
        full = template.state_dict()
    set_model_state_dict(model, full, options=_full(cpu_offload=False, broadcast=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state unsharded and keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer), options=_full(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Restore an optimizer state written by either kind of run into either kind of model.

    A sharded run writes the full state keyed by parameter name (`full_optimizer_state`), an
    unsharded one `optimizer.state_dict()` keyed by position. Positions are turned into names
    (the optimizer lists parameters in the same order either way), and the named state goes in
    through `set_optimizer_state_dict`, which splits it into shards (collective when sharded)
    or loads it whole into an unsharded model."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = _inner(optimizer)
    if not _name_keyed(state):
        if not holds_shards(model):
            optimizer.load_state_dict(state)  # the plain path, through Accelerate's wrapper
            return
        state = _by_name(state, model, inner)
    set_optimizer_state_dict(model, inner, state, options=_full(cpu_offload=False))


def _name_keyed(state: dict) -> bool:
    groups = state.get("param_groups", [])
    return any(isinstance(key, str) for group in groups for key in group.get("params", []))


def _by_name(state: dict, model: nn.Module, optimizer) -> dict:
    """A position-keyed optimizer state re-keyed by parameter name."""
    names = {id(param): name for name, param in model.named_parameters()}
    ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    position = iter(ordered)
    groups = [
        {**group, "params": [next(position) for _ in group["params"]]}
        for group in state["param_groups"]
    ]
    return {
        "state": {ordered[i]: value for i, value in state["state"].items()},
        "param_groups": groups,
    }


def local_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """name -> (full shape, this rank's local shard shape) of every parameter."""
    shapes = {}
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        shapes[name] = (tuple(param.shape), tuple(local.shape))
    return shapes


def gathered_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), a plain tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
