"""The policy side of RL over one PaLM, and the bookkeeping every trained network shares.

    ScopedPaLM a trained network on a PaLM (a LoRA scope or full weights): what the actor and
               the critics share
    Actor      the policy: a LoRA scope on the user's PaLM (`actor_lora=True`), or the PaLM
               itself trained in place (`actor_lora=False`)
    helpers    LoRA scope claiming, a bare copy of a PaLM, dropout for one update's forward,
               Accelerate preparation per network, which parameters train, evaluation mode

Critics live in `critics.py`; `networks.py` assembles actor, reference policy and critic.
Scope names are made unique per PaLM ("actor", "actor-1", ...), so any number of trainers
can share one base model. The modules here only compute; the trainer owns optimisers and devices.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from palm_rlhf.model.palm import PaLM
from palm_rlhf.train import sharding


def claim_scope(palm: PaLM, requested: Optional[str], default: str, lora_r: int) -> str:
    """Add a fresh LoRA scope for one trainer role and return its name.

    With `requested=None` a unique name derived from `default` is chosen. An explicitly
    requested name that already exists is refused: sharing adapters between two trainers (or
    with a reward model) silently would make them train each other's weights.
    """
    if requested is not None and requested in palm.finetune_modules:
        raise ValueError(
            f"LoRA scope {requested!r} already exists on this PaLM (another trainer or model "
            f"owns it); pass a different name, or None to get a fresh unique scope"
        )
    name = requested if requested is not None else palm.free_scope_name(default)
    palm.add_finetune_params(name, lora_r=lora_r)
    return name


def bare_copy(palm: PaLM) -> PaLM:
    """A deep copy of the PaLM's base weights without any LoRA scope (for full fine-tuning)."""
    twin = copy.deepcopy(palm)
    for scope in twin.finetune_scopes:
        twin.remove_finetune_params(scope)
    return twin


@contextmanager
def update_dropout(palm: PaLM, rate: float):
    """Dropout at `rate` inside the (possibly shared) PaLM for one forward that computes
    gradients: the actor's and critic's own rates (`actor_dropout`, `critic_dropout`) apply to
    their updates only; rollouts and scoring (no grad) never drop. The PaLM's rates and mode
    are restored afterwards."""
    if rate <= 0 or not torch.is_grad_enabled():
        yield
        return
    config, training = palm.config, palm.training
    palm.set_dropout(rate).train(True)
    try:
        yield
    finally:
        palm.use_config(config).train(training)


class ScopedPaLM(nn.Module):
    """A trained network on a PaLM: its LoRA scope (or, with scope None, the PaLM's own
    weights), its dropout during updates, and the parameters and state that train. The actor
    and the critics (`critics.py`) are each one; they differ in their forward."""

    def __init__(self, palm: PaLM, scope: Optional[str], dropout: float = 0.0):
        super().__init__()
        self.palm, self.scope, self.dropout = palm, scope, dropout

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.scope is None:
            return self.palm.palm_parameters()
        return self.palm.finetune_parameters(self.scope)

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained tensors under role-generic names (independent of the scope's name)."""
        sharding.settle(self.palm)  # under FSDP2: gathered from the shards (collective)
        if self.scope is None:
            return {f"palm.{k}": v for k, v in sharding.full_state(self.palm).items()}
        scope = sharding.full_state(self.palm.finetune_modules[self.scope])
        return {f"lora.{k}": v for k, v in scope.items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        prefix = "palm." if self.scope is None else "lora."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        target = self.palm if self.scope is None else self.palm.finetune_modules[self.scope]
        sharding.settle(self.palm)
        sharding.load_full_state(target, own)  # each rank takes its slice when sharded


class Actor(ScopedPaLM):
    """The policy: `actor(tokens (b, n)) -> logits (b, n, num_tokens)` through its scope."""

    def forward(self, tokens: Tensor, **palm_kwargs) -> Tensor:
        with update_dropout(self.palm, self.dropout):
            return self.palm(tokens, finetune_scope=self.scope, **palm_kwargs)


def prepare_each(
    accelerator, nets: list[nn.Module], optimizers: list, sharded: bool = False
) -> list[tuple]:
    """Accelerate-prepare each network with its optimizer, with only that network's own
    parameters trainable at the time, so DDP registers exactly those (LoRA scopes of several
    networks share one PaLM). Sharded networks stay out of Accelerate (no DDP on top)."""
    if sharded:
        return [(net, accelerator.prepare(optimizer)) for net, optimizer in zip(nets, optimizers)]
    prepared = []
    for net, optimizer in zip(nets, optimizers):
        with only_these_require_grad(nets, net.trainable_parameters()):
            prepared.append(accelerator.prepare(net, optimizer))
    return prepared


def all_parameters(modules: Iterable[nn.Module]) -> Iterator[nn.Parameter]:
    """Each parameter of the modules once, even when modules share a PaLM."""
    seen = set()
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield param


@contextmanager
def only_these_require_grad(modules: Iterable[nn.Module], trainable: Iterable[nn.Parameter]):
    """Within the block, of all the modules' parameters only `trainable` require grad.

    The base PaLM's weights (and other trainers' or the reward model's adapters) get no
    gradient buffers and cost no backward FLOPs; the user's flags are restored on exit.
    """
    keep = {id(p) for p in trainable}
    params = list(all_parameters(modules))
    flags = [p.requires_grad for p in params]
    try:
        for param in params:
            param.requires_grad_(id(param) in keep)
        yield
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)


@contextmanager
def evaluation_mode(modules: Iterable[nn.Module]):
    """Dropout off for the block (PPO samples, scores and updates without it, so the PPO ratio
    is exactly 1 before the first step); every submodule's own mode is restored on exit, and
    sharded (FSDP2) modules return to their shards (`sharding.settle`) after no-grad passes."""
    submodules = {id(sub): sub for module in modules for sub in module.modules()}
    flags = {key: sub.training for key, sub in submodules.items()}
    try:
        for sub in submodules.values():
            sub.training = False
        yield
    finally:
        for key, sub in submodules.items():
            sub.training = flags[key]
            sharding.settle(sub)
