"""PaLM weights on disk: one safetensors file holding the tensors, the config and the LoRA
scope specs in its metadata, so a file alone rebuilds its model. The model's `save`, `load` and
`from_pretrained` call these; `checkpoint.py` below does the byte-level I/O.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import Tensor

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    find_weights,
    load_tensors,
    save_tensors,
    weights_path,
)
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.reference_weights import (
    ReferenceCheckpointError,
    checkpoint_format,
    map_reference_state_dict,
    palm_from_reference_state_dict,
    read_torch_state_dict,
    reference_architecture,
    reference_lora_specs,
)
from palm_rlhf.model.reward_config import FORMAT as REWARD_FORMAT


class WrongCheckpointKindError(CheckpointError):
    """A checkpoint of another kind (e.g. a reward model) where a PaLM was expected."""


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
    path = weights_path(path)
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

    path = find_weights(path)
    tensors, metadata = load_tensors(path, device=map_location)
    if metadata.get("format") == REWARD_FORMAT:
        raise WrongCheckpointKindError(
            f"{path} is a reward-model checkpoint; pass the policy/base checkpoint (a pretrain, "
            "SFT, DPO, CoH or PPO model) here, or load it with RewardModel.from_pretrained"
        )
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
    """Load into an existing model. Everything is checked before any weight is touched; the
    model takes on the file's rotary positions and attention scale (`FUNCTION_FIELDS`).

    A file written by the reference project (`torch.save(palm.state_dict())`, read with
    `weights_only=True`) is mapped to this model's names first; see `reference_weights.py`."""
    path = find_weights(path)  # resolved once: a file, a checkpoint folder, a run folder
    if checkpoint_format(path) == "torch":
        return _load_reference_into(model, path)
    path, config, specs, adapters_only, tensors = _read_palm_file(
        path, map_location=str(model.device)
    )
    mismatched = model.config.shape_mismatch(config.to_dict())
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
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[key].shape)}"
            )
    model.use_config(model.config.with_function_of(config.to_dict()))
    model.load_state_dict(tensors, strict=False)


def _load_reference_into(model, path: Path) -> None:
    """A reference state dict into `model`, which takes on the file's architecture switches
    (`reference_architecture`: xPos, the attention scale) so its logits are the reference's;
    a model of another shape is refused, naming the keywords to pass."""
    state = read_torch_state_dict(path)
    try:
        config = reference_architecture(model.config, state)
    except ReferenceCheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    mapped = map_reference_state_dict(state, config)
    _add_missing_scopes(model, reference_lora_specs(state))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise CheckpointError(f"{path}: the reference state dict lacks {missing[:5]}")
    model.use_config(config)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=False)


def palm_from_pretrained(cls, path: PathLike, map_location: str = "cpu"):
    """A new `cls` (PaLM) built from the config stored in the file, with its weights; a
    reference-project `.pt` state dict is read safely and mapped (xPos rotary, as it was)."""
    path = find_weights(path)
    if checkpoint_format(path) == "torch":
        return palm_from_reference_state_dict(cls, read_torch_state_dict(path)).to(map_location)
    path, config, specs, adapters_only, _ = _read_palm_file(path, map_location)
    if adapters_only:
        raise CheckpointError(
            f"{path} holds LoRA adapters only; load it into its base model with palm.load()"
        )
    model = cls.from_config(config).to(map_location)
    load_palm_into(model, path)
    return model
