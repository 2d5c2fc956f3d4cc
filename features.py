"""The frozen-CNN feature cache: ResNet features of a split's images, computed once, stored as memory-mapped float16.

The ResNet-50 is frozen, so its output for an image and view never changes: `feature_cache` computes it once per
image and view (the centre crop, and with --mirror its mirror image too) and keeps it on disk under a folder named
by everything it depends on (`cache_key`); `FeatureTable` serves the rows of a batch. What is stored is the
encoder's `features`: the pooled 2048-d vector (EncoderCNN) or the grid of 2048-d cells the attention decoder
attends over (GridEncoder), so one mechanism serves both decoders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import fcntl  # POSIX: concurrent runs build each feature cache once
except ImportError:  # Windows
    fcntl = None

from config import TrainConfig, TrainingError
from datasets import Split
from image_io import build_transform, image_batches
from model import FEATURE_SIZE, EncoderCNN, GridEncoder
from runtime import Runtime, autocast, decodes_on_device

CACHE_FORMAT = 2  # bump when the cache layout or the extraction changes
STATS_IMAGES = 512  # images whose features give the standardisation statistics when there is no cache
STATS_CHUNK = 4096  # images (pooled) or image cells (grid) read from the cache at a time
EXTRACT_FLUSH_BATCHES = 16  # batches of features kept on the GPU between copies to the cache (no wait per batch)


@dataclass
class FeatureCache:
    """ResNet features of a split's images: `features[row, view]` (float16), `readable[row]`."""

    path: Path | None  # the cache folder (None: computed in memory)
    features: np.ndarray  # [images, views, 2048] pooled or [images, views, cells, 2048] grid, float16, memory-mapped
    readable: np.ndarray  # [images] bool: False for files that could not be read (their features are zeros)
    built: bool  # whether this call computed the features (False: an existing cache was reused)

    @property
    def skipped(self) -> int:
        return int((~self.readable).sum())


def cache_key(split: Split, backbone: str, image_size: int, views: tuple[str, ...], decode: str,
              grid: int | None = None) -> dict:
    """Everything the cached features depend on: the backbone's weights, the transform and JPEG decoder, the views,
    the images, and for spatial features the grid (pooled features have no "grid" entry, so their caches keep
    their keys). Not the precision: a GPU's bf16 build and a CPU's float32 one differ by rounding alone (the cache
    holds float16), so either serves both."""
    listing = hashlib.sha256()
    for image_id, path in zip(split.image_ids, split.paths, strict=True):
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        listing.update(f"{image_id}\t{path.name}\t{size}\t{mtime}\n".encode())
    key = {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "image_size": image_size,
        "transform": repr(build_transform(image_size, train=False)),
        "decode": decode,
        "views": list(views),
        "images": len(split.image_ids),
        "image_list": listing.hexdigest(),
    }
    if grid is not None:
        key["grid"] = grid
    return key


def feature_cache(
    encoder: EncoderCNN | GridEncoder,
    split: Split,
    views: tuple[str, ...],
    *,
    image_size: int,
    cache_dir: str | os.PathLike,
    runtime: Runtime,
    batch_size: int = 64,
    num_workers: int = 2,
    decode_on_device: bool = False,
    backbone: str | None = None,
) -> FeatureCache:
    """Open the split's cached features, building them first when missing or stale (on rank 0; other ranks, and
    other runs that want the same cache at the same time, wait for it).

    What is cached is `encoder.features`: pooled features [images, views, 2048] for EncoderCNN, the grid
    [images, views, cells, 2048] for GridEncoder (a COCO train2014 7x7 grid is about 17 GB per view).

    The cache folder is named by a hash of `cache_key`, so a changed image list, image size, view set, grid or
    backbone gives a new folder and an old one is never read; it is written under a temporary name and renamed
    when complete, so a killed build leaves nothing that could be mistaken for a cache.
    """
    decode = "device" if decode_on_device else "pil"
    grid = encoder.grid if isinstance(encoder, GridEncoder) else None
    key = cache_key(split, backbone or encoder.backbone_fingerprint(), image_size, views, decode, grid)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    kind = f"-grid{grid}" if grid else ""
    folder = Path(cache_dir) / f"{split.annotations.stem}-{image_size}px{kind}-{digest}"
    built = False
    if runtime.is_main and _read_cache_key(folder) != key:
        with cache_build_lock(Path(cache_dir)):
            if _read_cache_key(folder) != key:  # not built by another run while this one waited
                _build_cache(encoder, split, views, key, folder, image_size, runtime, batch_size, num_workers,
                             decode_on_device)
                built = True
    runtime.barrier()
    if _read_cache_key(folder) != key:
        raise TrainingError(f"{folder}: the feature cache is missing or does not match after building it")
    features = np.load(folder / "features.npy", mmap_mode="r")
    readable = np.load(folder / "readable.npy")
    return FeatureCache(folder, features, readable, built)


@contextlib.contextmanager
def cache_build_lock(cache_dir: Path) -> Iterator[None]:
    """Hold `cache_dir`'s build lock: runs started together (a sweep, a notebook beside the CLI) build a cache once,
    the others wait and then read it, and no run renames or removes a cache folder while another does."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".build.lock", "a") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another run that is building a feature cache in {cache_dir}", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read_cache_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "key.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_cache(encoder, split, views, key, folder, image_size, runtime, batch_size, num_workers,
                 decode_on_device) -> None:
    """Extract the features into a temporary folder beside `folder`, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        features = np.lib.format.open_memmap(
            tmp / "features.npy", mode="w+", dtype=np.float16,
            shape=(len(split.paths), len(views), *encoder.feature_shape),
        )
        readable = np.zeros(len(split.paths), dtype=bool)
        started = time.perf_counter()
        extract_features(
            encoder, split.paths, features, readable, image_size=image_size, mirror="mirror" in views,
            runtime=runtime, batch_size=batch_size, num_workers=num_workers, decode_on_device=decode_on_device,
            desc=f"features {split.annotations.stem} {image_size}px",
        )
        features.flush()
        del features
        np.save(tmp / "readable.npy", readable)
        np.save(tmp / "image_ids.npy", np.array(split.image_ids, dtype=np.int64))
        seconds = round(time.perf_counter() - started, 1)
        info = {"key": key, "skipped": int((~readable).sum()), "seconds": seconds}
        (tmp / "key.json").write_text(json.dumps(info, indent=1))
        for path in tmp.iterdir():  # on disk before the rename makes it a cache, even if the power fails
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():  # stale or damaged: same name, other contents
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_unreadable_caches(folder.parent)


def remove_unreadable_caches(cache_dir: Path) -> None:
    """Delete the caches that an older CACHE_FORMAT wrote: no run of this train.py can read them again, and COCO's
    take 0.3-0.7 GB each."""
    for old in cache_dir.iterdir():
        key = _read_cache_key(old) if old.is_dir() else None
        if key is not None and key.get("format") != CACHE_FORMAT:
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed {old}: a feature cache of an older format", flush=True)


@torch.inference_mode()
def extract_features(
    encoder: EncoderCNN | GridEncoder,
    paths: list[Path],
    out: np.ndarray,
    readable: np.ndarray,
    *,
    image_size: int,
    mirror: bool,
    runtime: Runtime,
    batch_size: int,
    num_workers: int,
    desc: str,
    decode_on_device: bool = False,
) -> None:
    """`out[i] = encoder.features(centre crop of image i)` (and of its mirror, in the same batch); flags unreadable
    files.

    `decode_on_device`: the JPEGs are decoded on the (CUDA) device instead of by PIL in the workers.
    """
    batches = image_batches(paths, image_size, runtime.device, batch_size, num_workers, decode_on_device)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices, features) still on the device
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not runtime.is_main) as bar:
        for images, index, ok in batches:
            if mirror:
                images = torch.cat([images, images.flip(-1)])
            with autocast(runtime):
                features = encoder.features(images)
            features = features.reshape(1 + mirror, len(index), *encoder.feature_shape).transpose(0, 1)
            pending.append((index, features.half()))
            readable[index.numpy()] = ok.numpy()
            bar.update(len(index))
            if len(pending) == EXTRACT_FLUSH_BATCHES:
                _write_pending(pending, out)
        _write_pending(pending, out)


def _write_pending(pending: list[tuple[torch.Tensor, torch.Tensor]], out: np.ndarray) -> None:
    """Copy the features kept on the device into `out` and empty `pending`: one device-to-host copy (and wait)
    per EXTRACT_FLUSH_BATCHES batches rather than one per batch."""
    if pending:
        index = torch.cat([i for i, _ in pending]).numpy()
        out[index] = torch.cat([f for _, f in pending]).cpu().numpy()
        pending.clear()


def _cells(features: np.ndarray) -> int:
    """Feature vectors per image and view: 1 when pooled, the grid's cells otherwise."""
    return int(np.prod(features.shape[2:-1]))


class FeatureTable:
    """Feature rows for batches: the cache copied to the GPU once (when it fits in half the free GPU memory),
    else indexed in place in the memory-mapped file (only a batch's rows are read), or zeros (blind)."""

    def __init__(self, cache: FeatureCache | None, device: torch.device, feature_shape: tuple[int, ...]):
        self.device, self.feature_shape = device, tuple(feature_shape)
        self.features: torch.Tensor | np.ndarray | None = None if cache is None else cache.features
        if cache is not None and device.type != "cpu" and _fits_on_device(cache.features.nbytes, device):
            stored = cache.features
            self.features = torch.empty(stored.shape, dtype=torch.float16, device=device)
            step = max(1, STATS_CHUNK // _cells(stored))  # a bounded host copy at a time
            for start in range(0, len(stored), step):
                self.features[start : start + step] = torch.from_numpy(np.array(stored[start : start + step]))
        self.views = 1 if cache is None else cache.features.shape[1]

    def gather(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Features [B, *feature_shape] of the images in `rows`, each in its view from `views`."""
        if self.features is None:
            return torch.zeros(len(rows), *self.feature_shape, device=self.device)
        if isinstance(self.features, torch.Tensor):
            return self.features[rows, views]
        picked = torch.from_numpy(self.features[rows.cpu().numpy(), views.cpu().numpy()])
        return picked.to(self.device, non_blocking=True).float()


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether a table of `nbytes` takes at most half of the GPU's free memory (the rest is for training)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def feature_stats(features: np.ndarray, readable: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the readable images' features [images, views, (cells,) 2048],
    over every view and grid cell; read in chunks of at most 4096 feature vectors per view."""
    total = np.zeros(FEATURE_SIZE)
    squares = np.zeros(FEATURE_SIZE)
    count = 0
    rows = np.flatnonzero(readable)
    step = max(1, STATS_CHUNK // _cells(features))
    for start in range(0, len(rows), step):
        chunk = np.asarray(features[rows[start : start + step]], dtype=np.float64).reshape(-1, FEATURE_SIZE)
        total += chunk.sum(0)
        squares += (chunk**2).sum(0)
        count += len(chunk)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0))
    std = np.maximum(std, 0.01 * std.mean() + 1e-6)  # a (nearly) constant dimension must not blow up
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def sampled_feature_stats(encoder: EncoderCNN, paths: list[Path], cfg: TrainConfig,
                          runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature statistics without a cache: from the centre views of up to STATS_IMAGES evenly spread images."""
    subset = paths[:: max(1, len(paths) // STATS_IMAGES)][:STATS_IMAGES]
    computed = features_in_memory(encoder, subset, cfg, runtime, "feature statistics")
    return feature_stats(computed.features, computed.readable)


def features_in_memory(encoder: EncoderCNN, paths: list[Path], cfg: TrainConfig, runtime: Runtime,
                       desc: str) -> FeatureCache:
    """The centre views' features of `paths` computed now with the current ResNet, kept in memory (no folder)."""
    features = np.zeros((len(paths), 1, *encoder.feature_shape), dtype=np.float16)
    readable = np.zeros(len(paths), dtype=bool)
    extract_features(encoder, paths, features, readable, image_size=cfg.image_size, mirror=False, runtime=runtime,
                     batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, desc=desc,
                     decode_on_device=decodes_on_device(cfg.gpu_decode, runtime))
    return FeatureCache(None, features, readable, True)
