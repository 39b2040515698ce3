"""From text records to padded tensors: prompt/response sequences, comparisons, ratings.

Any tokenizer works that has ``encode(str) -> list[int]`` (ids only, no special tokens added),
``pad_id`` and ``eos_id``; the byte tokenizer (pad = eos = 0) is the default one.

Prompt and response are encoded separately and concatenated, with no separator, so the
boundary between them is exact for any tokenizer; ``prompt_mask`` marks the prompt's tokens.
Sequences are ``prompt + response + [eos]`` and never longer than ``max_len``: an over-long
prompt is cut from the left (its end, the most recent context, is kept), the response is never
cut, and a response that leaves no room for one prompt token is an error. A prompt must encode
to at least one token: a response to nothing is not an instruction-following example, and a
policy needs a first token to condition on.

Shapes: b = batch, K = responses per prompt, n = longest sequence in the batch.
"""

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from beartype import beartype
from einops import rearrange

from palm_rlhf.data.records import ComparisonRecord, RatingRecord

MISSING_RANK = -1  # ranking entry of a padding response (response_mask False)


@runtime_checkable
class TokenizerLike(Protocol):
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class PromptResponseBatch(NamedTuple):
    tokens: torch.Tensor  # (b, n) long, right-padded with pad_id
    mask: torch.Tensor  # (b, n) bool, True on real (non-pad) tokens
    prompt_mask: torch.Tensor  # (b, n) bool, True on prompt tokens


class ComparisonBatch(NamedTuple):
    tokens: torch.Tensor  # (b, K, n) long
    mask: torch.Tensor  # (b, K, n) bool, real tokens
    prompt_mask: torch.Tensor  # (b, K, n) bool, prompt tokens
    ranking: torch.Tensor  # (b, K) long, 0 = best; MISSING_RANK where response_mask is False
    response_mask: torch.Tensor  # (b, K) bool, False for padding responses (all-pad rows)


class RatingBatch(NamedTuple):
    tokens: torch.Tensor  # (b, n) long
    mask: torch.Tensor  # (b, n) bool
    prompt_mask: torch.Tensor  # (b, n) bool
    labels: torch.Tensor  # (b,) long class indices 0..K-1: the file's rating 1..K minus one


@beartype
def encode_prompt_response(
    tokenizer: TokenizerLike, prompt: str, response: str, max_len: int, add_eos: bool = True
) -> tuple[list[int], int]:
    """Encode ``prompt + response (+ eos)`` into at most ``max_len`` ids.

    Returns ``(ids, num_prompt_tokens)``; ``ids[:num_prompt_tokens]`` is the (possibly
    left-truncated) prompt. Raises ValueError, naming the lengths, when the prompt encodes to
    nothing, when the response part is empty, or when the response part plus one prompt token
    exceeds ``max_len``.
    """
    ids, num_prompt, _ = encode_prompt_response_cut(tokenizer, prompt, response, max_len, add_eos)
    return ids, num_prompt


def encode_prompt_response_cut(
    tokenizer: TokenizerLike, prompt: str, response: str, max_len: int, add_eos: bool = True
) -> tuple[list[int], int, int]:
    """``encode_prompt_response`` plus the number of prompt tokens cut from the left."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one prompt and one response token), got {max_len}")
    prompt_ids = list(tokenizer.encode(prompt))
    response_ids = list(tokenizer.encode(response)) + ([tokenizer.eos_id] if add_eos else [])
    if not prompt_ids:
        raise ValueError("the prompt encodes to 0 tokens; at least 1 is required")
    if not response_ids:
        raise ValueError("the response encodes to 0 tokens (and add_eos is False)")
    room = max_len - len(response_ids)  # tokens left for the prompt
    if room < 1:
        raise ValueError(
            f"the response takes {len(response_ids)} tokens"
            f"{' with eos' if add_eos else ''}, leaving no room for the prompt "
            f"({len(prompt_ids)} tokens) within max_len={max_len}"
        )
    cut = max(0, len(prompt_ids) - room)
    prompt_ids = prompt_ids[cut:]  # keep the end: the most recent context
    return prompt_ids + response_ids, len(prompt_ids), cut


@beartype
def pad_sequences(
    seqs: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length: ``tokens (b, n)`` long and ``mask (b, n)`` bool (real ids)."""
    if side not in ("left", "right"):
        raise ValueError(f'side must be "left" or "right", got {side!r}')
    if not seqs:
        raise ValueError("no sequences to pad")
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"sequence {i} is empty")
    n = max(len(seq) for seq in seqs)
    tokens = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(n - len(seq), n)
        tokens[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = True
    return tokens, mask


@beartype
def left_pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation, so every prompt ends at the last column.

    Returns ``tokens (b, n)`` long and ``mask (b, n)`` bool (True on prompt ids).
    """
    return pad_sequences(prompts, pad_id, side="left")


def _encode(tokenizer: TokenizerLike, prompt: str, response: str, max_len: int, where: str):
    """``encode_prompt_response`` whose ValueError names the batch item."""
    try:
        return encode_prompt_response(tokenizer, prompt, response, max_len)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _pad_encoded(encoded: list[tuple[list[int], int]], pad_id: int) -> PromptResponseBatch:
    """Right-pad ``(ids, num_prompt_tokens)`` items into tokens, mask, prompt_mask (b, n)."""
    tokens, mask = pad_sequences([ids for ids, _ in encoded], pad_id)
    num_prompt = torch.tensor([num for _, num in encoded], dtype=torch.long)
    prompt_mask = torch.arange(tokens.shape[-1]) < rearrange(num_prompt, "b -> b 1")
    return PromptResponseBatch(tokens, mask, prompt_mask)


@beartype
def collate_prompt_response(
    tokenizer: TokenizerLike, pairs: list[tuple[str, str]], max_len: int
) -> PromptResponseBatch:
    """Encode ``(prompt, response)`` pairs (+ eos each), right-padded to the longest: (b, n)."""
    encoded = [_encode(tokenizer, p, r, max_len, f"pair {i}") for i, (p, r) in enumerate(pairs)]
    return _pad_encoded(encoded, tokenizer.pad_id)


@beartype
def collate_ratings(
    tokenizer: TokenizerLike, records: list[RatingRecord], max_len: int
) -> RatingBatch:
    """Encode rated responses: tokens/mask/prompt_mask (b, n) and labels (b,), the class
    index of each rating: a file's human 1..K rating r is class r - 1 (RewardModel's labels)."""
    encoded = [
        _encode(tokenizer, r.prompt, r.response, max_len, f"rating record {i}")
        for i, r in enumerate(records)
    ]
    batch = _pad_encoded(encoded, tokenizer.pad_id)
    labels = torch.tensor([r.rating - 1 for r in records], dtype=torch.long)
    return RatingBatch(*batch, labels)


@beartype
def collate_comparisons(
    tokenizer: TokenizerLike, records: list[ComparisonRecord], max_len: int
) -> ComparisonBatch:
    """Encode each record's K responses to its prompt: tokens/masks (b, K, n), ranking (b, K).

    K is the largest number of responses in the batch; records with fewer are padded with
    all-pad responses whose ``response_mask`` is False and rank ``MISSING_RANK``. A reward
    model runs one forward per response by flattening ``(b, K, n) -> (b K, n)``.
    """
    if not records:
        raise ValueError("no comparison records to collate")
    for i, record in enumerate(records):
        if len(record.responses) < 2 or len(record.ranking) != len(record.responses):
            raise ValueError(
                f"comparison record {i}: needs >= 2 responses and one rank each, got "
                f"{len(record.responses)} responses and {len(record.ranking)} ranks"
            )
    num_responses = max(len(r.responses) for r in records)
    encoded, present = [], []
    for i, record in enumerate(records):
        for k in range(num_responses):
            if k < len(record.responses):
                where = f"comparison record {i}, response {k}"
                encoded.append(
                    _encode(tokenizer, record.prompt, record.responses[k], max_len, where)
                )
            else:
                encoded.append(([tokenizer.pad_id], 0))  # one pad id, its mask cleared below
            present.append(k < len(record.responses))
    flat = _pad_encoded(encoded, tokenizer.pad_id)

    response_mask = rearrange(torch.tensor(present), "(b k) -> b k", k=num_responses)
    keep = rearrange(response_mask, "b k -> b k 1")
    tokens = rearrange(flat.tokens, "(b k) n -> b k n", k=num_responses)  # missing: all pad
    mask = rearrange(flat.mask, "(b k) n -> b k n", k=num_responses) & keep
    prompt_mask = rearrange(flat.prompt_mask, "(b k) n -> b k n", k=num_responses) & keep

    ranking = torch.full((len(records), num_responses), MISSING_RANK, dtype=torch.long)
    for i, record in enumerate(records):
        ranking[i, : len(record.ranking)] = torch.tensor(record.ranking, dtype=torch.long)
    return ComparisonBatch(tokens, mask, prompt_mask, ranking, response_mask)
