"""A rollout, algorithm-neutral: sample responses, lay them out, score them, and record the
per-token log-probabilities (policy and reference) and values every RL algorithm reads.

Layout. Prompts are sampled left-padded (so every row's next token lands in the last column
and one KV-cached loop serves prompts of different lengths). For everything after sampling a
rollout is re-laid out *left-justified*:

    tokens       [p p p r r r EOS . .]   prompt, response up to and including EOS, then padding
    mask         [T T T T T T T   F F]   real tokens
    prompt_mask  [T T T F F F F   F F]

which is the layout the reward model is trained on (see `collate.py`), and in which a causal
model needs no attention mask: padding only follows the real tokens. Per-token quantities of
the actions live in the *shifted* frame of n - 1 columns, column t describing token t + 1 (the
logits at position t predict token t + 1; the critic's value at t is that of the state before
it):

    action_mask  (b, n - 1)  = (mask & ~prompt_mask)[:, 1:]
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from palm_rlhf.functional.logprobs import log_probs_from_logits
from palm_rlhf.model.sampling import prompts_in_groups, sample_tokens
from palm_rlhf.model.shared_prefix import SharedPrefix, groups_share


class Rollout(NamedTuple):
    tokens: Tensor  # (b, n) long, left-justified: prompt, response (to EOS), padding
    mask: Tensor  # (b, n) bool, real tokens
    prompt_mask: Tensor  # (b, n) bool, prompt tokens

    @property
    def action_mask(self) -> Tensor:
        """(b, n - 1) bool: column t is True when token t + 1 is a response token."""
        return (self.mask & ~self.prompt_mask)[:, 1:]


def join_prompt_response(
    prompt: Tensor,
    prompt_mask: Tensor,
    response: Tensor,
    response_mask: Tensor,
    pad_value: int,
) -> Rollout:
    """Left-padded prompts (b, P) + sampled responses (b, M) -> left-justified `Rollout`.

    Each row is shifted left by its number of padding columns, one gather for the batch.
    """
    tokens = torch.cat((prompt, response), dim=1)
    mask = torch.cat((prompt_mask, response_mask), dim=1)
    width = tokens.shape[1]
    prompt_lengths = prompt_mask.sum(dim=1)
    shift = rearrange(prompt.shape[1] - prompt_lengths, "b -> b 1")
    source = torch.arange(width, device=tokens.device) + shift  # (b, n): column read by each
    inside = source < width
    source = source.clamp(max=width - 1)
    mask = mask.gather(1, source) & inside
    tokens = torch.where(mask, tokens.gather(1, source), pad_value)
    positions = torch.arange(width, device=tokens.device)
    prompt_mask = positions < rearrange(prompt_lengths, "b -> b 1")
    return Rollout(tokens, mask, prompt_mask)


def shared_prompt(tokens: Tensor, prompt_mask: Tensor, group_size: int) -> Optional[SharedPrefix]:
    """The prefix the rows of each group share, for a forward over left-justified rows
    (b, n) to run once per group (`model/shared_prefix.py`): the shortest prompt, when the rows
    are whole groups of `group_size` answering one prompt each (as the trainer samples them and
    `group_minibatches` cuts them); None otherwise (PPO's one response per prompt, a rollout
    chunk that splits a group)."""
    if group_size < 2:
        return None
    length = int(prompt_mask.sum(dim=1).min())
    return SharedPrefix(group_size, length) if groups_share(tokens, group_size, length) else None


@torch.no_grad()
def score_sequences(reward_model, tokens: Tensor, mask: Tensor, prompt_mask: Tensor) -> Tensor:
    """Reward of left-justified sequences (b, n) -> (b,) float32, without grad or dropout.

    An `nn.Module` (a RewardModel) is called as `model(seq, mask=..., prompt_mask=...)` in eval
    mode (its own mode restored afterwards); any other callable as `fn(seq, mask, prompt_mask)`.
    """
    if isinstance(reward_model, nn.Module):
        was_training = reward_model.training
        reward_model.eval()
        try:
            scores = reward_model(tokens, mask=mask, prompt_mask=prompt_mask)
        finally:
            reward_model.train(was_training)
    else:
        scores = reward_model(tokens, mask, prompt_mask)
    scores = torch.as_tensor(scores, device=tokens.device)
    if scores.shape != tokens.shape[:1]:
        raise ValueError(
            f"the reward model returned shape {tuple(scores.shape)} for {tokens.shape[0]} "
            "sequences; it must return one score per sequence, (b,)"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("the reward model returned NaN or Inf scores")
    return scores.float()


# ----------------------------------------------------------------------------- experience


class Experience(NamedTuple):
    """One batch of PPO experience; (b, n) layout fields and (b, n - 1) action-frame fields."""

    tokens: Tensor  # (b, n) long
    mask: Tensor  # (b, n) bool
    prompt_mask: Tensor  # (b, n) bool
    action_mask: Tensor  # (b, n - 1) bool
    old_logprobs: Tensor  # (b, n - 1) log pi_old(token t + 1)
    ref_logprobs: Tensor  # (b, n - 1) log pi_ref(token t + 1)
    old_values: Tensor  # (b, n - 1) V_old(state before token t + 1); 0 without a value critic
    advantages: Tensor  # (b, n - 1)
    returns: Tensor  # (b, n - 1) the critic's regression targets
    scores: Tensor  # (b,) reward model score (after penalty and clipping)
    # (b, n - 1) dense per-token rewards of an ImplicitPRM critic (PRIME); None for other critics
    process_rewards: Optional[Tensor] = None

    def select(self, index: Tensor) -> Experience:
        """Rows `index`, trimmed to the columns some selected row still uses."""
        rows = Experience(*(None if field is None else field[index] for field in self))
        used = int(rows.mask.any(dim=0).nonzero().max()) + 1
        return Experience(
            *(
                field
                if field is None or field.dim() == 1
                else field[:, :used]
                if field.shape[1] == self.tokens.shape[1]
                else field[:, : used - 1]
                for field in rows
            )
        )


def pad_columns(x: Tensor, width: int, value) -> Tensor:
    """Right-pad the last dimension of x (b, k) to `width` with `value`."""
    return F.pad(x, (0, width - x.shape[-1]), value=value)


def concat_experience(parts: list[Experience], pad_value: int) -> Experience:
    """Stack experience of several rollout chunks, right-padding to the widest chunk."""
    width = max(part.tokens.shape[1] for part in parts)
    fields = []
    for name in Experience._fields:
        tensors = [getattr(part, name) for part in parts]
        if tensors[0] is None:  # an optional field no chunk carries
            fields.append(None)
            continue
        if tensors[0].dim() == 1:
            fields.append(torch.cat(tensors))
            continue
        target = width if tensors[0].shape[1] == parts[0].tokens.shape[1] else width - 1
        value = pad_value if name == "tokens" else (False if tensors[0].dtype == torch.bool else 0)
        fields.append(torch.cat([pad_columns(t, target, value) for t in tensors]))
    return Experience(*fields)


def tempered_logits(logits: Tensor, temperature: float) -> Tensor:
    """The distribution responses were sampled from: float32 logits / T (T = 0, greedy: as is).

    Old, reference and new log-probs all use it, so the PPO ratio and the KL compare the
    policy that actually acted."""
    logits = logits.float()
    return logits / temperature if temperature > 0 else logits


@torch.no_grad()
def collect(
    actor,
    reference,
    critic,
    reward_model,
    prompt: Tensor,
    prompt_mask: Tensor,
    new_tokens: int,
    *,
    temperature: float,
    pad_value: int,
    eos_token: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    scoring_passes: bool = True,
    group_size: int = 1,
    **sampling,
) -> tuple[Experience, Tensor]:
    """One batched rollout of left-padded prompts (b, P): sample `new_tokens` at most from
    the actor (an `Actor`: a PaLM + its LoRA scope), lay out, score with `reward_model`, and
    record old (actor) and reference log-probs and the critic's values (zeros without a
    critic; an ImplicitPRM critic's output goes to `process_rewards` instead). Returns the
    experience (advantages and returns still 0) and whether each response ended with EOS (b,).
    The caller sets eval mode and autocast; `sampling` holds top_k/top_p. `scoring_passes`
    False (see `scoring_passes.py`) skips the old and reference log-probs: both are 0 then.
    `group_size`: responses per prompt, in contiguous rows; sampling prefills and the scoring
    passes run each group's prompt once (`shared_prompt`).
    """
    groups = group_size if prompts_in_groups(prompt, prompt_mask, group_size) else 1
    samples = sample_tokens(
        actor.palm,
        prompt,
        new_tokens,
        prompt_mask=prompt_mask,
        group_size=groups,
        temperature=temperature,
        eos_token=eos_token,
        pad_value=pad_value,
        use_cache=True,
        finetune_scope=actor.scope,
        generator=generator,
        **sampling,
    )
    seqs = join_prompt_response(prompt, prompt_mask, samples.tokens, samples.mask, pad_value)
    scores = score_sequences(reward_model, *seqs)
    tokens, targets = seqs.tokens, seqs.tokens[:, 1:]
    if scoring_passes:
        shared = shared_prompt(tokens, seqs.prompt_mask, group_size)
        old_logits = actor(tokens, shared_prefix=shared)[:, :-1]
        old_logprobs = log_probs_from_logits(tempered_logits(old_logits, temperature), targets)
        ref_logits = reference(tokens, disable_lora=True, shared_prefix=shared)[:, :-1]
        ref_logprobs = log_probs_from_logits(tempered_logits(ref_logits, temperature), targets)
    else:  # the update computes its own (scoring_passes.py); nothing reads these
        old_logprobs = torch.zeros(targets.shape, device=tokens.device)
        ref_logprobs = torch.zeros_like(old_logprobs)
    zeros = torch.zeros_like(old_logprobs)
    values = critic.values(critic(tokens, seqs.action_mask)) if critic is not None else zeros
    process_rewards = None
    if getattr(critic, "process_rewards", False):  # a PRM scores tokens, it values no state
        process_rewards, values = values, zeros
    ended = torch.ones_like(scores, dtype=torch.bool)
    if eos_token is not None:
        ended = ((samples.tokens == eos_token) & samples.mask).any(dim=-1)
    experience = Experience(
        tokens,
        seqs.mask,
        seqs.prompt_mask,
        seqs.action_mask,
        old_logprobs,
        ref_logprobs,
        values,
        zeros,
        zeros,
        scores,
        process_rewards,
    )
    return experience, ended


def group_minibatches(
    num_rows: int, group_size: int, rows_per_step: int, generator: torch.Generator
) -> list[Tensor]:
    """Row indices of shuffled minibatches made of whole groups (`group_size` contiguous rows
    answering one prompt), about `rows_per_step` rows each; with group_size 1, a plain shuffle.
    Group losses (TPO's softmax over the group, FlowRL's group-normalised reward) need whole
    groups in every minibatch."""
    groups = torch.randperm(num_rows // group_size, generator=generator)
    rows = rearrange(groups, "p -> p 1") * group_size + torch.arange(group_size)
    return list(
        rearrange(rows, "p g -> (p g)").split(max(1, rows_per_step // group_size) * group_size)
    )
