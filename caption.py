"""Caption image files or folders with saved weights.

    python caption.py IMAGE_OR_DIR [...] --encoder models/encoder-3.pkl --decoder models/decoder-3.pkl \\
        --vocab vocab.pkl [--beam 3] [--batch-size 64] [--max-len 20] [--device auto] [--json results.json]
    python caption.py IMAGE ... [--attention-map map.png]   # an attention decoder: where it looked for each word

Prints `path<TAB>caption` per image. Folders are searched (recursively) for image files. A file that cannot be read
as an image is reported on stderr and the others are still captioned; the exit code is then 2.
`caption_image_files()` is the same thing for other modules (evaluate.py captions a whole split with it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

import decoding
from config import add_captioning_options, positive_int
from data_loader import DATA_ROOTS, EVAL_SPLITS, split_files
from decoding import END_ID
from fileio import atomic_write
from image_io import UnreadableImage, build_transform, image_batches, load_image, resize_side
from model import AttentionDecoder, DecoderRNN, EncoderCNN, GridEncoder, load_pretrained, resolve_device
from plots import plot_attention, save_figure
from vocabulary import Vocabulary

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
# COCO file names: COCO_val2014_000000391895.jpg (2014), 000000391895.jpg (2017), val_000000000123.jpg (sample set)
COCO_NAME = re.compile(r"(?:COCO_[A-Za-z]+\d*_|(?:train|val|test|restval)_)?(\d+)")


def decode_features(
    decoder: decoding.StepDecoder,
    features: torch.Tensor,
    beam_size: int = 1,
    max_len: int = 20,
    end_id: int = END_ID,
) -> list[list[int]]:
    """Id sequences for a batch of image features (for DecoderRNN embeddings [B, E]), by any decoder with
    decoding.py's step interface: greedy for beam_size 1, else beam search."""
    if beam_size == 1:
        return decoding.greedy_search(decoder, features, max_len, end_id)
    return decoding.beam_search(decoder, features, beam_size, max_len, end_id=end_id)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put modules in eval mode for a block, then back in the mode they were in (e.g. mid-training)."""
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


@torch.no_grad()
def caption_image_files(
    encoder: EncoderCNN,
    decoder: DecoderRNN,
    vocab: Vocabulary,
    paths: Sequence[str | os.PathLike],
    beam_size: int = 1,
    batch_size: int = 64,
    max_len: int = 20,
    image_size: int | None = None,
    num_workers: int = 0,
) -> list[str | None]:
    """Captions of image files in their order, batched on the encoder's device; None for unreadable files.

    `image_size` defaults to the size the encoder was trained at (`encoder.image_size`, from train_config.json).
    """
    image_size = image_size or encoder.image_size
    device = next(encoder.parameters()).device
    captions: list[str | None] = [None] * len(paths)
    progress = tqdm(total=len(paths), desc="captioning", unit="img", leave=False, mininterval=2.0)
    with eval_mode(encoder, decoder), progress:
        for images, indices, ok in image_batches(paths, image_size, device, batch_size, num_workers):
            progress.update(len(indices))
            if not ok.any():
                continue
            features = encoder(images[ok.to(device)])
            sequences = decode_features(decoder, features, beam_size, max_len, vocab.end_id)
            for index, ids in zip(indices[ok].tolist(), sequences, strict=True):
                captions[index] = vocab.decode(ids)
    return captions


@dataclass
class ImageCaptions:
    """One image's captions: the beam-search one, the greedy one, and the best beams with their log-probabilities."""

    caption: str
    greedy: str
    beams: list[tuple[str, float]]


@torch.no_grad()
def caption_images(
    encoder: EncoderCNN,
    decoder: DecoderRNN,
    vocab: Vocabulary,
    images: Sequence[Image.Image],
    beam_size: int = 3,
    top_n: int | None = None,
    max_len: int = 20,
    image_size: int | None = None,
) -> list[ImageCaptions]:
    """Captions of loaded RGB images in one batch (what `caption_image_files` writes for the same pixels, with the
    same beam size), the greedy captions, and each image's `top_n` best beams (default all `beam_size`).

    Load files with `image_io.load_image(path, resize_side(image_size))`, as `caption_image_files` does.
    """
    image_size = image_size or encoder.image_size
    device = next(encoder.parameters()).device
    if not images:
        return []
    transform = build_transform(image_size)
    with eval_mode(encoder, decoder):
        features = encoder(torch.stack([transform(image) for image in images]).to(device))
        greedy = decode_features(decoder, features, 1, max_len, vocab.end_id)
        ranked = decoding.beam_search(decoder, features, beam_size, max_len, top_n=top_n or beam_size,
                                      end_id=vocab.end_id)
    results = []
    for greedy_ids, beams in zip(greedy, ranked, strict=True):
        best = greedy_ids if beam_size == 1 else beams[0][0]  # as decode_features: beam size 1 is greedy
        results.append(ImageCaptions(vocab.decode(best), vocab.decode(greedy_ids),
                                     [(vocab.decode(ids), score) for ids, score in beams]))
    return results


@torch.no_grad()
def caption_with_attention(
    encoder: GridEncoder,
    decoder: AttentionDecoder,
    vocab: Vocabulary,
    path: str | os.PathLike,
    beam_size: int = 1,
    max_len: int = 20,
    image_size: int | None = None,
) -> tuple[list[str], torch.Tensor]:
    """One image's caption as tokens (what `caption_image_files` writes, <start> left out) and the attention
    weights [tokens, cells] with which each was written. UnreadableImage when the file is no image."""
    image_size = image_size or encoder.image_size
    device = next(encoder.parameters()).device
    with eval_mode(encoder, decoder):
        images, _, ok = next(iter(image_batches([path], image_size, device, 1, 0)))
        if not ok.all():
            load_image(path)  # raises UnreadableImage with the reason
        features = encoder(images)
        ids = decode_features(decoder, features, beam_size, max_len, vocab.end_id)[0]
        alphas = decoder.attention_maps(features, [ids])[0]
    words = [vocab.idx2word[i] for i in ids]
    keep = [i for i, word in enumerate(words) if word != vocab.start_word]
    return [words[i] for i in keep], alphas[keep]


def attention_figure(
    encoder: GridEncoder, decoder: AttentionDecoder, vocab: Vocabulary, path: str | os.PathLike,
    beam_size: int = 1, max_len: int = 20, image_size: int | None = None,
) -> Figure:
    """The attention map of one image (`plots.plot_attention` over `caption_with_attention`)."""
    words, alphas = caption_with_attention(encoder, decoder, vocab, path, beam_size, max_len, image_size)
    size = image_size or encoder.image_size
    crop = transforms.Compose([transforms.Resize(resize_side(size)), transforms.CenterCrop(size)])
    return plot_attention(crop(load_image(path)), words, alphas)


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files named on the command line, and the image files under named folders (sorted); plus error lines."""
    paths: list[Path] = []
    errors: list[str] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                errors.append(
                    f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"
                )
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return paths, errors


def coco_image_id(path: str | os.PathLike) -> int | str:
    """The COCO image id in a file name (COCO_val2014_000000391895.jpg -> 391895), else the file name."""
    match = COCO_NAME.fullmatch(Path(path).stem)
    return int(match.group(1)) if match else Path(path).name


def check_writable(path: str | os.PathLike) -> None:
    """Raise ValueError naming `path` unless a file can be written there: checked before the work, not after.

    Folders that do not exist yet are fine (the writer makes them) when the nearest existing one is writable.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, expected a file name")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    except OSError as e:  # e.g. a name too long
        raise ValueError(f"{path}: cannot write there ({e.strerror})") from None
    if not folder.is_dir():
        raise ValueError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {folder} (permission denied)")


def write_results(results: list[dict], path: str | os.PathLike) -> None:
    """COCO results JSON `[{"image_id": ..., "caption": ...}]`, written atomically (temp file, then rename)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: bad numbers fail here, before any work (argparse exits with code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    parser.add_argument("--encoder", required=True, help="encoder weights, e.g. models/encoder-3.pkl")
    parser.add_argument("--decoder", required=True, help="decoder weights, e.g. models/decoder-3.pkl")
    parser.add_argument("--vocab", default="vocab.pkl", help="the vocab.pkl the model was trained with")
    add_captioning_options(parser)
    parser.add_argument(
        "--image-size", type=positive_int, help="crop size (default: from train_config.json, or 224)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write COCO results JSON here")
    parser.add_argument("--attention-map", metavar="PNG", help="attention decoder, one image: draw where it "
                        "looked for each word into this PNG")
    dataset = parser.add_argument_group("or, instead of IMAGE_OR_DIR, a dataset's split (--json then has its ids)")
    dataset.add_argument("--split", choices=EVAL_SPLITS, help="val, test, karpathy-val or karpathy-test")
    dataset.add_argument("--data", choices=sorted(DATA_ROOTS), default=os.environ.get("CAPTION_DATA", "coco"),
                         help="dataset of --split (default: $CAPTION_DATA, else coco)")
    dataset.add_argument("--root", help="its folder (default: data/DATA)")
    dataset.add_argument("--captions", metavar="FILE", help="or any caption file, with --images DIR")
    dataset.add_argument("--images", metavar="DIR", help="the image folder of --captions")
    args = parser.parse_args(argv)
    if bool(args.inputs) == bool(args.split):
        parser.error("give image files or folders, or --split (with --data or --captions/--images), not both")
    if (args.captions is None) != (args.images is None):
        parser.error("--captions FILE and --images DIR go together")
    return args


def load_model(args: argparse.Namespace) -> tuple[EncoderCNN, DecoderRNN, Vocabulary] | None:
    """Encoder, decoder and vocabulary of the command line, after checking the output paths and the device;
    None (the reason printed as one line on stderr) when any of them is unusable."""
    try:
        for output in (args.json, args.attention_map):
            if output:
                check_writable(output)
        device = resolve_device(args.device)
        model = load_pretrained(args.encoder, args.decoder, args.vocab, device)
        if args.attention_map and not isinstance(model[1], AttentionDecoder):
            raise ValueError(f"--attention-map: {args.decoder} is an LSTM decoder, which has no attention to draw")
        return model
    except ValueError as e:  # WeightsFileError, VocabularyError, a bad device or output path: one line
        print(f"error: {e}", file=sys.stderr)
        return None


def draw_attention(args: argparse.Namespace, encoder: GridEncoder, decoder: AttentionDecoder, vocab: Vocabulary,
                   paths: list[Path]) -> bool:
    """--attention-map: the one image's map into the PNG; False (one line on stderr) when that cannot be done."""
    if len(paths) != 1:
        print(f"error: --attention-map draws one image, the inputs have {len(paths)}", file=sys.stderr)
        return False
    try:
        figure = attention_figure(encoder, decoder, vocab, paths[0], args.beam, args.max_len, args.image_size)
        save_figure(figure, args.attention_map)
    except UnreadableImage as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    except OSError as e:
        print(f"error: {args.attention_map}: cannot write ({e.strerror or e})", file=sys.stderr)
        return False
    print(f"wrote {args.attention_map}", file=sys.stderr)
    return True


def caption_inputs(
    args: argparse.Namespace, encoder: EncoderCNN, decoder: DecoderRNN, vocab: Vocabulary
) -> tuple[list[Path], list[int | str], list[str | None], list[str]]:
    """The image paths of the inputs (files, folders, or --split), their image ids, their captions (None:
    unreadable) and the error lines of inputs that gave no images (printed on stderr before the captioning)."""
    image_ids, paths, errors = [], [], []
    if args.split:
        try:
            image_ids, paths, _ = split_files(args.split, args.data, args.root, args.captions, args.images)
        except (ValueError, OSError) as e:  # CaptionFileError and a missing dataset: one line
            errors = [str(e)]
    else:
        paths, errors = find_images(args.inputs)
        image_ids = [coco_image_id(path) for path in paths]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not paths:
        return paths, image_ids, [], errors
    captions = caption_image_files(
        encoder,
        decoder,
        vocab,
        paths,
        args.beam,
        args.batch_size,
        args.max_len,
        args.image_size,
        args.num_workers,
    )
    return paths, image_ids, captions, errors


def report(args: argparse.Namespace, paths: list[Path], image_ids: list[int | str], captions: list[str | None],
           errors: list[str]) -> int:
    """Print `path<TAB>caption` lines and the count of unreadable files, write the --json results; the exit code:
    2 when any input failed, gave no images or the results could not be written, else 0."""
    for path, caption in zip(paths, captions, strict=True):
        if caption is not None:
            print(f"{path}\t{caption}", flush=True)
    failed = captions.count(None)
    if failed:
        print(
            f"error: {failed} of {len(paths)} files could not be read as images (see above)", file=sys.stderr
        )
    if args.json:
        results = [
            {"image_id": image_id, "caption": c}
            for image_id, c in zip(image_ids, captions, strict=True)
            if c is not None
        ]
        try:
            write_results(results, args.json)
        except OSError as e:
            print(f"error: {args.json}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    return 2 if failed or errors or not paths else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse, load the model, caption the images, report; returns the exit code."""
    args = parse_args(argv)
    model = load_model(args)
    if model is None:
        return 2
    paths, image_ids, captions, errors = caption_inputs(args, *model)
    code = report(args, paths, image_ids, captions, errors)
    if args.attention_map and not draw_attention(args, *model, paths):
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
