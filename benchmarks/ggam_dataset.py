"""Generate a small fine-grained dataset: classes differ only by a small part on real clutter.

Public fine-grained sets (CUB-200-2011 and the like) cannot be downloaded here, so this builds
one from the sample photos. Each image is a random crop (random scale, position, mirror) of one
sample photo, resized to PX x PX; on it lie the class part and one distractor. A class is a
shape crossed with a fill (``red-disc``, ``blue-star``, ``stripes-cross`` ...): each shape comes
in at least two fills and each fill on several shapes, so neither the colour nor the outline
alone gives the class. Every fill has the same mean brightness (100 on 0-255) and the parts
cover 12-20% of the image side, so global colour statistics say little. The part sits at a
random position (fully inside the image), scale and slight rotation; the distractor is a class
shape in green, a fill no class uses, placed apart from the part, so "where is a shape" does
not suffice either. Each image's box bounds exactly the pixels the part changes.

Layout (class folders, as ``camlens evaluate`` reads them; file names carry no class)::

    OUT/classes.txt               class names, one per line (--class-names; folder = class name)
    OUT/train/<class>/0000.png    --per-class images per class
    OUT/train/boxes.csv           path,xmin,ymin,xmax,ymax (pixel edges, paths relative to the split)
    OUT/test/<class>/0000.png     held-out split, --test-per-class images per class
    OUT/test/boxes.csv

Images are already square at the model's input size, so the matching preprocessing resizes
nothing and crops nothing: ``--input-size PX --resize PX``. For example::

    .venv/bin/python benchmarks/ggam_dataset.py ggam-data
    .venv/bin/camlens evaluate ggam-data/test --boxes ggam-data/test/boxes.csv \\
        --model mypkg.net:build --weights net.pt --class-names ggam-data/classes.txt \\
        --input-size 128 --resize 128

The defaults (8 classes, 60 training and 30 held-out images per class, 128 px: 720 images,
about 16 MB, about 11 s to write on a loaded 2-core CPU) are sized for training several small
models over 3 seeds within half an hour on such a CPU; at 128 px a part is 15-30 px across,
one or two cells of a stride-16 feature map.

Every image comes from its own random generator seeded by (seed, split, class, index), so a
rerun with the same arguments writes byte-identical files, and a larger --per-class keeps the
first images unchanged.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "cameraman.png")
SHAPES = ("disc", "square", "triangle", "star", "cross", "ring")
# Fills of equal mean brightness (100): textures alternate 0 and 200.
FILLS = {"red": (200, 60, 40), "blue": (40, 70, 190), "stripes": None, "checks": None}
DISTRACTOR = (40, 190, 70)  # green, mean 100: a fill no class has
PART_SIDE = (0.12, 0.20)  # the part's diameter, as a fraction of the image side
MAX_TURN = 20.0  # degrees either way
RIM, RIM_COLOUR = 1.5, (235, 235, 235)  # rim width in pixels at 128 px (scales with the side)
SUPERSAMPLE = 4  # the part's mask is drawn this much larger, then averaged down: smooth edges
MIN_SIZE = 32  # below this a part is a few pixels and the shapes cannot be told apart
SPLITS = ("train", "test")


def class_names(classes: int) -> list[str]:
    """``classes`` names fill-shape: two fills (more past 12 classes), shapes in turn."""
    if not 2 <= classes <= len(SHAPES) * len(FILLS):
        raise ValueError(f"--classes must be 2 to {len(SHAPES) * len(FILLS)}, not {classes}")
    fills = max(2, math.ceil(classes / len(SHAPES)))
    shapes = math.ceil(classes / fills)
    return [f"{fill}-{shape}" for fill in list(FILLS)[:fills] for shape in SHAPES[:shapes]][:classes]


@dataclass(frozen=True)
class Placement:
    shape: str
    centre: tuple[float, float]
    radius: float
    turn: float  # radians


@dataclass(frozen=True)
class Scene:
    """Everything about an image except its class: the background and where the part goes."""

    background: np.ndarray  # size x size x 3, uint8, the distractor already drawn
    part: Placement  # the part's place; its shape and fill come from the class


def _outline(shape: str, radius: float, turn: float) -> list[tuple[float, float]]:
    """The shape's polygon around (0, 0), inside the circle of ``radius``."""
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2, radius) for k in range(4)]
    elif shape == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3, radius) for k in range(3)]
    elif shape == "star":
        corners = [(-math.pi / 2 + k * math.pi / 5, radius if k % 2 == 0 else radius * 0.45) for k in range(10)]
    elif shape == "cross":
        arm, w = radius, radius * 0.38
        points = [(w, arm), (w, w), (arm, w), (arm, -w), (w, -w), (w, -arm),
                  (-w, -arm), (-w, -w), (-arm, -w), (-arm, w), (-w, w), (-w, arm)]
        corners = [(math.atan2(y, x), math.hypot(x, y) * 0.95) for x, y in points]
    else:
        raise ValueError(shape)
    return [(r * math.cos(a + turn), r * math.sin(a + turn)) for a, r in corners]


def _coverage(place: Placement, size: int) -> np.ndarray:
    """The fraction of each pixel the shape covers (size x size floats in [0, 1])."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = (v * SUPERSAMPLE for v in place.centre)
    r = place.radius * SUPERSAMPLE
    if place.shape in ("disc", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if place.shape == "ring":
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in _outline(place.shape, r, place.turn)], fill=255)
    coverage = np.asarray(mask, dtype=np.float64).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage / 255.0


def _fill(fill: str, place: Placement, size: int) -> np.ndarray:
    """The fill's colours over the whole image (size x size x 3); textures turn with the part."""
    colour = FILLS.get(fill, DISTRACTOR if fill == "distractor" else None)
    if colour is not None:
        return np.broadcast_to(np.array(colour, dtype=np.float64), (size, size, 3))
    y, x = np.mgrid[0:size, 0:size] + 0.5
    period = max(2.0, place.radius / 2)  # four bands across the part, whatever its scale
    u = (x - place.centre[0]) * math.cos(place.turn) + (y - place.centre[1]) * math.sin(place.turn)
    v = -(x - place.centre[0]) * math.sin(place.turn) + (y - place.centre[1]) * math.cos(place.turn)
    bands = np.floor(u / period).astype(int)
    if fill == "checks":
        bands = bands + np.floor(v / period).astype(int)
    level = np.where(bands % 2 == 0, 200.0, 0.0)
    return np.repeat(level[:, :, None], 3, axis=2)


def _paint(image: np.ndarray, fill: str, place: Placement) -> np.ndarray:
    size = image.shape[0]
    # A light rim (the same for every class) keeps a blue part visible on the night sky and a
    # red one on the red saucer: the task is to tell parts apart, not to find them at all.
    rim = Placement(place.shape, place.centre, place.radius + RIM * size / 128, place.turn)
    painted = image.astype(np.float64)
    for layer, colours in ((rim, np.array(RIM_COLOUR, dtype=np.float64)), (place, _fill(fill, place, size))):
        alpha = _coverage(layer, size)[:, :, None]
        painted = painted * (1 - alpha) + colours * alpha
    return np.clip(np.rint(painted), 0, 255).astype(np.uint8)


def _placement(rng: np.random.Generator, size: int, shape: str) -> Placement:
    radius = rng.uniform(*PART_SIDE) * size / 2
    margin = radius + RIM * size / 128 + 1  # the rim too lies fully inside the image
    centre = tuple(float(v) for v in rng.uniform(margin, size - margin, size=2))
    return Placement(shape, centre, radius, math.radians(rng.uniform(-MAX_TURN, MAX_TURN)))


def _background(rng: np.random.Generator, photos: list[Image.Image], size: int) -> Image.Image:
    photo = photos[rng.integers(len(photos))]
    width, height = photo.size
    side = round(min(width, height) * rng.uniform(0.35, 1.0))
    left, top = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def scene(rng: np.random.Generator, photos: list[Image.Image], size: int, shapes: list[str]) -> Scene:
    """A background (photo crop with a distractor) and the part's place, from ``rng``."""
    background = np.asarray(_background(rng, photos, size), dtype=np.uint8)
    part = _placement(rng, size, shapes[0])
    while True:  # the distractor must not touch the part: redraw until the two circles are apart
        distractor = _placement(rng, size, shapes[int(rng.integers(len(shapes)))])
        gap = math.dist(part.centre, distractor.centre) - part.radius - distractor.radius
        if gap > 2 * RIM * size / 128 + 2:
            break
    return Scene(_paint(background, "distractor", distractor), part)


def render(scene_: Scene, name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The image of class ``name`` (fill-shape) in the scene, the background without the part,
    and the box (pixel edges) bounding exactly the pixels where the two differ."""
    fill, shape = name.split("-")
    place = Placement(shape, scene_.part.centre, scene_.part.radius, scene_.part.turn)
    image = _paint(scene_.background, fill, place)
    rows, cols = np.nonzero((image != scene_.background).any(axis=2))
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return image, scene_.background, box


def load_photos() -> list[Image.Image]:
    return [Image.open(SAMPLES / name).convert("RGB") for name in PHOTOS]


def image_scene(seed: int, split: str, label: int, index: int, size: int, names: list[str],
                photos: list[Image.Image]) -> Scene:
    """The scene of image ``index`` of class ``label`` in ``split``: its own generator, so no
    image depends on how many others are made."""
    rng = np.random.default_rng([seed, SPLITS.index(split), label, index])
    return scene(rng, photos, size, list(dict.fromkeys(name.split("-")[1] for name in names)))


def generate(out: Path, classes: int, per_class: int, test_per_class: int, size: int, seed: int) -> int:
    """Write the dataset under ``out``; returns the number of images written."""
    names = class_names(classes)
    photos = load_photos()
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    written = 0
    for split, count in zip(SPLITS, (per_class, test_per_class)):
        rows = []
        for label, name in enumerate(names):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image, _, box = render(image_scene(seed, split, label, index, size, names, photos), name)
                path = f"{name}/{index:04d}.png"
                Image.fromarray(image).save(out / split / path)
                rows.append([path, *box])
                written += 1
        with (out / split / "boxes.csv").open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, lineterminator="\n").writerows([["path", "xmin", "ymin", "xmax", "ymax"], *rows])
    return written


def _fail(message: str) -> None:
    sys.exit(f"ggam_dataset.py: error: {message}")  # one line on stderr, exit status 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ggam_dataset.py", description=__doc__.split("\n\n")[0])
    parser.error = _fail  # argparse's own errors too: one line, no usage block
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=8, help="number of classes, 2 to 24 (default 8)")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class (default 60)")
    parser.add_argument("--test-per-class", type=int, help="held-out images per class (default: half of --per-class)")
    parser.add_argument("--size", type=int, default=128, help=f"image side in pixels, at least {MIN_SIZE} (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0 or more (default 0)")
    args = parser.parse_args(argv)
    test_per_class = max(1, args.per_class // 2) if args.test_per_class is None else args.test_per_class
    try:
        class_names(args.classes)
    except ValueError as error:
        _fail(str(error))
    if args.size < MIN_SIZE:
        _fail(f"--size must be at least {MIN_SIZE} pixels, not {args.size}")
    if args.per_class < 1 or test_per_class < 1:
        _fail("--per-class and --test-per-class must be at least 1")
    if args.seed < 0:
        _fail(f"--seed must be 0 or more, not {args.seed}")
    out: Path = args.out
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        _fail(f"{out} exists: give a new or empty folder (old images would mix with the new ones)")
    # Written beside, then renamed: an interrupted run leaves no folder that looks complete.
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        _fail(f"{partial} exists (left by an interrupted run?): remove it first")
    written = generate(partial, args.classes, args.per_class, test_per_class, args.size, args.seed)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    print(f"wrote {written} images of {args.classes} classes ({args.size} px) to {out}")


if __name__ == "__main__":
    main()
