"""benchmarks/ggam_dataset.py: the fine-grained set's images, boxes, splits and arguments."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens.datasets import load_dataset
from camlens.models import Preprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ggam_dataset.py"
_spec = importlib.util.spec_from_file_location("ggam_dataset", SCRIPT)
ggam = importlib.util.module_from_spec(_spec)
sys.modules["ggam_dataset"] = ggam  # its dataclasses look their module up there
_spec.loader.exec_module(ggam)

TINY = ["--classes", "3", "--per-class", "4", "--test-per-class", "2", "--size", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ggam") / "data"
    ggam.main([str(out), *TINY, "--seed", "7"])
    return out


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_counts(tiny):
    names = (tiny / "classes.txt").read_text().split()
    assert names == ["red-disc", "red-square", "blue-disc"]  # each shape in two fills, each fill on two shapes
    for split, count in (("train", 4), ("test", 2)):
        assert sorted(p.name for p in (tiny / split).iterdir() if p.is_dir()) == sorted(names)
        for name in names:
            assert [p.name for p in sorted((tiny / split / name).iterdir())] == [f"{i:04d}.png" for i in range(count)]
        table = rows(tiny / split / "boxes.csv")
        assert table[0] == ["path", "xmin", "ymin", "xmax", "ymax"]
        assert len(table) == 1 + 3 * count
    assert Image.open(tiny / "train" / "red-disc" / "0000.png").size == (64, 64)
    assert not (tiny.parent / "data.partial").exists()


def test_a_rerun_is_byte_identical_and_the_seed_matters(tiny, tmp_path):
    ggam.main([str(tmp_path / "again"), *TINY, "--seed", "7"])
    assert files(tmp_path / "again") == files(tiny)
    ggam.main([str(tmp_path / "other"), *TINY, "--seed", "8"])
    other = files(tmp_path / "other")
    assert other["classes.txt"] == files(tiny)["classes.txt"]
    assert other["train/red-disc/0000.png"] != files(tiny)["train/red-disc/0000.png"]


def test_each_box_bounds_exactly_the_pixels_the_part_changes(tiny):
    names = (tiny / "classes.txt").read_text().split()
    photos = ggam.load_photos()
    for split in ("train", "test"):
        for path, *edges in rows(tiny / split / "boxes.csv")[1:]:
            name, index = path.split("/")
            scene = ggam.image_scene(7, split, names.index(name), int(index[:4]), 64, names, photos)
            changed = (pixels(tiny / split / path) != scene.background).any(axis=2)
            ys, xs = np.nonzero(changed)
            x0, y0, x1, y1 = map(int, edges)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # Independently of the differencing: the box sits on the part's circle (plus its rim) and
            # spans at least its radius, 12-20% of the side across.
            (cx, cy), r = scene.part.centre, scene.part.radius
            reach = r + ggam.RIM * 64 / 128 + 1
            assert cx - reach <= x0 and x1 <= cx + reach and cy - reach <= y0 and y1 <= cy + reach
            assert 0.12 * 64 / 2 <= r <= 0.20 * 64 / 2 and min(x1 - x0, y1 - y0) >= r


def test_classes_differ_only_inside_their_boxes():
    names = ggam.class_names(8)
    photos = ggam.load_photos()
    for index in range(3):
        scene = ggam.image_scene(0, "test", 0, index, 96, names, photos)
        rendered = {name: ggam.render(scene, name) for name in names}
        for a, b in itertools.combinations(names, 2):
            (image_a, background_a, box_a), (image_b, background_b, box_b) = rendered[a], rendered[b]
            assert np.array_equal(background_a, background_b)
            inside = np.zeros((96, 96), dtype=bool)
            for x0, y0, x1, y1 in (box_a, box_b):
                inside[y0:y1, x0:x1] = True
            differs = (image_a != image_b).any(axis=2)
            assert differs.any(), (a, b)
            assert not (differs & ~inside).any(), (a, b)


def test_fills_have_the_same_mean_brightness():
    # The pixels the part covers fully (no rim, no background mixed in) average 100 in every class.
    flat = np.full((128, 128, 3), 100, dtype=np.uint8)
    for name in ggam.class_names(24):
        place = ggam.Placement(name.split("-")[1], (64.0, 64.0), 24.0, 0.3)
        image, _, _ = ggam.render(ggam.Scene(flat, place), name)
        full = ggam._coverage(place, 128) == 1
        assert full.sum() > 200, name
        assert abs(image[full].astype(float).mean() - 100) < 15, name


def test_load_dataset_reads_each_split_with_one_box_per_image(tiny):
    names = (tiny / "classes.txt").read_text().split()
    for split, count in (("train", 4), ("test", 2)):
        dataset = load_dataset(tiny / split, names, len(names), boxes=tiny / split / "boxes.csv")
        assert dataset.problems == [] and dataset.has_boxes
        assert len(dataset.samples) == 3 * count
        table = {row[0]: tuple(float(v) for v in row[1:]) for row in rows(tiny / split / "boxes.csv")[1:]}
        for sample in dataset.samples:
            relative = sample.path.relative_to(tiny / split).as_posix()
            assert sample.label == names.index(relative.split("/")[0])
            assert sample.boxes == [table[relative]]
            # The matching preprocessing (--input-size 64 --resize 64) keeps boxes as they are.
            assert Preprocess(size=64, resize=64).map_box(sample.boxes[0], *sample.size) == sample.boxes[0]


@pytest.mark.parametrize("args, message", [
    (["--classes", "1"], "--classes must be 2 to 24, not 1"),
    (["--classes", "25"], "--classes must be 2 to 24, not 25"),
    (["--size", "16"], "--size must be at least 32 pixels, not 16"),
    (["--per-class", "0"], "--per-class and --test-per-class must be at least 1"),
    (["--seed", "-1"], "--seed must be 0 or more, not -1"),
    (["--classes", "many"], "argument --classes: invalid int value: 'many'"),
])
def test_bad_arguments_stop_with_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit) as stop:
        ggam.main([str(tmp_path / "out"), *args])
    assert stop.value.code == f"ggam_dataset.py: error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_used_folder_is_refused_on_one_stderr_line(tiny):
    before = files(tiny)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tiny), *TINY], capture_output=True, text=True)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"ggam_dataset.py: error: {tiny} exists: give a new or empty folder (old images would mix with the new ones)"
    ]
    assert files(tiny) == before
