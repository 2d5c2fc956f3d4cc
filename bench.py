"""Speed benchmark (issue #6): the feature cache against the template's per-caption path, batched decoding
against one image at a time, all measured in one run on generated data of COCO's shape.

    python bench.py [--device cpu|cuda] [--images N] [--image-size S] [--quick] [--json PATH] [--profile DIR]

It writes 640x480 JPEGs with 5 captions each (caption lengths drawn like COCO's: mean about 11.3 tokens, 5th-95th
percentile 8-16, a tail past 40) as a COCO-format dataset in a temporary folder, then measures with train.py's own
functions: feature extraction (CPU JPEG decoding; on CUDA also batched GPU decoding), 3 epochs of training from
the feature cache and through the per-caption path (train.py --no-cache: every caption's JPEG is decoded and run
through the ResNet-50 at every step, DataLoader workers, same model, same batch size), decoding throughput
(sample() one image at a time, batched greedy, beam 3 batched and one at a time), the attention decoder's
training from its grid cache (image_size / 32 cells a side; rate against the pooled LSTM's) and its beam 3 batched
and one at a time, and peak memory. Training is
timed in wall time and in CPU time, which barely moves when other programs share the cores. It prints one table
with PASS/FAIL per target; `--json` writes every figure. Ratios against the baseline measured in the same run
are the headline; absolute numbers mean something only from a GPU. `--profile DIR` adds, after the timed runs,
torch.profiler records of extraction, training steps and beam search (profiling.write_profile: trace, op table,
host time and GPU busy time per step). Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import vocabulary
from config import TrainConfig, TrainingError, positive_int
from data_loader import coco_image_files, dataset_paths
from features import extract_features
from fileio import atomic_write
from model import FEATURE_SIZE, EncoderCNN, GridEncoder, load_pretrained
from profiling import profile_line, profiler, write_profile
from runtime import Runtime, start_runtime
from train import train

COCO_TRAIN2014_CAPTIONS = 414_113
JPEG_SIZE = (640, 480)  # COCO's typical image; one in five is portrait (480x640)
COLOURS = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 205, 40),
    "purple": (135, 55, 175), "orange": (240, 130, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
# Caption length in words: log-normal around 11.1 (5th-95th percentile 8-16), plus a rare long tail up to 50.
LENGTH_MEDIAN, LENGTH_SIGMA, TAIL_RATE, TAIL_RANGE, MIN_LENGTH = 11.1, 0.21, 0.003, (17, 50), 5
MAX_DECODE_LEN = 20  # the template's sample() default


@dataclass
class BenchConfig:
    """Sizes of one benchmark run; the presets below fit a 2-core CPU, a quick test, or a GPU."""

    device: str
    images: int  # training images (5 captions each); a fifth as many validation images
    image_size: int  # side of the square crop fed to the ResNet-50
    mirror: bool  # cache (and train on) the mirrored view too, as train.py's presets do: coco yes, sample no
    word_list: int  # synthetic words the captions draw from (Zipf-distributed)
    vocab_threshold: int
    embed_size: int
    hidden_size: int
    num_layers: int
    dropout: float
    batch_size: int  # captions per training step, both paths
    lr: float
    epochs: int
    num_workers: int  # DataLoader workers, both paths
    extract_batch_size: int
    decode_images: int  # images decoded in batches
    decode_batch: int  # images per batched decoding call
    one_at_a_time_images: int  # images decoded one by one (a subset: it is the slow way)
    attention_size: int  # the attention decoder's (its other sizes are the LSTM's; its grid is image_size / 32)


PRESETS = {
    # 128 px on the CPU: the largest crop whose per-caption baseline still runs in about 3 minutes on 2 cores. The
    # cache's advantage is the ResNet passes it saves, so a smaller crop understates it against COCO's 224 px (the
    # decoder's cost, the same on both paths, weighs more); BENCHMARKS.md has 64, 96 and 224 px runs too.
    "cpu": BenchConfig(
        device="cpu", images=400, image_size=128, mirror=False, word_list=1000, vocab_threshold=4, embed_size=128,
        hidden_size=256, num_layers=1, dropout=0.0, batch_size=64, lr=3e-3, epochs=3, num_workers=2, extract_batch_size=64,
        decode_images=400, decode_batch=400, one_at_a_time_images=200, attention_size=128,
    ),
    "quick": BenchConfig(
        device="cpu", images=32, image_size=32, mirror=False, word_list=200, vocab_threshold=2, embed_size=64,
        hidden_size=128, num_layers=1, dropout=0.0, batch_size=32, lr=3e-3, epochs=3, num_workers=2, extract_batch_size=32,
        decode_images=32, decode_batch=32, one_at_a_time_images=16, attention_size=64,
    ),
    # The seeds' model on a COCO-sized vocabulary.
    "cuda": BenchConfig(
        device="cuda", images=5000, image_size=224, mirror=True, word_list=10000, vocab_threshold=4, embed_size=512,
        hidden_size=512, num_layers=2, dropout=0.1, batch_size=256, lr=1e-3, epochs=3,
        num_workers=min(16, os.cpu_count() or 1), extract_batch_size=256, decode_images=5000, decode_batch=5000,
        one_at_a_time_images=200, attention_size=512,
    ),
}

VAL_LOSS_TOLERANCE = 0.03  # "equal validation loss": within 3% of the per-caption path's
CPU_TARGETS = [  # (name, figure, bound, threshold, what it means)
    ("train_3_epochs", "speedups.train_3_epochs", ">=", 8.0, "3 epochs, cache built in the run, vs per-caption (x)"),
    ("train_3_epochs_cache_on_disk", "speedups.train_3_epochs_cache_on_disk", ">=", 8.0,
     "3 epochs, cache already on disk, vs per-caption (x)"),
    ("equal_val_loss", "training.val_loss_relative_difference", "<=", VAL_LOSS_TOLERANCE,
     "val loss relative difference, cache vs per-caption"),
    ("greedy_batched", "speedups.greedy_batched", ">=", 10.0, "batched greedy vs one-at-a-time sample() (x)"),
    ("beam_batched", "speedups.beam_batched", ">=", 3.0, "batched beam 3 vs one-at-a-time beam 3 (x)"),
    ("attention_beam_batched", "speedups.attention_beam_batched", ">=", 5.0,
     "attention decoder: batched beam 3 vs one-at-a-time beam 3 (x)"),
]
GPU_TARGETS = [
    ("feature_extraction", "feature_extraction.gpu_decode_images_per_s", ">=", 3000.0,
     "feature extraction, GPU JPEG decode (images/s)"),
    ("decoder_training", "training.cache.captions_per_s_after_first_epoch", ">=", 100_000.0,
     "decoder training from cache, after the warm-up epoch (captions/s)"),
    ("coco_epoch", "training.coco_epoch_seconds", "<=", 10.0, "COCO train2014 epoch from cache (s)"),
    ("beam_decoding", "decoding.beam3_batched_images_per_s", ">=", 5000.0, "batched beam-3 decoding (images/s)"),
    # 0.4x the LSTM's target: per beam and step the attention decoder does about 1.4x the multiply-adds of the
    # cuda preset's 2-layer LSTM (its cell also reads the 2048-d context; f_beta; scores over 49 cells) and
    # reorder_state copies each beam's 49x2048 grid and its projection (about 1 MB read and written: on an H200
    # as long as the arithmetic). Not measured yet (BENCHMARKS.md, "Attention decoder: plan").
    ("attention_beam_decoding", "attention.decoding.beam3_batched_images_per_s", ">=", 2000.0,
     "attention decoder: batched beam-3 decoding, 7x7 grid (images/s)"),
]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data of COCO's shape
# ---------------------------------------------------------------------------------------------------------------


def synthetic_words(count: int, seed: int = 0) -> list[str]:
    """`count` distinct pronounceable words (consonant-vowel syllables), in a seeded order."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = [a + b for a in syllables for b in syllables]
    if count > len(words):
        words += [a + b + c for a in syllables[:30] for b in syllables for c in syllables[:10]]
    order = np.random.default_rng(seed).permutation(len(words))
    return [words[i] for i in order[:count]]


def caption_lengths(rng: np.random.Generator, count: int) -> np.ndarray:
    """Words per caption, distributed like COCO's (mean about 11.3, 5th-95th percentile 8-16, tail past 40)."""
    lengths = np.rint(LENGTH_MEDIAN * np.exp(rng.normal(0.0, LENGTH_SIGMA, count))).astype(int)
    tail = rng.random(count) < TAIL_RATE
    lengths[tail] = rng.integers(TAIL_RANGE[0], TAIL_RANGE[1] + 1, int(tail.sum()))
    return np.maximum(lengths, MIN_LENGTH)


def write_jpeg(path: Path, colour: tuple[int, int, int], portrait: bool, seed: int) -> int:
    """A photo-like JPEG (smooth random structure, tinted by `colour`, with sensor-like noise); returns its size."""
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE[::-1] if portrait else JPEG_SIZE
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = 0.5 * np.asarray(coarse, dtype=np.float32) + 0.5 * np.array(colour, dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32)
    noise *= 8.0
    pixels += noise
    Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def _write_jpeg_job(job: tuple) -> int:
    """write_jpeg(*job), for ProcessPoolExecutor.map."""
    return write_jpeg(*job)


def make_bench_data(root: Path, n_train: int, n_val: int, word_list: int, seed: int = 0) -> dict:
    """A COCO-format dataset in train.py's 'sample' layout (images/{train,val}, annotations/captions_*.json).

    Each caption is "a <colour of the image> ..." followed by Zipf-distributed synthetic words, so the image
    matters to the loss and the two training paths can be compared by validation loss.
    """
    rng = np.random.default_rng(seed)
    words = synthetic_words(word_list, seed)
    weights = word_weights(len(words))
    paths = dataset_paths("sample", root)
    jobs, captions = [], []
    for split, count, first_id in (("train", n_train, 1), ("val", n_val, 1_000_000)):
        paths[f"{split}_images"].mkdir(parents=True, exist_ok=True)
        images, split_captions, split_jobs = synthetic_split(
            rng, paths[f"{split}_images"], split, range(first_id, first_id + count), words, weights, seed)
        annotations = [{"id": len(captions) + k, "image_id": image_id, "caption": caption}
                       for k, (image_id, caption) in enumerate(split_captions, start=1)]
        write_coco(paths[f"{split}_annotations"], images, annotations)
        captions += [caption for _, caption in split_captions]
        jobs += split_jobs
    return data_summary(n_train, n_val, [len(caption.split()) for caption in captions], write_jpegs(jobs))


def word_weights(count: int) -> np.ndarray:
    """Zipf-like probabilities of `count` words by rank (1 / (rank + 2) ** 1.1), so a few words are common."""
    weights = 1.0 / np.arange(3, count + 3) ** 1.1
    weights /= weights.sum()
    return weights


def image_captions(rng: np.random.Generator, colour: str, words: list[str], weights: np.ndarray) -> list[str]:
    """The 5 captions of one image: "a <colour>" then words drawn by `weights`, as long as COCO's captions."""
    return [" ".join(["a", colour, *(words[i] for i in rng.choice(len(words), size=length - 2, p=weights))])
            for length in caption_lengths(rng, 5)]


def synthetic_split(rng: np.random.Generator, folder: Path, split: str, image_ids: range, words: list[str],
                    weights: np.ndarray, seed: int) -> tuple[list[dict], list[tuple[int, str]], list[tuple]]:
    """One split's COCO image records, its (image id, caption) pairs and the write_jpeg jobs of its images."""
    images, captions, jobs = [], [], []
    for image_id in image_ids:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        portrait = bool(rng.random() < 0.2)
        name = f"{split}_{image_id:012d}.jpg"
        width, height = JPEG_SIZE[::-1] if portrait else JPEG_SIZE
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        jobs.append((folder / name, COLOURS[colour], portrait, seed * 10_000_019 + image_id))
        captions += [(image_id, caption) for caption in image_captions(rng, colour, words, weights)]
    return images, captions, jobs


def write_coco(path: Path, images: list[dict], annotations: list[dict]) -> None:
    """A COCO captions file of these images and annotations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": "bench.py synthetic data"}, "licenses": [], "images": images,
            "annotations": annotations}
    path.write_text(json.dumps(coco))


def write_jpegs(jobs: list[tuple]) -> list[int]:
    """Run the write_jpeg jobs in worker processes; returns the files' sizes in bytes."""
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(_write_jpeg_job, jobs, chunksize=8), total=len(jobs), desc="writing JPEGs",
                         unit="img", mininterval=1.0))


def data_summary(n_train: int, n_val: int, caption_words: list[int], jpeg_sizes: list[int]) -> dict:
    """What the generated data holds: images, captions, caption length statistics, mean JPEG size."""
    lengths = np.array(caption_words)
    return {
        "train_images": n_train,
        "val_images": n_val,
        "captions": len(lengths),
        "train_captions": 5 * n_train,
        "caption_length_mean": round(float(lengths.mean()), 2),
        "caption_length_p5": float(np.percentile(lengths, 5)),
        "caption_length_p95": float(np.percentile(lengths, 95)),
        "caption_length_max": int(lengths.max()),
        "jpeg_kib_mean": round(float(np.mean(jpeg_sizes)) / 1024, 1),
    }


def image_paths(root: Path, split: str) -> list[Path]:
    """The split's JPEGs in image-id order (the order of the feature cache's rows)."""
    paths = dataset_paths("sample", root)
    return coco_image_files(paths[f"{split}_annotations"], paths[f"{split}_images"])[1]


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer read next covers it; nothing off CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_mib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, then reset; None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def profiled(device: torch.device, folder: Path, work: Callable[[], object]) -> dict:
    """Run `work()` under profiling.profiler, waiting for the GPU before the record ends, and save the record in
    `folder` (profiling.write_profile); returns its summary."""
    with profiler(device) as prof:
        work()
        synchronize(device)
    return write_profile(prof, folder)


def measure_feature_extraction(cfg: BenchConfig, paths: list[Path], runtime: Runtime,
                               profile_dir: Path | None = None) -> dict:
    """Images/s of JPEG decode + resize + ResNet-50: features.extract_features (CPU decoding in DataLoader workers)
    and, on CUDA, batched GPU decoding. With `profile_dir`, then a torch.profiler record of 4 batches (GPU decoding
    on CUDA) in profile_dir/extract."""
    device = runtime.device
    torch.manual_seed(0)
    encoder = EncoderCNN(cfg.embed_size, pretrained=False).eval().to(device)
    cpu_decode_seconds, cpu_features = timed_extraction(cfg, runtime, encoder, paths, decode_on_device=False)
    result = {
        "images": len(paths),
        "cpu_decode_seconds": round(cpu_decode_seconds, 3),
        "cpu_decode_images_per_s": rate(len(paths), cpu_decode_seconds),
        "gpu_decode_seconds": None,
        "gpu_decode_images_per_s": None,
        "gpu_cpu_feature_cosine": None,
    }
    if device.type == "cuda":
        gpu_decode_seconds, gpu_features = timed_extraction(cfg, runtime, encoder, paths, decode_on_device=True)
        result |= {
            "gpu_decode_seconds": round(gpu_decode_seconds, 3),
            "gpu_decode_images_per_s": rate(len(paths), gpu_decode_seconds),
            # nvJPEG + torch resize vs libjpeg + PIL
            "gpu_cpu_feature_cosine": round(feature_cosine(gpu_features, cpu_features), 4),
        }
    result["cuda_peak_mib"] = cuda_peak_mib(device)
    if profile_dir is not None:
        first = paths[: 4 * cfg.extract_batch_size]
        result["profile"] = profiled(device, profile_dir / "extract", lambda: extract_features(
            encoder, first, *new_feature_arrays(len(first)), desc="profiling features",
            decode_on_device=device.type == "cuda", **extraction_options(cfg, runtime)))
    return result


def extraction_options(cfg: BenchConfig, runtime: Runtime) -> dict:
    """The keyword arguments of features.extract_features that every extraction of the benchmark shares."""
    return dict(image_size=cfg.image_size, mirror=False, runtime=runtime, batch_size=cfg.extract_batch_size,
                num_workers=cfg.num_workers)


def new_feature_arrays(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed outputs of extract_features for `count` images: features [count, 1, FEATURE_SIZE], readable."""
    return np.zeros((count, 1, FEATURE_SIZE), dtype=np.float16), np.zeros(count, dtype=bool)


def timed_extraction(cfg: BenchConfig, runtime: Runtime, encoder: EncoderCNN, paths: list[Path],
                     decode_on_device: bool) -> tuple[float, np.ndarray]:
    """Seconds of extract_features over `paths` (after a warm-up on CUDA) and the features [N, FEATURE_SIZE]."""
    device = runtime.device
    options = extraction_options(cfg, runtime) | {"decode_on_device": decode_on_device}
    out, readable = new_feature_arrays(len(paths))
    where = "GPU" if decode_on_device else "CPU"
    if device.type == "cuda":  # warm-up: cuDNN picks its algorithms on the first batches
        warm = paths[: 2 * cfg.extract_batch_size]
        extract_features(encoder, warm, out[: len(warm)], readable[: len(warm)], desc="warm-up", **options)
    synchronize(device)
    started = time.perf_counter()
    extract_features(encoder, paths, out, readable, desc=f"features ({where} decode)", **options)
    synchronize(device)
    return time.perf_counter() - started, out[:, 0]


def feature_cosine(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity of two extractions' features, each row against the same image's row of `reference`,
    measured from the mean of `reference`: random-ResNet features share a large offset, so compare what varies."""
    reference = torch.from_numpy(reference).float()
    centre = reference.mean(0)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(features).float() - centre, reference - centre)
    return float(cosine.mean())


def train_config(cfg: BenchConfig, root: Path, work: Path, name: str, cache: bool,
                 decoder: str = "lstm") -> TrainConfig:
    """The same data, sizes, batch size and schedule for every run; `cache` and `decoder` differ. The attention
    decoder (one LSTM cell) attends over a grid of image_size / 32 cells a side, the ResNet's last map."""
    config = TrainConfig(
        data="sample", data_root=str(root), image_size=cfg.image_size, mirror=cfg.mirror,
        vocab_threshold=cfg.vocab_threshold,
        pretrained=False, embed_size=cfg.embed_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        dropout=cfg.dropout, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, cache=cache,
        out_dir=str(work / name), cache_dir=str(work / "features"), num_workers=cfg.num_workers,
        extract_batch_size=cfg.extract_batch_size, device=cfg.device,
    )
    if decoder == "lstm":
        return config
    return replace(config, decoder=decoder, num_layers=1, grid=attention_grid(cfg.image_size),
                   attention_size=cfg.attention_size)


def attention_grid(image_size: int) -> int:
    """Cells a side of the attention decoder's grid: the ResNet-50's last map is image_size / 32 a side."""
    return max(1, image_size // 32)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers): unlike wall time, it hardly moves
    when other programs share the cores."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed_training(config: TrainConfig, device: torch.device) -> dict:
    """train.train(config) timed from the call to the return; setup is everything before the first epoch."""
    load_before = os.getloadavg()[0]
    synchronize(device)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = train(config)
    synchronize(device)
    gc.collect()  # the DataLoader's persistent workers exit (and are counted) when it is collected
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    metrics = result["metrics"]
    return {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute, before and after
        "setup_seconds": round(wall - result["seconds"], 2),
        "epoch_seconds": round(sum(m["epoch_seconds"] for m in metrics), 2),
        "captions_per_s": captions_per_s(metrics),
        # The first epoch pays the warm-up (cuDNN plans per caption length, the allocator, fused Adam's state): on a
        # GPU that is most of a 0.3-second bench epoch but nothing against a 1,600-step COCO epoch, so rates for
        # COCO come from the epochs after it.
        "captions_per_s_after_first_epoch": captions_per_s(metrics[1:] or metrics),
        "val_loss": result["val_loss"],
        "val_losses": [m["val_loss"] for m in metrics],
        "cache_built": result["cache_built"],
        "files": result["files"],
        "cache": result["cache"],
        "cuda_peak_mib": cuda_peak_mib(device),
    }


def captions_per_s(epochs: list[dict]) -> float:
    """Training throughput over these epochs' metrics: all their captions over all their seconds."""
    captions = sum(m["captions_per_second"] * m["epoch_seconds"] for m in epochs)
    return round(captions / sum(m["epoch_seconds"] for m in epochs), 1)


def measure_training(cfg: BenchConfig, root: Path, work: Path, device: torch.device,
                     profile_dir: Path | None = None) -> dict:
    """3 epochs from the feature cache (built in the run, then again with it on disk) and per caption. With
    `profile_dir`, then one more epoch from the cache whose steps 11-30 train.py profiles into profile_dir/train."""
    cold = timed_training(train_config(cfg, root, work, "cache", cache=True), device)
    # Forget the tokens held in memory, so the second run reads the disk caches as a new process would.
    vocabulary.forget_tokens_in_memory()
    warm = timed_training(train_config(cfg, root, work, "cache-warm", cache=True), device)
    per_caption = timed_training(train_config(cfg, root, work, "per-caption", cache=False), device)
    difference = abs(cold["val_loss"] - per_caption["val_loss"]) / per_caption["val_loss"]
    result = {
        "cache": cold,
        "cache_warm": warm,
        "per_caption": per_caption,
        "val_loss_relative_difference": round(difference, 4),
        "coco_epoch_seconds": round(COCO_TRAIN2014_CAPTIONS / cold["captions_per_s_after_first_epoch"], 2),
    }
    if profile_dir is not None:
        profiled = replace(train_config(cfg, root, work, "profile", cache=True), epochs=1,
                           profile=str(profile_dir / "train"))
        result["profile"] = train(profiled)["profile"]
    return result


def rate(images: int, seconds: float) -> float:
    """Images per second, to one decimal."""
    return round(images / seconds, 1)


@torch.no_grad()
def measure_decoding(cfg: BenchConfig, trained: dict, device: torch.device, profile_dir: Path | None = None) -> dict:
    """Images/s of sample() one image at a time, batched greedy, beam 3 batched and one at a time, from the
    cached features of the model trained above. With `profile_dir`, then a torch.profiler record of one batched
    beam-3 call in profile_dir/beam."""
    decoder, features = decoding_inputs(cfg, trained, device)
    single, batch = features[: cfg.one_at_a_time_images], cfg.decode_batch
    sample_seconds, sampled = one_at_a_time(
        lambda f: decoder.sample(f.view(1, 1, -1), max_len=MAX_DECODE_LEN), single, device)
    greedy_seconds, greedy = batched(lambda f: decoder.greedy_search(f, MAX_DECODE_LEN), features, batch, device)
    beam = timed_beam_search(decoder, features, cfg, device)
    result = decoding_counts(features, cfg) | {
        "sample_one_at_a_time_images_per_s": rate(len(single), sample_seconds),
        "greedy_batched_images_per_s": rate(len(features), greedy_seconds),
        "beam3_one_at_a_time_images_per_s": beam["beam3_one_at_a_time_images_per_s"],
        "beam3_batched_images_per_s": beam["beam3_batched_images_per_s"],
        # batched and one-at-a-time decoding of the same images should give the same captions
        "greedy_agreement": agreement(sampled, greedy),
        "beam3_agreement": beam["beam3_agreement"],
        "mean_caption_ids": round(float(np.mean([len(ids) for ids in greedy])), 2),
        "cuda_peak_mib": cuda_peak_mib(device),
    }
    if profile_dir is not None:
        result["profile"] = profiled(device, profile_dir / "beam",
                                     lambda: decoder.beam_search(features[:batch], 3, MAX_DECODE_LEN))
    return result


@torch.no_grad()
def decoding_inputs(cfg: BenchConfig, trained: dict, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder a timed_training run saved (either kind, via load_pretrained) and what it decodes from: the
    centre views of the first cfg.decode_images cached images, as the decoder takes them (decoder_features)."""
    files = trained["files"]
    encoder, decoder, _ = load_pretrained(files["encoder"], files["decoder"], files["vocab"], device)
    cached = np.load(Path(trained["cache"]) / "features.npy", mmap_mode="r")
    raw = torch.from_numpy(np.array(cached[: cfg.decode_images, 0])).float().to(device)
    return decoder, decoder_features(encoder, raw)


def decoder_features(encoder: EncoderCNN | GridEncoder, raw: torch.Tensor) -> torch.Tensor:
    """Cached ResNet features [N, *encoder.feature_shape] as the decoder takes them: the image embeddings [N, E]
    of an EncoderCNN (whose `embed` holds the standardisation), a GridEncoder's standardised grid [N, P, 2048]."""
    if isinstance(encoder, GridEncoder):
        return (raw - encoder.feature_mean) / encoder.feature_std
    return encoder.embed(raw)


def decoding_counts(features: torch.Tensor, cfg: BenchConfig) -> dict:
    """How many images are decoded in batches and one at a time, and the longest caption (ids)."""
    return {"images_batched": len(features), "images_one_at_a_time": min(cfg.one_at_a_time_images, len(features)),
            "max_len": MAX_DECODE_LEN}


def timed_beam_search(decoder: torch.nn.Module, features: torch.Tensor, cfg: BenchConfig,
                      device: torch.device) -> dict:
    """Beam 3 over the first cfg.one_at_a_time_images rows one at a time and over all rows cfg.decode_batch at a
    time: images/s of each, and the share of images whose two captions are the same."""
    single = features[: cfg.one_at_a_time_images]
    single_seconds, beams_single = one_at_a_time(
        lambda f: decoder.beam_search(f, 3, MAX_DECODE_LEN)[0], single, device)
    batched_seconds, beams = batched(
        lambda f: decoder.beam_search(f, 3, MAX_DECODE_LEN), features, cfg.decode_batch, device)
    return {
        "beam3_one_at_a_time_images_per_s": rate(len(single), single_seconds),
        "beam3_batched_images_per_s": rate(len(features), batched_seconds),
        "beam3_agreement": agreement(beams_single, beams),
    }


def measure_attention(cfg: BenchConfig, root: Path, work: Path, device: torch.device) -> dict:
    """The attention decoder on the same data and sizes: 3 epochs from its grid cache (built in the run; the
    build's seconds and the cache's size), then batched beam 3 vs one image at a time from the cached grids."""
    config = train_config(cfg, root, work, "attention", cache=True, decoder="attention")
    training = timed_training(config, device)
    training |= cache_figures(Path(training["cache"]))
    decoder, features = decoding_inputs(cfg, training, device)
    decoding = decoding_counts(features, cfg) | timed_beam_search(decoder, features, cfg, device)
    decoding["cuda_peak_mib"] = cuda_peak_mib(device)
    return {"grid": config.grid, "cells": config.grid**2, "attention_size": config.attention_size,
            "training": training, "decoding": decoding}


def cache_figures(folder: Path) -> dict:
    """A feature cache's build time (features.py records it in key.json) and the size of its features.npy."""
    info = json.loads((folder / "key.json").read_text())
    return {"cache_build_seconds": info["seconds"],
            "cache_mib": round((folder / "features.npy").stat().st_size / 2**20, 1)}


def one_at_a_time(decode: Callable[[torch.Tensor], list], features: torch.Tensor,
                  device: torch.device) -> tuple[float, list]:
    """Seconds to `decode` each feature row (an embedding or a grid) as a batch of one (after a warm-up call),
    and the outputs."""
    decode(features[:1])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    outputs = [decode(features[i : i + 1]) for i in range(len(features))]
    return time.perf_counter() - started, outputs


def batched(decode: Callable[[torch.Tensor], list], features: torch.Tensor, batch: int,
            device: torch.device) -> tuple[float, list]:
    """Seconds to `decode` the feature rows `batch` at a time (after a warm-up call), and one output per row."""
    decode(features[: min(8, len(features))])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    outputs = [ids for s in range(0, len(features), batch) for ids in decode(features[s : s + batch])]
    return time.perf_counter() - started, outputs


def agreement(outputs: list, others: list) -> float:
    """The share of images whose two decodings are the same, to three decimals."""
    return round(float(np.mean([a == b for a, b in zip(outputs, others, strict=False)])), 3)


def peak_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest finished child (DataLoader workers), from getrusage."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {
        "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1),
        "children_rss_peak_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 2**20, 1),
    }


def lookup(results: dict, dotted: str):
    """The figure at a dotted path such as 'speedups.greedy_batched'."""
    value = results
    for part in dotted.split("."):
        value = value[part]
    return value


def check_targets(results: dict, targets: list[tuple]) -> list[dict]:
    """PASS/FAIL per target: the figure must be at least (>=) or at most (<=) the threshold."""
    checked = []
    for name, dotted, bound, threshold, label in targets:
        value = lookup(results, dotted)
        passed = value is not None and (value >= threshold if bound == ">=" else value <= threshold)
        checked.append({"name": name, "label": label, "value": value, "bound": bound, "threshold": threshold,
                        "passed": passed})
    return checked


def run_benchmark(cfg: BenchConfig, work: Path, profile_dir: Path | None = None) -> dict:
    """Every measurement of one run, in a dict ready for JSON; with `profile_dir`, also torch.profiler records of
    extraction, training and beam search, made after the timed runs of each (so they do not slow them)."""
    runtime = start_runtime(cfg.device)
    device = runtime.device
    machine = machine_info(device)
    root = work / "data"
    data = generate_data(cfg, root)
    vocabulary.CACHE_DIR = work / "tokens"  # token caches of the throwaway data stay in the temp folder
    extraction = measure_feature_extraction(cfg, image_paths(root, "train"), runtime, profile_dir)
    training = measure_training(cfg, root, work, device, profile_dir)
    decoding = measure_decoding(cfg, training["cache"], device, profile_dir)
    attention = measure_attention(cfg, root, work, device)
    cold, warm, per_caption = training["cache"], training["cache_warm"], training["per_caption"]
    ratios = speedups(training, decoding, attention)
    for run in (cold, warm, per_caption, attention["training"]):
        del run["files"], run["cache"]
    phases = (extraction, cold, warm, per_caption, decoding, attention["training"], attention["decoding"])
    results = {
        "config": asdict(cfg),
        "machine": machine,
        "data": data,
        "feature_extraction": extraction,
        "training": training,
        "setup": {"first_seconds": cold["setup_seconds"], "second_seconds": warm["setup_seconds"],
                  "second_run_reused_feature_cache": not warm["cache_built"]},
        "decoding": decoding,
        "attention": attention,
        "memory": peak_rss_mib() | {"cuda_max_allocated_mib": cuda_max_allocated_mib(device, phases)},
        "speedups": ratios,
    }
    if profile_dir is not None:
        results["profile"] = {"folder": str(profile_dir), "extract": extraction.pop("profile"),
                              "train": training.pop("profile"), "beam": decoding.pop("profile")}
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = check_targets(results, CPU_TARGETS + (GPU_TARGETS if device.type == "cuda" else []))
    return results


def generate_data(cfg: BenchConfig, root: Path) -> dict:
    """make_bench_data for the preset's images (a fifth as many, at least 8, for validation), timed."""
    started = time.perf_counter()
    data = make_bench_data(root, cfg.images, max(cfg.images // 5, 8), cfg.word_list)
    data["generate_seconds"] = round(time.perf_counter() - started, 1)
    return data


def cuda_max_allocated_mib(device: torch.device, phases: tuple[dict, ...]) -> float | None:
    """The largest of the phases' CUDA peaks (their `cuda_peak_mib`); None off CUDA."""
    return max(phase["cuda_peak_mib"] or 0.0 for phase in phases) if device.type == "cuda" else None


def machine_info(device: torch.device) -> dict:
    """Where the run happens: date, platform, versions, cores, the device, and the load average at the start."""
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def speedups(training: dict, decoding: dict, attention: dict) -> dict:
    """The headline ratios, each against the baseline of the same run: training from the cache vs per caption,
    batched vs one-at-a-time decoding, the first run's setup vs the second's; the attention decoder's training
    rate against the pooled LSTM's (after the warm-up epoch, informative) and its batched vs one-at-a-time beam."""
    cold, warm, per_caption = training["cache"], training["cache_warm"], training["per_caption"]
    attention_training, attention_decoding = attention["training"], attention["decoding"]
    return {
        "train_3_epochs": round(per_caption["wall_seconds"] / cold["wall_seconds"], 2),
        "train_3_epochs_cache_on_disk": round(per_caption["wall_seconds"] / warm["wall_seconds"], 2),
        "train_3_epochs_cpu_time": round(per_caption["cpu_seconds"] / cold["cpu_seconds"], 2),
        "train_captions_per_s": round(cold["captions_per_s"] / per_caption["captions_per_s"], 2),
        "greedy_batched": round(
            decoding["greedy_batched_images_per_s"] / decoding["sample_one_at_a_time_images_per_s"], 2),
        "beam_batched": round(
            decoding["beam3_batched_images_per_s"] / decoding["beam3_one_at_a_time_images_per_s"], 2),
        "setup_second_run": round(cold["setup_seconds"] / warm["setup_seconds"], 2),
        "attention_train_captions_per_s_vs_lstm": round(
            attention_training["captions_per_s_after_first_epoch"] / cold["captions_per_s_after_first_epoch"], 3),
        "attention_beam_batched": round(attention_decoding["beam3_batched_images_per_s"]
                                        / attention_decoding["beam3_one_at_a_time_images_per_s"], 2),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    """The figures as one plain-text table, then PASS/FAIL per target."""
    rows = [*setup_rows(results), *training_rows(results), *decoding_rows(results), *attention_rows(results),
            *memory_rows(results), *profile_rows(results)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join([*lines, "", *(target_line(target) for target in results["targets"])])


def number(value: float | None, digits: int = 1) -> str:
    """A figure with thousands separators, or n/a where it was not measured."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def setup_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of what was measured: the data, the model, and feature extraction."""
    d, e, cfg = results["data"], results["feature_extraction"], results["config"]
    return [
        ("data", f"{d['train_images']} train + {d['val_images']} val JPEGs 640x480 ({d['jpeg_kib_mean']} KiB), "
                 f"{d['captions']} captions, length mean {d['caption_length_mean']}, p5-p95 "
                 f"{d['caption_length_p5']:.0f}-{d['caption_length_p95']:.0f}, max {d['caption_length_max']}"),
        ("model", f"{cfg['image_size']} px crops, embed {cfg['embed_size']}, hidden {cfg['hidden_size']}, "
                  f"{cfg['num_layers']} layer(s), batch {cfg['batch_size']}, {cfg['num_workers']} workers, "
                  f"device {cfg['device']}"),
        ("features, CPU decode", f"{number(e['cpu_decode_images_per_s'])} images/s"),
        ("features, GPU decode", f"{number(e['gpu_decode_images_per_s'])} images/s"),
    ]


def training_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of the training runs: throughput, 3-epoch times and losses, speedups, load, setup, COCO epoch."""
    t, s, machine, setup = results["training"], results["speedups"], results["machine"], results["setup"]
    return [
        ("train, from cache", f"{number(t['cache']['captions_per_s'])} captions/s, "
                              f"{number(t['cache']['captions_per_s_after_first_epoch'])} after the first epoch"),
        ("train, per caption", f"{number(t['per_caption']['captions_per_s'])} captions/s "
                               f"(x{s['train_captions_per_s']} from cache)"),
        ("3 epochs, cache (built in run)", f"{t['cache']['wall_seconds']:.1f} s, val loss {t['cache']['val_loss']:.4f}"),
        ("3 epochs, cache (on disk)", f"{t['cache_warm']['wall_seconds']:.1f} s, "
                                      f"val loss {t['cache_warm']['val_loss']:.4f}"),
        ("3 epochs, per caption", f"{t['per_caption']['wall_seconds']:.1f} s, "
                                  f"val loss {t['per_caption']['val_loss']:.4f}"),
        ("speedup, 3 epochs", f"x{s['train_3_epochs']} (cache built in run), "
                              f"x{s['train_3_epochs_cache_on_disk']} (cache on disk), "
                              f"x{s['train_3_epochs_cpu_time']} in CPU time (cache built in run)"),
        ("CPU time, 3 epochs", f"{t['cache']['cpu_seconds']:.1f} s cache (built in run), "
                               f"{t['per_caption']['cpu_seconds']:.1f} s per caption"),
        ("load average (1 min)", f"{machine['load_average_at_start'][0]} at start, "
                                 f"{machine['load_average_at_end'][0]} at end (other programs)"),
        ("setup, first / second run", f"{setup['first_seconds']:.2f} s / {setup['second_seconds']:.2f} s"),
        ("COCO epoch from cache", f"{t['coco_epoch_seconds']:.1f} s (extrapolated, 414,113 captions)"),
    ]


def decoding_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of decoding throughput, with speedups and agreement."""
    dec, s = results["decoding"], results["speedups"]
    return [
        ("decode, sample() 1 at a time", f"{number(dec['sample_one_at_a_time_images_per_s'])} images/s"),
        ("decode, greedy batched", f"{number(dec['greedy_batched_images_per_s'])} images/s "
                                   f"(x{s['greedy_batched']}, same captions {dec['greedy_agreement']:.0%})"),
        ("decode, beam 3 1 at a time", f"{number(dec['beam3_one_at_a_time_images_per_s'])} images/s"),
        ("decode, beam 3 batched", f"{number(dec['beam3_batched_images_per_s'])} images/s "
                                   f"(x{s['beam_batched']}, same captions {dec['beam3_agreement']:.0%})"),
    ]


def attention_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of the attention decoder: its grid, training from its cache (against the pooled LSTM's rate),
    the cache's build, and beam-3 decoding one at a time and batched."""
    a, s, cfg = results["attention"], results["speedups"], results["config"]
    t, dec = a["training"], a["decoding"]
    return [
        ("attention, model", f"{a['grid']}x{a['grid']} grid of 2048-d cells, attention {a['attention_size']}, "
                             f"embed {cfg['embed_size']}, hidden {cfg['hidden_size']}, one LSTM cell"),
        ("attention, grid cache", f"{t['cache_build_seconds']:.1f} s to build ({number(t['cache_mib'])} MiB), "
                                  f"setup {t['setup_seconds']:.1f} s"),
        ("attention, train from cache", f"{number(t['captions_per_s'])} captions/s, "
                                        f"{number(t['captions_per_s_after_first_epoch'])} after the first epoch "
                                        f"(x{s['attention_train_captions_per_s_vs_lstm']} the LSTM's)"),
        ("attention, 3 epochs", f"{t['wall_seconds']:.1f} s, val loss {t['val_loss']:.4f}"),
        ("attention, beam 3 1 at a time", f"{number(dec['beam3_one_at_a_time_images_per_s'])} images/s"),
        ("attention, beam 3 batched", f"{number(dec['beam3_batched_images_per_s'])} images/s "
                                      f"(x{s['attention_beam_batched']}, same captions {dec['beam3_agreement']:.0%})"),
    ]


def memory_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of peak memory: resident (the process, its largest worker) and CUDA."""
    memory = results["memory"]
    return [
        ("peak RSS (main / worker)", f"{memory['rss_peak_mib']:.0f} MiB / {memory['children_rss_peak_mib']:.0f} MiB"),
        ("CUDA max allocated", f"{number(memory['cuda_max_allocated_mib'], 0)} MiB"),
    ]


def profile_rows(results: dict) -> list[tuple[str, str]]:
    """Table rows of the --profile records, one per phase; none without --profile."""
    profile = results.get("profile") or {}
    return [(f"profile, {phase}", profile_line(summary, Path(profile["folder"]) / phase))
            for phase, summary in profile.items() if phase != "folder"]


def target_line(target: dict) -> str:
    """One target's verdict line: PASS or FAIL, what it measures, the figure and the bound."""
    value = target["value"]
    shown = "n/a" if value is None else f"{value:,.4g}"
    verdict = "PASS" if target["passed"] else "FAIL"
    return f"{verdict}  {target['label']}: {shown} (target {target['bound']} {target['threshold']:,.4g})"


def write_json(results: dict, path: Path) -> None:
    """The results as JSON, written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to train and decode (default: cuda when available, else cpu)")
    parser.add_argument("--images", type=positive_int, help="training images, 5 captions each (default: preset)")
    parser.add_argument("--image-size", type=positive_int, help="square crop fed to the ResNet (default: preset)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (under a minute on 2 CPU cores)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also record torch.profiler traces of extraction, training and beam search into DIR "
                             "(after the timed runs; see BENCHMARKS.md)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    cfg = PRESETS["quick" if args.quick else device]
    cfg = replace(cfg, device=device, images=args.images or cfg.images, image_size=args.image_size or cfg.image_size)
    if cfg.images < 8 or cfg.image_size < 32:
        print("error: --images must be >= 8 and --image-size >= 32", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            results = run_benchmark(cfg, Path(tmp), args.profile)
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(format_table(results), flush=True)
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
