"""The exact command that continues a run, printed when a run stops early (Ctrl-C, SIGTERM) or
is resumed after it finished: the program as it was started, every option whose value is not
its default (so a resumed run has the same model, data and schedule), `--out-dir` always, and
`--resume latest`. `python train.py --resume latest` alone would resume the default run."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path


def program(command: str) -> str:
    """How this process was started: `python train.py` for a script (`accelerate launch
    train.py` under several processes), else `palm-rlhf <command>`."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    script = sys.argv[0] if sys.argv else ""
    name = Path(script).name
    in_package = Path(script).parent.name == "palm_rlhf"
    if name.endswith(".py") and not in_package and "pytest" not in script:
        return f"{'accelerate launch' if several else 'python'} {shlex.quote(script)}"
    return f"{'accelerate launch -m palm_rlhf' if several else 'palm-rlhf'} {command}"


def _value(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(shlex.quote(str(v)) for v in value) or "none"
    if isinstance(value, dict):
        return shlex.quote(json.dumps(value))
    return "none" if value is None else shlex.quote(str(value))


def option_flags(config, **replace) -> list[str]:
    """`config` as command-line flags: the fields that differ from their defaults (and those
    in `replace`, with the values given there), `--out-dir` always."""
    flags = []
    for field in dataclasses.fields(config):
        value = replace.get(field.name, getattr(config, field.name))
        default = field.default
        if field.metadata.get("positional"):
            continue
        if field.name not in replace and field.name != "out_dir" and value == default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {_value(value)}")
    return flags


def continue_command(config, command: str) -> str:
    """The command line that resumes `config`'s run from its latest checkpoint."""
    flags = option_flags(config, resume="latest")
    where = [f for f in flags if f.startswith(("--out-dir ", "--resume "))]  # last, to be seen
    return " ".join([program(command), *(f for f in flags if f not in where), *where])
