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
    assert len(dataset.problems) == 2
    assert "notes.txt: not an image or array, by its extension (ignored)" in dataset.problems[0]
    assert "outside the 40x30 image" in dataset.problems[1]


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


# -- silent losses: what used to be dropped or kept without a word ---------------------------------

def test_an_image_listed_twice(tmp_path):
    image(tmp_path / "img" / "x.png")
    image(tmp_path / "img" / "y.png")
    (tmp_path / "same.csv").write_text("path,label\nimg/x.png,cup\nimg/y.png,tabby\n./img/x.png,2\n")
    dataset = load_dataset(tmp_path / "same.csv", NAMES, 3)
    assert [(s.path.name, s.label) for s in dataset.samples] == [("x.png", 2), ("y.png", 0)]
    assert len(dataset.notes) == 1 and "listed twice with label '2' (counted once)" in dataset.notes[0]
    (tmp_path / "other.csv").write_text("path,label\nimg/x.png,cup\nimg/y.png,tabby\nimg/x.png,espresso\n")
    with pytest.raises(CamlensError, match=r"1 image\(s\) listed with two different labels: .*x.png \('cup' and 'espresso'\)"):
        load_dataset(tmp_path / "other.csv", NAMES, 3)


def test_boxes_that_are_missing_empty_or_given_twice(tmp_path):
    image(tmp_path / "cup" / "x.png")
    with pytest.raises(CamlensError, match="--boxes .*nothing.csv: no such file or folder"):
        load_dataset(tmp_path, NAMES, 3, boxes=tmp_path / "nothing.csv")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "other.xml").write_text("<annotation/>")
    with pytest.raises(CamlensError, match="no VOC XML file there is named after an image"):
        load_dataset(tmp_path, NAMES, 3, boxes=tmp_path / "voc")
    (tmp_path / "header.csv").write_text("path,xmin,ymin,xmax,ymax\n")
    with pytest.raises(CamlensError, match="the CSV has no box rows"):
        load_dataset(tmp_path, NAMES, 3, boxes=tmp_path / "header.csv")
    (tmp_path / "twice.csv").write_text("cup/x.png,1,2,3,4\ncup/x.png,1,2,3,4\ncup/x.png,0,0,5,5\n")
    dataset = load_dataset(tmp_path, NAMES, 3, boxes=tmp_path / "twice.csv")
    assert dataset.samples[0].boxes == [(1.0, 2.0, 3.0, 4.0), (0.0, 0.0, 5.0, 5.0)]
    assert dataset.notes == [f"{tmp_path / 'cup' / 'x.png'}: box (1.0, 2.0, 3.0, 4.0) is given twice (counted once)"]


def test_a_boxes_csv_that_matches_no_image_stops_and_says_how_paths_resolve(tmp_path):
    """Paths written relative to the working directory (data/cup/x.png) match nothing: not one
    box would be used, so the run stops instead of going on without box metrics."""
    data = tmp_path / "data"
    image(data / "cup" / "x.png")
    (tmp_path / "boxes.csv").write_text("path,xmin,ymin,xmax,ymax\ndata/cup/x.png,0,0,4,4\nbad,a,b,c,d\n")
    with pytest.raises(CamlensError) as caught:
        load_dataset(data, NAMES, 3, boxes=tmp_path / "boxes.csv")
    message = str(caught.value)
    assert "\n" not in message
    assert "no row names an image of the dataset; its paths are relative to the dataset folder " + str(data) in message
    assert f"'data/cup/x.png' is {data / 'data' / 'cup' / 'x.png'}, which the dataset does not list" in message
    # A labels CSV: relative to its folder.
    (tmp_path / "labels.csv").write_text("data/cup/x.png,cup\n")
    (tmp_path / "rel.csv").write_text("cup/x.png,0,0,4,4\n")
    with pytest.raises(CamlensError, match=f"relative to the labels CSV's folder {tmp_path}.*'cup/x.png' is "):
        load_dataset(tmp_path / "labels.csv", NAMES, 3, boxes=tmp_path / "rel.csv")
    (tmp_path / "words.csv").write_text("data/cup/x.png,a,b,c,d\n")
    with pytest.raises(CamlensError, match="no row has numeric box edges"):
        load_dataset(tmp_path / "labels.csv", NAMES, 3, boxes=tmp_path / "words.csv")
    # One matching row is enough: the others are notes.
    (tmp_path / "some.csv").write_text("data/cup/x.png,0,0,4,4\nelsewhere.png,0,0,1,1\n")
    dataset = load_dataset(tmp_path / "labels.csv", NAMES, 3, boxes=tmp_path / "some.csv")
    assert dataset.samples[0].boxes == [(0.0, 0.0, 4.0, 4.0)]
    assert dataset.notes == [f"{tmp_path / 'some.csv'}: box for elsewhere.png, which is not in the dataset (skipped)"]


def test_mapping_checked_up_front(tmp_path):
    image(tmp_path / "kitty" / "x.png")
    (tmp_path / "far.json").write_text('{"kitty": 0, "unused": 3}')
    with pytest.raises(CamlensError, match=r"far.json: label 'unused' maps to class 3, but the model has 3 classes \(0 to 2\)"):
        load_dataset(tmp_path, NAMES, 3, mapping=tmp_path / "far.json")
    (tmp_path / "twice.csv").write_text("kitty,0\nKitty,1\n")
    with pytest.raises(CamlensError, match="label 'Kitty' is mapped twice, to 0 and 1"):
        load_dataset(tmp_path, NAMES, 3, mapping=tmp_path / "twice.csv")
    (tmp_path / "bool.json").write_text('{"kitty": true}')
    with pytest.raises(CamlensError, match="must map labels to class indices"):
        load_dataset(tmp_path, NAMES, 3, mapping=tmp_path / "bool.json")


def test_a_label_that_names_several_classes_stops_the_loading(tmp_path):
    """ImageNet's "crane" is a bird (134) and a machine (517): it used to become the bird silently."""
    image(tmp_path / "crane" / "x.png")
    names, labels = ["crane", "tabby", "crane"], ["crane", "tabby, tabby cat", "crane"]
    with pytest.raises(CamlensError, match=r"1 label\(s\) name several classes \('crane': classes 0, 2\); give a mapping"):
        load_dataset(tmp_path, names, 3, labels)


def test_images_outside_the_class_folders_are_reported(tmp_path):
    image(tmp_path / "cup" / "x.png")
    image(tmp_path / "stray.png")
    (tmp_path / "cup" / "nested").mkdir()
    dataset = load_dataset(tmp_path, NAMES, 3)
    assert [s.path.name for s in dataset.samples] == ["x.png"]
    assert any("stray.png: an input outside the class folders (ignored)" in n for n in dataset.notes)
    assert any("nested: a folder inside a class folder (not searched)" in n for n in dataset.notes)


def test_limit_opens_only_the_first_images_and_keeps_the_listing(tmp_path):
    for name in ("a", "b", "c"):
        image(tmp_path / "cup" / f"{name}.png")
    (tmp_path / "cup" / "b.png").write_bytes(b"broken")
    dataset = load_dataset(tmp_path, NAMES, 3, limit=2)
    assert [s.path.name for s in dataset.samples] == ["a.png"]
    assert len(dataset.skipped) == 1 and "b.png: unreadable image" in dataset.skipped[0]
    assert [p.name for p in dataset.listed] == ["a.png", "b.png", "c.png"]


def test_image_size_as_viewers_show_it(tmp_path):
    """A photo turned by its EXIF orientation: boxes are checked against the turned size."""
    path = tmp_path / "cup" / "turned.jpg"
    path.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    (tmp_path / "boxes.csv").write_text("cup/turned.jpg,0,0,30,40\n")
    dataset = load_dataset(tmp_path, NAMES, 3, boxes=tmp_path / "boxes.csv")
    assert dataset.samples[0].size == (30, 40) and dataset.samples[0].boxes == [(0.0, 0.0, 30.0, 40.0)]
    assert not dataset.notes
