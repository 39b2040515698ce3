"""Gold score vs KL for every optimiser of a proxy reward model (Gao et al. 2022, issue #12).

    python benchmarks/bench_frontier.py            # ~40 minutes on 2 busy CPU cores
    python benchmarks/bench_frontier.py --quick    # toy sizes, 1-2 minutes: a smoke run

"Scaling Laws for Reward Model Overoptimization" (Gao, Schulman and Hilton 2022) in miniature,
every stage a library call:

1. base    a byte PaLM pretrained (`train.pretrain`) on the HH-RLHF dialogues of the gold
           model's training pairs: the text the policy and both reward models will read
           (the embedded King James Bible knows no modern dialogue).
2. gold    a reward model fine-tuned (all weights) on the first 2,000 real human preference
           pairs of ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz; held-out accuracy on
           the other 312 against "always prefer the shorter answer".
3. SFT     the base fine-tuned on (prompt, chosen response) of the same 2,000 pairs, prompts
           cut to their last `prompt_chars` characters, responses to a few words.
4. proxy   pairs of the SFT policy's own samples, labelled by the gold model (the higher gold
           score is "chosen"), train a smaller-data proxy reward model from the SFT weights;
           accuracy on held-out gold-labelled pairs.
5. methods each optimises the proxy from the same SFT start with the same sample budget:
           best-of-n (n = 1 ... 64, KL = log n - (n - 1)/n), PPO, GRPO, RLOO, REINFORCE++,
           FlowRL and TPO (`RLHFTrainer(algorithm=...)`), and offline DPO and Chain of
           Hindsight on gold-labelled pairs of SFT samples (the proxy's training pairs).

Every few updates a policy is measured on the same held-out prompts (from the 312 held-out
pairs): one response per prompt sampled at temperature 1 with a fixed seed, its gold and proxy
scores, and KL(pi || SFT) = mean over responses of sum_t log pi(y_t|.) - log pi_SFT(y_t|.)
(nats per response; CoH's responses are sampled after its positive phrase, and pi is read in
that context). Scores are standardised by the mean and std of each reward model on SFT samples
of those prompts, so 1.0 = one SFT standard deviation, as in Gao et al.

Writes benchmarks/results/frontier.json (rewritten after every method, so a stopped run keeps
what finished), frontier.md (the table and a reading) and frontier.png (gold score vs sqrt KL;
`--quick` writes the same names with a -quick suffix).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf.checkpoint import find_weights  # noqa: E402
from palm_rlhf.data.collate import left_pad_prompts  # noqa: E402
from palm_rlhf.data.records import read_comparisons  # noqa: E402
from palm_rlhf.functional.logprobs import log_probs_from_logits  # noqa: E402
from palm_rlhf.functional.masked import masked_sum  # noqa: E402
from palm_rlhf.model.reward import RewardModel  # noqa: E402
from palm_rlhf.model.sampling import sample_tokens  # noqa: E402
from palm_rlhf.rl.ppo.trainer import RLHFTrainer  # noqa: E402
from palm_rlhf.rl.rollout import Rollout, join_prompt_response, score_sequences  # noqa: E402
from palm_rlhf.train.coh import CoHConfig, feedback_text, train_coh  # noqa: E402
from palm_rlhf.train.dpo import DPOConfig, train_dpo  # noqa: E402
from palm_rlhf.train.loading import load_base  # noqa: E402
from palm_rlhf.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from palm_rlhf.train.reward import RewardTrainConfig, train_reward_model  # noqa: E402
from palm_rlhf.train.sft import SFTConfig, train_sft  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RESULTS = Path(__file__).resolve().parent / "results"
RL_METHODS = ("ppo", "grpo", "rloo", "reinforce++", "flowrl", "tpo")
NEVER = 10**6


@dataclass(frozen=True)
class Budget:
    model: dict  # PaLM sizes of the pretrained base
    pretrain_minutes: float
    pretrain_steps: int
    gold_train: int  # HH-RLHF pairs (the rest are held out)
    gold_epochs: float
    gold_minutes: float
    sft_steps: int
    prompt_chars: int  # prompts keep their last characters (ending in "Assistant:")
    response_tokens: int  # longest sampled response; SFT responses are cut to fit
    proxy_pairs: int  # gold-labelled pairs of SFT samples the proxy trains on
    proxy_valid: int
    proxy_epochs: float
    eval_prompts: int  # held-out prompts every policy is measured on
    bon_max: int  # best-of-n up to this n
    episodes: int  # sample budget of each online method
    per_update: int  # episodes per update
    eval_updates: tuple  # measure after these updates (log-spaced: KL moves fastest early)
    offline_steps: int  # DPO and CoH steps (batch 16 pairs)
    offline_eval_every: int


FULL = Budget(
    model=dict(dim=128, depth=3, heads=4, dim_head=32, seq_len=256),
    pretrain_minutes=4.0,
    pretrain_steps=600,
    gold_train=2000,
    gold_epochs=3.0,
    gold_minutes=6.0,
    sft_steps=150,
    prompt_chars=128,
    response_tokens=48,
    proxy_pairs=1000,
    proxy_valid=200,
    proxy_epochs=3.0,
    eval_prompts=128,
    bon_max=64,
    episodes=1024,
    per_update=32,
    eval_updates=(1, 2, 4, 8, 16, 32),
    offline_steps=48,
    offline_eval_every=16,
)
QUICK = Budget(
    model=dict(dim=32, depth=1, heads=2, dim_head=16, seq_len=192),
    pretrain_minutes=0.2,
    pretrain_steps=20,
    gold_train=64,
    gold_epochs=1.0,
    gold_minutes=0.5,
    sft_steps=4,
    prompt_chars=96,
    response_tokens=12,
    proxy_pairs=32,
    proxy_valid=16,
    proxy_epochs=1.0,
    eval_prompts=8,
    bon_max=8,
    episodes=32,
    per_update=16,
    eval_updates=(1, 2),
    offline_steps=4,
    offline_eval_every=2,
)


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def short_response(text: str, tokenizer, max_tokens: int) -> str:
    """The response's first words that fit `max_tokens - 1` tokens (room for EOS)."""
    words, kept = text.split(" "), ""
    for word in words:
        longer = f"{kept} {word}" if kept else word
        if len(tokenizer.encode(longer)) > max_tokens - 1:
            break
        kept = longer
    return kept or text[: max_tokens // 4]


def load_hh(budget: Budget, tokenizer) -> dict:
    """The HH-RLHF pairs split for the gold model, plus SFT records and policy prompts."""
    records = read_comparisons(DATA)
    train, held_out = records[: budget.gold_train], records[budget.gold_train :]
    if len(held_out) > 312:
        held_out = held_out[:312]

    def prompt(record) -> str:
        return record.prompt[-budget.prompt_chars :]

    def chosen(record) -> str:
        return record.responses[record.ranking.index(0)]

    sft = [
        {
            "prompt": prompt(r),
            "response": short_response(chosen(r), tokenizer, budget.response_tokens),
        }
        for r in train
    ]
    sft = [row for row in sft if row["response"].strip()]
    train_prompts = list(dict.fromkeys(prompt(r) for r in train))
    eval_prompts = list(dict.fromkeys(prompt(r) for r in held_out))[: budget.eval_prompts]
    return dict(train=train, held_out=held_out, sft=sft, prompts=train_prompts, eval=eval_prompts)


def shorter_answer_accuracy(records, tokenizer) -> float:
    """Accuracy of "the shorter response is better"; ties count 1/2 (as bench_reward_hh)."""
    wins = 0.0
    for record in records:
        chosen, rejected = (len(tokenizer.encode(r)) for r in record.responses)
        wins += 1.0 if chosen < rejected else 0.5 if chosen == rejected else 0.0
    return wins / len(records)


# ----------------------------------------------------------------------------- sampling, scores


@torch.no_grad()
def sample_responses(
    palm, scope, prompt_ids: list[list[int]], max_new: int, tokenizer, generator, feedback=()
) -> tuple[Rollout, Rollout]:
    """One response per prompt at temperature 1: (the rollout as the policy saw it, with any
    feedback tokens after the prompt; the same response after the bare prompt, for scoring)."""
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    context, context_mask = left_pad_prompts([ids + list(feedback) for ids in prompt_ids], pad)
    samples = sample_tokens(
        palm,
        context,
        max_new,
        prompt_mask=context_mask,
        temperature=1.0,
        eos_token=eos,
        pad_value=pad,
        generator=generator,
        finetune_scope=scope,
    )
    seen = join_prompt_response(context, context_mask, samples.tokens, samples.mask, pad)
    prompt, prompt_mask = left_pad_prompts(prompt_ids, pad)
    scored = join_prompt_response(prompt, prompt_mask, samples.tokens, samples.mask, pad)
    return seen, scored


@torch.no_grad()
def response_logprob(palm, scope, rollout: Rollout) -> torch.Tensor:
    """sum over response tokens (and EOS) of log p(y_t | .), (b,)."""
    logits = palm(rollout.tokens, finetune_scope=scope)[:, :-1]
    token_logprobs = log_probs_from_logits(logits, rollout.tokens[:, 1:])
    return masked_sum(token_logprobs, rollout.action_mask, dim=-1)


class Judges:
    """The gold and proxy reward models, each standardised on SFT samples (set by `calibrate`)."""

    def __init__(self, gold, proxy=None):
        self.models = {"gold": gold.eval(), "proxy": proxy.eval() if proxy else None}
        self.shift = {"gold": 0.0, "proxy": 0.0}
        self.scale = {"gold": 1.0, "proxy": 1.0}

    def raw(self, name: str, rollout: Rollout) -> torch.Tensor:
        return score_sequences(self.models[name], *rollout)

    def score(self, name: str, rollout: Rollout) -> torch.Tensor:
        return (self.raw(name, rollout) - self.shift[name]) / self.scale[name]

    def calibrate(self, name: str, raw_scores: torch.Tensor) -> None:
        self.shift[name] = float(raw_scores.mean())
        self.scale[name] = float(raw_scores.std().clamp(min=1e-6))

    def proxy_reward(self, seq, mask, prompt_mask) -> torch.Tensor:
        """The RL reward: the standardised proxy score, (b,)."""
        return self.score("proxy", Rollout(seq, mask, prompt_mask))


@torch.no_grad()
def measure(
    palm, scope, reference, judges: Judges, run: dict, feedback=(), batch: int = 64
) -> dict:
    """Gold, proxy (standardised) and KL to the SFT policy on the fixed held-out prompts."""
    tokenizer, prompt_ids = run["tokenizer"], run["eval_ids"]
    generator = torch.Generator().manual_seed(run["seed"] + 7)
    gold, proxy, kl, lengths = [], [], [], []
    palm.eval()
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start : start + batch]
        seen, scored = sample_responses(
            palm, scope, chunk, run["budget"].response_tokens, tokenizer, generator, feedback
        )
        gold.append(judges.score("gold", scored))
        proxy.append(judges.score("proxy", scored))
        kl.append(response_logprob(palm, scope, seen) - response_logprob(reference, None, scored))
        lengths.append(scored.action_mask.sum(-1).float())
    gold, proxy, kl = torch.cat(gold), torch.cat(proxy), torch.cat(kl)
    return {
        "kl": float(kl.mean()),
        "gold": float(gold.mean()),
        "gold_se": float(gold.std() / math.sqrt(len(gold))),
        "proxy": float(proxy.mean()),
        "length": float(torch.cat(lengths).mean()),
    }


# ----------------------------------------------------------------------------- stages


def stage_pretrain(run: dict, work: Path) -> dict:
    """A byte PaLM pretrained on the gold training pairs' dialogues (never the held-out ones)."""
    budget = run["budget"]
    text = "\n\n".join(r.prompt + " " + resp for r in run["hh"]["train"] for resp in r.responses)
    data_dir = work / "hh-text"
    data_dir.mkdir()
    with gzip.open(data_dir / "corpus.txt.gz", "wt", encoding="utf-8") as file:
        file.write(text)
    sizes = dict(budget.model)
    config = PretrainConfig(
        data_dir=str(data_dir),
        out_dir=str(work / "pretrain"),
        num_steps=budget.pretrain_steps,
        max_minutes=budget.pretrain_minutes,
        warmup_steps=min(50, budget.pretrain_steps // 5),
        eval_every=NEVER,
        generate_every=0,
        save_every=NEVER,
        keep_last=1,
        val_batches=4,
        seed=run["seed"],
        **sizes,
    )
    result = pretrain(config)
    return {
        "checkpoint": str(result.checkpoint),
        "steps": result.history[-1]["step"],
        "valid_bpc": result.valid_bpc,
        "corpus_bytes": len(text.encode()),
        "model": sizes,
    }


def reward_config(run: dict, work: Path, name: str, **options) -> RewardTrainConfig:
    return RewardTrainConfig(
        kind="comparisons",
        out_dir=str(work / name),
        long_responses="truncate",
        batch_size=16,
        lr=3e-4,
        warmup_steps=10,
        use_lora=False,  # full fine-tune: the README's best HH-RLHF recipe
        pooling="mean",
        seed=run["seed"],
        log_every=10,
        progress=False,
        **options,
    )


def stage_gold(run: dict, work: Path, base: str) -> tuple[object, dict]:
    budget, tokenizer = run["budget"], run["tokenizer"]
    held_out = run["hh"]["held_out"]
    config = reward_config(
        run,
        work,
        "gold",
        data=str(DATA),
        num_train=budget.gold_train,
        num_valid=len(held_out),
        base=base,
        max_len=budget.model["seq_len"],
        epochs=budget.gold_epochs,
        max_minutes=budget.gold_minutes,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings
        result = train_reward_model(config)
    return result.model, {
        "accuracy": result.metrics["valid_accuracy"],
        "held_out_pairs": result.metrics["valid_count"],
        "shorter_answer_baseline": shorter_answer_accuracy(held_out, tokenizer),
        "train_pairs": result.num_train,
        "steps": result.history[-1]["step"],
        "epochs": budget.gold_epochs,
    }


def stage_sft(run: dict, work: Path, base: str) -> tuple[str, dict]:
    rows = run["hh"]["sft"]
    result = train_sft(
        SFTConfig(
            base=base,
            data=str(write_jsonl(work / "sft.jsonl", rows)),
            out_dir=str(work / "sft"),
            max_steps=run["budget"].sft_steps,
            max_len=run["budget"].model["seq_len"],
            batch_size=16,
            lr=3e-4,
            epochs=NEVER,
            eval_every=NEVER,
            save_every=NEVER,
            keep_last=1,
            seed=run["seed"],
        )
    )
    return str(result.checkpoint), {
        "records": len(rows),
        "steps": run["budget"].sft_steps,
        "train_loss": result.train["loss"],
    }


@torch.no_grad()
def gold_labelled_pairs(sft, judges: Judges, run: dict, count: int, offset: int) -> list[dict]:
    """`count` pairs of SFT samples for training prompts, chosen = the higher gold score."""
    tokenizer, budget = run["tokenizer"], run["budget"]
    prompts = run["hh"]["prompts"][offset : offset + count]
    generator = torch.Generator().manual_seed(run["seed"] + offset)
    pairs = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        ids = [tokenizer.encode(p) for p in chunk for _ in range(2)]
        _, scored = sample_responses(sft, None, ids, budget.response_tokens, tokenizer, generator)
        gold = judges.raw("gold", scored).view(-1, 2)
        responses = [
            tokenizer.decode(row[mask].tolist()).replace("\x00", "")
            for row, mask in zip(scored.tokens[:, 1:], scored.action_mask)
        ]
        for index, prompt in enumerate(chunk):
            first, second = responses[2 * index], responses[2 * index + 1]
            if first == second or gold[index, 0] == gold[index, 1]:
                continue
            if gold[index, 0] < gold[index, 1]:
                first, second = second, first
            pairs.append({"prompt": prompt, "chosen": first, "rejected": second})
    return pairs


def stage_proxy(run: dict, work: Path, sft_dir: str, sft, judges: Judges) -> tuple[object, dict]:
    budget = run["budget"]
    train = gold_labelled_pairs(sft, judges, run, budget.proxy_pairs, 0)
    valid = gold_labelled_pairs(sft, judges, run, budget.proxy_valid, budget.proxy_pairs)
    run["pairs_file"] = write_jsonl(work / "proxy-train.jsonl", train)
    config = reward_config(
        run,
        work,
        "proxy",
        data=str(run["pairs_file"]),
        valid_data=str(write_jsonl(work / "proxy-valid.jsonl", valid)),
        base=sft_dir,
        max_len=budget.model["seq_len"],
        epochs=budget.proxy_epochs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_reward_model(config)
    return result.model, {
        "accuracy": result.metrics["valid_accuracy"],
        "held_out_pairs": result.metrics["valid_count"],
        "train_pairs": len(train),
        "steps": result.history[-1]["step"],
        "epochs": budget.proxy_epochs,
    }


@torch.no_grad()
def calibrate_and_best_of_n(sft, judges: Judges, run: dict) -> dict:
    """`bon_max` SFT samples per held-out prompt: standardise both judges on them, then the
    exact expected gold/proxy score of the proxy's favourite among n of them, n = 1, 2, 4...
    (without replacement: the sample of proxy rank i (1 = lowest) of N wins a random n-subset
    with probability C(i-1, n-1) / C(N, n))."""
    tokenizer, budget = run["tokenizer"], run["budget"]
    big = budget.bon_max
    generator = torch.Generator().manual_seed(run["seed"] + 11)
    gold, proxy = [], []
    for ids in run["eval_ids"]:
        _, scored = sample_responses(
            sft, None, [ids] * big, budget.response_tokens, tokenizer, generator
        )
        gold.append(judges.raw("gold", scored)), proxy.append(judges.raw("proxy", scored))
    gold, proxy = torch.stack(gold), torch.stack(proxy)  # (prompts, N)
    judges.calibrate("gold", gold.flatten())
    judges.calibrate("proxy", proxy.flatten())
    gold = (gold - judges.shift["gold"]) / judges.scale["gold"]
    proxy = (proxy - judges.shift["proxy"]) / judges.scale["proxy"]
    order = proxy.argsort(dim=1)
    gold_sorted, proxy_sorted = gold.gather(1, order), proxy.gather(1, order)
    points, n = [], 1
    while n <= big:
        weights = torch.tensor(
            [math.comb(i, n - 1) / math.comb(big, n) for i in range(big)], dtype=torch.float64
        )
        gold_n = (gold_sorted.double() * weights).sum(1)
        proxy_n = (proxy_sorted.double() * weights).sum(1)
        points.append(
            {
                "n": n,
                "episodes": n * len(run["eval_ids"]),
                "kl": math.log(n) - (n - 1) / n,
                "gold": float(gold_n.mean()),
                "gold_se": float(gold_n.std() / math.sqrt(len(gold_n))),
                "proxy": float(proxy_n.mean()),
            }
        )
        n *= 2
    return {"points": points}


def fresh_sft(run: dict):
    model, _ = load_base(run["sft_dir"], log=lambda *_: None)
    return model.eval()


def run_online(algorithm: str, judges: Judges, run: dict) -> dict:
    """RLHFTrainer on the standardised proxy, measured every `eval_every` updates."""
    budget = run["budget"]
    policy = fresh_sft(run)  # its LoRA actor scope trains; the bare weights are the reference
    group = 1 if algorithm == "ppo" else 4
    trainer = RLHFTrainer(
        palm=policy,
        reward_model=judges.proxy_reward,
        prompts=run["hh"]["prompts"],
        tokenizer=run["tokenizer"],
        algorithm=algorithm,
        group_size=group,
        actor_lr=1e-3,
        critic_lr=1e-3,
        kl_coef=run["kl_coef"],
        minibatch_size=16,
        rollout_batch_size=budget.per_update,
        seed=run["seed"],
        progress=False,
        cpu=True,
    )
    sft_point = run["sft_point"]
    points, seconds = [{"episodes": 0, **sft_point}], 0.0
    for target in [u for u in budget.eval_updates if u * budget.per_update <= budget.episodes]:
        start = time.monotonic()
        trainer.train(
            num_rollouts=(target - trainer.updates) * budget.per_update,
            rollouts_per_update=budget.per_update,
            max_response_tokens=budget.response_tokens,
            eos_token=run["tokenizer"].eos_id,
        )
        seconds += time.monotonic() - start
        actor = trainer.actor_module
        point = measure(actor.palm, actor.scope, policy, judges, run)
        points.append({"episodes": trainer.episodes, "updates": trainer.updates, **point})
        print(f"  {algorithm} {trainer.episodes} episodes: {fmt_point(point)}", flush=True)
        run["save_partial"](algorithm, {"points": points, "train_seconds": round(seconds, 1)})
    last = trainer.history[-1]
    return {
        "points": points,
        "train_seconds": round(seconds, 1),
        "episodes": trainer.episodes,
        "rollout_kl_last": last.get("kl"),
        "rollout_reward_last": last.get("reward"),
        "settings": dict(
            group_size=group, actor_lr=1e-3, kl_coef=run["kl_coef"], lora_r=8, minibatch=16
        ),
    }


def run_offline(kind: str, judges: Judges, run: dict, work: Path) -> dict:
    """DPO or CoH ("pn") on the gold-labelled pairs, a checkpoint every few steps, each measured."""
    budget = run["budget"]
    common = dict(
        base=run["sft_dir"],
        data=str(run["pairs_file"]),
        out_dir=str(work / kind),
        max_steps=budget.offline_steps,
        max_len=budget.model["seq_len"],
        batch_size=16,
        epochs=NEVER,
        eval_every=NEVER,
        save_every=budget.offline_eval_every,
        keep_last=NEVER,
        seed=run["seed"],
    )
    start = time.monotonic()
    if kind == "dpo":
        train_dpo(DPOConfig(lr=5e-5, beta=0.1, **common))
        feedback, settings = (), dict(lr=5e-5, beta=0.1)
    else:
        config = CoHConfig(lr=1e-4, mode="pn", **common)
        train_coh(config)
        feedback = run["tokenizer"].encode(feedback_text(config.positive_phrase))
        settings = dict(lr=1e-4, mode="pn", phrase=config.positive_phrase)
    seconds = time.monotonic() - start
    pairs = sum(1 for _ in open(run["pairs_file"]))
    reference = fresh_sft(run)
    points = [] if kind == "coh" else [{"episodes": 0, **run["sft_point"]}]
    if kind == "coh":  # the SFT model after the phrase: CoH's own starting point
        points.append({"episodes": 0, **measure(reference, None, reference, judges, run, feedback)})
    for folder in sorted((work / kind).glob("step-*")):
        step = int(folder.name.split("-")[1])
        model, _ = load_base(folder, log=lambda *_: None)
        point = measure(model.eval(), None, reference, judges, run, feedback)
        # samples used: both responses of each distinct pair seen so far
        points.append({"episodes": min(step * 16, pairs) * 2, "steps": step, **point})
        print(f"  {kind} step {step}: {fmt_point(point)}", flush=True)
    return {
        "points": points,
        "train_seconds": round(seconds, 1),
        "episodes": min(budget.offline_steps * 16, pairs) * 2,
        "pairs": pairs,
        "settings": settings,
    }


# ----------------------------------------------------------------------------- report


def fmt_point(point: dict) -> str:
    return f"KL {point['kl']:.2f}, gold {point['gold']:+.3f}, proxy {point['proxy']:+.3f}"


def bon_gold_at(bon: list[dict], kl: float) -> float:
    """Best-of-n's gold score at this KL, linear in sqrt KL between its points."""
    xs = [math.sqrt(max(p["kl"], 0.0)) for p in bon]
    ys = [p["gold"] for p in bon]
    x = math.sqrt(max(kl, 0.0))
    if x >= xs[-1]:
        return ys[-1]  # beyond best-of-n's largest n: its last value, no extrapolation
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1]


def summarise(results: dict) -> list[dict]:
    """One row per method: gold minus best-of-n at matched KL (its measured points within
    best-of-n's KL range, best one), its best-gold point and its last point."""
    bon = results["methods"]["best-of-n"]["points"]
    bon_kl_max = bon[-1]["kl"]
    rows = []
    for name, method in results["methods"].items():
        points = [p for p in method["points"] if p.get("episodes", 0) > 0 or name == "best-of-n"]
        if not points:
            continue
        last, best = points[-1], max(points, key=lambda p: p["gold"])
        matched = [
            (p["gold"] - bon_gold_at(bon, p["kl"]), p) for p in points if 0 < p["kl"] <= bon_kl_max
        ]
        margin, at = max(matched, key=lambda m: m[0]) if matched else (None, None)
        overopt = [
            (a, b)
            for a, b in zip(method["points"], method["points"][1:])
            if b["proxy"] > a["proxy"] and b["gold"] < a["gold"] - 2 * b.get("gold_se", 0)
        ]
        rows.append(
            {
                "method": name,
                "episodes": method.get("episodes") or last.get("episodes"),
                "vs_bon": None if name == "best-of-n" else margin,
                "vs_bon_kl": None if at is None else at["kl"],
                "vs_bon_se": None if at is None else at.get("gold_se"),
                "kl_best": best["kl"],
                "gold_best": best["gold"],
                "gold_se": best.get("gold_se"),
                "kl_last": last["kl"],
                "gold_last": last["gold"],
                "proxy_last": last["proxy"],
                "length_last": last.get("length"),
                "overoptimised_steps": len(overopt),
                "seconds": method.get("train_seconds"),
                "partial": bool(method.get("partial")),
            }
        )
    return rows


def number(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def table(results: dict) -> str:
    lines = [
        "| method | episodes | gold − BoN at matched KL (KL) | best gold (KL) "
        "| last: KL / gold / proxy / length | proxy↑ gold↓ | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summarise(results):
        versus = "—"
        if r["vs_bon"] is not None:
            versus = f"{r['vs_bon']:+.2f} ({r['vs_bon_kl']:.2f})"
        elif r["method"] != "best-of-n":
            versus = "no point within BoN's KL"
        se = "" if r["gold_se"] is None else f" ± {r['gold_se']:.2f}"
        lines.append(
            f"| {r['method']}{' (stopped early)' if r['partial'] else ''} | {r['episodes']} "
            f"| {versus} | {r['gold_best']:+.2f}{se} ({r['kl_best']:.2f}) "
            f"| {r['kl_last']:.2f} / {r['gold_last']:+.2f} / {r['proxy_last']:+.2f} / "
            f"{number(r['length_last'], '.1f')} | {r['overoptimised_steps']} "
            f"| {number(r['seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def stages_table(results: dict) -> str:
    s = results["stages"]
    rows = []
    if "pretrain" in s:
        p = s["pretrain"]
        rows.append(
            f"| base | pretrained on HH-RLHF dialogue text ({p['corpus_bytes']:,} bytes), "
            f"{p['model']}, {p['steps']} steps | valid {p['valid_bpc']:.3f} bpc |"
        )
    if "gold" in s:
        g = s["gold"]
        rows.append(
            f"| gold RM | {g['train_pairs']} human pairs, full fine-tune, {g['steps']} steps; "
            f"{g['held_out_pairs']} held-out human pairs | **{g['accuracy']:.1%}** (shorter "
            f"answer: {g['shorter_answer_baseline']:.1%}) |"
        )
    if "sft" in s:
        rows.append(
            f"| SFT | {s['sft']['records']} (prompt, chosen) pairs, {s['sft']['steps']} steps | "
            f"train loss {s['sft']['train_loss']:.3f} |"
        )
    if "proxy" in s:
        q = s["proxy"]
        rows.append(
            f"| proxy RM | {q['train_pairs']} gold-labelled SFT-sample pairs, from SFT, "
            f"{q['steps']} steps; {q['held_out_pairs']} held-out gold-labelled pairs | "
            f"**{q['accuracy']:.1%}** (chance 50%) |"
        )
    head = "| stage | data / budget | held-out accuracy |\n| --- | --- | --- |\n"
    return head + "\n".join(rows)


def reading(results: dict) -> str:
    """Facts read off the numbers (the hand-written interpretation lives in the README)."""
    rows = [r for r in summarise(results) if r["method"] != "best-of-n"]
    matched = [r for r in rows if r["vs_bon"] is not None]
    if not matched:
        return ""
    winner = max(matched, key=lambda r: r["vs_bon"])
    beat = [r["method"] for r in matched if r["vs_bon"] > 2 * (r["vs_bon_se"] or 0)]
    over = [r["method"] for r in rows if r["overoptimised_steps"]]
    bon = results["methods"]["best-of-n"]["points"]
    lines = [
        f"- Best-of-n: gold {bon[0]['gold']:+.2f} → {bon[-1]['gold']:+.2f} and proxy "
        f"{bon[0]['proxy']:+.2f} → {bon[-1]['proxy']:+.2f} from n = 1 to {bon[-1]['n']} "
        f"(KL {bon[-1]['kl']:.2f} nats).",
        f"- Closest to best-of-n at matched KL: **{winner['method']}** "
        f"({winner['vs_bon']:+.2f} at KL {winner['vs_bon_kl']:.2f}).",
        f"- Above best-of-n by more than 2 s.e. at some matched KL: {', '.join(beat) or 'none'}.",
        f"- Proxy up while gold fell by more than 2 s.e. between measurements: "
        f"{', '.join(over) or 'no method'}.",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, method in results["methods"].items():
        points = sorted(method["points"], key=lambda p: p.get("episodes", 0))
        xs = [math.sqrt(max(p["kl"], 0.0)) for p in points]
        style = dict(color="black", lw=2.5, marker="s") if name == "best-of-n" else dict(marker="o")
        left.plot(xs, [p["gold"] for p in points], label=name, **style)
        right.plot(xs, [p["proxy"] for p in points], label=name, **style)
    for axis, what in ((left, "gold"), (right, "proxy")):
        axis.set_xlabel("√KL(π ‖ SFT), √nats per response")
        axis.set_ylabel(f"{what} score (SFT std units, SFT mean = 0)")
        axis.axhline(0.0, color="grey", lw=0.5)
        axis.grid(alpha=0.3)
    left.set_title("gold reward vs √KL (best-of-n: black)")
    right.set_title("proxy reward (what was optimised)")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_results(results: dict, quick: bool, json_too: bool = True) -> None:
    suffix = "-quick" if quick else ""
    RESULTS.mkdir(exist_ok=True)
    if json_too:
        results["load_now"] = os.getloadavg()
        (RESULTS / f"frontier{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    if "best-of-n" not in results.get("methods", {}):
        return
    png = plot(results, RESULTS / f"frontier{suffix}.png")
    command = "python benchmarks/bench_frontier.py" + (" --quick" if quick else "")
    text = [
        "# Reward-model over-optimisation frontier (Gao et al. 2022), palm-rlhf",
        "",
        f"`{command}` — {results['machine']}; load average at start "
        f"{results['load_start'][0]:.1f}, now {results['load_now'][0]:.1f}.",
        "",
        stages_table(results),
        "",
        "Scores: mean over the same held-out prompts (one sample each, temperature 1, fixed "
        "seed), standardised by each reward model's mean and std on SFT samples. KL: mean of "
        "sum_t log π − log π_SFT per sampled response (nats); best-of-n: log n − (n−1)/n. "
        "'gold − BoN at matched KL': over the method's measurements within best-of-n's KL "
        "range, the largest gold minus best-of-n's gold at the same KL (linear in √KL). "
        "'proxy↑ gold↓': measurements where proxy rose and gold fell by more than 2 s.e. "
        "Length: mean response tokens (EOS included). The SFT policy itself measures gold "
        f"{results['sft_point']['gold']:+.2f} ± {results['sft_point']['gold_se']:.2f}, length "
        f"{results['sft_point']['length']:.1f}.",
        "",
        table(results),
        "",
        reading(results),
        "",
        f"![gold vs sqrt KL]({png.name})" if png else "",
    ]
    (RESULTS / f"frontier{suffix}.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def run_stages(run: dict, results: dict, work: Path, timed) -> Judges:
    """base -> gold -> SFT -> proxy -> best-of-n (which also standardises both judges)."""
    results["stages"]["pretrain"] = timed("pretrain", stage_pretrain, run, work)
    base = results["stages"]["pretrain"]["checkpoint"]
    gold, results["stages"]["gold"] = timed("gold", stage_gold, run, work, base)
    run["sft_dir"], results["stages"]["sft"] = timed("sft", stage_sft, run, work, base)
    sft = fresh_sft(run)
    judges = Judges(frozen(gold))
    proxy, results["stages"]["proxy"] = timed(
        "proxy", stage_proxy, run, work, run["sft_dir"], sft, judges
    )
    judges.models["proxy"] = frozen(proxy)
    gold_accuracy, proxy_accuracy = (results["stages"][k]["accuracy"] for k in ("gold", "proxy"))
    print(f"gold accuracy {gold_accuracy:.3f}, proxy accuracy {proxy_accuracy:.3f}", flush=True)
    bon = timed("best-of-n", calibrate_and_best_of_n, sft, judges, run)
    bon["train_seconds"] = results["seconds"]["best-of-n"]
    bon["episodes"] = bon["points"][-1]["episodes"]
    results["methods"]["best-of-n"] = bon
    results["calibration"] = {"shift": judges.shift, "scale": judges.scale}
    run["sft_point"] = timed("sft-measure", measure, sft, None, sft, judges, run)
    results["sft_point"] = run["sft_point"]
    return judges


def reuse_stages(run: dict, results: dict, work: Path, earlier_path: Path) -> Judges:
    """The stages of an earlier run kept in `work` (--work-dir): its gold, SFT and proxy
    checkpoints, and from its JSON the stage numbers, standardisation and finished methods."""
    earlier = json.loads(earlier_path.read_text())
    for key in ("stages", "seconds", "calibration", "sft_point"):
        results[key] = earlier[key]
    # methods the earlier run finished are kept unless run again (--methods)
    results["methods"].update(earlier["methods"])
    results["reused"] = {"from": str(earlier_path), "load_start": earlier["load_start"]}
    run["sft_dir"], run["sft_point"] = str(work / "sft"), earlier["sft_point"]
    run["pairs_file"] = work / "proxy-train.jsonl"
    gold = RewardModel.from_pretrained(find_weights(work / "gold"))
    judges = Judges(frozen(gold), frozen(RewardModel.from_pretrained(find_weights(work / "proxy"))))
    judges.shift, judges.scale = (
        dict(earlier["calibration"]["shift"]),
        dict(earlier["calibration"]["scale"]),
    )
    return judges


def frozen(model):
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: a 1-2 minute smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--kl-coef", type=float, default=0.02, help="KL coefficient, online RL")
    parser.add_argument("--report", action="store_true", help="only re-render md/png from json")
    parser.add_argument("--episodes", type=int, help="online sample budget (default: 1024)")
    parser.add_argument("--offline-steps", type=int, help="DPO and CoH steps (default: 48)")
    parser.add_argument(
        "--work-dir", help="keep the stage checkpoints here (default: a temporary folder)"
    )
    parser.add_argument(
        "--reuse",
        help="an earlier run's frontier.json: take its stages (checkpoints in --work-dir), "
        "best-of-n and standardisation, and run only the methods",
    )
    parser.add_argument(
        "--methods",
        default=",".join(("best-of-n", *RL_METHODS, "dpo", "coh")),
        help="comma-separated subset to run (best-of-n always runs)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:  # re-render frontier.md and frontier.png from frontier.json
        results = json.loads(
            (RESULTS / f"frontier{'-quick' if args.quick else ''}.json").read_text()
        )
        write_results(results, args.quick, json_too=False)
        return results
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = QUICK if args.quick else FULL
    if args.episodes is not None:  # a smaller online budget: the first measurements only
        budget = replace(budget, episodes=args.episodes)
    if args.offline_steps is not None:
        budget = replace(budget, offline_steps=args.offline_steps)
        budget = replace(budget, offline_eval_every=max(1, args.offline_steps // 3))
    started = time.monotonic()
    results: dict = {
        "provenance": provenance(args.threads),
        "budget": asdict(budget),
        "seed": args.seed,
        "kl_coef": args.kl_coef,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads",
        "load_start": os.getloadavg(),
        "stages": {},
        "methods": {},
        "seconds": {},
    }
    scratch = tempfile.TemporaryDirectory(prefix="bench-frontier-")
    work = Path(args.work_dir) if args.work_dir else Path(scratch.name)

    def timed(name: str, fn, *fn_args):
        start = time.monotonic()
        print(f"\n=== {name} === (load {os.getloadavg()[0]:.1f})", flush=True)
        out = fn(*fn_args)
        results["seconds"][name] = round(time.monotonic() - start, 1)
        return out

    from palm_rlhf.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    run = {"budget": budget, "seed": args.seed, "tokenizer": tokenizer, "kl_coef": args.kl_coef}
    run["hh"] = load_hh(budget, tokenizer)
    run["eval_ids"] = [tokenizer.encode(p) for p in run["hh"]["eval"]]

    def save_partial(name: str, method: dict) -> None:
        results["methods"][name] = {**method, "partial": True}
        write_results(results, args.quick)

    run["save_partial"] = save_partial
    if args.reuse:
        judges = reuse_stages(run, results, work, Path(args.reuse))
    else:
        judges = run_stages(run, results, work, timed)
    write_results(results, args.quick)

    wanted = [m for m in args.methods.split(",") if m and m != "best-of-n"]
    for name in wanted:
        if name in RL_METHODS:
            results["methods"][name] = timed(name, run_online, name, judges, run)
        elif name in ("dpo", "coh"):
            results["methods"][name] = timed(name, run_offline, name, judges, run, work)
        else:
            raise SystemExit(f"unknown method {name!r}")
        results["total_minutes"] = round((time.monotonic() - started) / 60, 1)
        write_results(results, args.quick)

    results["total_minutes"] = round((time.monotonic() - started) / 60, 1)
    results["load_end"] = os.getloadavg()
    write_results(results, args.quick)
    print("\n" + stages_table(results) + "\n\n" + table(results) + "\n\n" + reading(results))
    print(
        f"\ntotal {results['total_minutes']} min; load {results['load_start']} -> "
        f"{results['load_end']}"
    )
    scratch.cleanup()
    return results


if __name__ == "__main__":
    main()
