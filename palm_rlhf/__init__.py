"""palm-rlhf: a pure-PyTorch PaLM with the InstructGPT alignment stages.

from palm_rlhf import PaLM, RewardModel, RLHFTrainer
"""

__version__ = "0.1.0"

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
