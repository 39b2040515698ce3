"""Direct Preference Optimization (Rafailov et al. 2023): learn from comparisons with no reward
model and no sampling, by raising the policy's log-likelihood ratio to a reference on chosen
responses relative to rejected ones:

    h = β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))]
    loss = -log σ(h)                                 (`functional.preference.dpo_loss`, eq. 7)

log π(y|x) sums the log-probs of the response tokens and its EOS only; the prompt is context.
The implicit reward of a response is β (log π - log π_ref); we report its mean on chosen and
rejected responses, their margin, and the preference accuracy (share of pairs whose chosen
reward is the higher), on training batches and held-out data.

The reference: with LoRA, the policy is a scope on the base and the reference is the same
model with the scope disabled (no copy, no extra memory); with full fine-tuning, the reference
is a frozen copy of the base made before training. A ranked list of K responses contributes
every pair of responses with different ranks (K choose 2 at most), the better one as chosen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from beartype import beartype
from einops import rearrange
from torch import Tensor

from palm_rlhf.data.examples import (
    TokenExample,
    collate_token_examples,
    load_examples,
    sft_example,
)
from palm_rlhf.data.records import ComparisonRecord, read_comparisons
from palm_rlhf.functional.logprobs import sequence_log_probs, shifted_log_probs
from palm_rlhf.functional.preference import dpo_loss
from palm_rlhf.options import option
from palm_rlhf.train.finetune import FinetuneConfig, FinetuneResult, LossTerms, Stage, run_stage


@dataclass
class DPOConfig(FinetuneConfig):
    data: Optional[str] = option(
        None, "comparison data: pairs, ranked lists or HH-RLHF", required=True
    )
    out_dir: str = option("checkpoints/dpo", "where step-N checkpoint folders are written")
    beta: float = option(0.1, "β: strength of the implicit KL constraint to the reference")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO)")
    lr: float = option(1e-5, "peak learning rate (AdamW); LoRA usually wants about 10x more")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


class PairExample(NamedTuple):
    chosen: TokenExample
    rejected: TokenExample


class DPOOutput(NamedTuple):
    loss: Tensor  # scalar, mean over pairs
    chosen_rewards: Tensor  # (b,) β (log π - log π_ref) of the chosen responses, detached
    rejected_rewards: Tensor  # (b,)
    policy_logps: Tensor  # (b, 2) log π of the (chosen, rejected) responses
    reference_logps: Tensor  # (b, 2) log π_ref, no gradient


def ordered_pairs(record: ComparisonRecord) -> list[tuple[str, str]]:
    """Every (better, worse) pair of a record's responses, by rank (0 = best; ties skipped)."""
    indexed = list(zip(record.ranking, record.responses))
    return [(a, b) for rank_a, a in indexed for rank_b, b in indexed if rank_a < rank_b]


def dpo_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_len: int) -> PairExample:
    """Both responses to one prompt, each with its loss mask on response + EOS."""
    return PairExample(
        sft_example(tokenizer, prompt, chosen, max_len),
        sft_example(tokenizer, prompt, rejected, max_len),
    )


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, Tensor]:
    """Pairs -> one batch of 2b rows: chosen rows 0..b-1, rejected rows b..2b-1."""
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return collate_token_examples(examples, pad_id)


def response_log_probs(model, batch: dict[str, Tensor], **forward) -> Tensor:
    """log p(response | prompt) of each row: sum of target-token log-probs, (rows,)."""
    logits = model(batch["tokens"], mask=batch["mask"], **forward)
    return sequence_log_probs(shifted_log_probs(logits, batch["tokens"]), batch["loss_mask"][:, 1:])


def dpo_forward(
    model,
    batch: dict[str, Tensor],
    beta: float,
    label_smoothing: float = 0.0,
    scope: Optional[str] = None,
    reference=None,
) -> DPOOutput:
    """DPO on a `collate_pairs` batch (2b rows). The policy is `model` with LoRA `scope`; the
    reference is `reference` (a frozen copy) or, when None, `model` itself, in both cases run
    with LoRA disabled and without gradient."""
    policy = rearrange(response_log_probs(model, batch, finetune_scope=scope), "(k b) -> b k", k=2)
    with torch.no_grad():
        ref = response_log_probs(
            reference if reference is not None else model, batch, disable_lora=True
        )
    ref = rearrange(ref, "(k b) -> b k", k=2).to(policy.dtype)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, label_smoothing
    )
    return DPOOutput(loss, chosen_rewards, rejected_rewards, policy, ref)


def dpo_loss_fn(beta: float, label_smoothing: float, scope: Optional[str], reference=None):
    """A `Stage.loss_fn`: the pair losses summed, and reward metrics (sums over pairs)."""

    def loss_fn(model, batch: dict[str, Tensor], unwrapped) -> LossTerms:
        # a LoRA reference runs on the unwrapped model, outside any distributed wrapper
        ref_model = reference if reference is not None else unwrapped
        out = dpo_forward(model, batch, beta, label_smoothing, scope, ref_model)
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        pairs = torch.tensor(float(len(chosen)), device=chosen.device)
        metrics = {
            "accuracy": ((chosen > rejected).float().sum(), pairs),
            "chosen_reward": (chosen.sum(), pairs),
            "rejected_reward": (rejected.sum(), pairs),
            "margin": ((chosen - rejected).sum(), pairs),
        }
        return LossTerms(out.loss * pairs, pairs, metrics)

    return loss_fn


@beartype
def train_dpo(config: DPOConfig) -> FinetuneResult:
    """DPO of `config.base` on comparison data; metrics: loss, accuracy, rewards, margin."""

    def build(model, tokenizer) -> Stage:
        def encode(record: ComparisonRecord) -> list[PairExample]:
            return [
                dpo_pair(tokenizer, record.prompt, chosen, rejected, config.max_len)
                for chosen, rejected in ordered_pairs(record)
            ]

        train, valid = load_examples(config, read_comparisons, encode, "comparison")
        reference = None if config.use_lora else copy.deepcopy(model).requires_grad_(False)
        scope = "dpo" if config.use_lora else None
        return Stage(
            "dpo",
            train,
            valid,
            lambda b: collate_pairs(b, tokenizer.pad_id),
            dpo_loss_fn(config.beta, config.label_smoothing, scope, reference),
            frozen=(reference,) if reference is not None else (),
        )

    return run_stage(config, build, "dpo")


def run_dpo(config: DPOConfig) -> FinetuneResult:
    """`palm-rlhf dpo`: train, then print one summary line."""
    result = train_dpo(config)
    line = f"dpo: train loss {result.train['loss']:.4f}, accuracy {result.train['accuracy']:.3f}"
    if result.valid:
        valid = result.valid
        line += (
            f"; valid loss {valid['loss']:.4f}, accuracy {valid['accuracy']:.3f}, "
            f"margin {valid['margin']:.4f}"
        )
    print(f"{line}; checkpoint {result.checkpoint}")
    return result
