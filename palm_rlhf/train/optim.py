"""The one optimiser builder and the one learning-rate schedule, used by every stage.

AdamW over the trainable parameters in two groups: matrices (embeddings, projections, LoRA
factors, heads' weights) take the weight decay, vectors (norm gains, biases, a value head's
bias, scalars) never do: decaying a gain towards 0 shrinks a layer's output, not its capacity.

Defaults per stage (flags `--lr`, `--weight-decay`; betas are not a flag of the loop stages):

    stage               lr      weight decay   betas          decayed
    pretrain            2e-3    0.1            (0.9, 0.95)    matrices only
    sft, coh            1e-4    0.0            (0.9, 0.95)    matrices only
    dpo                 1e-5    0.0            (0.9, 0.95)    matrices only
    reward              5e-4    0.0            (0.9, 0.95)    matrices only
    ppo & critic-free   actor_lr / critic_lr 1e-4, actor_wd / critic_wd 0.0,
                        `betas` (0.9, 0.999) as in the reference project, matrices only
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Union

import torch
from torch import nn

DEFAULT_BETAS = (0.9, 0.95)  # the PaLM paper's beta2 is lower still; 0.95 is GPT-3's


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: the matrices with `weight_decay`, vectors and scalars with none."""
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(
    params: Union[nn.Module, Iterable[nn.Parameter]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = DEFAULT_BETAS,
) -> torch.optim.AdamW:
    """AdamW over the parameters given, or a module's trainable ones (`requires_grad`), decay
    on matrices only; see the module docstring for each stage's defaults."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    return torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr, betas=tuple(betas))


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warm-up then cosine decay to `min_ratio` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
