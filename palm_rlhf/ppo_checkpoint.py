"""Save and resume an RLHFTrainer: one atomic, pickle-free folder per save.

    root/update-XXXXXXX/
        actor.safetensors     the actor's trained tensors: LoRA adapters ("lora.*") or full
                              weights ("palm.*"), under names independent of the scope's name
        critic.safetensors    the same for the critic, plus "value_head.*"
        optimizer.pt          both AdamW states (read back with weights_only=True)
        rng.pt                the trainer's two generators (sampling; prompts/shuffles/ptx)
        trainer_state.json    counters, KL controller, history, hyperparameters, PaLM config
    root/latest               the name of the newest complete folder

The base PaLM itself is not saved with LoRA actors and critics: it is the frozen reference,
the user's pretrained model, and the checkpoint refuses to load into a PaLM of another shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from palm_rlhf.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_json,
    load_state,
    load_tensors,
    save_checkpoint_dir,
    save_json,
    save_state,
    save_tensors,
)

if TYPE_CHECKING:
    from palm_rlhf.ppo import RLHFTrainer

FORMAT = "palm_rlhf.ppo/1"


def save_trainer_state(trainer: RLHFTrainer, root: Union[str, Path]) -> Optional[Path]:
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    folder = None
    if accelerator.is_main_process:
        state = {
            "format": FORMAT,
            "episodes": trainer.episodes,
            "updates": trainer.updates,
            "value_head_initialised": trainer.value_head_initialised,
            "kl_controller": trainer.kl_controller.state_dict(),
            "history": trainer.history,
            "config": trainer.config.to_dict(),
            "palm_config": trainer.reference.config.to_dict(),
            "scopes": {"actor": trainer.actor_scope, "critic": trainer.critic_scope},
        }
        optimizers = {
            "actor": trainer.actor_optim.state_dict(),
            "critic": trainer.critic_optim.state_dict(),
        }
        generators = {
            "generator": trainer.generator.get_state(),
            "cpu_generator": trainer.cpu_generator.get_state(),
        }
        writers = {
            "actor.safetensors": lambda p: save_tensors(p, trainer.actor_module.trainable_state()),
            "critic.safetensors": lambda p: save_tensors(
                p, trainer.critic_module.trainable_state()
            ),
            "optimizer.pt": lambda p: save_state(p, optimizers),
            "rng.pt": lambda p: save_state(p, generators),
            "trainer_state.json": lambda p: save_json(p, state),
        }
        folder = save_checkpoint_dir(root, f"update-{trainer.updates:07d}", writers)
    accelerator.wait_for_everyone()
    return folder


def _resolve(path: Union[str, Path]) -> Path:
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no trainer checkpoint (no trainer_state.json, no latest)"
        )
    return latest


def load_trainer_state(trainer: RLHFTrainer, path: Union[str, Path]) -> Path:
    folder = _resolve(path)
    state = load_json(folder / "trainer_state.json")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not an RLHFTrainer checkpoint ({FORMAT})")
    palm_config = trainer.reference.config.to_dict()
    mismatched = {
        k: (v, palm_config.get(k)) for k, v in state["palm_config"].items()
        if k in ("num_tokens", "dim", "depth", "dim_head", "heads", "ff_mult")
        and palm_config.get(k) != v
    }  # fmt: skip
    if mismatched:
        raise CheckpointError(f"{folder} was saved for another PaLM: {mismatched}")
    for role in ("actor_lora", "critic_lora"):
        saved, ours = state["config"][role], getattr(trainer.config, role)
        if saved != ours:
            raise CheckpointError(
                f"{folder} was saved with {role}={saved}, this trainer has {role}={ours}"
            )
    device = str(trainer.device)
    for name, module in (("actor", trainer.actor_module), ("critic", trainer.critic_module)):
        tensors, _ = load_tensors(folder / f"{name}.safetensors", device=device)
        try:
            module.load_trainable_state(tensors)
        except RuntimeError as err:  # missing/unexpected keys or shapes (e.g. another rank)
            raise CheckpointError(f"{folder}/{name}.safetensors does not fit: {err}") from err
    optimizers = load_state(folder / "optimizer.pt")
    trainer.actor_optim.load_state_dict(optimizers["actor"])
    trainer.critic_optim.load_state_dict(optimizers["critic"])
    generators = load_state(folder / "rng.pt")
    trainer.generator.set_state(generators["generator"])
    trainer.cpu_generator.set_state(generators["cpu_generator"])
    trainer.episodes, trainer.updates = state["episodes"], state["updates"]
    trainer.value_head_initialised = state["value_head_initialised"]
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.history = list(state["history"])
    return folder
