"""Reward model: a PaLM that reads a prompt and a response and returns one number per sequence.

Which token(s) the score reads (`pooling`):
    "last"      the final hidden state of the last real token (the last True of `mask`; with
                the collators that is the EOS closing the response). The PaLM is causal, so
                that state has attended to the whole prompt and response. Default.
    "mean"      the mean of the final hidden states over RESPONSE tokens only (mask & ~prompt_mask).
    "mean_all"  the reference project's pooling: the mean over every real token of `mask`,
                prompt included (over all positions when no mask is given).
With "last" and "mean" prompt tokens are never read directly, but they are context: response
tokens attend to them, so a different prompt gives a different score (as it should: a reward
judges a response to *this* prompt). Padding is excluded from attention and from pooling, and
positions count real tokens only, so padding (left or right) never changes a reward.

Heads (`num_binned_output`):
    0       scalar head: reward = w . h + b; with `labels` the loss is MSE against them.
    K >= 2  K bins, class indices 0..K-1 (a ratings file's 1..K star r is class r - 1).
            With `labels` (class indices 0..K-1, as in the reference) the loss is
            cross-entropy. Without, `sample_from_bins` picks the output:
              None (default)  the expected class index sum_k softmax(logits)_k * k, a float in
                              [0, K-1]: deterministic and graded, on the labels' scale;
              True            a class index (long) drawn by Gumbel-max from the bins at
                              `sample_temperature` (the reference's default, noisy);
              False           the (b, K) bin logits (as in the reference).

Like the reference, learned prompt and response embeddings (zero at init) are added to the
token embeddings so the model knows which part it is judging. `dropout` is applied to the
pooled features before the head (the reference instead sets the rate of every Dropout inside
its PaLM copy; here the PaLM's own dropout is part of its config).

LoRA mode (`use_lora=True`) adds its own scope to the *given* PaLM (shared, not copied, unlike
the reference), so one base serves actor, critic and reward model. The caller's PaLM is not
otherwise changed: its weights keep their `requires_grad`, so it still trains on its own. The
reward model keeps gradients off the shared base by running it with its base weights
temporarily excluded from autograd (`trainable_parameters()` is what an optimizer should get).
If the requested scope name is taken (say by a second reward model on the same PaLM), the next
free name "reward-1", "reward-2", ... is used: see `reward_lora_scope`. `use_lora=False`
deep-copies the PaLM, so training never touches the caller's model; `freeze_base=True` there
trains the head only.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.checkpoint import (
    PathLike,
)
from palm_rlhf.functional.masked import last_true_index, masked_mean
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS
from palm_rlhf.model.palm import PaLM, check_token_ids
from palm_rlhf.model.reward_config import RewardConfig
from palm_rlhf.model.reward_weights import (
    load_reward_into,
    reward_from_pretrained,
    reward_from_reference,
    save_reward,
)

# ----------------------------------------------------------------------------- pure helpers


def expected_class(logits: Tensor) -> Tensor:
    """(b, K) bin logits -> (b,) expected class index sum_k softmax(logits)_k * k, k = 0..K-1."""
    classes = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return logits.float().softmax(dim=-1) @ classes


def gumbel_sample_class(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(b, K) logits -> (b,) long class index drawn by the Gumbel-max trick at `temperature`:
    argmax(logits / T + g), g = -log(-log(u)), u ~ U(0, 1) (the reference's `gumbel_sample`,
    so the same RNG state gives the same draw)."""
    eps = 1e-20
    noise = torch.zeros_like(logits).uniform_(0, 1)
    gumbel = -torch.log(-torch.log(noise + eps) + eps)
    return (logits / max(temperature, 1e-10) + gumbel).argmax(dim=-1)


def pool_hidden(hidden: Tensor, mask: Tensor, response_mask: Tensor, pooling: str) -> Tensor:
    """(b, n, d) hidden states -> (b, d): the last real token ("last"), the mean over response
    tokens ("mean") or over all real tokens ("mean_all"). mask / response_mask: (b, n) bool."""
    if pooling in ("mean", "mean_all"):
        keep = response_mask if pooling == "mean" else mask
        weights = rearrange(keep, "b n -> b n 1").expand_as(hidden)
        return masked_mean(hidden, weights, dim=1)
    last = last_true_index(mask)  # rows without a real token are refused before pooling
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# ----------------------------------------------------------------------------- the model


class RewardModel(nn.Module):
    """`reward_model(seq, mask=None, prompt_mask=None)` -> reward (b,); `labels=` -> loss."""

    @beartype
    def __init__(
        self,
        palm: PaLM,
        dropout: float = 0.1,
        num_binned_output: int = 0,
        use_lora: bool = True,
        lora_r: int = 8,
        reward_lora_scope: str = "reward",
        pooling: str = "last",
        lora_alpha: Optional[float] = None,
        lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        freeze_base: Optional[bool] = None,
        sample_from_bins: Optional[bool] = None,
        sample_temperature: float = 1.0,
    ):
        super().__init__()
        self.config = RewardConfig(
            dropout=dropout,
            num_binned_output=num_binned_output,
            use_lora=use_lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_targets=tuple(lora_targets),
            pooling=pooling,
            freeze_base=use_lora if freeze_base is None else freeze_base,
            sample_from_bins=sample_from_bins,
            sample_temperature=sample_temperature,
        )
        self.palm = palm if use_lora else copy.deepcopy(palm)
        self.reward_lora_scope: Optional[str] = None
        if use_lora:
            self.reward_lora_scope = palm.free_scope_name(reward_lora_scope)
            palm.add_finetune_params(
                self.reward_lora_scope, lora_r=lora_r, lora_alpha=lora_alpha, targets=lora_targets
            )
        # the shared base (LoRA mode) is never frozen in place: that would stop the caller's
        # PaLM from training. `forward` keeps gradients off it instead (`_base_grad_off`).
        self.shares_base = use_lora
        if self.config.freeze_base and not use_lora:  # our own copy: freeze it for good
            for param in self.palm.palm_parameters():
                param.requires_grad_(False)
        # read at every forward, so they can be set on the model as in the reference
        self.sample_from_bins = sample_from_bins
        self.sample_temperature = sample_temperature

        self.binned_output = num_binned_output > 1
        reference = palm.token_emb.weight
        self.prompt_embed = nn.Parameter(torch.zeros(1, 1, palm.dim).to(reference))
        self.response_embed = nn.Parameter(torch.zeros(1, 1, palm.dim).to(reference))
        self.dropout = nn.Dropout(dropout)
        self.to_pred = nn.Linear(palm.dim, num_binned_output if self.binned_output else 1)
        self.to_pred.to(reference)
        self.base_checkpoint: Optional[str] = None  # where the base PaLM lives, saved if set

    @property
    def device(self) -> torch.device:
        return self.palm.device

    # ------------------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        prompt_mask: Optional[Tensor] = None,
        prompt_lengths: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        disable_lora: bool = False,
    ) -> Tensor:
        """x: (b, n) token ids; mask: (b, n) bool, True on real tokens; prompt_mask: (b, n)
        bool, True on prompt tokens (or prompt_lengths: (b,), prompts starting at column 0).

        Returns the reward (b,) float, or with `labels` the scalar loss: labels are class
        indices 0..K-1 (long, cross-entropy) for a binned head, target rewards (b,) for a scalar
        one (MSE). A binned head's output depends on `sample_from_bins` (module docstring):
        expected class index (None), sampled class index (True) or bin logits (False).
        """
        out = self.logits(x, mask, prompt_mask, prompt_lengths, disable_lora)
        if labels is not None:
            return self.loss_from_logits(out, labels)
        if not self.binned_output or self.sample_from_bins is False:
            return out
        if self.sample_from_bins:  # the reference's default: a sampled class index
            return gumbel_sample_class(out.float(), self.sample_temperature)
        return expected_class(out)

    def logits(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        prompt_mask: Optional[Tensor] = None,
        prompt_lengths: Optional[Tensor] = None,
        disable_lora: bool = False,
    ) -> Tensor:
        """Head output: (b, K) bin logits when binned, else the scalar reward (b,)."""
        full_mask, prompt_mask = self._check_inputs(x, mask, prompt_mask, prompt_lengths)
        extra_embed = torch.where(
            rearrange(prompt_mask, "b n -> b n 1"), self.prompt_embed, self.response_embed
        )
        with self._base_grad_off():
            hidden = self.palm(
                x,
                mask=mask,
                finetune_scope=self.reward_lora_scope,
                disable_lora=disable_lora,
                extra_embed=extra_embed,
                return_only_embedding=True,
            )
        pooled = pool_hidden(hidden, full_mask, full_mask & ~prompt_mask, self.config.pooling)
        out = self.to_pred(self.dropout(pooled))
        return out if self.binned_output else rearrange(out, "b 1 -> b")

    @contextmanager
    def _base_grad_off(self) -> Iterator[None]:
        """While building the graph, the shared base's weights do not require grad, so a
        reward loss's backward reaches only the LoRA scope, head and embeddings (no gradient
        buffers on the caller's PaLM); their flags are restored right after. The caller's own
        forward passes are untouched. A no-op when the base is ours or grad is off."""
        if not (self.shares_base and self.config.freeze_base and torch.is_grad_enabled()):
            yield
            return
        params = [p for p in self.palm.palm_parameters() if p.requires_grad]
        try:
            for param in params:
                param.requires_grad_(False)
            yield
        finally:
            for param in params:
                param.requires_grad_(True)

    def loss_from_logits(self, out: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != (out.shape[0],):
            raise ValueError(f"labels must have shape ({out.shape[0]},), got {tuple(labels.shape)}")
        if not self.binned_output:
            return F.mse_loss(out.float(), labels.float())
        num_bins = self.config.num_binned_output
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(
                f"labels for a binned head are integer class indices 0..{num_bins - 1}, "
                f"got {labels.dtype}"
            )
        if ((labels < 0) | (labels >= num_bins)).any():
            raise ValueError(
                f"labels must be class indices 0..{num_bins - 1} (a 1..{num_bins} rating r is "
                f"class r - 1), got {sorted(set(labels.tolist()))}"
            )
        return F.cross_entropy(out.float(), labels)

    def _check_inputs(self, x, mask, prompt_mask, prompt_lengths) -> tuple[Tensor, Tensor]:
        """Validate and return (mask, prompt_mask), both (b, n) bool, filled in when None."""
        check_token_ids(x, self.palm.num_tokens, "seq")
        b, n = x.shape
        for name, value in (("mask", mask), ("prompt_mask", prompt_mask)):
            if value is not None and (value.dtype != torch.bool or value.shape != x.shape):
                raise ValueError(
                    f"{name} must be a bool tensor of shape {tuple(x.shape)} like seq, "
                    f"got {value.dtype} {tuple(value.shape)}"
                )
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        empty = ~mask.any(dim=-1)
        if empty.any():
            raise ValueError(f"row {int(empty.nonzero()[0])} of mask has no real token")
        if prompt_lengths is not None:
            if prompt_mask is not None:
                raise ValueError("pass prompt_mask or prompt_lengths, not both")
            if prompt_lengths.shape != (b,) or prompt_lengths.dtype.is_floating_point:
                raise ValueError(
                    f"prompt_lengths must be integers of shape ({b},), got "
                    f"{prompt_lengths.dtype} {tuple(prompt_lengths.shape)}"
                )
            positions = torch.arange(n, device=x.device)
            prompt_mask = positions < rearrange(prompt_lengths, "b -> b 1")
        if prompt_mask is None:
            return mask, torch.zeros_like(mask)  # no prompt given: everything is response
        if (prompt_mask & ~mask).any():
            row, col = (int(i) for i in (prompt_mask & ~mask).nonzero()[0])
            raise ValueError(f"prompt_mask[{row}, {col}] is True on a padding position")
        no_response = ~(mask & ~prompt_mask).any(dim=-1)
        if no_response.any():
            raise ValueError(
                f"row {int(no_response.nonzero()[0])}: the prompt covers every real token, "
                "leaving no response to score"
            )
        return mask, prompt_mask

    # ------------------------------------------------------------------------- parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Head + prompt/response embeddings + the LoRA scope (LoRA mode) or the whole base
        PaLM (full fine-tuning; not with freeze_base). Other LoRA scopes are never included."""
        params = [self.prompt_embed, self.response_embed, *self.to_pred.parameters()]
        if self.reward_lora_scope is not None:
            params += self.palm.finetune_parameters(self.reward_lora_scope)
        if not self.config.freeze_base:
            params += self.palm.palm_parameters()
        return params

    def finetune_parameters(self) -> list[nn.Parameter]:
        """The reference project's name for `trainable_parameters`. Unlike there it includes
        the prompt/response embeddings (the reference creates them but never trains them)."""
        return self.trainable_parameters()

    # ------------------------------------------------------------------------- save / load

    def _owned_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint holds, keyed independently of the scope's name in the PaLM."""
        owned = {f"head.{k}": v for k, v in self.to_pred.state_dict().items()}
        owned.update(prompt_embed=self.prompt_embed.data, response_embed=self.response_embed.data)
        if self.reward_lora_scope is not None:
            scope = self.palm.finetune_modules[self.reward_lora_scope]
            owned.update({f"lora.{k}": v for k, v in scope.state_dict().items()})
        if not self.config.freeze_base:
            base = self.palm.state_dict()
            owned.update({f"palm.{k}": v for k, v in base.items() if not k.startswith("finetune_")})
        return owned

    def current_config(self) -> RewardConfig:
        """The config with the inference settings as they are now (they may be reassigned)."""
        return replace(
            self.config,
            sample_from_bins=self.sample_from_bins,
            sample_temperature=self.sample_temperature,
        )

    def save(self, path: PathLike) -> Path:
        """Write head, config and adapters (LoRA) or all trained weights, atomically, to one
        safetensors file (a folder gets model.safetensors); see `reward_weights.py`."""
        return save_reward(self, path)

    def load(self, path: PathLike) -> RewardModel:
        """Load a `save`d file into this model, refusing another head, pooling or PaLM shape.
        A reference `.pt` (torch.save of its state_dict) is read safely and mapped instead."""
        return load_reward_into(self, path)

    @classmethod
    def from_pretrained(
        cls, path: PathLike, palm: Optional[PaLM] = None, map_location: str = "cpu"
    ) -> RewardModel:
        """Rebuild a saved reward model. A LoRA (or head-only) file needs its base: `palm`,
        else the base checkpoint recorded at save time (found relative to the file first, so
        checkpoint folders can move together). A reference `.pt` file holds its whole PaLM:
        it is read safely and mapped (`from_reference`; `palm` unused)."""
        return reward_from_pretrained(cls, path, palm, map_location)

    @classmethod
    def from_reference(cls, path: PathLike, pooling: str = "mean_all", **kwargs) -> RewardModel:
        """A RewardModel holding a reference `.pt` file's weights, pooling as the reference did
        ("mean_all"; pass pooling= to change). Other keywords go to the constructor."""
        return reward_from_reference(cls, path, pooling, **kwargs)
