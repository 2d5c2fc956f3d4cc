"""Tests of the synthetic COCO-format sample set: layout, format, determinism, idempotence, atomicity; and of its
spatial variant, whose captions say where the objects are."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import sample_data
from sample_data import BACKGROUNDS, COLOURS, MARKER, SHAPE_WORDS, make_sample_dataset, sample_variant

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


def test_plain_set_is_byte_for_byte_what_it_was_before_the_spatial_variant(small_set):
    """Digests of the annotation files made by the code before variants existed (its RNG draws included); the
    marker's params have no "variant" key, so plain sets made by older code still count as complete."""
    root, _ = small_set
    digests = {name: hashlib.sha256((root / "annotations" / name).read_bytes()).hexdigest()
               for name in ANNOTATIONS.values()}
    assert digests == {
        "captions_train.json": "cf208d3c9d6b56134e852aa2a912380d929a99f8bf28ecb484b7ef0c9fa80d53",
        "captions_val.json": "13f3886e9537fe37c7f5c114cc9cab44c3ca521af8534c4339d91d9a0352a8b0",
        "image_info_test.json": "a5eb5c72a90bb8baf8a94e5cca1e362c7bd6b7b5eb4030a8acca3b1fc0eaa6ef",
    }
    assert json.loads((root / MARKER).read_text()) == {
        "params": {"version": 1, "seed": 0, "n_train": 40, "n_val": 10, "n_test": 5},
        "stats": {"captions": 250, "grayscale": 3, "cmyk": 3, "train": 40, "val": 10, "test": 5}}
    assert sample_variant(root) == "plain"
    assert make_sample_dataset(root, seed=0, **SMALL, variant="plain")["created"] is False


# --- the spatial variant --------------------------------------------------------------------------------------

SPATIAL = {"n_train": 40, "n_val": 10, "n_test": 5, "variant": "spatial"}
OBJECT = r"an? (\w+) (\w+)"
BACKGROUND = r"(?: on an? (?:white|gray|grey|black) background)?"
# A caption naming two objects, and where the first is relative to the second.
RELATIONS = [
    (rf"{OBJECT} (?:to the )?left of {OBJECT}", "left"),
    (rf"{OBJECT} (?:to the )?right of {OBJECT}", "right"),
    (rf"{OBJECT} on the left and {OBJECT} on the right", "left"),
    (rf"{OBJECT} on the right and {OBJECT} on the left", "right"),
    (rf"{OBJECT} with {OBJECT} to its right", "left"),
    (rf"{OBJECT} with {OBJECT} to its left", "right"),
    (rf"{OBJECT} (?:above|over) {OBJECT}", "above"),
    (rf"{OBJECT} (?:below|under) {OBJECT}", "below"),
    (rf"{OBJECT} at the top and {OBJECT} at the bottom", "above"),
    (rf"{OBJECT} at the bottom and {OBJECT} at the top", "below"),
    (rf"{OBJECT} with {OBJECT} below it", "above"),
    (rf"{OBJECT} with {OBJECT} above it", "below"),
]
# A caption naming one object and its corner (vertical, horizontal).
CORNER_CAPTIONS = [
    rf"(?:there is |a picture of )?{OBJECT} (?:in|at) the (top|bottom) (left|right)(?: corner)?(?: of the image)?",
    rf"an? (?:white|gray|grey|black) background with {OBJECT} in the (top|bottom) (left|right) corner",
]
KINDS = {word: kind for kind, words in SHAPE_WORDS.items() for word in words}


@pytest.fixture(scope="module")
def spatial_set(tmp_path_factory) -> tuple[Path, dict]:
    """One small spatial set shared by the read-only tests."""
    root = tmp_path_factory.mktemp("spatial") / "sample-spatial"
    return root, make_sample_dataset(root, seed=0, **SPATIAL)


def _parse(caption: str) -> tuple:
    """('pair', object, relation, object) or ('corner', object, vertical, horizontal); objects are (colour, kind)."""
    text = caption.lower().rstrip(" .")
    for pattern, relation in RELATIONS:
        if match := re.fullmatch(pattern + BACKGROUND, text):
            c1, w1, c2, w2 = match.groups()
            return "pair", (c1, KINDS[w1]), relation, (c2, KINDS[w2])
    for pattern in CORNER_CAPTIONS:
        if match := re.fullmatch(pattern + BACKGROUND, text):
            colour, word, vertical, horizontal = match.groups()
            return "corner", (colour, KINDS[word]), vertical, horizontal
    raise AssertionError(f"caption says no position this test knows: {caption!r}")


def _extent(shape: sample_data.Shape) -> float:
    """How far the drawn shape reaches from its centre at most (the triangle's corners: 1.2 radii)."""
    return 1.2 * shape.radius


def _check_caption(scene: sample_data.Scene, caption: str) -> None:
    """Fail unless the caption names the scene's objects and puts them where they are, wholly in their halves."""
    claim = _parse(caption)
    named = [claim[1], claim[3]] if claim[0] == "pair" else [claim[1]]
    found = [[s for s in scene.shapes if (s.colour, s.kind) == obj] for obj in named]
    assert [len(matches) for matches in found] == [1] * len(named) == [1] * len(scene.shapes), (caption, scene)
    width, height = scene.width, scene.height
    if claim[0] == "pair":
        (a,), (b,) = found
        assert scene.layout == ("sides" if claim[2] in ("left", "right") else "stack") and a is not b
        first, second = (a, b) if claim[2] in ("left", "above") else (b, a)
        if scene.layout == "sides":
            assert first.x + _extent(first) < width / 2 < second.x - _extent(second), caption
        else:
            assert first.y + _extent(first) < height / 2 < second.y - _extent(second), caption
    else:
        ((shape,),), vertical, horizontal = found, claim[2], claim[3]
        assert scene.layout == "corner"
        assert (shape.x + _extent(shape) < width / 2) == (horizontal == "left"), caption
        assert (shape.x - _extent(shape) > width / 2) == (horizontal == "right"), caption
        assert (shape.y + _extent(shape) < height / 2) == (vertical == "top"), caption
        assert (shape.y - _extent(shape) > height / 2) == (vertical == "bottom"), caption


def test_spatial_captions_are_true_of_their_scenes():
    """600 scenes: every caption parses back to objects of the scene placed where the scene has them."""
    rng = np.random.default_rng(11)
    layouts = []
    for index in range(600):
        scene = sample_data._make_spatial_scene(rng, index)
        captions = sample_data._captions(rng, scene)
        assert len({c.lower().rstrip(" .") for c in captions}) == 5
        for caption in captions:
            _check_caption(scene, caption)
        assert (scene.width, scene.height, scene.gray, scene.cmyk) == (128, 128, False, False)
        assert all(s.size == "medium" and 14 <= s.radius <= 18 for s in scene.shapes)
        # 8 px clear of every edge (a triangle reaches 1.04 radii sideways): a 146 px resize + 128 px centre crop
        # (the evaluation transform at 128 px) cuts 7.9 px of the image's scale from each side
        assert all(min(s.x, s.y, 128 - s.x, 128 - s.y) - 1.04 * s.radius >= 8 for s in scene.shapes)
        assert len({(s.kind, s.colour) for s in scene.shapes}) == len(scene.shapes)  # a pair differs
        background = np.array(BACKGROUNDS[scene.background])
        assert all(np.linalg.norm(np.array(COLOURS[s.colour]) - background) > 140 for s in scene.shapes)
        layouts.append(scene.layout)
    assert all(160 <= layouts.count(layout) <= 240 for layout in ("sides", "stack", "corner"))


def test_spatial_set_counts_sizes_and_five_captions(spatial_set):
    root, stats = spatial_set
    assert stats["created"] is True
    assert {k: stats[k] for k in ("train", "val", "test", "captions", "grayscale", "cmyk")} == {
        "train": 40, "val": 10, "test": 5, "captions": 5 * 50, "grayscale": 0, "cmyk": 0}
    assert sum(stats["layouts"].values()) == 55 and set(stats["layouts"]) == {"sides", "stack", "corner"}
    for split in ("train", "val", "test"):
        data = _load(root, split)
        assert data["info"]["variant"] == "spatial"
        assert len(data["images"]) == {"train": 40, "val": 10, "test": 5}[split]
        for image in data["images"]:
            assert (image["width"], image["height"]) == (128, 128)
            with Image.open(root / "images" / split / image["file_name"]) as opened:
                assert (opened.format, opened.mode, opened.size) == ("JPEG", "RGB", (128, 128))
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / ANNOTATIONS[split]))
        for image_id in coco.getImgIds():
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len({c.lower().rstrip(" .") for c in captions}) == 5


def test_spatial_captions_agree_with_the_pixels(spatial_set):
    """Where a caption names two colours, each colour's pixels lie in the half it names; a corner colour's pixels
    lie in its quadrant."""
    root, _ = spatial_set
    for split in ("train", "val"):
        data = _load(root, split)
        captions = _captions_by_image(data)
        for image in data["images"]:
            pixels = np.asarray(Image.open(root / "images" / split / image["file_name"]).convert("RGB"), float)
            background = np.median(np.concatenate([pixels[:8, :].reshape(-1, 3), pixels[-8:, :].reshape(-1, 3)]), 0)
            border = np.ones(pixels.shape[:2], bool)
            border[8:-8, 8:-8] = False
            assert np.linalg.norm(pixels[border] - background, axis=-1).max() < 60, "an object within 8 px of an edge"
            for caption in captions[image["id"]]:
                claim = _parse(caption)
                if claim[0] == "pair" and claim[1][0] != claim[3][0]:
                    first, second = (claim[1], claim[3]) if claim[2] in ("left", "above") else (claim[3], claim[1])
                    axis = 1 if claim[2] in ("left", "right") else 0
                    assert _colour_at(pixels, first[0], axis).max() < 64, (image["file_name"], caption)
                    assert _colour_at(pixels, second[0], axis).min() >= 64, (image["file_name"], caption)
                elif claim[0] == "corner":
                    rows, columns = _colour_at(pixels, claim[1][0], 0), _colour_at(pixels, claim[1][0], 1)
                    assert ((rows < 64).all() if claim[2] == "top" else (rows >= 64).all()), caption
                    assert ((columns < 64).all() if claim[3] == "left" else (columns >= 64).all()), caption


def _colour_at(pixels: np.ndarray, colour: str, axis: int) -> np.ndarray:
    """Row (axis 0) or column (axis 1) indices of the pixels close to a named colour; fails if there are none."""
    where = np.nonzero(np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1) < 40)[axis]
    assert where.size > 100, f"hardly any {colour} pixels"
    return where


def test_spatial_same_seed_gives_identical_bytes_and_differs_from_plain(tmp_path):
    sizes = {"n_train": 12, "n_val": 4, "n_test": 3}
    first = _files(Path(make_sample_dataset(tmp_path / "a" / "s", seed=7, **sizes, variant="spatial")["root"]))
    again = _files(Path(make_sample_dataset(tmp_path / "b" / "s", seed=7, **sizes, variant="spatial")["root"]))
    other = _files(Path(make_sample_dataset(tmp_path / "c" / "s", seed=8, **sizes, variant="spatial")["root"]))
    plain = _files(Path(make_sample_dataset(tmp_path / "d" / "s", seed=7, **sizes)["root"]))
    assert first == again
    assert first["annotations/captions_train.json"] != other["annotations/captions_train.json"]
    assert first["annotations/captions_train.json"] != plain["annotations/captions_train.json"]


def test_markers_keep_the_variants_apart(tmp_path):
    """A plain set at root is not taken for a spatial one (it is replaced), nor a spatial one for a plain one."""
    root, sizes = tmp_path / "sample", {"n_train": 6, "n_val": 3, "n_test": 2}
    assert sample_variant(root) is None
    make_sample_dataset(root, seed=0, **sizes)
    plain = _files(root)
    assert sample_variant(root) == "plain" and "variant" not in json.loads((root / MARKER).read_text())["params"]
    spatial = make_sample_dataset(root, seed=0, **sizes, variant="spatial")
    assert spatial["created"] is True and sample_variant(root) == "spatial"
    assert json.loads((root / MARKER).read_text())["params"]["variant"] == "spatial"
    assert {(i["width"], i["height"]) for i in _load(root, "train")["images"]} == {(128, 128)}
    assert make_sample_dataset(root, seed=0, **sizes, variant="spatial")["created"] is False
    assert make_sample_dataset(root, seed=0, **sizes)["created"] is True
    assert _files(root) == plain and sample_variant(root) == "plain"
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_unknown_variant_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of 'plain', 'spatial', got 'mirrored'"):
        make_sample_dataset(tmp_path / "sample", n_train=4, n_val=2, n_test=1, variant="mirrored")
    assert not (tmp_path / "sample").exists()
    (tmp_path / "foreign").mkdir()
    assert sample_variant(tmp_path / "foreign") is None


def test_the_same_two_objects_appear_in_both_orders(tmp_path):
    """A model that ignores where things are cannot caption both images of such a pair right: one is 'A left of B',
    the other 'B left of A' (and the same for above / below)."""
    root = tmp_path / "sample-spatial"
    make_sample_dataset(root, seed=0, n_train=200, n_val=0, n_test=0, variant="spatial")
    orders: dict[str, set] = {"left": set(), "above": set()}
    for captions in _captions_by_image(_load(root, "train")).values():
        for claim in map(_parse, captions):
            if claim[0] == "pair":
                first, second = (claim[1], claim[3]) if claim[2] in ("left", "above") else (claim[3], claim[1])
                orders["left" if claim[2] in ("left", "right") else "above"].add((first, second))
    for relation, pairs in orders.items():
        both = {pair for pair in pairs if pair[::-1] in pairs}
        assert len(both) >= 2, f"no two objects appear {relation} each other in both orders"


def test_spatial_vocabulary_says_where(spatial_set):
    root, _ = spatial_set
    captions = [a["caption"] for split in ("train", "val") for a in _load(root, split)["annotations"]]
    words = {w for caption in captions for w in re.findall(r"[a-z]+", caption.lower())}
    assert words >= {"left", "right", "above", "below", "top", "bottom", "corner"}
    assert not words & {"small", "little", "large", "big", "two", "three", "black and white"}
    assert len(words) <= 50
