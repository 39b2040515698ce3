"""The three networks of RLHF PPO over one PaLM: actor (policy), reference policy, critic.

    actor      a LoRA scope on the user's PaLM (`actor_lora=True`), or a full-weight copy
    reference  the frozen starting policy: the same PaLM with adapters disabled when the actor
               is LoRA (no extra copy), otherwise the user's PaLM itself, left untouched
    critic     its own LoRA scope on the user's PaLM, or a full-weight copy, plus a value head
               Linear(dim, 1) read at every position: values (b, n)

Scope names are made unique per PaLM ("actor", "actor-1", ...), so any number of trainers
can share one base model. The modules here only compute; the trainer owns optimisers and devices.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.flowrl import LogPartition
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


class Actor(nn.Module):
    """The policy: `actor(tokens (b, n)) -> logits (b, n, num_tokens)` through its scope."""

    def __init__(self, palm: PaLM, scope: Optional[str], dropout: float = 0.0):
        super().__init__()
        self.palm, self.scope, self.dropout = palm, scope, dropout

    def forward(self, tokens: Tensor, **palm_kwargs) -> Tensor:
        with update_dropout(self.palm, self.dropout):
            return self.palm(tokens, finetune_scope=self.scope, **palm_kwargs)

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


class Critic(Actor):
    """The value function: `critic(tokens (b, n)) -> values (b, n)`, V at every position.

    The value head reads the final hidden state; its weight starts at zero, so every value
    starts equal to the bias (0, or the mean return of the first rollout: see the trainer).
    """

    def __init__(self, palm: PaLM, scope: Optional[str]):
        super().__init__(palm, scope)
        self.value_head = nn.Linear(palm.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(palm.token_emb.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        with update_dropout(self.palm, self.dropout):
            hidden = self.palm(tokens, finetune_scope=self.scope, return_only_embedding=True)
        return rearrange(self.value_head(hidden), "b n 1 -> b n")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), *self.value_head.parameters()]

    def trainable_state(self) -> dict[str, Tensor]:
        sharding.settle(self.value_head)
        head = {f"value_head.{k}": v for k, v in sharding.full_state(self.value_head).items()}
        return {**super().trainable_state(), **head}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        super().load_trainable_state(state)
        head = {k[len("value_head.") :]: v for k, v in state.items() if k.startswith("value_head.")}
        sharding.settle(self.value_head)
        sharding.load_full_state(self.value_head, head)


def build_actor_critic(
    palm: PaLM,
    actor_lora: bool,
    critic_lora: bool,
    actor_lora_r: int,
    critic_lora_r: int,
    actor_lora_scope: Optional[str],
    critic_lora_scope: Optional[str],
    with_critic: bool = True,
) -> tuple[Actor, PaLM, Optional[Critic]]:
    """(actor, reference PaLM, critic) as described in the module docstring.

    With a LoRA actor the reference is the user's PaLM queried with `disable_lora=True` (no
    copy). With `actor_lora=False` the actor trains the user's PaLM itself, in place, as in the
    reference project, and the frozen reference policy is a copy taken now (which also carries
    the critic's LoRA scope, so the critic reads a base that does not move). With
    `with_critic=False` (critic-free algorithms) no critic scope or copy is made: None.
    """
    if actor_lora:
        reference = palm
        actor = Actor(palm, claim_scope(palm, actor_lora_scope, "actor", actor_lora_r))
    else:
        reference = bare_copy(palm).requires_grad_(False)
        actor = Actor(palm, None)
    if not with_critic:
        critic = None
    elif critic_lora:
        scope = claim_scope(reference, critic_lora_scope, "critic", critic_lora_r)
        critic = Critic(reference, scope)
    else:
        critic = Critic(bare_copy(palm), None)
    return actor, reference, critic


def build_networks(
    palm: PaLM, config, actor_lora_scope: Optional[str], critic_lora_scope: Optional[str], device
) -> tuple[PaLM, dict[str, nn.Module]]:
    """(reference, trained networks by name) for a PPOConfig's algorithm: the actor; the
    critic for PPO only; FlowRL's log-partition head (`flowrl.LogPartition`) for FlowRL."""
    actor, reference, critic = build_actor_critic(
        palm,
        config.actor_lora,
        config.critic_lora,
        config.actor_lora_r,
        config.critic_lora_r,
        actor_lora_scope,
        critic_lora_scope,
        with_critic=config.has_critic,
    )
    actor.dropout = config.actor_dropout
    if critic is not None:
        critic.dropout = config.critic_dropout
    nets = {"actor": actor, "critic": critic}
    if config.algorithm == "flowrl":
        nets["log_z"] = LogPartition(palm.dim)
    return reference, {name: net.to(device) for name, net in nets.items() if net is not None}


def shard_networks(accelerator, nets: dict[str, nn.Module], reference: PaLM, fsdp: bool) -> bool:
    """With `fsdp` and several processes, FSDP2 over the networks: every distinct PaLM (one,
    shared, with LoRA actor and critic; copies otherwise), the value head and FlowRL's log Z
    head, each a root of its own shards. Returns whether it sharded."""
    if not fsdp or accelerator.num_processes == 1:
        return False
    palms = [reference] + [nets[name].palm for name in ("actor", "critic") if name in nets]
    heads = [nets["critic"].value_head] if "critic" in nets else []
    heads += [nets["log_z"]] if "log_z" in nets else []
    distinct = {id(module): module for module in palms + heads}
    sharding.shard_modules(list(distinct.values()), accelerator)
    return True


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
