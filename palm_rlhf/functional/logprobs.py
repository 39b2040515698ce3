"""Token statistics from logits: log-probs of chosen tokens, entropy, sequence log-probs.

Shapes: b = batch, n = positions, v = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.functional.masked import masked_sum
from palm_rlhf.typecheck import typechecked


@typechecked
def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels) under softmax(logits): (b, n, v), (b, n) int -> (b, n) float32 or wider.

    log p_t = log_softmax(logits_t)[y_t]. The fused log-softmax subtracts the row maximum before
    exponentiating (stable for large logits) and is the only (b, n, v) tensor made; the simpler
    logits[y] - logsumexp(logits) loses digits to cancellation when logits are large. Half
    precision logits are upcast one row at a time, so the float32 copy is (n, v) at most.
    Every label must be a valid id (pad masked-out positions with any id, e.g. 0).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        shapes = f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"need logits (b, n, v) and labels (b, n), got {shapes}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    index = rearrange(labels.long(), "b n -> b n 1")
    if logits.dtype in (torch.float32, torch.float64):
        taken = F.log_softmax(logits, dim=-1).gather(-1, index)
    else:
        rows = zip(logits, index)
        taken = torch.stack([F.log_softmax(row.float(), dim=-1).gather(-1, i) for row, i in rows])
    return rearrange(taken, "b n 1 -> b n")


@typechecked
def shifted_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[:, t] | tokens[:, <t]) for t >= 1: logits (b, n, v), tokens (b, n) -> (b, n-1).

    Column j of the result scores token j + 1 (the logits at position j predict the next one).
    """
    return log_probs_from_logits(logits[:, :-1], tokens[:, 1:])


@typechecked
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) per position: (b, n, v) -> (b, n), in nats.

    H = -sum_x p(x) log p(x), with log p from the max-shifted log-softmax (stable for large
    logits, where logsumexp(l) - sum p * l would cancel). Half precision is upcast to float32.
    """
    wide = logits.dtype in (torch.float32, torch.float64)
    log_p = F.log_softmax(logits if wide else logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@typechecked
def sequence_log_probs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log p(sequence) = sum of the masked token log-probs: (b, n), (b, n) -> (b,)."""
    return masked_sum(token_logprobs, mask, dim=-1)
