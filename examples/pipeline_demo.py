"""The whole InstructGPT pipeline, and its two modern alternatives, in one command on a CPU.

    python examples/pipeline_demo.py               # ~10 minutes on 2 idle CPU cores
    python examples/pipeline_demo.py --tiny        # a tiny model, a few steps: a smoke test
    python examples/pipeline_demo.py --help        # every option and each stage's budget

pretrain -> SFT -> reward model -> PPO, plus DPO and Chain of Hindsight (CoH) from the same SFT
model, each stage a library call (`palm_rlhf.train.pretrain.pretrain`, `sft.train_sft`,
`reward_training.train_reward_model`, `ppo_stage.train_ppo`, `dpo.train_dpo`, `coh.train_coh`)
whose checkpoint folder is the next stage's base. The data is built at run time from the
embedded King James Bible (see `demo_data.py`): "finish this verse" prompts in the HH-RLHF
Human/Assistant template, comparisons of the true rest of a verse (chosen) with a corrupted
rest (rejected). Test verses come from the part of the corpus pretraining holds out.

Every number is measured on the held-out test split unless the table says otherwise:

- pretrain bpc: mean next-byte loss / ln 2 on the validation split train.py uses.
- SFT loss: mean -log p of the response tokens and their EOS given the prompt (nats/token),
  for the pretrained base ("before") and the SFT model ("after").
- reward-model accuracy: share of test pairs whose chosen response scores above the rejected.
- PPO reward: mean reward-model score of one response sampled (temperature 1, same seed) for
  each test prompt, from the SFT policy ("before") and the PPO policy ("after"); KL: mean over
  those PPO responses of sum_t [log pi_PPO(y_t|.) - log pi_SFT(y_t|.)] (nats per response).
  The PNG plots the same two quantities on each update's training rollouts.
- DPO implicit-reward accuracy: share of test pairs with beta (log pi - log pi_ref) higher for
  chosen than rejected (pi_ref = the SFT model), as `train_dpo` reports on its valid data.
- likelihood preference accuracy: share of test pairs for which the model gives the chosen
  response a higher length-normalised log-likelihood, (1/|y|) sum_t log p(y_t | x, y_<t) over
  the response tokens and EOS, than the rejected one (a tie counts as wrong). For DPO and the
  SFT baseline x is the prompt; for CoH x is the prompt followed by the positive feedback
  phrase ("\\nA good answer: ", as in training), and the SFT baseline is measured the same way.

With the default corruption ("shuffle": the rest's words in another order) chosen and rejected
hold the same bytes, so length normalisation changes nothing there; it matters for "swap" and
"mix". Shuffled text is easy for a pretrained model to spot, so the reward model learns it in a
minute, but the likelihood accuracies start near 1: the reward-model score of sampled responses
is the yardstick on which SFT, PPO, DPO and CoH can all be compared. "mix" (half the pairs
reject another verse's rest, which a small model cannot tell from the true one) is harder.
CoH trains in the paper's "pn" layout (the good answer first): with "both", the shuffled answer
also opens half the sequences, and in this budget the model then writes shuffled text after
either phrase.

On a machine other jobs share, `--threads 1` avoids two torch threads waiting on each other
(several times slower on 2 busy cores).

Outputs in --out-dir: data/ (the JSON Lines files), one checkpoint folder per stage,
results.json (every number, budget and timing), results.md (the table) and ppo_curves.png
(needs matplotlib: pip install -e .[plot]; without it the plot is skipped with a note).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_data and demo_metrics
from demo_data import CORRUPTIONS, write_demo_data  # noqa: E402
from demo_metrics import (  # noqa: E402
    bits_per_byte,
    preference_accuracy,
    response_loss,
    sample_answers,
    sampled_rewards,
)

from palm_rlhf.data.records import read_prompts, read_sft  # noqa: E402
from palm_rlhf.data.tokenizer import ByteTokenizer  # noqa: E402
from palm_rlhf.rl.ppo.stage import PPOStageConfig, train_ppo  # noqa: E402
from palm_rlhf.train.coh import CoHConfig, train_coh  # noqa: E402
from palm_rlhf.train.dpo import DPOConfig, train_dpo  # noqa: E402
from palm_rlhf.train.loading import load_base  # noqa: E402
from palm_rlhf.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from palm_rlhf.train.reward import RewardTrainConfig, train_reward_model  # noqa: E402
from palm_rlhf.train.sft import SFTConfig, train_sft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = ".palm-rlhf-demo"  # marks an --out-dir this script made, so a rerun may clear it
STAGE_DIRS = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "coh")
NEVER = 10**6  # "every NEVER steps": validate and save only at the end of a stage


@dataclass(frozen=True)
class Budget:
    """What each stage may spend: optimizer steps (PPO: episodes), data and lengths."""

    pretrain_minutes: float  # only when no --base checkpoint exists
    pretrain_steps: int  # the cosine schedule's length (the minutes usually stop it first)
    sft_steps: int
    reward_steps: int
    ppo_episodes: int
    dpo_steps: int
    coh_steps: int
    batch_size: int  # SFT, reward, DPO and CoH
    ppo_update: int  # episodes per PPO update (and prompts sampled at once)
    max_response: int  # PPO and evaluation: longest sampled response in tokens
    num_sft: int  # records of each training file
    num_comparisons: int
    num_prompts: int
    num_test: int  # held-out verses (every held-out metric)
    num_ppo_test: int  # held-out prompts sampled for the PPO numbers
    max_len: int  # longest training sequence in tokens (capped by the base's context)


# Timed on this 2-core machine while other jobs shared it (see --help for seconds per stage).
FULL = Budget(
    pretrain_minutes=3.0,
    pretrain_steps=180,
    sft_steps=200,
    reward_steps=100,
    ppo_episodes=768,
    dpo_steps=60,
    coh_steps=80,
    batch_size=16,
    ppo_update=32,
    max_response=88,
    num_sft=2000,
    num_comparisons=2000,
    num_prompts=1000,
    num_test=200,
    num_ppo_test=64,
    max_len=256,
)
TINY = Budget(
    pretrain_minutes=0.5,
    pretrain_steps=4,
    sft_steps=2,
    reward_steps=2,
    ppo_episodes=8,
    dpo_steps=2,
    coh_steps=2,
    batch_size=4,
    ppo_update=4,
    max_response=16,
    num_sft=16,
    num_comparisons=16,
    num_prompts=8,
    num_test=8,
    num_ppo_test=4,
    max_len=192,
)
TINY_MODEL = dict(dim=32, depth=1, heads=2, dim_head=16, seq_len=192, batch_size=4, val_batches=1)


class Run(NamedTuple):
    """What every stage reads: the options, the budget, the data files, where to write."""

    args: argparse.Namespace
    budget: Budget
    files: dict[str, Path]
    out_dir: Path
    tokenizer: Any

    def sampling(self, reward) -> dict:
        """Arguments of `sampled_rewards`: the held-out prompts, the trained reward model."""
        prompts = read_prompts(self.files["prompts_test"])[: self.budget.num_ppo_test]
        return dict(
            reward_model=reward.model,
            tokenizer=self.tokenizer,
            prompts=prompts,
            max_new=self.budget.max_response,
            seed=self.args.seed + 1,
        )

    def common(self) -> dict:
        """Options shared by the SFT, DPO and CoH configs (max_steps, not epochs, ends them)."""
        budget = self.budget
        return dict(
            max_len=budget.max_len,
            batch_size=budget.batch_size,
            seed=self.args.seed,
            epochs=NEVER,
            eval_every=NEVER,
            save_every=NEVER,
            keep_last=1,
        )


# ----------------------------------------------------------------------------- the stages


def prepare_out_dir(out_dir: Path, keep: Optional[str] = None) -> None:
    """Create --out-dir, or clear the stage folders of an earlier demo run in it (except one
    holding `keep`, the --base); refuse a non-empty folder this script did not make."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise SystemExit(
            f"{out_dir} is not empty and not an earlier demo run: choose another --out-dir"
        )
    kept = Path(keep).resolve() if keep is not None else None
    for name in STAGE_DIRS:
        folder = (out_dir / name).resolve()
        if kept is None or not (kept == folder or folder in kept.parents):
            shutil.rmtree(folder, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("made by examples/pipeline_demo.py\n")


def get_base(args, budget: Budget, out_dir: Path) -> tuple[str, dict]:
    """The pretrained checkpoint and its numbers: --base if it exists, else pretrain one."""
    if args.base is not None and Path(args.base).exists():
        model, tokenizer = load_base(args.base, log=lambda *_: None)
        bpc = math.nan  # bits per character only mean something for a byte-level model
        if isinstance(tokenizer, ByteTokenizer):
            bpc = bits_per_byte(model, REPO / "data", model.config.max_seq_len)
        return args.base, {"source": f"reused {args.base}", "valid_bpc": bpc}
    if args.base is not None:
        print(f"no checkpoint at {args.base}: pretraining for {budget.pretrain_minutes} minutes")
    config = PretrainConfig(
        data_dir=str(REPO / "data"),
        out_dir=str(out_dir / "pretrain"),
        num_steps=budget.pretrain_steps,
        max_minutes=budget.pretrain_minutes,
        warmup_steps=min(30, budget.pretrain_steps // 5),
        eval_every=NEVER,
        generate_every=0,
        save_every=NEVER,
        keep_last=1,
        seed=args.seed,
        **(TINY_MODEL if args.tiny else {}),
    )
    result = pretrain(config)
    steps = result.history[-1]["step"]
    numbers = {"source": f"pretrained here, {steps} steps", "valid_bpc": result.valid_bpc}
    return str(result.checkpoint), numbers


def run_sft(run: Run, base: str, base_model) -> tuple[Any, dict]:
    result = train_sft(
        SFTConfig(
            base=base,
            data=str(run.files["sft_train"]),
            valid_data=str(run.files["sft_test"]),
            out_dir=str(run.out_dir / "sft"),
            max_steps=run.budget.sft_steps,
            lr=3e-4,
            **run.common(),
        )
    )

    def loss(model):
        return response_loss(model, run.tokenizer, run.files["sft_test"], run.budget.max_len)

    return result, {
        "steps": run.budget.sft_steps,
        "loss_before": loss(base_model),
        "loss_after": loss(result.model),
        "library_valid_loss": result.valid["loss"],
    }


def run_reward(run: Run, sft_dir: str) -> tuple[Any, dict]:
    result = train_reward_model(
        RewardTrainConfig(
            data=str(run.files["comparisons_train"]),
            valid_data=str(run.files["comparisons_test"]),
            base=sft_dir,
            out_dir=str(run.out_dir / "reward"),
            max_steps=run.budget.reward_steps,
            max_len=run.budget.max_len,
            batch_size=run.budget.batch_size,
            lr=1e-3,
            warmup_steps=5,
            seed=run.args.seed,
            keep_last=1,
            progress=not run.args.tiny,
        )
    )
    metrics = result.metrics
    numbers = {
        "steps": run.budget.reward_steps,
        "accuracy": metrics["valid_accuracy"],
        "pairs": metrics["valid_count"],
    }
    return result, numbers


def run_ppo(run: Run, sft_dir: str, sft_model, reward) -> tuple[Any, dict]:
    budget = run.budget
    result = train_ppo(
        PPOStageConfig(
            policy=sft_dir,
            reward=str(reward.checkpoint),
            prompts=str(run.files["prompts_train"]),
            out_dir=str(run.out_dir / "ppo"),
            num_rollouts=budget.ppo_episodes,
            rollouts_per_update=budget.ppo_update,
            rollout_batch_size=budget.ppo_update,
            minibatch_size=max(1, budget.ppo_update // 4),
            max_response_tokens=budget.max_response,
            actor_lr=1e-3,
            critic_lr=1e-3,
            kl_coef=0.1,
            missing_eos_penalty=1.0,
            checkpoint_every=NEVER,
            seed=run.args.seed,
            progress=not run.args.tiny,
        )
    )
    ppo_model, _ = load_base(result.checkpoint, log=lambda *_: None)
    prompts = read_prompts(run.files["prompts_test"])[: budget.num_ppo_test]
    before, _ = sampled_rewards(sft_model, **run.sampling(reward))
    after, kl = sampled_rewards(ppo_model, reference=sft_model, **run.sampling(reward))
    curve = [{"update": h["update"], "reward": h["reward"], "kl": h["kl"]} for h in result.history]
    return ppo_model, {
        "episodes": budget.ppo_episodes,
        "updates": len(curve),
        "test_prompts": len(prompts),
        "reward_before": before,
        "reward_after": after,
        "kl": kl,
        "rollout_reward_first": result.reward_before,
        "rollout_reward_last": result.reward_after,
        "rollout_kl_last": result.kl,
        "curve": curve,
    }


def accuracy(run: Run, model, phrase: Optional[str] = None) -> float:
    files, max_len = run.files, run.budget.max_len
    return preference_accuracy(model, run.tokenizer, files["comparisons_test"], max_len, phrase)


def run_dpo(run: Run, sft_dir: str, sft_model, reward, sft_reward: float) -> tuple[Any, dict]:
    result = train_dpo(
        DPOConfig(
            base=sft_dir,
            data=str(run.files["comparisons_train"]),
            valid_data=str(run.files["comparisons_test"]),
            out_dir=str(run.out_dir / "dpo"),
            max_steps=run.budget.dpo_steps,
            lr=1e-5,
            beta=0.1,
            **run.common(),
        )
    )
    return result, {
        "steps": run.budget.dpo_steps,
        "beta": 0.1,
        "implicit_reward_accuracy": result.valid["accuracy"],
        "likelihood_accuracy_sft": accuracy(run, sft_model),
        "likelihood_accuracy": accuracy(run, result.model),
        "reward_sft": sft_reward,
        "reward": sampled_rewards(result.model, **run.sampling(reward))[0],
    }


def run_coh(run: Run, sft_dir: str, sft_model, reward, sft_reward: float) -> tuple[Any, dict]:
    config = CoHConfig(
        base=sft_dir,
        data=str(run.files["comparisons_train"]),
        valid_data=str(run.files["comparisons_test"]),
        out_dir=str(run.out_dir / "coh"),
        max_steps=run.budget.coh_steps,
        lr=1e-4,
        mode="pn",
        **run.common(),
    )
    result, phrase = train_coh(config), config.positive_phrase
    return result, {
        "steps": run.budget.coh_steps,
        "positive_phrase": phrase,
        "likelihood_accuracy_sft": accuracy(run, sft_model, phrase),
        "likelihood_accuracy": accuracy(run, result.model, phrase),
        "reward_sft": sft_reward,
        "reward": sampled_rewards(result.model, phrase=phrase, **run.sampling(reward))[0],
    }


@contextmanager
def stage(name: str, seconds: dict):
    """Announce a stage and record its wall-clock seconds (training + measurements)."""
    print(f"\n=== {name} ===", flush=True)
    start = time.monotonic()
    yield
    seconds[name] = round(time.monotonic() - start, 1)


def run_pipeline(args: argparse.Namespace) -> dict:
    """Data, then pretrain -> SFT -> reward -> PPO, and DPO and CoH from the SFT model."""
    overrides = {
        k: v for k, v in vars(args).items() if k in Budget.__dataclass_fields__ and v is not None
    }
    budget = replace(TINY if args.tiny else FULL, **overrides)
    out_dir, seconds = Path(args.out_dir), {}
    prepare_out_dir(out_dir, keep=args.base)
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {"seed": args.seed, "corruption": args.corruption}
    with stage("data", seconds):
        files = write_demo_data(
            out_dir / "data",
            budget.num_sft,
            budget.num_comparisons,
            budget.num_prompts,
            budget.num_test,
            seed=args.seed,
            corruption=args.corruption,
        )
    with stage("pretrain", seconds):
        base, results["pretrain"] = get_base(args, budget, out_dir)
        base_model, tokenizer = load_base(base, log=lambda *_: None)
    limit = base_model.config.max_seq_len  # every sequence must fit the base model's context
    budget = replace(budget, max_len=min(budget.max_len, limit or budget.max_len))
    results["budget"] = asdict(budget)
    run = Run(args, budget, files, out_dir, tokenizer)
    with stage("sft", seconds):
        sft, results["sft"] = run_sft(run, base, base_model)
    sft_dir, sft_model = str(sft.checkpoint), sft.model.eval()
    with stage("reward", seconds):
        reward, results["reward"] = run_reward(run, sft_dir)
    with stage("ppo", seconds):
        ppo_model, results["ppo"] = run_ppo(run, sft_dir, sft_model, reward)
    with stage("dpo", seconds):
        sft_reward = results["ppo"]["reward_before"]
        _, results["dpo"] = run_dpo(run, sft_dir, sft_model, reward, sft_reward)
    with stage("coh", seconds):
        coh, results["coh"] = run_coh(run, sft_dir, sft_model, reward, sft_reward)
        records = read_sft(files["sft_test"])[:3]
        models = {"sft": sft_model, "ppo": ppo_model}
        results["samples"] = sample_answers(
            records, models, coh.model, tokenizer, budget.max_response, args.seed
        )
    results["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    return results


# ----------------------------------------------------------------------------- the report

TABLE_ROWS = (
    # stage, metric, value as a function of its stage's numbers, key of the seconds column
    (
        "pretrain",
        "validation bits per character ({source})",
        lambda r: f"{r['valid_bpc']:.3f}",
        "pretrain",
    ),
    (
        "SFT",
        "response loss, nats/token: base → SFT ({steps} steps)",
        lambda r: f"{r['loss_before']:.3f} → {r['loss_after']:.3f}",
        "sft",
    ),
    (
        "reward",
        "pairwise accuracy ({pairs} pairs, {steps} steps)",
        lambda r: f"{r['accuracy']:.3f}",
        "reward",
    ),
    (
        "PPO",
        "reward of sampled responses [1]: SFT → PPO ({test_prompts} prompts; {episodes} episodes)",
        lambda r: f"{r['reward_before']:.3f} → {r['reward_after']:.3f}",
        "ppo",
    ),
    ("PPO", "KL(PPO ‖ SFT) on those responses, nats/response", lambda r: f"{r['kl']:.3f}", None),
    (
        "PPO",
        "training rollouts: reward, first → last of {updates} updates (KL at the last)",
        lambda r: (
            f"{r['rollout_reward_first']:.3f} → {r['rollout_reward_last']:.3f} "
            f"({r['rollout_kl_last']:.3f})"
        ),
        None,
    ),
    (
        "DPO",
        "implicit-reward preference accuracy [2] ({steps} steps)",
        lambda r: f"{r['implicit_reward_accuracy']:.3f}",
        "dpo",
    ),
    (
        "DPO",
        "likelihood preference accuracy [3]: SFT → DPO",
        lambda r: f"{r['likelihood_accuracy_sft']:.3f} → {r['likelihood_accuracy']:.3f}",
        None,
    ),
    (
        "DPO",
        "reward of sampled responses [1]: SFT → DPO",
        lambda r: f"{r['reward_sft']:.3f} → {r['reward']:.3f}",
        None,
    ),
    (
        "CoH",
        "likelihood preference accuracy after the positive phrase [4]: SFT → CoH ({steps} steps)",
        lambda r: f"{r['likelihood_accuracy_sft']:.3f} → {r['likelihood_accuracy']:.3f}",
        "coh",
    ),
    (
        "CoH",
        "reward of sampled responses [1], CoH's sampled after the positive phrase: SFT → CoH",
        lambda r: f"{r['reward_sft']:.3f} → {r['reward']:.3f}",
        None,
    ),
)
STAGE_KEYS = {
    "pretrain": "pretrain",
    "SFT": "sft",
    "reward": "reward",
    "PPO": "ppo",
    "DPO": "dpo",
    "CoH": "coh",
}
FOOTNOTES = (
    "[1] reward-model score of one response per held-out prompt, sampled at temperature 1 with "
    "the same seed from each policy.",
    "[2] share of held-out pairs with β(log π − log π_ref) higher for chosen than rejected "
    "(π_ref: the SFT model).",
    "[3] share of held-out pairs whose chosen response has the higher mean log-probability per "
    "response token (EOS included) given the prompt; a tie counts as wrong.",
    "[4] as [3], but each response follows the prompt and the CoH positive phrase, as in CoH "
    "training; the SFT model is measured the same way.",
)


def table(results: dict) -> str:
    """The Markdown table of `results`, with the footnotes that define its metrics."""
    seconds = results["seconds"]
    lines = ["| stage | metric (held-out data) | value | seconds |", "| --- | --- | --- | ---: |"]
    for name, metric, value, timed in TABLE_ROWS:
        numbers = results[STAGE_KEYS[name]]
        took = seconds[timed] if timed else ""
        lines.append(f"| {name} | {metric.format(**numbers)} | {value(numbers)} | {took} |")
    lines += [
        "",
        f"Total {seconds['total']:.0f} s. Held out: {results['budget']['num_test']} verses from "
        "Acts 22 to Revelation, the part of the corpus pretraining leaves out. Rejected responses: "
        f"{results['corruption']} (see examples/demo_data.py).",
        *FOOTNOTES,
    ]
    return "\n".join(lines)


def save_plot(curve: list[dict], path: Path) -> Optional[Path]:
    """Mean reward and KL per PPO update as a PNG; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]): skipping the PPO plot")
        return None
    updates = [c["update"] for c in curve]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(updates, [c["reward"] for c in curve], marker="o")
    top.set_ylabel("mean reward")
    top.set_title("PPO on 'finish the verse': training rollouts")
    bottom.plot(updates, [c["kl"] for c in curve], marker="o", color="tab:red")
    bottom.set_ylabel("KL to SFT (nats/response)")
    bottom.set_xlabel("PPO update")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    f = FULL
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""budgets of the full run, with the seconds each stage took (training and
measurements) under --threads 1 on 2 cores shared with another job (2 idle cores: about half):
  pretrain: {f.pretrain_minutes:g} minutes, only when --base does not exist
  SFT: {f.sft_steps} steps of {f.batch_size} examples, lr 3e-4 (130 s)
  reward: {f.reward_steps} steps of {f.batch_size} pairs, LoRA, lr 1e-3 (110 s)
  PPO: {f.ppo_episodes} episodes, an update per {f.ppo_update},
       responses <= {f.max_response} tokens (110 s)
  DPO: {f.dpo_steps} steps of {f.batch_size} pairs, beta 0.1, lr 1e-5 (135 s)
  CoH: {f.coh_steps} steps of {f.batch_size} "pn" sequences, lr 1e-4 (125 s)
In all about 10 minutes on 2 idle cores without a checkpoint (pretraining included), 6 with
one; --tiny: well under a minute.""",
    )
    add = parser.add_argument
    add(
        "--out-dir",
        default="runs/demo",
        help=(
            "where data, checkpoints, results.json, results.md and ppo_curves.png go "
            "(default: %(default)s)"
        ),
    )
    add(
        "--base",
        default=None,
        help=(
            "pretrained checkpoint to start from (default: checkpoints/pretrain, what "
            "`python train.py` writes; none with --tiny); when the path does not exist, the "
            "demo pretrains one"
        ),
    )
    add(
        "--pretrain-minutes",
        type=float,
        help=f"pretraining budget without a base (default {f.pretrain_minutes:g})",
    )
    add("--sft-steps", type=int, help=f"SFT steps (default {f.sft_steps})")
    add("--reward-steps", type=int, help=f"reward-model steps (default {f.reward_steps})")
    add("--ppo-episodes", type=int, help=f"PPO episodes (default {f.ppo_episodes})")
    add("--dpo-steps", type=int, help=f"DPO steps (default {f.dpo_steps})")
    add("--coh-steps", type=int, help=f"CoH steps (default {f.coh_steps})")
    add(
        "--corruption",
        default="shuffle",
        choices=CORRUPTIONS,
        help="how rejected responses are made (see demo_data.py; default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of the data, every stage and the measurements")
    add(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice, one per core; 1 with --tiny)",
    )
    add(
        "--tiny",
        action="store_true",
        help="a tiny model and a few steps per stage: checks that everything runs",
    )
    args = parser.parse_args(argv)
    if args.base is None and not args.tiny:
        args.base = "checkpoints/pretrain"
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None or args.tiny:
        torch.set_num_threads(args.threads or 1)  # a tiny model gains nothing from more
    results = run_pipeline(args)
    out_dir = Path(args.out_dir)
    plot = save_plot(results["ppo"]["curve"], out_dir / "ppo_curves.png")
    results["plot"] = str(plot) if plot else None
    report = table(results)
    (out_dir / "results.md").write_text(report + "\n", encoding="utf-8")
    (out_dir / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    for sample in results["samples"]:
        print(f"\n{sample['prompt']!r}")
        print("\n".join(f"  {k:>5}: {sample[k]!r}" for k in ("truth", "sft", "ppo", "coh")))
    written = ", ".join(
        str(p) for p in (out_dir / "results.json", out_dir / "results.md", plot) if p
    )
    print(f"\n{report}\n\nwrote {written}")
    return results


if __name__ == "__main__":
    main()
