"""palm-rlhf: a pure-PyTorch PaLM with the InstructGPT alignment stages.

from palm_rlhf import PaLM, RewardModel, RLHFTrainer
"""

import re as _re

import torch as _torch

__version__ = "0.1.0"
# the oldest torch this code runs on (setup.py reads it from here; `.ci/floors` proves it)
TORCH_FLOOR = "2.7"

# a user who installed with --no-deps gets one line, not an AttributeError deep in a forward pass
if tuple(int(n) for n in _re.findall(r"\d+", _torch.__version__)[:2]) < tuple(
    int(n) for n in TORCH_FLOOR.split(".")
):
    raise ImportError(
        f"palm-rlhf needs torch>={TORCH_FLOOR}, found {_torch.__version__}: "
        f"pip install 'torch>={TORCH_FLOOR}'"
    )
del _re, _torch

# (after the check, so an old torch fails on its line above, not inside an import below)
from palm_rlhf.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.implicit_prm import ImplicitPRM
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.rl.networks import ActorCritic
from palm_rlhf.rl.ppo.trainer import RLHFTrainer
from palm_rlhf.rl.reference_keywords import score_centering_loss  # the reference's signature

__all__ = [
    "PaLM",
    "PaLMConfig",
    "RewardModel",
    "RLHFTrainer",
    "ActorCritic",
    "ImplicitPRM",
    "sample_tokens",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
    "score_centering_loss",
]
