"""The model's configuration: a small dataclass that is saved next to the weights.

A checkpoint carries its `PaLMConfig` as JSON, so `PaLM.from_pretrained(path)` rebuilds the
exact architecture without the caller repeating the hyperparameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

# the fields that decide which weights a model has (and what they mean); a checkpoint saved
# with other values cannot be loaded into the model
SHAPE_FIELDS = ("num_tokens", "dim", "depth", "dim_head", "heads", "ff_mult", "qk_rmsnorm")
# fields that change what the weights compute but not which weights there are: a model that
# loads a file takes the file's values on (a silent difference otherwise)
FUNCTION_FIELDS = ("rotary_base", "rotary_xpos_scale_base", "qk_scale")


@dataclass(frozen=True)
class PaLMConfig:
    num_tokens: int
    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    causal: bool = True
    flash_attn: bool = True
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    qk_rmsnorm: bool = False
    qk_scale: float = 8.0  # attention temperature when qk_rmsnorm is on (unit-norm q, k)
    lora_r: int = 8  # default rank of add_finetune_params, as in the reference project
    rotary_base: float = 10000.0
    # xPos (Sun et al. 2022): rotary with a decay of scale_base positions, the reference's
    # `rotary_xpos_scale_base` (it defaults to 512 there); None is plain rotary
    rotary_xpos_scale_base: Optional[int] = None
    max_seq_len: Optional[int] = None  # context window; None means no limit is enforced
    cross_entropy_ignore_index: int = 0  # token 0 is padding / EOS for the byte tokenizer
    # initial weights of the projections: None keeps PyTorch's nn.Linear default (Kaiming
    # uniform, std 1/sqrt(3 fan_in)), as the reference does; a float draws them from
    # normal(0, init_std) as GPT-2 and Hugging Face's Llama (initializer_range 0.02) do. The
    # embeddings are normal(0, 0.02) either way. Changes only a new model, never loaded weights.
    init_std: Optional[float] = None

    def __post_init__(self):
        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "ff_mult", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PaLMConfig.{name} must be a positive integer, got {value!r}")
        if self.dim_head % 2 != 0:
            raise ValueError(
                f"PaLMConfig.dim_head must be even for rotary embeddings, got {self.dim_head}"
            )
        for name in ("attn_dropout", "ff_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PaLMConfig.{name} must be in [0, 1), got {value}")
        xpos = self.rotary_xpos_scale_base
        if xpos is not None and (not isinstance(xpos, int) or isinstance(xpos, bool) or xpos < 1):
            raise ValueError(
                f"PaLMConfig.rotary_xpos_scale_base must be a positive int or None, got {xpos!r}"
            )
        if xpos is not None and not self.causal:
            raise ValueError("rotary_xpos_scale_base (xPos) is for causal models only")
        if self.init_std is not None and not (
            isinstance(self.init_std, (int, float))
            and not isinstance(self.init_std, bool)
            and self.init_std > 0
        ):
            raise ValueError(
                f"PaLMConfig.init_std must be a positive number or None, got {self.init_std!r}"
            )
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(
                f"PaLMConfig.max_seq_len must be at least 2 or None, got {self.max_seq_len}"
            )

    def shape_mismatch(self, other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{field: (other's value, ours)} for every field that decides the weights' shapes or
        meaning and differs in `other` (a saved config's dict); empty when weights fit."""
        return {
            name: (other[name], getattr(self, name))
            for name in SHAPE_FIELDS
            if name in other and other[name] != getattr(self, name)
        }

    def with_function_of(self, other: dict[str, Any]) -> PaLMConfig:
        """This config with `other`'s (a saved config's dict) FUNCTION_FIELDS, where it has
        them."""
        return replace(self, **{name: other[name] for name in FUNCTION_FIELDS if name in other})

    @property
    def attn_inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def ff_inner_dim(self) -> int:
        return self.dim * self.ff_mult

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown PaLMConfig field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PaLMConfig:
        return cls.from_dict(json.loads(text))


def check_token_ids(tokens: Tensor, num_tokens: int, name: str = "seq") -> None:
    """Refuse token tensors a model cannot embed, naming the offending value and position."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"{name} must hold integer token ids (torch.long), got dtype {tokens.dtype}"
        )
    if tokens.dim() != 2:
        raise ValueError(
            f"{name} must have shape (batch, seq_len), got shape {tuple(tokens.shape)}"
        )
    if tokens.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)})")
    bad = (tokens < 0) | (tokens >= num_tokens)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{row}, {col}] = {int(tokens[row, col])} is not a valid token id: "
            f"ids must be in [0, {num_tokens})"
        )
