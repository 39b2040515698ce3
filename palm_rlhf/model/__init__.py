"""The model layer: PaLM, its attention, LoRA scopes, sampling and the reward model.

Imports nothing from `data`, `train` or `rl`; knows nothing of Accelerate, devices or files
beyond its own weights (`weights.py`, through `palm_rlhf.checkpoint`).
"""
