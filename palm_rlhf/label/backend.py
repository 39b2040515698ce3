"""The model behind the page: the only module of `palm_rlhf.label` that imports the rest of the
package, so the server, the store and the tests need no model (they take any `Generate`)."""

from __future__ import annotations

import torch

from palm_rlhf.data.records import read_prompts
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.model.sampling_options import GenerationOptions
from palm_rlhf.train.loading import load_base

__all__ = ["model_generator", "read_prompts"]


def model_generator(checkpoint: str, options: GenerationOptions):
    """Load `checkpoint` and return `generate(prompt, count, seed) -> count response texts`,
    sampled with `options` in one batch with a generator seeded by `seed` (so an item's samples
    are the same whenever it is generated). A response ends at the tokenizer's EOS, which is not
    shown. A `max_new_tokens` that leaves no room for a prompt is refused here, before serving."""
    model, tokenizer = load_base(checkpoint, log=lambda *_: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    window = model.config.max_seq_len
    options.prompt_budget(window)  # refuses a too long max_new_tokens before serving

    def generate(prompt: str, count: int, seed: int) -> list:
        ids = options.fit_prompt(tokenizer.encode(prompt), window)
        generator = torch.Generator(device=device).manual_seed(seed)
        samples = sample_tokens(
            model,
            torch.tensor([ids] * count, device=device),
            options.max_new_tokens,
            **options.sample_kwargs(),
            eos_token=tokenizer.eos_id,
            pad_value=tokenizer.eos_id,
            generator=generator,
        )
        texts = []
        for row, mask in zip(samples.tokens.tolist(), samples.mask.tolist()):
            kept = [t for t, m in zip(row, mask) if m and t != tokenizer.eos_id]
            texts.append(tokenizer.decode(kept))
        return texts

    return generate
