"""Reward-model losses and held-out metrics: one forward per response, pairwise accuracy
over all K-choose-2 pairs of a ranked comparison, rating accuracy for the binned head."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from palm_rlhf.data.collate import ComparisonBatch
from palm_rlhf.functional.preference import ranking_loss_from_scores
from palm_rlhf.model.reward import expected_class
from palm_rlhf.train import sharding


def score_comparisons(reward_fn: Callable[..., Tensor], batch: ComparisonBatch) -> Tensor:
    """Scores (b, K) of a ComparisonBatch: ONE call of `reward_fn` (a RewardModel, or one
    wrapped by Accelerate/DDP) on the (b K, n) flattened present responses; missing
    responses (response_mask False) are not run and score 0 (the ranking losses mask them)."""
    tokens, mask, prompt_mask, _, present = batch
    if tokens.dim() != 3 or mask.shape != tokens.shape or prompt_mask.shape != tokens.shape:
        raise ValueError(
            f"a ComparisonBatch holds tokens, mask and prompt_mask of one shape (b, K, n); got "
            f"{tuple(tokens.shape)}, {tuple(mask.shape)}, {tuple(prompt_mask.shape)}"
        )
    if present.shape != tokens.shape[:2]:
        raise ValueError(f"response_mask must be (b, K) = {tuple(tokens.shape[:2])}")
    num_responses = tokens.shape[1]
    keep = rearrange(present, "b k -> (b k)")
    flat = [rearrange(t, "b k n -> (b k) n")[keep] for t in (tokens, mask, prompt_mask)]
    rewards = reward_fn(flat[0], mask=flat[1], prompt_mask=flat[2])
    scores = rewards.new_zeros(keep.shape[0]).masked_scatter(keep, rewards)
    return rearrange(scores, "(b k) -> b k", k=num_responses)


def batch_loss(model, batch, kind: str, margin: float) -> torch.Tensor:
    """The training loss of one batch through `model` (possibly wrapped by Accelerate)."""
    if kind == "comparisons":
        scores = score_comparisons(model, batch)
        return ranking_loss_from_scores(scores, batch.ranking, batch.response_mask, margin)
    return model(batch.tokens, mask=batch.mask, prompt_mask=batch.prompt_mask, labels=batch.labels)


def _pair_stats(scores, ranking, present, margin: float) -> dict:
    """Per record (b,): ranked pairs, correctly ordered pairs, ranking loss."""
    pairs = rearrange(ranking, "b i -> b i 1") < rearrange(ranking, "b j -> b 1 j")
    pairs &= rearrange(present, "b i -> b i 1") & rearrange(present, "b j -> b 1 j")
    diff = rearrange(scores, "b i -> b i 1") - rearrange(scores, "b j -> b 1 j")
    count = pairs.sum((1, 2))
    # per record, the InstructGPT loss: mean over its pairs of -log sigmoid(s_i - s_j - margin)
    loss = torch.where(pairs, -F.logsigmoid(diff - margin), 0).sum((1, 2)) / count.clamp(min=1)
    return {"count": count, "right": (pairs & (diff > 0)).sum((1, 2)), "loss": loss}


def _rating_stats(logits, labels, binned: bool) -> dict:
    """Per record (b,): correct class, |expected class - label|, loss. labels: class indices
    0..K-1 (rating - 1), so the error is the same in stars."""
    if binned:
        reward, predicted = expected_class(logits), logits.argmax(-1)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
    else:
        reward = logits.float()
        predicted, loss = reward.round().long(), (reward - labels) ** 2
    return {
        "count": torch.ones_like(reward),
        "right": predicted == labels,
        "abs": (reward - labels).abs(),
        "loss": loss,
    }


@torch.no_grad()
def evaluate_reward(model, loader, accelerator, kind: str, margin: float = 0.0) -> dict:
    """Held-out metrics over the whole loader, exact across processes.

    comparisons: valid_accuracy = correctly ordered pairs / ranked pairs (a tie in score counts
    as wrong), valid_loss = mean ranking loss per record. ratings: valid_accuracy = the most
    likely class (scalar head: the rounded reward) equals the label (rating - 1), valid_mae =
    mean |reward - label| with the reward the expected class index (the same error in stars),
    valid_loss = cross-entropy (scalar: squared error). valid_count = pairs (comparisons) or
    records (ratings)."""
    if loader is None:
        return {}
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    if sharding.is_sharded(unwrapped):
        unwrapped.unshard()  # `logits` is not the forward: gather the root's own shards for it
    totals: dict[str, float] = {}
    for batch in loader:
        with accelerator.autocast():
            if kind == "comparisons":
                scores = score_comparisons(unwrapped, batch).float()
                stats = _pair_stats(scores, batch.ranking, batch.response_mask, margin)
            else:
                logits = unwrapped.logits(
                    batch.tokens, mask=batch.mask, prompt_mask=batch.prompt_mask
                )
                stats = _rating_stats(logits.float(), batch.labels, unwrapped.binned_output)
        stats["records"] = torch.ones(batch.tokens.shape[0], device=batch.tokens.device)
        for key, value in stats.items():
            gathered = accelerator.gather_for_metrics(value.float())
            totals[key] = totals.get(key, 0.0) + float(gathered.sum())
    unwrapped.train(was_training)
    sharding.settle(unwrapped)
    metrics = {
        "valid_accuracy": totals["right"] / max(totals["count"], 1.0),
        "valid_loss": totals["loss"] / max(totals["records"], 1.0),
        "valid_count": int(totals["count"]),
    }
    if "abs" in totals:
        metrics["valid_mae"] = totals["abs"] / max(totals["count"], 1.0)
    return metrics
