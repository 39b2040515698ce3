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

Pipeline, every stage a public library call (`train.sft.train_sft`, all weights, then
`RLHFTrainer`):
1. base  a random-init `PaLM` fine-tuned on right answers for `base_steps`: the stand-in for a
         pretrained model that can add, imperfectly.
2. SFT   that model fine-tuned for `sft_steps` on a careless demonstrator's answers: right
         `demo_accuracy` of the time, else with every carry forgotten (`Addition.slip`, the
         typical mistake). The result is right sometimes (held-out pass@1 roughly 10-40%) and
         can still sample the right answer often (its pass@k): the situation RL with a
         verifiable reward is used for.
         (Fine-tuning a random init on right answers alone is no such start here: held-out
         pass@1 jumps from 1% to 40% to 64% between 1100, 1200 and 1300 steps, and RL from the
         40% model gained 2-3 points in 25-33k episodes under every learning rate tried.)
3. RL    from the SFT model, `RLHFTrainer(algorithm=...)` for each method with the exact-match
         reward `exact_match(prompts, responses)` through `text_reward_fn` (1 when the response
         is the sum, else 0), on training prompts, every method the same episode budget, under
         each setting of `SETTINGS`: the library's documented defaults, and one setting shared
         by every method (`--set KEY=VALUE` adds a keyword to both and is recorded). Dr. GRPO =
         grpo with `scale_by_std=False, loss_agg_mode="seq-mean-token-sum-norm"`.
4. eval  on the held-out problems, every `eval_every` episodes: pass@1 greedy (temperature 0),
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
    # the drop-in options (docs/algorithms.md): DAPO's and GSPO's papers' values
    "dapo": dict(
        algorithm="grpo",
        loss_agg_mode="token-mean",
        clip_eps_high=0.28,
        kl_coef=0.0,
        dynamic_sampling=True,
        overlong_filtering=True,
    ),
    "gspo": dict(
        algorithm="grpo",
        importance_sampling_level="sequence",
        clip_eps_low=3e-4,
        clip_eps_high=4e-4,
    ),
}
# the settings every method runs under: the library's documented defaults, and one setting
# shared by every method (full weights, no KL or entropy term, groups of 8, 64 episodes per
# gradient step): not tuned per method, but chosen on grpo (actor_lr 3e-5 / 1e-4 / 3e-4 / 1e-3:
# 3e-4 and up lost the SFT model's skill, KL 1 to 45 nats).
SETTINGS = {
    "defaults": {},
    "shared": dict(
        actor_lora=False, actor_lr=1e-4, kl_coef=0.0, group_size=8, minibatch_size=64, beta_s=0.0
    ),
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

    @staticmethod
    def slip(prompt: str) -> str:
        """The answer with every carry forgotten (digit-wise sum mod 10): a demonstrator's
        typical mistake, equal to `answer` only when no column carries."""
        left, right = prompt.rstrip("=").split("+")
        return str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(left, right))))

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
    sft_examples: int  # problems per fine-tuning stage
    sft_batch: int
    base_steps: int  # fine-tuning on right answers: the base model (0: none, random init)
    base_lr: float
    sft_steps: int  # fine-tuning on the careless demonstrator's answers
    sft_lr: float
    demo_accuracy: float  # share of SFT demonstrations that are right (the rest: `slip`)
    episodes: int  # RL responses per method
    per_update: int  # RL responses per learning step
    eval_every: int  # episodes between held-out evaluations
    samples: int  # sampled answers per held-out problem (pass@1 sampled, pass@k, KL)


def sft_fields(budget: Budget) -> dict:
    """The fields that decide the SFT model (a reused --sft-dir must match them)."""
    return {k: v for k, v in asdict(budget).items() if k not in RL_FIELDS}


RL_FIELDS = ("episodes", "per_update", "eval_every", "samples")
FULL = Budget(3, 500, 128, 4, 4, 32, 50_000, 64, 2500, 2e-3, 300, 2e-3, 0.3, 49152, 256, 8192, 8)
QUICK = Budget(2, 100, 32, 2, 2, 16, 2_000, 32, 40, 3e-3, 20, 3e-3, 0.3, 128, 64, 128, 4)


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


def fine_tune(
    task: Addition,
    start: Path,
    out: Path,
    steps: int,
    lr: float,
    right_share: float,
    seed: int,
    budget: Budget,
) -> PaLM:
    """`train_sft` from the model in `start` on `budget.sft_examples` training problems, each
    answered right with probability `right_share`, else with the carry-less `slip`."""
    data, coin = out.with_suffix(".jsonl"), random.Random(seed)
    with data.open("w") as fh:
        for a, b in task.train_pairs(budget.sft_examples, seed=seed):
            prompt = task.prompt(a, b)
            right = coin.random() < right_share
            response = Addition.answer(prompt) if right else Addition.slip(prompt)
            fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    config = SFTConfig(
        base=str(start),
        data=str(data),
        out_dir=str(out),
        max_len=3 * budget.digits + 4,  # prompt (2d + 2), the longest answer (d + 1), EOS
        batch_size=budget.sft_batch,
        lr=lr,
        epochs=1e6,  # max_steps decides
        max_steps=steps,
        warmup_steps=min(50, steps // 10),
        eval_every=0,
        save_every=0,
        progress=False,
        seed=seed,
    )
    result = train_sft(config)
    print(f"{out.name}: {steps} steps, train loss {result.train['loss']:.4f}", flush=True)
    return result.model.eval()


def run_sft(task: Addition, budget: Budget, work: Path, seed: int) -> tuple[PaLM, PaLM]:
    """The (base, SFT) models: a random-init byte PaLM fine-tuned on right answers for
    `base_steps` (the stand-in for pretraining: a model that can add), then on a careless
    demonstrator's answers (right `demo_accuracy` of the time, else carries forgotten) for
    `sft_steps`."""
    tokenizer = ByteTokenizer()
    torch.manual_seed(seed)
    init = work / "init"
    init.mkdir(parents=True, exist_ok=True)
    palm = PaLM(
        num_tokens=tokenizer.vocab_size,
        dim=budget.dim,
        depth=budget.depth,
        heads=budget.heads,
        dim_head=budget.dim_head,
    )
    palm.save(init / "model.safetensors")
    tokenizer.save(init)
    base, start = palm.eval(), init
    if budget.base_steps:
        base = fine_tune(
            task, init, work / "base", budget.base_steps, budget.base_lr, 1.0, seed + 1, budget
        )
        start = work / "base-model"
        start.mkdir()
        base.save(start / "model.safetensors")
        tokenizer.save(start)
    sft = fine_tune(
        task,
        start,
        work / "sft",
        budget.sft_steps,
        budget.sft_lr,
        budget.demo_accuracy,
        seed + 3,
        budget,
    )
    return base, sft


def sft_model(
    task: Addition, budget: Budget, seed: int, sft_dir: Optional[str], work
) -> tuple[PaLM, dict, Optional[str]]:
    """(the SFT model, the base model's record, where it was loaded from or None): the one
    kept in `sft_dir` when it was made from the same task, budget and seed, else made now in
    `work` (and kept in `sft_dir` with the tokenizer, when given)."""
    start = time.monotonic()
    saved = Path(sft_dir) / "model.safetensors" if sft_dir else None
    made_by = {"task": asdict(task), "budget": sft_fields(budget), "seed": seed}
    if saved is not None and saved.is_file():  # an SFT model of an earlier run
        recorded = json.loads((saved.parent / "made_by.json").read_text())
        if recorded != made_by:
            raise SystemExit(f"{saved} was made with {recorded}, not {made_by}")
        base = json.loads((saved.parent / "base.json").read_text())
        return PaLM.from_pretrained(saved).eval(), base, str(saved)
    base, sft = run_sft(task, budget, Path(work), seed)
    record = {  # seconds: the base and SFT stages together
        "seconds": round(time.monotonic() - start, 1),
        "eval": evaluate((base, None), base, task, ByteTokenizer(), budget.samples),
    }
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        sft.save(saved)
        ByteTokenizer().save(saved.parent)
        (saved.parent / "made_by.json").write_text(json.dumps(made_by) + "\n")
        (saved.parent / "base.json").write_text(json.dumps(record) + "\n")
    return sft, record, None


def run_method(
    name: str, sft: PaLM, task: Addition, budget: Budget, seed: int, keywords: dict, label: str
) -> dict:
    """RL from a copy of the SFT model under `keywords` (a setting's, beside the method's own);
    the held-out curve every `eval_every` episodes."""
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
        **{**METHODS[name], **keywords},
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
            f"{label}: {last['episodes']} episodes, pass@1 greedy {last['pass1_greedy']:.3f} "
            f"sampled {last['pass1_sampled']:.3f}, KL {last['kl_to_sft']:.3f}, "
            f"train reward {records[-1]['reward']:.3f}",
            flush=True,
        )
    seconds = time.monotonic() - started - eval_seconds
    return {
        "keywords": {**METHODS[name], **keywords},
        "episodes": trainer.episodes,
        "train_seconds": round(seconds, 1),
        "before": curve[0],
        "after": curve[-1],
        "gain_greedy": curve[-1]["pass1_greedy"] - curve[0]["pass1_greedy"],
        "curve": curve,
        "train_reward": [r["reward"] for r in records],
    }


# ----------------------------------------------------------------------------- reporting


def stage_lines(results: dict) -> list[str]:
    lines = []
    for stage, label in (("base", "base model"), ("sft", "SFT model")):
        if "eval" in results.get(stage, {}):
            held = results[stage]["eval"]
            ks = " ".join(f"pass@{k} {v:.3f}" for k, v in held["pass_at_k"].items())
            lines.append(
                f"{label}, held out: pass@1 greedy {held['pass1_greedy']:.3f}, "
                f"sampled {held['pass1_sampled']:.3f}; {ks}"
            )
    return lines


def run_table(run: dict) -> list[str]:
    lines = [
        "| method | pass@1 greedy before -> after | pass@1 sampled before -> after "
        "| KL to SFT | episodes | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in run["methods"].items():
        b, a = m["before"], m["after"]
        lines.append(
            f"| {name} | {b['pass1_greedy']:.3f} -> {a['pass1_greedy']:.3f} | "
            f"{b['pass1_sampled']:.3f} -> {a['pass1_sampled']:.3f} | {a['kl_to_sft']:.3f} | "
            f"{m['episodes']} | {m['train_seconds']} |"
        )
    return lines


def reading(results: dict) -> str:
    """The best run against the goal (+30 points), the SFT model's pass@k and the base model."""
    rows = [(s, n, m) for s, r in results["runs"].items() for n, m in r["methods"].items()]
    if not rows:
        return ""
    setting, name, best = max(rows, key=lambda row: row[2]["gain_greedy"])
    sft, after = results["sft"]["eval"], best["after"]
    top_k = max(sft["pass_at_k"], key=int)
    text = (
        f"Best: {name} ({setting}), held-out pass@1 greedy {best['before']['pass1_greedy']:.3f} "
        f"-> {after['pass1_greedy']:.3f} ({100 * best['gain_greedy']:+.1f} points; goal +30), "
        f"sampled {best['before']['pass1_sampled']:.3f} -> {after['pass1_sampled']:.3f}, in "
        f"{best['episodes']} episodes and {best['train_seconds']} s of RL "
        f"(+{results['base']['seconds']} s for the base and SFT stages)."
    )
    base = results.get("base", {}).get("eval")
    if base and results["budget"]["base_steps"]:
        within = after["pass1_sampled"] <= sft["pass_at_k"][top_k] + 0.02
        text += (
            f" The SFT model's pass@{top_k} was {sft['pass_at_k'][top_k]:.3f} and the base model "
            f"(before the careless demonstrations) had pass@1 greedy {base['pass1_greedy']:.3f}: "
            + (
                "RL turned answers the SFT model could already sample into its first answer "
                "(sharpening), recovering what the careless demonstrations had buried."
                if within and after["pass1_greedy"] <= base["pass1_greedy"] + 0.02
                else "RL went beyond both, not only sharpening."
            )
        )
    return text


def table(results: dict) -> str:
    lines = stage_lines(results)
    for setting, run in results["runs"].items():
        shown = ", ".join(f"{k}={v}" for k, v in run["keywords"].items()) or "none"
        lines += ["", f"RL with setting `{setting}` (keywords beyond the defaults: {shown}):", ""]
        lines += run_table(run)
    text = reading(results)
    return "\n".join(lines + (["", text] if text else []))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    runs = [(s, r) for s, r in results["runs"].items() if r["methods"]]
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 4 * len(runs)), sharey=True, squeeze=False)
    for row, (setting, run) in zip(axes, runs):
        for name, m in run["methods"].items():
            episodes = [p["episodes"] for p in m["curve"]]
            for ax, key in zip(row, ("pass1_greedy", "pass1_sampled")):
                ax.plot(episodes, [p[key] for p in m["curve"]], marker="o", label=name)
        for ax, title in zip(row, ("greedy", "sampled (temperature 1)")):
            ax.set(title=f"{setting}: held-out pass@1, {title}", xlabel="RL episodes")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("pass@1")
        row[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_named(results: dict, folder: Path, stem: str, draw) -> None:
    """`stem`.json and, when `draw` is given, the plot it draws in `stem`.png."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    if draw is not None:
        draw(results, folder / f"{stem}.png")


def write(results: dict, quick: bool, folder: Path) -> None:
    curves = any(run["methods"] for run in results["runs"].values())
    stem = "reasoning-quick" if quick else "reasoning"
    write_named(results, folder, stem, plot if curves else None)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--episodes", type=int, help="RL episodes per method (default: the budget's)"
    )
    parser.add_argument("--eval-every", type=int, help="episodes between held-out evaluations")
    parser.add_argument("--base-steps", type=int, help="base-model steps (default: the budget's)")
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default: the budget's)")
    parser.add_argument(
        "--demo-accuracy", type=float, help="share of right SFT demonstrations (the rest slip)"
    )
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
        help="an RLHFTrainer keyword for every method and setting (JSON value), e.g. "
        "--set actor_lr=1e-3",
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}"
    )
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and PNG go")
    parser.add_argument(
        "--add",
        action="store_true",
        help="add the methods to the results JSON already in --out-dir (same budget, settings "
        "and SFT model: its held-out evaluation must match) instead of starting a new one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value  # a bare string
    settings = {s: {**SETTINGS[s], **extra} for s in args.settings.split(",")}
    for setting, keywords in settings.items():  # a bad keyword fails now, not after SFT
        for name in args.methods.split(","):
            try:
                PPOConfig.from_keywords(**{**METHODS[name], **keywords})
            except (TypeError, ValueError) as err:
                parser.error(f"{name} ({setting}): {err}")
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    if args.episodes is not None:
        budget = replace(
            budget, episodes=args.episodes, eval_every=min(budget.eval_every, args.episodes)
        )
    if args.per_update is not None:
        budget = replace(budget, per_update=args.per_update)
    if args.eval_every is not None:
        budget = replace(budget, eval_every=args.eval_every)
    if args.base_steps is not None:
        budget = replace(budget, base_steps=args.base_steps)
    if args.sft_steps is not None:
        budget = replace(budget, sft_steps=args.sft_steps)
    if args.demo_accuracy is not None:
        budget = replace(budget, demo_accuracy=args.demo_accuracy)
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
        "provenance": provenance(args.threads),
        "load_start": os.getloadavg(),
        "base": {},
        "sft": {},
        "runs": {s: {"keywords": k, "methods": {}} for s, k in settings.items()},
    }
    earlier = Path(args.out_dir) / f"reasoning{'-quick' if args.quick else ''}.json"
    if args.add:
        fresh, results = results, json.loads(earlier.read_text())
        for key in ("task", "budget", "seed"):
            if results[key] != fresh[key]:
                parser.error(f"--add: {earlier} has {key} {results[key]}, not {fresh[key]}")
        for setting, run in fresh["runs"].items():
            kept = results["runs"].setdefault(setting, run)
            if kept["keywords"] != run["keywords"]:
                parser.error(f"--add: {earlier} ran {setting} with {kept['keywords']}")
        results.setdefault("added", []).append(
            {
                "methods": args.methods,
                "provenance": fresh["provenance"],
                "load": fresh["load_start"],
            }
        )
    with tempfile.TemporaryDirectory(prefix="bench-reasoning-") as work:
        sft, base, origin = sft_model(task, budget, args.seed, args.sft_dir, work)
        held = evaluate((sft, None), sft, task, ByteTokenizer(), budget.samples)
        if args.add and json.loads(json.dumps(held)) != results["sft"]["eval"]:
            raise SystemExit(f"--add: this SFT model is not the one of {earlier}: {held}")
        if not args.add:
            results["base"], results["sft"]["eval"] = base, held
            if origin:
                results["sft"]["from"] = origin
        print("\n".join(stage_lines(results)), f"({results['base']['seconds']} s)", flush=True)
        write(results, args.quick, Path(args.out_dir))
        for setting, keywords in [] if args.sft_only else settings.items():
            for name in args.methods.split(","):
                label = f"{name} ({setting})"
                print(f"\n=== {label} === (load {os.getloadavg()[0]:.2f})", flush=True)
                run = run_method(name, sft, task, budget, args.seed, keywords, label)
                results["runs"][setting]["methods"][name] = run
                write(results, args.quick, Path(args.out_dir))
    results["load_end"] = os.getloadavg()
    write(results, args.quick, Path(args.out_dir))
    print("\n" + table(results))
    print(f"\nload {results['load_start']} -> {results['load_end']}")
    return results


if __name__ == "__main__":
    main()
