"""Best-of-n sampling: draw n responses to one prompt, keep the one a reward model likes best.

Also called rejection sampling; the simplest way to spend a reward model at inference time
(Nakano et al. 2021, WebGPT; Touvron et al. 2023, Llama 2, sec. 3.2.3).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from einops import repeat
from torch import Tensor

from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.rl.rollout import join_prompt_response, score_sequences


class BestOfN(NamedTuple):
    sequence: Tensor  # (n,) the best sample: prompt + response up to and including EOS
    index: int  # its row in `sequences`
    scores: Tensor  # (k,) reward of every sample
    sequences: Tensor  # (k, n) all samples, left-justified, padded with pad_value
    masks: Tensor  # (k, n) bool, real tokens of each sample


@torch.no_grad()
def best_of_n(
    palm: PaLM,
    reward_model,
    prompt: Tensor,
    max_seq_len: int,
    num_samples: int = 4,
    finetune_scope: Optional[str] = None,
    pad_value: int = 0,
    **sampling_kwargs,
) -> BestOfN:
    """Sample `num_samples` continuations of `prompt` (n,) to at most `max_seq_len` tokens in
    all (prompt included), in one KV-cached batch, and score them with `reward_model` (a
    RewardModel or reward_fn(seq, mask, prompt_mask), see `score_sequences`). Ties go to the
    first sample. `sampling_kwargs` go to `sample_tokens` (temperature, top_k, eos_token...)."""
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"prompt must be one non-empty 1-D id tensor, got {tuple(prompt.shape)}")
    if max_seq_len <= prompt.numel():
        raise ValueError(
            f"max_seq_len={max_seq_len} leaves no room after {prompt.numel()} prompt tokens"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    prompts = repeat(prompt.to(palm.device).long(), "n -> k n", k=num_samples)
    prompt_mask = torch.ones_like(prompts, dtype=torch.bool)
    samples = sample_tokens(
        palm,
        prompts,
        max_seq_len - prompt.numel(),
        prompt_mask=prompt_mask,
        finetune_scope=finetune_scope,
        pad_value=pad_value,
        **sampling_kwargs,
    )
    seqs = join_prompt_response(prompts, prompt_mask, *samples, pad_value)
    scores = score_sequences(reward_model, *seqs)
    best = int(scores.argmax())
    return BestOfN(seqs.tokens[best][seqs.mask[best]], best, scores, seqs.tokens, seqs.mask)
