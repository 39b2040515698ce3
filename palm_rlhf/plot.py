"""`palm-rlhf plot RUN_DIR`: the training curves of a run, one subplot per metric, to a PNG.

Whatever numeric keys the run's history.jsonl holds are drawn against the step: loss, lr,
valid_loss and valid_bpc for pretraining, loss and held-out accuracy for a reward model,
reward, KL and entropy for PPO. A validation metric shares the subplot of its training twin
(valid_loss is drawn with loss). Needs matplotlib (`pip install palm-rlhf[plot]`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from palm_rlhf.options import option
from palm_rlhf.train.history import HISTORY_NAME, numeric_series, read_history


@dataclass
class PlotConfig:
    run_dir: str = option(
        "", f"a run's out_dir (or its {HISTORY_NAME} file)", required=True, positional=True
    )
    out: Optional[str] = option(None, "PNG to write (default: RUN_DIR/curves.png)")
    metrics: tuple[str, ...] = option((), "only these metrics (default: every numeric key)")


def _panels(names: list[str]) -> dict[str, list[str]]:
    """Subplot title -> the series drawn in it: valid_X joins X when both exist."""
    panels: dict[str, list[str]] = {}
    for name in names:
        base = name[len("valid_") :] if name.startswith("valid_") else name
        key = base if base in names else name
        panels.setdefault(key, []).append(name)
    return panels


def plot_history(
    run_dir, out: Optional[str] = None, metrics: tuple[str, ...] = ()
) -> tuple[Path, list[str]]:
    """Draw the curves of `run_dir`'s history.jsonl; returns (the PNG, the metrics drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "palm-rlhf plot needs matplotlib: pip install matplotlib (or palm-rlhf[plot])"
        ) from None
    run_dir = Path(run_dir)
    records = read_history(run_dir)
    series = numeric_series(records)
    x_label = next((k for k in ("step", "update") if any(k in r for r in records)), "record")
    if metrics:
        unknown = sorted(set(metrics) - set(series))
        if unknown:
            raise ValueError(f"no metric {unknown} in {run_dir}; it has {sorted(series)}")
        series = {k: v for k, v in series.items() if k in metrics}
    if not series:
        raise ValueError(f"{run_dir}: the history holds no numeric metrics yet")
    panels = _panels(list(series))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, panels.items()):
        for name in names:
            steps, values = series[name]
            style = "o-" if len(steps) < 30 else "-"
            axis.plot(steps, values, style, label=name, markersize=3)
        axis.set_title(title)
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
        if len(names) > 1:
            axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    folder = run_dir.parent if run_dir.is_file() else run_dir
    figure.suptitle(str(folder))
    figure.tight_layout()
    path = Path(out) if out is not None else folder / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path, list(series)


def run_plot(config: PlotConfig) -> Path:
    path, drawn = plot_history(config.run_dir, config.out, config.metrics)
    print(f"wrote {path} ({', '.join(drawn)})")
    return path
