"""RLHFTrainer state on disk: one atomic, pickle-free folder per save. I/O only — the trainer
owns its state (`state_dict` / `load_state_dict`); this writes and reads it.

    root/step-XXXXXXX/        (XXXXXXX: the update count; older runs' update-XXXXXXX/ still load)
        actor.safetensors     the actor's trained tensors: LoRA adapters ("lora.*") or full
                              weights ("palm.*"), under names independent of the scope's name
        critic.safetensors    the same for the critic, plus "value_head.*" (PPO only)
        log_z.safetensors     FlowRL's log-partition head (FlowRL only)
        optimizer.pt          the AdamW state of each network (read back with weights_only=True)
        rng.pt                the trainer's two generators (sampling; prompts/shuffles/ptx),
                              rank 0's at the top level and every rank's under "ranks"
        trainer_state.json    counters, KL controller, history, hyperparameters, PaLM config
    root/latest               the name of the newest complete folder

The base PaLM itself is not saved with LoRA actors and critics: it is the frozen reference,
the user's pretrained model, and the checkpoint refuses to load into a PaLM of another shape.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate.utils import gather_object

from palm_rlhf.checkpoint import (
    CheckpointError,
    PathLike,
    latest_checkpoint,
    load_json,
    load_state,
    load_tensors,
    prune_checkpoints,
    save_checkpoint_dir,
    save_json,
    save_state,
    save_tensors,
    step_folder_name,
)

FORMAT = "palm_rlhf.ppo/1"
NETWORKS = ("actor", "critic", "log_z")  # the trained networks a state may hold


def write_trainer_state(root: PathLike, updates: int, state: dict, keep_last: int = 2) -> Path:
    """Write a trainer's `state_dict()` as the folder `root/step-XXXXXXX` (the update count),
    point `latest` at it and prune all but the newest `keep_last` (0: keep all)."""
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
    folder = save_checkpoint_dir(root, step_folder_name(updates), writers)
    prune_checkpoints(root, keep_last)
    return folder


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


def read_trainer_state(path: PathLike, device="cpu") -> tuple[Path, dict]:
    """(folder, state) of a saved trainer, in the layout `state_dict()` returns."""
    # safetensors refuses "cpu:0", the name Accelerate gives the CPU of a gloo process
    device = torch.device(device)
    device = "cpu" if device.type == "cpu" else str(device)
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
    actor/critic kind (LoRA or full, pooled or per token, binned or scalar)."""
    mismatched = palm_config.shape_mismatch(meta["palm_config"])
    if mismatched:
        raise CheckpointError(f"{source} was saved for another PaLM: {mismatched}")
    # keys saved before there was a choice: their only value then
    old = {"algorithm": "ppo", "critic_pooled_values": False, "critic_num_pred_bins": None}
    saved_config = {**old, **meta["config"]}
    kinds = ("algorithm", "actor_lora", "critic_lora", "critic_pooled_values")
    for role in (*kinds, "critic_num_pred_bins"):
        saved, ours = saved_config[role], config[role]
        if saved != ours:
            raise CheckpointError(
                f"{source} was saved with {role}={saved}, this trainer has {role}={ours}"
            )


def gather_generator_states(generators: dict, world: int) -> dict:
    """{name: state} of this rank's generators at the top level of rank 0 (what one process
    reads) and every rank's under "ranks", in rank order. A collective when world > 1."""
    own = {name: generator.get_state() for name, generator in generators.items()}
    ranks = gather_object([own]) if world > 1 else [own]
    return {**ranks[0], "ranks": ranks}


def restore_generator_states(
    rng: dict, generators: dict, rank: int, world: int, source: str
) -> None:
    """Set this rank's generators from a saved "rng": its own entry when the checkpoint was
    written by as many processes. Otherwise (another world size, or a checkpoint from before
    per-rank states) rank 0 takes the top-level states and the other ranks keep their fresh
    seeds, with a warning: the run continues, but not bit for bit."""
    ranks = rng.get("ranks")
    if ranks is not None and len(ranks) == world:
        mine = ranks[rank]
    else:
        if world > 1 or (ranks is not None and len(ranks) > 1):
            saved = len(ranks) if ranks is not None else "an unknown number of"
            warnings.warn(
                f"{source} was saved by {saved} process(es), this run has {world}: only rank "
                f"0's sampling generators are restored, so sampling will not continue exactly "
                f"as the saved run would have",
                stacklevel=3,
            )
        mine = rng if rank == 0 else {}
    for name, generator in generators.items():
        if name in mine:
            generator.set_state(mine[name])
