"""Loss-curve PNG from ``trainer.state.log_history`` (one panel per logged quantity).

Uses matplotlib's object API with the Agg canvas directly, so it never touches pyplot's global backend state and
works on machines without a display.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

__all__ = ["plot_loss_curves"]

# Bookkeeping entries of the log history that are not curves worth plotting.
_SKIP = {"epoch", "step", "total_flos", "num_input_tokens_seen"}


def plot_loss_curves(log_history: Iterable[dict], path: str | os.PathLike, keys: Sequence[str] | None = None, title: str | None = None) -> list[str]:
    """Write a PNG with one panel per numeric key logged during training (``loss``, every loss term, LR, ...).

    Args:
        log_history: ``trainer.state.log_history`` (dicts with a ``step`` and numeric values).
        path: output ``.png`` file.
        keys: keys to plot (default: every numeric key logged during training, except bookkeeping and the
            end-of-training summary ``train_*`` and timings ``*_runtime`` / ``*_per_second``).
        title: figure title.

    Returns the plotted keys. Raises ValueError when there is nothing to plot or a requested key was never logged.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if key in _SKIP or key.startswith("train_") or key.endswith(("_runtime", "_per_second")):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(float(value))
    if keys is None:
        keys = sorted(series)
        keys.sort(key=lambda k: (k != "loss", k))  # total loss first
    missing = [k for k in keys if k not in series]
    if missing:
        raise ValueError(f"keys {missing} were never logged; logged keys: {sorted(series)}")
    if not keys:
        raise ValueError("nothing to plot: the log history has no training logs (lower --logging_steps)")

    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = series[key]
        ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) == 1 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return list(keys)
