"""Builders shared by the SFT, CoH and DPO tests: a tiny base checkpoint and toy data."""

import json
import random
from pathlib import Path

import torch

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model.palm import PaLM

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = dict(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)


def make_base(folder: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A checkpoint folder as pretraining leaves it: model.safetensors + tokenizer.json."""
    torch.manual_seed(seed)
    PaLM(**{**TINY_MODEL, **overrides}).save(Path(folder) / "model.safetensors")
    (tokenizer or ByteTokenizer()).save(folder)
    return Path(folder)


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON object per line; a str item is written as the raw line (to make bad lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def toy_comparisons(path: Path, count: int = 32, seed: int = 0) -> Path:
    """A learnable preference: every prompt prefers "yes" to "no"."""
    rng = random.Random(seed)
    records = [
        {"prompt": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=", "chosen": "yes", "rejected": "no"}
        for _ in range(count)
    ]
    return write_jsonl(path, records)


def toy_sft(path: Path, count: int = 16, seed: int = 0) -> Path:
    """A learnable task: the response repeats the prompt's letter three times."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        letter = rng.choice("abcdef")
        records.append({"prompt": f"say {letter}:", "response": letter * 3})
    return write_jsonl(path, records)
