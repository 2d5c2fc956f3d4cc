"""A split of a caption dataset for training: its images, its captions as tensors, its vocabulary."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from config import TrainingError
from data_loader import load_coco
from vocabulary import Vocabulary, VocabularyError, tokenize_annotations


@dataclass
class Split:
    """The images of a COCO caption file (sorted by id) and its (annotation id, image id) pairs."""

    annotations: Path
    image_ids: list[int]
    paths: list[Path]
    captions: list[tuple[int, int]]
    image_folder: Path


def read_split(annotations_file: Path, img_folder: Path) -> Split:
    """The images and captions listed in a COCO caption file; TrainingError naming the file when it is unusable.

    The captions are tokenized here too (kept for caption_table), so a bad file fails before any feature is built.
    """
    try:
        coco = load_coco(annotations_file)
        tokenize_annotations(annotations_file)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(str(e)) from None
    images = sorted(coco.dataset["images"], key=lambda image: image["id"])
    captions = [(ann["id"], ann["image_id"]) for ann in coco.dataset.get("annotations", [])]
    if not captions:
        raise TrainingError(f"{annotations_file}: has no caption annotations to train or validate on")
    paths = [img_folder / image["file_name"] for image in images]
    return Split(Path(annotations_file), [image["id"] for image in images], paths, captions, Path(img_folder))


def build_vocabulary(annotations_file: Path, threshold: int, vocab_file: Path) -> Vocabulary:
    """The vocabulary of the training captions, built in memory; its `vocab_file` attribute says where it goes."""
    with tempfile.TemporaryDirectory() as tmp:  # Vocabulary() always saves what it builds: not over vocab_file yet
        try:
            vocab = Vocabulary(threshold, str(Path(tmp) / "vocab.pkl"), annotations_file=str(annotations_file))
        except (VocabularyError, FileNotFoundError, ValueError) as e:
            raise TrainingError(str(e)) from None
    vocab.vocab_file = str(vocab_file)
    return vocab


@dataclass
class CaptionTable:
    """The captions of a split as tensors: token ids padded into one [N, Lmax] tensor, lengths, image rows."""

    tokens: torch.Tensor  # [N, Lmax] int64: <start> words <end>, then zeros
    lengths: np.ndarray  # [N] tokens per caption, on the host: the batch sampler and the slicing read it
    rows: torch.Tensor  # [N] int64: the caption's image in the split's image list (= feature cache row)
    left_out: int  # captions dropped because their image is unreadable or missing

    def to(self, device: torch.device) -> CaptionTable:
        return replace(self, tokens=self.tokens.to(device), rows=self.rows.to(device))


def caption_table(split: Split, vocab: Vocabulary, readable: np.ndarray) -> CaptionTable:
    """Encode every caption whose image is readable (`readable[row]`), in the order of the annotation file."""
    row_of = {image_id: row for row, image_id in enumerate(split.image_ids) if readable[row]}
    tokens = tokenize_annotations(split.annotations)
    encoded, rows = [], []
    for annotation_id, image_id in split.captions:
        if image_id in row_of:
            encoded.append(vocab.encode(tokens[annotation_id]))
            rows.append(row_of[image_id])
    if not encoded:
        raise TrainingError(f"{split.annotations}: none of its captions has a readable image")
    lengths = np.array([len(ids) for ids in encoded])
    padded = np.zeros((len(encoded), lengths.max()), dtype=np.int64)
    for i, ids in enumerate(encoded):
        padded[i, : len(ids)] = ids
    return CaptionTable(torch.from_numpy(padded), lengths, torch.tensor(rows), len(split.captions) - len(encoded))

