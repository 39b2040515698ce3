"""The `palm-rlhf` command: one subcommand per stage, each a thin shell over a library function.

palm-rlhf pretrain --help

A user's mistake (a missing file, a malformed record, the wrong kind of checkpoint, a value a
config refuses) is one line on stderr, `palm-rlhf <stage>: <message>`, and exit code 2; any
other exception is a bug and keeps its traceback. `palm-rlhf --debug <stage>` shows the
traceback of user errors too. Ctrl-C (or SIGTERM) during training saves a checkpoint at the
end of the current step, says where, and exits with 128 + the signal number (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from palm_rlhf.options import HelpFormatter, add_dataclass_arguments, config_from_args, option


@dataclass
class TokenizerConfig:
    text: tuple[str, ...] = option(
        (), "text files (.txt or .gz) to learn the vocabulary from", required=True
    )
    out_dir: str = option("tokenizer", "folder for tokenizer.model + tokenizer.json")
    vocab_size: int = option(8000, "vocabulary size (ids 0-3: pad, unk, bos, eos; bytes fall back)")
    model_type: str = option("bpe", "sentencepiece algorithm", choices=("bpe", "unigram"))


def _tokenizer(config: TokenizerConfig):
    from palm_rlhf.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer.train(
        list(config.text),
        config.out_dir,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
    )
    print(
        f"trained {tokenizer!r} into {config.out_dir}; pass --tokenizer {config.out_dir} "
        "to pretrain"
    )


def run_pretrain(config):
    """Pretrain, then print the final validation numbers and the checkpoint folder."""
    from palm_rlhf.train.pretrain import pretrain

    result = pretrain(config)
    print(
        f"final valid loss {result.valid_loss:.4f}, bpc {result.valid_bpc:.4f}; "
        f"checkpoint {result.checkpoint}"
    )


def _stages() -> dict[str, tuple[str, type, Callable]]:
    """name -> (help, config dataclass, function that runs the stage on a config)."""
    from palm_rlhf.chat import ChatConfig, SampleConfig, run_chat, run_sample
    from palm_rlhf.label.config import LabelConfig
    from palm_rlhf.label.stage import run_label
    from palm_rlhf.plot import PlotConfig, run_plot
    from palm_rlhf.rl.ppo.stage import PPOStageConfig, run_ppo
    from palm_rlhf.train.coh import CoHConfig, run_coh
    from palm_rlhf.train.dpo import DPOConfig, run_dpo
    from palm_rlhf.train.pretrain import PretrainConfig
    from palm_rlhf.train.reward import RewardTrainConfig, run_reward
    from palm_rlhf.train.sft import SFTConfig, run_sft

    return {
        "tokenizer": (
            "train a sentencepiece tokenizer on your text, offline",
            TokenizerConfig,
            _tokenizer,
        ),
        "pretrain": (
            "pretrain a byte-level PaLM on enwik8 or the embedded corpus",
            PretrainConfig,
            run_pretrain,
        ),
        "sft": (
            "supervised fine-tuning on prompt/response pairs (loss on responses only)",
            SFTConfig,
            run_sft,
        ),
        "reward": ("train a reward model on comparisons or ratings", RewardTrainConfig, run_reward),
        "ppo": (
            "PPO (or --algorithm grpo|rloo|reinforce++|flowrl|tpo) against a reward model, "
            "with a KL penalty to the starting policy",
            PPOStageConfig,
            run_ppo,
        ),
        "dpo": (
            "direct preference optimisation on comparisons (no reward model)",
            DPOConfig,
            run_dpo,
        ),
        "coh": ("Chain of Hindsight fine-tuning on comparisons", CoHConfig, run_coh),
        "sample": ("print continuations of a prompt", SampleConfig, run_sample),
        "chat": (
            "talk to a model in the terminal (answers stream; Ctrl-D quits)",
            ChatConfig,
            run_chat,
        ),
        "label": ("serve a page where you rank, rate or compare samples", LabelConfig, run_label),
        "plot": (
            "draw a run's training curves (its history.jsonl) to a PNG",
            PlotConfig,
            run_plot,
        ),
    }


DEBUG_HELP = "show the full traceback of an error instead of one line"


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean the user's input is wrong (one line), not that the code is."""
    from palm_rlhf.checkpoint import CheckpointError
    from palm_rlhf.train.step import NonFiniteLossError

    # RecordError and TokenizerMismatchError are ValueErrors; CheckpointNotFoundError is both
    return (OSError, ValueError, CheckpointError, NonFiniteLossError)


def data_warnings_as_lines(prog: str) -> Callable:
    """A `warnings.showwarning` that prints a data warning (lines skipped by --on-error skip) as
    one line, `<prog>: warning: <message>`, instead of Python's file:line and source line,
    which read like a crash; other warnings keep their usual form."""
    from palm_rlhf.data.records import RecordWarning

    usual = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RecordWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            usual(message, category, filename, lineno, file, line)

    return show


def run_command(prog: str, run: Callable, config, debug: bool = False) -> int:
    """Run a stage; a user error or an interrupt becomes one line on stderr and an exit code.
    A multi-process run leaves here with that code (`release_processes`)."""
    from palm_rlhf.train.accelerator import release_processes

    code = _run_stage(prog, run, config, debug)
    release_processes(exit_code=code)
    return code


def _run_stage(prog: str, run: Callable, config, debug: bool) -> int:
    from palm_rlhf.train.stopping import TrainingInterrupted

    try:
        with warnings.catch_warnings():
            warnings.showwarning = data_warnings_as_lines(prog)
            run(config)
    except TrainingInterrupted as interrupted:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as error:
        if debug:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"{prog}: {message}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a misspelt --epoch must not be taken as --epochs
    parser = argparse.ArgumentParser(
        prog="palm-rlhf", description="PaLM + RLHF, stage by stage.", allow_abbrev=False
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, config_cls, run) in _stages().items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )
        add_dataclass_arguments(sub, config_cls)
        # also accepted after the stage name; SUPPRESS keeps the top-level value otherwise
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sub.set_defaults(run=run, config_cls=config_cls, subparser=sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the stage's own usage and error, not the top-level one
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config = config_from_args(args.subparser, args.config_cls, args)
    return run_command(f"palm-rlhf {args.command}", args.run, config, args.debug)


if __name__ == "__main__":
    sys.exit(main())
