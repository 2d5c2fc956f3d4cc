"""Plots people would rather look at than read: a training run's loss and perplexity, an attention decoder's maps."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

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
        save_figure(figure, png_path)
    return figure



def plot_attention(image: Image.Image, words: list[str], alphas: torch.Tensor, columns: int = 5) -> Figure:
    """Where an attention decoder looked for each word: the image (as the model saw it, a square crop) once per
    word, under that word's attention weights over the grid, upsampled: bright where it looked most, dark where
    least (each word on its own scale, as Show, Attend and Tell's figures). `alphas` [len(words), cells].

    On a bare matplotlib Figure (Agg) like plot_metrics; save it with `save_figure`.
    """
    grid = math.isqrt(alphas.shape[1])
    if grid * grid != alphas.shape[1] or len(words) != len(alphas):
        raise ValueError(f"alphas must be [len(words)={len(words)}, grid * grid], not {list(alphas.shape)}")
    rows = max(1, math.ceil(len(words) / columns))
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, word, weight in zip(axes, words, alphas.reshape(-1, grid, grid).float().numpy(), strict=False):
        ax.imshow(image)
        ax.imshow(weight, cmap="Greys_r", alpha=0.6, interpolation="bilinear", extent=(0, image.width, image.height, 0))
        ax.set_title(word, fontsize=11)
    for ax in axes:
        ax.axis("off")
    return figure


def save_figure(figure: Figure, png_path: str | os.PathLike) -> None:
    """A figure as PNG, written atomically (a crash never leaves a torn file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    with atomic_write(png_path) as f:
        f.write(buffer.getvalue())
