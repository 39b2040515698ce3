"""Resumable training checkpoints: what a loop saves, how it loads them back, and resuming.

A training checkpoint is a folder `out_dir/step-XXXXXXX` written atomically by
`save_checkpoint_dir` (the folder scheme: `palm_rlhf/checkpoint.py`):

    model.safetensors     weights + config (only the trained LoRA scopes when adapters_only)
    optimizer.pt          optimizer / scheduler state, read back with weights_only=True (keyed
                          by parameter position, or by name when written by a sharded run;
                          either kind of run resumes either: see train/sharding.py)
    rng.pt                torch (and CUDA) generator states
    trainer_state.json    step counters, the training config, metrics history
    tokenizer.json        the tokenizer the model reads text with (+ its model file)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    latest_checkpoint,
    load_json,
    load_state,
    prune_checkpoints,
    save_checkpoint_dir,
    save_json,
    save_state,
    step_folder_name,
)
from palm_rlhf.data.tokenizer import CONFIG_NAME
from palm_rlhf.train import sharding


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    root: PathLike,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    trainer_state: Optional[dict] = None,
    scopes: Optional[tuple[str, ...]] = None,
    keep_last: int = 2,
    extra_states: Optional[dict[str, Any]] = None,
    extra_files: Optional[dict[str, Any]] = None,
    optimizer_state: Optional[dict] = None,
) -> Path:
    """Write `root/step-XXXXXXX` atomically, point `root/latest` at it, prune old ones.

    `model` is the unwrapped PaLM (or any module with `save(path, scopes=...)`); `scopes` saves
    adapters only. `extra_states` are more tensor dicts (e.g. a value head), saved as .pt files.
    `optimizer_state` replaces `optimizer.state_dict()` (a sharded run's gathered full state).
    """
    writers = {
        "model.safetensors": lambda p: (
            model.save(p) if scopes is None else model.save(p, scopes=scopes)
        ),
        "rng.pt": lambda p: save_state(p, rng_state()),
        "trainer_state.json": lambda p: save_json(p, {"step": step, **(trainer_state or {})}),
    }
    if optimizer is not None:
        states = {"optimizer": optimizer_state or optimizer.state_dict()}
        if scheduler is not None:
            states["scheduler"] = scheduler.state_dict()
        writers["optimizer.pt"] = lambda p: save_state(p, states)
    for filename, state in (extra_states or {}).items():
        writers[filename] = lambda p, state=state: save_state(p, state)
    writers.update(extra_files or {})
    folder = save_checkpoint_dir(root, step_folder_name(step), writers)
    prune_checkpoints(root, keep_last)
    return folder


def checkpoint_on_main(
    accelerator,
    root: PathLike,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int,
    tokenizer,
    template=None,
    before_save=None,
) -> Optional[Path]:
    """The main process writes a training checkpoint with the tokenizer beside the weights;
    every process waits for it. Returns the folder on the main process, None elsewhere.

    A sharded model's full weights and optimizer state are gathered first (every process takes
    part) into `template`, its unsharded twin on the main process, which is what gets written.
    `before_save(module)` runs on the module about to be written (e.g. folding a LoRA scope)."""
    path, optimizer_state = None, None
    if sharding.is_sharded(model):
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
        model = sharding.gather_weights(model, template)
    if accelerator.is_main_process:
        if before_save is not None:
            before_save(model)
        path = save_training_checkpoint(
            root,
            step,
            model,
            optimizer,
            scheduler,
            trainer_state=trainer_state,
            keep_last=keep_last,
            extra_files={CONFIG_NAME: lambda p: tokenizer.save(p.parent)},
            optimizer_state=optimizer_state,
        )
    accelerator.wait_for_everyone()
    return path


@dataclass
class LoopSaver:
    """What a stage's checkpoints are made of, gathered once: `save(step, trainer_state)` is
    `checkpoint_on_main` for it (None when the run has no `out_dir`)."""

    accelerator: Any
    out_dir: Optional[PathLike]
    model: Any
    optimizer: Any
    scheduler: Any
    keep_last: int
    tokenizer: Any
    template: Any = None

    def save(self, step: int, trainer_state: dict, before_save=None) -> Optional[Path]:
        if self.out_dir is None:
            return None
        return checkpoint_on_main(
            self.accelerator,
            self.out_dir,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            trainer_state,
            self.keep_last,
            self.tokenizer,
            self.template,
            before_save=before_save,
        )


def load_training_checkpoint(
    folder: PathLike,
    model=None,
    optimizer=None,
    scheduler=None,
    restore_rng: bool = True,
    template=None,
) -> dict:
    """Restore what `save_training_checkpoint` wrote; returns the trainer_state dict.

    A sharded model (every process calls this) loads the full weights through `template`, its
    unsharded twin on the main process, and its optimizer from the full name-keyed state."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    state = load_json(folder / "trainer_state.json")
    sharded = model is not None and sharding.is_sharded(model)
    if sharded:
        sharding.load_weights(model, template, folder / "model.safetensors")
    elif model is not None:
        model.load(folder / "model.safetensors")
    if optimizer is not None:
        states = load_state(folder / "optimizer.pt")
        # either kind of run resumes either kind of checkpoint (by name or by position)
        if model is not None:
            sharding.load_optimizer_state(model, optimizer, states["optimizer"])
        else:
            optimizer.load_state_dict(states["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(states["scheduler"])
    if restore_rng:
        set_rng_state(load_state(folder / "rng.pt"))
    return state


def resume_folder(root: Optional[PathLike], resume: Union[bool, str, None]) -> Optional[Path]:
    """`resume=True` or 'latest' -> latest checkpoint under root (None if there is none);
    a path -> it."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        return latest_checkpoint(root)
    return Path(resume)


class Resumed(NamedTuple):
    step: int
    history: list
    state: Optional[dict]  # the checkpoint's trainer_state.json
    folder: Optional[Path]


def resume_training(
    out_dir: Optional[PathLike],
    resume: Union[bool, str, None],
    model,
    optimizer=None,
    scheduler=None,
    log=print,
    check=None,
    template=None,
) -> Resumed:
    """Restore `resume` ('latest' under out_dir, or a folder) into model/optimizer/scheduler/RNG.

    Returns Resumed(step, history, trainer_state, folder); step 0 when there is nothing to resume.
    `check(folder)` may refuse a folder (e.g. one written with another tokenizer) first.
    """
    if resume and out_dir is None and resume in (True, "latest"):
        raise ValueError("resume needs out_dir, where the checkpoints are")
    folder = resume_folder(out_dir, resume) if resume else None
    if resume and folder is None:
        log(f"no checkpoint under {out_dir}: starting from scratch")
    if folder is None:
        return Resumed(0, [], None, None)
    if check is not None:
        check(folder)
    state = load_training_checkpoint(folder, model, optimizer, scheduler, template=template)
    log(f"resumed from {folder} at step {state['step']}")
    return Resumed(state["step"], state.get("history", []), state, folder)
