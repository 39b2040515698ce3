"""Token sampling: logit filters and the KV-cached autoregressive loop.

`sample_tokens` is the loop the PPO rollout calls at high volume; `PaLM.generate` is a thin,
reference-compatible wrapper around it (`seq_len` counts the prompt, only new tokens return).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from palm_rlhf.model.config import check_token_ids


class Decoder(Protocol):
    """What sampling needs of a model (PaLM has it): embeddings with an optional KV cache, the
    output head, and its config. Sampling never imports the model class; the model imports it."""

    num_tokens: int
    config: Any
    training: bool
    device: torch.device

    def init_cache(self, batch: int, max_len: int) -> Any: ...
    def embed(self, x: Tensor, **kwargs) -> Tensor: ...
    def to_logits(self, hidden: Tensor) -> Tensor: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (b, v); the rest become -inf."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability reaches p; the most likely token always stays."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(
    logits: Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    filter_thres: Optional[float] = None,
) -> Tensor:
    """Apply the requested filters. `filter_thres` is the reference project's top-k spelling:
    keep the top ceil((1 - thres) * vocab) logits."""
    if filter_thres is not None:
        if not 0.0 <= filter_thres < 1.0:
            raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
        logits = top_k_filter(logits, max(1, math.ceil((1 - filter_thres) * logits.shape[-1])))
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_from_logits(
    logits: Tensor, temperature: float = 1.0, generator: Optional[torch.Generator] = None, **filters
) -> Tensor:
    """(b, v) logits -> (b,) token ids. Temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = filter_logits(logits.float(), **filters)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Samples(NamedTuple):
    tokens: Tensor  # (b, m) new tokens; after a row's EOS only `pad_value`
    mask: Tensor  # (b, m) bool, True on sampled tokens up to and including EOS


def _check_sampling_inputs(
    model: Decoder, prompt: Tensor, prompt_mask: Optional[Tensor], max_new_tokens: int
):
    check_token_ids(prompt, model.num_tokens, "prompt")
    if prompt_mask is not None and (
        prompt_mask.shape != prompt.shape or prompt_mask.dtype != torch.bool
    ):
        raise ValueError(f"prompt_mask must be bool of shape {tuple(prompt.shape)}")
    if prompt_mask is not None and not bool(prompt_mask.any(dim=-1).all()):
        raise ValueError(
            "every prompt needs at least one real token (a row of prompt_mask is all False)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = model.config.max_seq_len
    if limit is not None and prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt.shape[1]} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's max_seq_len={limit}"
        )


@torch.no_grad()
def iter_sample(
    model: Decoder,
    prompt: Tensor,
    max_new_tokens: int,
    prompt_mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    filter_thres: Optional[float] = None,
    eos_token: Optional[int] = None,
    pad_value: int = 0,
    use_cache: bool = True,
    finetune_scope: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """Yield each step's sampled tokens (b,) as soon as they exist (streaming).

    Prompts of different lengths are left-padded, with `prompt_mask` (b, n) True on real tokens;
    rotary positions skip the padding, so a row samples the same as it would alone. A row that
    has produced `eos_token` yields `pad_value` from then on; iteration ends when every row has.
    The model is in eval mode while iterating and gets its previous mode back afterwards.
    """
    _check_sampling_inputs(model, prompt, prompt_mask, max_new_tokens)
    filters = dict(top_k=top_k, top_p=top_p, filter_thres=filter_thres)
    batch = prompt.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    was_training = model.training
    model.eval()
    try:
        cache = model.init_cache(batch, prompt.shape[1] + max_new_tokens) if use_cache else None
        seq, seq_mask = prompt, prompt_mask
        hidden = model.embed(seq, mask=seq_mask, finetune_scope=finetune_scope, cache=cache)
        for step in range(max_new_tokens):
            logits = model.to_logits(hidden[:, -1])
            token = sample_from_logits(logits, temperature, generator, **filters).masked_fill(
                done, pad_value
            )
            yield token
            if eos_token is not None:
                done = done | (token == eos_token)
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            if cache is not None:
                hidden = model.embed(token[:, None], finetune_scope=finetune_scope, cache=cache)
            else:
                seq = torch.cat((seq, token[:, None]), dim=1)
                if seq_mask is not None:
                    seq_mask = torch.cat((seq_mask, seq_mask.new_ones(batch, 1)), dim=1)
                hidden = model.embed(seq, mask=seq_mask, finetune_scope=finetune_scope)
    finally:
        model.train(was_training)


def sample_tokens(model: Decoder, prompt: Tensor, max_new_tokens: int, **kwargs) -> Samples:
    """Sample up to `max_new_tokens` after `prompt` (b, n); see `iter_sample` for the options.

    Returns the tokens trimmed to the last step any row was still running, and a mask that is
    True on sampled tokens up to and including each row's EOS.
    """
    tokens = torch.stack(list(iter_sample(model, prompt, max_new_tokens, **kwargs)), dim=1)
    eos_token, pad_value = kwargs.get("eos_token"), kwargs.get("pad_value", 0)
    if eos_token is None:
        return Samples(tokens, torch.ones_like(tokens, dtype=torch.bool))
    is_eos = (tokens == eos_token).long()
    after_eos = (is_eos.cumsum(dim=-1) - is_eos) > 0
    return Samples(tokens.masked_fill(after_eos, pad_value), ~after_eos)


def generate(
    model: Decoder,
    seq_len: int,
    prompt: Optional[Tensor] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    filter_thres: Optional[float] = None,
    eos_token: Optional[int] = None,
    pad_value: int = 0,
    return_seq_without_prompt: bool = True,
    use_cache: bool = True,
    prompt_mask: Optional[Tensor] = None,
    finetune_scope: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Reference-compatible generation: `seq_len` is the total length including the prompt.

    prompt (n,) or (b, n); with no prompt, one random start token is drawn (as the reference
    project does) and returned with the sample.
    """
    if prompt is None:
        prompt = torch.randint(
            0, model.num_tokens, (1, 1), device=model.device, generator=generator
        )
        return_seq_without_prompt = False
    squeeze = isinstance(prompt, Tensor) and prompt.dim() == 1
    if squeeze:
        prompt = prompt[None]
        prompt_mask = prompt_mask[None] if prompt_mask is not None else None
    if isinstance(prompt, Tensor) and prompt.dim() == 2 and seq_len <= prompt.shape[1]:
        raise ValueError(
            f"prompt has {prompt.shape[1]} tokens, so seq_len={seq_len} (the total length, prompt "
            f"included) leaves nothing to sample; pass seq_len > {prompt.shape[1]}"
        )
    samples = sample_tokens(
        model,
        prompt,
        seq_len - prompt.shape[1],
        prompt_mask=prompt_mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        filter_thres=filter_thres,
        eos_token=eos_token,
        pad_value=pad_value,
        use_cache=use_cache,
        finetune_scope=finetune_scope,
        generator=generator,
    )
    out = (
        samples.tokens if return_seq_without_prompt else torch.cat((prompt, samples.tokens), dim=1)
    )
    return out[0] if squeeze else out
