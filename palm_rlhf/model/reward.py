"""Reward model: a PaLM that reads a prompt and a response and returns one number per sequence.

Which token(s) the score reads (`pooling`):
    "last"  the final hidden state of the last real token (the last True of `mask`; with the
            collators that is the EOS closing the response). The PaLM is causal, so that state
            has attended to the whole prompt and response. Default.
    "mean"  the mean of the final hidden states over RESPONSE tokens only (mask & ~prompt_mask).
Either way prompt tokens are never read directly, but they are context: response tokens
attend to them, so a different prompt gives a different score (as it should: a reward judges a
response to *this* prompt). Padding is excluded from attention and from pooling, and positions
count real tokens only, so padding (left or right) never changes a reward.

Heads (`num_binned_output`):
    0       scalar head: reward = w . h + b; with `labels` the loss is MSE against them.
    K >= 2  K rating bins for ratings 1..K: logits over bins; reward = expected rating
            sum_k softmax(logits)_k * k, in [1, K] and smooth, so PPO gets a graded signal.
            With `labels` (ratings 1..K, class index = rating - 1) the loss is cross-entropy.
            (The reference project took class indices 0..K-1 here; 0 is now an error.)
            `sample_from_bins=True` returns a rating sampled from the bins instead (the
            reference's default; noisy, so off here).

Like the reference, learned prompt and response embeddings (zero at init) are added to the
token embeddings so the model knows which part it is judging. `dropout` is applied to the
pooled features before the head (the PaLM's own dropout is part of its config).

LoRA mode (`use_lora=True`) adds its own scope to the *given* PaLM (shared, not copied) and
freezes that PaLM's base weights in place (as PEFT does), so one base serves actor, critic
and reward model; only the scope, the head and the two embeddings train. If the requested
scope name is taken (say by a second reward model on the same PaLM), the next free name
"reward-1", "reward-2", ... is used: see `reward_lora_scope`. `use_lora=False` deep-copies the
PaLM, so training never touches the caller's model; `freeze_base=True` there trains the head only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    find_weights,
    load_tensors,
    save_tensors,
    weights_path,
)
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS
from palm_rlhf.model.palm import PaLM, check_token_ids
from palm_rlhf.rl_math import masked_mean

POOLINGS = ("last", "mean")
FORMAT = "palm_rlhf.reward_model"
# fields that change the shapes or meaning of the saved tensors: they must match on load
STRUCTURAL = (
    "num_binned_output",
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "pooling",
    "freeze_base",
)


@dataclass(frozen=True)
class RewardConfig:
    """Everything besides the PaLM that rebuilds a RewardModel; saved as JSON with its weights."""

    dropout: float = 0.1
    num_binned_output: int = 0
    use_lora: bool = True
    lora_r: int = 8
    lora_alpha: Optional[float] = None
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    pooling: str = "last"
    freeze_base: bool = True
    sample_from_bins: bool = False  # binned inference: sample a rating instead of its mean
    sample_temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_binned_output == 1 or self.num_binned_output < 0:
            raise ValueError(
                f"num_binned_output must be 0 (scalar head) or K >= 2 rating bins, "
                f"got {self.num_binned_output}"
            )
        if self.sample_temperature <= 0:
            raise ValueError(f"sample_temperature must be > 0, got {self.sample_temperature}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.use_lora and not self.freeze_base:
            raise ValueError(
                "LoRA mode trains its scope and the head only (the shared base stays frozen); "
                "for full fine-tuning pass use_lora=False"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RewardConfig:
        data = json.loads(text)
        data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)


# ----------------------------------------------------------------------------- pure helpers


def expected_rating(logits: Tensor) -> Tensor:
    """(b, K) bin logits -> (b,) expected rating sum_k softmax(logits)_k * k, k = 1..K."""
    ratings = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=torch.float32)
    return logits.float().softmax(dim=-1) @ ratings


def pool_hidden(hidden: Tensor, mask: Tensor, response_mask: Tensor, pooling: str) -> Tensor:
    """(b, n, d) hidden states -> (b, d): the last real token ("last") or the mean over
    response tokens ("mean"). mask / response_mask: (b, n) bool."""
    if pooling == "mean":
        weights = rearrange(response_mask, "b n -> b n 1").expand_as(hidden)
        return masked_mean(hidden, weights, dim=1)
    n = mask.shape[1]
    last = n - 1 - mask.flip(-1).int().argmax(dim=-1)  # index of the last True in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def base_fingerprint(palm: PaLM) -> str:
    """A short hash of the base's token embeddings: adapters loaded onto another base warn."""
    weight = palm.token_emb.weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


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
        sample_from_bins: bool = False,
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
        if self.config.freeze_base:
            for param in self.palm.palm_parameters():
                param.requires_grad_(False)

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

        Returns the reward (b,) float, or with `labels` the scalar loss: labels are ratings
        1..K (long, cross-entropy) for a binned head, target rewards (b,) for a scalar one (MSE).
        """
        out = self.logits(x, mask, prompt_mask, prompt_lengths, disable_lora)
        if labels is not None:
            return self.loss_from_logits(out, labels)
        if not self.binned_output:
            return out
        if self.config.sample_from_bins:  # the reference's behaviour: a sampled rating
            probs = (out.float() / self.config.sample_temperature).softmax(dim=-1)
            return torch.multinomial(probs, 1).squeeze(-1).float() + 1
        return expected_rating(out)

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

    def loss_from_logits(self, out: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != (out.shape[0],):
            raise ValueError(f"labels must have shape ({out.shape[0]},), got {tuple(labels.shape)}")
        if not self.binned_output:
            return F.mse_loss(out.float(), labels.float())
        num_bins = self.config.num_binned_output
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels for a binned head are integer ratings 1..{num_bins}")
        if ((labels < 1) | (labels > num_bins)).any():
            raise ValueError(
                f"labels must be ratings 1..{num_bins} (class index = rating - 1), got "
                f"{sorted(set(labels.tolist()))}"
            )
        return F.cross_entropy(out.float(), labels - 1)

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
        """The reference project's name for `trainable_parameters`."""
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

    def save(self, path: PathLike) -> Path:
        """Write head, config and adapters (LoRA) or all trained weights, atomically, to one
        safetensors file (a folder gets model.safetensors)."""
        path = weights_path(path)
        metadata = {
            "format": FORMAT,
            "reward_config": self.config.to_json(),
            "palm_config": self.palm.config.to_json(),
            "base_included": json.dumps(not self.config.freeze_base),
            "base_fingerprint": base_fingerprint(self.palm),
            "base_checkpoint": self.base_checkpoint or "",
        }
        save_tensors(path, self._owned_tensors(), metadata)
        return path

    def load(self, path: PathLike) -> RewardModel:
        """Load a `save`d file into this model, refusing another head, pooling or PaLM shape."""
        path, config, palm_config, metadata, tensors = _read(path, str(self.device))
        diffs = [
            f"{k}: file {getattr(config, k)!r} vs model {getattr(self.config, k)!r}"
            for k in STRUCTURAL
            if getattr(config, k) != getattr(self.config, k)
        ]
        diffs += _palm_diffs(palm_config, self.palm)
        if diffs:
            raise CheckpointError(f"{path} was saved for another reward model ({'; '.join(diffs)})")
        expected = self._owned_tensors()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(expected[key].shape)}"
                )
        same_base = metadata.get("base_fingerprint") == base_fingerprint(self.palm)
        if self.config.freeze_base and not same_base:
            message = "was trained on another base PaLM (its token embeddings differ)"
            warnings.warn(f"{path} {message}; its adapters and head may not fit", stacklevel=2)
        with torch.no_grad():
            for key, tensor in tensors.items():
                expected[key].copy_(tensor)
        self.base_checkpoint = metadata.get("base_checkpoint") or self.base_checkpoint
        return self

    @classmethod
    def from_pretrained(
        cls, path: PathLike, palm: Optional[PaLM] = None, map_location: str = "cpu"
    ) -> RewardModel:
        """Rebuild a saved reward model. A LoRA (or head-only) file needs its base: `palm`,
        else the `base_checkpoint` recorded at save time. Full fine-tunes need nothing."""
        path, config, palm_config, metadata, _ = _read(path, map_location)
        if palm is not None and _palm_diffs(palm_config, palm):  # before touching the PaLM
            detail = "; ".join(_palm_diffs(palm_config, palm))
            raise CheckpointError(f"{path} was saved for another PaLM ({detail})")
        if palm is None:
            base = metadata.get("base_checkpoint", "")
            if not config.freeze_base:
                palm = PaLM.from_config(palm_config)
            elif base and Path(base).exists():
                palm = PaLM.from_pretrained(base)
            else:
                raise CheckpointError(
                    f"{path} holds {'LoRA adapters and ' if config.use_lora else ''}a head only; "
                    f"pass palm=PaLM.from_pretrained(<base checkpoint>)"
                    + (f" (recorded base {base!r} does not exist)" if base else "")
                )
            palm = palm.to(map_location)  # a given PaLM (maybe shared) stays where it is
        return cls(palm, **asdict(config)).load(path)


def _palm_diffs(saved: PaLMConfig, palm: PaLM) -> list[str]:
    mismatched = palm.config.shape_mismatch(saved.to_dict())
    return [f"palm.{k}: file {a!r} vs model {b!r}" for k, (a, b) in mismatched.items()]


def _read(path: PathLike, device: str):
    """(path, RewardConfig, PaLMConfig, metadata, tensors) of a reward checkpoint, or raise."""
    path = find_weights(path)
    tensors, metadata = load_tensors(path, device=device)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a reward model checkpoint (format {metadata.get('format')!r})"
        )
    try:
        config = RewardConfig.from_json(metadata["reward_config"])
        palm_config = PaLMConfig.from_json(metadata["palm_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has invalid metadata: {err}") from err
    return path, config, palm_config, metadata, tensors
