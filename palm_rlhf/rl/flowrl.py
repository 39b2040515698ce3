"""FlowRL's learned log-partition function log Z(x) (Zhu et al. 2025, "FlowRL: Matching Reward
Distributions", sec. 3): the one extra network FlowRL trains beside the policy.

    features(x) = mean over prompt tokens of the reference PaLM's final hidden states  (b, d)
    log Z(x)    = MLP(features(x))                                                     (b,)

The features come from the frozen reference without gradient, so the head is a small regressor
trained by the trajectory-balance loss (`functional.policy_losses.flowrl_loss`) with its own
optimiser; the policy's gradient never flows into it through the PaLM.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.functional.masked import masked_mean
from palm_rlhf.model.palm import PaLM
from palm_rlhf.train import sharding


@torch.no_grad()
def prompt_features(reference: PaLM, tokens: Tensor, prompt_mask: Tensor) -> Tensor:
    """(b, n) left-justified tokens + prompt mask -> (b, d) mean-pooled reference hidden states
    over the prompt (the prompt is causal, so the response cannot leak into it)."""
    hidden = reference(tokens, disable_lora=True, return_only_embedding=True).float()
    return masked_mean(hidden, rearrange(prompt_mask, "b n -> b n 1").expand_as(hidden), dim=1)


class LogPartition(nn.Module):
    """log Z(x): Linear(d, d) -> GELU -> Linear(d, 1) on the prompt features, (b, d) -> (b,).

    The last layer starts at zero, so log Z starts at 0 for every prompt."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor) -> Tensor:
        return rearrange(self.net(features.float()), "b 1 -> b")

    # the trainer treats every trained network alike: parameters and state under one interface
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def trainable_state(self) -> dict[str, Tensor]:
        sharding.settle(self)  # under FSDP2: gathered from the shards (collective)
        return sharding.full_state(self)

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        sharding.settle(self)
        sharding.load_full_state(self, state)
