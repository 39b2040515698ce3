"""The held-out measurements of the pipeline demo (definitions in pipeline_demo.py's docstring).

Each is a pure function of a model and a data file: no training, no gradient, eval mode.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from palm_rlhf.data.collate import left_pad_prompts
from palm_rlhf.data.corpus import SequentialChunkDataset, load_pretraining_data
from palm_rlhf.data.examples import TokenExample, collate_token_examples
from palm_rlhf.data.records import ComparisonRecord, SFTRecord, read_comparisons, read_sft
from palm_rlhf.functional.logprobs import log_probs_from_logits
from palm_rlhf.functional.masked import masked_sum
from palm_rlhf.model.sampling import sample_tokens
from palm_rlhf.rl.rollout import join_prompt_response, score_sequences
from palm_rlhf.train.coh import coh_generate, feedback_text, hindsight_sequences
from palm_rlhf.train.dpo import response_log_probs
from palm_rlhf.train.sft import response_loss_terms, sft_example


@torch.no_grad()
def bits_per_byte(
    model, data_dir: Path, seq_len: int, batch_size: int = 16, num_batches: int = 8
) -> float:
    """Validation bits per character as train.py measures them: mean next-byte loss / ln 2
    over the first batch_size * num_batches chunks of seq_len + 1 bytes of the validation split."""
    splits, _ = load_pretraining_data(data_dir)
    chunks = SequentialChunkDataset(splits.valid, seq_len)
    count = min(len(chunks), batch_size * num_batches)
    model.eval()
    losses = []
    for start in range(0, count, batch_size):
        batch = torch.stack([chunks[i] for i in range(start, min(start + batch_size, count))])
        losses.append(model(batch.long(), return_loss=True))
    return float(torch.stack(losses).mean()) / math.log(2)


@torch.no_grad()
def response_loss(model, tokenizer, path: Path, max_len: int, batch_size: int = 32) -> float:
    """Mean -log p (nats/token) of the response tokens and EOS of an SFT file, prompt given."""
    model.eval()
    examples = [sft_example(tokenizer, r.prompt, r.response, max_len) for r in read_sft(path)]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_token_examples(examples[start : start + batch_size], tokenizer.pad_id)
        logits = model(batch["tokens"], mask=batch["mask"])
        loss_sum, num = response_loss_terms(logits, batch["tokens"], batch["loss_mask"])
        total, count = total + float(loss_sum), count + int(num)
    return total / count


def mean_log_likelihoods(model, examples: list[TokenExample], pad_id: int) -> torch.Tensor:
    """(1/|y|) sum_t log p(y_t | context) over each example's target tokens, (b,)."""
    batch = collate_token_examples(examples, pad_id)
    return response_log_probs(model, batch) / batch["loss_mask"][:, 1:].sum(-1).clamp(min=1)


def answer_example(tokenizer, prompt: str, answer: str, max_len: int, phrase: Optional[str]):
    """`answer` after the prompt, or after prompt + CoH feedback `phrase` laid out exactly as
    CoH training lays it out; the loss mask covers the answer and its EOS."""
    if phrase is None:
        return sft_example(tokenizer, prompt, answer, max_len)
    # a record whose best response is `answer` gives, in mode "p", [prompt][phrase][answer][EOS]
    record = ComparisonRecord(prompt, [answer, answer + " "], [0, 1])
    return hindsight_sequences(record, tokenizer, "p", positive_phrase=phrase, max_len=max_len)[0]


@torch.no_grad()
def preference_accuracy(
    model, tokenizer, path: Path, max_len: int, phrase: Optional[str] = None, batch_size: int = 32
) -> float:
    """Share of comparison pairs whose chosen response gets the higher length-normalised
    log-likelihood (a tie counts as wrong); with `phrase`, after the CoH positive phrase."""
    model.eval()
    records, wins = read_comparisons(path), 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pairs = [(r.responses[r.ranking.index(0)], r.responses[r.ranking.index(1)]) for r in chunk]
        examples = [
            answer_example(tokenizer, record.prompt, pair[side], max_len, phrase)
            for side in (0, 1)
            for record, pair in zip(chunk, pairs)
        ]
        scores = mean_log_likelihoods(model, examples, tokenizer.pad_id)
        wins += int((scores[: len(chunk)] > scores[len(chunk) :]).sum())
    return wins / len(records)


@torch.no_grad()
def sampled_rewards(
    policy,
    reward_model,
    tokenizer,
    prompts: list[str],
    max_new: int,
    seed: int,
    reference=None,
    phrase: Optional[str] = None,
    batch_size: int = 32,
) -> tuple[float, float]:
    """(mean reward, mean KL to `reference`) of one response per prompt, sampled at temperature 1
    with a generator seeded by `seed`. KL = sum over response tokens of log pi - log pi_ref, in
    nats per response (the k1 estimate PPO's penalty uses); nan without a reference. With a CoH
    `phrase`, responses are sampled after prompt + phrase (as `coh_generate` does) and scored,
    like every other policy's, as answers to the bare prompt."""
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    feedback = tokenizer.encode(feedback_text(phrase)) if phrase is not None else []
    scores, kls = [], []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p) for p in prompts[start : start + batch_size]]
        context, context_mask = left_pad_prompts([i + feedback for i in ids], tokenizer.pad_id)
        samples = sample_tokens(
            policy,
            context,
            max_new,
            prompt_mask=context_mask,
            temperature=1.0,
            eos_token=tokenizer.eos_id,
            pad_value=tokenizer.pad_id,
            generator=generator,
        )
        prompt, prompt_mask = left_pad_prompts(ids, tokenizer.pad_id)
        rollout = join_prompt_response(
            prompt, prompt_mask, samples.tokens, samples.mask, tokenizer.pad_id
        )
        scores.append(score_sequences(reward_model, *rollout))
        if reference is not None:
            targets = rollout.tokens[:, 1:]
            logp = log_probs_from_logits(policy(rollout.tokens)[:, :-1], targets)
            ref_logp = log_probs_from_logits(reference.eval()(rollout.tokens)[:, :-1], targets)
            kls.append(masked_sum(logp - ref_logp, rollout.action_mask, dim=-1))
    kl = float(torch.cat(kls).mean()) if kls else math.nan
    return float(torch.cat(scores).mean()), kl


@torch.no_grad()
def sample_answers(
    records: list[SFTRecord], models: dict, coh_model, tokenizer, max_new: int, seed: int
) -> list[dict]:
    """Each prompt answered by every model in `models` (name -> PaLM) and by the CoH model
    after its positive phrase (`coh_generate`), top-k 10, beside the true response."""
    rows = []
    for index, (prompt, truth) in enumerate(records):
        row = {"prompt": prompt, "truth": truth}
        for name, model in models.items():
            generator = torch.Generator().manual_seed(seed + index)
            ids = torch.tensor([tokenizer.encode(prompt)])
            new = sample_tokens(
                model, ids, max_new, eos_token=tokenizer.eos_id, top_k=10, generator=generator
            )
            row[name] = tokenizer.decode(
                [t for t in new.tokens[0].tolist() if t != tokenizer.eos_id]
            )
        generator = torch.Generator().manual_seed(seed + index)
        row["coh"] = coh_generate(
            coh_model, tokenizer, prompt, max_new, top_k=10, generator=generator
        )
        rows.append(row)
    return rows
