"""Shared fixtures: a tiny COCO-format dataset made of generated JPEGs (no downloads)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ["circle", "square"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temp folder, never into the repository."""
    import vocabulary

    monkeypatch.setattr(vocabulary, "CACHE_DIR", tmp_path_factory.getbasetemp() / "cache")


def make_tiny_coco(root: Path, n_images: int = 12, seed: int = 0) -> dict:
    """COCO-format captions for `n_images` small JPEGs of one coloured shape each; 5 captions per image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    phrasings = ["a {c} {s} .", "A {c} {s} on a white background", "one {c} {s}", "the {s} is {c}", "a big {c} {s}"]
    for image_id in range(1, n_images + 1):
        color = list(COLORS)[image_id % 3]
        shape = SHAPES[image_id % 2]
        img = Image.new("RGB", (48, 40), "white")
        from PIL import ImageDraw

        draw = ImageDraw.Draw(img)
        box = (10, 8, 38, 32)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        name = f"img_{image_id:012d}.jpg"
        img.save(root / "images" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 48, "height": 40})
        for k, template in enumerate(rng.permutation(phrasings)):
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": template.format(c=color, s=shape)})
    ann_file = root / "captions.json"
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return {"annotations": ann_file, "images": root / "images", "n_images": n_images}


@pytest.fixture
def tiny_coco(tmp_path) -> dict:
    return make_tiny_coco(tmp_path / "coco")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_vocab(path, size: int) -> None:
    """A vocab.pkl with `size` words, pickled as the template does (attributes only, `pickle.dump(self)`)."""
    from vocabulary import Vocabulary

    vocab = Vocabulary.__new__(Vocabulary)
    vocab.init_vocab()
    for word in ["<start>", "<end>", "<unk>"] + [f"word{i}" for i in range(size - 3)]:
        vocab.add_word(word)
    vocab.save(path)

