"""palm-rlhf: a pure-PyTorch PaLM with the InstructGPT alignment stages.

from palm_rlhf import PaLM, RewardModel, RLHFTrainer
"""

__version__ = "0.1.0"

from palm_rlhf.config import PaLMConfig
from palm_rlhf.palm import PaLM
from palm_rlhf.ppo import RLHFTrainer
from palm_rlhf.reward import RewardModel
from palm_rlhf.sampling import sample_tokens
from palm_rlhf.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = [
    "PaLM",
    "PaLMConfig",
    "RewardModel",
    "RLHFTrainer",
    "sample_tokens",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "load_tokenizer",
]
