"""Atomic, self-describing, pickle-free checkpoints.

Weights go to safetensors files whose string metadata carries the model config (and LoRA scope
specs), so a file alone rebuilds its model. Other state (optimizer, scheduler, RNG) goes through
`torch.save` and is read back with `weights_only=True`, which refuses to execute pickled code.
Every write lands in a temporary file in the target directory and is renamed into place, so a
crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from palm_rlhf.fileio import atomic_path, atomic_write_bytes

PathLike = Union[str, Path]
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe, or made for another model."""


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


# ------------------------------------------------------------------------ PaLM weights


def _weights_path(path: PathLike) -> Path:
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() or path.suffix == "" else path


def palm_state(model, scopes: Optional[tuple[str, ...]] = None) -> dict[str, Tensor]:
    """The model's tensors; with `scopes`, only those LoRA scopes (an adapter-only checkpoint)."""
    state = model.state_dict()
    if scopes is None:
        return state
    prefixes = tuple(f"finetune_modules.{scope}." for scope in scopes)
    for scope in scopes:
        model._scope_layers(scope)  # raises a clear KeyError for an unknown scope
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def save_palm(model, path: PathLike, scopes: Optional[tuple[str, ...]] = None) -> Path:
    path = _weights_path(path)
    kept = model.lora_specs if scopes is None else {s: model.lora_specs[s] for s in scopes}
    metadata = {
        "format": "palm_rlhf",
        "palm_config": model.config.to_json(),
        "lora_specs": json.dumps(kept),
        "adapters_only": json.dumps(scopes is not None),
    }
    save_tensors(path, palm_state(model, scopes), metadata)
    return path


def _read_palm_file(path: PathLike, map_location: str = "cpu"):
    from palm_rlhf.config import PaLMConfig

    path = _weights_path(path)
    tensors, metadata = load_tensors(path, device=map_location)
    if "palm_config" not in metadata:
        raise CheckpointError(
            f"{path} holds no palm_config metadata: not a palm_rlhf PaLM checkpoint"
        )
    try:
        config = PaLMConfig.from_json(metadata["palm_config"])
        specs = json.loads(metadata.get("lora_specs", "{}"))
        adapters_only = json.loads(metadata.get("adapters_only", "false"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path} has invalid metadata: {err}") from err
    return path, config, specs, adapters_only, tensors


def _add_missing_scopes(model, specs: dict) -> None:
    for scope, spec in specs.items():
        if scope not in model.finetune_modules:
            model.add_finetune_params(
                scope, lora_r=spec["r"], lora_alpha=spec["alpha"], targets=tuple(spec["targets"])
            )


def load_palm_into(model, path: PathLike, strict: bool = True) -> None:
    """Load into an existing model. Everything is checked before any weight is touched."""
    path, config, specs, adapters_only, tensors = _read_palm_file(
        path, map_location=str(model.device)
    )
    mismatched = {
        key: (value, getattr(model.config, key))
        for key, value in config.to_dict().items()
        if key in ("num_tokens", "dim", "depth", "dim_head", "heads", "ff_mult", "qk_rmsnorm")
        and getattr(model.config, key) != value
    }
    if mismatched:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in mismatched.items())
        raise CheckpointError(f"{path} was saved for another model config ({detail})")
    _add_missing_scopes(model, specs)
    expected = model.state_dict()
    if adapters_only:
        expected = {k: v for k, v in expected.items() if k.startswith("finetune_modules.")}
        expected = {k: v for k, v in expected.items() if k.split(".")[1] in specs}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for key, tensor in tensors.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def palm_from_pretrained(path: PathLike, map_location: str = "cpu"):
    from palm_rlhf.palm import PaLM

    path, config, specs, adapters_only, _ = _read_palm_file(path, map_location)
    if adapters_only:
        raise CheckpointError(
            f"{path} holds LoRA adapters only; load it into its base model with palm.load()"
        )
    model = PaLM.from_config(config).to(map_location)
    load_palm_into(model, path)
    return model


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
            _remove_tree(stale)
    finally:
        if staging.exists():
            _remove_tree(staging)
    atomic_write_bytes(root / "latest", name.encode())
    # staging folders left by a run killed mid-write are never read; clear them (one writer)
    for leftover in root.glob(".*.tmp"):
        if leftover.is_dir():
            _remove_tree(leftover)
    return final


def latest_checkpoint(root: PathLike) -> Optional[Path]:
    """The folder named by `root/latest`, or None when there is no complete checkpoint."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    folder = Path(root) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
