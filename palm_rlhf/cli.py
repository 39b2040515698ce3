"""The `palm-rlhf` command: one subcommand per stage, each a thin shell over a library function.

palm-rlhf pretrain --help
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from palm_rlhf.cli_args import add_dataclass_arguments, dataclass_from_args


def _pretrain(args):
    from palm_rlhf.pretrain import PretrainConfig, pretrain

    result = pretrain(dataclass_from_args(PretrainConfig, args))
    print(
        f"final valid loss {result.valid_loss:.4f}, bpc {result.valid_bpc:.4f}; checkpoint {result.checkpoint}"
    )


def _stages() -> dict[str, tuple[str, type, Callable]]:
    from palm_rlhf.pretrain import PretrainConfig

    return {
        "pretrain": (
            "pretrain a byte-level PaLM on enwik8 or the embedded corpus",
            PretrainConfig,
            _pretrain,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm-rlhf", description="PaLM + RLHF, stage by stage.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, config_cls, run) in _stages().items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_dataclass_arguments(sub, config_cls)
        sub.set_defaults(run=run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
