"""PPO's critics, all read in the shifted action frame (column t: the state before token t + 1).

    ValueCritic         a value head on a PaLM's final hidden states (a LoRA scope on the
                        user's PaLM, a full copy, or a separate critic PaLM), in one of four kinds:
                        per token or pooled (`critic_pooled_values`: one value per sequence, the
                        masked mean of the response states, as the reference pools), and
                        regression (Linear(dim, 1), squared error) or classification over value
                        bins (`critic_num_pred_bins`, trained with the HL-Gauss loss)
    ProcessRewardCritic an `ImplicitPRM` in the critic's place (PRIME, Cui et al. 2025): no value
                        function; its per-token implicit rewards are dense process rewards
                        added to the reward stream (`rollout.Experience.process_rewards`),
                        and it is trained online on outcome labels

Both are `policies.ScopedPaLM`s (a scope or full weights, like the actor). Every critic
answers the same three questions the trainer asks: `forward(tokens, action_mask)`
-> its raw output (b, n - 1, k); `values(raw)` -> (b, n - 1) floats; `loss(raw, batch,
value_clip)` -> the scalar its optimizer minimises.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from palm_rlhf.functional.hl_gauss import HLGauss, hl_gauss_clipped_loss
from palm_rlhf.functional.value_losses import value_loss
from palm_rlhf.model.implicit_prm import ImplicitPRM, outcome_loss
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.policies import ScopedPaLM, update_dropout
from palm_rlhf.rl.rollout import Experience
from palm_rlhf.train import sharding


class ValueCritic(ScopedPaLM):
    """The value function on a PaLM (see the module docstring for its kinds).

    The head's weight starts at zero, so every value starts at a constant: the bias (scalar
    head) or the bins' mean (binned head); `shift_start` moves that constant to the first
    rollout's mean return (`PPOConfig.value_head_init`)."""

    def __init__(
        self,
        palm: PaLM,
        scope: Optional[str],
        pooled: bool = False,
        hl_gauss: Optional[HLGauss] = None,
    ):
        super().__init__(palm, scope)
        self.pooled, self.hl_gauss = pooled, hl_gauss
        self.value_head = nn.Linear(palm.dim, hl_gauss.num_bins if hl_gauss else 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(palm.token_emb.weight)

    def forward(self, tokens: Tensor, action_mask: Tensor) -> Tensor:
        """Head output (b, n - 1, k) for tokens (b, n); pooled: one row repeated along n - 1."""
        with update_dropout(self.palm, self.dropout):
            hidden = self.palm(tokens, finetune_scope=self.scope, return_only_embedding=True)
        hidden = hidden[:, :-1]
        if self.pooled:
            weights = action_mask.to(hidden.dtype)
            pooled = einsum(hidden, weights, "b n d, b n -> b d")
            pooled = pooled / rearrange(weights.sum(dim=1).clamp(min=1), "b -> b 1")
            hidden = repeat(pooled, "b d -> b n d", n=hidden.shape[1])
        return self.value_head(hidden)

    def values(self, raw: Tensor) -> Tensor:
        if self.hl_gauss is None:
            return rearrange(raw, "b n 1 -> b n").float()
        return self.hl_gauss.value(raw)

    def loss(self, raw: Tensor, batch: Experience, value_clip: Optional[float]) -> Tensor:
        """PPO's clipped value loss: squared error, or HL-Gauss cross-entropy over the bins."""
        mask = batch.action_mask
        if self.hl_gauss is not None:
            return hl_gauss_clipped_loss(
                self.hl_gauss, raw, batch.old_values, batch.returns, mask, value_clip
            )
        return value_loss(self.values(raw), batch.old_values, batch.returns, mask, value_clip)

    @torch.no_grad()
    def shift_start(self, shift: float) -> float:
        """Move the zero-weight head's constant value by `shift` (binned: the bias becomes the
        log-histogram of the new value, as near as the bins allow); returns the shift applied."""
        sharding.settle(self.value_head)
        before = self.constant_value()
        if self.hl_gauss is None:
            self.value_head.bias.add_(shift)  # elementwise: also on a sharded (DTensor) bias
            return self.constant_value() - before
        # the histogram's mean is pulled towards the middle bins: aim past it, a few times
        wanted = aim = before + shift
        for _ in range(20):
            bias = self.hl_gauss.probs(torch.tensor(aim)).clamp(min=1e-20).log()
            aim += wanted - self.constant_value(bias)
        state = sharding.full_state(self.value_head)
        sharding.load_full_state(self.value_head, {**state, "bias": bias.to(state["bias"])})
        return self.constant_value() - before

    def constant_value(self, bias: Optional[Tensor] = None) -> float:
        """The value every state gets while the head's weight is 0: that of the bias alone."""
        bias = self.value_head.bias if bias is None else bias
        bias = sharding.gathered_tensor(bias).detach()
        return float(self.values(rearrange(bias, "k -> 1 1 k")))

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


class ProcessRewardCritic(ScopedPaLM):
    """An ImplicitPRM in the critic's slot. Its output is the dense process reward of every
    response token (b, n - 1, 1), beta * log(pi_prm / pi_ref), which the advantages add to the
    per-token rewards (there is no value baseline: advantages are whitened returns). Its loss
    is the PRM's outcome cross-entropy on the rollout's scores, which must lie in [0, 1] (an
    outcome label, as PRIME's verifier gives; soft labels allowed)."""

    process_rewards = True

    def __init__(self, prm: ImplicitPRM):
        super().__init__(prm.model, None)
        self.prm = prm

    def forward(self, tokens: Tensor, action_mask: Tensor) -> Tensor:
        with update_dropout(self.palm, self.dropout):
            rewards, _ = self.prm.token_rewards(tokens, torch.ones_like(tokens, dtype=torch.bool))
        return rearrange(torch.where(action_mask, rewards, 0.0), "b n -> b n 1")

    def values(self, raw: Tensor) -> Tensor:
        return rearrange(raw, "b n 1 -> b n").float()

    def loss(self, raw: Tensor, batch: Experience, value_clip: Optional[float]) -> Tensor:
        return outcome_loss(self.values(raw).sum(dim=-1), check_labels(batch.scores))


def check_labels(scores: Tensor) -> Tensor:
    """Outcome labels for the PRM: the scores themselves, which must lie in [0, 1]."""
    if bool(((scores < 0) | (scores > 1)).any()):
        low, high = float(scores.min()), float(scores.max())
        raise ValueError(
            f"critic=ImplicitPRM trains on outcome labels in [0, 1] (PRIME), but the rewards "
            f"ranged over [{low:.3g}, {high:.3g}]: use a reward that scores 0..1 (e.g. a "
            "text_reward_fn returning correctness), or another critic"
        )
    return scores
