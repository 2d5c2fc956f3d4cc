"""A small synthetic captioning dataset in COCO's format: coloured shapes with five captions each.

It lets the notebooks, CLIs and tests run end to end without downloading COCO. It comes in two variants:

* "plain" (the default, `data/sample`): the images are learnable from the pooled features of a frozen,
  randomly initialised ResNet-50 (no ImageNet weights offline): objects sit near the centre, and every caption
  stays true when the image is mirrored left-right (the feature cache may also store mirrored views), so no
  caption says "left" or "right".
* "spatial" (`data/sample-spatial`): 128 px images whose captions say WHERE the objects are: two different
  objects side by side ("a red circle left of a blue square") or one above the other ("a red circle above a
  blue square"), or one object in a corner ("a green triangle in the top right corner"). A pooled, nearly
  translation-invariant feature cannot tell "A left of B" from "B left of A", a per-cell one (the 4x4 grid
  of the last conv map at 128 px, as a soft-attention decoder sees it) can. Its captions say left and right
  on purpose: never train it with mirrored views (they would be captioned wrongly).
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fileio import atomic_write

FORMAT_VERSION = 1
MARKER = ".sample_complete.json"
SPLITS = ("train", "val", "test")
ANNOTATION_FILES = {
    "train": "captions_train.json",
    "val": "captions_val.json",
    "test": "image_info_test.json",
}

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 55, 180),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (248, 248, 248), "gray": (195, 195, 195), "black": (25, 25, 25)}
BACKGROUND_WEIGHTS = (0.45, 0.3, 0.25)
SHAPES = ("circle", "square", "triangle")
SHAPE_WORDS = {"circle": ("circle", "circle", "circle", "dot", "disk"),
               "square": ("square", "square", "square", "box", "block"),
               "triangle": ("triangle",)}
PLURALS = {"circle": "circles", "dot": "dots", "disk": "disks", "square": "squares", "box": "boxes",
           "block": "blocks", "triangle": "triangles"}
SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "big", "big")}
NUMBERS = {1: "one", 2: "two", 3: "three"}
ODD_SIZES = ((112, 80), (80, 112), (72, 100), (100, 72), (128, 96), (96, 128))
ODD_SIZE_RATE = 0.15
GRAY_EVERY, GRAY_AT = 20, 9  # images with index % 20 == 9 are grayscale: 5%, at places tests can rely on
CMYK_AT = 4  # image 4 of each split is saved as CMYK: three in the set, so RGB conversion is exercised
TEXTURE_RATE = 0.15  # share of images with a lightly noisy background
# Layouts sit at the image centre and move only a few pixels (of 96): the pooled features of a frozen, randomly
# initialised ResNet-50 lose a small object's shape when it can be anywhere (linear probe on shape: 0.56 for
# small objects placed anywhere, 0.99 within 3 px of the centre).
JITTER = 2.0
SUPERSAMPLE = 2  # draw at twice the size and downsample, for smooth edges like a photo

VARIANTS = ("plain", "spatial")
# The spatial variant: fixed-size RGB images (no grayscale, CMYK or odd sizes), all objects "medium" (no size
# words). Two-object layouts put their centres at 1/4 and 3/4 of one axis, anywhere in the middle band of the
# other; a corner object sits at 0.24 / 0.76 of both. Every object lies wholly inside its half (quadrant), and at
# least 8 px from the edges: the evaluation transform at 128 px (resize to 146, centre crop 128) keeps it whole.
SPATIAL_SIZE = 128
SPATIAL_LAYOUTS = ("sides", "stack", "corner")
SPATIAL_RADIUS = (14.0, 18.0)  # pixels
SPATIAL_BAND = (0.3, 0.7)  # share of the image: where the shared free coordinate of a two-object layout lies
SPATIAL_JITTER = 3.0  # pixels, each object on its own
CORNERS = {"top left": (0.24, 0.24), "top right": (0.76, 0.24), "bottom left": (0.24, 0.76),
           "bottom right": (0.76, 0.76)}


@dataclass
class Shape:
    """One drawn object: what it is and where, in pixels of the final image."""

    kind: str
    colour: str
    size: str  # "small", "medium" or "large"; only small and large are named in captions
    x: float
    y: float
    radius: float


@dataclass
class Scene:
    """Everything needed to draw an image and caption it."""

    width: int
    height: int
    layout: str  # plain: "single", "group" (same shape and colour) or "pair" (one above the other);
    # spatial: "sides" (shapes: left, right), "stack" (shapes: top, bottom) or "corner" (one shape)
    arrangement: str  # "row", "column" or "triangle" for groups, "" otherwise
    place: str  # "top", "middle" or "bottom" for one plain object, a key of CORNERS for "corner", "" otherwise
    background: str
    textured: bool
    gray: bool
    cmyk: bool
    shapes: list[Shape] = field(default_factory=list)


def _pick(rng: np.random.Generator, options):
    """Choose one element of a sequence uniformly."""
    return options[int(rng.integers(len(options)))]


def _luminance(rgb) -> float:
    """ITU-R 601 luma, the one PIL uses for convert('L')."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _make_scene(rng: np.random.Generator, index: int) -> Scene:
    """Draw the random content of image number `index` of a split."""
    width, height = _pick(rng, ODD_SIZES) if rng.random() < ODD_SIZE_RATE else (96, 96)
    gray = index % GRAY_EVERY == GRAY_AT
    scene = Scene(width, height, layout=_pick(rng, ("single", "single", "group", "group", "pair")),
                  arrangement="", place="", background="", textured=bool(rng.random() < TEXTURE_RATE),
                  gray=gray, cmyk=index == CMYK_AT and not gray)
    if scene.layout == "single":
        size = _pick(rng, ("small", "large"))
        scene.place = _pick(rng, ("top", "middle", "middle", "bottom")) if size == "small" else "middle"
        radius = rng.uniform(13, 15) if size == "small" else rng.uniform(25, 28)
        objects = [(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), size, radius)]
        offsets = [(0.0, {"top": -22.0, "middle": 0.0, "bottom": 22.0}[scene.place])]
    elif scene.layout == "group":
        count = int(rng.integers(2, 4))
        kind, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
        radius = rng.uniform(14, 16) if count == 2 else rng.uniform(10, 11)
        scene.arrangement = _pick(rng, ("row", "column") if count == 2 else ("row", "column", "triangle"))
        objects = [(kind, colour, "medium", radius)] * count
        offsets = _group_offsets(count, 2.35 * radius, scene.arrangement)
    else:
        objects, offsets = _pair_objects(rng)
    unit = min(width, height) / 96
    shift_x, shift_y = rng.uniform(-JITTER, JITTER, size=2)
    for (kind, colour, size, radius), (dx, dy) in zip(objects, offsets, strict=True):
        x = width / 2 + unit * (dx + shift_x + rng.uniform(-0.5, 0.5))
        y = height / 2 + unit * (dy + shift_y + rng.uniform(-0.5, 0.5))
        scene.shapes.append(Shape(kind, colour, size, x, y, unit * radius))
    _pick_background(rng, scene)
    return scene


def _group_offsets(count: int, step: float, arrangement: str) -> list[tuple[float, float]]:
    """Centres, relative to the image centre, of equal objects `step` apart in a row, column or triangle."""
    if arrangement == "triangle":  # apex up, so it looks the same mirrored
        half_height = step * 0.433
        return [(0.0, -half_height), (-step / 2, half_height), (step / 2, half_height)]
    along = [(i - (count - 1) / 2) * step for i in range(count)]
    return [(a, 0.0) for a in along] if arrangement == "row" else [(0.0, a) for a in along]


def _pair_objects(rng: np.random.Generator) -> tuple[list[tuple], list[tuple[float, float]]]:
    """Two objects that differ in shape or colour (or both), one clearly above the other."""
    while True:
        top = (_pick(rng, SHAPES), _pick(rng, list(COLOURS)))
        bottom = (_pick(rng, SHAPES), _pick(rng, list(COLOURS)))
        if top != bottom:
            break
    sizes = [_pick(rng, ("small", "large")) for _ in range(2)]
    radii = [rng.uniform(11, 12) if size == "small" else rng.uniform(16, 17) for size in sizes]
    span = 2 * radii[0] + 2 * radii[1] + 6
    objects = [(*top, sizes[0], radii[0]), (*bottom, sizes[1], radii[1])]
    return objects, [(0.0, -span / 2 + radii[0]), (0.0, span / 2 - radii[1])]


def _two_different(rng: np.random.Generator) -> list[tuple[str, str]]:
    """(kind, colour) of two objects that differ in shape or colour (or both)."""
    while True:
        objects = [(_pick(rng, SHAPES), _pick(rng, list(COLOURS))) for _ in range(2)]
        if objects[0] != objects[1]:
            return objects


def _make_spatial_scene(rng: np.random.Generator, index: int) -> Scene:
    """Draw a spatial image: two objects side by side ("sides") or stacked ("stack"), or one in a corner."""
    del index  # every spatial image is RGB and square: nothing depends on its place in the split
    size = SPATIAL_SIZE
    scene = Scene(size, size, layout=_pick(rng, SPATIAL_LAYOUTS), arrangement="", place="", background="",
                  textured=bool(rng.random() < TEXTURE_RATE), gray=False, cmyk=False)
    if scene.layout == "corner":
        scene.place = _pick(rng, list(CORNERS))
        objects, centres = [(_pick(rng, SHAPES), _pick(rng, list(COLOURS)))], [CORNERS[scene.place]]
    else:
        objects, band = _two_different(rng), rng.uniform(*SPATIAL_BAND)
        centres = [(0.25, band), (0.75, band)] if scene.layout == "sides" else [(band, 0.25), (band, 0.75)]
    for (kind, colour), (fx, fy) in zip(objects, centres, strict=True):
        dx, dy = rng.uniform(-SPATIAL_JITTER, SPATIAL_JITTER, size=2)
        scene.shapes.append(Shape(kind, colour, "medium", fx * size + dx, fy * size + dy,
                                  rng.uniform(*SPATIAL_RADIUS)))
    _pick_background(rng, scene)
    return scene


def _pick_background(rng: np.random.Generator, scene: Scene) -> None:
    """Choose a background that every object stands out from (in luminance when the image is grayscale)."""
    names = list(BACKGROUNDS)
    while True:
        name = names[int(rng.choice(len(names), p=BACKGROUND_WEIGHTS))]
        contrast = min(abs(_luminance(COLOURS[s.colour]) - _luminance(BACKGROUNDS[name])) for s in scene.shapes)
        if not scene.gray or contrast > 50:
            scene.background = name
            return


def _polygon(shape: Shape, scale: float) -> list[tuple[float, float]]:
    """Corner points of an upright square or triangle (kept upright: edge directions tell shapes apart)."""
    if shape.kind == "square":
        angles, reach = np.pi / 4 + np.arange(4) * np.pi / 2, shape.radius * 1.13
    else:
        angles, reach = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, shape.radius * 1.2
    cy = shape.y + (0.2 * shape.radius if shape.kind == "triangle" else 0)  # centre the triangle's bounding box
    return [(scale * (shape.x + reach * np.cos(a)), scale * (cy + reach * np.sin(a))) for a in angles]


def _jitter(rgb: tuple[int, int, int], offsets: np.ndarray) -> tuple[int, int, int]:
    """A colour moved by `offsets`, kept within 0..255."""
    r, g, b = (min(255, max(0, c + int(d))) for c, d in zip(rgb, offsets, strict=True))
    return r, g, b


def _render(rng: np.random.Generator, scene: Scene) -> Image.Image:
    """Paint the scene: background (plain or lightly noisy), then the shapes with slightly jittered colours."""
    scale = SUPERSAMPLE
    size = (scene.width * scale, scene.height * scale)
    base = _jitter(BACKGROUNDS[scene.background], rng.integers(-6, 7, 3))
    if scene.textured:  # pixel noise made at the final size (4x cheaper), enlarged to the drawing size
        noise = rng.standard_normal((scene.height, scene.width, 3), dtype=np.float32) * 7
        image = Image.fromarray(np.clip(noise + base, 0, 255).astype(np.uint8), "RGB")
        image = image.resize(size, Image.Resampling.NEAREST)
    else:
        image = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = _jitter(COLOURS[shape.colour], rng.integers(-15, 16, 3))
        if shape.kind == "circle":
            r = shape.radius
            draw.ellipse([scale * (shape.x - r), scale * (shape.y - r), scale * (shape.x + r), scale * (shape.y + r)],
                         fill=fill)
        else:
            draw.polygon(_polygon(shape, scale), fill=fill)
    image = image.resize((scene.width, scene.height), Image.Resampling.BOX)
    if scene.gray:
        return image.convert("L")
    return image.convert("CMYK") if scene.cmyk else image


def _article(phrase: str) -> str:
    """Prefix 'a' or 'an'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: np.random.Generator, shape: Shape, gray: bool, count: int = 1, sized: bool = True) -> str:
    """'small red circle', 'blue boxes', ... without article or number; no colour in grayscale images."""
    word = _pick(rng, SHAPE_WORDS[shape.kind])
    words = [PLURALS[word] if count > 1 else word]
    if not gray:
        words.insert(0, shape.colour)
    if sized and shape.size in SIZE_WORDS:
        words.insert(0, _pick(rng, SIZE_WORDS[shape.size]))
    return " ".join(words)


def _single_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of a one-object image, and whether it is a noun phrase (so may get a prefix)."""
    shape, bg = scene.shapes[0], _background_word(rng, scene)
    obj = _article(_noun(rng, shape, scene.gray, sized=rng.random() < 0.8))
    place = {"top": "near the top", "bottom": "near the bottom", "middle": "in the middle"}[scene.place]
    options = [
        (obj, True),
        (f"{obj} on a {bg} background", True),
        (f"a single {_noun(rng, shape, scene.gray)}", True),
        (f"one {_noun(rng, shape, scene.gray)} on a {bg} background", True),
        (f"a {bg} background with {obj}", True),
        (f"a picture of {obj}", False),
        (f"there is {obj} in the picture", False),
        (f"a drawing of {obj} on a {bg} background", False),
    ]
    if shape.size == "small":
        options += [(f"{obj} {place}", True), (f"{obj} {place} of the image", True)]
    return _pick(rng, options)


def _group_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of an image with two or three equal objects."""
    shape, count, bg = scene.shapes[0], len(scene.shapes), _background_word(rng, scene)
    objs = f"{NUMBERS[count]} {_noun(rng, shape, scene.gray, count)}"
    options = [
        (objs, True),
        (f"{objs} on a {bg} background", True),
        (f"a picture of {objs}", False),
        (f"there are {objs} in the picture", False),
        (f"a group of {objs}" if count == 3 else f"a pair of {_noun(rng, shape, scene.gray, 2)}", True),
    ]
    if scene.arrangement == "row":
        options += [(f"{objs} in a row", True), (f"a row of {objs}", True), (f"{objs} side by side", True),
                    (f"{objs} next to each other on a {bg} background", True)]
    elif scene.arrangement == "column":
        options += [(f"{objs} stacked on top of each other", True), (f"a column of {objs}", True),
                    (f"{objs} one above the other", True), (f"{objs} in a vertical line", True)]
    else:
        options += [(f"{objs} arranged in a triangle", True), (f"{objs} close together", True),
                    (f"{objs} in a triangle on a {bg} background", True)]
    return _pick(rng, options)


def _pair_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of an image with two different objects, one above the other."""
    top, bottom = scene.shapes
    if scene.gray and top.kind == bottom.kind:  # in gray they differ only in shade: say so plainly
        noun = _pick(rng, SHAPE_WORDS[top.kind])
        return _pick(rng, [(f"two {PLURALS[noun]} one above the other", True),
                           (f"two {PLURALS[noun]} stacked on top of each other", True),
                           (f"a {noun} above another {noun}", True)])
    sized = top.size != bottom.size and rng.random() < 0.7
    a, b = (_article(_noun(rng, s, scene.gray, sized=sized)) for s in (top, bottom))
    bg = _background_word(rng, scene)
    return _pick(rng, [
        (f"{a} above {b}", True),
        (f"{b} below {a}", True),
        (f"{a} over {b}", True),
        (f"{b} under {a}", True),
        (f"{a} and {b}", True),
        (f"{a} above {b} on a {bg} background", True),
        (f"{a} at the top and {b} at the bottom", True),
        (f"{a} with {b} below it", True),
        (f"two shapes , {a} above {b}", True),
        (f"a picture of {a} and {b}", False),
    ])


def _sides_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of two different objects side by side, saying which is on the left."""
    left, right = (_article(_noun(rng, shape, scene.gray)) for shape in scene.shapes)
    bg = _background_word(rng, scene)
    return _pick(rng, [
        (f"{left} left of {right}", True),
        (f"{left} to the left of {right}", True),
        (f"{right} right of {left}", True),
        (f"{right} to the right of {left}", True),
        (f"{left} on the left and {right} on the right", True),
        (f"{right} on the right and {left} on the left", True),
        (f"{left} to the left of {right} on a {bg} background", True),
        (f"{left} with {right} to its right", True),
        (f"{right} with {left} to its left", True),
    ])


def _stack_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of two different objects one above the other, saying which is on top."""
    top, bottom = (_article(_noun(rng, shape, scene.gray)) for shape in scene.shapes)
    bg = _background_word(rng, scene)
    return _pick(rng, [
        (f"{top} above {bottom}", True),
        (f"{bottom} below {top}", True),
        (f"{top} over {bottom}", True),
        (f"{bottom} under {top}", True),
        (f"{top} at the top and {bottom} at the bottom", True),
        (f"{bottom} at the bottom and {top} at the top", True),
        (f"{top} above {bottom} on a {bg} background", True),
        (f"{top} with {bottom} below it", True),
        (f"{bottom} with {top} above it", True),
    ])


def _corner_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, bool]:
    """One caption of one object in a corner, saying which corner."""
    obj, corner = _article(_noun(rng, scene.shapes[0], scene.gray)), scene.place
    bg = _background_word(rng, scene)
    return _pick(rng, [
        (f"{obj} in the {corner} corner", True),
        (f"{obj} at the {corner}", True),
        (f"there is {obj} in the {corner} corner", False),
        (f"{obj} in the {corner} of the image", True),
        (f"{obj} in the {corner} corner of the image", True),
        (f"{obj} in the {corner} corner on a {bg} background", True),
        (f"a {bg} background with {obj} in the {corner} corner", True),
        (f"a picture of {obj} in the {corner} corner", False),
    ])


def _background_word(rng: np.random.Generator, scene: Scene) -> str:
    """Name of the background colour, with the two spellings of gray."""
    return _pick(rng, ("gray", "grey")) if scene.background == "gray" else scene.background


def _captions(rng: np.random.Generator, scene: Scene, count: int = 5) -> list[str]:
    """`count` different captions in COCO's loose style (some capitalised, some with a full stop)."""
    compose = {"single": _single_caption, "group": _group_caption, "pair": _pair_caption, "sides": _sides_caption,
               "stack": _stack_caption, "corner": _corner_caption}[scene.layout]
    captions: list[str] = []
    while len(captions) < count:
        text, is_phrase = compose(rng, scene)
        if scene.gray and len(captions) < 2 and not is_phrase:
            continue  # the first two captions of a grayscale image say so
        if scene.gray and is_phrase and (len(captions) < 2 or rng.random() < 0.4):
            text = _pick(rng, ("a black and white picture of ", "a black and white photo of ",
                               "a grayscale image of ")) + text
        ending = rng.random()
        text = text + (" ." if ending < 0.3 else "." if ending < 0.5 else "")
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if text.lower().rstrip(" .") not in {c.lower().rstrip(" .") for c in captions}:
            captions.append(text)
    return captions


def _write_split(folder: Path, split: str, image_ids: list[int], rng: np.random.Generator,
                 first_caption_id: int, variant: str = "plain") -> tuple[list[dict], list[dict], list[Scene]]:
    """Write the JPEGs of one split; return its COCO image and caption records and the scenes drawn."""
    folder.mkdir(parents=True)
    make_scene = _make_spatial_scene if variant == "spatial" else _make_scene
    images, annotations, scenes = [], [], []
    caption_id = first_caption_id
    for index, image_id in enumerate(tqdm(image_ids, desc=f"sample {split}", unit="img", leave=False)):
        scene = make_scene(rng, index)
        file_name = f"{split}_{image_id:012d}.jpg"
        _render(rng, scene).save(folder / file_name, "JPEG", quality=90)
        images.append({"license": 1, "file_name": file_name, "height": scene.height, "width": scene.width,
                       "date_captured": "2024-01-01 00:00:00", "id": image_id})
        if split != "test":
            for text in _captions(rng, scene):
                annotations.append({"image_id": image_id, "id": caption_id, "caption": text})
                caption_id += 1
        scenes.append(scene)
    return images, annotations, scenes


def _write_json(path: Path, data: dict) -> None:
    """Write compact JSON atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))


def _info(seed: int, variant: str) -> dict:
    """The COCO 'info' record; the spatial variant names itself there too (the plain one is as it always was)."""
    kind = "" if variant == "plain" else f" ({variant} variant: the captions say where the objects are)"
    info = {"description": f"Synthetic shapes captioning sample{kind}, seed {seed}, made by sample_data.py",
            "version": str(FORMAT_VERSION), "year": 2024, "contributor": "sample_data.py",
            "date_created": "2024/01/01"}
    return info if variant == "plain" else {**info, "variant": variant}


def _generate(folder: Path, seed: int, counts: dict[str, int], variant: str = "plain") -> dict:
    """Write images and annotation files of all splits into `folder`; return counts."""
    total = sum(counts.values())
    id_rng = np.random.default_rng([seed, 0])
    all_ids = (id_rng.choice(999_999, size=total, replace=False) + 1).tolist()  # COCO-like: sparse, unique
    info = _info(seed, variant)
    licenses = [{"id": 1, "name": "Public Domain (generated)", "url": ""}]
    (folder / "annotations").mkdir(parents=True)
    stats = {"captions": 0, "grayscale": 0, "cmyk": 0}
    layouts = dict.fromkeys(SPATIAL_LAYOUTS, 0)
    start = 0
    for number, split in enumerate(SPLITS, start=1):
        ids = all_ids[start:start + counts[split]]
        start += counts[split]
        images, annotations, scenes = _write_split(folder / "images" / split, split, ids,
                                                   np.random.default_rng([seed, number]), number * 10_000_000,
                                                   variant)
        data = {"info": info, "licenses": licenses, "images": images}
        if split != "test":
            data["annotations"] = annotations
        _write_json(folder / "annotations" / ANNOTATION_FILES[split], data)
        stats[split] = len(images)
        stats["captions"] += len(annotations)
        stats["grayscale"] += sum(s.gray for s in scenes)
        stats["cmyk"] += sum(s.cmyk for s in scenes)
        for scene in scenes:
            layouts[scene.layout] = layouts.get(scene.layout, 0) + 1
    return stats if variant == "plain" else {**stats, "layouts": layouts}


def _read_marker(path: Path) -> dict | None:
    """Contents of a completion marker, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_arguments(seed: int, counts: dict[str, int], variant: str) -> None:
    """Raise ValueError for a negative or non-integer seed or count, or an unknown variant."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for split, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"n_{split} must be a non-negative integer, got {count!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")


def sample_variant(root: str | Path) -> str | None:
    """The variant ("plain" or "spatial") of the complete sample set at `root`, or None if there is none."""
    marker = _read_marker(Path(root) / MARKER)
    params = marker.get("params") if isinstance(marker, dict) else None
    return params.get("variant", "plain") if isinstance(params, dict) else None


def make_sample_dataset(root: str | Path, seed: int = 0, n_train: int = 3000, n_val: int = 250,
                        n_test: int = 100, variant: str = "plain") -> dict:
    """Generate the sample set under `root` (or keep it if already complete for these parameters); return stats.

    `variant` is "plain" or "spatial" (see the module docstring); the marker records it, so a set of the other
    variant at `root` is never taken for this one: it is replaced, like a set of another seed. The set is built
    in a temporary folder beside `root` and renamed into place, so `root` is either absent, a complete earlier
    set, or the complete new one. The same seed and variant give byte-identical files.
    """
    started = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_arguments(seed, counts, variant)
    root = Path(root)
    params = {"version": FORMAT_VERSION, "seed": seed, **{f"n_{split}": n for split, n in counts.items()}}
    if variant != "plain":  # plain markers stay as they were, so sets made before variants existed still count
        params["variant"] = variant
    marker = _read_marker(root / MARKER)
    if marker is not None and marker.get("params") == params:
        return {**marker["stats"], "root": str(root), "created": False,
                "seconds": round(time.perf_counter() - started, 3)}
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).exists())):
        raise FileExistsError(f"{root}: exists and is not a sample set made by sample_data.py (no {MARKER}); "
                              "remove it or choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished set is an ordinary folder
    old = tmp.with_name(tmp.name + "-old")
    try:
        stats = _generate(tmp, seed, counts, variant)
        _write_json(tmp / MARKER, {"params": params, "stats": stats})
        if root.exists():
            os.rename(root, old)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return {**stats, "root": str(root), "created": True, "seconds": round(time.perf_counter() - started, 3)}


def flickr_copy(sample_root: str | Path, out: str | Path, layout: str = "kaggle", test_share: int = 2) -> Path:
    """A Flickr8k-like copy of a generated sample set's train and val images (names and captions kept), laid out
    as the shared copies are: 'kaggle' (Images/ + captions.txt), 'original' (Flicker8k_Dataset/ +
    Flickr8k.token.txt + the Flickr_8k.*Images.txt lists) or 'karpathy' (images/ + dataset_flickr8k.json, with
    restval). Every `test_share`-th val image is a test image. Returns the folder of the caption file."""
    sample_root, out = Path(sample_root), Path(out)
    records = []  # (split, file name, captions)
    for split in ("train", "val"):
        data = json.loads((sample_root / f"annotations/captions_{split}.json").read_text())
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        for index, image in enumerate(sorted(data["images"], key=lambda i: i["id"])):
            name = "test" if split == "val" and index % test_share == 0 else split
            if split == "train" and index % 5 == 4:
                name = "restval"
            records.append((name, image["file_name"], captions[image["id"]], sample_root / "images" / split))
    folder = {"kaggle": "Images", "original": "Flicker8k_Dataset", "karpathy": "images"}[layout]
    (out / folder).mkdir(parents=True, exist_ok=True)
    for _, name, _, source in records:
        shutil.copy(source / name, out / folder / name)
    if layout == "kaggle":
        lines = ["image,caption"] + [f'{name},"{c}"' for _, name, caps, _ in records for c in caps]
        (out / "captions.txt").write_text("\n".join(lines) + "\n")
    elif layout == "original":
        lines = [f"{name}#{k}\t{c}" for _, name, caps, _ in records for k, c in enumerate(caps)]
        (out / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
        for split, list_name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
            names = [name for s, name, _, _ in records if s == split or (split == "train" and s == "restval")]
            (out / f"Flickr_8k.{list_name}.txt").write_text("\n".join(names) + "\n")
    else:
        images, sentence_id = [], 0
        for index, (split, name, caps, _) in enumerate(records):
            sentences = []
            for c in caps:
                sentences.append({"raw": c, "tokens": c.lower().split(), "imgid": index, "sentid": sentence_id})
                sentence_id += 1
            images.append({"filename": name, "imgid": index, "split": split, "sentences": sentences,
                           "sentids": [s["sentid"] for s in sentences]})
        (out / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return out
