"""The label file: append-only JSON Lines, each label durable before its request returns.

Every label is one complete line written with a single `write` to a file opened for
appending, then fsynced; so a kill -9 at any moment leaves whole lines only, and a label the
page saw acknowledged survives a power cut too. A line cut short (a crash mid-write, never
acknowledged) is dropped when the file is opened again.

Undo cannot append (a tombstone line would be a record the reward reader refuses), so it
rewrites the file without that label's line: a temporary file beside it, fsynced, then
`os.replace` — atomic, so a crash leaves the old file or the new one, never a mix. Callers
hold one lock around appends and rewrites.

Each line carries the item's `"id"` (and `"mode"`); the reward reader ignores keys it does not
know, and a restart reads the ids to know what is already labelled. Lines without an id (your
own records, if `--out` names an existing data file) are kept untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from beartype import beartype


class LabelFileError(ValueError):
    """The --out file cannot be continued (not JSON Lines, or labels of another mode)."""


def _fsync_directory(path: Path) -> None:
    """Make a new or renamed directory entry durable (a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class JsonlLog:
    """One append-only JSON Lines file whose tracked lines carry an ``"id"``."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict = {}  # id -> record, in file order
        self.repaired = False  # a torn last line was dropped on opening
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                os.fsync(f.fileno())
            data, self.repaired = data[: data.rfind(b"\n") + 1], True
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise LabelFileError(
                    f"{self.path}:{number}: not a JSON line; is --out a label file?"
                ) from None
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                self.records[record["id"]] = record

    def append(self, record: dict) -> None:
        """Write one line and fsync it; returns only once it is on disk."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:  # one write in practice; a short write is finished, never dropped
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)
        self.records[record["id"]] = record

    def remove(self, item_id: str) -> None:
        """Rewrite the file without the line of `item_id`, atomically."""
        kept = []
        for line in self.path.read_bytes().splitlines(keepends=True):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = None
            if not (isinstance(record, dict) and record.get("id") == item_id):
                kept.append(line)
        temporary = self.path.with_name(f".{self.path.name}.undo.tmp")
        with open(temporary, "wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        _fsync_directory(self.path.parent)
        self.records.pop(item_id, None)


def ties_path(out: Path) -> Path:
    """Arena ties live beside the label file: labels.jsonl -> labels.ties.jsonl."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".ties.jsonl")


class LabelStore:
    """The label file (records `palm-rlhf reward` reads) and, in arena mode, the ties file
    (a tie prefers neither response, so it is no comparison record; it is kept for the win
    rate and so that a restart does not show the item again)."""

    @beartype
    def __init__(self, out, mode: str):
        self.mode = mode
        Path(out).parent.mkdir(parents=True, exist_ok=True)  # --out runs/labels.jsonl just works
        self.labels = JsonlLog(Path(out))
        self.ties: Optional[JsonlLog] = JsonlLog(ties_path(Path(out))) if mode == "arena" else None
        for record in self.labels.records.values():
            if record.get("mode", mode) != mode:
                raise LabelFileError(
                    f"{out} holds {record['mode']} labels; write {mode} labels to another --out"
                )

    def done_ids(self) -> set:
        return set(self.labels.records) | set(self.ties.records if self.ties else ())

    def append(self, record: dict, tie: bool = False) -> None:
        (self.ties if tie else self.labels).append(record)

    def remove(self, item_id: str) -> None:
        for log in (self.labels, self.ties):
            if log is not None and item_id in log.records:
                log.remove(item_id)

    def arena_counts(self) -> dict:
        """Wins of each checkpoint and ties, over every label in the files."""
        winners = [r.get("winner") for r in self.labels.records.values()]
        ties = len(self.ties.records) if self.ties else 0
        return {"a": winners.count("a"), "b": winners.count("b"), "ties": ties}
