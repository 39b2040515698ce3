"""LoRA adapters (Hu et al. 2021) grouped into named fine-tuning scopes.

A scope is one set of low-rank adapters over the model's projections: the actor, the critic
and the reward model can each own a scope on the same base PaLM and be trained separately.
The update of a projection W is W x + (alpha / r) * B(A x), with B zero-initialised so every
scope starts as the identity (the base model's outputs are unchanged).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

# the projections of a PaLM block an adapter may target, and which ones a scope gets by default
LORA_TARGETS = ("q", "k", "v", "o", "ff_in", "ff_out")
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o")


class LoRA(nn.Module):
    """Low-rank update x -> scale * (x @ A) @ B, with A: (dim_in, r) and B: (r, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, r: int = 8, alpha: Optional[float] = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.scale = (alpha if alpha is not None else r) / r
        self.A = nn.Parameter(torch.empty(dim_in, r))
        self.B = nn.Parameter(torch.zeros(r, dim_out))
        # A ~ N(0, 1) and B = 0, as Hu et al. 2021 and the reference project initialise them:
        # the adapter starts as a no-op, and B's gradient, x @ A, is on the scale of x (a
        # fan-in-scaled A would shrink every update of B by about sqrt(dim_in))
        nn.init.normal_(self.A, std=1.0)

    @property
    def weight(self) -> Tensor:
        """The dense update, (dim_in, dim_out); x @ weight equals forward(x)."""
        return (self.A @ self.B) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype) * self.scale


def make_scope(
    depth: int,
    target_dims: dict[str, tuple[int, int]],
    r: int,
    alpha: Optional[float],
    targets: tuple[str, ...],
) -> nn.ModuleList:
    """One ModuleDict of adapters per layer; `target_dims` maps target -> (dim_in, dim_out)."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {targets}"
        )
    return nn.ModuleList(
        nn.ModuleDict({name: LoRA(*target_dims[name], r=r, alpha=alpha) for name in targets})
        for _ in range(depth)
    )


def add_output_adapters(
    lora: Optional[nn.ModuleDict], attn_in: Tensor, attn_out: Tensor, ff_in: Tensor, ff_out: Tensor
) -> tuple[Tensor, Tensor]:
    """A block's (attn_out, ff_out), each plus its scope's adapter ("o" reads the attention
    output `attn_in`, "ff_out" the feed-forward hidden `ff_in`) where the scope has one."""
    if lora is not None:
        if "o" in lora:
            attn_out = attn_out + lora["o"](attn_in)
        if "ff_out" in lora:
            ff_out = ff_out + lora["ff_out"](ff_in)
    return attn_out, ff_out
