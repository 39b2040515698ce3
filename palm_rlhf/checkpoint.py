"""Checkpoint I/O: atomic files, safetensors + JSON, step folders. It knows no model class.

Every training run, PPO included, writes its resumable state as `root/step-XXXXXXX/` folders
(the optimizer step, or the PPO update, zero-padded to 7 digits) with `root/latest` naming the
newest complete one; the oldest are pruned to `keep_last`. RLHFTrainer once named them
`update-XXXXXXX`: such folders still load, resume and count in pruning.

Tensors go to safetensors files with string metadata (a model's config travels there, so a
file alone can rebuild its model). Other state (optimizer, scheduler, RNG) goes through
`torch.save` and is read back with `weights_only=True`, which refuses to execute pickled code.
Every write lands in a temporary file in the target folder, is fsynced, then renamed into
place (`os.replace` is atomic on POSIX and Windows), so a crash mid-write leaves the previous
file intact and no half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

PathLike = Union[str, Path]
WEIGHTS_NAME = "model.safetensors"


@contextmanager
def atomic_path(path: PathLike):
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe, or made for another model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named (also a FileNotFoundError, as callers expect)."""


def weights_path(path: PathLike) -> Path:
    """Where to write weights: a folder (or a name without a suffix) gets `model.safetensors`."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() or path.suffix == "" else path


def find_weights(path: PathLike) -> Path:
    """The weights file to read for `path`: a file itself, a checkpoint folder's
    `model.safetensors`, a run folder's newest complete checkpoint (its `latest`), or else its
    `final/model.safetensors`."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None and (latest / WEIGHTS_NAME).is_file():
        return latest / WEIGHTS_NAME
    if (path / "final" / WEIGHTS_NAME).is_file():  # a finished run that saves its model apart
        return path / "final" / WEIGHTS_NAME  # (palm-rlhf ppo: out_dir/final, out_dir/trainer)
    raise CheckpointNotFoundError(
        f"no model at {path}: expected a .safetensors file, a checkpoint folder holding "
        f"{WEIGHTS_NAME}, or a run folder with a 'latest' checkpoint (or a 'final' folder)"
    )


def save_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from err


def save_tensors(
    path: PathLike, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None
):
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file fully (tensors and metadata) or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path), device=device)
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    return tensors, header.get("__metadata__", {}) or {}


def save_state(path: PathLike, state: Any) -> None:
    """Save tensors/containers of tensors and plain values (optimizer state, RNG) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: PathLike) -> Any:
    """Load a `save_state` file without executing pickled code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types; all mean "refused"
        raise CheckpointError(
            f"refusing to load {path}: it is corrupt, truncated, or holds objects that would "
            f"run code when unpickled ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err


# ------------------------------------------------------------------------ checkpoint folders


def save_checkpoint_dir(
    root: PathLike, name: str, writers: dict[str, Callable[[Path], None]]
) -> Path:
    """Write a checkpoint folder `root/name` atomically and point `root/latest` at it.

    Each writer gets the path of its file inside a temporary folder; the folder is renamed into
    place only when all of them succeeded, then the `latest` pointer is replaced atomically. A
    run killed at any moment leaves the previous checkpoint and pointer intact.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        for filename, write in writers.items():
            write(staging / filename)
        # re-saving a name: move the old folder aside first (os.replace cannot replace a
        # non-empty folder); `latest` names unique step folders, so it never sees the gap
        stale = root / f".{name}.old"
        if final.exists():
            os.replace(final, stale)
        os.replace(staging, final)
        if stale.exists():
            remove_tree(stale)
    finally:
        if staging.exists():
            remove_tree(staging)
    atomic_write_bytes(root / "latest", name.encode())
    # staging folders left by a run killed mid-write are never read; clear them (one writer)
    for leftover in root.glob(".*.tmp"):
        if leftover.is_dir():
            remove_tree(leftover)
    return final


STEP_PREFIX = "step-"
LEGACY_PREFIXES = ("update-",)  # RLHFTrainer's folder names before there was one scheme


def step_folder_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps (or PPO updates)."""
    return f"{STEP_PREFIX}{step:07d}"


def step_folders(root: PathLike) -> list[Path]:
    """The checkpoint folders under `root`, oldest first (by number; old names included)."""
    found = []
    for prefix in (STEP_PREFIX, *LEGACY_PREFIXES):
        for folder in Path(root).glob(f"{prefix}*"):
            number = folder.name[len(prefix) :]
            if folder.is_dir() and number.isdigit():
                found.append((int(number), folder.name, folder))
    return [folder for *_, folder in sorted(found)]


def prune_checkpoints(root: PathLike, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoint folders (0: keep every one); the one
    `latest` names is never removed."""
    current = latest_checkpoint(root)
    folders = step_folders(root)
    for folder in folders[:-keep_last] if keep_last > 0 else []:
        if folder != current:
            remove_tree(folder)


def latest_checkpoint(root: PathLike) -> Optional[Path]:
    """The folder named by `root/latest`, or None when there is no complete checkpoint."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    folder = Path(root) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
