"""Ctrl-C never loses work: SIGINT/SIGTERM during a training loop become a "stop requested" flag.

The loop checks the flag after each optimizer step (never inside one, so the weights, the
optimizer and the step counter agree), writes a checkpoint with the ordinary atomic writer and
raises `TrainingInterrupted`, which the command line turns into one line and exit code 128 +
the signal number (130 for Ctrl-C). The line holds the exact command that continues the run
(`train/continuing.py`), which then carries on exactly where it stopped.

A second Ctrl-C while the step finishes interrupts at once (the previous checkpoint is intact).
Handlers can only be installed in the main thread; elsewhere the loop runs without them.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving `checkpoint` at `step` (a KeyboardInterrupt,
    so a notebook or a script that does not catch it stops as it would on Ctrl-C)."""

    def __init__(
        self,
        stage: str,
        step: int,
        checkpoint: Optional[Path],
        signum: int,
        command: Optional[str] = None,
    ):
        self.stage, self.step, self.checkpoint, self.signum = stage, step, checkpoint, signum
        self.command = command  # the command line that continues the run, when known
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint written"
        if not checkpoint:
            resume = ""
        elif command:
            resume = f"; continue with: {command}"
        else:  # a library call: the caller knows its own arguments
            resume = f"; continue by resuming from {checkpoint.parent}"
        super().__init__(f"{stage} interrupted at step {step}: {where}{resume}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of raising.

    with StopOnSignal() as stop:
        while training:
            ...one optimizer step...
            if stop.requested(accelerator):
                save, then raise TrainingInterrupted
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, as Python would have
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(press Ctrl-C again to quit at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, accelerator=None) -> Optional[int]:
        """The signal number when any process was signalled (every process agrees), else None."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.gather(flag).max())  # one collective per step, tiny
        return signum or None
