"""Evaluation datasets: folders, CSVs, VOC and CSV boxes, label mapping, and bad datasets."""

from __future__ import annotations

import pytest
from PIL import Image

from camlens import CamlensError
from camlens.datasets import load_dataset
from camlens.models import Preprocess

NAMES = ["tabby", "espresso", "cup"]
LABELS = ["tabby, tabby cat", "espresso", "cup"]


def image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)
    return path


def test_class_folders_with_voc_boxes(tmp_path):
    cat = image(tmp_path / "Tabby Cat" / "a.png")
    image(tmp_path / "espresso" / "b.png")
    (tmp_path / "espresso" / "notes.txt").write_text("ignored")
    cat.with_suffix(".xml").write_text(
        "<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>"
        "<object><bndbox><xmin>30</xmin><ymin>5</ymin><xmax>50</xmax><ymax>8</ymax></bndbox></object></annotation>"
    )
    dataset = load_dataset(tmp_path, NAMES, 3, LABELS)
    assert [(s.path.name, s.label) for s in dataset.samples] == [("a.png", 0), ("b.png", 1)]
    assert dataset.samples[0].boxes == [(0.0, 0.0, 10.0, 20.0)]  # VOC 1-based inclusive -> edges
    assert dataset.has_boxes
    assert len(dataset.problems) == 1 and "outside the 40x30 image" in dataset.problems[0]


def test_csv_labels_boxes_and_mapping(tmp_path):
    image(tmp_path / "img" / "x.png")
    image(tmp_path / "img" / "y.png")
    (tmp_path / "labels.csv").write_text("path,label\nimg/x.png,kitty\nimg/y.png,2\nimg/gone.png,kitty\n")
    (tmp_path / "map.csv").write_text("label,index\nkitty,0\n")
    (tmp_path / "boxes.csv").write_text("path,xmin,ymin,xmax,ymax\nimg/x.png,0,0,4,4\nimg/x.png,5,5,9,9\nimg/other.png,0,0,1,1\n")
    dataset = load_dataset(tmp_path / "labels.csv", NAMES, 3, mapping=tmp_path / "map.csv", boxes=tmp_path / "boxes.csv")
    assert [(s.path.name, s.label, s.boxes) for s in dataset.samples] == [
        ("x.png", 0, [(0.0, 0.0, 4.0, 4.0), (5.0, 5.0, 9.0, 9.0)]),
        ("y.png", 2, []),
    ]
    assert any("gone.png: no such file" in p for p in dataset.skipped)
    assert any("img/other.png, which is not in the dataset" in p for p in dataset.notes)


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    image(tmp_path / "cup" / "good.png")
    (tmp_path / "cup" / "bad.png").write_bytes(b"not a png")
    dataset = load_dataset(tmp_path, NAMES, 3)
    assert [s.path.name for s in dataset.samples] == ["good.png"]
    assert "bad.png: unreadable image" in dataset.problems[0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda root: (root / "empty").mkdir(), "the dataset has no images"),
        (lambda root: image(root / "data" / "zebra" / "z.png"), r"1 label\(s\) the model does not know: zebra"),
        (lambda root: None, "no such dataset"),
    ],
)
def test_bad_datasets(tmp_path, build, message):
    build(tmp_path)
    target = tmp_path / ("empty" if "no images" in message else "data")
    with pytest.raises(CamlensError, match=message):
        load_dataset(target, NAMES, 3)


def test_boxes_follow_the_preprocessing_crop():
    prep = Preprocess(size=224, resize=256)
    # A 512x256 photo: the model sees the centre square of side 256 * 224 / 256 = 224, from x = 144.
    assert prep.map_box((144, 16, 368, 240), 512, 256) == (0.0, 0.0, 224.0, 224.0)
    assert prep.map_box((0, 0, 100, 100), 512, 256) is None  # cropped away
    assert prep.map_box((100, 0, 200, 256), 512, 256) == (0.0, 0.0, 56.0, 224.0)
