"""ImplicitPRM: process rewards without process labels (Yuan et al. 2024, "Free Process Rewards
without Process Labels", arXiv 2412.01981; used online in PRIME, Cui et al. 2025).

A language model trained like an outcome reward model, with its sequence reward parameterised
as a log-likelihood ratio against a frozen reference,

    r(y) = beta * sum_t log( pi(y_t | y_<t) / pi_ref(y_t | y_<t) ),

gives a reward to every token for free: r_t = beta * log(pi(y_t) / pi_ref(y_t)), whose
running sum is the expected outcome of the prefix. Training needs outcome labels only (eq. 5):

    L = -[ l * log sigmoid(r(y)) + (1 - l) * log sigmoid(-r(y)) ],   l in [0, 1].

`ImplicitPRM(model, ref_model=None, beta=0.1)` keeps the reference project's interface:
`prm(seq)` returns the per-token implicit rewards (b, n - 1) of seq[:, 1:], 0 on padding
(token ids < 0, or `mask=False`); `prm(seq, labels)` the loss above. Two deliberate
differences from the reference (README, porting table): the loss is the cross-entropy to
minimise (the reference returns its negation, the log-likelihood), and it is taken on the
sequence reward r(y), as in the paper, not on every token's r_t separately.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palm_rlhf.functional.logprobs import shifted_log_probs


class ImplicitPRM(nn.Module):
    """An implicit process reward model over a causal LM (a PaLM) and a frozen reference."""

    def __init__(self, model: nn.Module, ref_model: Optional[nn.Module] = None, beta: float = 0.1):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"ImplicitPRM beta must be > 0, got {beta}")
        self.model = model
        # only the model trains; the reference is a frozen copy unless one is given
        self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(model)).eval()
        self.ref_model.requires_grad_(False)
        self.beta = beta

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The trained parameters: the model's only, as in the reference."""
        return self.model.parameters(recurse)

    def token_rewards(
        self, seq: Tensor, mask: Optional[Tensor] = None, **model_kwargs
    ) -> tuple[Tensor, Tensor]:
        """(rewards (b, n - 1), target mask (b, n - 1)): beta * log-ratio of each next token;
        `mask` (b, n) marks real tokens (default: ids >= 0)."""
        mask = (seq >= 0) if mask is None else mask
        tokens = seq.clamp(min=0)
        target_mask = mask[:, 1:] & mask[:, :-1]
        log_prob = shifted_log_probs(self.model(tokens, **model_kwargs), tokens)
        with torch.no_grad():
            ref_log_prob = shifted_log_probs(self.ref_model(tokens), tokens)
        rewards = self.beta * (log_prob - ref_log_prob)
        return rewards.masked_fill(~target_mask, 0.0), target_mask

    def forward(
        self, seq: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> Tensor:
        """Per-token implicit rewards (b, n - 1), or with `labels` (b,) in [0, 1] the
        cross-entropy of the sequence rewards (a scalar to minimise)."""
        rewards, _ = self.token_rewards(seq, mask)
        if labels is None:
            return rewards
        return outcome_loss(rewards.sum(dim=-1), labels)


def outcome_loss(sequence_rewards: Tensor, labels: Tensor) -> Tensor:
    """Yuan et al. eq. 5 as a loss: mean over b of -[l log s(r) + (1 - l) log s(-r)], with
    sequence rewards r (b,) and labels l (b,) in [0, 1] (soft labels allowed)."""
    labels = labels.to(sequence_rewards.dtype)
    if labels.shape != sequence_rewards.shape:
        raise ValueError(
            f"ImplicitPRM labels must have shape {tuple(sequence_rewards.shape)} (one per "
            f"sequence), got {tuple(labels.shape)}"
        )
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("ImplicitPRM labels must lie in [0, 1] (outcome: 1 correct, 0 wrong)")
    return F.binary_cross_entropy_with_logits(sequence_rewards, labels)
