"""RewardConfig: everything besides the PaLM that rebuilds a RewardModel, saved as JSON in the
metadata of its weights file, with the format constants of that file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from palm_rlhf.model.lora import DEFAULT_LORA_TARGETS

POOLINGS = ("last", "mean", "mean_all")
FORMAT = "palm_rlhf.reward_model"
# 2: binned labels are class indices 0..K-1 and `sample_from_bins` is None/True/False (in
# version-1 files False meant the expected rating, which is None now)
FORMAT_VERSION = 2
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
    # None: as use_lora (a LoRA model trains its scope and head; use_lora=False the whole copy)
    freeze_base: Optional[bool] = None
    # binned inference: None the expected class index, True a sampled one, False the logits
    sample_from_bins: Optional[bool] = None
    sample_temperature: float = 1.0

    def __post_init__(self):
        if self.freeze_base is None:  # frozen dataclass: resolved once, saved resolved
            object.__setattr__(self, "freeze_base", self.use_lora)
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
