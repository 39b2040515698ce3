"""palm-rlhf: a pure-PyTorch PaLM with the InstructGPT alignment stages."""

__version__ = "0.1.0"
