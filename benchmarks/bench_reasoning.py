"""Does RL here make a model better at a task with an exact answer? (issue 20, part 1)

    python benchmarks/bench_reasoning.py                    # SFT, then every method (see --help)
    python benchmarks/bench_reasoning.py --quick            # tiny sizes, < 1 minute: a smoke run
    python benchmarks/bench_reasoning.py --methods grpo --episodes 1024   # one method, short
    python benchmarks/bench_reasoning.py --sft-dir runs/sft-add3 --methods ppo,tpo   # SFT once,
                                                             # methods in separate commands
    python benchmarks/bench_reasoning.py --set actor_lora=false   # a keyword for every method

The task is multi-digit addition, generated in code: the prompt "347+082=" (operands zero-
padded to `digits`, so every prompt has the same length and no row needs left padding), the
answer "429" then EOS, byte-tokenised (`ByteTokenizer`: ids are UTF-8 bytes, EOS = pad = 0).
`held_out` problems are drawn first; training problems are drawn from the rest of the pairs,
so no held-out pair is ever trained on (tests/test_bench_reasoning.py checks it).

Pipeline, every stage a public library call:
1. SFT   a random-init `PaLM` fine-tuned (`train.sft.train_sft`, all weights) on training
         problems for `sft_steps` steps: sized so the held-out pass@1 lands roughly in 10-40%,
         a model that is right sometimes.
2. RL    from that SFT model, `RLHFTrainer(algorithm=...)` for each method with the exact-match
         reward `exact_match(prompts, responses)` through `text_reward_fn` (1 when the response
         is the sum, else 0), on training prompts, every method the same episode budget and
         otherwise the library's documented defaults (`--set KEY=VALUE` changes one for every method
         and is recorded). Dr. GRPO = grpo with
         `scale_by_std=False, loss_agg_mode="seq-mean-token-sum-norm"`.
3. eval  on the held-out problems, every `eval_every` episodes: pass@1 greedy (temperature 0),
         pass@1 sampled (the mean over `samples` draws at temperature 1, the rollouts'
         distribution), pass@k of the SFT model (Chen et al. 2021's unbiased estimator) and
         KL(policy || SFT) = mean over sampled held-out responses of
         sum_t log pi(y_t|.) - log pi_SFT(y_t|.) (nats per response, EOS included).

RL that only turns the SFT model's pass@k into pass@1 is a known effect (sharpening): compare
the pass@1 after RL with the SFT model's pass@k, which the report prints beside it.

Writes benchmarks/results/reasoning.json (`provenance`: commit, machine, CPU flags; the load
average before and after, every stage's wall time, each method's curve; rewritten after each
method so a stopped run keeps what finished) and reasoning.png (held-out pass@1 against
episodes, one line per method); `--quick` writes the same names with a -quick suffix.
Run it alone: the timings mean something only on otherwise quiet cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf import ByteTokenizer, PaLM, RLHFTrainer  # noqa: E402
from palm_rlhf.rl.ppo.config import PPOConfig  # noqa: E402  (RLHFTrainer's config=)
from palm_rlhf.train.sft import SFTConfig, train_sft  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> RLHFTrainer keywords beyond the shared budget (everything else: documented defaults)
METHODS = {
    "ppo": dict(algorithm="ppo"),
    "grpo": dict(algorithm="grpo"),
    "dr-grpo": dict(algorithm="grpo", scale_by_std=False, loss_agg_mode="seq-mean-token-sum-norm"),
    "rloo": dict(algorithm="rloo"),
    "reinforce++": dict(algorithm="reinforce++"),
    "flowrl": dict(algorithm="flowrl"),
    "tpo": dict(algorithm="tpo"),
}
EOS = ByteTokenizer.eos_id


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Addition:
    """a + b for operands of `digits` digits; `held_out` pairs are reserved for evaluation."""

    digits: int = 3
    held_out: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.digits < 1 or not 0 < self.held_out < (10**self.digits) ** 2 // 2:
            raise ValueError(f"need digits >= 1 and 0 < held_out < half the pairs, got {self}")

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    @staticmethod
    def answer(prompt: str) -> str:
        """The exact answer to a prompt "a+b=", read from the prompt itself."""
        left, right = prompt.rstrip("=").split("+")
        return str(int(left) + int(right))

    def held_out_pairs(self) -> list[tuple[int, int]]:
        """`held_out` distinct pairs, the same for a given seed."""
        rng, top, pairs = random.Random(self.seed), 10**self.digits, {}
        while len(pairs) < self.held_out:
            pairs.setdefault((rng.randrange(top), rng.randrange(top)), None)
        return list(pairs)

    def train_pairs(self, count: int, seed: int = 1) -> list[tuple[int, int]]:
        """`count` pairs drawn uniformly from those not held out (repeats allowed)."""
        excluded, rng, top, pairs = (
            set(self.held_out_pairs()),
            random.Random(seed),
            10**self.digits,
            [],
        )
        while len(pairs) < count:
            pair = (rng.randrange(top), rng.randrange(top))
            if pair not in excluded:
                pairs.append(pair)
        return pairs


def exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """The verifiable reward, a `text_reward_fn`: 1.0 when the response is the sum, else 0.0."""
    return [float(r == Addition.answer(p)) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    digits: int
    held_out: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    sft_examples: int
    sft_steps: int
    sft_batch: int
    sft_lr: float
    episodes: int  # RL responses per method
    per_update: int  # RL responses per learning step
    eval_every: int  # episodes between held-out evaluations
    samples: int  # sampled answers per held-out problem (pass@1 sampled, pass@k, KL)


def sft_fields(budget: Budget) -> dict:
    """The fields that decide the SFT model (a reused --sft-dir must match them)."""
    return {k: v for k, v in asdict(budget).items() if k not in RL_FIELDS}


RL_FIELDS = ("episodes", "per_update", "eval_every", "samples")
FULL = Budget(3, 500, 128, 4, 4, 32, 50_000, 500, 64, 2e-3, 8192, 64, 1024, 8)
QUICK = Budget(2, 100, 32, 2, 2, 16, 2_000, 60, 32, 3e-3, 64, 32, 64, 4)


# ----------------------------------------------------------------------------- evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def answers(palm: PaLM, scope: Optional[str], prompts: torch.Tensor, width: int, temperature, gen):
    """Responses (b, width) sampled (temperature 0: greedy) from the full distribution."""
    return palm.generate(
        prompts.shape[1] + width,
        prompt=prompts,
        temperature=temperature,
        filter_logits_fn=None,
        eos_token=EOS,
        finetune_scope=scope,
        generator=gen,
    )


def decode(tokenizer, rows: torch.Tensor) -> list[str]:
    texts = []
    for row in rows.tolist():
        texts.append(tokenizer.decode(row[: row.index(EOS)] if EOS in row else row))
    return texts


@torch.no_grad()
def response_logprob(palm: PaLM, scope, prompts, responses) -> torch.Tensor:
    """sum over response tokens up to and including EOS of log p(y_t | .) -> (b,)."""
    seq = torch.cat((prompts, responses), dim=1)
    logp = F.log_softmax(palm(seq, finetune_scope=scope)[:, prompts.shape[1] - 1 : -1], dim=-1)
    token = logp.gather(-1, responses[..., None])[..., 0]
    ended = (responses == EOS).long().cumsum(dim=1)
    keep = (ended == 0) | ((ended == 1) & (responses == EOS))  # up to the first EOS
    return (token * keep).sum(dim=1)


def evaluate(policy, sft: PaLM, task: Addition, tokenizer, samples: int, seed: int = 0) -> dict:
    """Held-out pass@1 greedy and sampled, pass@k of the samples, KL(policy || SFT)."""
    palm, scope = policy
    was_training = palm.training
    palm.eval()
    problems = [task.prompt(a, b) for a, b in task.held_out_pairs()]
    truth = [Addition.answer(p) for p in problems]
    prompts = torch.tensor([tokenizer.encode(p) for p in problems])
    width = task.digits + 2  # the longest answer plus EOS
    gen = torch.Generator().manual_seed(seed)
    greedy = decode(tokenizer, answers(palm, scope, prompts, width, 0.0, gen))
    repeated = prompts.repeat_interleave(samples, dim=0)
    drawn = answers(palm, scope, repeated, width, 1.0, gen)
    right = torch.tensor(
        [
            t == r
            for t, r in zip([t for t in truth for _ in range(samples)], decode(tokenizer, drawn))
        ]
    ).view(len(problems), samples)
    kl = response_logprob(palm, scope, repeated, drawn) - response_logprob(
        sft, None, repeated, drawn
    )
    palm.train(was_training)
    counts = right.sum(dim=1).tolist()
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= samples]
    return {
        "pass1_greedy": sum(g == t for g, t in zip(greedy, truth)) / len(problems),
        "pass1_sampled": float(right.float().mean()),
        "pass_at_k": {k: sum(pass_at_k(samples, c, k) for c in counts) / len(counts) for k in ks},
        "kl_to_sft": float(kl.mean()),
    }


# ----------------------------------------------------------------------------- the stages


def run_sft(task: Addition, budget: Budget, work: Path, seed: int) -> PaLM:
    """A random-init byte PaLM, fine-tuned on training problems with the SFT stage."""
    tokenizer = ByteTokenizer()
    torch.manual_seed(seed)
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    palm = PaLM(
        num_tokens=tokenizer.vocab_size,
        dim=budget.dim,
        depth=budget.depth,
        heads=budget.heads,
        dim_head=budget.dim_head,
    )
    palm.save(base / "model.safetensors")
    tokenizer.save(base)
    data = work / "sft.jsonl"
    with data.open("w") as fh:
        for a, b in task.train_pairs(budget.sft_examples, seed=seed + 1):
            prompt = task.prompt(a, b)
            fh.write(json.dumps({"prompt": prompt, "response": Addition.answer(prompt)}) + "\n")
    config = SFTConfig(
        base=str(base),
        data=str(data),
        out_dir=str(work / "sft"),
        max_len=4 * budget.digits,
        batch_size=budget.sft_batch,
        lr=budget.sft_lr,
        epochs=1e6,  # max_steps decides
        max_steps=budget.sft_steps,
        warmup_steps=min(50, budget.sft_steps // 10),
        eval_every=0,
        save_every=0,
        progress=False,
        seed=seed,
    )
    result = train_sft(config)
    print(f"sft: {budget.sft_steps} steps, train loss {result.train['loss']:.4f}", flush=True)
    return result.model.eval()


def run_method(
    name: str, sft: PaLM, task: Addition, budget: Budget, seed: int, shared: dict
) -> dict:
    """RL from a copy of the SFT model; the held-out curve every `eval_every` episodes."""
    tokenizer = ByteTokenizer()
    palm = PaLM.from_config(sft.config)
    palm.load_state_dict(sft.state_dict())
    prompts = [task.prompt(a, b) for a, b in task.train_pairs(10_000, seed=seed + 2)]
    trainer = RLHFTrainer(
        palm=palm,
        text_reward_fn=exact_match,
        prompts=prompts,
        tokenizer=tokenizer,
        seed=seed,
        progress=False,
        **{**METHODS[name], **shared},
    )

    def point() -> dict:
        actor = trainer.actor_module
        return {
            "episodes": trainer.episodes,
            **evaluate((actor.palm, actor.scope), sft, task, tokenizer, budget.samples),
        }

    curve, records, started, eval_seconds = [point()], [], time.monotonic(), 0.0
    while trainer.episodes < budget.episodes:
        chunk = min(budget.eval_every, budget.episodes - trainer.episodes)
        records += trainer.train(
            num_rollouts=chunk,
            rollouts_per_update=budget.per_update,
            max_response_tokens=task.digits + 2,
            eos_token=EOS,
        )
        tick = time.monotonic()
        curve.append(point())
        eval_seconds += time.monotonic() - tick
        last = curve[-1]
        print(
            f"{name}: {last['episodes']} episodes, pass@1 greedy {last['pass1_greedy']:.3f} "
            f"sampled {last['pass1_sampled']:.3f}, KL {last['kl_to_sft']:.3f}, "
            f"train reward {records[-1]['reward']:.3f}",
            flush=True,
        )
    seconds = time.monotonic() - started - eval_seconds
    return {
        "keywords": {**METHODS[name], **shared},
        "episodes": trainer.episodes,
        "train_seconds": round(seconds, 1),
        "before": curve[0],
        "after": curve[-1],
        "gain_greedy": curve[-1]["pass1_greedy"] - curve[0]["pass1_greedy"],
        "curve": curve,
        "train_reward": [r["reward"] for r in records],
    }


# ----------------------------------------------------------------------------- reporting


def table(results: dict) -> str:
    sft = results["sft"]["eval"]
    ks = " ".join(f"pass@{k} {v:.3f}" for k, v in sft["pass_at_k"].items())
    lines = [
        f"SFT held-out: pass@1 greedy {sft['pass1_greedy']:.3f}, "
        f"sampled {sft['pass1_sampled']:.3f}; {ks}",
        "",
        "| method | pass@1 greedy before -> after | pass@1 sampled before -> after "
        "| KL to SFT | episodes | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        b, a = m["before"], m["after"]
        lines.append(
            f"| {name} | {b['pass1_greedy']:.3f} -> {a['pass1_greedy']:.3f} | "
            f"{b['pass1_sampled']:.3f} -> {a['pass1_sampled']:.3f} | {a['kl_to_sft']:.3f} | "
            f"{m['episodes']} | {m['train_seconds']} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, m in results["methods"].items():
        episodes = [p["episodes"] for p in m["curve"]]
        axes[0].plot(episodes, [p["pass1_greedy"] for p in m["curve"]], marker="o", label=name)
        axes[1].plot(episodes, [p["pass1_sampled"] for p in m["curve"]], marker="o", label=name)
    for ax, title in zip(axes, ("greedy", "sampled (temperature 1)")):
        ax.set(title=f"held-out pass@1, {title}", xlabel="RL episodes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pass@1")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, quick: bool, folder: Path) -> None:
    suffix = "-quick" if quick else ""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"reasoning{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    if results["methods"]:
        plot(results, folder / f"reasoning{suffix}.png")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--episodes", type=int, help="RL episodes per method (default: the budget's)"
    )
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default: the budget's)")
    parser.add_argument("--per-update", type=int, help="RL episodes per learning step")
    parser.add_argument(
        "--sft-only", action="store_true", help="stop after evaluating the SFT model"
    )
    parser.add_argument(
        "--sft-dir",
        help="keep the SFT model here (model.safetensors), or start from the one already there "
        "(it must come from the same --quick/--sft-steps/--seed)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an RLHFTrainer keyword for every method (JSON value), e.g. --set actor_lr=1e-3",
    )
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and PNG go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    shared = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        try:
            shared[key] = json.loads(value)
        except json.JSONDecodeError:
            shared[key] = value  # a bare string
    for name in args.methods.split(","):  # a bad keyword fails now, not after the SFT stage
        try:
            PPOConfig.from_keywords(**{**METHODS[name], **shared})
        except (TypeError, ValueError) as err:
            parser.error(f"{name}: {err}")
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    if args.episodes is not None:
        budget = replace(
            budget, episodes=args.episodes, eval_every=min(budget.eval_every, args.episodes)
        )
    if args.per_update is not None:
        budget = replace(budget, per_update=args.per_update)
    if args.sft_steps is not None:
        budget = replace(budget, sft_steps=args.sft_steps)
    if budget.eval_every % budget.per_update or budget.episodes % budget.per_update:
        parser.error(
            f"--episodes ({budget.episodes}) and the evaluation interval ({budget.eval_every}) "
            f"must be multiples of the episodes per update ({budget.per_update})"
        )
    task = Addition(budget.digits, budget.held_out, args.seed)
    results: dict = {
        "task": asdict(task),
        "budget": asdict(budget),
        "seed": args.seed,
        "shared_keywords": shared,
        "provenance": provenance(args.threads),
        "load_start": os.getloadavg(),
        "sft": {},
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-reasoning-") as work:
        start = time.monotonic()
        saved = Path(args.sft_dir) / "model.safetensors" if args.sft_dir else None
        made_by = {"task": results["task"], "budget": sft_fields(budget), "seed": args.seed}
        if saved is not None and saved.is_file():  # an SFT model of an earlier run
            recorded = json.loads((saved.parent / "made_by.json").read_text())
            if recorded != made_by:
                raise SystemExit(f"{saved} was made with {recorded}, not {made_by}")
            sft = PaLM.from_pretrained(saved).eval()
            results["sft"]["from"] = str(saved)
        else:
            sft = run_sft(task, budget, Path(work), args.seed)
            if saved is not None:
                sft.save(saved)
                (saved.parent / "made_by.json").write_text(json.dumps(made_by) + "\n")
        results["sft"]["seconds"] = round(time.monotonic() - start, 1)
        results["sft"]["eval"] = evaluate((sft, None), sft, task, ByteTokenizer(), budget.samples)
        print(table(results).splitlines()[0], f"({results['sft']['seconds']} s)", flush=True)
        write(results, args.quick, Path(args.out_dir))
        for name in [] if args.sft_only else args.methods.split(","):
            print(f"\n=== {name} === (load {os.getloadavg()[0]:.2f})", flush=True)
            results["methods"][name] = run_method(name, sft, task, budget, args.seed, shared)
            write(results, args.quick, Path(args.out_dir))
    results["load_end"] = os.getloadavg()
    write(results, args.quick, Path(args.out_dir))
    print("\n" + table(results))
    print(f"\nload {results['load_start']} -> {results['load_end']}")
    return results


if __name__ == "__main__":
    main()
