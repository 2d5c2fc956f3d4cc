"""Draw images/architecture.png: the CNN-LSTM captioner, unrolled over a caption, with teacher-forced inputs.

    python images/draw_architecture.py            # rewrites images/architecture.png
"""

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Patch

FROZEN, TRAINED, DATA = "#d9d9d9", "#9ecae1", "#fdd49e"
CAPTION = ["<start>", "a", "dog", "running", "<end>"]  # outputs; the inputs are the same words shifted right
COLUMN_X = [8.5, 10.25, 12.0, 13.75, 15.5]  # centres of the unrolled LSTM steps
ROW_Y = {"input": 0.7, "embed": 1.9, "lstm": 3.4, "fc": 4.9, "output": 6.1}


def box(ax, x: float, y: float, text: str, colour: str, width: float = 1.4, height: float = 0.7) -> None:
    """A rounded box centred on (x, y) with centred text."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.04",
                                facecolor=colour, edgecolor="#333333", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=10)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "", style: str = "-|>") -> None:
    """An arrow from start to end, with an optional label above its middle."""
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": style, "color": "#333333", "lw": 1.3})
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom",
                fontsize=9, color="#444444")


def draw(path: Path) -> None:
    """Encoder on the left, the decoder unrolled over time on the right."""
    fig, ax = plt.subplots(figsize=(15, 6.2))
    ax.set_xlim(0, 16.4)
    ax.set_ylim(-0.5, 6.9)
    ax.axis("off")

    y = ROW_Y["embed"]
    box(ax, 0.95, y, "image\n3 × 224 × 224", DATA, width=1.5, height=0.9)
    box(ax, 3.25, y, "ResNet-50\n(ImageNet, frozen)", FROZEN, width=1.9, height=0.9)
    box(ax, 5.9, y, "Linear\nembed", TRAINED, width=1.3, height=0.9)
    arrow(ax, (1.75, y), (2.27, y))
    arrow(ax, (4.23, y), (5.22, y), "2048-d")
    arrow(ax, (6.58, y), (COLUMN_X[0] - 0.1, ROW_Y["lstm"] - 0.4), "512-d")
    ax.text(3.6, 2.85, "EncoderCNN", ha="center", va="center", fontsize=10)
    ax.text(3.6, 0.75, "the 2048-d feature of an image never changes,\nso train.py can compute it once and cache it",
            ha="center", va="center", fontsize=9, color="#444444")

    inputs = ["image\nfeature", *CAPTION[:-1]]
    for t, (x, word_in, word_out) in enumerate(zip(COLUMN_X, inputs, CAPTION, strict=True)):
        if t > 0:
            box(ax, x, ROW_Y["input"], word_in, DATA, width=1.1, height=0.5)
            box(ax, x, ROW_Y["embed"], "Embedding", TRAINED, width=1.3, height=0.55)
            arrow(ax, (x, ROW_Y["input"] + 0.27), (x, ROW_Y["embed"] - 0.3))
            arrow(ax, (x, ROW_Y["embed"] + 0.3), (x, ROW_Y["lstm"] - 0.4))
        box(ax, x, ROW_Y["lstm"], "LSTM\n2 layers", TRAINED, width=1.2, height=0.8)
        box(ax, x, ROW_Y["fc"], "Linear → V", TRAINED, width=1.3, height=0.55)
        box(ax, x, ROW_Y["output"], word_out, "white", width=1.1, height=0.5)
        arrow(ax, (x, ROW_Y["lstm"] + 0.42), (x, ROW_Y["fc"] - 0.3))
        arrow(ax, (x, ROW_Y["fc"] + 0.3), (x, ROW_Y["output"] - 0.27))
        if t + 1 < len(COLUMN_X):
            arrow(ax, (x + 0.64, ROW_Y["lstm"]), (COLUMN_X[t + 1] - 0.64, ROW_Y["lstm"]), "h, c")

    left = COLUMN_X[0] - 0.8
    ax.text(left, ROW_Y["output"], "predicted words\n(cross-entropy\nwith the caption)", ha="right", va="center",
            fontsize=9, color="#444444")
    ax.text(COLUMN_X[1] - 0.7, ROW_Y["input"], "training inputs: the\ncaption itself, shifted\n(teacher forcing)",
            ha="right", va="center", fontsize=9, color="#444444")
    ax.text(12.0, -0.3, "At inference the predicted word is fed back as the next input (greedy or beam search).",
            ha="center", va="center", fontsize=9, color="#444444")
    ax.text(12.0, 6.75, "DecoderRNN unrolled over the caption: the same weights at every step (V = vocabulary size, about 10,000 on COCO)",
            ha="center", va="center", fontsize=10)
    ax.legend(handles=[Patch(facecolor=FROZEN, edgecolor="#333333", label="frozen"),
                       Patch(facecolor=TRAINED, edgecolor="#333333", label="trained"),
                       Patch(facecolor=DATA, edgecolor="#333333", label="data")],
              loc="upper left", frameon=False, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "architecture.png")
    draw(parser.parse_args().out)
