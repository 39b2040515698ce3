"""Token sampling: logit filters and the KV-cached autoregressive loop.

`sample_tokens` is the loop the PPO rollout calls at high volume; `PaLM.generate` is a thin,
reference-compatible wrapper around it (`seq_len` counts the prompt, only new tokens return,
top-k filtered with `filter_thres=0.9` unless told otherwise — the reference's defaults).
`top_k(logits, thres)` and `top_p(logits, thres)` are the reference project's filter functions
(its `utils.top_k`/`utils.top_p`), for `generate(filter_logits_fn=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from palm_rlhf.model.config import check_token_ids
from palm_rlhf.model.shared_prefix import groups_share


class Decoder(Protocol):
    """What sampling needs of a model (PaLM has it): a forward returning logits, with an
    optional KV cache, and its config. Sampling never imports the model class; the model imports
    it. Every step is a call of the model itself (not of its submodules), so a wrapped model
    (FSDP2 shards gathered by forward hooks) samples like a plain one."""

    num_tokens: int
    config: Any
    training: bool
    device: torch.device

    def init_cache(self, batch: int, max_len: int, **options) -> Any: ...
    def __call__(self, x: Tensor, **kwargs) -> Tensor: ...
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


def reference_top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """The reference's `top_k(logits, thres)`: keep the ceil((1 - thres) * vocab) largest logits
    of each row (b, v) (at least one); the rest become -inf."""
    if not 0.0 <= thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {thres}")
    return top_k_filter(logits, max(1, math.ceil((1 - thres) * logits.shape[-1])))


def reference_top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """The reference's `top_p(logits, thres)`: nucleus sampling with p = 1 - thres (so the
    default 0.9 keeps a 10% nucleus): drop a token once the tokens ranked above it hold more
    than 1 - thres of the probability; the most likely token always stays."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) > (1 - thres)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# the reference's names, for `generate(filter_logits_fn=top_k)` in ported notebooks
top_k = reference_top_k
top_p = reference_top_p


def filter_logits(
    logits: Tensor,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    filter_thres: Optional[float] = None,
    logits_filter: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Apply the requested filters. `filter_thres` is the reference project's top-k spelling:
    keep the top ceil((1 - thres) * vocab) logits. `logits_filter` is any (b, v) -> (b, v)
    function, applied first (generate's `filter_logits_fn`, its threshold bound)."""
    if logits_filter is not None:
        logits = logits_filter(logits)
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


def prompts_in_groups(prompt: Tensor, prompt_mask: Optional[Tensor], group_size: int) -> bool:
    """Whether the prompts (b, n) (and their mask) are contiguous groups of `group_size`
    equal rows."""
    width = prompt.shape[1]
    return groups_share(prompt, group_size, width) and (
        prompt_mask is None or groups_share(prompt_mask, group_size, width)
    )


def _check_groups(
    prompt: Tensor, prompt_mask: Optional[Tensor], group_size: int, extra_embed: Optional[Tensor]
):
    if group_size == 1:
        return
    if not prompts_in_groups(prompt, prompt_mask, group_size):
        raise ValueError(
            f"group_size={group_size}: the {prompt.shape[0]} prompts are not contiguous groups "
            f"of {group_size} equal rows"
        )
    if extra_embed is not None and extra_embed.dim() == 3 and extra_embed.shape[0] > 1:
        raise ValueError("group_size cannot be combined with a per-row extra_embed")


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
    stop_early: bool = True,
    logits_filter: Optional[Callable[[Tensor], Tensor]] = None,
    extra_embed: Optional[Tensor] = None,
    compile_decode: bool = False,
    group_size: int = 1,
) -> Iterator[Tensor]:
    """Yield each step's sampled tokens (b,) as soon as they exist (streaming).

    Prompts of different lengths are left-padded, with `prompt_mask` (b, n) True on real tokens;
    rotary positions skip the padding, so a row samples the same as it would alone. A row that
    has produced `eos_token` yields `pad_value` from then on; iteration ends when every row has.
    The model is in eval mode while iterating and gets its previous mode back afterwards.
    `extra_embed` is added to the token embeddings of every step (as the reference's forward
    does), so it must broadcast over the sequence axis: (dim,), (b, 1, dim) or (1, 1, dim).
    `stop_early=False` runs all `max_new_tokens` steps even when every row has ended (yielding
    `pad_value`): processes that decode together through a sharded model take equal steps.
    `compile_decode=True` runs the cached one-token steps through `torch.compile` (the first
    call for a model and cache shape compiles, tens of seconds on a CPU; later ones reuse it).
    `group_size`: the prompts come in contiguous groups of that many equal rows (checked), as
    group RL samples them; with the cache each is prefilled once and its cache repeated over
    the group (`KVCache.repeat_rows`).
    """
    _check_sampling_inputs(model, prompt, prompt_mask, max_new_tokens)
    _check_groups(prompt, prompt_mask, group_size, extra_embed)
    if extra_embed is not None and extra_embed.dim() >= 2 and extra_embed.shape[-2] != 1:
        raise ValueError(
            "extra_embed must broadcast over the sequence axis while sampling (shape (dim,) or "
            f"(b, 1, dim)), got {tuple(extra_embed.shape)}"
        )
    filters = dict(top_k=top_k, top_p=top_p, filter_thres=filter_thres, logits_filter=logits_filter)
    embed_kwargs = dict(finetune_scope=finetune_scope, extra_embed=extra_embed)
    batch = prompt.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    was_training = model.training
    model.eval()
    try:
        cache = None
        seq, seq_mask = prompt, prompt_mask
        if use_cache:
            options = {"compile": True} if compile_decode else {}
            rows, width = batch // group_size, prompt.shape[1] + max_new_tokens
            cache = model.init_cache(rows, width, **options)
            masks = seq_mask[::group_size] if seq_mask is not None else None
            logits = model(seq[::group_size], mask=masks, cache=cache, **embed_kwargs)[:, -1]
            if group_size > 1:
                cache = cache.repeat_rows(group_size)
                logits = logits.repeat_interleave(group_size, dim=0)
        else:
            logits = model(seq, mask=seq_mask, **embed_kwargs)[:, -1]
        for step in range(max_new_tokens):
            token = sample_from_logits(logits, temperature, generator, **filters).masked_fill(
                done, pad_value
            )
            yield token
            if eos_token is not None:
                done = done | (token == eos_token)
            if (stop_early and bool(done.all())) or step == max_new_tokens - 1:
                return
            if cache is not None:
                logits = model(token[:, None], cache=cache, **embed_kwargs)[:, -1]
            else:
                seq = torch.cat((seq, token[:, None]), dim=1)
                if seq_mask is not None:
                    seq_mask = torch.cat((seq_mask, seq_mask.new_ones(batch, 1)), dim=1)
                logits = model(seq, mask=seq_mask, **embed_kwargs)[:, -1]
    finally:
        model.train(was_training)


def sample_tokens(
    model: Decoder, prompt: Tensor, max_new_tokens: int, use_tqdm: bool = False, **kwargs
) -> Samples:
    """Sample up to `max_new_tokens` after `prompt` (b, n); see `iter_sample` for the options.

    Returns the tokens trimmed to the last step any row was still running, and a mask that is
    True on sampled tokens up to and including each row's EOS. `use_tqdm` shows a `tqdm.auto`
    bar over the new tokens.
    """
    steps = iter_sample(model, prompt, max_new_tokens, **kwargs)
    if use_tqdm:
        steps = tqdm(steps, total=max_new_tokens, desc="sampling", leave=False)
    tokens = torch.stack(list(steps), dim=1)
    eos_token, pad_value = kwargs.get("eos_token"), kwargs.get("pad_value", 0)
    if eos_token is None:
        return Samples(tokens, torch.ones_like(tokens, dtype=torch.bool))
    is_eos = (tokens == eos_token).long()
    after_eos = (is_eos.cumsum(dim=-1) - is_eos) > 0
    return Samples(tokens.masked_fill(after_eos, pad_value), ~after_eos)


def reference_filters(
    top_k: Optional[int],
    top_p: Optional[float],
    filter_logits_fn: Optional[Callable[..., Tensor]],
    filter_thres: float,
) -> dict:
    """The filters of a reference-style decode, as keywords for `sample_tokens`: our `top_k` /
    `top_p`, when given, take the place of `filter_logits_fn(logits, thres=filter_thres)`
    (the reference's filter, top-k by default); `filter_logits_fn=None` filters nothing."""
    ours = top_k is not None or top_p is not None
    if ours and filter_logits_fn not in (None, reference_top_k):
        raise ValueError("pass either filter_logits_fn or top_k/top_p, not both")
    logits_filter = None
    if filter_logits_fn is not None and not ours:
        logits_filter = partial(filter_logits_fn, thres=filter_thres)
    return dict(top_k=top_k, top_p=top_p, logits_filter=logits_filter)


def generate(
    model: Decoder,
    seq_len: int,
    prompt: Optional[Tensor] = None,
    temperature: float = 1.0,
    filter_logits_fn: Optional[Callable[..., Tensor]] = reference_top_k,
    filter_thres: float = 0.9,
    pad_value: int = 0,
    eos_token: Optional[int] = None,
    return_seq_without_prompt: bool = True,
    use_tqdm: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    prompt_mask: Optional[Tensor] = None,
    finetune_scope: Optional[str] = None,
    disable_lora: bool = False,
    extra_embed: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Reference-compatible generation: `seq_len` is the total length including the prompt.

    The reference's keywords mean what they mean there: by default the logits are top-k
    filtered by `filter_logits_fn(logits, thres=filter_thres)` = `top_k(logits, thres=0.9)`
    (keep ceil(0.1 * vocab) tokens), temperature 1; `filter_logits_fn=None` samples from the
    full distribution. Our `top_k` (a count) and `top_p` (a nucleus mass) keywords, when given,
    take the place of `filter_logits_fn`. `seq_len` at or below the prompt length still samples
    one token, as the reference does. `finetune_scope`, `disable_lora` and `extra_embed` are
    the reference forward's keywords it passes through.

    prompt (n,) or (b, n); with no prompt, one random start token is drawn (as the reference
    project does) and returned with the sample.
    """
    filters = reference_filters(top_k, top_p, filter_logits_fn, filter_thres)
    if prompt is None:
        prompt = torch.randint(
            0, model.num_tokens, (1, 1), device=model.device, generator=generator
        )
        return_seq_without_prompt = False
    squeeze = isinstance(prompt, Tensor) and prompt.dim() == 1
    if squeeze:
        prompt = prompt[None]
        prompt_mask = prompt_mask[None] if prompt_mask is not None else None
    check_token_ids(prompt, model.num_tokens, "prompt")
    samples = sample_tokens(
        model,
        prompt,
        max(1, seq_len - prompt.shape[1]),  # the reference samples at least one token
        use_tqdm=use_tqdm,
        prompt_mask=prompt_mask,
        temperature=temperature,
        **filters,
        eos_token=eos_token,
        pad_value=pad_value,
        use_cache=use_cache,
        finetune_scope=None if disable_lora else finetune_scope,
        extra_embed=extra_embed,
        generator=generator,
    )
    out = (
        samples.tokens if return_seq_without_prompt else torch.cat((prompt, samples.tokens), dim=1)
    )
    return out[0] if squeeze else out
