"""palm-rlhf: a pure-PyTorch PaLM with the InstructGPT alignment stages."""

__version__ = "0.1.0"

from palm_rlhf.config import PaLMConfig
from palm_rlhf.palm import PaLM
from palm_rlhf.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = ["PaLM", "PaLMConfig", "ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer"]
