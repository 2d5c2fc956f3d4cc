"""COCO caption data: dataset layouts, annotation files, the caption dataset, the length-bucketed batch sampler and
the template's `get_loader()`. Reading and transforming the images is `image_io`'s job.

Every caption of a batch has the same token length, so batches need no padding; `BucketBatchSampler` makes that a
proper epoch (each caption exactly once, reshuffled per epoch, split evenly across distributed ranks).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils import data

from caption_sources import (
    CaptionFileError,
    CaptionSplits,
    caption_splits,
    load_coco,
    read_captions,
    references_from_coco,
)
from image_io import UnreadableImage, _SkipLog, load_image
from sample_data import make_sample_dataset
from vocabulary import Vocabulary, tokenize_annotations

DATA_ROOTS = {"coco": "data/coco", "sample": "data/sample", "sample-spatial": "data/sample-spatial",
              "flickr8k": "data/flickr8k", "flickr30k": "data/flickr30k"}
SAMPLE_VARIANTS = {"sample": "plain", "sample-spatial": "spatial"}  # the generated sets (sample_data.py)
# What a folder laid out around a caption file (data/flickr8k, data/flickr30k, or yours) may hold, in order of
# preference: Karpathy's split file first (the split papers report), then the captions as shared.
CAPTION_FILE_NAMES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "captions.txt", "Flickr8k.token.txt",
                      "results_20130124.token", "results.csv")


def default_root(data_name: str) -> Path:
    """Where `prepare_data.py` lays out a dataset: data/<name> beside this file."""
    if data_name not in DATA_ROOTS:
        raise ValueError(f"unknown dataset {data_name!r}: expected one of {sorted(DATA_ROOTS)}")
    return Path(__file__).resolve().parent / DATA_ROOTS[data_name]


def dataset_paths(data_name: str = "coco", root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Image folders and annotation files of a dataset laid out by `prepare_data.py` ('coco', 'flickr8k',
    'flickr30k', or a generated set: 'sample', 'sample-spatial'). A Flickr set's caption file is read into
    COCO-format split files first (`caption_sources.caption_splits`)."""
    root = Path(root) if root is not None else default_root(data_name)  # ValueError for an unknown name
    if data_name not in DATA_ROOTS:
        raise ValueError(f"unknown dataset {data_name!r}: expected one of {sorted(DATA_ROOTS)}")
    if data_name in ("flickr8k", "flickr30k"):
        return caption_splits(*locate_caption_file(root, data_name)).paths
    if data_name == "coco":
        return {
            "root": root,
            "train_images": root / "images/train2014",
            "train_annotations": root / "annotations/captions_train2014.json",
            "val_images": root / "images/val2014",
            "val_annotations": root / "annotations/captions_val2014.json",
            "test_images": root / "images/test2014",
            "test_annotations": root / "annotations/image_info_test2014.json",
            "karpathy_split": root / "annotations/dataset_coco.json",
        }
    return {
        "root": root,
        "train_images": root / "images/train",
        "train_annotations": root / "annotations/captions_train.json",
        "val_images": root / "images/val",
        "val_annotations": root / "annotations/captions_val.json",
        "test_images": root / "images/test",
        "test_annotations": root / "annotations/image_info_test.json",
    }


def locate_caption_file(path: str | os.PathLike, data_name: str | None = None) -> tuple[Path, Path]:
    """A caption file and its image folder: `path` is the file (its images beside it) or a folder laid out around
    one (see CAPTION_FILE_NAMES and IMAGE_FOLDER_NAMES); CaptionFileError saying how to lay it out when neither."""
    path = Path(path)
    if path.is_file():
        return path, _image_folder(path.parent)
    found = [path / name for name in CAPTION_FILE_NAMES if (path / name).is_file()]
    if not found:
        how = f"`python prepare_data.py {data_name} --root {path} --from YOUR_COPY`" if data_name else (
            "a caption file and an images/ folder")
        raise CaptionFileError(f"{path}: no caption file ({', '.join(CAPTION_FILE_NAMES)}); lay it out with {how}")
    return found[0], _image_folder(path)


IMAGE_FOLDER_NAMES = ("images", "Images", "Flicker8k_Dataset", "flickr30k_images")  # ours, Kaggle's, the originals


def _image_folder(root: Path) -> Path:
    """The image folder of a caption file's folder: ROOT/images, or the first of the shared copies' names there."""
    return next((root / name for name in IMAGE_FOLDER_NAMES if (root / name).is_dir()), root / "images")


def caption_data(data: str, root: str | os.PathLike | None = None) -> CaptionSplits | None:
    """The splits of a dataset made from a caption file: 'flickr8k' / 'flickr30k' (under `root`, default
    data/<name>), or the path of a caption file or of a folder laid out like data/flickr8k; None for COCO and the
    generated sets, whose split files are laid out already."""
    if data in ("flickr8k", "flickr30k"):
        return caption_splits(*locate_caption_file(root if root is not None else default_root(data), data))
    if data in DATA_ROOTS:
        return None
    return caption_splits(*locate_caption_file(data))


def ready_dataset(data: str = "coco", root: str | os.PathLike | None = None) -> dict[str, Path]:
    """`dataset_paths` of a dataset that is there, as each notebook starts (`data` as in `caption_data`, or 'coco',
    'sample', 'sample-spatial'). The sample set is made when missing (from seed 0, then reused); for COCO a
    FileNotFoundError says how to get its annotation files; a caption file's split is printed."""
    if (splits := caption_data(data, root)) is not None:
        print(splits.summary)
        return splits.paths
    paths = dataset_paths(data, root)
    if data in SAMPLE_VARIANTS:
        make_sample_dataset(paths["root"], seed=0, variant=SAMPLE_VARIANTS[data])
        return paths
    for name in ("train_annotations", "val_annotations"):
        if not paths[name].exists():
            raise FileNotFoundError(f"{paths[name]}: missing; run `python prepare_data.py coco --root {paths['root']}`"
                                    " or start Jupyter with CAPTION_DATA=sample")
    return paths


class CoCoDataset(data.Dataset):
    """COCO captions for modes 'train' (image, caption ids), 'val' (image, caption ids, image id) and
    'test' (original image as an array, transformed image). An unreadable image yields None (see `collate_skip`)."""

    def __init__(
        self,
        transform,
        mode: str,
        batch_size: int,
        vocab_threshold: int | None,
        vocab_file: str,
        start_word: str,
        end_word: str,
        unk_word: str,
        annotations_file: str | os.PathLike,
        vocab_from_file: bool,
        img_folder: str | os.PathLike,
    ):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
        self.transform = transform
        self.mode = mode
        self.batch_size = batch_size
        self.img_folder = Path(img_folder)
        self.skipped = _SkipLog()  # unreadable images met by this process: each DataLoader worker has its own
        self.coco = load_coco(annotations_file)
        if mode == "test":
            self.paths = [img["file_name"] for img in self.coco.dataset["images"]]
            return
        self.vocab = Vocabulary(
            vocab_threshold, vocab_file, start_word, end_word, unk_word, str(annotations_file), vocab_from_file
        )
        if not self.coco.anns:
            raise ValueError(f"{annotations_file}: has no caption annotations, cannot be used in {mode} mode")
        tokens = tokenize_annotations(annotations_file)
        self.ids = list(self.coco.anns.keys())
        self.caption_ids = [self.vocab.encode(tokens[i]) for i in self.ids]
        # Template attribute: token count without <start>/<end>.
        self.caption_lengths = [len(c) - 2 for c in self.caption_ids]
        self.image_ids = [self.coco.anns[i]["image_id"] for i in self.ids]
        self.file_names = {img["id"]: img["file_name"] for img in self.coco.dataset["images"]}

    def get_train_indices(self) -> list[int]:
        """The template's batch: `batch_size` random captions of one randomly drawn length."""
        lengths = self._length_array()
        sel_length = np.random.choice(lengths)
        all_indices = np.where(lengths == sel_length)[0]
        return list(np.random.choice(all_indices, size=self.batch_size))

    def _length_array(self) -> np.ndarray:
        if getattr(self, "_lengths", None) is None or len(self._lengths) != len(self.caption_lengths):
            self._lengths = np.array(self.caption_lengths)
        return self._lengths

    def _image(self, file_name: str):
        image = load_image(self.img_folder / file_name)
        return image, self.transform(image)

    def __getitem__(self, index: int):
        try:
            if self.mode == "test":
                original, image = self._image(self.paths[index])
                return np.array(original), image
            original, image = self._image(self.file_names[self.image_ids[index]])
        except UnreadableImage as e:
            self.skipped.skip(e)
            return None
        caption = torch.tensor(self.caption_ids[index], dtype=torch.long)
        if self.mode == "train":
            return image, caption
        return image, caption, self.image_ids[index]

    def __len__(self) -> int:
        return len(self.paths) if self.mode == "test" else len(self.ids)


def collate_skip(batch: list):
    """Default collation minus the items whose image could not be read; an all-bad batch comes out as None."""
    kept = [item for item in batch if item is not None]
    if kept:
        return data.default_collate(kept)
    return None


class BucketBatchSampler(data.Sampler[list[int]]):
    """Batches of indices whose items all have the same length: each index exactly once per epoch.

    Within a length bucket the order is shuffled and cut into batches (the last, smaller batch of a bucket is kept);
    then the batch order is shuffled. The shuffle depends only on (seed, epoch), so every rank of a distributed run
    computes the same batch list and takes every `num_replicas`-th batch; batches are split until their count divides
    evenly, so all ranks run the same number of non-empty steps on disjoint data. Only when there are too few
    items to split further (every batch holds one, and their number does not divide) are the first few batches
    repeated to make up the count, as DistributedSampler pads: at most num_replicas - 1 items twice in an epoch.

    Template notebooks assign `loader.batch_sampler.sampler = SubsetRandomSampler(dataset.get_train_indices())`
    before each `next(iter(loader))`; while `sampler` is set, an iteration yields that sampler's indices as
    batches instead (as the template's BatchSampler did). Set it back to None for proper epochs.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if len(lengths) < num_replicas:
            raise ValueError(f"{len(lengths)} items cannot be shared among {num_replicas} ranks")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self.sampler: data.Sampler | None = None
        buckets: dict[int, list[int]] = defaultdict(list)
        for index, length in enumerate(self.lengths.tolist()):
            buckets[length].append(index)
        self.buckets = {length: np.array(idx) for length, idx in sorted(buckets.items())}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's shuffle; `start_batch` skips that many of this rank's batches (for resuming)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def all_batches(self) -> list[np.ndarray]:
        """The epoch's batches for all ranks, in order, before they are dealt out."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for indices in self.buckets.values():
            if self.shuffle:
                indices = rng.permutation(indices)
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            if len(batches[largest]) == 1:  # nothing left to split: repeat batches (see the class docstring)
                batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
                break
            half = math.ceil(len(batches[largest]) / 2)
            batch = batches.pop(largest)
            batches[largest:largest] = [batch[:half], batch[half:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if self.sampler is not None:
            yield from data.BatchSampler(self.sampler, self.batch_size, drop_last=False)
            return
        mine = self.all_batches()[self.rank :: self.num_replicas]
        start, self.start_batch = self.start_batch, 0
        for batch in mine[start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        n = sum(math.ceil(len(idx) / self.batch_size) for idx in self.buckets.values())
        return math.ceil(n / self.num_replicas)


def coco_image_files(annotations_file: str | os.PathLike, img_folder: str | os.PathLike) -> tuple[list[int], list[Path]]:
    """Image ids and file paths of every image listed in a COCO file, in id order."""
    coco = load_coco(annotations_file)
    images = sorted(coco.dataset["images"], key=lambda img: img["id"])
    return [img["id"] for img in images], [Path(img_folder) / img["file_name"] for img in images]


EVAL_SPLITS = ("val", "test", "karpathy-val", "karpathy-test")


def split_files(
    split: str = "val", data: str = "coco", root: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
) -> tuple[list[int], list[Path], dict[int, list[str]]]:
    """Image ids, image files and references of an evaluation split of any dataset (`data` as in `caption_data`,
    or a caption file and its image folder).

    'val' / 'test' are the dataset's own (COCO's and the sample sets' test images have no captions).
    'karpathy-val' / 'karpathy-test' are Karpathy's: for COCO the 5000-image splits of val2014 in dataset_coco.json
    that published COCO numbers use; for a caption file, its val / test when it is a Karpathy dataset_*.json.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    splits = caption_splits(captions, images) if captions is not None else caption_data(data, root)
    if splits is not None:
        if split.startswith("karpathy-") and not splits.karpathy:
            raise CaptionFileError(f"{splits.source.path}: has no Karpathy split (it is split "
                                   f"{splits.source.split_rule}); use --split val or test")
        name = split.removeprefix("karpathy-")
        return coco_split(splits.paths[f"{name}_annotations"], splits.paths[f"{name}_images"])
    if split == "test":
        raise ValueError(f"--split test: the {data} test images have no reference captions; use val"
                         + (" or karpathy-test" if data == "coco" else ""))
    paths = dataset_paths(data, root)
    if split == "val":
        return coco_split(paths["val_annotations"], paths["val_images"])
    if data != "coco":
        raise ValueError(f"the Karpathy split exists for COCO and Karpathy's dataset_*.json, not for {data!r}")
    return _karpathy_coco_split(paths, split.removeprefix("karpathy-"))


def coco_split(annotations_file: Path, img_folder: Path) -> tuple[list[int], list[Path], dict[int, list[str]]]:
    """Image ids (in the file's order), files and references of every captioned image of a COCO captions file."""
    references = references_from_coco(annotations_file)
    files = dict(zip(*coco_image_files(annotations_file, img_folder), strict=True))
    return list(references), [files[i] for i in references], references


def _karpathy_coco_split(paths: dict[str, Path], split: str) -> tuple[list[int], list[Path], dict[int, list[str]]]:
    """Karpathy's val or test images of COCO, scored against the official val2014 captions."""
    references = references_from_coco(paths["val_annotations"])
    source = read_captions(paths["karpathy_split"])
    if source.format != "karpathy":
        raise CaptionFileError(f"{paths['karpathy_split']}: expected Karpathy's dataset_coco.json, it is {source.format}")
    records = [image for image in source.images if image.split == split]
    ids = [image.image_id for image in records]
    missing = [i for i in ids if i not in references]
    if missing:
        raise CaptionFileError(
            f"{paths['karpathy_split']}: {len(missing)} karpathy-{split} images are not in {paths['val_annotations']}")
    files = [paths["root"] / "images" / image.file_name for image in records]
    return ids, files, {i: references[i] for i in ids}


def get_loader(
    transform,
    mode: str = "train",
    batch_size: int = 1,
    vocab_threshold: int | None = None,
    vocab_file: str = "./vocab.pkl",
    start_word: str = "<start>",
    end_word: str = "<end>",
    unk_word: str = "<unk>",
    vocab_from_file: bool = True,
    num_workers: int = 0,
    cocoapi_loc: str = "/opt",
    *,
    annotations_file: str | os.PathLike | None = None,
    img_folder: str | os.PathLike | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> data.DataLoader:
    """The template's loader. Train/val batches come from a `BucketBatchSampler` (one caption length per batch);
    `annotations_file=`/`img_folder=` point at any COCO-format data instead of the `cocoapi_loc` layout."""
    _check_loader_mode(mode, vocab_threshold, vocab_file, vocab_from_file)
    template_annotations, template_images = _cocoapi_files(mode, cocoapi_loc)
    dataset = CoCoDataset(
        transform=transform,
        mode=mode,
        batch_size=batch_size,
        vocab_threshold=vocab_threshold,
        vocab_file=vocab_file,
        start_word=start_word,
        end_word=end_word,
        unk_word=unk_word,
        annotations_file=template_annotations if annotations_file is None else annotations_file,
        vocab_from_file=vocab_from_file if mode == "train" else True,
        img_folder=template_images if img_folder is None else img_folder,
    )
    worker_options = {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": pin_memory}
    return _dataset_loader(dataset, shuffle, seed, num_replicas, rank, worker_options)


def _check_loader_mode(mode: str, vocab_threshold: int | None, vocab_file: str, vocab_from_file: bool) -> None:
    """The errors of `get_loader` before it reads anything: an unknown mode, or a vocabulary it cannot make or find."""
    if mode not in ("train", "val", "test"):
        raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
    if mode == "train" and not vocab_from_file and vocab_threshold is None:
        raise ValueError("to build a vocabulary (vocab_from_file=False) give vocab_threshold")
    if mode == "val" and not os.path.exists(vocab_file):
        raise FileNotFoundError(f"{vocab_file}: {mode} mode needs the vocabulary made in train mode")


def _cocoapi_files(mode: str, cocoapi_loc: str) -> tuple[str, str]:
    """The annotation file and image folder of `mode` in the template's layout under `cocoapi_loc`."""
    folder = {"train": "train2014", "val": "val2014", "test": "test2014"}[mode]
    info = {"train": "captions_train2014", "val": "captions_val2014", "test": "image_info_test2014"}[mode]
    return (os.path.join(cocoapi_loc, f"cocoapi/annotations/{info}.json"),
            os.path.join(cocoapi_loc, f"cocoapi/images/{folder}/"))


def _dataset_loader(dataset: CoCoDataset, shuffle: bool | None, seed: int, num_replicas: int, rank: int,
                    worker_options: dict) -> data.DataLoader:
    """The DataLoader of `get_loader`: test images in plain batches, train/val captions by length bucket (this
    rank's share); `shuffle=None` shuffles train and test, not val."""
    if dataset.mode == "test":
        return data.DataLoader(dataset, batch_size=dataset.batch_size, shuffle=shuffle is not False,
                               collate_fn=collate_skip, **worker_options)
    sampler = BucketBatchSampler(
        [len(c) for c in dataset.caption_ids],
        dataset.batch_size,
        shuffle=(dataset.mode == "train") if shuffle is None else shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
    return data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_skip, **worker_options)
