"""Over-optimisation against a gold that cannot be gamed (issue 20, part 3; Gao et al. 2022).

    python benchmarks/bench_frontier_addition.py           # 2 seeds, every method (minutes)
    python benchmarks/bench_frontier_addition.py --quick   # toy sizes: a smoke run
    python benchmarks/bench_frontier_addition.py --sft-dir runs/sft-add3   # reuse the SFT model
                                                            # of bench_reasoning.py

`bench_frontier.py`'s gold is a reward model trained on human pairs, and it shares the proxy's
length bias, so optimising the proxy cannot be seen to diverge from it. Here the gold is a
known function of the text: 1 when the response is the exact sum, else 0 (the addition task of
`bench_reasoning.py`, same base and SFT models). The proxy must learn it from samples:

1. SFT    `bench_reasoning.sft_model` (base model that can add, fine-tuned on a careless
          demonstrator; reused from `--sft-dir` when it was made with the same budget).
2. proxy  per seed, pairs of the SFT model's own answers to training problems where gold
          tells them apart (right = chosen), a `RewardModel` trained on them from the SFT
          weights (`train.reward.train_reward_model`); its accuracy on held-out such pairs.
3. best-of-n by proxy, n = 1 ... `bon_max`, on held-out problems: the exact expected gold of the
          proxy's favourite among n SFT samples (KL = log n - (n - 1)/n).
4. RL     every method of `bench_reasoning.METHODS` under its `shared` setting (kl_coef 0, so
          nothing holds the policy near the SFT model) with the standardised proxy as reward,
          measured at `eval_at` episodes.

Measured on the held-out problems (`samples` responses each, temperature 1): gold = share of
exact answers (pass@1 sampled), proxy = mean proxy score standardised on SFT samples, KL to the
SFT model (nats per response, as in `bench_reasoning.py`). Over-optimisation, per method and
seed: gold fell by more than 2 s.e. from its best measurement while the proxy rose past its
value there. Every seed changes the proxy's pairs and the RL sampling; the table gives the
mean over seeds and their range.

Writes benchmarks/results/frontier-addition.json and .png (-quick suffix for --quick).
Run it alone: timings mean something only on otherwise quiet cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from benchmarks import bench_reasoning as reasoning  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf import ByteTokenizer, PaLM, RLHFTrainer  # noqa: E402
from palm_rlhf.rl.rollout import score_sequences  # noqa: E402
from palm_rlhf.train.reward import RewardTrainConfig, train_reward_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EOS = reasoning.EOS


@dataclass(frozen=True)
class Plan:
    proxy_pairs: int  # gold-labelled pairs of SFT answers the proxy trains on
    proxy_valid: int  # and is checked on (other training problems)
    proxy_epochs: float
    eval_prompts: int  # held-out problems every policy is measured on
    samples: int  # responses per held-out problem
    bon_max: int  # best-of-n up to this n
    episodes: int  # RL responses per method
    per_update: int
    eval_at: tuple  # episodes at which each RL policy is measured
    seeds: tuple


FULL = Plan(1000, 200, 2.0, 250, 4, 64, 16384, 256, (1024, 2048, 4096, 8192, 16384), (0, 1))
QUICK = Plan(40, 20, 1.0, 20, 2, 4, 128, 64, (64, 128), (0,))
# --quick: one-digit sums, so the tiny SFT model is right sometimes and gold tells pairs apart
QUICK_SFT = replace(reasoning.QUICK, digits=1, held_out=20, base_steps=150, sft_steps=20)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def sample(palm: PaLM, scope, problems: list[str], count: int, generator):
    """`count` responses per problem at temperature 1: (prompt ids, response ids, texts)."""
    tokenizer = ByteTokenizer()
    prompts = torch.tensor([tokenizer.encode(p) for p in problems]).repeat_interleave(count, 0)
    width = len(reasoning.Addition.answer(problems[0])) + 2  # >= the longest answer plus EOS
    responses = reasoning.answers(palm, scope, prompts, width, 1.0, generator)
    return prompts, responses, reasoning.decode(tokenizer, responses)


def sequences(prompts: torch.Tensor, responses: torch.Tensor):
    """Left-justified (tokens, mask, prompt_mask) of prompts (no padding) and responses up to
    and including their first EOS: what a reward model reads."""
    tokens = torch.cat((prompts, responses), dim=1)
    ended = (responses == EOS).long().cumsum(dim=1)
    keep = (ended == 0) | ((ended == 1) & (responses == EOS))
    mask = torch.cat((torch.ones_like(prompts, dtype=torch.bool), keep), dim=1)
    prompt_mask = torch.zeros_like(mask)
    prompt_mask[:, : prompts.shape[1]] = True
    return tokens, mask, prompt_mask


class Proxy:
    """A reward model standardised on SFT samples; called as the RL reward."""

    def __init__(self, model):
        self.model, self.shift, self.scale = model.eval(), 0.0, 1.0

    def raw(self, tokens, mask, prompt_mask) -> torch.Tensor:
        return score_sequences(self.model, tokens, mask, prompt_mask)

    def calibrate(self, raw: torch.Tensor) -> None:
        self.shift, self.scale = float(raw.mean()), float(raw.std().clamp(min=1e-6))

    def __call__(self, tokens, mask, prompt_mask) -> torch.Tensor:
        return (self.raw(tokens, mask, prompt_mask) - self.shift) / self.scale


def gold(problems: list[str], texts: list[str], count: int) -> torch.Tensor:
    """1.0 for an exact answer, else 0.0, for `count` responses per problem (flat)."""
    repeated = [p for p in problems for _ in range(count)]
    return torch.tensor(reasoning.exact_match(repeated, texts))


@torch.no_grad()
def measure(palm, scope, sft, proxy: Proxy, problems, samples: int, seed: int) -> dict:
    """Gold, standardised proxy and KL to the SFT model on the held-out problems."""
    was_training = palm.training
    palm.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts, responses, texts = sample(palm, scope, problems, samples, generator)
    right = gold(problems, texts, samples)
    kl = reasoning.response_logprob(palm, scope, prompts, responses) - reasoning.response_logprob(
        sft, None, prompts, responses
    )
    palm.train(was_training)
    per_problem = right.view(len(problems), samples).mean(dim=1)
    return {
        "gold": float(right.mean()),
        "gold_se": float(per_problem.std() / math.sqrt(len(problems))),
        "proxy": float(proxy(*sequences(prompts, responses)).mean()),
        "kl": float(kl.mean()),
    }


# ----------------------------------------------------------------------------- stages


def labelled_pairs(sft, task, count: int, seed: int) -> list[dict]:
    """`count` pairs of two SFT answers to a training problem that gold tells apart."""
    generator, pairs, offset = torch.Generator().manual_seed(seed), [], 0
    problems = [task.prompt(a, b) for a, b in task.train_pairs(40 * count, seed=seed)]
    while len(pairs) < count and offset < len(problems):
        chunk = problems[offset : offset + 256]
        offset += len(chunk)
        _, _, texts = sample(sft, None, chunk, 2, generator)
        right = gold(chunk, texts, 2).view(-1, 2)
        for index, problem in enumerate(chunk):
            if right[index, 0] != right[index, 1]:
                first, second = texts[2 * index], texts[2 * index + 1]
                chosen, rejected = (first, second) if right[index, 0] else (second, first)
                pairs.append({"prompt": problem, "chosen": chosen, "rejected": rejected})
    if len(pairs) < count:
        raise SystemExit(f"only {len(pairs)} of {count} pairs told apart by gold")
    return pairs[:count]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def train_proxy(sft, sft_dir: Path, task, plan: Plan, seed: int, work: Path) -> tuple[Proxy, dict]:
    train = labelled_pairs(sft, task, plan.proxy_pairs, 100 + seed)
    valid = labelled_pairs(sft, task, plan.proxy_valid, 200 + seed)
    config = RewardTrainConfig(
        kind="comparisons",
        data=write_jsonl(work / f"proxy-train-{seed}.jsonl", train),
        valid_data=write_jsonl(work / f"proxy-valid-{seed}.jsonl", valid),
        base=str(sft_dir),
        out_dir=str(work / f"proxy-{seed}"),
        max_len=3 * task.digits + 6,
        batch_size=16,
        lr=3e-4,
        warmup_steps=10,
        epochs=plan.proxy_epochs,
        use_lora=False,
        pooling="mean",
        seed=seed,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_reward_model(config)
    return Proxy(result.model), {
        "train_pairs": len(train),
        "valid_pairs": result.metrics["valid_count"],
        "valid_accuracy": result.metrics["valid_accuracy"],
        "steps": result.history[-1]["step"],
    }


@torch.no_grad()
def best_of_n(sft, proxy: Proxy, problems: list[str], big: int, seed: int) -> list[dict]:
    """Calibrate the proxy on `big` SFT samples per problem, then the exact expected gold and
    proxy of the proxy's favourite among n of them, n = 1, 2, 4 ... (`favourite_of_n`)."""
    generator = torch.Generator().manual_seed(seed)
    prompts, responses, texts = sample(sft, None, problems, big, generator)
    raw = proxy.raw(*sequences(prompts, responses))
    proxy.calibrate(raw)
    scores = ((raw - proxy.shift) / proxy.scale).view(len(problems), big)
    right = gold(problems, texts, big).view(len(problems), big)
    order = scores.argsort(dim=1)
    right, scores = right.gather(1, order), scores.gather(1, order)
    points, n = [], 1
    while n <= big:
        expected = favourite_of_n(right, n)
        points.append(
            {
                "n": n,
                "kl": math.log(n) - (n - 1) / n,
                "gold": float(expected.mean()),
                "gold_se": float(expected.std() / math.sqrt(len(problems))),
                "proxy": float(favourite_of_n(scores, n).mean()),
            }
        )
        n *= 2
    return points


def favourite_of_n(ranked: torch.Tensor, n: int) -> torch.Tensor:
    """Expected value of the proxy's favourite among n of the N samples per row, drawn without
    replacement, given `ranked` (rows, N) sorted by proxy score, lowest first: the sample of
    rank i wins with probability C(i, n - 1) / C(N, n)."""
    big = ranked.shape[1]
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(big, n) for i in range(big)])
    return (ranked.double() * weights.double()).sum(dim=1)


def run_rl(name: str, sft, proxy: Proxy, task, plan: Plan, problems, seed: int) -> dict:
    """One method against the proxy from a copy of the SFT model, measured at `eval_at`."""
    palm = PaLM.from_config(sft.config)
    palm.load_state_dict(sft.state_dict())
    keywords = {**reasoning.METHODS[name], **reasoning.SETTINGS["shared"]}
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=proxy,
        prompts=[task.prompt(a, b) for a, b in task.train_pairs(10_000, seed=300 + seed)],
        tokenizer=ByteTokenizer(),
        seed=seed,
        progress=False,
        **keywords,
    )
    points = [{"episodes": 0, **measure(sft, None, sft, proxy, problems, plan.samples, seed)}]
    seconds = 0.0
    for target in plan.eval_at:
        start = time.monotonic()
        trainer.train(
            num_rollouts=target - trainer.episodes,
            rollouts_per_update=plan.per_update,
            max_response_tokens=task.digits + 2,
            eos_token=EOS,
        )
        seconds += time.monotonic() - start
        actor = trainer.actor_module
        point = measure(actor.palm, actor.scope, sft, proxy, problems, plan.samples, seed)
        points.append({"episodes": trainer.episodes, **point})
        print(
            f"  {name} seed {seed}, {trainer.episodes} episodes: gold {point['gold']:.3f} "
            f"proxy {point['proxy']:+.2f} KL {point['kl']:.2f}",
            flush=True,
        )
    return {"points": points, "train_seconds": round(seconds, 1), "keywords": keywords}


# ----------------------------------------------------------------------------- reading


def verdict(points: list[dict]) -> dict:
    """The best gold measurement and whether the proxy rose past it while gold fell."""
    best = max(range(len(points)), key=lambda i: points[i]["gold"])
    peak, last = points[best], points[-1]
    fell = last["gold"] < peak["gold"] - 2 * max(peak["gold_se"], last["gold_se"])
    return {
        "best_gold": peak["gold"],
        "best_kl": peak["kl"],
        "last": {k: last[k] for k in ("gold", "proxy", "kl")},
        "over_optimised": bool(fell and last["proxy"] > peak["proxy"]),
    }


def spread(values: list[float], spec: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ({format(min(values), spec)}..{format(max(values), spec)})"


def table(results: dict) -> str:
    seeds = results["seeds"]
    lines = [
        "| seed | proxy held-out accuracy | SFT gold | best-of-"
        f"{results['plan']['bon_max']}: gold / proxy (KL) |",
        "|---|---|---|---|",
    ]
    for seed, run in seeds.items():
        top = run["best_of_n"][-1]
        lines.append(
            f"| {seed} | {run['proxy']['valid_accuracy']:.3f} | {run['best_of_n'][0]['gold']:.3f} "
            f"| {top['gold']:.3f} / {top['proxy']:+.2f} ({top['kl']:.2f}) |"
        )
    names = [n for n in reasoning.METHODS if all(n in run["methods"] for run in seeds.values())]
    lines += [
        "",
        f"Mean over {len(seeds)} seed(s), range in brackets. Gold = share of exact answers; "
        "proxy standardised on SFT samples; KL in nats per response.",
        "",
        "| method | best gold (at KL) | last gold | last proxy | last KL | proxy up, gold down "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        v = [verdict(run["methods"][name]["points"]) for run in seeds.values()]
        seconds = [run["methods"][name]["train_seconds"] for run in seeds.values()]
        lines.append(
            f"| {name} | {spread([x['best_gold'] for x in v], '.3f')} at "
            f"{spread([x['best_kl'] for x in v], '.2f')} | "
            f"{spread([x['last']['gold'] for x in v], '.3f')} | "
            f"{spread([x['last']['proxy'] for x in v], '+.2f')} | "
            f"{spread([x['last']['kl'] for x in v], '.2f')} | "
            f"{sum(x['over_optimised'] for x in v)} of {len(v)} seeds | "
            f"{spread(seconds, '.0f')} |"
        )
    return "\n".join(lines + ["", reading(results)])


def reading(results: dict) -> str:
    """How many runs over-optimised, and where best-of-n's gold peaked."""
    runs = [m["points"] for run in results["seeds"].values() for m in run["methods"].values()]
    hacked = sum(verdict(points)["over_optimised"] for points in runs)
    parts = [
        f"Over-optimised (gold down by > 2 s.e. from its best while proxy rose): {hacked} "
        f"of {len(runs)} method x seed runs."
    ]
    for seed, run in results["seeds"].items():
        bon = run["best_of_n"]
        top = max(bon, key=lambda p: p["gold"])
        parts.append(
            f"Best-of-n, seed {seed}: gold {bon[0]['gold']:.3f} at n = 1, best {top['gold']:.3f} "
            f"at n = {top['n']}, {bon[-1]['gold']:.3f} at n = {bon[-1]['n']}."
        )
    return " ".join(parts)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {name: f"C{i}" for i, name in enumerate(reasoning.METHODS)}
    for index, run in enumerate(results["seeds"].values()):
        style = ("-", "--", ":")[index % 3]
        curves = [("best-of-n", "black", run["best_of_n"])] + [
            (name, colours[name], m["points"]) for name, m in run["methods"].items()
        ]
        for name, colour, points in curves:
            x = [math.sqrt(max(p["kl"], 0.0)) for p in points]
            label = name if index == 0 else None
            for ax, key in zip(axes, ("gold", "proxy")):
                ax.plot(x, [p[key] for p in points], style, color=colour, marker=".", label=label)
    axes[0].set(title="gold: share of exact answers", xlabel="sqrt KL to SFT", ylabel="gold")
    axes[1].set(title="proxy (standardised on SFT samples)", xlabel="sqrt KL to SFT")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("held-out addition; line style = seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, quick: bool, folder: Path) -> None:
    curves = any(run["methods"] for run in results["seeds"].values())
    stem = "frontier-addition-quick" if quick else "frontier-addition"
    reasoning.write_named(results, folder, stem, plot if curves else None)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run")
    parser.add_argument(
        "--methods",
        default=",".join(reasoning.METHODS),
        help=f"comma-separated: {', '.join(reasoning.METHODS)}",
    )
    parser.add_argument("--seeds", help="comma-separated (default: the plan's)")
    parser.add_argument("--sft-dir", help="as bench_reasoning.py's: keep or reuse the SFT model")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in reasoning.METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(reasoning.METHODS)}")
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = Plan(**{**asdict(plan), "seeds": tuple(int(s) for s in args.seeds.split(","))})
    budget = QUICK_SFT if args.quick else reasoning.FULL
    task = reasoning.Addition(budget.digits, budget.held_out, 0)
    problems = [task.prompt(a, b) for a, b in task.held_out_pairs()[: plan.eval_prompts]]
    results: dict = {
        "task": asdict(task),
        "reasoning_budget": asdict(budget),
        "plan": asdict(plan),
        "provenance": provenance(args.threads),
        "load_start": os.getloadavg(),
        "seeds": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-frontier-addition-") as work:
        work = Path(work)
        sft, _, _ = reasoning.sft_model(task, budget, 0, args.sft_dir, work)
        sft_dir = work / "sft-model"  # run_sft keeps its own stage folders in work
        sft_dir.mkdir()
        sft.save(sft_dir / "model.safetensors")
        ByteTokenizer().save(sft_dir)
        for seed in plan.seeds:
            start = time.monotonic()
            proxy, record = train_proxy(sft, sft_dir, task, plan, seed, work)
            run = {"proxy": record, "methods": {}}
            run["best_of_n"] = best_of_n(sft, proxy, problems, plan.bon_max, 500 + seed)
            run["stage_seconds"] = round(time.monotonic() - start, 1)
            results["seeds"][str(seed)] = run
            top = run["best_of_n"][-1]
            print(
                f"seed {seed}: proxy accuracy {record['valid_accuracy']:.3f}; best-of-"
                f"{top['n']} gold {run['best_of_n'][0]['gold']:.3f} -> {top['gold']:.3f}",
                flush=True,
            )
            for name in methods:
                print(f"=== {name} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
                run["methods"][name] = run_rl(name, sft, proxy, task, plan, problems, seed)
                write(results, args.quick, Path(args.out_dir))
    results["load_end"] = os.getloadavg()
    write(results, args.quick, Path(args.out_dir))
    print("\n" + table(results))
    print(f"\nload {results['load_start']} -> {results['load_end']}")
    return results


if __name__ == "__main__":
    main()
