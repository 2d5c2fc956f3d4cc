"""Plots people would rather look at than read: the loss and perplexity curves of a training run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fileio import atomic_write


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Figure:
    """Train/validation loss and validation perplexity per epoch from a metrics.jsonl; saved as PNG if asked.

    Draws on a bare matplotlib Figure (Agg), so it needs no display and leaves pyplot's state alone; a notebook
    shows the returned figure inline.
    """
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    epochs = [row["epoch"] for row in rows]
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    loss_axes, perplexity_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row["train_loss"] for row in rows], "o-", label="training")
    loss_axes.plot(epochs, [row["val_loss"] for row in rows], "o-", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy per word", title="Loss")
    loss_axes.legend()
    perplexity_axes.plot(epochs, [row["val_perplexity"] for row in rows], "o-", color="C1")
    perplexity_axes.set(xlabel="epoch", ylabel="perplexity", title="Validation perplexity")
    for axes in (loss_axes, perplexity_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    if png_path is not None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        with atomic_write(png_path) as f:
            f.write(buffer.getvalue())
    return figure

