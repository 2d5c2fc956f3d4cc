"""Every setting of a training run in one place: TrainConfig, the --data presets, and the flags made from them.

`python train.py --help` lists one flag per TrainConfig field, with the comment after the field as its help text.
Also here: the argparse value checkers the CLIs share (train.py, caption.py, evaluate.py, bench.py).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

from data_loader import DATA_ROOTS, default_root, locate_caption_file
from sample_data import sample_variant


@dataclass
class TrainConfig:
    """Every setting of a training run. None means "the preset's value for `data`" (see PRESETS below)."""

    # data
    data: str | None = None  # dataset and preset: sample, sample-spatial (generated), coco, flickr8k, flickr30k; with --captions only the preset (default: sample, or captions with --captions)
    data_root: str | None = None  # dataset folder (default: data/<data>, e.g. data/sample, data/coco, data/flickr8k)
    captions: str | None = None  # train on any caption file instead (COCO JSON, Karpathy dataset_*.json, captions.txt, Flickr8k.token.txt)
    images: str | None = None  # with --captions: the folder its image file names are relative to
    image_size: int | None = None  # side of the square crop fed to the ResNet
    vocab_threshold: int | None = None  # keep words that occur at least this often in the training captions
    # model
    decoder: str = "lstm"  # 'lstm' (the image embedding is the LSTM's first input) or 'attention' (Show, Attend and Tell)
    pretrained: bool | None = None  # ImageNet weights for the ResNet-50 (needs a download or the torch hub cache)
    weights_path: str | None = None  # a ResNet-50 state dict file to use instead of the ImageNet download
    backbone_seed: int = 0  # seed of the random ResNet-50 when it is not pretrained
    mirror: bool | None = None  # also cache every training image mirrored and train on both views (twice the cache)
    embed_size: int | None = None  # size of the image embedding and of the word embeddings
    hidden_size: int | None = None  # LSTM hidden size
    num_layers: int | None = None  # LSTM layers
    dropout: float | None = None  # dropout between LSTM layers (only with 2+ layers); attention: before the output layer
    grid: int | None = None  # attention: the ResNet's last conv map is average-pooled to grid x grid cells
    attention_size: int | None = None  # attention: size of the additive attention's hidden layer
    alpha_c: float = 1.0  # attention: weight of the doubly stochastic penalty ((1 - sum over steps of alpha)^2).mean()
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


# What `--data` means; explicit settings override these. coco is the seeds' setting. The sample presets are sized
# for 2 CPU cores: a smaller one-layer LSTM (the seeds' 512/512/2 runs about 10x slower there), no ImageNet
# weights (offline; the random ResNet is seeded), no mirrored view (on a CPU the cache build is most of the run;
# sample-spatial's captions say left and right), a minute or two of training. sample crops its 96 px images to
# 64 px (a 2x2 grid for attention), sample-spatial its 128 px images to 128 px (a 4x4 grid).
PRESETS: dict[str, dict] = {
    "sample": dict(
        image_size=64, vocab_threshold=2, pretrained=False, mirror=False, embed_size=128, hidden_size=256,
        num_layers=1, dropout=0.0, epochs=6, batch_size=64, lr=3e-3, grid=2, attention_size=128,
    ),
    "sample-spatial": dict(
        image_size=128, vocab_threshold=2, pretrained=False, mirror=False, embed_size=128, hidden_size=256,
        num_layers=1, dropout=0.0, epochs=6, batch_size=64, lr=3e-3, grid=4, attention_size=128,
    ),
    "coco": dict(
        image_size=224, vocab_threshold=4, pretrained=True, mirror=True, embed_size=512, hidden_size=512,
        num_layers=2, dropout=0.1, epochs=3, batch_size=256, lr=1e-3, grid=7, attention_size=512,
    ),
    # Flickr8k: 30,000 training captions, so more epochs over smaller batches; the threshold keeps ~2,500 words.
    "flickr8k": dict(
        image_size=224, vocab_threshold=5, pretrained=True, mirror=True, embed_size=512, hidden_size=512,
        num_layers=2, dropout=0.3, epochs=10, batch_size=128, lr=1e-3, grid=7, attention_size=512,
    ),
}
PRESETS["flickr30k"] = PRESETS["flickr8k"] | dict(epochs=6, batch_size=256)  # five times the captions
PRESETS["captions"] = PRESETS["flickr8k"]  # --captions FILE without --data: a real dataset of Flickr8k's size
CAPTION_FILE_DATA = ("flickr8k", "flickr30k")  # folders laid out by prepare_data.py around a caption file
DECODERS = ("lstm", "attention")
POSITIONAL_DATA = ("sample-spatial",)  # captions say left and right: never trained on mirrored or flipped images
# With --decoder attention these replace the preset's: one LSTM cell, and on COCO Show, Attend and Tell's
# (the well-known PyTorch tutorial's) dropout 0.5 and learning rate 4e-4, with smaller batches.
ATTENTION_PRESETS: dict[str, dict] = {
    "sample": dict(num_layers=1),
    "sample-spatial": dict(num_layers=1),
    "coco": dict(num_layers=1, dropout=0.5, batch_size=128, lr=4e-4),
    "flickr8k": dict(num_layers=1, dropout=0.5, batch_size=64, lr=4e-4),
    "flickr30k": dict(num_layers=1, dropout=0.5, batch_size=128, lr=4e-4),
    "captions": dict(num_layers=1, dropout=0.5, batch_size=64, lr=4e-4),
}
# Settings a checkpoint can only be resumed with unchanged (the vocabulary and backbone are checked separately):
# the model's shape, the batches and their order, and the optimiser and schedule the checkpoint's state belongs to.
RESUME_MUST_MATCH = (
    "image_size", "mirror", "embed_size", "hidden_size", "num_layers", "dropout", "batch_size", "seed", "train_cnn",
    "blind", "cache", "epochs", "lr", "cnn_lr", "weight_decay", "warmup_fraction", "min_lr_fraction", "grad_clip",
)
ATTENTION_MUST_MATCH = ("grid", "attention_size", "alpha_c")  # also, for an attention decoder (and the decoder kind)


class TrainingError(ValueError):
    """Bad input for a training run (a flag, a data file, a checkpoint); the message names it, in one line."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """The config with the preset's values filled in and default paths set; TrainingError for bad values."""
    cfg = _resolve_data(cfg)
    if cfg.data not in PRESETS:
        raise TrainingError(f"--data: unknown dataset {cfg.data!r}, expected one of {', '.join(PRESETS)}")
    if cfg.decoder not in DECODERS:
        raise TrainingError(f"--decoder: unknown decoder {cfg.decoder!r}, expected one of {', '.join(DECODERS)}")
    preset = PRESETS[cfg.data] | (ATTENTION_PRESETS[cfg.data] if cfg.decoder == "attention" else {})
    cfg = replace(cfg, **{name: value for name, value in preset.items() if getattr(cfg, name) is None})
    if cfg.out_dir is None:
        cfg.out_dir = default_out_dir(cfg)
    for name in ("image_size", "embed_size", "hidden_size", "num_layers", "epochs", "batch_size", "num_workers",
                 "extract_batch_size", "log_every", "nan_at_step", "vocab_threshold", "grid", "attention_size"):
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
    check_decoder_settings(cfg)
    return cfg


def _resolve_data(cfg: TrainConfig) -> TrainConfig:
    """`data` and `data_root` filled in: with --captions, `data` only names the preset (default 'captions') and
    the root is the caption file's folder; --captions and --images come together."""
    if (cfg.captions is None) != (cfg.images is None):
        raise TrainingError("--captions FILE and --images DIR go together: the caption file and its image folder")
    if cfg.captions is not None:
        return replace(cfg, data=cfg.data or "captions", data_root=str(Path(cfg.captions).parent))
    if cfg.data == "captions":
        raise TrainingError("--data captions: give the caption file and its images with --captions FILE --images DIR")
    cfg = replace(cfg, data=cfg.data or "sample")
    if cfg.data_root is None and cfg.data in DATA_ROOTS:
        cfg.data_root = str(default_root(cfg.data))
    return cfg


def notebook_config(data: str, data_root: str | None = None, **settings) -> TrainConfig:
    """The resolved TrainConfig of a notebook's dataset (CAPTION_DATA): a dataset name, or the path of a caption
    file or of a folder laid out like data/flickr8k (trained with the 'captions' preset)."""
    if data in DATA_ROOTS:
        return resolve_config(TrainConfig(data=data, data_root=data_root, **settings))
    captions, images = locate_caption_file(data)
    return resolve_config(TrainConfig(captions=str(captions), images=str(images), **settings))


def default_out_dir(cfg: TrainConfig) -> str:
    """models (COCO) or models/<data> (with --captions: models/<the caption file's folder name>), then /attention
    or -attention for the attention decoder, -blind for the blind baseline: each kind of run gets its own folder,
    so none replaces another's weights."""
    if cfg.captions is not None:
        folder = f"models/{Path(cfg.captions).resolve().parent.name}" + (
            "-attention" if cfg.decoder == "attention" else "")
    elif cfg.data == "coco":
        folder = "models/attention" if cfg.decoder == "attention" else "models"
    else:
        folder = f"models/{cfg.data}" + ("-attention" if cfg.decoder == "attention" else "")
    return folder + ("-blind" if cfg.blind else "")


def check_decoder_settings(cfg: TrainConfig) -> None:
    """Refuse settings the decoder or the data cannot use, in one line."""
    if cfg.decoder == "attention" and cfg.num_layers != 1:
        raise TrainingError(f"--num-layers {cfg.num_layers}: the attention decoder has one LSTM cell")
    if cfg.alpha_c < 0:
        raise TrainingError(f"--alpha-c: must be >= 0, not {cfg.alpha_c!r}")
    if cfg.mirror and positional_captions(cfg):
        raise TrainingError(f"--mirror: the captions of {cfg.data_root} say left and right, a mirrored view would lie")


def positional_captions(cfg: TrainConfig) -> bool:
    """Whether the run's captions say left and right (sample-spatial, by name or by its folder's marker), so that
    its images must never be mirrored or flipped."""
    return cfg.data in POSITIONAL_DATA or sample_variant(cfg.data_root) == "spatial"



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
        elif field.name in ("data", "decoder"):
            choices = sorted(PRESETS) if field.name == "data" else DECODERS
            parser.add_argument(flag, choices=choices, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)
    return parser



def _int_at_least(text: str, minimum: int, why: str = "") -> int:
    """An argparse value: an integer >= minimum (so bad values fail at parse time, before any work)."""
    value = int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, not {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def caption_length(text: str) -> int:
    """An argparse type for --max-len: an integer >= 2, as it counts the <start> id and 1 gives empty captions."""
    return _int_at_least(text, 2, " (it counts <start>: 1 gives empty captions)")


def add_captioning_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options caption.py and evaluate.py share: how to decode, in what batches, on which device."""
    parser.add_argument("--beam", type=positive_int, default=3, help="beam width; 1 is greedy decoding (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    parser.add_argument("--max-len", type=caption_length, default=20, help=(
        "longest caption in ids, counting the <start> and <end> the model emits: N gives at most N-1 words "
        "(default %(default)s)"))
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:N, mps")
    parser.add_argument("--num-workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                        help="image decoding workers (0: in this process)")
