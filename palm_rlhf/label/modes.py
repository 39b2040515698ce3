"""What a valid label is in each mode, and the record it becomes.

- rank: ``{"ranking": [r_0, ..., r_{K-1}]}``, ``r_i`` the rank of response i (0 = best), a
  permutation of 0..K-1 -> ``{"prompt", "responses", "ranking"}``
- rate: ``{"rating": r}``, 1 <= r <= scale -> ``{"prompt", "response", "rating"}``
- arena: ``{"choice": "left" | "right" | "tie"}`` -> ``{"prompt", "chosen", "rejected"}`` with
  ``"winner": "a" | "b"`` naming the checkpoint; a tie (or a choice between two identical
  texts, which the reader refuses as a preference) goes to the ties file instead.

Every record also carries the item ``"id"`` and ``"mode"``, keys the reward reader ignores.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from palm_rlhf.label.items import Item

CHOICES = ("left", "right", "tie")


class LabelError(Exception):
    """A request the server refuses; `status` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Outcome(NamedTuple):
    record: dict
    tie: bool  # arena: written to the ties file, not the label file


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelError(400, f"{name} must be an integer, not {type(value).__name__}")
    return value


def _field(body: dict, key: str) -> Any:
    if key not in body:
        raise LabelError(400, f'missing key "{key}"')
    return body[key]


def make_record(mode: str, body: dict, item: Item, scale: int) -> Outcome:
    """Check the label in `body` against `item`; the record to write, or LabelError (422 for a
    well-typed value that is not a valid label)."""
    spec, base = item.spec, {"id": item.spec.id, "mode": mode}
    if mode == "rank":
        ranking = _field(body, "ranking")
        if not isinstance(ranking, list):
            raise LabelError(400, f'"ranking" must be an array, not {type(ranking).__name__}')
        ranking = [_integer(r, f'"ranking"[{i}]') for i, r in enumerate(ranking)]
        if sorted(ranking) != list(range(len(item.responses))):
            raise LabelError(
                422,
                f'"ranking" {ranking} is not a permutation of 0..{len(item.responses) - 1} '
                "(ranking[i] is the rank of response i, 0 = best)",
            )
        record = {"prompt": spec.prompt, "responses": item.responses, "ranking": ranking}
        return Outcome({**record, **base}, False)
    if mode == "rate":
        rating = _integer(_field(body, "rating"), '"rating"')
        if not 1 <= rating <= scale:
            raise LabelError(422, f'"rating" {rating} is outside the scale 1..{scale}')
        record = {"prompt": spec.prompt, "response": item.responses[0], "rating": rating}
        return Outcome({**record, **base}, False)
    choice = _field(body, "choice")
    if choice not in CHOICES:
        raise LabelError(
            422 if isinstance(choice, str) else 400,
            f'"choice" must be one of {CHOICES}, not {choice!r}',
        )
    left, right = item.responses
    if choice == "tie" or left == right:
        texts = dict(zip(item.sources, item.responses))
        tie = {"prompt": spec.prompt, "a": texts["a"], "b": texts["b"], "winner": "tie"}
        return Outcome({**tie, **base}, True)
    won = 0 if choice == "left" else 1
    record = {
        "prompt": spec.prompt,
        "chosen": item.responses[won],
        "rejected": item.responses[1 - won],
    }
    return Outcome({**record, **base, "winner": item.sources[won]}, False)
