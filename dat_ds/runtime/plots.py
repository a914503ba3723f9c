"""The run's ``curves.png``: matplotlib is imported only when a run finishes with a history to plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.io import save_figure


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and, where the rows have them, clean and robust test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training objective")
    clean = [(h["epoch"], h["clean_acc"]) for h in history if h.get("clean_acc") is not None]
    if clean:
        ax2.plot(*zip(*clean), marker="o", label="clean")
    rob = [(h["epoch"], h["robust_acc"]) for h in history if h.get("robust_acc") is not None]
    if rob:
        ax2.plot(*zip(*rob), marker="s", label=history[-1].get("robust_attack", "robust"))
    for key, marker, label in (("ema_clean_acc", "o", "EMA clean"), ("ema_robust_acc", "s", "EMA robust")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax2.plot(*zip(*points), marker=marker, linestyle="--", label=label)
    ax2.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title=title)
    if clean or rob:
        ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
