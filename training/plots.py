"""Training curves as a PNG (matplotlib, Agg backend, no display): loss per step and held-out exact match per
eval.

Input is the trainer's JSON-able history: `{"loss": [[step, loss], ...], "eval": [[step, accuracy], ...]}`.
This module only draws; it does not decide where the file goes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(history: dict[str, Any], path: str | Path, title: str) -> Path:
    """Write a two-panel PNG (training loss, held-out exact match) to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    loss = history.get("loss", [])
    evals = history.get("eval", [])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    try:
        if loss:
            steps, values = [s for s, _ in loss], [v for _, v in loss]
            ax_loss.plot(steps, values, color="#9ab", linewidth=0.8, label="per step")
            ax_loss.plot(
                steps, smooth(values, max(1, len(values) // 50)), color="#135", label="moving average"
            )
            ax_loss.legend(loc="upper right")
        ax_loss.set(xlabel="step", ylabel="loss (answer tokens)", title="training loss")
        if evals:
            ax_acc.plot([s for s, _ in evals], [100 * a for _, a in evals], marker="o", color="#c41")
        ax_acc.set(xlabel="step", ylabel="exact match (%)", title="held-out accuracy", ylim=(0, 100))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    log.info("wrote training curves to %s", path)
    return path
