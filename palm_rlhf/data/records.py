"""JSON Lines readers for the alignment data: SFT pairs, ratings and comparisons.

One JSON object per line, in a ``.jsonl`` file or a gzip-compressed one (detected by its magic
bytes, whatever the name). Formats:

- SFT: ``{"prompt": str, "response": str}``
- ratings: ``{"prompt": str, "response": str, "rating": int}`` with 1 <= rating <= num_bins
  (a human scale: `collate_ratings` turns rating r into the class index r - 1)
- comparisons, any of:
    - a pair ``{"prompt": str, "chosen": str, "rejected": str}``
    - a ranked list ``{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}`` where
      ``ranking[i]`` is the rank of ``responses[i]``, 0 = best, equal ranks are ties
    - an HH-RLHF record ``{"chosen": dialogue, "rejected": dialogue}`` with no ``"prompt"``: the
      prompt is the shared prefix of both dialogues up to and including its last
      ``"\\n\\nAssistant:"``; each response is what follows, less one leading space.

Rules shared by every reader, each one a decision:

- Line numbers are 1-based and count every physical line, blank ones included, so that
  ``path:line`` in an error opens the right line in an editor.
- Blank (whitespace-only) lines are skipped; a file with no records at all is an error.
- Bytes are decoded line by line, so invalid UTF-8 is reported with its line number. A UTF-8
  byte-order mark at the start of the file is ignored.
- Keys not named above are ignored (datasets often carry ids and metadata).
- Prompts must contain a non-whitespace character. SFT and rating responses must too.
  Comparison responses may be empty: in HH-RLHF, "say nothing" is sometimes the chosen answer
  (4 of the 2,312 harmless-base test pairs), and an empty response is still scored on its EOS.
- Integers (ratings, ranks) may be written ``3`` or ``3.0`` (pandas writes integer columns
  with missing values as floats); ``3.5``, ``"3"`` and ``true`` are errors.
- A chosen/rejected pair whose two responses are identical is an error (it states a preference
  of a response over itself); ties in ranked lists are allowed, all-tied lists are not.
- In an HH-RLHF record whose dialogues diverge before their final assistant turn, the
  response is everything after the split, several turns long; it is kept, not rejected.

Every reader takes ``on_error``: ``"raise"`` (default) raises :class:`RecordError` at the first
malformed line; ``"skip"`` drops malformed lines and emits one :class:`RecordWarning`, one line
naming how many were dropped and the first few ``path:line: reason``s (the command line prints
it as that line, not as a Python warning). A line of another kind (a ratings record given to
the comparisons reader) says which kind it looks like.
"""

import gzip
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Optional, TypeVar

from beartype import beartype

from palm_rlhf.checkpoint import PathLike

T = TypeVar("T")

HH_ASSISTANT = "\n\nAssistant:"
_ON_ERROR = ("raise", "skip")
_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


class RecordError(ValueError):
    """A malformed data file; the message starts with ``path:line:`` where one applies."""


class RecordWarning(UserWarning):
    """Malformed lines were skipped (``on_error="skip"``), or prompts cut to fit max_len."""


class SFTRecord(NamedTuple):
    prompt: str
    response: str


class RatingRecord(NamedTuple):
    prompt: str
    response: str
    rating: int  # 1..num_bins, a human scale; the reward model's class index is rating - 1


class ComparisonRecord(NamedTuple):
    prompt: str
    responses: list[str]  # K >= 2 responses to one prompt
    ranking: list[int]  # ranking[i] = rank of responses[i]; 0 = best; equal ranks tie


class _LineError(Exception):
    """What is wrong with one line; the caller adds ``path:line``."""


# ---------------------------------------------------------------------------------------------
# the shared per-line loop


def _open_bytes(path: PathLike):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _iter_raw_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for every non-blank line (1-based numbers)."""
    line_number = 0
    with _open_bytes(path) as f:
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise RecordError(f"{path}:{line_number + 1}: corrupt gzip data ({e})") from e
            if not raw:
                return
            line_number += 1
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            if raw.strip():
                yield line_number, raw


def _parse_object(raw: bytes) -> dict:
    """One line's bytes -> the JSON object on it, or :class:`_LineError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineError(
            f"invalid UTF-8 at byte offset {e.start} of the line ({raw[e.start : e.start + 4]!r})"
        ) from None
    # without its line break, so an error at the end of the line ("Expecting ',' delimiter" in
    # a line cut short) is at its real column, not at column 1 of a line after it
    text = text.rstrip("\r\n")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {_json_type(obj)}")
    return obj


_ARRAY_HINT = (
    "expected JSON Lines (one object per line); this file is a JSON array — convert with "
    "`jq -c '.[]' FILE > FILE.jsonl`"
)


def _parse_line(raw: bytes, first: bool) -> dict:
    """`_parse_object`, with a hint when the first line opens a JSON array (a .json file)."""
    try:
        return _parse_object(raw)
    except _LineError as e:
        if first and raw.lstrip().startswith(b"["):
            raise _LineError(f"{e}; {_ARRAY_HINT}") from None
        raise


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this module and beartype's wrappers, so a
    warning names the user's line, not `<@beartype(...)>`."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith("<@beartype")
    ):
        frame, level = frame.f_back, level + 1
    return level


@beartype
def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each record of a JSON Lines file (``.gz`` or not).

    Blank lines are skipped but counted; any other line that is not a JSON object in UTF-8
    raises :class:`RecordError` with ``path:line``.
    """
    first = True
    for line_number, raw in _iter_raw_lines(path):
        try:
            yield line_number, _parse_line(raw, first)
        except _LineError as e:
            raise RecordError(f"{path}:{line_number}: {e}") from None
        first = False


SHOWN_SKIPS = 5  # malformed lines a skip summary names; it counts them all


def skip_summary(skipped: list[str], what: str, path: PathLike, why: str = "") -> str:
    """One line: how many `what` records of `path` were skipped (`why`), and the first few
    ``path:line: reason``s."""
    noun = "record" if len(skipped) == 1 else "records"
    more = len(skipped) - SHOWN_SKIPS
    return (
        f"skipped {len(skipped)} {what} {noun} in {path}{why}: "
        + "; ".join(skipped[:SHOWN_SKIPS])
        + (f"; and {more} more" if more > 0 else "")
    )


# the kinds of record, by the keys that give one away (checked in this order), and who reads it
_KINDS = {
    "rating": (("rating",), "a ratings record: palm-rlhf reward --kind ratings reads it"),
    "comparison": (
        ("chosen", "rejected", "responses", "ranking"),
        "a comparison record: palm-rlhf reward --kind comparisons, dpo and coh read it",
    ),
    "SFT": (("response",), "an SFT record: palm-rlhf sft reads it"),
}


def kind_hint(obj: dict, what: str) -> str:
    """`"; this line looks like <a kind of record>: <who reads it>"` when a record of another kind
    failed the reader of `what` records (a ratings file given to the comparisons reader)."""
    kind = next((k for k, (keys, _) in _KINDS.items() if any(key in obj for key in keys)), None)
    if kind is None or kind == what:
        return ""
    return f"; this line looks like {_KINDS[kind][1]}"


def _read(path: PathLike, parse: Callable[[dict], T], on_error: str, what: str) -> list[T]:
    """Parse every line with ``parse``; apply the ``on_error`` policy; refuse an empty result."""
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    records, skipped = [], []
    for line_number, raw in _iter_raw_lines(path):
        obj = None
        try:
            obj = _parse_line(raw, first=not (records or skipped))
            records.append(parse(obj))
        except _LineError as e:
            hint = kind_hint(obj, what) if obj is not None else ""
            message = f"{path}:{line_number}: {e}{hint}"
            if on_error == "raise":
                raise RecordError(message) from None
            skipped.append(message)
    if skipped:
        warnings.warn(
            skip_summary(skipped, f"malformed {what}", path),
            RecordWarning,
            stacklevel=_caller_stacklevel(),
        )
    if not records:
        detail = f" ({len(skipped)} malformed line(s) skipped)" if skipped else ""
        raise RecordError(f"{path}: no {what} records found{detail}")
    return records


# ---------------------------------------------------------------------------------------------
# field checks (each raises _LineError naming the key)


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _get(obj: dict, key: str) -> Any:
    if key not in obj:
        raise _LineError(f'missing key "{key}"')
    return obj[key]


def _check_str(value: Any, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _LineError(f"{name} must be a string, not {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise _LineError(f"{name} is empty")
    return value


def _check_int(value: Any, name: str) -> int:
    """An integer, written ``3`` or ``3.0``; booleans, strings and ``3.5`` are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _LineError(f"{name} must be an integer, not {_json_type(value)}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise _LineError(f"{name} must be an integer, not {value!r}")
        value = int(value)
    return value


def _str_field(obj: dict, key: str, allow_empty: bool = False) -> str:
    return _check_str(_get(obj, key), f'key "{key}"', allow_empty)


def _list_field(obj: dict, key: str) -> list:
    value = _get(obj, key)
    if not isinstance(value, list):
        raise _LineError(f'key "{key}" must be an array, not {_json_type(value)}')
    return value


# ---------------------------------------------------------------------------------------------
# per-format parsing


def _parse_sft(obj: dict) -> SFTRecord:
    return SFTRecord(_str_field(obj, "prompt"), _str_field(obj, "response"))


def _rating_parser(num_bins: Optional[int]) -> Callable[[dict], RatingRecord]:
    def parse(obj: dict) -> RatingRecord:
        prompt, response = _str_field(obj, "prompt"), _str_field(obj, "response")
        rating = _check_int(_get(obj, "rating"), 'key "rating"')
        if rating < 1 or (num_bins is not None and rating > num_bins):
            allowed = f"1..{num_bins}" if num_bins is not None else ">= 1"
            raise _LineError(f"rating {rating} out of range (must be {allowed})")
        return RatingRecord(prompt, response, rating)

    return parse


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix cut just after its last ``"\\n\\nAssistant:"``, so
    it holds every earlier turn; each response is the rest of its dialogue, less one leading
    space. Raises :class:`ValueError` when the dialogues share no ``"\\n\\nAssistant:"``.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"the two dialogues share no prefix ending in {HH_ASSISTANT!r}")
    end = cut + len(HH_ASSISTANT)
    responses = [text[end:] for text in (chosen, rejected)]
    responses = [r[1:] if r.startswith(" ") else r for r in responses]
    return chosen[:end], responses[0], responses[1]


def _parse_comparison(obj: dict) -> ComparisonRecord:
    has_pair, has_list = "chosen" in obj or "rejected" in obj, "responses" in obj
    if has_pair and has_list:
        raise _LineError('record has both "chosen"/"rejected" and "responses"; use one form')

    if has_list:
        prompt = _str_field(obj, "prompt")
        responses = _list_field(obj, "responses")
        ranking = _list_field(obj, "ranking")
        if len(responses) < 2:
            raise _LineError(f'"responses" must hold at least 2 items, got {len(responses)}')
        if len(ranking) != len(responses):
            raise _LineError(
                f'"ranking" has {len(ranking)} items but "responses" has {len(responses)}'
            )
        responses = [_check_str(r, f'"responses"[{i}]', True) for i, r in enumerate(responses)]
        ranking = [_check_int(r, f'"ranking"[{i}]') for i, r in enumerate(ranking)]
        if min(ranking) < 0:
            raise _LineError(f'"ranking" must hold ranks >= 0 (0 = best), got {ranking}')
        if len(set(ranking)) == 1:
            raise _LineError(f'all responses are tied ("ranking" {ranking}): no preference')
        return ComparisonRecord(prompt, responses, ranking)

    chosen = _str_field(obj, "chosen", allow_empty=True)
    rejected = _str_field(obj, "rejected", allow_empty=True)
    if "prompt" in obj:
        prompt = _str_field(obj, "prompt")
    else:  # HH-RLHF: two full dialogues
        try:
            prompt, chosen, rejected = split_hh_dialogues(chosen, rejected)
        except ValueError as e:
            raise _LineError(f"HH-RLHF record without a prompt: {e}") from None
    if chosen == rejected:
        raise _LineError("chosen and rejected responses are identical")
    return ComparisonRecord(prompt, [chosen, rejected], [0, 1])


# ---------------------------------------------------------------------------------------------
# public readers


@beartype
def read_sft(path: PathLike, on_error: str = "raise") -> list[SFTRecord]:
    """Read ``{"prompt", "response"}`` records (see the module docstring for the rules)."""
    return _read(path, _parse_sft, on_error, "SFT")


@beartype
def read_ratings(
    path: PathLike, num_bins: Optional[int] = None, on_error: str = "raise"
) -> list[RatingRecord]:
    """Read ``{"prompt", "response", "rating"}`` records, rating in ``1..num_bins``.

    With ``num_bins=None`` only ``rating >= 1`` is checked; pass the reward model's number of
    bins to catch out-of-range ratings here rather than as an index error in training.
    """
    if num_bins is not None and num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    return _read(path, _rating_parser(num_bins), on_error, "rating")


@beartype
def read_comparisons(path: PathLike, on_error: str = "raise") -> list[ComparisonRecord]:
    """Read comparison records: pairs, ranked lists and HH-RLHF dialogues, mixed freely.

    Pairs become ``ComparisonRecord(prompt, [chosen, rejected], [0, 1])``.
    """
    return _read(path, _parse_comparison, on_error, "comparison")


def _parse_prompt(obj: dict) -> str:
    if "prompt" in obj:
        return _str_field(obj, "prompt")
    if "chosen" in obj and "rejected" in obj:  # HH-RLHF dialogues: the shared prefix
        return _parse_comparison(obj).prompt
    raise _LineError('missing key "prompt" (or an HH-RLHF "chosen"/"rejected" pair)')


@beartype
def read_prompts(path: PathLike, on_error: str = "raise") -> list[str]:
    """Read the prompts of any of the formats above (PPO rolls out from them): the "prompt" of
    each record, or the shared prefix of an HH-RLHF pair."""
    return _read(path, _parse_prompt, on_error, "prompt")
