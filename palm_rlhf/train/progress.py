"""What a run shows while it runs: a progress bar on the main process, and metrics records
averaged over processes."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def progress_bar(accelerator, enabled: bool, **tqdm_options):
    """A tqdm.auto bar (a widget in Jupyter) shown by the main process only, when enabled."""
    return tqdm(disable=not (enabled and accelerator.is_local_main_process), **tqdm_options)


def main_process_log(accelerator):
    """`tqdm.write` (lines that do not break the bar) on the main process, silence elsewhere."""
    return tqdm.write if accelerator.is_main_process else (lambda *_: None)


def mean_over_processes(accelerator, record: dict[str, float]) -> dict[str, float]:
    """Each number of a metrics record averaged over processes (NaN entries ignored)."""
    keys = sorted(record)
    local = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local[None]).reshape(-1, len(keys))
    return dict(zip(keys, gathered.nanmean(dim=0).tolist()))
