"""Training: the loop behind 2_Training.ipynb and `python train.py --data sample|coco`.

Read it top to bottom: `train` runs `setup` (data, vocabulary, model, features, optimiser, where to start), then
for each epoch `train_epoch` (the steps) and `end_epoch` (validation, weights, metrics, checkpoint), then `finish`.
The settings are TrainConfig (config.py); the feature cache is features.py, processes and seeds runtime.py,
checkpoint.pt checkpoints.py, the loss plot plots.py, the profiler profiling.py.

The ResNet-50 is frozen, so by default `embed` + the decoder train from its cached features (features.py);
`--train-cnn` (fine-tunes resnet.7) and `--no-cache` run the JPEGs through the ResNet at every step instead.
`torchrun --nproc_per_node=N train.py ...` trains with DistributedDataParallel.

Training from the cache, every random choice is a function of (seed, rank, epoch, step) -- dropout is reseeded
before each step, the views of an epoch come from a generator seeded by (seed, rank, epoch), batches from the
sampler's (seed, epoch) -- so the position in the run is the whole random state: on the CPU a run killed at any
moment and resumed with `--resume` ends with bitwise the same weights as one that never stopped. A resumed run
continues at the same batch with the same schedule everywhere, but two things depend on where it (re)started: on
a GPU the dropout masks (cuDNN's dropout generator is seeded once per epoch, see `runtime.reseed`), and on the
image path (--no-cache, --train-cnn) the random crops and flips drawn in the DataLoader workers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from caption_sources import CaptionFileError, caption_splits
from checkpoints import (
    check_resumable,
    check_steps_per_epoch,
    load_checkpoint,
    remove_earlier_run,
    save_checkpoint,
    weights_digest,
)
from config import (
    CAPTION_FILE_DATA,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    build_parser,
    positional_captions,
    resolve_config,
)
from data_loader import SAMPLE_VARIANTS, BucketBatchSampler, dataset_paths, get_loader, locate_caption_file
from datasets import CaptionTable, Split, build_vocabulary, caption_table, read_split
from features import (
    FeatureCache,
    FeatureTable,
    feature_cache,
    feature_stats,
    features_in_memory,
    sampled_feature_stats,
)
from fileio import atomic_write
from image_io import build_transform
from model import (
    AttentionDecoder,
    Captioner,
    DecoderRNN,
    EncoderCNN,
    GridEncoder,
    PretrainedWeightsUnavailable,
    atomic_torch_save,
    attention_penalty,
    save_weights,
)
from plots import plot_metrics
from profiling import profile_line, step_profiler
from runtime import (
    DROPOUT_STREAM,
    LOADER_STREAM,
    VIEW_STREAM,
    Runtime,
    autocast,
    decodes_on_device,
    derived_seed,
    reseed,
    start_runtime,
)
from sample_data import make_sample_dataset
from vocabulary import Vocabulary

PLOT_EVERY_SECONDS = 60  # redraw loss.png after an epoch when this long has passed since the last drawing


def train(cfg: TrainConfig) -> dict:
    """Train a captioner as `cfg` says; returns the final metrics and the paths of the files written."""
    cfg = resolve_config(cfg)
    runtime = start_runtime(cfg.device)
    try:
        run = setup(cfg, runtime)
        started = time.perf_counter()
        run.model.train()
        with run.profiler or contextlib.nullcontext():
            while run.epoch <= cfg.epochs:
                tally = train_epoch(run)
                end_epoch(run, tally)
        return finish(run, time.perf_counter() - started)
    finally:
        runtime.close()


# ---------------------------------------------------------------------------------------------------------------
# What a run holds between its steps
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The splits and vocabulary of a run and where its batches come from."""

    train_split: Split
    val_split: Split
    vocab: Vocabulary
    train_table: CaptionTable  # the training captions (on the device when training from features)
    train_features: FeatureTable  # cached features, or zeros (blind); unused on the image path
    sampler: BucketBatchSampler  # the training batches (on the image path: the loader's own)
    loader: torch.utils.data.DataLoader | None  # image batches; None when training from features
    val_table: CaptionTable | None  # None: the validation features are computed from the images every epoch
    val_features: FeatureTable | None
    train_cache: FeatureCache | None


def fresh_progress() -> dict:
    """The running sums of an epoch that has not started: what a checkpoint stores to continue one mid-way."""
    return {"loss_sum": 0.0, "tokens": 0, "captions": 0, "seconds": 0.0}


class DivergenceWatch:
    """Remembers on the device the first step whose loss was not finite (no host sync per step); `check` raises."""

    NO_BAD_STEP = torch.iinfo(torch.long).max

    def __init__(self, runtime: Runtime, steps_per_epoch: int, lr: float, checkpoint_path: Path):
        self.runtime, self.steps_per_epoch, self.lr, self.checkpoint_path = runtime, steps_per_epoch, lr, checkpoint_path
        self.first_bad = torch.full((), self.NO_BAD_STEP, dtype=torch.long, device=runtime.device)

    def record(self, loss: torch.Tensor, global_step: int) -> None:
        bad_now = torch.where(torch.isfinite(loss), self.NO_BAD_STEP, global_step)
        torch.minimum(self.first_bad, bad_now, out=self.first_bad)

    def check(self) -> None:
        """Raise TrainingDiverged if any process has seen a non-finite loss (one host sync)."""
        bad = self.first_bad.clone()
        if self.runtime.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad_step = int(bad)
        if bad_step != self.NO_BAD_STEP:
            saved = (f"the last good checkpoint {self.checkpoint_path} is intact" if self.checkpoint_path.exists()
                     else "no checkpoint had been written")
            raise TrainingDiverged(
                f"training diverged: non-finite loss at epoch {bad_step // self.steps_per_epoch + 1}, step "
                f"{bad_step % self.steps_per_epoch + 1} (lr {self.lr:g}); stopped without saving, {saved}; "
                "try a lower --lr or --grad-clip"
            )


@dataclass
class Run:
    """Everything a training run holds between steps: settings, data, model, optimiser, and where it stands."""

    cfg: TrainConfig
    runtime: Runtime
    data: TrainingData
    model: Captioner
    ddp: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[nn.Parameter]
    backbone: str  # the ResNet's fingerprint
    watch: DivergenceWatch
    epoch: int = 1
    start_step: int = 0  # the first step of `epoch` still to run
    metrics: list[dict] = field(default_factory=list)
    progress: dict = field(default_factory=fresh_progress)  # the sums of `epoch` before `start_step`
    profiler: torch.profiler.profile | None = None
    profile_summary: dict = field(default_factory=dict)
    last_checkpoint: float = field(default_factory=time.perf_counter)
    last_plot: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.sampler)


# ---------------------------------------------------------------------------------------------------------------
# Setup: data, model, optimiser, the position to start from
# ---------------------------------------------------------------------------------------------------------------


def setup(cfg: TrainConfig, runtime: Runtime) -> Run:
    """Everything before the first step, in order; a bad file or flag fails here, before any long work."""
    out = Path(cfg.out_dir)
    paths = prepare_dataset(cfg, runtime)
    train_split = read_split(paths["train_annotations"], paths["train_images"])
    val_split = read_split(paths["val_annotations"], paths["val_images"])
    vocab = build_vocabulary(paths["train_annotations"], cfg.vocab_threshold, out / "vocab.pkl")
    checkpoint = load_checkpoint(out / "checkpoint.pt") if cfg.resume else None
    model, backbone = build_model(cfg, len(vocab))
    if checkpoint is not None:
        check_resumable(checkpoint, cfg, vocab, backbone, runtime.world_size, out / "checkpoint.pt")
        load_trained_weights(model, checkpoint, out / "checkpoint.pt")
    model.to(runtime.device)
    prepare_out_dir(cfg, vocab, backbone, runtime, fresh=checkpoint is None)
    data = build_data(cfg, runtime, model.encoder, backbone, train_split, val_split, vocab)
    if checkpoint is None and not cfg.blind:  # a resumed run has them from the checkpoint
        set_feature_stats(model, data, cfg, runtime)
    if runtime.world_size > 1:  # computed from images, each GPU's may differ in the last bits: rank 0's for all
        dist.broadcast(model.feature_mean, 0)
        dist.broadcast(model.feature_std, 0)
    steps_per_epoch = len(data.sampler)
    if checkpoint is not None:
        check_steps_per_epoch(checkpoint, steps_per_epoch, out / "checkpoint.pt")
    optimizer, scheduler, trainable = build_optimizer(model, cfg, steps_per_epoch)
    watch = DivergenceWatch(runtime, steps_per_epoch, cfg.lr, out / "checkpoint.pt")
    run = Run(cfg, runtime, data, model, wrap_ddp(model, runtime), optimizer, scheduler, trainable, backbone, watch)
    if checkpoint is not None:
        resume_position(run, checkpoint)
    if cfg.profile is not None and runtime.is_main:
        steps_left = cfg.epochs * steps_per_epoch - ((run.epoch - 1) * steps_per_epoch + run.start_step)
        run.profiler = step_profiler(Path(cfg.profile), runtime.device, steps_left, run.profile_summary)
    print_plan(run)
    return run


def prepare_dataset(cfg: TrainConfig, runtime: Runtime) -> dict[str, Path]:
    """The dataset's file paths: a caption file's splits are made from it (and said how), a generated set is made
    first when it is missing, COCO must be there."""
    if cfg.captions is not None or cfg.data in CAPTION_FILE_DATA:
        try:
            files = (cfg.captions, cfg.images) if cfg.captions is not None else locate_caption_file(cfg.data_root, cfg.data)
            splits = caption_splits(*files)
        except CaptionFileError as e:
            raise TrainingError(str(e)) from None
        if runtime.is_main:
            print(splits.summary, flush=True)
        return splits.paths
    paths = dataset_paths(cfg.data, cfg.data_root)
    if cfg.data in SAMPLE_VARIANTS and not paths["train_annotations"].exists():
        if runtime.is_main:
            print(f"making the {cfg.data} dataset in {paths['root']} ...", flush=True)
            make_sample_dataset(paths["root"], variant=SAMPLE_VARIANTS[cfg.data])
        runtime.barrier()
    if cfg.data == "coco" and not paths["train_annotations"].exists():
        raise TrainingError(f"{paths['train_annotations']}: not found; get COCO with "
                            f"`python prepare_data.py coco --root {paths['root']}`")
    return paths


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[Captioner, str]:
    """The captioner (pooled LSTM or attention) with its initial weights drawn from `cfg.seed`, and its backbone's
    fingerprint."""
    torch.manual_seed(cfg.seed)  # the initial weights of embed and the decoder (the backbone has its own seed)
    backbone = dict(pretrained=cfg.pretrained, weights_path=cfg.weights_path, train_cnn=cfg.train_cnn,
                    backbone_seed=cfg.backbone_seed)
    try:
        if cfg.decoder == "attention":
            encoder = GridEncoder(cfg.grid, **backbone)
            decoder = AttentionDecoder(cfg.attention_size, cfg.embed_size, cfg.hidden_size, vocab_size,
                                       dropout=cfg.dropout)
        else:
            encoder = EncoderCNN(cfg.embed_size, **backbone)
            decoder = DecoderRNN(cfg.embed_size, cfg.hidden_size, vocab_size, cfg.num_layers, cfg.dropout)
    except PretrainedWeightsUnavailable as e:
        raise TrainingError(str(e)) from None
    return Captioner(encoder, decoder), encoder.backbone_fingerprint()


def load_trained_weights(model: Captioner, checkpoint: dict, path: Path) -> None:
    """The checkpoint's trained weights into `model` (the frozen ResNet is not in it)."""
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    if unexpected or any(not key.startswith("encoder.resnet.") for key in missing):
        raise TrainingError(f"{path}: its model weights do not fit this model")


def prepare_out_dir(cfg: TrainConfig, vocab: Vocabulary, backbone: str, runtime: Runtime, fresh: bool) -> None:
    """The output folder with this run's vocab.pkl and train_config.json (an earlier run's weights go first)."""
    out = Path(cfg.out_dir)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            remove_earlier_run(out)
        vocab.save(out / "vocab.pkl")
        config_json = asdict(cfg) | {"vocab_size": len(vocab), "backbone_fingerprint": backbone}
        with atomic_write(out / "train_config.json", "w") as f:
            f.write(json.dumps(config_json, indent=2) + "\n")
    runtime.barrier()


def build_data(cfg: TrainConfig, runtime: Runtime, encoder: EncoderCNN, backbone: str, train_split: Split,
               val_split: Split, vocab: Vocabulary) -> TrainingData:
    """The feature caches (built when missing), the caption tables and the batch source of the run."""
    from_features = cfg.cache and not cfg.train_cnn and not cfg.blind
    train_cache = val_cache = None
    if from_features:
        extract = dict(image_size=cfg.image_size, runtime=runtime, batch_size=cfg.extract_batch_size,
                       num_workers=cfg.num_workers, decode_on_device=decodes_on_device(cfg.gpu_decode, runtime),
                       cache_dir=cfg.cache_dir, backbone=backbone)
        views = ("centre", "mirror") if cfg.mirror else ("centre",)  # validation uses the centre view only
        train_cache = feature_cache(encoder, train_split, views, **extract)
        val_cache = feature_cache(encoder, val_split, ("centre",), **extract)
    everything = np.ones(len(train_split.image_ids), dtype=bool)
    train_table = caption_table(train_split, vocab, train_cache.readable if train_cache else everything)
    val_table = val_features = loader = None
    if from_features or cfg.blind:
        sampler = BucketBatchSampler(train_table.lengths, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                     num_replicas=runtime.world_size, rank=runtime.rank)
        train_table = train_table.to(runtime.device)
        val_readable = val_cache.readable if val_cache else np.ones(len(val_split.image_ids), dtype=bool)
        val_table = caption_table(val_split, vocab, val_readable).to(runtime.device)
        val_features = FeatureTable(val_cache, runtime.device, encoder.feature_shape)
    else:
        loader = get_loader(
            build_transform(cfg.image_size, train=True, flip=not positional_captions(cfg)), "train", cfg.batch_size,
            vocab_file=str(Path(cfg.out_dir) / "vocab.pkl"), vocab_from_file=True, num_workers=cfg.num_workers,
            annotations_file=train_split.annotations, img_folder=train_split.image_folder, seed=cfg.seed, num_replicas=runtime.world_size, rank=runtime.rank, pin_memory=runtime.cuda,
        )
        sampler = loader.batch_sampler
    train_features = FeatureTable(train_cache, runtime.device, encoder.feature_shape)
    return TrainingData(train_split, val_split, vocab, train_table, train_features, sampler, loader, val_table,
                        val_features, train_cache)


def set_feature_stats(model: Captioner, data: TrainingData, cfg: TrainConfig, runtime: Runtime) -> None:
    """The standardisation of the ResNet features (see Captioner): from the cache, else from sampled images."""
    if data.train_cache is not None:
        mean, std = feature_stats(data.train_cache.features, data.train_cache.readable)
    else:
        mean, std = sampled_feature_stats(model.encoder, data.train_split.paths, cfg, runtime)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_fraction: float) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_fraction` of it at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: Captioner, cfg: TrainConfig, steps_per_epoch: int):
    """Adam over what trains (resnet.7 at its own rate with --train-cnn), its warmup-cosine schedule, and the
    trainable parameters (for gradient clipping)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    cnn_params = list(model.encoder.resnet[7].parameters()) if cfg.train_cnn else []
    groups = [{"params": [p for p in trainable if all(p is not q for q in cnn_params)], "lr": cfg.lr}]
    if cnn_params:
        groups.append({"params": cnn_params, "lr": cfg.cnn_lr})
    # fused: one kernel (GPU) or one pass (CPU) over all parameters; on the CPU 3x faster than foreach
    optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay, fused=True)
    total_steps = cfg.epochs * steps_per_epoch
    schedule = partial(lr_factor, total_steps=total_steps, warmup_steps=int(cfg.warmup_fraction * total_steps),
                       min_fraction=cfg.min_lr_fraction)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), trainable


def wrap_ddp(model: Captioner, runtime: Runtime) -> nn.Module:
    """The model under DistributedDataParallel when there are several processes, else the model itself."""
    if runtime.world_size == 1:
        return model
    # no buffer broadcast before every forward: the BatchNorm statistics and feature stats never change
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.cuda else None,
                                   **no_buffer_sync)


def resume_position(run: Run, checkpoint: dict) -> None:
    """Continue where the checkpoint stopped: optimiser, schedule, epoch and step, the epoch's sums, metrics."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.epoch, run.start_step, run.metrics = checkpoint["epoch"], checkpoint["step"], checkpoint["metrics"]
    run.progress = checkpoint["progress"]
    if run.runtime.is_main:
        where = (f"epoch {run.epoch}, step {run.start_step} of {run.steps_per_epoch}" if run.epoch <= run.cfg.epochs
                 else "the end")
        print(f"resuming {run.checkpoint_path} at {where}", flush=True)


def print_plan(run: Run) -> None:
    """One line: what trains on what, where, and into which folder."""
    cfg, data, runtime = run.cfg, run.data, run.runtime
    if not runtime.is_main:
        return
    source = "images" if data.loader is not None else "zero features (blind)" if cfg.blind else "cached features"
    cache = data.train_cache
    skipped = f", {cache.skipped} unreadable images skipped" if cache and cache.skipped else ""
    print(f"training on {len(data.train_table.rows)} captions of {cfg.captions or cfg.data} ({source}, {cfg.image_size}px{skipped}), "
          f"{len(data.vocab)} words, {run.steps_per_epoch} steps/epoch, {runtime.world_size} process(es) on "
          f"{runtime.device} -> {run.out}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# An epoch: its batches and steps
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EpochTally:
    """An epoch's running sums on this process: the loss on the device (no host sync per step), words, captions."""

    loss_sum: torch.Tensor
    tokens: int
    captions: int
    seconds_before: float  # time spent in this epoch before a resume
    started: float
    window_loss: torch.Tensor  # since the last read-out
    window_tokens: int = 0

    @classmethod
    def start(cls, progress: dict, runtime: Runtime) -> EpochTally:
        """From a checkpoint's `progress` (rank 0 carries the sums of all processes; the others start at 0)."""
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
        tokens = captions = 0
        if runtime.is_main:
            loss_sum += progress["loss_sum"]
            tokens, captions = progress["tokens"], progress["captions"]
        window = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
        return cls(loss_sum, tokens, captions, progress["seconds"], started, window)

    def add(self, loss: torch.Tensor, tokens: int, captions: int) -> None:
        self.loss_sum += loss.detach() * tokens
        self.window_loss += loss.detach() * tokens
        self.tokens += tokens
        self.window_tokens += tokens
        self.captions += captions

    def window_mean(self) -> float:
        """The mean loss per word since the last call (one host sync)."""
        mean = float(self.window_loss) / max(self.window_tokens, 1)
        self.window_loss.zero_()
        self.window_tokens = 0
        return mean

    def totals(self, runtime: Runtime) -> dict:
        """The sums of all processes and the epoch's seconds so far: a checkpoint's `progress`."""
        loss_sum, tokens, captions = runtime.sum([float(self.loss_sum), self.tokens, self.captions])
        seconds = self.seconds_before + time.perf_counter() - self.started
        return {"loss_sum": loss_sum, "tokens": int(tokens), "captions": int(captions), "seconds": seconds}


def train_epoch(run: Run) -> EpochTally:
    """The steps of `run.epoch` from `run.start_step`: a progress bar, loss read-outs and timed checkpoints."""
    cfg, runtime = run.cfg, run.runtime
    tally = EpochTally.start(run.progress, runtime)
    steps = epoch_batches(run)
    with tqdm(total=run.steps_per_epoch, initial=run.start_step, desc=f"epoch {run.epoch}/{cfg.epochs}",
              unit="batch", disable=not runtime.is_main, dynamic_ncols=True) as bar:
        for step, (captions, features, images, weight) in enumerate(steps, start=run.start_step):
            reseed(derived_seed(cfg.seed, runtime.rank, run.epoch, step, DROPOUT_STREAM), runtime,
                   gpu=step == run.start_step)
            global_step = (run.epoch - 1) * run.steps_per_epoch + step
            loss = train_step(run, captions, features, images, weight, global_step)
            tally.add(loss, captions.numel() * int(weight), len(captions) * int(weight))
            bar.update(1)
            if run.profiler is not None:
                run.profiler.step()
            if (step + 1) % cfg.log_every == 0:
                read_out(run, tally, bar, done=step + 1)
    return tally


def epoch_batches(run: Run) -> Iterator[tuple]:
    """The epoch's batches from `run.start_step` on, as (captions, features, images, weight) on the device."""
    cfg, data, runtime = run.cfg, run.data, run.runtime
    data.sampler.set_epoch(run.epoch)
    if data.loader is None:
        batches = list(data.sampler)
        flat, offsets = epoch_index(batches, runtime.device)
        view_rng = torch.Generator().manual_seed(derived_seed(cfg.seed, runtime.rank, run.epoch, 0, VIEW_STREAM))
        views = torch.randint(data.train_features.views, (len(flat),), generator=view_rng).to(runtime.device)
        return feature_batches(data.train_table, data.train_features, batches, flat, offsets, views, run.start_step)
    data.sampler.set_epoch(run.epoch, run.start_step)
    reseed(derived_seed(cfg.seed, runtime.rank, run.epoch, run.start_step, LOADER_STREAM), runtime)
    return (image_batch(batch, runtime, cfg.image_size, data.vocab) for batch in data.loader)


def epoch_index(batches: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """An epoch's batches as one index tensor on `device` (one copy per epoch, none per step) and their offsets."""
    offsets = np.cumsum([0] + [len(batch) for batch in batches]).tolist()
    flat = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
    return flat.to(device), offsets


def feature_batches(table: CaptionTable, features: FeatureTable, batches: list[list[int]], flat: torch.Tensor,
                    offsets: list[int], views: torch.Tensor, start: int) -> Iterator[tuple]:
    """Batches from the caption table and the features, each caption's image in the view drawn for it."""
    for s in range(start, len(batches)):
        index = flat[offsets[s] : offsets[s + 1]]
        captions = table.tokens[index, : table.lengths[batches[s][0]]]
        yield captions, features.gather(table.rows[index], views[offsets[s] : offsets[s + 1]]), None, 1.0


def image_batch(batch, runtime: Runtime, image_size: int, vocab: Vocabulary) -> tuple:
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


def train_step(run: Run, captions: torch.Tensor, features: torch.Tensor | None, images: torch.Tensor | None,
               weight: float, global_step: int) -> torch.Tensor:
    """One optimiser step on `caption_loss` of a batch; returns its cross-entropy per word (on the device)."""
    cfg = run.cfg
    with autocast(run.runtime):
        logits, alphas = run.ddp(captions, features=features, images=images)
    loss, cross_entropy = caption_loss(logits, captions, alphas, cfg.alpha_c)
    loss, cross_entropy = loss * weight, cross_entropy * weight
    if global_step + 1 == cfg.nan_at_step:
        loss = loss * float("nan")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.watch.record(loss, global_step)
    return cross_entropy


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, alphas: torch.Tensor | None,
                 alpha_c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective and the cross-entropy per word in it: for an attention decoder (`alphas`
    [B, L, P]) the objective adds its doubly stochastic penalty weighted by `alpha_c`. The metrics report the
    cross-entropy alone, so that the two decoders' losses compare."""
    cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), captions.flatten())
    if alphas is None:
        return cross_entropy, cross_entropy
    return cross_entropy + alpha_c * attention_penalty(alphas), cross_entropy


def read_out(run: Run, tally: EpochTally, bar: tqdm, done: int) -> None:
    """Every log_every steps: stop if diverged, show the loss, and write checkpoint.pt when it is due."""
    run.watch.check()
    bar.set_postfix(loss=f"{tally.window_mean():.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2g}")
    due = time.perf_counter() - run.last_checkpoint >= 60 * run.cfg.checkpoint_minutes
    if done < run.steps_per_epoch and run.runtime.agree(due):  # rank 0 decides for all
        write_checkpoint(run, run.epoch, done, tally.totals(run.runtime))


def write_checkpoint(run: Run, epoch: int, step: int, progress: dict) -> None:
    """checkpoint.pt for continuing at (epoch, step); checks the loss first; all processes call it."""
    run.watch.check()
    if run.runtime.is_main:
        save_checkpoint(run.checkpoint_path, run.model, run.optimizer, run.scheduler, cfg=run.cfg,
                        vocab=run.data.vocab, backbone=run.backbone, world_size=run.runtime.world_size,
                        steps_per_epoch=run.steps_per_epoch, epoch=epoch, step=step, progress=progress,
                        metrics=run.metrics)
    run.last_checkpoint = time.perf_counter()


# ---------------------------------------------------------------------------------------------------------------
# The end of an epoch, and of the run
# ---------------------------------------------------------------------------------------------------------------


def end_epoch(run: Run, tally: EpochTally) -> None:
    """Validate, record the epoch's metrics, save its weights and a checkpoint at the start of the next."""
    run.watch.check()
    totals = tally.totals(run.runtime)
    data = run.data
    val_loss = validate(run.model, data.val_table, data.val_features, data.val_split, data.vocab, run.cfg,
                        run.runtime)
    seconds = totals["seconds"]
    record = {
        "epoch": run.epoch,
        "step": run.epoch * run.steps_per_epoch,
        "train_loss": totals["loss_sum"] / totals["tokens"],
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": round(seconds, 2),
        "elapsed_seconds": round(sum(m["epoch_seconds"] for m in run.metrics) + seconds, 2),
        "captions_per_second": round(totals["captions"] / seconds, 1),
    }
    run.metrics.append(record)
    if run.runtime.is_main:
        save_epoch(run, record)
    write_checkpoint(run, run.epoch + 1, 0, fresh_progress())
    run.epoch, run.start_step, run.progress = run.epoch + 1, 0, fresh_progress()


def save_epoch(run: Run, record: dict) -> None:
    """encoder-N.pkl, decoder-N.pkl, metrics.jsonl and (not after every short epoch) loss.png; one line printed."""
    out, epoch, epochs = run.out, run.epoch, run.cfg.epochs
    atomic_torch_save(run.model.encoder_state(), out / f"encoder-{epoch}.pkl")
    save_weights(run.model.decoder, out / f"decoder-{epoch}.pkl")
    with atomic_write(out / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in run.metrics))
    if epoch == epochs or time.perf_counter() - run.last_plot >= PLOT_EVERY_SECONDS:
        plot_metrics(out / "metrics.jsonl", out / "loss.png")  # ~0.4 s
        run.last_plot = time.perf_counter()
    print(f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
          f"perplexity {record['val_perplexity']:.2f}, {record['captions_per_second']:.0f} captions/s, "
          f"{record['epoch_seconds']:.1f} s", flush=True)


@torch.no_grad()
def validate(model: Captioner, table: CaptionTable | None, features: FeatureTable | None, split: Split,
             vocab: Vocabulary, cfg: TrainConfig, runtime: Runtime) -> float:
    """Mean cross-entropy per word on the validation captions (centre view), averaged over all processes (for
    either decoder: the attention penalty is left out, so the two compare).

    Without a cache the validation images go through the current ResNet first (in memory, not cached).
    """
    model.eval()
    if table is None:
        computed = features_in_memory(model.encoder, split.paths, cfg, runtime, "validation images")
        table = caption_table(split, vocab, computed.readable).to(runtime.device)
        features = FeatureTable(computed, runtime.device, model.encoder.feature_shape)
    sampler = BucketBatchSampler(table.lengths, cfg.batch_size, shuffle=False, num_replicas=runtime.world_size,
                                 rank=runtime.rank)
    batches = list(sampler)
    flat, offsets = epoch_index(batches, runtime.device)
    total = torch.zeros((), dtype=runtime.sum_dtype, device=runtime.device)
    tokens = 0
    centre = torch.zeros(len(flat), dtype=torch.long, device=runtime.device)
    for captions, batch_features, _, _ in tqdm(feature_batches(table, features, batches, flat, offsets, centre, 0),
                                               total=len(batches), desc="validation", unit="batch", leave=False,
                                               disable=not runtime.is_main):
        with autocast(runtime):
            logits, _ = model(captions, features=batch_features)
        total += F.cross_entropy(logits.float().flatten(0, 1), captions.flatten(), reduction="sum")
        tokens += captions.numel()
    model.train()
    total_sum, token_sum = runtime.sum([float(total), tokens])
    return total_sum / token_sum


def finish(run: Run, seconds: float) -> dict:
    """Check that every process ends with the same weights; the run's summary with the files it wrote."""
    if run.profile_summary:
        print(f"profile: {profile_line(run.profile_summary, Path(run.cfg.profile))}", flush=True)
    digest = weights_digest(run.model)
    if run.runtime.world_size > 1:
        digests = [None] * run.runtime.world_size
        dist.all_gather_object(digests, digest)
        print(f"rank {run.runtime.rank}/{run.runtime.world_size}: weights sha256 {digest}", flush=True)
        if len(set(digests)) > 1:
            raise RuntimeError(f"the processes ended with different weights: {digests}")
    out, epochs, last = run.out, run.cfg.epochs, run.metrics[-1] if run.metrics else {}
    files = {"encoder": out / f"encoder-{epochs}.pkl", "decoder": out / f"decoder-{epochs}.pkl",
             "vocab": out / "vocab.pkl", "config": out / "train_config.json", "checkpoint": run.checkpoint_path,
             "metrics": out / "metrics.jsonl", "plot": out / "loss.png"}
    cache = run.data.train_cache
    return {
        "out_dir": str(out),
        "epochs": epochs,
        "val_loss": last.get("val_loss"),
        "val_perplexity": last.get("val_perplexity"),
        "captions_per_second": last.get("captions_per_second"),
        "seconds": round(seconds, 1),
        "metrics": run.metrics,
        "files": {name: str(path) for name, path in files.items()},
        "weights_sha256": digest,
        "profile": run.profile_summary or None,
        "skipped_images": cache.skipped if cache else 0,
        "left_out_captions": run.data.train_table.left_out,
        "cache": str(cache.path) if cache else None,
        "cache_built": bool(cache and cache.built),
        "config": asdict(run.cfg),
    }


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: train, print a one-line summary; exit 2 on bad input, 1 if training diverged."""
    args = build_parser().parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(TrainConfig(**vars(args)))
    except (TrainingError, TrainingDiverged) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, TrainingError) else 1
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
