"""The loop of `RLHFTrainer.train`: learning steps on a schedule, with progress, checkpoints and
a clean stop.

    for each of plan.updates learning steps:
        trainer.step(plan.per_update rollouts)             phases 1-5 (`trainer.py`)
        progress bar: reward and KL of the step
        save every `checkpoint_every` updates               phase 6
        Ctrl-C / SIGTERM: finish the step, save, raise TrainingInterrupted
    roll out plan.leftover more without learning            (the reference's episode count)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from palm_rlhf.rl.schedule import Schedule
from palm_rlhf.train.progress import progress_bar
from palm_rlhf.train.stopping import StopOnSignal, TrainingInterrupted


def run_schedule(
    trainer,  # RLHFTrainer (not imported: it imports this module)
    plan: Schedule,
    response: dict,  # `trainer.step`'s keywords for each response
    checkpoint_every: Optional[int],
    checkpoint_dir: Optional[Union[str, Path]],
    show: bool,
) -> list[dict]:
    """Run `plan` on `trainer`; returns one record per learning step."""
    title = f"{trainer.config.algorithm.upper()} rollouts"
    bar = progress_bar(trainer.accelerator, show, total=plan.rollouts, desc=title, unit="ep")
    records, saved = [], None
    with StopOnSignal() as stop:
        for _ in range(plan.updates):
            records.append(trainer.step(plan.per_update, **response))
            bar.update(plan.per_update)
            bar.set_postfix(reward=f"{records[-1]['reward']:.3f}", kl=f"{records[-1]['kl']:.3f}")
            signum = stop.requested(trainer.accelerator)
            if checkpoint_every and trainer.updates % checkpoint_every == 0 or signum:
                saved = trainer.save(checkpoint_dir) if checkpoint_dir is not None else None
            if signum:
                bar.close()
                raise TrainingInterrupted("rlhf", trainer.updates, saved, signum)
    if plan.leftover:
        trainer.step(plan.leftover, learn=False, **response)
        bar.update(plan.leftover)
    bar.close()
    return records
