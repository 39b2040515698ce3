"""The options of `palm-rlhf label`, declared once: the dataclass is the CLI and its help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from palm_rlhf.model.sampling_options import GenerationOptions, with_defaults
from palm_rlhf.options import option

MODES = ("rank", "rate", "arena")
MAX_CHOICES = 9  # number keys 1..9 pick a response or a rating


@dataclass
class LabelConfig(with_defaults(GenerationOptions, temperature=0.8, top_k=40)):
    checkpoint: str = option(
        "",
        "policy to sample from: a checkpoint folder, a run folder (its latest) or a weights file",
        required=True,
    )
    prompts: str = option(
        "", "prompts file (any format `palm-rlhf ppo --prompts` reads)", required=True
    )
    out: str = option("labels.jsonl", "label file: appended to, and continued when it exists")
    mode: str = option(
        "rank", "rank K responses, rate one, or compare two checkpoints", choices=MODES
    )
    responses: int = option(4, "rank mode: responses per prompt (2..9)")
    scale: int = option(5, "rate mode: ratings run 1..scale (2..9)")
    checkpoint_b: Optional[str] = option(
        None, "arena mode: the checkpoint compared with --checkpoint"
    )
    passes: int = option(1, "label each prompt this many times (fresh samples each pass)")
    seed: int = option(0, "seed of item ids and sampling; keep it to continue a label file")
    ahead: int = option(3, "items generated ahead in the background")
    host: str = option("127.0.0.1", "address to listen on; a non-loopback one needs the token")
    port: int = option(8000, "port to listen on (0: any free port)")
    token: Optional[str] = option(
        None, "secret every request must carry (default: none on loopback, a fresh one otherwise)"
    )

    def __post_init__(self):
        super().__post_init__()  # the sampling options' checks
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "arena") != (self.checkpoint_b is not None):
            raise ValueError("--checkpoint-b is needed by --mode arena, and only by it")
        for name in ("responses", "scale"):
            if not 2 <= getattr(self, name) <= MAX_CHOICES:
                raise ValueError(f"{name} must be in 2..{MAX_CHOICES}, got {getattr(self, name)}")
        for name in ("passes", "ahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token must be at least 8 characters")

    def settings(self) -> dict:
        """What the page shows about how the responses were sampled."""
        keys = ("mode", "checkpoint", "checkpoint_b", "temperature", "top_k", "top_p")
        return {k: getattr(self, k) for k in (*keys, "max_new_tokens", "seed")}
