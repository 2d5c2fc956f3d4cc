"""Tests of the synthetic COCO-format sample set: layout, format, determinism, idempotence, atomicity."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import sample_data
from sample_data import COLOURS, MARKER, make_sample_dataset

SMALL = {"n_train": 40, "n_val": 10, "n_test": 5}
ANNOTATIONS = {"train": "captions_train.json", "val": "captions_val.json", "test": "image_info_test.json"}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    """One small set shared by the read-only tests."""
    root = tmp_path_factory.mktemp("small") / "sample"
    return root, make_sample_dataset(root, seed=0, **SMALL)


def _load(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / ANNOTATIONS[split]).read_text())


def _captions_by_image(data: dict) -> dict[int, list[str]]:
    captions: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return captions


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_file_names_and_stats(small_set):
    root, stats = small_set
    assert stats["created"] is True
    assert {k: stats[k] for k in ("train", "val", "test", "captions")} == {
        "train": 40, "val": 10, "test": 5, "captions": 5 * 50}
    all_ids = []
    for split, count in (("train", 40), ("val", 10), ("test", 5)):
        data = _load(root, split)
        assert set(data) >= {"info", "licenses", "images"}
        names = sorted(p.name for p in (root / "images" / split).iterdir())
        assert names == sorted(image["file_name"] for image in data["images"])
        assert len(names) == count
        for image in data["images"]:
            assert re.fullmatch(rf"{split}_\d{{12}}\.jpg", image["file_name"])
            assert int(image["file_name"][-16:-4]) == image["id"]
            all_ids.append(image["id"])
    assert len(set(all_ids)) == len(all_ids)
    assert "annotations" not in _load(root, "test")
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "annotations", "images"]


def test_pycocotools_loads_the_files_and_every_image_has_five_captions(small_set):
    root, _ = small_set
    caption_ids = []
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / ANNOTATIONS[split]))
        for image_id in coco.getImgIds():
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert len(annotations) == 5
            assert len({a["caption"].lower().rstrip(" .") for a in annotations}) == 5
            caption_ids += [a["id"] for a in annotations]
    assert len(set(caption_ids)) == len(caption_ids)
    test = COCO(str(root / "annotations" / ANNOTATIONS["test"]))
    assert len(test.getImgIds()) == 5
    assert "annotations" not in test.dataset  # like COCO's image_info_test2014.json


def test_every_image_opens_with_the_size_the_json_says(small_set):
    root, _ = small_set
    for split in ("train", "val", "test"):
        for image in _load(root, split)["images"]:
            with Image.open(root / "images" / split / image["file_name"]) as opened:
                assert opened.format == "JPEG"
                assert opened.size == (image["width"], image["height"])
                assert opened.convert("RGB").size == opened.size


def test_grayscale_and_cmyk_images_are_where_promised(small_set):
    """Every 20th image (index 9, 29, ...) is grayscale and image 4 of each split is CMYK: 5% and three in all."""
    root, stats = small_set
    modes = {}
    for split in ("train", "val", "test"):
        for index, image in enumerate(_load(root, split)["images"]):
            with Image.open(root / "images" / split / image["file_name"]) as opened:
                modes[split, index] = opened.mode
    assert sorted(key for key, mode in modes.items() if mode == "L") == [("train", 9), ("train", 29), ("val", 9)]
    assert sorted(key for key, mode in modes.items() if mode == "CMYK") == [("test", 4), ("train", 4), ("val", 4)]
    assert {mode for mode in modes.values()} == {"RGB", "L", "CMYK"}
    assert (stats["grayscale"], stats["cmyk"]) == (3, 3)


def test_grayscale_captions_name_no_colour_and_say_black_and_white(small_set):
    root, _ = small_set
    for split in ("train", "val"):
        data = _load(root, split)
        captions = _captions_by_image(data)
        for image in data["images"]:
            with Image.open(root / "images" / split / image["file_name"]) as opened:
                if opened.mode != "L":
                    continue
            texts = " ".join(captions[image["id"]]).lower()
            assert "black and white" in texts or "grayscale" in texts
            assert not set(re.findall(r"[a-z]+", texts)) & set(COLOURS)


def test_colours_in_captions_are_visible_in_the_image(small_set):
    root, _ = small_set
    for split in ("train", "val"):
        data = _load(root, split)
        captions = _captions_by_image(data)
        for image in data["images"]:
            pixels = np.asarray(Image.open(root / "images" / split / image["file_name"]).convert("RGB"), float)
            named = set(re.findall(r"[a-z]+", " ".join(captions[image["id"]]).lower())) & set(COLOURS)
            for colour in named:
                distance = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1).min()
                assert distance < 45, f"{image['file_name']}: no {colour} pixel (nearest {distance:.0f} away)"


def test_captions_survive_mirroring_and_use_a_small_vocabulary(tmp_path):
    """No 'left' or 'right' (the feature cache also stores mirrored images); 40-80 words in all."""
    root = tmp_path / "sample"
    make_sample_dataset(root, seed=3, n_train=300, n_val=20, n_test=0)
    captions = [a["caption"] for split in ("train", "val") for a in _load(root, split)["annotations"]]
    words = {w for caption in captions for w in re.findall(r"[a-z]+", caption.lower())}
    assert not words & {"left", "right", "leftmost", "rightmost"}
    assert 40 <= len(words) <= 80
    assert words >= set(COLOURS) | {"circle", "square", "triangle", "two", "three", "above", "below"}


def test_odd_image_sizes_appear_among_mostly_square_ones(tmp_path):
    root = tmp_path / "sample"
    make_sample_dataset(root, seed=1, n_train=100, n_val=1, n_test=0)
    sizes = [(image["width"], image["height"]) for image in _load(root, "train")["images"]]
    square = sum(size == (96, 96) for size in sizes)
    assert 70 <= square <= 97
    assert set(sizes) - {(96, 96)} <= set(sample_data.ODD_SIZES)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    sizes = {"n_train": 12, "n_val": 4, "n_test": 5}
    first = _files(Path(make_sample_dataset(tmp_path / "a" / "sample", seed=7, **sizes)["root"]))
    again = _files(Path(make_sample_dataset(tmp_path / "b" / "sample", seed=7, **sizes)["root"]))
    other = _files(Path(make_sample_dataset(tmp_path / "c" / "sample", seed=8, **sizes)["root"]))
    assert first == again
    assert first.keys() != other.keys()
    assert first["annotations/captions_train.json"] != other["annotations/captions_train.json"]


def test_rerun_with_same_parameters_returns_at_once_without_rewriting(small_set):
    root, stats = small_set
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = make_sample_dataset(root, seed=0, **SMALL)
    assert again["created"] is False
    assert {k: again[k] for k in ("train", "val", "test", "captions", "grayscale", "cmyk")} == {
        k: stats[k] for k in ("train", "val", "test", "captions", "grayscale", "cmyk")}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert sorted(p.name for p in root.parent.iterdir()) == ["sample"]


def test_other_parameters_replace_the_set_and_leave_no_temp_folders(tmp_path):
    root = tmp_path / "sample"
    make_sample_dataset(root, seed=0, n_train=6, n_val=3, n_test=2)
    stats = make_sample_dataset(root, seed=0, n_train=8, n_val=3, n_test=2)
    assert stats["created"] is True
    assert len(list((root / "images" / "train").iterdir())) == 8
    assert len(_load(root, "train")["images"]) == 8
    assert json.loads((root / MARKER).read_text())["params"]["n_train"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_a_failed_run_keeps_the_old_set_and_leaves_nothing_behind(tmp_path, monkeypatch):
    root = tmp_path / "sample"
    make_sample_dataset(root, seed=0, n_train=6, n_val=3, n_test=2)
    before = _files(root)
    write_json = sample_data._write_json

    def fail_on_val(path: Path, data: dict) -> None:
        if path.name == "captions_val.json":
            raise OSError("disk full")
        write_json(path, data)

    monkeypatch.setattr(sample_data, "_write_json", fail_on_val)
    with pytest.raises(OSError, match="disk full"):
        make_sample_dataset(root, seed=1, n_train=6, n_val=3, n_test=2)
    assert _files(root) == before
    with pytest.raises(OSError, match="disk full"):
        make_sample_dataset(tmp_path / "fresh", seed=1, n_train=6, n_val=3, n_test=2)
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_refuses_a_foreign_folder_and_bad_counts(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_sample_dataset(root, n_train=4, n_val=2, n_test=1)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="n_val"):
        make_sample_dataset(tmp_path / "sample", n_train=4, n_val=-1, n_test=1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        make_sample_dataset(tmp_path / "sample", seed=-1, n_train=4, n_val=2, n_test=1)
    assert not (tmp_path / "sample").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_sample_dataset(empty, n_train=4, n_val=2, n_test=1)["created"] is True
