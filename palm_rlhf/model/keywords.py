"""Constructor keywords declared once, by a config dataclass.

`PaLM(...)` and `RewardModel(...)` take their options as keywords, but the options, their
types and their defaults are the fields of `PaLMConfig` / `RewardConfig`: the signature a
model shows (`inspect.signature`, `help()`) is derived from those fields here, and a call is
bound against it, so a default cannot drift between the model and its saved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Iterable, Optional

from beartype.door import is_bearable

POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def field_parameters(
    cls, names: Optional[Iterable[str]] = None, kind=POSITIONAL, renamed=None
) -> list[inspect.Parameter]:
    """inspect.Parameters for the fields `names` (default: all, in order) of dataclass `cls`,
    with their defaults and resolved annotations. `renamed` maps a parameter's name to the
    field it stands for (a reference keyword spelt otherwise)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = renamed or {}
    params = []
    for name in names if names is not None else fields:
        field = fields[renamed.get(name, name)]
        default = field.default
        if default is dataclasses.MISSING:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(name, kind, default=default, annotation=hints[field.name]))
    return params


def bind_call(owner: str, signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    """The arguments a call passed explicitly (no defaults filled in), by name. An unknown
    keyword, a missing required argument or too many positionals is one TypeError that
    names the problem and, for an unknown keyword, the nearest known ones."""
    known = list(signature.parameters)
    unknown = [name for name in kwargs if name not in signature.parameters]
    if unknown:
        detail = ", ".join(
            f"{name!r}" + (f" (did you mean {close}?)" if close else "")
            for name in unknown
            for close in [difflib.get_close_matches(name, known, n=2)]
        )
        raise TypeError(f"{owner} got unknown keyword(s) {detail}; its options are {known}")
    try:
        return dict(signature.bind(*args, **kwargs).arguments)
    except TypeError as err:
        raise TypeError(f"{owner}{signature}: {err}") from None


def checked_value(owner: str, name: str, value: Any, hint: Any) -> Any:
    """`value` if it fits `hint`, an int converted where a float is annotated (`dropout=0`);
    else a TypeError naming the option."""
    integral = isinstance(value, int) and not isinstance(value, bool)
    if integral and not is_bearable(value, hint) and is_bearable(float(value), hint):
        value = float(value)
    if not is_bearable(value, hint):
        # a class by its name; Optional[float] and the like in full (their __name__ is the
        # bare "Optional")
        shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        raise TypeError(f"{owner}({name}=...) must be {shown}, got {value!r}")
    return value


def checked(owner: str, cls, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (field name -> value) each checked against its field's annotation in `cls`."""
    hints = typing.get_type_hints(cls)
    return {name: checked_value(owner, name, value, hints[name]) for name, value in values.items()}


def pop_option(owner: str, signature: inspect.Signature, values: dict[str, Any], name: str) -> Any:
    """Remove option `name` (one not in the config) from bound `values`: its value, or its
    default from `signature`, checked against its annotation there."""
    param = signature.parameters[name]
    return checked_value(owner, name, values.pop(name, param.default), param.annotation)
