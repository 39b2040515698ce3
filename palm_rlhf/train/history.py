"""Training curves: every stage's history as JSON Lines in its run folder, and optionally in
experiment trackers (TensorBoard, Weights & Biases, ... through Accelerate's `log_with`).

out_dir/history.jsonl holds one JSON object per log step ({"step": 10, "loss": 2.31, ...}),
appended and flushed line by line, so `tail -f` and `palm-rlhf plot` see a run in progress. The
same records travel inside every checkpoint; resuming rewrites the file from the checkpoint's
records first, so the file never holds steps the resumed run is about to repeat.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Optional

from palm_rlhf.checkpoint import PathLike, atomic_write_bytes

HISTORY_NAME = "history.jsonl"
# Accelerate's tracker names -> the packages that provide them (any one will do)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
}


def check_trackers(log_with) -> Optional[list]:
    """`--log-with` ("tensorboard", "wandb,tensorboard", ...) as a list of tracker names, or
    ValueError with one line saying which package to install. A list (Accelerate's own form,
    which may hold tracker objects) is passed through as it is."""
    if isinstance(log_with, (list, tuple)):
        return list(log_with)
    if log_with is None or not log_with.strip():
        return None
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ValueError(
                f"--log-with {name}: unknown tracker; choose from {', '.join(TRACKER_PACKAGES)}"
            )
        packages = TRACKER_PACKAGES[name]
        if not any(importlib.util.find_spec(package) for package in packages):
            raise ValueError(
                f"--log-with {name} needs the {packages[0]} package: pip install {packages[0]}"
            )
    return names


def tracker_config(config: dict) -> dict:
    """A config as trackers' hyperparameter tables take it: numbers, strings and booleans only
    (TensorBoard refuses None and tuples), anything else as its str."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=False) + "\n"


class HistoryLog:
    """Where a training loop puts one record per log step: `history` (the list saved in its
    checkpoints), `out_dir/history.jsonl` (main process) and the Accelerate trackers."""

    def __init__(
        self,
        accelerator,
        out_dir: Optional[PathLike],
        history: list,
        stage: str,
        config: Optional[dict] = None,
    ):
        self.accelerator, self.history = accelerator, history
        self.trackers = bool(getattr(accelerator, "log_with", None))
        self.path = None
        self._file = None
        if out_dir is not None and accelerator.is_main_process:
            self.path = Path(out_dir) / HISTORY_NAME
            atomic_write_bytes(self.path, "".join(map(_line, history)).encode())
            self._file = open(self.path, "a", encoding="utf-8")
        if self.trackers:
            accelerator.init_trackers(stage, config=tracker_config(config or {}))

    def append(self, record: dict) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(_line(record))
            self._file.flush()
        if self.trackers:
            numbers = {
                k: v
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self.accelerator.log(numbers, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.trackers:
            self.accelerator.end_training()
            self.trackers = False

    def __enter__(self) -> HistoryLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_history(path: PathLike, history: list) -> Path:
    """Write a whole history (e.g. a PPO trainer's) as JSON Lines, atomically."""
    path = Path(path)
    atomic_write_bytes(path, "".join(map(_line, history)).encode())
    return path


def read_history(path: PathLike) -> list[dict]:
    """The records of a history.jsonl (or of a run folder holding one); a torn last line (a run
    killed mid-write) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {HISTORY_NAME} at {path}: is this a run's out_dir?")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
    return records


# counters, not metrics: the x axis is "step" (trainers) or "update" (PPO's history)
COUNTERS = ("step", "update", "episodes")


def numeric_series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} for every numeric key but the counters; NaN/Inf points are
    dropped. The step is the record's "step", else its "update", else its position."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(records):
        step = record.get("step", record.get("update", index + 1))
        for key, value in record.items():
            if key in COUNTERS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series
