"""The networks of one RL run over a PaLM: actor (policy), reference policy, critic.

    actor      a LoRA scope on the user's PaLM (`actor_lora=True`), or that PaLM in place
    reference  the frozen starting policy: the same PaLM with adapters disabled when the actor
               is LoRA (no extra copy), otherwise a frozen copy taken at construction
    critic     by default a LoRA scope on the reference's PaLM (or a full copy with
               `critic_lora=False`) with a value head; `critic=` a separate PaLM (a LoRA scope on
               it, or it trained in place) or an `ImplicitPRM` (see `critics.py`)

`ActorCritic` is the reference project's prebuilt bundle of the three, for
`RLHFTrainer(actor_critic=...)` (its options are PPOConfig's fields, declared there once);
`build_networks` makes the same from a PPOConfig.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

from torch import nn

from palm_rlhf.functional.hl_gauss import HLGauss
from palm_rlhf.model.implicit_prm import ImplicitPRM
from palm_rlhf.model.keywords import POSITIONAL, bind_call, field_parameters, pop_option
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.critics import ProcessRewardCritic, ValueCritic
from palm_rlhf.rl.flowrl import LogPartition
from palm_rlhf.rl.policies import Actor, bare_copy, claim_scope, prepare_each
from palm_rlhf.rl.ppo.config import PPOConfig
from palm_rlhf.rl.update import make_optimizers
from palm_rlhf.train import sharding

CriticModel = Union[PaLM, ImplicitPRM]


def build_actor(palm: PaLM, lora: bool, lora_r: int, scope: Optional[str]) -> tuple[Actor, PaLM]:
    """(actor, frozen reference policy): a LoRA scope on `palm` read against `palm` with the
    adapters off, or `palm` itself trained in place against a frozen copy taken now."""
    if lora:
        return Actor(palm, claim_scope(palm, scope, "actor", lora_r)), palm
    return Actor(palm, None), bare_copy(palm).requires_grad_(False)


def build_critic(
    reference: PaLM,
    palm: PaLM,
    critic: Optional[CriticModel],
    lora: bool,
    lora_r: int,
    scope: Optional[str],
    pooled: bool,
    hl_gauss: Optional[HLGauss],
) -> Union[ValueCritic, ProcessRewardCritic]:
    """The critic network for `critic=` None (on the reference's PaLM or a copy of `palm`), a
    separate PaLM, or an ImplicitPRM (trained whole; pooling and bins do not apply)."""
    if isinstance(critic, ImplicitPRM):
        if critic.model.num_tokens != palm.num_tokens:
            raise ValueError("critic=ImplicitPRM must read the actor's vocabulary (num_tokens)")
        return ProcessRewardCritic(critic)
    if critic is not None and critic.num_tokens != palm.num_tokens:
        raise ValueError(
            f"critic= has num_tokens={critic.num_tokens}, the actor {palm.num_tokens}: a critic "
            "must read the actor's tokens"
        )
    base = critic if critic is not None else reference
    if lora:
        return ValueCritic(base, claim_scope(base, scope, "critic", lora_r), pooled, hl_gauss)
    return ValueCritic(critic if critic is not None else bare_copy(palm), None, pooled, hl_gauss)


# the PPOConfig fields an ActorCritic is built from; the reference spells two of them otherwise
NETWORK_OPTIONS = (
    "actor_lora",
    "critic_lora",
    "actor_lora_r",
    "critic_lora_r",
    "actor_dropout",
    "critic_dropout",
    "critic_pooled_values",
    "critic_num_pred_bins",
    "hl_gauss_loss_kwargs",
)
REFERENCE_NAMES = {
    "pooled_values": "critic_pooled_values",
    "critic_dim_out": "critic_num_pred_bins",
}


class ActorCritic(nn.Module):
    """The reference's `ActorCritic(palm, critic=None, pooled_values=False, ...)`: actor,
    reference policy and critic built once, for `RLHFTrainer(actor_critic=...)`. Its options
    are the trainer's PPOConfig fields, with their defaults (`critic_dim_out` is
    `critic_num_pred_bins`: None for a regression critic); `options` holds the values it was
    built with, which the trainer adopts (a trainer keyword that disagrees is an error:
    `trainer_options`)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        signature = ActorCritic.__signature__
        values = bind_call("ActorCritic", signature, args, kwargs)
        palm, critic, actor_scope, critic_scope = (
            pop_option("ActorCritic", signature, values, name)
            for name in ("palm", "critic", "actor_lora_scope", "critic_lora_scope")
        )
        options = {REFERENCE_NAMES.get(name, name): value for name, value in values.items()}
        if isinstance(critic, ImplicitPRM):
            options["critic_lora"] = False  # a PRM is trained whole
        config = PPOConfig.from_keywords(None, **options)  # the defaults, types and ranges
        self.options = {name: getattr(config, name) for name in NETWORK_OPTIONS}
        bins = config.critic_num_pred_bins
        hl = HLGauss.from_kwargs(bins, config.hl_gauss_loss_kwargs) if bins else None
        self.actor, reference = build_actor(
            palm, config.actor_lora, config.actor_lora_r, actor_scope
        )
        self.critic = build_critic(
            reference,
            palm,
            critic,
            config.critic_lora,
            config.critic_lora_r,
            critic_scope,
            config.critic_pooled_values,
            hl,
        )
        self.actor.dropout, self.critic.dropout = config.actor_dropout, config.critic_dropout
        self.reference = reference


_CRITIC = Optional[Union[PaLM, ImplicitPRM]]
_SCOPE = Optional[str]
ActorCritic.__signature__ = inspect.Signature(
    [
        inspect.Parameter("palm", POSITIONAL, annotation=PaLM),
        inspect.Parameter("critic", POSITIONAL, default=None, annotation=_CRITIC),
        *field_parameters(
            PPOConfig,
            ("pooled_values", "actor_lora", "critic_lora", "actor_lora_r", "critic_lora_r"),
            renamed=REFERENCE_NAMES,
        ),
        inspect.Parameter("actor_lora_scope", POSITIONAL, default=None, annotation=_SCOPE),
        inspect.Parameter("critic_lora_scope", POSITIONAL, default=None, annotation=_SCOPE),
        *field_parameters(
            PPOConfig,
            ("actor_dropout", "critic_dropout", "critic_dim_out", "hl_gauss_loss_kwargs"),
            renamed=REFERENCE_NAMES,
        ),
    ]
)


def trainer_options(actor_critic: ActorCritic, config: Optional[PPOConfig], keywords: dict) -> dict:
    """The trainer's keywords with a prebuilt ActorCritic's network options added. A network
    option the caller also gave the trainer (a keyword, or a field of `config` set away from
    its default) must equal the bundle's: otherwise a ValueError names both values, since the
    networks are built already and the trainer's value could only be ignored."""
    defaults = PPOConfig.from_keywords(None)
    given = {
        name: getattr(config, name)
        for name in NETWORK_OPTIONS
        if config is not None and getattr(config, name) != getattr(defaults, name)
    }
    given.update({name: keywords[name] for name in NETWORK_OPTIONS if name in keywords})
    conflicts = {
        name: value for name, value in given.items() if value != actor_critic.options[name]
    }
    if conflicts:
        built = ", ".join(f"{name}={actor_critic.options[name]!r}" for name in conflicts)
        asked = ", ".join(f"{name}={value!r}" for name, value in conflicts.items())
        raise ValueError(
            f"actor_critic= was built with {built} but the trainer was given {asked}: pass "
            "network options to ActorCritic(...) only"
        )
    return {**keywords, **actor_critic.options}


def build_networks(
    palm: PaLM,
    config,
    actor_lora_scope: Optional[str],
    critic_lora_scope: Optional[str],
    device,
    critic: Optional[CriticModel] = None,
) -> tuple[PaLM, dict[str, nn.Module]]:
    """(reference, trained networks by name) for a PPOConfig's algorithm: the actor; the
    critic for PPO only; FlowRL's log-partition head (`flowrl.LogPartition`) for FlowRL."""
    if config.has_critic:
        spelt = {field: name for name, field in REFERENCE_NAMES.items()}
        options = {spelt.get(name, name): getattr(config, name) for name in NETWORK_OPTIONS}
        bundle = ActorCritic(
            palm,
            critic,
            actor_lora_scope=actor_lora_scope,
            critic_lora_scope=critic_lora_scope,
            **options,
        )
        return networks_of(bundle, device)
    if critic is not None:
        raise ValueError(f"algorithm={config.algorithm!r} has no critic; critic= is for 'ppo'")
    actor, reference = build_actor(palm, config.actor_lora, config.actor_lora_r, actor_lora_scope)
    actor.dropout = config.actor_dropout
    nets = {"actor": actor}
    if config.algorithm == "flowrl":
        nets["log_z"] = LogPartition(palm.dim)
    return reference, {name: net.to(device) for name, net in nets.items()}


def networks_of(bundle: ActorCritic, device) -> tuple[PaLM, dict[str, nn.Module]]:
    """(reference, {"actor", "critic"}) of a built ActorCritic, on `device`."""
    bundle.reference.to(device)
    return bundle.reference, {"actor": bundle.actor.to(device), "critic": bundle.critic.to(device)}


def shard_networks(accelerator, nets: dict[str, nn.Module], reference: PaLM, fsdp: bool) -> bool:
    """With `fsdp` and several processes, FSDP2 over the networks: every distinct PaLM (one,
    shared, with LoRA actor and critic; copies, a separate critic, a PRM's reference
    otherwise), the value head and FlowRL's log Z head, each a root of its own shards. Returns
    whether it sharded."""
    if not fsdp or accelerator.num_processes == 1:
        return False
    palms = [reference] + [nets[name].palm for name in ("actor", "critic") if name in nets]
    critic = nets.get("critic")
    if isinstance(critic, ProcessRewardCritic):
        palms.append(critic.prm.ref_model)
    heads = [critic.value_head] if isinstance(critic, ValueCritic) else []
    heads += [nets["log_z"]] if "log_z" in nets else []
    distinct = {id(module): module for module in palms + heads}
    sharding.shard_modules(list(distinct.values()), accelerator)
    return True


def prepare_networks(
    accelerator,
    palm: PaLM,
    config,
    scopes: tuple[Optional[str], Optional[str]],
    critic: Optional[CriticModel] = None,
    actor_critic: Optional[ActorCritic] = None,
) -> tuple[PaLM, dict[str, tuple], bool]:
    """(reference, {name: (prepared network, its optimizer)}, sharded) for a trainer: the
    networks built (or taken from `actor_critic`), activation checkpointing set on their
    PaLMs, sharded under `config.fsdp` BEFORE the optimizers exist (they must hold the
    DTensor parameters), then Accelerate-prepared."""
    device = accelerator.device
    if actor_critic is not None:
        reference, nets = networks_of(actor_critic, device)
    else:
        reference, nets = build_networks(palm, config, *scopes, device, critic)
    for net in nets.values():  # recompute blocks in passes with gradients (never in rollouts)
        if isinstance(getattr(net, "palm", None), PaLM):
            net.palm.checkpoint_activations = config.checkpoint_activations
    sharded = shard_networks(accelerator, nets, reference, config.fsdp)
    optimizers = make_optimizers(nets, config)
    prepared = prepare_each(accelerator, list(nets.values()), optimizers, sharded)
    return reference, dict(zip(nets, prepared)), sharded
