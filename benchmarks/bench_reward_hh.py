"""Reward model on real human preferences: Anthropic HH-RLHF, harmless-base test file.

    python train.py --out-dir checkpoints/pretrain                   # a pretrained byte PaLM
    python benchmarks/bench_reward_hh.py --base checkpoints/pretrain  # ~10 CPU minutes
    python benchmarks/bench_reward_hh.py --quick                      # tiny smoke run (seconds)

Trains a LoRA reward model (pairwise Bradley-Terry loss) on the first 2,000 comparison pairs
of ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz and measures held-out accuracy on the
remaining 312: the fraction of pairs whose chosen response scores higher. The number to beat
is the "always prefer the shorter answer" rule, computed here on the same held-out pairs (in
tokens of the same tokenizer; a tie counts half). Responses too long for --max-len are cut at
the end (and prompts from the left) so every held-out pair is scored. Prints a Markdown table
and writes it, with the config and history, to benchmarks/results/reward_hh(-quick).json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import provenance  # noqa: E402
from palm_rlhf.data.records import read_comparisons  # noqa: E402
from palm_rlhf.train.reward import (  # noqa: E402
    RewardTrainConfig,
    fit_records,
    reward_base,
    train_reward_model,
)

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def shorter_answer_accuracy(records, tokenizer) -> float:
    """Accuracy of "the shorter response is better" on (chosen, rejected) pairs; ties count 1/2."""
    wins = 0.0
    for record in records:
        chosen, rejected = (len(tokenizer.encode(r)) for r in record.responses)
        wins += 1.0 if chosen < rejected else 0.5 if chosen == rejected else 0.0
    return wins / len(records)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--base",
        default=None,
        help="pretrained PaLM checkpoint (file, folder or train.py out_dir); "
        "default: a randomly initialised PaLM (development only)",
    )
    add("--data", default=str(DATA), help="HH-RLHF comparisons file")
    add("--num-train", type=int, default=2000, help="first N pairs train, the rest are held out")
    add("--num-valid", type=int, default=None, help="cap on held-out pairs")
    add("--max-len", type=int, default=256, help="tokens per prompt+response sequence")
    add("--batch-size", type=int, default=16, help="pairs per optimizer step")
    add("--epochs", type=float, default=1.0, help="passes over the training pairs")
    add("--max-steps", type=int, default=None, help="stop after this many steps (timing runs)")
    add("--max-minutes", type=float, default=9.0, help="training time limit")
    add("--lr", type=float, default=1e-3, help="peak learning rate")
    add("--use-lora-r", type=int, default=8, help="LoRA rank")
    add("--full-finetune", action="store_true", help="train every weight instead of LoRA + head")
    add("--pooling", default="last", choices=("last", "mean"), help="what the score reads")
    add("--dropout", type=float, default=0.1, help="dropout before the reward head")
    add("--seed", type=int, default=0, help="random seed")
    add(
        "--out-dir",
        default=None,
        help="keep the reward model checkpoints here (default: a "
        "temporary folder, deleted at the end)",
    )
    add("--quick", action="store_true", help="tiny random model, 64 + 32 pairs: a smoke run")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    scratch = tempfile.TemporaryDirectory(prefix="bench-reward-")
    out_dir = args.out_dir or scratch.name
    sizes = dict(dim=256, depth=4, heads=4, dim_head=64)  # train.py's defaults, for a random base
    if args.quick:
        sizes = dict(dim=32, depth=1, heads=2, dim_head=16)
        args.num_train, args.num_valid, args.max_len, args.batch_size = 64, 32, 128, 8
    config = RewardTrainConfig(
        data=args.data,
        kind="comparisons",
        num_train=args.num_train,
        num_valid=args.num_valid,
        base=args.base,
        **sizes,
        max_len=args.max_len,
        long_responses="truncate",
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        lr=args.lr,
        warmup_steps=10,
        use_lora=not args.full_finetune,
        lora_r=args.lora_r,
        pooling=args.pooling,
        dropout=args.dropout,
        out_dir=out_dir,
        seed=args.seed,
        log_every=5,
    )

    _, tokenizer, _ = reward_base(replace(config, out_dir=None))  # the tokenizer the run will use
    held_out = read_comparisons(args.data)[args.num_train :][: args.num_valid]
    baseline = shorter_answer_accuracy(held_out, tokenizer)
    _, cut = fit_records(held_out, tokenizer, args.max_len, "truncate", "comparisons")

    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warnings; counted above
        result = train_reward_model(config)
    minutes = (time.monotonic() - start) / 60

    rows = [
        ("held-out pairs", f"{len(held_out)} ({cut} with a response cut to fit max_len)"),
        ("reward model accuracy", f"{result.metrics['valid_accuracy']:.1%}"),
        ("'shorter answer' baseline", f"{baseline:.1%}"),
        ("'longer answer'", f"{1 - baseline:.1%}"),
        ("training pairs / steps", f"{result.num_train} / {result.history[-1]['step']}"),
        ("final training loss", f"{result.history[-1]['loss']:.4f}"),
        ("held-out ranking loss", f"{result.metrics['valid_loss']:.4f}"),
        ("wall time (train + eval)", f"{minutes:.1f} min on {torch.get_num_threads()} threads"),
        ("base", args.base or f"random PaLM {sizes} (no pretraining)"),
        (
            "model",
            f"{'full fine-tune' if args.full_finetune else f'LoRA r={args.lora_r} + head'}, "
            f"pooling={args.pooling}, max_len={args.max_len}, batch={args.batch_size}, "
            f"lr={args.lr}, epochs={args.epochs}",
        ),
    ]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    report = {
        "provenance": provenance(),
        "table": table,
        "accuracy": result.metrics["valid_accuracy"],
        "shorter_answer_baseline": baseline,
        "minutes": minutes,
        "config": asdict(config),
        "history": result.history,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    name = "reward_hh-quick.json" if args.quick else "reward_hh.json"
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / name).write_text(json.dumps(report, indent=2))
    scratch.cleanup()
    return report


if __name__ == "__main__":
    main()
