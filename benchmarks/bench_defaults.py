"""Does RLHFTrainer learn with its DEFAULT hyperparameters? The toy task of issue #10.

Reward = share of one target token among 16 in the response; prompts of 4 tokens, 20 new
tokens, 16 rollouts per update, 30 updates, top-k-2 sampling (the rule both libraries were
compared under). Prints the mean reward of 256 fresh rollouts before and after, and the KL
(nats per response) of the last update, for two seeds.

    python benchmarks/bench_defaults.py            # ~1 minute on 2 cores
    python benchmarks/bench_defaults.py --demo runs/demo   # ~4 minutes, see below

`--demo DIR` reruns the PPO stage of `examples/pipeline_demo.py` (its settings: 768 episodes,
an update per 32, responses <= 88 tokens, learning rates 1e-3) from the SFT policy and reward
model a finished demo run left in DIR: with LoRA's A initialised by fan-in (before), as now,
and as now at the default learning rates (1e-4); it prints the training rollouts' reward
(first -> last update) and KL for each.

Both write what they print, with the commit and machine, to benchmarks/results/defaults.json
(defaults-demo.json with --demo); docs/results.md shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf import PaLM, RLHFTrainer  # noqa: E402
from palm_rlhf.model import lora  # noqa: E402
from palm_rlhf.rl.ppo.stage import PPOStageConfig, train_ppo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

TARGET = 3


def reward(seq, mask, prompt_mask):
    response = mask & ~prompt_mask
    hits = ((seq == TARGET) & response).float().sum(-1)
    return hits / response.float().sum(-1).clamp(min=1)


def run(seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    palm = PaLM(num_tokens=16, dim=64, depth=2, heads=4, dim_head=16)
    prompts = torch.randint(1, 16, (64, 4))
    trainer = RLHFTrainer(
        palm=palm, reward_model=reward, prompt_token_ids=prompts, top_k=2, progress=False, seed=seed
    )

    def mean_reward() -> float:
        experience, _ = trainer.rollout(*trainer.sample_prompts(256), 20)
        return float(experience.scores.mean())

    before = mean_reward()
    trainer.train(num_rollouts=16 * 30, rollouts_per_update=16, max_response_tokens=20)
    return before, mean_reward(), trainer.history[-1]["kl"]


@contextmanager
def fan_in_lora():
    """LoRA's A initialised like a linear layer's weight (our choice before issue #10)."""
    original = lora.LoRA.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        torch.nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    lora.LoRA.__init__ = init
    try:
        yield
    finally:
        lora.LoRA.__init__ = original


def demo_ppo(demo: Path, out: Path, lr: float):
    """The pipeline demo's PPO stage (`run_ppo` there) from DIR's SFT and reward model."""
    config = PPOStageConfig(
        policy=str(demo / "sft"),
        reward=str(demo / "reward"),
        prompts=str(demo / "data" / "prompts_train.jsonl"),
        out_dir=str(out),
        num_rollouts=768,
        rollouts_per_update=32,
        rollout_batch_size=32,
        minibatch_size=8,
        max_response_tokens=88,
        actor_lr=lr,
        critic_lr=lr,
        kl_coef=0.1,
        missing_eos_penalty=1.0,
        checkpoint_every=10**6,
        seed=0,
        progress=False,
    )
    return train_ppo(config)


def report(name: str, lines: list, settings: dict) -> None:
    """Print a finished line and rewrite results/NAME with every line so far."""
    print(lines[-1], flush=True)
    text = "\n".join(lines)
    record = {"provenance": provenance(), "settings": settings, "markdown": text}
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")


def main_demo(demo: Path, rows: str) -> None:
    lines = [
        "| LoRA A init | learning rates | rollout reward, first -> last | KL at the last | s |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    print("\n".join(lines))
    runs = {
        "before": ("fan-in (before)", fan_in_lora, 1e-3),
        "now": ("N(0, 1) (now)", nullcontext, 1e-3),
        "before-defaults": ("fan-in (before)", fan_in_lora, PPOStageConfig.actor_lr),
        "defaults": ("N(0, 1) (now)", nullcontext, PPOStageConfig.actor_lr),
    }
    for key in rows.split(","):
        name, init, lr = runs[key]
        start = time.time()
        with tempfile.TemporaryDirectory() as out, init():
            result = demo_ppo(demo, Path(out), lr)
        lines.append(
            f"| {name} | {lr:g} | {result.reward_before:.3f} -> {result.reward_after:.3f} "
            f"({result.reward_after - result.reward_before:+.3f}) | {result.kl:.2f} | "
            f"{time.time() - start:.0f} |"
        )
        report("defaults-demo.json", lines, {"demo": str(demo), "rows": rows})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a finished pipeline_demo.py --out-dir")
    parser.add_argument(
        "--rows",
        default="before,now,before-defaults,defaults",
        help="with --demo: which runs (before: fan-in A at the demo's lr 1e-3; now: N(0, 1) at "
        "1e-3; before-defaults, defaults: the same at the default learning rates)",
    )
    args = parser.parse_args()
    if args.demo is not None:
        main_demo(args.demo, args.rows)
        raise SystemExit
    torch.set_num_threads(1)
    lines = []
    for seed in (0, 1):
        start = time.time()
        before, after, kl = run(seed)
        lines.append(
            f"- seed {seed}: reward {before:.3f} -> {after:.3f} ({after - before:+.3f}), "
            f"KL {kl:.2f} nats/response, {time.time() - start:.0f} s"
        )
        report("defaults.json", lines, {"seeds": [0, 1]})
