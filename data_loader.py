"""COCO caption data: datasets, transforms, the length-bucketed batch sampler and the template's `get_loader()`.

Every caption of a batch has the same token length, so batches need no padding; `BucketBatchSampler` makes that a
proper epoch (each caption exactly once, reshuffled per epoch, split evenly across distributed ranks).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import math
import os
import platform
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils import data
from torchvision import transforms

from sample_data import make_sample_dataset
from vocabulary import Vocabulary, tokenize_annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_ROOTS = {"coco": "data/coco", "sample": "data/sample"}


def resize_side(image_size: int) -> int:
    """The shorter side images are resized to before the crop: 256 for 224 px crops, 8/7 of the crop in general."""
    return round(image_size * 256 / 224)


def build_transform(image_size: int = 224, train: bool = False) -> transforms.Compose:
    """The seeds' transforms: Resize(256) + RandomCrop(224) + flip for training, CenterCrop for evaluation.

    `image_size` scales the pair (resize to 8/7 of the crop) for small images and fast CPU runs.
    """
    resize = resize_side(image_size)
    crop = transforms.RandomCrop(image_size) if train else transforms.CenterCrop(image_size)
    steps = [transforms.Resize(resize), crop]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


transform_train = build_transform(224, train=True)
transform_eval = build_transform(224, train=False)


def dataset_paths(data_name: str = "coco", root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Image folders and annotation files of a dataset laid out by `prepare_data.py` ('coco' or 'sample')."""
    if data_name not in DATA_ROOTS:
        raise ValueError(f"unknown dataset {data_name!r}: expected one of {sorted(DATA_ROOTS)}")
    root = Path(root if root is not None else Path(__file__).resolve().parent / DATA_ROOTS[data_name])
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


def ready_dataset(data_name: str = "coco", root: str | os.PathLike | None = None) -> dict[str, Path]:
    """`dataset_paths` of a dataset that is there, as each notebook starts: the sample set is made when missing (from
    seed 0, then reused); for COCO a FileNotFoundError says how to get its annotation files."""
    paths = dataset_paths(data_name, root)
    if data_name == "sample":
        make_sample_dataset(paths["root"], seed=0)
        return paths
    for name in ("train_annotations", "val_annotations"):
        if not paths[name].exists():
            raise FileNotFoundError(f"{paths[name]}: missing; run `python prepare_data.py coco --root {paths['root']}`"
                                    " or start Jupyter with CAPTION_DATA=sample")
    return paths


class UnreadableImage(Exception):
    """An image file that is missing or cannot be decoded."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)


def load_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open an image as RGB (COCO has grayscale and CMYK JPEGs); UnreadableImage names the file otherwise.

    With `min_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several times faster)
    when its shorter side stays >= min_side: for a resize to that side the result is all but the same.
    """
    try:
        with Image.open(path) as img:
            if min_side is not None:
                img.draft(None, (min_side, min_side))  # a no-op for other formats and small images
            return img.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image file (cannot identify its format)") from None
    except Image.DecompressionBombError as e:  # a header claiming more pixels than PIL will allocate
        raise UnreadableImage(path, f"image too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UnreadableImage(path, f"cannot decode image ({e})") from None


class _SkipLog:
    """Remembers unreadable files so each is reported once per process and counted."""

    def __init__(self):
        self.paths: set[str] = set()

    def skip(self, error: UnreadableImage) -> None:
        if error.path not in self.paths:
            self.paths.add(error.path)
            print(f"warning: skipping unreadable image {error}", file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.paths)


def load_coco(annotations_file: str | os.PathLike) -> COCO:
    """pycocotools' COCO index of a file, with a one-line error naming the file when it is missing, not COCO-format
    or inconsistent (see `_check_coco`)."""
    try:
        with open(annotations_file, "rb") as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{annotations_file}: annotation file not found") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{annotations_file}: not a COCO-format annotation file ({type(e).__name__}: {e})") from None
    _check_coco(dataset, annotations_file)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _check_coco(dataset, annotations_file: str | os.PathLike) -> None:
    """ValueError naming the file unless every image has an int `id` and a str `file_name`, and every annotation (if
    any: test image lists have none) an int `id` and an `image_id` listed in 'images', and in caption files a str
    `caption`. The readers index by these, so a bad entry would otherwise fail far from the file, or not at all."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{annotations_file}: {what}")

    if not isinstance(dataset, dict):
        raise bad("not a COCO-format annotation file (not a JSON object)")
    images = dataset.get("images")
    if not isinstance(images, list):
        raise bad("not a COCO-format annotation file (no 'images' list)")
    image_ids = set()
    for image in images:
        if not isinstance(image, dict) or type(image.get("id")) is not int or not isinstance(image.get("file_name"), str):
            raise bad(f"image {str(image)[:80]} needs an int 'id' and a str 'file_name'")
        image_ids.add(image["id"])
    if "annotations" not in dataset:
        return
    annotations = dataset["annotations"]
    if not isinstance(annotations, list) or not all(isinstance(ann, dict) for ann in annotations):
        raise bad("not a COCO-format annotation file ('annotations' is not a list of objects)")
    captions = any("caption" in ann for ann in annotations)
    for ann in annotations:
        if type(ann.get("id")) is not int:
            raise bad(f"annotation {str(ann)[:80]} needs an int 'id'")
        image_id = ann.get("image_id")
        if type(image_id) is not int or image_id not in image_ids:
            raise bad(f"annotation {ann['id']} refers to image {image_id!r}, which is not in 'images'")
        if captions and not isinstance(ann.get("caption"), str):
            raise bad(f"annotation {ann['id']} has no caption text (a str 'caption')")


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


class ImageFileDataset(data.Dataset):
    """Transformed images from a list of files, for feature extraction and captioning: (image, index, ok).

    An unreadable file gives a zero image with ok=False, so a batch never breaks and the caller counts it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform, image_size: int | None = None,
                 min_side: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.image_size = image_size
        self.min_side = min_side  # see load_image

    def __getitem__(self, index: int):
        try:
            return self.transform(load_image(self.paths[index], self.min_side)), index, True
        except UnreadableImage as e:
            print(f"warning: skipping unreadable image {e}", file=sys.stderr, flush=True)
            size = self.image_size or 224
            return torch.zeros(3, size, size), index, False

    def __len__(self) -> int:
        return len(self.paths)


class EncodedImageDataset(data.Dataset):
    """Image files prepared for decoding on the GPU: (JPEG bytes, None, index) for RGB and grayscale JPEGs,
    (None, transformed image, index) for other images, decoded here by `pil` (CMYK JPEGs, PNGs, ...), and
    (None, None, index) for unreadable files. Reading only headers and bytes, a worker keeps up with nvJPEG; the
    bytes travel to the main process through the worker pipe, cheaper than one shared-memory tensor per file."""

    def __init__(self, pil: ImageFileDataset):
        self.pil = pil  # the same files with the CPU transform: the fallback, and the one to name unreadable files

    def __getitem__(self, index: int):
        try:
            encoded = self.pil.paths[index].read_bytes()
            with Image.open(io.BytesIO(encoded)) as img:  # parses the header only
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    return encoded, None, index
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            pass  # PIL below says what is wrong with the file
        return None, self.pil_image(index), index

    def pil_image(self, index: int) -> torch.Tensor | None:
        """The file decoded and transformed by PIL, or None (with a warning line) when it is unreadable."""
        image, _, ok = self.pil[index]
        return image if ok else None

    def __len__(self) -> int:
        return len(self.pil)


def _as_lists(batch: list[tuple]) -> tuple[list, ...]:
    return tuple(map(list, zip(*batch, strict=True)))


_GLIBC = ctypes.CDLL(None) if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_reuse_depth = 0


@contextlib.contextmanager
def reuse_freed_cpu_memory() -> Iterator[None]:
    """Inside, glibc's malloc keeps freed blocks of up to 1 GiB for the next batch instead of unmapping them; on the
    way out it returns to the limits it would have reached by itself and gives the memory back. A no-op off glibc.

    A CPU ResNet-50 pass over 64 crops of 224 px allocates activations of about 200 MB; by default each is a fresh
    mmap whose pages the kernel zeroes on first touch: a third of the pass (84 -> 57 ms per image on 2 cores).
    """
    global _reuse_depth
    if _GLIBC is None:
        yield
        return
    if _reuse_depth == 0:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        _GLIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            _GLIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for its adaptive thresholds
            _GLIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            _GLIBC.malloc_trim(0)


def image_batches(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    decode_on_device: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (images [B, 3, S, S] on `device`, file indices [B], ok [B]) of the files' centre crops, in order.

    This is the evaluation transform (resize the shorter side to 8/7 S, centre crop S, ImageNet normalisation).
    By default a CUDA device decodes the JPEGs itself (`decode_on_device`: nvJPEG, batched, then resize and crop
    on the GPU) while DataLoader workers only read files; otherwise the workers decode with PIL. Unreadable files
    come out as zero images with ok=False.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # one key for the per-device caches below
    if decode_on_device is None:
        decode_on_device = device.type == "cuda"
    pil = ImageFileDataset(paths, build_transform(image_size), image_size, resize_side(image_size))
    # the caller runs the ResNet between yields: on the CPU its activations reuse the memory the last batch freed
    with reuse_freed_cpu_memory() if device.type == "cpu" else contextlib.nullcontext():
        if not decode_on_device:
            loader = data.DataLoader(pil, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
            for images, indices, ok in loader:
                yield images.to(device, non_blocking=True), indices, ok
            return
        dataset = EncodedImageDataset(pil)
        loader = data.DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=_as_lists)
        for encoded, pixels, indices in loader:
            images, ok = _decode_batch(encoded, pixels, indices, dataset, image_size, device)
            yield images, torch.tensor(indices), ok


@torch.no_grad()
def _decode_batch(encoded: list, pixels: list, indices: list[int], dataset: EncodedImageDataset, image_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the JPEG bytes of a batch on `device` and resize, crop and normalise them there, as
    build_transform(image_size) does with PIL; `pixels` already hold the others. Returns (images, ok)."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.zeros(len(indices), 3, image_size, image_size, device=device)
    ok = torch.tensor([e is not None or p is not None for e, p in zip(encoded, pixels, strict=True)])
    for i, image in enumerate(pixels):
        if image is not None:
            images[i] = image.to(device, non_blocking=True)
    jpegs = [i for i, e in enumerate(encoded) if e is not None]
    encoded = [None if e is None else torch.frombuffer(bytearray(e), dtype=torch.uint8) for e in encoded]
    try:
        decoded = _decode_jpeg([encoded[i] for i in jpegs], device) if jpegs else []
    except RuntimeError:  # one bad file fails the whole batch: decode one by one, PIL for what nvJPEG refuses
        decoded = [_decode_one(encoded[i], indices[i], dataset, device) for i in jpegs]
    decoded_of = dict(zip(jpegs, decoded, strict=True))
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, image in decoded_of.items():
        if image is None:
            ok[i] = False
        elif image.dtype == torch.uint8:
            by_shape[tuple(image.shape)].append(i)
        else:  # decoded by PIL, already transformed
            images[i] = image
    mean, std = _imagenet_mean_std(device)
    for rows in by_shape.values():  # one resize per image shape, not per image
        group = torch.stack([decoded_of[i] for i in rows]).float()
        group = TF.center_crop(TF.resize(group, [resize_side(image_size)], antialias=True), [image_size] * 2)
        # made on the CPU and copied without waiting: a device tensor made from a list stalls until the GPU is idle
        images[torch.tensor(rows).to(device, non_blocking=True)] = (group - mean) / std
    return images, ok


@functools.cache
def _imagenet_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in 0-255 units, [1, 3, 1, 1] on `device`; copied there once, not at every batch."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The CUDA stream `_decode_jpeg` decodes on, one per device."""
    return torch.cuda.Stream(device)


def _decode_jpeg(encoded: torch.Tensor | list[torch.Tensor], device: torch.device):
    """torchvision's decode_jpeg to RGB uint8 on `device` (nvJPEG on CUDA; a list is decoded as one batch).

    torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which is not a dependency here yet;
    the warning is silenced so it does not repeat in every notebook, and this is the one place to move.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type != "cuda":
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        # nvJPEG's hardware engine writes its outputs without waiting for work queued on the stream they were
        # allocated on, so on the caller's stream it can overwrite memory that queued kernels still read
        # (pytorch/vision#9606, meta-pytorch/torchcodec#1634). On a stream of its own the decode still overlaps
        # that work; the caller's stream waits for it, and record_stream keeps the outputs until it has used them.
        current, decode_stream = torch.cuda.current_stream(device), _decode_stream(device)
        with torch.cuda.stream(decode_stream):
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        current.wait_stream(decode_stream)
        for image in decoded if isinstance(decoded, list) else [decoded]:
            image.record_stream(current)
        return decoded


def _decode_one(encoded: torch.Tensor, index: int, dataset: EncodedImageDataset,
                device: torch.device) -> torch.Tensor | None:
    """One JPEG decoded on `device` (uint8 [3, H, W]), else by PIL (transformed, float), else None (unreadable)."""
    try:
        return _decode_jpeg(encoded, device)
    except RuntimeError:
        image = dataset.pil_image(index)
        return None if image is None else image.to(device, non_blocking=True)


def coco_image_files(annotations_file: str | os.PathLike, img_folder: str | os.PathLike) -> tuple[list[int], list[Path]]:
    """Image ids and file paths of every image listed in a COCO file, in id order."""
    coco = load_coco(annotations_file)
    images = sorted(coco.dataset["images"], key=lambda img: img["id"])
    return [img["id"] for img in images], [Path(img_folder) / img["file_name"] for img in images]


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
