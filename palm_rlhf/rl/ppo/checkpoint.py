"""RLHFTrainer state on disk: one atomic, pickle-free folder per save. I/O only — the trainer
owns its state (`state_dict` / `load_state_dict`); this writes and reads it.

    root/update-XXXXXXX/
        actor.safetensors     the actor's trained tensors: LoRA adapters ("lora.*") or full
                              weights ("palm.*"), under names independent of the scope's name
        critic.safetensors    the same for the critic, plus "value_head.*" (PPO only)
        log_z.safetensors     FlowRL's log-partition head (FlowRL only)
        optimizer.pt          the AdamW state of each network (read back with weights_only=True)
        rng.pt                the trainer's two generators (sampling; prompts/shuffles/ptx)
        trainer_state.json    counters, KL controller, history, hyperparameters, PaLM config
    root/latest               the name of the newest complete folder

The base PaLM itself is not saved with LoRA actors and critics: it is the frozen reference,
the user's pretrained model, and the checkpoint refuses to load into a PaLM of another shape.
"""

from __future__ import annotations

from pathlib import Path

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    latest_checkpoint,
    load_json,
    load_state,
    load_tensors,
    save_checkpoint_dir,
    save_json,
    save_state,
    save_tensors,
)

FORMAT = "palm_rlhf.ppo/1"
NETWORKS = ("actor", "critic", "log_z")  # the trained networks a state may hold


def write_trainer_state(root: PathLike, name: str, state: dict) -> Path:
    """Write a trainer's `state_dict()` as the folder `root/name` and point `latest` at it."""
    writers = {
        f"{net}.safetensors": lambda p, net=net: save_tensors(p, state[net])
        for net in NETWORKS
        if net in state
    }
    writers |= {
        "optimizer.pt": lambda p: save_state(p, state["optimizers"]),
        "rng.pt": lambda p: save_state(p, state["rng"]),
        "trainer_state.json": lambda p: save_json(p, {"format": FORMAT, **state["meta"]}),
    }
    return save_checkpoint_dir(root, name, writers)


def resolve(path: PathLike) -> Path:
    """An update folder, or the newest complete one of a checkpoint root."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no trainer checkpoint (no trainer_state.json, no latest)"
        )
    return latest


def read_trainer_state(path: PathLike, device: str = "cpu") -> tuple[Path, dict]:
    """(folder, state) of a saved trainer, in the layout `state_dict()` returns."""
    folder = resolve(path)
    meta = load_json(folder / "trainer_state.json")
    if meta.pop("format", None) != FORMAT:
        raise CheckpointError(f"{folder} is not an RLHFTrainer checkpoint ({FORMAT})")
    state = {
        name: load_tensors(folder / f"{name}.safetensors", device=device)[0]
        for name in NETWORKS
        if (folder / f"{name}.safetensors").is_file()
    }
    state["optimizers"] = load_state(folder / "optimizer.pt")
    state["rng"] = load_state(folder / "rng.pt")
    state["meta"] = meta
    return folder, state


def check_compatible(meta: dict, palm_config, config: dict, source: str) -> None:
    """Refuse a saved state for a PaLM of another shape, another algorithm or another
    actor/critic kind."""
    mismatched = palm_config.shape_mismatch(meta["palm_config"])
    if mismatched:
        raise CheckpointError(f"{source} was saved for another PaLM: {mismatched}")
    saved_config = {"algorithm": "ppo", **meta["config"]}  # saved before there was a choice
    for role in ("algorithm", "actor_lora", "critic_lora"):
        saved, ours = saved_config[role], config[role]
        if saved != ours:
            raise CheckpointError(
                f"{source} was saved with {role}={saved}, this trainer has {role}={ours}"
            )
