"""Reading images for the ResNet: the transforms, PIL loading, and batches of image files decoded on the CPU or GPU.

`load_image` opens any image as RGB; told the side it will be resized to, it decodes a JPEG at reduced scale
(libjpeg's DCT scaling, several times faster). A file that is missing or cannot be decoded raises `UnreadableImage`,
so that callers skip and count it instead of stopping: `ImageFileDataset` and `image_batches` give a zero image
with ok=False, and `_SkipLog` reports each file once per process and counts them (`CoCoDataset.skipped`).

`image_batches` feeds feature extraction and captioning. On a CUDA device DataLoader workers only read the bytes and
nvJPEG decodes them, batched, on a CUDA stream of its own (see `_decode_jpeg`), then the resize and crop run on the
GPU; elsewhere the workers decode with PIL. On the CPU, `reuse_freed_cpu_memory` tunes glibc's malloc so that the
ResNet's large activations reuse freed memory instead of fresh pages the kernel has to zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import platform
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils import data
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_side(image_size: int) -> int:
    """The shorter side images are resized to before the crop: 256 for 224 px crops, 8/7 of the crop in general."""
    return round(image_size * 256 / 224)


def build_transform(image_size: int = 224, train: bool = False, flip: bool = True) -> transforms.Compose:
    """The seeds' transforms: Resize(256) + RandomCrop(224) + flip for training, CenterCrop for evaluation.

    `image_size` scales the pair (resize to 8/7 of the crop) for small images and fast CPU runs; `flip=False`
    leaves out the random mirroring, for captions that say left and right.
    """
    resize = resize_side(image_size)
    crop = transforms.RandomCrop(image_size) if train else transforms.CenterCrop(image_size)
    steps = [transforms.Resize(resize), crop]
    if train and flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


transform_train = build_transform(224, train=True)
transform_eval = build_transform(224, train=False)


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
