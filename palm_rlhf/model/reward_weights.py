"""RewardModel weights on disk: one safetensors file holding the head, the prompt/response
embeddings, the LoRA scope (or the whole fine-tuned PaLM) and the RewardConfig in its metadata;
and reward models saved by the reference project (`torch.save(state_dict)`, read safely with
`weights_only=True` and mapped). The model's `save`/`load`/`from_pretrained` call these."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    find_weights,
    load_tensors,
    save_tensors,
    weights_path,
)
from palm_rlhf.model.config import PaLMConfig
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reference_weights import (
    ReferenceCheckpointError,
    checkpoint_format,
    palm_from_reference_state_dict,
    read_torch_state_dict,
    reference_architecture,
    split_reference_reward_state,
)
from palm_rlhf.model.reward_config import FORMAT, FORMAT_VERSION, STRUCTURAL, RewardConfig


def base_fingerprint(palm: PaLM) -> str:
    """A short hash of the base's token embeddings: adapters loaded onto another base warn."""
    weight = palm.token_emb.weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


def save_reward(model, path: PathLike) -> Path:
    """Write head, config and adapters (LoRA) or all trained weights, atomically, to one
    safetensors file (a folder gets model.safetensors)."""
    path = weights_path(path)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "reward_config": model.current_config().to_json(),
        "palm_config": model.palm.config.to_json(),
        "base_included": json.dumps(not model.config.freeze_base),
        "base_fingerprint": base_fingerprint(model.palm),
        "base_checkpoint": model.base_checkpoint or "",
        # the base relative to this file too, so folders moved together still find each other
        "base_checkpoint_relative": _relative(model.base_checkpoint, path.parent),
    }
    save_tensors(path, model._owned_tensors(), metadata)
    return path


def load_reward_into(model, path: PathLike):
    """Load a `save`d file into this model, refusing another head, pooling or PaLM shape.
    A reference `.pt` (torch.save of its state_dict) is read safely and mapped instead."""
    path = find_weights(path)  # resolved once: a file, a checkpoint folder, a run folder
    if checkpoint_format(path) == "torch":
        state = read_torch_state_dict(path)
        return load_reference_parts(model, split_reference_reward_state(state))
    path, config, palm_config, metadata, tensors = _read(path, str(model.device))
    diffs = [
        f"{k}: file {getattr(config, k)!r} vs model {getattr(model.config, k)!r}"
        for k in STRUCTURAL
        if getattr(config, k) != getattr(model.config, k)
    ]
    diffs += _palm_diffs(palm_config, model.palm)
    if diffs:
        raise CheckpointError(f"{path} was saved for another reward model ({'; '.join(diffs)})")
    expected = model._owned_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, model expects "
                f"{tuple(expected[key].shape)}"
            )
    same_base = metadata.get("base_fingerprint") == base_fingerprint(model.palm)
    if model.config.freeze_base and not same_base:
        message = "was trained on another base PaLM (its token embeddings differ)"
        warnings.warn(f"{path} {message}; its adapters and head may not fit", stacklevel=2)
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
    model.base_checkpoint = metadata.get("base_checkpoint") or model.base_checkpoint
    return model


def reward_from_pretrained(
    cls, path: PathLike, palm: Optional[PaLM] = None, map_location: str = "cpu"
):
    """Rebuild a saved reward model. A LoRA (or head-only) file needs its base: `palm`,
    else the `base_checkpoint` recorded at save time. Full fine-tunes need nothing.

    A reference `.pt` file (palm-rlhf-pytorch's `torch.save(reward_model.state_dict())`)
    holds its whole PaLM: it is read safely and mapped (`from_reference`; `palm` unused)."""
    path = find_weights(path)
    if checkpoint_format(path) == "torch":
        return reward_from_reference(cls, path).to(map_location)
    path, config, palm_config, metadata, _ = _read(path, map_location)
    if palm is not None and _palm_diffs(palm_config, palm):  # before touching the PaLM
        detail = "; ".join(_palm_diffs(palm_config, palm))
        raise CheckpointError(f"{path} was saved for another PaLM ({detail})")
    if palm is None:
        base = find_base(path, metadata)
        if not config.freeze_base:
            palm = PaLM.from_config(palm_config)
        elif base is not None:
            palm = PaLM.from_pretrained(base)
        else:
            recorded = metadata.get("base_checkpoint", "")
            raise CheckpointError(
                f"{path} holds {'LoRA adapters and ' if config.use_lora else ''}a head only, "
                "not its base PaLM"
                + (f", and its recorded base {recorded} is gone" if recorded else "")
                + ": keep the base checkpoint folder beside the reward folder as when it was "
                "trained (or at its recorded place), or in Python pass "
                "palm=PaLM.from_pretrained(<base checkpoint>)"
            )
        palm = palm.to(map_location)  # a given PaLM (maybe shared) stays where it is
    return load_reward_into(cls(palm, **asdict(config)), path)


def reward_from_reference(cls, path: PathLike, pooling: str = "mean_all", **kwargs):
    """A RewardModel holding a reference `.pt` file's weights, pooling as the reference did
    ("mean_all"; pass pooling= to change). Other keywords go to the constructor."""
    parts = split_reference_reward_state(read_torch_state_dict(find_weights(path)))
    palm = palm_from_reference_state_dict(PaLM, parts["palm"])
    scope = parts["scope"]
    found = dict(lora_r=parts["lora_r"], reward_lora_scope=scope)  # None: no LoRA scope
    model = cls(
        palm,
        num_binned_output=parts["num_binned_output"],
        use_lora=scope is not None,
        pooling=pooling,
        **{name: value for name, value in found.items() if value is not None},
        **kwargs,
    )
    return load_reference_parts(model, parts)


def load_reference_parts(model, parts: dict):
    """Copy `split_reference_reward_state` parts in. The base PaLM's weights are copied
    only into a PaLM of our own (use_lora=False); a shared base must already hold them."""
    tensors, own = dict(parts["tensors"]), model.palm.state_dict()
    try:  # the reference PaLM's xPos and attention scale, which the file does not hold
        architecture = reference_architecture(model.palm.config, parts["palm"])
    except ReferenceCheckpointError as err:
        raise CheckpointError(f"the reference reward model's base: {err}") from None
    if model.shares_base and architecture != model.palm.config:
        changed = {
            k: v for k, v in architecture.to_dict().items() if v != getattr(model.palm.config, k)
        }
        keywords = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        raise CheckpointError(
            f"the reference file's base PaLM computes with {keywords}, the shared PaLM "
            f"otherwise: build it with PaLM(..., {keywords}) or palm.load the reference PaLM"
        )
    if model.shares_base:
        differs = [k for k, v in parts["base"].items() if not torch.equal(v.to(own[k]), own[k])]
        if differs:
            raise CheckpointError(
                f"the reference file's base PaLM differs from the shared one ({differs[:3]}); "
                "load never overwrites a shared PaLM: use RewardModel.from_pretrained(path)"
            )
    else:
        tensors.update({f"palm.{k}": v for k, v in parts["base"].items()})
    expected = {**model._owned_tensors(), **{f"palm.{k}": v for k, v in own.items()}}
    lora = {k for k in model._owned_tensors() if k.startswith("lora.")}
    bad = sorted(k for k, v in tensors.items() if k not in expected or v.shape != expected[k].shape)
    if bad or not lora <= set(tensors):
        raise CheckpointError(
            f"the reference file was saved for another reward model: {bad[:3]} do not fit, "
            f"{sorted(lora - set(tensors))[:3]} missing (head, bins, LoRA rank must match)"
        )
    model.palm.use_config(architecture)
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)
    return model


def _palm_diffs(saved: PaLMConfig, palm: PaLM) -> list[str]:
    mismatched = palm.config.shape_mismatch(saved.to_dict())
    return [f"palm.{k}: file {a!r} vs model {b!r}" for k, (a, b) in mismatched.items()]


def _read(path: PathLike, device: str):
    """(path, RewardConfig, PaLMConfig, metadata, tensors) of a reward checkpoint, or raise."""
    path = find_weights(path)
    tensors, metadata = load_tensors(path, device=device)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a reward model checkpoint (format {metadata.get('format')!r})"
        )
    try:
        config = RewardConfig.from_json(metadata["reward_config"])
        palm_config = PaLMConfig.from_json(metadata["palm_config"])
        version = int(metadata.get("format_version", "1"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has invalid metadata: {err}") from err
    if version < 2 and config.sample_from_bins is False:  # v1's False: the expected rating
        config = replace(config, sample_from_bins=None)
    return path, config, palm_config, metadata, tensors


def _relative(base: Optional[str], folder: Path) -> str:
    if not base:
        return ""
    try:
        return os.path.relpath(Path(base).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows): only the absolute path is kept
        return ""


def find_base(path: Path, metadata: dict) -> Optional[Path]:
    """The base PaLM checkpoint a LoRA reward file was trained on: recorded relative to the
    file (checkpoint folders moved together) first, then at its absolute path; None if gone."""
    relative, absolute = metadata.get("base_checkpoint_relative"), metadata.get("base_checkpoint")
    candidates = [path.parent / relative] if relative else []
    candidates += [Path(absolute)] if absolute else []
    return next((c for c in candidates if c.exists()), None)
