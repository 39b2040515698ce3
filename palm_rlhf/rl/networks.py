"""The networks of one RL run over a PaLM: actor (policy), reference policy, critic.

    actor      a LoRA scope on the user's PaLM (`actor_lora=True`), or that PaLM in place
    reference  the frozen starting policy: the same PaLM with adapters disabled when the actor
               is LoRA (no extra copy), otherwise a frozen copy taken at construction
    critic     by default a LoRA scope on the reference's PaLM (or a full copy with
               `critic_lora=False`) with a value head; `critic=` a separate PaLM (a LoRA scope on
               it, or it trained in place) or an `ImplicitPRM` (see `critics.py`)

`ActorCritic` is the reference project's prebuilt bundle of the three, for
`RLHFTrainer(actor_critic=...)`; `build_networks` makes the same from a PPOConfig.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from palm_rlhf.functional.hl_gauss import HLGauss
from palm_rlhf.model.implicit_prm import ImplicitPRM
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.critics import ProcessRewardCritic, ValueCritic
from palm_rlhf.rl.flowrl import LogPartition
from palm_rlhf.rl.policies import Actor, bare_copy, claim_scope, prepare_each
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


class ActorCritic(nn.Module):
    """The reference's `ActorCritic(palm, critic=None, pooled_values=False, ...)`: actor,
    reference policy and critic built once, for `RLHFTrainer(actor_critic=...)`. Its options
    are the trainer's (`critic_dim_out` is `critic_num_pred_bins`: None for a regression
    critic), and they take precedence over the trainer's keywords."""

    def __init__(
        self,
        palm: PaLM,
        critic: Optional[CriticModel] = None,
        pooled_values: bool = False,
        actor_lora: bool = True,
        critic_lora: bool = True,
        actor_lora_r: int = 8,
        critic_lora_r: int = 8,
        actor_lora_scope: Optional[str] = None,
        critic_lora_scope: Optional[str] = None,
        actor_dropout: float = 0.0,
        critic_dropout: float = 0.0,
        critic_dim_out: Optional[int] = None,
        hl_gauss_loss_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        hl = HLGauss.from_kwargs(critic_dim_out, hl_gauss_loss_kwargs) if critic_dim_out else None
        self.options = dict(
            actor_lora=actor_lora,
            critic_lora=critic_lora and not isinstance(critic, ImplicitPRM),
            actor_lora_r=actor_lora_r,
            critic_lora_r=critic_lora_r,
            actor_dropout=actor_dropout,
            critic_dropout=critic_dropout,
            critic_pooled_values=pooled_values,
            critic_num_pred_bins=critic_dim_out,
            hl_gauss_loss_kwargs=hl_gauss_loss_kwargs,
        )
        self.actor, reference = build_actor(palm, actor_lora, actor_lora_r, actor_lora_scope)
        self.critic = build_critic(
            reference,
            palm,
            critic,
            self.options["critic_lora"],
            critic_lora_r,
            critic_lora_scope,
            pooled_values,
            hl,
        )
        self.actor.dropout, self.critic.dropout = actor_dropout, critic_dropout
        self.reference = reference


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
        bundle = ActorCritic(
            palm,
            critic,
            config.critic_pooled_values,
            config.actor_lora,
            config.critic_lora,
            config.actor_lora_r,
            config.critic_lora_r,
            actor_lora_scope,
            critic_lora_scope,
            config.actor_dropout,
            config.critic_dropout,
            config.critic_num_pred_bins,
            config.hl_gauss_loss_kwargs,
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
