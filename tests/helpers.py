"""Small shared builders for the tests."""

import torch

from palm_rlhf.palm import PaLM


def tiny_palm(**overrides) -> PaLM:
    kwargs = dict(num_tokens=32, dim=32, depth=2, heads=4, dim_head=8, ff_mult=2)
    kwargs.update(overrides)
    torch.manual_seed(kwargs.pop("seed", 0))
    return PaLM(**kwargs)


def randomize_lora(model: PaLM, scope: str, std: float = 0.1) -> None:
    """Give a scope non-zero B matrices so it changes the model's outputs."""
    with torch.no_grad():
        for param in model.finetune_parameters(scope):
            param.normal_(0, std)
