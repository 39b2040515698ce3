"""GRPO side by side: our RLHFTrainer vs TRL's GRPOTrainer on the same toy (issue 20, part 2).

    python benchmarks/bench_trl.py               # 31 steps a side, one process at a time
    python benchmarks/bench_trl.py --steps 4     # a short check of the harness
    python benchmarks/bench_trl.py --precision bf16   # both sides in bf16 mixed precision

The work, identical on both sides (`Setting`): a 16-symbol vocabulary, 64 fixed prompts of 8
random symbols, reward = share of the target symbol among the 24 new tokens (no EOS: every
completion is 24 tokens long), GRPO with 16 prompts x 8 completions per step, one gradient step
per batch of 128 (one iteration, so the sampling policy is the current one), KL coefficient 0,
clip epsilon 0.2, advantages (r - group mean) / group std, token losses averaged per sequence
then over the batch (TRL `loss_type="grpo"` = our `loss_agg_mode="seq-mean-token-mean"`),
AdamW lr 1e-4 constant, gradient clipping at norm 1.0, no entropy bonus, full weights, fp32,
2 threads. `--precision bf16` runs both sides under their Accelerate's bf16 mixed precision
(autocast over fp32 weights, sampling included; TRL `bf16=True`, ours `mixed_precision="bf16"`)
and measures the peak with a bf16 matmul.

Models, random init, matched parameter count: our `PaLM(num_tokens=16, dim=256, depth=4,
heads=8, dim_head=32, init_std=0.02)` and a `LlamaForCausalLM` with one KV head (multi-query),
SwiGLU of inner width 1024, tied embeddings, and one extra vocabulary entry for the EOS a
Hugging Face tokenizer needs (`min_new_tokens=24` keeps it from ever being sampled). Both draw
every weight from normal(0, 0.02) (Llama's `initializer_range`). TRL's side is offline:
the model comes from a config and the tokenizer is built here (a word-level `tokenizers`
model over the 16 symbol names), no hub access (`HF_HUB_OFFLINE=1`).

Each side runs in its own process, one after the other: ours with this interpreter and the
repository on the path, TRL with `.trl-venv` (`trl_env.py`) in isolated mode from a neutral
folder, `palm_rlhf` import blocked. Prompts per step are drawn by each trainer's own sampler
from the same 64. The first step is warm-up; completions/s = 128 * timed steps / their time.
Per phase: sampling (the decode loop), scoring (rewards and the no-grad log-prob passes of
the rollout), update (the rest of the step: the loss's forward, backward and optimiser step).
The machine's limit, measured in the same command: a 2048 x 2048 fp32 matmul (before and
after the two sides, the faster counts) gives the peak; the model FLOPs a step performs are
counted the same way for both sides from their parameter count N (`step_flops`): 2N per token
run through the model for sampling (with a KV cache, which both use, each token once) and 6N
per token for the update's forward and backward. TRL runs every row's prompt; ours runs each
group's prompt once in both phases (`model/shared_prefix.py`), so it performs fewer FLOPs for
the same work. MFU = the FLOPs performed per second / the peak; the floor = the seconds our
step needs at the peak.
Writes benchmarks/results/trl.json (trl-quick.json for --steps below 31; -seedN before .json
for another --seed, -bf16 for bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    steps: int = 31
    warmup_steps: int = 1  # excluded from the timings
    vocab: int = 16
    target: int = 3  # the symbol the reward counts
    num_prompts: int = 64
    prompt_len: int = 8
    completion_len: int = 24
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0
    threads: int = 2
    seed: int = 0
    # both models' projections start from normal(0, init_std): Hugging Face's Llama default
    # (initializer_range), our PaLM's `init_std`; with PyTorch's default init instead, ours
    # learns this toy more slowly per step (0.56 vs 0.77 reward after 7 steps, either seed)
    init_std: float = 0.02
    # "fp32" (the issue's setting) or "bf16": both sides' Accelerate mixed precision (autocast
    # over fp32 weights, the optimiser in fp32), sampling included
    precision: str = "fp32"

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size

    def prompts(self) -> list[list[int]]:
        """The prompt ids both sides train on (ids 1..vocab-1: 0 is our padding value)."""
        rng = random.Random(self.seed)
        return [
            [rng.randrange(1, self.vocab) for _ in range(self.prompt_len)]
            for _ in range(self.num_prompts)
        ]


class PhaseClock:
    """Seconds spent in wrapped callables, per phase name, per step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = defaultdict(float)

    def wrap(self, name: str, fn, when=lambda: True):
        def timed(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start

        return timed

    def close_step(self, seconds: float, reward: float) -> None:
        phases = dict(self.current)
        self.steps.append({"seconds": seconds, "reward": reward, **phases})
        self.current = defaultdict(float)


def summary(setting: Setting, clock: PhaseClock, params: int, extra: dict) -> dict:
    timed = clock.steps[setting.warmup_steps :]
    total = sum(s["seconds"] for s in timed)
    phases = ("sampling", "rollout", "update")
    mean = {p: sum(s.get(p, 0.0) for s in timed) / len(timed) for p in phases}
    split = {
        "sampling": mean["sampling"],
        "scoring": mean["rollout"] - mean["sampling"],  # rewards + no-grad log-prob passes
        "update": mean["update"],
    }
    split["other"] = total / len(timed) - sum(split.values())
    rewards = [s["reward"] for s in clock.steps]
    return {
        "parameters": params,
        "completions_per_s": setting.batch * len(timed) / total,
        "seconds_per_step": total / len(timed),
        "phase_seconds_per_step": {k: round(v, 4) for k, v in split.items()},
        "reward_per_step": rewards,
        "reward_gain": rewards[-1] - rewards[0],
        "steps": clock.steps,
        **extra,
    }


# ----------------------------------------------------------------------------- ours


def run_ours(setting: Setting) -> dict:
    import torch

    torch.set_num_threads(setting.threads)
    torch.manual_seed(setting.seed)
    import palm_rlhf
    from palm_rlhf import PaLM, RLHFTrainer
    from palm_rlhf.rl import rollout as rollout_module

    palm = PaLM(
        num_tokens=setting.vocab, dim=256, depth=4, heads=8, dim_head=32, init_std=setting.init_std
    )

    scored = [0]

    def share_of_target(seq, mask, prompt_mask):
        scored[0] += seq.shape[0]
        response = mask & ~prompt_mask
        hits = ((seq == setting.target) & response).sum(dim=1).float()
        return hits / response.sum(dim=1).clamp(min=1)

    trainer = RLHFTrainer(
        palm=palm,
        reward_model=share_of_target,
        prompt_token_ids=[torch.tensor(p) for p in setting.prompts()],
        algorithm="grpo",
        group_size=setting.group_size,
        rollout_batch_size=setting.batch,
        minibatch_size=setting.batch,  # one gradient step per batch
        epochs=1,
        kl_coef=0.0,
        eps_clip=setting.clip_eps,
        actor_lr=setting.lr,
        max_norm=setting.max_grad_norm,
        beta_s=0.0,  # TRL has no entropy bonus
        loss_agg_mode="seq-mean-token-mean",  # = TRL loss_type="grpo"
        scale_by_std=True,  # = TRL scale_rewards="group"
        actor_lora=False,  # TRL trains full weights
        temperature=1.0,
        seed=setting.seed,
        progress=False,
        mixed_precision="bf16" if setting.precision == "bf16" else "no",
    )
    clock = PhaseClock()
    rollout_module.sample_tokens = clock.wrap("sampling", rollout_module.sample_tokens)
    trainer.rollout = clock.wrap("rollout", trainer.rollout)
    trainer.learn = clock.wrap("update", trainer.learn)
    for _ in range(setting.steps):
        start = time.perf_counter()
        record = trainer.step(setting.batch, max_response_tokens=setting.completion_len)
        clock.close_step(time.perf_counter() - start, record["reward"])
    params = sum(p.numel() for p in palm.parameters())
    return summary(
        setting,
        clock,
        params,
        {
            "library": f"palm_rlhf {palm_rlhf.__version__}",
            "module_file": palm_rlhf.__file__,
            "completions_scored": scored[0],
            # sampling prefills, and the update's forward runs, each group's prompt once
            # (`model/shared_prefix.py`); results before 2026-12-05 lack this: False
            "prompt_once_per_group": True,
        },
    )


# ----------------------------------------------------------------------------- TRL


def run_trl(setting: Setting) -> dict:
    sys.modules["palm_rlhf"] = None  # this side must not see our library
    import torch

    torch.set_num_threads(setting.threads)
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.set_seed(setting.seed)
    names = [f"s{i}" for i in range(setting.vocab)]
    vocab = {name: i for i, name in enumerate(names)} | {"<eos>": setting.vocab}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>"
    )
    config = LlamaConfig(
        vocab_size=setting.vocab + 1,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=setting.init_std,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=setting.vocab,
        pad_token_id=setting.vocab,
    )
    model = LlamaForCausalLM(config).float()
    target = names[setting.target]

    scored = [0]

    def share_of_target(completions, **kwargs):
        scored[0] += len(completions)
        return [c.split().count(target) / max(1, len(c.split())) for c in completions]

    prompts = [" ".join(names[i] for i in row) for row in setting.prompts()]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=setting.batch,
            num_generations=setting.group_size,
            max_completion_length=setting.completion_len,
            generation_kwargs={"min_new_tokens": setting.completion_len},  # never EOS
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            learning_rate=setting.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=setting.max_grad_norm,
            beta=0.0,
            epsilon=setting.clip_eps,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            gradient_accumulation_steps=1,
            max_steps=setting.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=setting.precision == "bf16",
            fp16=False,
            seed=setting.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=share_of_target,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )
        clock = PhaseClock()
        model.generate = clock.wrap("sampling", model.generate)
        trainer._generate_and_score_completions = clock.wrap(
            "rollout", trainer._generate_and_score_completions
        )

        class StepClock(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                seconds = time.perf_counter() - self.start
                clock.current["update"] = seconds - clock.current.get("rollout", 0.0)
                clock.close_step(seconds, float("nan"))

        trainer.add_callback(StepClock())
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        for step, reward in zip(clock.steps, rewards):
            step["reward"] = reward
    params = sum(p.numel() for p in model.parameters())
    return summary(
        setting,
        clock,
        params,
        {
            "library": f"trl {trl.__version__}, transformers {transformers.__version__}",
            "loss_type": "grpo",
            "completions_scored": scored[0],
            "module_file": trl.__file__,
        },
    )


# ----------------------------------------------------------------------------- the driver


def run_side(side: str, setting: Setting) -> dict:
    """One side in a fresh process; its last stdout line is the JSON result."""
    args = ["--worker", side, "--setting", json.dumps(asdict(setting))]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(setting.threads),
        "MKL_NUM_THREADS": str(setting.threads),
    }
    with tempfile.TemporaryDirectory() as neutral:
        if side == "ours":
            cmd, cwd = [sys.executable, str(Path(__file__).resolve()), *args], ROOT
            env["PYTHONPATH"] = str(ROOT)
        else:
            from benchmarks.trl_env import ensure_trl_env

            python = ensure_trl_env(ROOT)
            cmd, cwd = [str(python), "-I", str(Path(__file__).resolve()), *args], neutral
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            env.pop("PYTHONPATH", None)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def step_flops(setting: Setting, params: int, prompt_once_per_group: bool = False) -> dict:
    """Model FLOPs one step performs (PaLM appendix B with N = all parameters): sampling 2N and
    the update 6N per token run through the model: every token of the 16 x 8 sequences, or,
    with `prompt_once_per_group`, each prompt once and every completion. Left out, the same
    for both sides: attention's 12 L H Q T per token (under 2% at 32 tokens) and no-grad
    scoring passes (with beta = 0 and one iteration neither side needs one)."""
    prompts = setting.prompts_per_step if prompt_once_per_group else setting.batch
    tokens = prompts * setting.prompt_len + setting.batch * setting.completion_len
    return {"sampling": 2 * params * tokens, "update": 6 * params * tokens}


def matmul_gflops(threads: int, precision: str = "fp32", size: int = 2048) -> float:
    """Matmul throughput of this machine now in `precision` (median of 10 after 2 warm-ups)."""
    if str(HERE) not in sys.path:  # called before and after the two sides
        sys.path.insert(0, str(HERE))
    import torch
    from _worker import task_matmul

    torch.set_num_threads(threads)
    dtype = "bf16" if precision == "bf16" else "float32"
    args = argparse.Namespace(dtype=dtype, matmul_size=size, warmup=2, iters=10)
    return task_matmul(args)["gflops"]


def limit_lines(setting: Setting, results: dict) -> list[str]:
    """Achieved model FLOP/s and MFU of each side, and what the measured peak allows."""
    peak, sides, precision = results["peak_gflops"], ("ours", "trl"), setting.precision
    flops = {
        side: step_flops(
            setting,
            results[side]["parameters"],
            results[side].get("prompt_once_per_group", False),
        )
        for side in sides
    }
    total = {side: sum(flops[side].values()) / 1e9 for side in sides}  # GFLOP per step
    rate = {side: total[side] / results[side]["seconds_per_step"] for side in sides}
    update = {
        side: flops[side]["update"] / 1e9 / results[side]["phase_seconds_per_step"]["update"]
        for side in sides
    }
    floor = total["ours"] / peak
    ceiling = setting.batch / floor
    trl_rate = results["trl"]["completions_per_s"]
    return [
        f"| model GFLOP/step (2N sampling + 6N update per token run) | {total['ours']:.1f} | "
        f"{total['trl']:.1f} | |",
        f"| model GFLOP/s, whole step | {rate['ours']:.1f} | {rate['trl']:.1f} | |",
        f"| MFU, whole step ({precision} matmul {peak:.1f} GFLOP/s) | {rate['ours'] / peak:.0%} | "
        f"{rate['trl'] / peak:.0%} | |",
        f"| MFU, update phase | {update['ours'] / peak:.0%} | {update['trl'] / peak:.0%} | |",
        "",
        f"At the measured {precision} peak our step needs at least {floor:.3f} s: at most "
        f"{ceiling:.0f} completions/s, {ceiling / trl_rate:.2f}x TRL's rate here. 3x TRL "
        f"({3 * trl_rate:.0f} completions/s) would need {3 * trl_rate / ceiling:.2f}x the "
        f"machine's {precision} matmul peak.",
    ]


def mean_reward(side: dict) -> float:
    """Mean reward of every completion a side sampled (each step scores the same number)."""
    rewards = side["reward_per_step"]
    return sum(rewards) / len(rewards)


def report(setting: Setting, results: dict) -> str:
    ours, theirs = results["ours"], results["trl"]
    lines = [
        f"GRPO, {setting.prompts_per_step} prompts x {setting.group_size}, {setting.steps} steps "
        f"({setting.warmup_steps} warm-up), {setting.threads} threads, {setting.precision}",
        f"| | ours ({ours['parameters']:,} params) "
        f"| TRL ({theirs['parameters']:,} params) | ratio |",
        "|---|---|---|---|",
        f"| completions/s | {ours['completions_per_s']:.1f} | {theirs['completions_per_s']:.1f} | "
        f"{ours['completions_per_s'] / theirs['completions_per_s']:.2f}x |",
        f"| s/step | {ours['seconds_per_step']:.3f} | {theirs['seconds_per_step']:.3f} | |",
    ]
    for phase in ("sampling", "scoring", "update", "other"):
        a, b = ours["phase_seconds_per_step"][phase], theirs["phase_seconds_per_step"][phase]
        lines.append(f"| {phase} s/step | {a:.3f} | {b:.3f} | |")
    lines.append(
        f"| reward gain, step 1 -> {setting.steps} | {ours['reward_gain']:+.3f} | "
        f"{theirs['reward_gain']:+.3f} | |"
    )
    mean = {side: mean_reward(results[side]) for side in ("ours", "trl")}
    lines.append(
        f"| mean reward per completion, all {setting.steps} steps | {mean['ours']:.3f} | "
        f"{mean['trl']:.3f} | {mean['ours'] / mean['trl']:.3f}x |"
    )
    if "peak_gflops" in results:  # measured since 2026-12-03 evening
        lines += limit_lines(setting, results)
    lines.append("")
    lines.append("reward per step:")
    for side in ("ours", "trl"):
        lines.append(
            f"  {side:4} " + " ".join(f"{r:.3f}" for r in results[side]["reward_per_step"])
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Setting.steps)
    parser.add_argument("--threads", type=int, default=Setting.threads)
    parser.add_argument("--seed", type=int, default=Setting.seed)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=Setting.precision)
    parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setting = Setting(**json.loads(args.setting))
        result = run_ours(setting) if args.worker == "ours" else run_trl(setting)
        print(json.dumps(result))
        return result
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")
    sys.path.insert(0, str(ROOT))
    from benchmarks.provenance import provenance  # not at the top: the TRL worker cannot see it

    setting = Setting(
        steps=args.steps, threads=args.threads, seed=args.seed, precision=args.precision
    )
    results = {"setting": asdict(setting), "provenance": provenance(setting.threads)}
    results["load_start"] = os.getloadavg()
    peaks = [matmul_gflops(setting.threads, setting.precision)]
    for side in ("ours", "trl"):  # one process at a time
        print(f"running {side} (load {os.getloadavg()[0]:.2f})", flush=True)
        results[side] = run_side(side, setting)
    peaks.append(matmul_gflops(setting.threads, setting.precision))
    results["matmul_gflops_before_after"] = peaks
    results["peak_gflops"] = max(peaks)
    results["load_end"] = os.getloadavg()
    for side in ("ours", "trl"):  # both did the same work
        if results[side]["completions_scored"] != setting.steps * setting.batch:
            raise SystemExit(f"{side} scored {results[side]['completions_scored']} completions")
    results["ratio"] = results["ours"]["completions_per_s"] / results["trl"]["completions_per_s"]
    name = "trl.json" if args.steps >= Setting.steps else "trl-quick.json"
    if args.seed != Setting.seed:
        name = name.replace(".json", f"-seed{args.seed}.json")
    if args.precision != Setting.precision:
        name = name.replace(".json", f"-{args.precision}.json")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(json.dumps(results, indent=1) + "\n")
    print(report(setting, results))
    print(f"load {results['load_start']} -> {results['load_end']}; wrote results/{name}")
    return results


if __name__ == "__main__":
    main()
