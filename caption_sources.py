"""Caption files of every common format, read into one form: images with their captions and their split.

    COCO annotations JSON     {"images": [{id, file_name}], "annotations": [{id, image_id, caption}]}
    Karpathy dataset_*.json   {"images": [{filename, filepath?, split, sentences: [{raw, sentid}], cocoid?|imgid}]}
    captions.txt (CSV)        image,caption            (Kaggle's Flickr8k; Flickr30k's results.csv uses '| ')
    Flickr8k.token.txt        1000268201_693b08cb0e.jpg#0<TAB>caption   (also Flickr30k's results_20130124.token)

The format is told from the content, not the name. `caption_splits()` turns any of them into COCO-format caption
files, one per split (train, val, test), which is the one form the rest of the project reads (pycocotools, the
vocabulary, the feature cache, pycocoevalcap's references). Karpathy's files carry their split (restval joins
train); a file without one takes Flickr8k's lists (Flickr_8k.trainImages.txt, ...) when they lie beside it, else
a deterministic split by image. A malformed file gets a one-line CaptionFileError naming the file and the line.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pycocotools.coco import COCO

import vocabulary
from fileio import atomic_write

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = ("train", "restval", "val", "test")  # restval: COCO val2014 images Karpathy gave to training
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
HELD_OUT_SHARE = 0.1  # without a split in or beside the file: this share of the images each for val and for test
SPLITS_VERSION = 1  # bump when the derived split files change for the same inputs
TOKEN_LINE = re.compile(r"^(?P<name>[^\t#]+)#(?P<number>\d+)\t(?P<caption>.*)$")


class CaptionFileError(ValueError):
    """A caption, split, annotations or results file that cannot be used; the message names the file, and the line
    where it can."""


@dataclass
class CaptionedImage:
    """One image of a caption file: its file (relative to the image folder), id, captions and split."""

    file_name: str
    image_id: int
    captions: list[str]
    sentence_ids: list[int]
    split: str | None = None  # 'train', 'val' or 'test'; None until a split rule gives one


@dataclass
class CaptionSource:
    """The images of one caption file, the file's format, and how its splits were decided."""

    path: Path
    format: str  # 'coco', 'karpathy', 'captions-csv' or 'flickr-token'
    images: list[CaptionedImage]
    split_rule: str = ""
    lists: list[Path] = field(default_factory=list)  # split list files the split came from


@dataclass
class CaptionSplits:
    """COCO-format caption files of a source's splits, in `dataset_paths()`'s shape, and a summary line."""

    paths: dict[str, Path]
    source: CaptionSource
    summary: str

    @property
    def karpathy(self) -> bool:
        """True when the splits are Karpathy's (his dataset_*.json), so 'karpathy-test' names the test split."""
        return self.source.format == "karpathy"


# ---- COCO JSON: pycocotools' index, checked first ----


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
    return _coco_index(dataset)


def _coco_index(dataset: dict) -> COCO:
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


# ---- Plain JSON: results and references, for scoring ----


def read_text(path: str | Path, expected: str) -> str:
    """A file's UTF-8 text (a byte-order mark dropped), or CaptionFileError saying why not and what was `expected`."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CaptionFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CaptionFileError(f"{path}: is a directory, expected {expected}") from None
    except UnicodeDecodeError:
        raise CaptionFileError(f"{path}: not UTF-8 text, expected {expected}") from None


def read_json(path: str | Path) -> object:
    """Parsed JSON of a file, or CaptionFileError with a one-line reason."""
    text = read_text(path, "a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None


def is_caption_record(item: object) -> bool:
    """True for {"image_id": int, "caption": str, ...} (bools are not image ids)."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("image_id"), int)
        and not isinstance(item.get("image_id"), bool)
        and isinstance(item.get("caption"), str)
    )


def references_from_coco(path: str | Path) -> dict[int, list[str]]:
    """Reference captions per image id from a COCO captions file, in the file's image and annotation order.

    Plain JSON rather than pycocotools' COCO, which prints progress to stdout (and so would spoil `--json`);
    the order is the one of COCO's `imgToAnns` and `loadRes().getImgIds()`, so float sums match coco-caption.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionFileError(
            f"{path}: expected a COCO captions file (a JSON object with an 'annotations' list)"
        )
    by_image: dict[int, list[str]] = {}
    for index, annotation in enumerate(data["annotations"]):
        if not is_caption_record(annotation):
            raise CaptionFileError(
                f'{path}: annotation {index} is not {{"image_id": int, "caption": str, ...}}'
            )
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    images = data.get("images") if isinstance(data.get("images"), list) else []
    ordered = {
        image["id"]: by_image[image["id"]]
        for image in images
        if isinstance(image, dict) and image.get("id") in by_image
    }
    for image_id, captions in by_image.items():
        ordered.setdefault(image_id, captions)
    return ordered


# ---- Reading any caption file ----


def read_captions(path: str | os.PathLike) -> CaptionSource:
    """The images and captions of a caption file of any of the four formats, told from its content."""
    path = Path(path)
    text = read_text(path, "a caption file")
    if text.lstrip().startswith("{"):
        return _read_json_source(path, text)
    first = text.lstrip("\n").split("\n", 1)[0]
    if TOKEN_LINE.match(first.rstrip("\r")):
        return _read_token_file(path, text)
    if _csv_header(first) is not None:
        return _read_csv_file(path, text)
    raise CaptionFileError(
        f"{path}: not a caption file: expected COCO annotations JSON, Karpathy's dataset_*.json, a captions.txt "
        f"CSV with an 'image,caption' header or Flickr8k.token.txt lines ('NAME.jpg#0<TAB>caption'); "
        f"line 1 is {first[:60]!r}")


def _read_json_source(path: Path, text: str) -> CaptionSource:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return CaptionSource(path, "karpathy", _karpathy_images(path, images), "as Karpathy's split in the "
                             "file says (restval joins train)")
    try:
        _check_coco(data, path)
    except ValueError as e:
        raise CaptionFileError(str(e)) from None
    return CaptionSource(path, "coco", _coco_images(path, data))


def _coco_images(path: Path, data: dict) -> list[CaptionedImage]:
    by_id = {image["id"]: CaptionedImage(image["file_name"], image["id"], [], []) for image in data["images"]}
    for index, annotation in enumerate(data.get("annotations", [])):
        caption = annotation.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise CaptionFileError(f"{path}: annotation {index} (id {annotation['id']}) has an empty caption")
        by_id[annotation["image_id"]].captions.append(caption)
        by_id[annotation["image_id"]].sentence_ids.append(annotation["id"])
    _check_unique_sentences(path, [i for image in by_id.values() for i in image.sentence_ids])
    return [image for image in by_id.values() if image.captions]


def _karpathy_images(path: Path, records: list) -> list[CaptionedImage]:
    images = []
    for index, record in enumerate(records):
        where = f"{path}: image {index}"
        if not isinstance(record, dict) or not isinstance(record.get("filename"), str):
            raise CaptionFileError(f"{where} has no 'filename'")
        where += f" ({record['filename']})"
        if record.get("split") not in KARPATHY_SPLITS:
            raise CaptionFileError(f"{where} has split {record.get('split')!r}, expected one of {KARPATHY_SPLITS}")
        captions, sentence_ids = _karpathy_sentences(where, record.get("sentences"))
        image_id = record.get("cocoid", record.get("imgid", index))
        if type(image_id) is not int:
            raise CaptionFileError(f"{where} has a non-integer id {image_id!r}")
        file_name = f"{record['filepath']}/{record['filename']}" if record.get("filepath") else record["filename"]
        split = "train" if record["split"] == "restval" else record["split"]
        images.append(CaptionedImage(file_name, image_id, captions, sentence_ids, split))
    _check_unique_sentences(path, [i for image in images for i in image.sentence_ids])
    _check_unique_images(path, images)
    return images


def _karpathy_sentences(where: str, sentences) -> tuple[list[str], list[int]]:
    if not isinstance(sentences, list) or not sentences:
        raise CaptionFileError(f"{where} has no sentences")
    captions, ids = [], []
    for k, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise CaptionFileError(f"{where}: sentence {k} has an empty caption")
        if type(sentence.get("sentid")) is not int:
            raise CaptionFileError(f"{where}: sentence {k} has no integer 'sentid'")
        captions.append(raw.strip())
        ids.append(sentence["sentid"])
    return captions, ids


def _check_unique_sentences(path: Path, sentence_ids: list[int]) -> None:
    seen = set()
    for sentence_id in sentence_ids:
        if sentence_id in seen:
            raise CaptionFileError(f"{path}: sentence id {sentence_id} appears twice")
        seen.add(sentence_id)


def _check_unique_images(path: Path, images: list[CaptionedImage]) -> None:
    seen: dict[int, str] = {}
    for image in images:
        if image.image_id in seen:
            raise CaptionFileError(f"{path}: image id {image.image_id} is used by both {seen[image.image_id]} and "
                                   f"{image.file_name}")
        seen[image.image_id] = image.file_name


def _csv_header(line: str) -> str | None:
    """The delimiter of a captions CSV header line ('image,caption' or Flickr30k's 'image_name| comment_number|
    comment'), or None when the line is not such a header."""
    fields = [f.strip().lower() for f in line.rstrip("\r").split(",")]
    if fields == ["image", "caption"]:
        return ","
    if [f.strip().lower() for f in line.rstrip("\r").split("|")] == ["image_name", "comment_number", "comment"]:
        return "|"
    return None


def _read_csv_file(path: Path, text: str) -> CaptionSource:
    lines = text.splitlines()
    delimiter = _csv_header(lines[0].lstrip("\n")) or ","
    rows: list[tuple[int, str, str]] = []
    for number, row in enumerate(csv.reader(lines[1:], delimiter=delimiter), start=2):
        if not row or not "".join(row).strip():
            continue
        name, caption = _csv_fields(path, number, row, delimiter)
        rows.append((number, name, caption))
    return CaptionSource(path, "captions-csv", _images_from_rows(path, rows))


def _csv_fields(path: Path, number: int, row: list[str], delimiter: str) -> tuple[str, str]:
    """(image, caption) of a CSV row; Flickr30k's results.csv has 'name| number| caption' (and one row of the
    well-known copy lacks the second '|': 'name| 4 A dog ...', taken as meant)."""
    if delimiter == "|":
        if len(row) == 2 and (merged := re.match(r"\s*\d+\s+(.*)", row[1])):
            row = [row[0], "", merged.group(1)]
        if len(row) < 3:
            raise CaptionFileError(f"{path}:{number}: expected 'image_name| comment_number| comment'")
        name, caption = row[0], "|".join(row[2:])
    else:
        if len(row) < 2:
            raise CaptionFileError(f"{path}:{number}: expected 'image,caption'")
        name, caption = row[0], ",".join(row[1:])  # an unquoted comma in a caption is still the caption's
    if not name.strip():
        raise CaptionFileError(f"{path}:{number}: no image name")
    if not caption.strip():
        raise CaptionFileError(f"{path}:{number}: empty caption for {name.strip()}")
    return name.strip(), caption.strip()


def _read_token_file(path: Path, text: str) -> CaptionSource:
    rows: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = TOKEN_LINE.match(line)
        if match is None:
            raise CaptionFileError(f"{path}:{number}: expected 'NAME.jpg#N<TAB>caption', got {line[:60]!r}")
        sentence = f"{match['name']}#{match['number']}"
        if sentence in seen:
            raise CaptionFileError(f"{path}:{number}: sentence id {sentence} appears twice (first on line "
                                   f"{seen[sentence]})")
        seen[sentence] = number
        if not match["caption"].strip():
            raise CaptionFileError(f"{path}:{number}: empty caption for {sentence}")
        rows.append((number, match["name"].strip(), match["caption"].strip()))
    return CaptionSource(path, "flickr-token", _images_from_rows(path, rows))


def _images_from_rows(path: Path, rows: list[tuple[int, str, str]]) -> list[CaptionedImage]:
    """Images of (line, image name, caption) rows: ids 1.. in order of the sorted names, sentence ids 1.. in file
    order, so the same file always gives the same ids."""
    if not rows:
        raise CaptionFileError(f"{path}: has no captions")
    names = sorted({name for _, name, _ in rows})
    images = {name: CaptionedImage(name, image_id, [], []) for image_id, name in enumerate(names, start=1)}
    for sentence_id, (_, name, caption) in enumerate(rows, start=1):
        images[name].captions.append(caption)
        images[name].sentence_ids.append(sentence_id)
    return list(images.values())


# ---- Splits ----


def assign_splits(source: CaptionSource, lists_folder: str | os.PathLike | None = None) -> CaptionSource:
    """The source with every image in a split: its own (Karpathy), Flickr8k's lists in `lists_folder` (default: the
    caption file's folder) when they are all there, else a deterministic split by image name."""
    if source.format == "karpathy":
        return source
    folder = Path(lists_folder) if lists_folder is not None else source.path.parent
    lists = [folder / name for name in FLICKR8K_LISTS.values()]
    if all(path.is_file() for path in lists):
        return _split_by_lists(source, lists)
    return _split_by_name(source)


def _split_by_lists(source: CaptionSource, lists: list[Path]) -> CaptionSource:
    split_of: dict[str, str] = {}
    known = {image.file_name for image in source.images}
    for split, path in zip(FLICKR8K_LISTS, lists, strict=True):
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            if name not in known:
                raise CaptionFileError(f"{path}:{number}: {name} is listed but {source.path} has no captions for it")
            if split_of.setdefault(name, split) != split:
                raise CaptionFileError(f"{path}:{number}: {name} is also in the {split_of[name]} list")
    images = [replace(image, split=split_of.get(image.file_name)) for image in source.images]
    left_out = sum(image.split is None for image in images)
    rule = f"by the Flickr8k lists beside it ({', '.join(p.name for p in lists)})"
    if left_out:
        rule += f"; {left_out} image{'s' if left_out > 1 else ''} in no list left out"
    return replace(source, images=[image for image in images if image.split], split_rule=rule, lists=lists)


def _split_by_name(source: CaptionSource) -> CaptionSource:
    """Images ordered by the SHA-1 of their file name: the first 10% val, the next 10% test, the rest train."""
    order = sorted(source.images, key=lambda image: hashlib.sha1(image.file_name.encode()).hexdigest())
    held_out = max(1, round(HELD_OUT_SHARE * len(order))) if len(order) >= 3 else 0
    split_of = {}
    for rank, image in enumerate(order):
        split_of[image.file_name] = "val" if rank < held_out else "test" if rank < 2 * held_out else "train"
    images = [replace(image, split=split_of[image.file_name]) for image in source.images]
    share = round(100 * HELD_OUT_SHARE)
    rule = f"deterministically by image (SHA-1 of the file name): {share}% val, {share}% test, the rest train"
    return replace(source, images=images, split_rule=rule)


# ---- COCO-format split files, the form the rest of the project reads ----


def caption_splits(captions_file: str | os.PathLike, images_folder: str | os.PathLike,
                   lists_folder: str | os.PathLike | None = None) -> CaptionSplits:
    """COCO-format caption files of the train, val and test splits of any caption file, written once (atomically,
    under the cache folder, keyed by the inputs' content) and reused; CaptionFileError when unusable."""
    source = assign_splits(read_captions(captions_file), lists_folder)
    images_folder = Path(images_folder)
    if not images_folder.is_dir():
        raise CaptionFileError(f"{images_folder}: image folder not found (the images of {source.path})")
    folder = _splits_folder(source)
    paths = {"root": source.path.parent, "captions": source.path}
    counts = {}
    for split in SPLITS:
        images = [image for image in source.images if image.split == split]
        if not images:
            raise CaptionFileError(f"{source.path}: its {split} split is empty ({source.split_rule})")
        paths[f"{split}_annotations"] = _write_split_file(folder / f"captions_{split}.json", images)
        paths[f"{split}_images"] = images_folder
        counts[split] = len(images)
    missing = _count_missing(source.images, images_folder)
    summary = (f"{source.path}: {source.format}, {len(source.images):,} images, split {source.split_rule}: "
               + ", ".join(f"{split} {count:,}" for split, count in counts.items()))
    if missing:
        summary += f"; {missing:,} image files missing in {images_folder} (left out)"
    return CaptionSplits(paths, source, summary)


def _splits_folder(source: CaptionSource) -> Path:
    digest = hashlib.sha256(f"{SPLITS_VERSION}\n{source.split_rule}\n".encode())
    for path in [source.path, *source.lists]:
        digest.update(path.read_bytes())
    return Path(vocabulary.CACHE_DIR) / "splits" / f"{source.path.stem}-{digest.hexdigest()[:16]}"


def _write_split_file(path: Path, images: list[CaptionedImage]) -> Path:
    if path.exists():
        return path  # the folder is keyed by the content it is made from
    dataset = {
        "info": {"description": f"{path.stem}, made by caption_sources.py"},
        "images": [{"id": image.image_id, "file_name": image.file_name} for image in images],
        "annotations": [
            {"id": sentence_id, "image_id": image.image_id, "caption": caption}
            for image in images for sentence_id, caption in zip(image.sentence_ids, image.captions, strict=True)
        ],
    }
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(dataset, f)
    return path


def _count_missing(images: list[CaptionedImage], folder: Path) -> int:
    """Image files not in `folder`; CaptionFileError when none is there (the folder is the wrong one)."""
    missing = sum(not (folder / image.file_name).is_file() for image in images)
    if missing == len(images):
        raise CaptionFileError(f"{folder}: none of the {len(images):,} images of the caption file is there "
                               f"(e.g. {images[0].file_name}); is it the right image folder?")
    return missing
