"""Training: the loop behind 2_Training.ipynb and `python train.py --data sample|coco`.

The ResNet-50 is frozen, so its pooled 2048-d output for an image never changes: it is computed once per image
and view (the centre crop, and with --mirror its mirror image too), cached on disk as float16 (memory-mapped .npy)
and `embed` + the decoder train from the cache; on a GPU the JPEGs are decoded there too (nvJPEG). `--train-cnn`
(fine-tunes resnet.7) and `--no-cache` run the JPEGs through the ResNet at every step instead.
`torchrun --nproc_per_node=N train.py ...` trains with DistributedDataParallel.

Training from the cache, every random choice is a function of (seed, rank, epoch, step) -- dropout is reseeded
before each step, the views of an epoch come from a generator seeded by (seed, rank, epoch), batches from the
sampler's (seed, epoch) -- so the position in the run is the whole random state: on the CPU a run killed at any
moment and resumed with `--resume` ends with bitwise the same weights as one that never stopped. A resumed run
continues at the same batch with the same schedule everywhere, but two things depend on where it (re)started: on
a GPU the dropout masks (cuDNN's dropout generator is seeded once per epoch, see `reseed`), and on the image path
(--no-cache, --train-cnn) the random crops and flips drawn in the DataLoader workers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.autograd import DeviceType
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity
from tqdm.auto import tqdm

try:
    import fcntl  # POSIX: concurrent runs build each feature cache once
except ImportError:  # Windows
    fcntl = None

from data_loader import (
    BucketBatchSampler,
    build_transform,
    dataset_paths,
    get_loader,
    image_batches,
    load_coco,
)
from fileio import atomic_write
from model import (
    FEATURE_SIZE,
    DecoderRNN,
    EncoderCNN,
    PretrainedWeightsUnavailable,
    atomic_torch_save,
    resolve_device,
    save_weights,
)
from sample_data import make_sample_dataset
from vocabulary import Vocabulary, VocabularyError, tokenize_annotations

CACHE_FORMAT = 2  # bump when the cache layout or the extraction changes
CHECKPOINT_FORMAT = 1
STATS_IMAGES = 512  # images whose features give the standardisation statistics when there is no cache
EXTRACT_FLUSH_BATCHES = 16  # batches of features kept on the GPU between copies to the cache (no wait per batch)
PLOT_EVERY_SECONDS = 60  # redraw loss.png after an epoch when this long has passed since the last drawing
PROFILE_SKIP, PROFILE_STEPS = 10, 20  # --profile records steps 11-30 (after cuDNN's and the allocator's warm-up)


@dataclass
class TrainConfig:
    """Every setting of a training run. None means "the preset's value for `data`" (see PRESETS below)."""

    # data
    data: str = "sample"  # dataset preset: 'sample' (generated, made if missing) or 'coco' (MS COCO 2014)
    data_root: str | None = None  # dataset folder (default: data/sample or data/coco)
    image_size: int | None = None  # side of the square crop fed to the ResNet
    vocab_threshold: int | None = None  # keep words that occur at least this often in the training captions
    # model
    pretrained: bool | None = None  # ImageNet weights for the ResNet-50 (needs a download or the torch hub cache)
    weights_path: str | None = None  # a ResNet-50 state dict file to use instead of the ImageNet download
    backbone_seed: int = 0  # seed of the random ResNet-50 when it is not pretrained
    mirror: bool | None = None  # also cache every training image mirrored and train on both views (twice the cache)
    embed_size: int | None = None  # size of the image embedding and of the word embeddings
    hidden_size: int | None = None  # LSTM hidden size
    num_layers: int | None = None  # LSTM layers
    dropout: float | None = None  # dropout between LSTM layers (only with 2+ layers)
    # optimisation
    epochs: int | None = None  # passes over the training captions
    batch_size: int | None = None  # captions per batch (per process under torchrun); all of one length
    lr: float | None = None  # peak learning rate of Adam
    cnn_lr: float = 1e-4  # peak learning rate of resnet.7 with --train-cnn
    weight_decay: float = 0.0  # Adam's L2 penalty
    warmup_fraction: float = 0.05  # share of all steps with a linear warmup, then cosine decay
    min_lr_fraction: float = 0.1  # the cosine decays the learning rate to this share of the peak
    grad_clip: float = 5.0  # clip the gradient norm to this (0: no clipping)
    seed: int = 0  # seed of the initial weights, the batch order, the views and dropout
    # what to train on
    cache: bool = True  # train from cached ResNet features (--no-cache: every image through the ResNet, every step)
    train_cnn: bool = False  # fine-tune the ResNet's last block (resnet.7); implies --no-cache
    blind: bool = False  # baseline: features that carry no image information (zeros); default out dir gets "-blind"
    # files and machinery
    out_dir: str | None = None  # where weights, vocab.pkl, metrics and checkpoint.pt go (default: models, models/sample)
    cache_dir: str = ".cache/features"  # where the feature caches live
    resume: bool = False  # continue from out_dir/checkpoint.pt
    checkpoint_minutes: float = 10.0  # write checkpoint.pt mid-epoch this often (checked every log_every steps)
    log_every: int = 25  # steps between loss read-outs (progress bar, non-finite loss check)
    num_workers: int = 2  # image loading processes
    extract_batch_size: int = 64  # images per ResNet forward while building the cache
    gpu_decode: bool = True  # on CUDA, decode the JPEGs on the GPU (nvJPEG) while building the cache
    device: str = "auto"  # auto (GPU if there is one), cpu, cuda, cuda:N, mps
    profile: str | None = None  # record training steps 11-30 with torch.profiler into this folder (trace.json, ops.txt)
    nan_at_step: int = 0  # testing aid: turn the loss of this (1-based, global) step into NaN (0: never)


# What `--data` means; explicit settings override these. coco is the seeds' setting. The sample preset is sized
# for 2 CPU cores: a smaller one-layer LSTM (the seeds' 512/512/2 runs about 10x slower there), 64 px crops of
# its 96 px images, no ImageNet weights (offline; the random ResNet is seeded), no mirrored view (on a CPU the
# cache build is most of the run), about a minute of training.
PRESETS: dict[str, dict] = {
    "sample": dict(
        image_size=64, vocab_threshold=2, pretrained=False, mirror=False, embed_size=128, hidden_size=256,
        num_layers=1, dropout=0.0, epochs=6, batch_size=64, lr=3e-3,
    ),
    "coco": dict(
        image_size=224, vocab_threshold=4, pretrained=True, mirror=True, embed_size=512, hidden_size=512,
        num_layers=2, dropout=0.1, epochs=3, batch_size=256, lr=1e-3,
    ),
}
# Settings a checkpoint can only be resumed with unchanged (the vocabulary and backbone are checked separately):
# the model's shape, the batches and their order, and the optimiser and schedule the checkpoint's state belongs to.
RESUME_MUST_MATCH = (
    "image_size", "mirror", "embed_size", "hidden_size", "num_layers", "dropout", "batch_size", "seed", "train_cnn",
    "blind", "cache", "epochs", "lr", "cnn_lr", "weight_decay", "warmup_fraction", "min_lr_fraction", "grad_clip",
)


class TrainingError(ValueError):
    """Bad input for a training run (a flag, a data file, a checkpoint); the message names it, in one line."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """The config with the preset's values filled in and default paths set; TrainingError for bad values."""
    if cfg.data not in PRESETS:
        raise TrainingError(f"--data: unknown dataset {cfg.data!r}, expected one of {', '.join(PRESETS)}")
    preset = {name: value for name, value in PRESETS[cfg.data].items() if getattr(cfg, name) is None}
    cfg = replace(cfg, **preset)
    if cfg.data_root is None:
        cfg.data_root = str(dataset_paths(cfg.data)["root"])
    if cfg.out_dir is None:
        cfg.out_dir = ("models" if cfg.data == "coco" else f"models/{cfg.data}") + ("-blind" if cfg.blind else "")
    for name in ("image_size", "embed_size", "hidden_size", "num_layers", "epochs", "batch_size", "num_workers",
                 "extract_batch_size", "log_every", "nan_at_step", "vocab_threshold"):
        value = getattr(cfg, name)
        low = 0 if name in ("num_workers", "nan_at_step") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise TrainingError(f"--{name.replace('_', '-')}: must be an integer >= {low}, not {value!r}")
    for name in ("lr", "cnn_lr"):
        if not getattr(cfg, name) > 0:
            raise TrainingError(f"--{name.replace('_', '-')}: must be > 0, not {getattr(cfg, name)!r}")
    for name in ("dropout", "warmup_fraction", "min_lr_fraction"):
        if not 0 <= getattr(cfg, name) <= 1 or (name == "dropout" and cfg.dropout == 1):
            raise TrainingError(f"--{name.replace('_', '-')}: must be in [0, 1], not {getattr(cfg, name)!r}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or not cfg.checkpoint_minutes >= 0:
        raise TrainingError("--weight-decay, --grad-clip and --checkpoint-minutes must be >= 0")
    if cfg.blind and cfg.train_cnn:
        raise TrainingError("--blind and --train-cnn exclude each other: a blind model never sees the CNN")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains: its device and its place among the torchrun processes (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sum_dtype(self) -> torch.dtype:
        """The dtype of on-device loss sums: float64, except on Apple's GPU (MPS), which has none."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.cuda else None)

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every process, for decisions all of them must take together (one broadcast)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([flag], dtype=torch.uint8, device=self.device)
        dist.broadcast(tensor, 0)
        return bool(tensor.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.owns_process_group:
            dist.destroy_process_group()


def start_runtime(device_name: str) -> Runtime:
    """Join the torchrun process group when RANK/WORLD_SIZE say so (NCCL on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise TrainingError(f"--device: {e}") from None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    owns = world_size > 1 and not dist.is_initialized()
    if owns:  # rank 0 may build the feature cache while the others wait: allow for it in the timeout
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return Runtime(device, rank, world_size, owns)


def decodes_on_device(cfg: TrainConfig, runtime: Runtime) -> bool:
    """Whether images for the ResNet are decoded on the GPU (nvJPEG) rather than by PIL in the workers."""
    return runtime.cuda and cfg.gpu_decode


def autocast(runtime: Runtime):
    """bf16 autocast on CUDA (no loss scaling needed), plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if runtime.cuda else contextlib.nullcontext()


def derived_seed(*parts: int) -> int:
    """A seed that depends on every part, so (seed, rank, epoch, step, stream) give independent random streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


DROPOUT_STREAM, VIEW_STREAM, LOADER_STREAM = 0, 1, 2


def reseed(seed: int, runtime: Runtime, gpu: bool = True) -> None:
    """Seed the generators this process draws from: the CPU's and (`gpu`) its own GPU's. (torch.manual_seed also
    queues the seeding of every GPU, which costs ~1 ms per call on a CUDA build without one.)

    The training loop seeds the GPU's only at the first step of an epoch (or of a resumed run), not at every step:
    reseeding it makes the next cuDNN LSTM with dropout rebuild its dropout state from a seed it reads back from
    the GPU, a host sync per step. So dropout masks on a GPU depend on where the run started, not only on the step.
    """
    torch.default_generator.manual_seed(seed)
    if gpu and runtime.cuda:
        torch.cuda.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Data: the image list and the captions of a split
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """The images of a COCO caption file (sorted by id) and its (annotation id, image id) pairs."""

    annotations: Path
    image_ids: list[int]
    paths: list[Path]
    captions: list[tuple[int, int]]


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
    return Split(
        Path(annotations_file), [image["id"] for image in images], [img_folder / image["file_name"] for image in images],
        captions,
    )


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


def epoch_index(batches: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """An epoch's batches as one index tensor on `device` (one copy per epoch, none per step) and their offsets."""
    offsets = np.cumsum([0] + [len(batch) for batch in batches]).tolist()
    flat = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
    return flat.to(device), offsets


# ---------------------------------------------------------------------------------------------------------------
# The feature cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """Pooled ResNet features of a split's images: `features[row, view]` (float16), `readable[row]`."""

    path: Path | None  # the cache folder (None: computed in memory)
    features: np.ndarray  # [images, views, 2048] float16, memory-mapped from path/features.npy
    readable: np.ndarray  # [images] bool: False for files that could not be read (their features are zeros)
    built: bool  # whether this call computed the features (False: an existing cache was reused)

    @property
    def skipped(self) -> int:
        return int((~self.readable).sum())


def cache_key(split: Split, backbone: str, image_size: int, views: tuple[str, ...], decode: str) -> dict:
    """Everything the cached features depend on: the backbone's weights, the transform and JPEG decoder, the views,
    the images. Not the precision: a GPU's bf16 build and a CPU's float32 one differ by rounding alone (the cache
    holds float16), so either serves both."""
    listing = hashlib.sha256()
    for image_id, path in zip(split.image_ids, split.paths, strict=True):
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1
        listing.update(f"{image_id}\t{path.name}\t{size}\t{mtime}\n".encode())
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "image_size": image_size,
        "transform": repr(build_transform(image_size, train=False)),
        "decode": decode,
        "views": list(views),
        "images": len(split.image_ids),
        "image_list": listing.hexdigest(),
    }


def feature_cache(
    encoder: EncoderCNN,
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

    The cache folder is named by a hash of `cache_key`, so a changed image list, image size, view set or backbone
    gives a new folder and an old one is never read; it is written under a temporary name and renamed when
    complete, so a killed build leaves nothing that could be mistaken for a cache.
    """
    decode = "device" if decode_on_device else "pil"
    key = cache_key(split, backbone or encoder.backbone_fingerprint(), image_size, views, decode)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{split.annotations.stem}-{image_size}px-{digest}"
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
            tmp / "features.npy", mode="w+", dtype=np.float16, shape=(len(split.paths), len(views), FEATURE_SIZE)
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
    encoder: EncoderCNN,
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
    """`out[i] = backbone(centre crop of image i)` (and of its mirror, in the same batch); flags unreadable files.

    `decode_on_device`: the JPEGs are decoded on the (CUDA) device instead of by PIL in the workers.
    """
    batches = image_batches(paths, image_size, runtime.device, batch_size, num_workers, decode_on_device)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indices, features) still on the device

    def write_pending() -> None:  # one device-to-host copy (and wait) per EXTRACT_FLUSH_BATCHES batches
        if pending:
            index = torch.cat([i for i, _ in pending]).numpy()
            out[index] = torch.cat([f for _, f in pending]).cpu().numpy()
            pending.clear()

    with tqdm(total=len(paths), desc=desc, unit="img", disable=not runtime.is_main) as bar:
        for images, index, ok in batches:
            if mirror:
                images = torch.cat([images, images.flip(-1)])
            with autocast(runtime):
                features = encoder.backbone(images)
            pending.append((index, features.reshape(1 + mirror, len(index), FEATURE_SIZE).transpose(0, 1).half()))
            readable[index.numpy()] = ok.numpy()
            bar.update(len(index))
            if len(pending) == EXTRACT_FLUSH_BATCHES:
                write_pending()
        write_pending()


class FeatureTable:
    """Feature rows for batches: the cache moved to the GPU once, indexed in place on the CPU, or zeros (blind)."""

    def __init__(self, cache: FeatureCache | None, device: torch.device):
        self.device = device
        self.features: torch.Tensor | np.ndarray | None = None
        if cache is not None and device.type != "cpu":
            stored = cache.features
            self.features = torch.empty(stored.shape, dtype=torch.float16, device=device)
            for start in range(0, len(stored), 4096):
                self.features[start : start + 4096] = torch.from_numpy(np.array(stored[start : start + 4096]))
        elif cache is not None:
            self.features = cache.features
        self.views = 1 if cache is None else cache.features.shape[1]

    def gather(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Features [B, 2048] of the images in `rows`, each in its view from `views`."""
        if self.features is None:
            return torch.zeros(len(rows), FEATURE_SIZE, device=self.device)
        if isinstance(self.features, torch.Tensor):
            return self.features[rows, views]
        return torch.from_numpy(self.features[rows.numpy(), views.numpy()]).float()


# ---------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedule, checkpoints
# ---------------------------------------------------------------------------------------------------------------


class Captioner(nn.Module):
    """Encoder and decoder as one module, so DistributedDataParallel sees every trainable parameter.

    `embed` trains on standardised ResNet features, (x - feature_mean) / feature_std: the pooled features of a
    random ResNet share a large common offset (mean ~11, spread ~2 on the sample set), and a linear probe trained
    on them with Adam stays at chance for colour where one on standardised features gets 80%. `encoder_state`
    folds the standardisation into `embed`, so the saved encoder maps raw features exactly as the template's.
    """

    def __init__(self, encoder: EncoderCNN, decoder: DecoderRNN):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.register_buffer("feature_mean", torch.zeros(FEATURE_SIZE))
        self.register_buffer("feature_std", torch.ones(FEATURE_SIZE))

    def forward(self, captions: torch.Tensor, features: torch.Tensor | None = None, images=None) -> torch.Tensor:
        """Logits [B, L, V] from ResNet features [B, 2048] (cached) or from images [B, 3, S, S]."""
        if images is not None:
            features = self.encoder.backbone(images)
        embedded = self.encoder.embed((features - self.feature_mean) / self.feature_std)
        return self.decoder(embedded, captions)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The EncoderCNN state dict on the CPU, with the standardisation folded into `embed` (same keys)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        weight = state["embed.weight"].double() / self.feature_std.cpu().double()
        state["embed.bias"] = (state["embed.bias"].double() - weight @ self.feature_mean.cpu().double()).float()
        state["embed.weight"] = weight.float()
        return state


def feature_stats(features: np.ndarray, readable: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the readable images' features [images, views, 2048]."""
    total = np.zeros(FEATURE_SIZE)
    squares = np.zeros(FEATURE_SIZE)
    count = 0
    rows = np.flatnonzero(readable)
    for start in range(0, len(rows), 4096):
        chunk = np.asarray(features[rows[start : start + 4096]], dtype=np.float64).reshape(-1, FEATURE_SIZE)
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
    features = np.zeros((len(subset), 1, FEATURE_SIZE), dtype=np.float16)
    readable = np.zeros(len(subset), dtype=bool)
    extract_features(encoder, subset, features, readable, image_size=cfg.image_size, mirror=False, runtime=runtime,
                     batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, desc="feature statistics",
                     decode_on_device=decodes_on_device(cfg, runtime))
    return feature_stats(features, readable)


def trainable_state(model: Captioner) -> dict[str, torch.Tensor]:
    """What training changes or needs to continue (embed, decoder, resnet.7 if fine-tuned, feature stats), on CPU."""
    state = model.state_dict()
    keep = ("encoder.embed.", "decoder.", "feature_") + (("encoder.resnet.7.",) if model.encoder.train_cnn else ())
    return {k: v.detach().cpu() for k, v in state.items() if k.startswith(keep)}


def weights_digest(model: Captioner) -> str:
    """sha256 of the trained weights: equal digests mean bitwise-equal models."""
    digest = hashlib.sha256()
    for name, tensor in trainable_state(model).items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remove_earlier_run(out: Path) -> None:
    """Delete the epoch weights, metrics and plot an earlier run left in `out`, so that "the highest N"
    (evaluate.latest_weights, 3_Inference) is always this run's and never an older model beside this run's
    vocab.pkl. Its checkpoint.pt stays until this run writes its own, so `--resume` can still continue it."""
    earlier = sorted(p for p in out.iterdir() if re.fullmatch(r"(encoder|decoder)-\d+\.pkl", p.name))
    earlier += [p for p in (out / "metrics.jsonl", out / "loss.png") if p.exists()]
    for path in earlier:
        path.unlink()
    notes = [f"removed {len(earlier)} files of an earlier run ({', '.join(p.name for p in earlier[:4])}"
             f"{', ...' if len(earlier) > 4 else ''})"] if earlier else []
    if (out / "checkpoint.pt").exists():
        notes.append(f"{out / 'checkpoint.pt'} will be replaced (--resume continues it)")
    if notes:
        print(f"note: starting afresh in {out}: {'; '.join(notes)}", flush=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_fraction: float) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_fraction` of it at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint.pt written by this module (weights_only: it holds tensors and plain data only)."""
    if not path.exists():
        raise TrainingError(f"{path}: no checkpoint to resume from (train without --resume first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a checkpoint of this train.py (format {CHECKPOINT_FORMAT})")
    return checkpoint


def check_resumable(checkpoint: dict, cfg: TrainConfig, vocab: Vocabulary, backbone: str, world_size: int,
                    path: Path) -> None:
    """Refuse, in one line, to continue a checkpoint with a different vocabulary, backbone or model shape."""
    if checkpoint["vocab_fingerprint"] != vocab.fingerprint():
        raise TrainingError(
            f"{path}: cannot resume with a different vocabulary: the checkpoint's has {checkpoint['vocab_size']} "
            f"words (fingerprint {checkpoint['vocab_fingerprint']}), this run's {len(vocab)} "
            f"({vocab.fingerprint()}); use the same data and --vocab-threshold, or train without --resume"
        )
    if checkpoint["backbone_fingerprint"] != backbone:
        raise TrainingError(f"{path}: cannot resume: it was trained on another ResNet-50 backbone "
                            "(--pretrained / --weights-path / --backbone-seed differ)")
    for name in RESUME_MUST_MATCH:
        if checkpoint["config"].get(name) != getattr(cfg, name):
            raise TrainingError(f"{path}: cannot resume with --{name.replace('_', '-')} {getattr(cfg, name)}: "
                                f"the checkpoint was trained with {checkpoint['config'].get(name)}")
    if checkpoint["world_size"] != world_size:
        raise TrainingError(f"{path}: cannot resume on {world_size} processes: it was written by a run on "
                            f"{checkpoint['world_size']} (each takes its own share of the batches)")


# ---------------------------------------------------------------------------------------------------------------
# Profiling: where the time of a step goes
# ---------------------------------------------------------------------------------------------------------------


def profiler(device: torch.device, **options) -> torch.profiler.profile:
    """A torch.profiler that records the host's ops and, on CUDA, the GPU's kernels and copies."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch.profiler.profile(activities=activities, **options)


def step_profiler(folder: Path, device: torch.device, steps_left: int, summary: dict) -> torch.profiler.profile:
    """A profiler for the training loop (call .step() after each step): it skips PROFILE_SKIP steps (fewer in a
    short run), records the next PROFILE_STEPS, writes them to `folder` and puts write_profile's summary in
    `summary`."""
    skip = max(1, min(PROFILE_SKIP, steps_left // 2))
    active = max(1, min(PROFILE_STEPS, steps_left - skip))
    schedule = torch.profiler.schedule(wait=skip - 1, warmup=1, active=active, repeat=1)
    return profiler(device, schedule=schedule, on_trace_ready=lambda prof: summary.update(write_profile(prof, folder)))


def write_profile(prof: torch.profiler.profile, folder: Path) -> dict:
    """Save what `prof` recorded in `folder`: trace.json (the timeline, for https://ui.perfetto.dev or
    chrome://tracing), ops.txt (ops by self time: GPU time on CUDA, host time elsewhere) and summary.json.

    The summary gives per step (a `prof.step()` interval, or the whole recording without one) the host's wall time,
    the time the GPU was busy (at least one kernel or copy running) and their ratio, which says whether the host
    keeps the GPU fed, and the ten ops that took the most time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    partial_trace = folder / f".trace.json.{os.getpid()}.tmp"
    prof.export_chrome_trace(str(partial_trace))
    os.replace(partial_trace, folder / "trace.json")
    events = prof.events()
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e for e in host_events if e.name.startswith("ProfilerStep")]  # "ProfilerStep#N", shown "ProfilerStep*"
    # the GPU's kernels and copies; the GPU copies of annotations (ProfilerStep, record_function) are no work
    gpu_work = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    host_us = (sum(e.time_range.elapsed_us() for e in steps) if steps else
               max(e.time_range.end for e in host_events) - min(e.time_range.start for e in host_events))
    count = max(len(steps), 1)
    gpu_us = busy_time([(e.time_range.start, e.time_range.end) for e in gpu_work])
    on_gpu = gpu_us > 0
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    ops = [a for a in averages if not a.key.startswith("ProfilerStep")
           and not (a.is_user_annotation and a.device_type != DeviceType.CPU)]
    top = sorted(ops, key=lambda a: getattr(a, key), reverse=True)[:10]
    summary = {
        "steps": count,
        "host_ms_per_step": round(host_us / count / 1000, 3),
        "gpu_busy_ms_per_step": round(gpu_us / count / 1000, 3) if on_gpu else None,
        "gpu_busy_fraction": round(gpu_us / host_us, 3) if on_gpu and host_us else None,
        "top_ops_by": "self GPU time" if on_gpu else "self host time",
        "top_ops": [{"name": a.key, "ms_per_step": round(getattr(a, key) / count / 1000, 3),
                     "calls_per_step": round(a.count / count, 2)} for a in top],
    }
    with atomic_write(folder / "ops.txt", "w") as f:
        f.write(averages.table(sort_by=key, row_limit=40) + "\n")
    with atomic_write(folder / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=1) + "\n")
    return summary


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: GPU time with at least one kernel or copy running."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_line(summary: dict, folder: Path) -> str:
    """One line that says what a profile found and where its files are."""
    gpu = (f", GPU busy {summary['gpu_busy_ms_per_step']:.2f} ms ({summary['gpu_busy_fraction']:.0%})"
           if summary["gpu_busy_ms_per_step"] is not None else "")
    top = ", ".join(f"{op['name']} {op['ms_per_step']:.2f}" for op in summary["top_ops"][:3])
    return (f"{summary['steps']} step(s), {summary['host_ms_per_step']:.2f} ms per step on the host{gpu}; "
            f"top ({summary['top_ops_by']}, ms per step): {top}; {folder}/trace.json, ops.txt")


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


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Train a captioner as `cfg` says; returns the final metrics and the paths of the files written."""
    cfg = resolve_config(cfg)
    runtime = start_runtime(cfg.device)
    try:
        return _train(cfg, runtime)
    finally:
        runtime.close()


def _train(cfg: TrainConfig, runtime: Runtime) -> dict:
    out = Path(cfg.out_dir)
    paths = dataset_paths(cfg.data, cfg.data_root)
    if cfg.data == "sample" and not paths["train_annotations"].exists():
        if runtime.is_main:
            print(f"making the sample dataset in {paths['root']} ...", flush=True)
            make_sample_dataset(paths["root"])
        runtime.barrier()
    if cfg.data == "coco" and not paths["train_annotations"].exists():
        raise TrainingError(f"{paths['train_annotations']}: not found; get COCO with "
                            f"`python prepare_data.py coco --root {paths['root']}`")
    train_split = read_split(paths["train_annotations"], paths["train_images"])
    val_split = read_split(paths["val_annotations"], paths["val_images"])
    vocab = build_vocabulary(paths["train_annotations"], cfg.vocab_threshold, out / "vocab.pkl")

    torch.manual_seed(cfg.seed)  # the initial weights of embed and the decoder (the backbone has its own seed)
    try:
        encoder = EncoderCNN(cfg.embed_size, cfg.pretrained, cfg.weights_path, cfg.train_cnn, cfg.backbone_seed)
    except PretrainedWeightsUnavailable as e:
        raise TrainingError(str(e)) from None
    decoder = DecoderRNN(cfg.embed_size, cfg.hidden_size, len(vocab), cfg.num_layers, cfg.dropout)
    backbone = encoder.backbone_fingerprint()
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path) if cfg.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, vocab, backbone, runtime.world_size, checkpoint_path)
    model = Captioner(encoder, decoder)
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        if unexpected or any(not key.startswith("encoder.resnet.") for key in missing):
            raise TrainingError(f"{checkpoint_path}: its model weights do not fit this model")
    model.to(runtime.device)

    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            remove_earlier_run(out)
        vocab.save(out / "vocab.pkl")
        config_json = asdict(cfg) | {"vocab_size": len(vocab), "backbone_fingerprint": backbone}
        with atomic_write(out / "train_config.json", "w") as f:
            f.write(json.dumps(config_json, indent=2) + "\n")
    runtime.barrier()

    uses_cache = cfg.cache and not cfg.train_cnn and not cfg.blind
    extract = dict(image_size=cfg.image_size, runtime=runtime, batch_size=cfg.extract_batch_size,
                   num_workers=cfg.num_workers, decode_on_device=decodes_on_device(cfg, runtime))
    train_cache = val_cache = None
    if uses_cache:
        views = ("centre", "mirror") if cfg.mirror else ("centre",)  # validation uses the centre view only
        train_cache = feature_cache(encoder, train_split, views, cache_dir=cfg.cache_dir, backbone=backbone, **extract)
        val_cache = feature_cache(encoder, val_split, ("centre",), cache_dir=cfg.cache_dir, backbone=backbone,
                                  **extract)
    everything = np.ones(len(train_split.image_ids), dtype=bool)
    train_table = caption_table(train_split, vocab, train_cache.readable if train_cache else everything)
    train_features = FeatureTable(train_cache, runtime.device)
    if checkpoint is None and not cfg.blind:  # a resumed run has them from the checkpoint
        if train_cache is not None:
            mean, std = feature_stats(train_cache.features, train_cache.readable)
        else:
            mean, std = sampled_feature_stats(encoder, train_split.paths, cfg, runtime)
        model.feature_mean.copy_(mean)
        model.feature_std.copy_(std)
    if runtime.world_size > 1:  # computed from images, each GPU's may differ in the last bits: rank 0's for all
        dist.broadcast(model.feature_mean, 0)
        dist.broadcast(model.feature_std, 0)
    if uses_cache or cfg.blind:
        train_sampler = BucketBatchSampler(train_table.lengths, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                           num_replicas=runtime.world_size, rank=runtime.rank)
        train_loader = None
        train_table = train_table.to(runtime.device)
    else:
        train_loader = get_loader(
            build_transform(cfg.image_size, train=True), "train", cfg.batch_size, vocab_file=str(out / "vocab.pkl"),
            vocab_from_file=True, num_workers=cfg.num_workers, annotations_file=train_split.annotations,
            img_folder=paths["train_images"], seed=cfg.seed, num_replicas=runtime.world_size, rank=runtime.rank,
            pin_memory=runtime.cuda,
        )
        train_sampler = train_loader.batch_sampler

    trainable = [p for p in model.parameters() if p.requires_grad]
    cnn_params = list(encoder.resnet[7].parameters()) if cfg.train_cnn else []
    groups = [{"params": [p for p in trainable if all(p is not q for q in cnn_params)], "lr": cfg.lr}]
    if cnn_params:
        groups.append({"params": cnn_params, "lr": cfg.cnn_lr})
    # fused: one kernel (GPU) or one pass (CPU) over all parameters; on the CPU 3x faster than foreach
    optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = len(train_sampler)
    if checkpoint is not None and checkpoint.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise TrainingError(f"{checkpoint_path}: cannot resume: its epochs have {checkpoint['steps_per_epoch']} "
                            f"steps, this run's {steps_per_epoch} (the captions or the readable images changed)")
    total_steps = cfg.epochs * steps_per_epoch
    schedule = partial(lr_factor, total_steps=total_steps, warmup_steps=int(cfg.warmup_fraction * total_steps),
                       min_fraction=cfg.min_lr_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ddp = model
    if runtime.world_size > 1:
        # no buffer broadcast before every forward: the BatchNorm statistics and feature stats never change
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.cuda else None,
                                      **no_buffer_sync)

    epoch, start_step, metrics = 1, 0, []
    progress = {"loss_sum": 0.0, "tokens": 0, "captions": 0, "seconds": 0.0}
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        epoch, start_step, metrics = checkpoint["epoch"], checkpoint["step"], checkpoint["metrics"]
        progress = checkpoint["progress"]
        if runtime.is_main:
            where = f"epoch {epoch}, step {start_step} of {steps_per_epoch}" if epoch <= cfg.epochs else "the end"
            print(f"resuming {checkpoint_path} at {where}", flush=True)
    if runtime.is_main:
        source = "cached features" if uses_cache else "zero features (blind)" if cfg.blind else "images"
        skipped = f", {train_cache.skipped} unreadable images skipped" if train_cache and train_cache.skipped else ""
        print(f"training on {len(train_table.rows)} captions of {cfg.data} ({source}, {cfg.image_size}px{skipped}), "
              f"{len(vocab)} words, {steps_per_epoch} steps/epoch, {runtime.world_size} process(es) on "
              f"{runtime.device} -> {out}", flush=True)

    no_bad_step = torch.iinfo(torch.long).max
    first_bad = torch.full((), no_bad_step, dtype=torch.long, device=runtime.device)

    def stop_if_diverged() -> None:
        """Raise TrainingDiverged if any process has seen a non-finite loss (one host sync)."""
        bad = first_bad.clone()
        if runtime.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad_step = int(bad)
        if bad_step != no_bad_step:
            saved = (f"the last good checkpoint {checkpoint_path} is intact" if checkpoint_path.exists()
                     else "no checkpoint had been written")
            raise TrainingDiverged(
                f"training diverged: non-finite loss at epoch {bad_step // steps_per_epoch + 1}, step "
                f"{bad_step % steps_per_epoch + 1} (lr {cfg.lr:g}); stopped without saving, {saved}; "
                "try a lower --lr or --grad-clip"
            )

    last_checkpoint = time.perf_counter()

    def save_checkpoint(next_epoch: int, next_step: int, progress_now: dict) -> None:
        """checkpoint.pt for continuing at (next_epoch, next_step); checks the loss first; all processes call it."""
        nonlocal last_checkpoint
        stop_if_diverged()
        if runtime.is_main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT,
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": next_epoch,
                "step": next_step,
                "global_step": (next_epoch - 1) * steps_per_epoch + next_step,
                "steps_per_epoch": steps_per_epoch,
                "sampler": {"seed": cfg.seed, "epoch": next_epoch, "start_batch": next_step,
                            "num_replicas": runtime.world_size},
                "world_size": runtime.world_size,
                "config": asdict(cfg),
                "vocab_fingerprint": vocab.fingerprint(),
                "vocab_size": len(vocab),
                "backbone_fingerprint": backbone,
                "progress": progress_now,
                "metrics": metrics,
            }, checkpoint_path)
        last_checkpoint = time.perf_counter()

    val_table = None
    if uses_cache or cfg.blind:
        val_readable = val_cache.readable if val_cache else np.ones(len(val_split.image_ids), dtype=bool)
        val_table = caption_table(val_split, vocab, val_readable).to(runtime.device)
    val_features = FeatureTable(val_cache, runtime.device) if uses_cache or cfg.blind else None

    profiling = cfg.profile is not None and runtime.is_main
    profile_summary: dict = {}
    steps_left = total_steps - ((epoch - 1) * steps_per_epoch + start_step)
    step_profile = (step_profiler(Path(cfg.profile), runtime.device, steps_left, profile_summary) if profiling
                    else contextlib.nullcontext())
    model.train()
    run_started = last_plot = time.perf_counter()
    with step_profile:
        while epoch <= cfg.epochs:
            epoch_started = time.perf_counter()
            # this process's counts start from the checkpoint's (rank 0 carries the sums of all processes)
            loss_sum = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
            tokens = captions_seen = 0
            if runtime.is_main:
                loss_sum += progress["loss_sum"]
                tokens, captions_seen = progress["tokens"], progress["captions"]
            seconds_before = progress["seconds"]
            train_sampler.set_epoch(epoch)
            if train_loader is None:
                batches = list(train_sampler)
                flat, offsets = epoch_index(batches, runtime.device)
                view_rng = torch.Generator().manual_seed(derived_seed(cfg.seed, runtime.rank, epoch, 0, VIEW_STREAM))
                views = torch.randint(train_features.views, (len(flat),), generator=view_rng).to(runtime.device)
                steps = (
                    (train_table.tokens[flat[offsets[s] : offsets[s + 1]], : train_table.lengths[batches[s][0]]],
                     train_features.gather(train_table.rows[flat[offsets[s] : offsets[s + 1]]],
                                           views[offsets[s] : offsets[s + 1]]), None, 1.0)
                    for s in range(start_step, len(batches))
                )
            else:
                train_sampler.set_epoch(epoch, start_step)
                reseed(derived_seed(cfg.seed, runtime.rank, epoch, start_step, LOADER_STREAM), runtime)
                steps = (_image_batch(batch, runtime, cfg.image_size, vocab) for batch in train_loader)
            with tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                      disable=not runtime.is_main, dynamic_ncols=True) as bar:
                window_loss = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
                window_tokens = 0
                for step, (captions, features, images, weight) in enumerate(steps, start=start_step):
                    global_step = (epoch - 1) * steps_per_epoch + step
                    reseed(derived_seed(cfg.seed, runtime.rank, epoch, step, DROPOUT_STREAM), runtime,
                           gpu=step == start_step)
                    with autocast(runtime):
                        outputs = ddp(captions, features=features, images=images)
                    loss = F.cross_entropy(outputs.float().flatten(0, 1), captions.flatten()) * weight
                    if global_step + 1 == cfg.nan_at_step:
                        loss = loss * float("nan")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    bad_now = torch.where(torch.isfinite(loss), no_bad_step, global_step)
                    torch.minimum(first_bad, bad_now, out=first_bad)
                    n_tokens = captions.numel() * int(weight)
                    loss_sum += loss.detach() * n_tokens
                    window_loss += loss.detach() * n_tokens
                    tokens += n_tokens
                    window_tokens += n_tokens
                    captions_seen += len(captions) * int(weight)
                    bar.update(1)
                    if profiling:
                        step_profile.step()
                    done = step + 1
                    if done % cfg.log_every != 0:
                        continue
                    stop_if_diverged()
                    bar.set_postfix(loss=f"{float(window_loss) / max(window_tokens, 1):.3f}",
                                    lr=f"{scheduler.get_last_lr()[0]:.2g}")
                    window_loss.zero_()
                    window_tokens = 0
                    due = time.perf_counter() - last_checkpoint >= 60 * cfg.checkpoint_minutes
                    if done < steps_per_epoch and runtime.agree(due):
                        loss_total, tokens_total, captions_total = runtime.sum([float(loss_sum), tokens, captions_seen])
                        seconds = seconds_before + time.perf_counter() - epoch_started
                        save_checkpoint(epoch, done, {"loss_sum": loss_total, "tokens": int(tokens_total),
                                                      "captions": int(captions_total), "seconds": seconds})
            stop_if_diverged()
            loss_total, tokens_total, captions_total = runtime.sum([float(loss_sum), tokens, captions_seen])
            epoch_seconds = seconds_before + time.perf_counter() - epoch_started
            val_loss = validate(model, val_table, val_features, val_split, vocab, cfg, runtime)
            record = {
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "train_loss": loss_total / tokens_total,
                "val_loss": val_loss,
                "val_perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": round(epoch_seconds, 2),
                "elapsed_seconds": round(sum(m["epoch_seconds"] for m in metrics) + epoch_seconds, 2),
                "captions_per_second": round(captions_total / epoch_seconds, 1),
            }
            metrics.append(record)
            if runtime.is_main:
                atomic_torch_save(model.encoder_state(), out / f"encoder-{epoch}.pkl")
                save_weights(decoder, out / f"decoder-{epoch}.pkl")
                with atomic_write(out / "metrics.jsonl", "w") as f:
                    f.write("".join(json.dumps(m) + "\n" for m in metrics))
                if epoch == cfg.epochs or time.perf_counter() - last_plot >= PLOT_EVERY_SECONDS:
                    plot_metrics(out / "metrics.jsonl", out / "loss.png")  # ~0.4 s: not after every short epoch
                    last_plot = time.perf_counter()
                print(f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, "
                      f"perplexity {record['val_perplexity']:.2f}, {record['captions_per_second']:.0f} captions/s, "
                      f"{epoch_seconds:.1f} s", flush=True)
            save_checkpoint(epoch + 1, 0, {"loss_sum": 0.0, "tokens": 0, "captions": 0, "seconds": 0.0})
            epoch, start_step = epoch + 1, 0
            progress = {"loss_sum": 0.0, "tokens": 0, "captions": 0, "seconds": 0.0}

    if profile_summary:
        print(f"profile: {profile_line(profile_summary, Path(cfg.profile))}", flush=True)
    digest = weights_digest(model)
    digests = [digest]
    if runtime.world_size > 1:
        digests = [None] * runtime.world_size
        dist.all_gather_object(digests, digest)
        print(f"rank {runtime.rank}/{runtime.world_size}: weights sha256 {digest}", flush=True)
        if len(set(digests)) > 1:
            raise RuntimeError(f"the processes ended with different weights: {digests}")
    last = metrics[-1] if metrics else {}
    files = {
        "encoder": str(out / f"encoder-{cfg.epochs}.pkl"),
        "decoder": str(out / f"decoder-{cfg.epochs}.pkl"),
        "vocab": str(out / "vocab.pkl"),
        "config": str(out / "train_config.json"),
        "checkpoint": str(checkpoint_path),
        "metrics": str(out / "metrics.jsonl"),
        "plot": str(out / "loss.png"),
    }
    return {
        "out_dir": str(out),
        "epochs": cfg.epochs,
        "val_loss": last.get("val_loss"),
        "val_perplexity": last.get("val_perplexity"),
        "captions_per_second": last.get("captions_per_second"),
        "seconds": round(time.perf_counter() - run_started, 1),
        "metrics": metrics,
        "files": files,
        "weights_sha256": digest,
        "profile": profile_summary or None,
        "skipped_images": train_cache.skipped if train_cache else 0,
        "left_out_captions": train_table.left_out,
        "cache": str(train_cache.path) if train_cache else None,
        "cache_built": bool(train_cache and train_cache.built),
        "config": asdict(cfg),
    }


def _image_batch(batch, runtime: Runtime, image_size: int, vocab: Vocabulary):
    """(captions, None, images, weight) on the device from a get_loader batch.

    Every process must run each step (DDP averages gradients across them), so a batch whose images were all
    unreadable (None) still takes part: as a blank image with weight 0.
    """
    weight = 1.0
    if batch is None:
        images, captions = torch.zeros(1, 3, image_size, image_size), torch.tensor([[vocab.start_id, vocab.end_id]])
        weight = 0.0
    else:
        images, captions = batch
    images = images.to(runtime.device, non_blocking=True, memory_format=torch.channels_last)
    return captions.to(runtime.device, non_blocking=True), None, images, weight


@torch.no_grad()
def validate(model: Captioner, table: CaptionTable | None, features: FeatureTable | None, split: Split,
             vocab: Vocabulary, cfg: TrainConfig, runtime: Runtime) -> float:
    """Mean cross-entropy per word on the validation captions (centre view), averaged over all processes.

    Without a cache the validation images go through the current ResNet first (in memory, not cached).
    """
    model.eval()
    if table is None:
        computed = np.zeros((len(split.paths), 1, FEATURE_SIZE), dtype=np.float16)
        readable = np.zeros(len(split.paths), dtype=bool)
        extract_features(model.encoder, split.paths, computed, readable, image_size=cfg.image_size, mirror=False,
                         runtime=runtime, batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers,
                         desc="validation images", decode_on_device=decodes_on_device(cfg, runtime))
        table = caption_table(split, vocab, readable).to(runtime.device)
        features = FeatureTable(FeatureCache(None, computed, readable, True), runtime.device)
    sampler = BucketBatchSampler(table.lengths, cfg.batch_size, shuffle=False, num_replicas=runtime.world_size,
                                 rank=runtime.rank)
    batches = list(sampler)
    flat, offsets = epoch_index(batches, runtime.device)
    total = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
    tokens = 0
    centre = torch.zeros(len(flat), dtype=torch.long, device=runtime.device)
    for s, batch in enumerate(tqdm(batches, desc="validation", unit="batch", leave=False,
                                   disable=not runtime.is_main)):
        index = flat[offsets[s] : offsets[s + 1]]
        captions = table.tokens[index, : table.lengths[batch[0]]]
        with autocast(runtime):
            outputs = model(captions, features=features.gather(table.rows[index], centre[offsets[s] : offsets[s + 1]]))
        total += F.cross_entropy(outputs.float().flatten(0, 1), captions.flatten(), reduction="sum")
        tokens += captions.numel()
    model.train()
    total_sum, token_sum = runtime.sum([float(total), tokens])
    return total_sum / token_sum


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _field_comments() -> dict[str, str]:
    """The comment after each TrainConfig field: the --help text of its flag."""
    source = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (`embed_size` -> `--embed-size`; booleans as --flag / --no-flag)."""
    parser = argparse.ArgumentParser(
        description="Train the CNN-LSTM captioner. Unset options take the --data preset: "
        + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in preset.items())}" for name, preset in PRESETS.items()),
    )
    hints = typing.get_type_hints(TrainConfig)
    comments = _field_comments()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        default = "from the --data preset" if field.name in PRESETS["coco"] else field.default
        comment = comments.get(field.name, "")
        help_text = comment if "default" in comment else f"{comment} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        elif field.name == "data":
            parser.add_argument(flag, choices=sorted(PRESETS), default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: train, print a one-line summary; exit 2 on bad input, 1 if training diverged."""
    args = build_parser().parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(TrainConfig(**vars(args)))
    except TrainingError as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if is_main:
        files = result["files"]
        print(
            f"done: {result['epochs']} epochs, val loss {result['val_loss']:.4f}, perplexity "
            f"{result['val_perplexity']:.2f}, {result['captions_per_second']:.0f} captions/s; wrote "
            f"{files['encoder']}, {files['decoder']}, {files['vocab']}, {files['checkpoint']}, {files['plot']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
