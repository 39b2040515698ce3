"""Reductions over the entries a bool mask selects, and whitening, as pure tensor functions.

Every mask is a bool tensor shaped like the values, True = "this entry counts". Masked-out
entries are selected away with `torch.where`, never multiplied by 0, so an inf or NaN there
cannot reach a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from palm_rlhf.typecheck import typechecked

# all_reduce(t) -> the elementwise sum of t over every process (None: one process)
AllReduce = Callable[[Tensor], Tensor]


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    """One clear line when `mask` is not a bool tensor shaped like `like`."""
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = counts), got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")


def check_same_shape(**tensors: Tensor) -> None:
    """One clear line naming the first tensor whose shape differs from the first one's."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.shape != first.shape:
            shapes = f"{tuple(tensor.shape)} but {first_name} has {tuple(first.shape)}"
            raise ValueError(f"{name} has shape {shapes}")


@typechecked
def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum of x over entries where mask is True; over all entries (scalar) or along `dim`."""
    check_mask(mask, x)
    kept = torch.where(mask, x, 0)
    return kept.sum() if dim is None else kept.sum(dim)


@typechecked
def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """mean of x over entries where mask is True. An empty selection gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


@typechecked
def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """scalar variance of the masked entries of x (Bessel-corrected when `unbiased`)."""
    check_mask(mask, x)
    count, needed = int(mask.sum()), 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"masked_var needs at least {needed} masked entries, got {count}")
    centred = x - masked_mean(x, mask)
    return masked_sum(centred**2, mask) / (count - 1 if unbiased else count)


@typechecked
def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: Optional[AllReduce] = None,
    eps: float = 1e-8,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the GLOBAL batch: same shape.

    mean and Bessel-corrected var come from the count, sum and sum of squares of the masked
    entries, accumulated in float64 and summed over processes by `all_reduce` (None: this
    tensor alone). So N processes each holding a shard whiten exactly as one process holding
    the whole batch does, up to float64 rounding of the summation order. This is how PPO
    whitens advantages and rewards and how REINFORCE++ (Hu 2025) whitens its returns.

    With `shift_mean=False` the mean is added back (only the scale is normalised).
    Fewer than 2 masked entries in the whole batch: the variance is undefined, so the masked
    entries pass through unchanged (every process sees the same global count and takes the
    same branch). The output is 0 outside the mask, always.
    """
    check_mask(mask, x)
    kept = torch.where(mask, x.double(), 0)
    moments = torch.stack((mask.sum().double(), kept.sum(), (kept**2).sum()))
    count, total, total_sq = (moments if all_reduce is None else all_reduce(moments)).unbind()
    if count < 2:
        return torch.where(mask, x, 0)
    mean = total / count
    var = (total_sq - count * mean**2) / (count - 1)
    whitened = (x.double() - mean) * torch.rsqrt(var.clamp(min=0) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened.to(x.dtype), 0)


def last_true_index(mask: Tensor) -> Tensor:
    """(b, n) bool -> (b,) long: the position of the last True of each row (0 for a row with
    none; callers that need one check first). The sequence score lands there."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).argmax(dim=-1)
