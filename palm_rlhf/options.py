"""Command-line options generated from config dataclasses, so every option has one source:
the dataclass field (its default and its `help` metadata)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Optional, Union


def option(default: Any, help: str, **metadata) -> Any:
    """A dataclass field with command-line help text (metadata: `choices`, `required`,
    `positional` for an argument given without its --flag, `cli=False` for an API-only one,
    `aliases`: older names still accepted, as keywords and as flags)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _base_type(annotation):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(annotation) is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _own_fields_first(cls) -> list:
    """A stage's own options before the ones it inherits (e.g. RunOptions' seed, cpu...)."""

    def defined_in(field) -> int:
        definers = [
            i for i, k in enumerate(cls.__mro__) if field.name in getattr(k, "__annotations__", {})
        ]
        return max(definers)

    return sorted(dataclasses.fields(cls), key=defined_in)


def json_object(text: str):
    """A dict option on the command line: a JSON object (or 'none')."""
    if text.lower() == "none":
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"max_value\": 1}'")
    return value


def _number_or_none(kind):
    """An Optional[int | float] option's type: a number, or 'none' (made None later)."""

    def parse(text: str):
        return text if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse's error says "invalid float value"
    return parse


def _arg_type(kind, optional: bool):
    if kind is dict:
        return json_object
    if optional and kind in (int, float):
        return _number_or_none(kind)
    return kind if kind in (int, float, str) else str


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    for field in _own_fields_first(cls):
        if not field.metadata.get("cli", True):
            continue
        kind, optional = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        flags = [flag, *("--" + a.replace("_", "-") for a in field.metadata.get("aliases", ()))]
        help_text = field.metadata.get("help", "")
        default = field.default
        if kind is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        if typing.get_origin(kind) is tuple:
            kind = typing.get_args(kind)[0]
            parser.add_argument(
                *flags,
                type=kind,
                nargs="+",
                default=default,
                help=help_text,
                required=field.metadata.get("required", False),
            )
            continue
        choices = field.metadata.get("choices")
        if field.metadata.get("positional"):
            parser.add_argument(field.name, metavar=field.name.upper(), type=str, help=help_text)
            continue
        # saying how to pass no value helps only where the default is a value
        if optional and default is not None and "'none'" not in help_text:
            help_text += " ('none' for no value)"
        parser.add_argument(
            *flags,
            required=field.metadata.get("required", False),
            type=_arg_type(kind, optional),
            default=default,
            choices=choices,
            help=help_text,
        )
    return parser


def dataclass_from_args(cls, args: argparse.Namespace):
    values = {}
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue  # API-only: its default
        value = getattr(args, field.name)
        if isinstance(value, str) and value.lower() == "none":
            value = None
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return cls(**values)


def config_from_args(parser: argparse.ArgumentParser, cls, args: argparse.Namespace):
    """Build the config; a value its validation refuses becomes a usage error, not a traceback."""
    try:
        return dataclass_from_args(cls, args)
    except ValueError as error:
        parser.error(str(error))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description keeps its own line breaks.

    No default is shown for a required option or a positional argument, nor "None" or "" for an
    option off by default (its help says what leaving it out does)."""

    def _get_help_string(self, action):
        if action.required or not action.option_strings or action.default in (None, ""):
            return action.help
        if "default" in (action.help or ""):  # the help states its default in its own words
            return action.help
        if isinstance(action.default, (tuple, list)):  # --lora-targets q k v, as typed
            joined = " ".join(map(str, action.default)) or "none"
            return f"{action.help} (default: {joined})"
        return super()._get_help_string(action)


def config_parser(
    cls, description: str = "", prog: Optional[str] = None
) -> argparse.ArgumentParser:
    """An argument parser with one option per field of the config dataclass `cls`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter, allow_abbrev=False
    )
    return add_dataclass_arguments(parser, cls)


def parse_config(
    cls, argv: Optional[list[str]] = None, description: str = "", prog: Optional[str] = None
):
    parser = config_parser(cls, description, prog)
    return config_from_args(parser, cls, parser.parse_args(argv))
