"""CUB-200-2011 in its native layout: the official split, labels by class name, boxes as edges,
and damaged list files refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from camlens import CamlensError
from camlens.datasets import cub_class_names, dataset_entries, is_cub, load_cub, load_dataset

from helpers import FACTORY_NET as NET
from helpers import one_line_error, run

CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross"}
# image id: class id, is a training image, image size (width, height), box (x, y, width, height)
IMAGES = {
    1: (1, True, (40, 30), (5, 4, 10, 8)),
    2: (1, False, (32, 48), (0, 0, 12, 20)),  # touches the top and left edges
    3: (1, True, (50, 20), (1, 1, 48, 18)),
    4: (2, True, (24, 24), (2, 3, 4, 5)),
    5: (2, True, (30, 40), (10, 10, 10, 10)),
    6: (2, False, (36, 28), (20, 10, 16, 18)),  # touches the right and bottom edges
    7: (3, False, (44, 44), (3, 5, 30, 2)),
    8: (3, True, (20, 30), (0, 0, 20, 30)),  # the whole image
    9: (3, True, (26, 22), (7, 6, 5, 4)),
}
MODEL = list(reversed(CLASSES.values()))  # the model's class order differs from classes.txt's


def name(image_id):
    folder = CLASSES[IMAGES[image_id][0]]
    return f"{folder}/{folder.split('.')[1]}_{image_id:04d}.png"


def write_cub(root):
    """The layout, with each list in reverse id order (the loader orders by id); each image black
    with its box painted white, so the box can be found from the pixels alone."""
    root.mkdir(parents=True, exist_ok=True)
    ids = sorted(IMAGES, reverse=True)
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(CLASSES.items(), reverse=True)))
    (root / "images.txt").write_text("".join(f"{i} {name(i)}\n" for i in ids))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {IMAGES[i][0]}\n" for i in ids))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(IMAGES[i][1])}\n" for i in ids))
    (root / "bounding_boxes.txt").write_text(
        "".join(f"{i} {' '.join(f'{v:.1f}' for v in IMAGES[i][3])}\n" for i in ids))
    for i, (_, _, (width, height), (x, y, w, h)) in IMAGES.items():
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[y:y + h, x:x + w] = 255
        path = root / "images" / name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return root


@pytest.fixture
def cub(tmp_path):
    return write_cub(tmp_path / "CUB_200_2011")


def painted(path):
    """The white rectangle of an image as pixel edges, found from its pixels."""
    rows, cols = np.nonzero(np.asarray(Image.open(path))[..., 0] == 255)
    return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


def test_detection_and_class_names_in_class_id_order(cub, tmp_path):
    assert is_cub(cub) and not is_cub(tmp_path) and not is_cub(cub / "images.txt")
    assert cub_class_names(cub) == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_official_split_with_labels_and_boxes(cub, split):
    dataset = load_cub(cub, split, MODEL, 3)
    wanted = [i for i in sorted(IMAGES) if IMAGES[i][1] == (split == "train")]
    assert [s.path for s in dataset.samples] == [cub / "images" / name(i) for i in wanted]
    assert [s.label for s in dataset.samples] == [MODEL.index(CLASSES[IMAGES[i][0]]) for i in wanted]
    assert [s.size for s in dataset.samples] == [IMAGES[i][2] for i in wanted]
    for sample in dataset.samples:
        assert sample.boxes == [painted(sample.path)]
    assert dataset.has_boxes and dataset.split == split and dataset.problems == []
    assert dataset.listed == [s.path for s in dataset.samples]


def test_load_dataset_reads_the_test_split_and_dataset_entries_both(cub):
    dataset = load_dataset(cub, MODEL, 3)
    assert [s.path.name for s in dataset.samples] == [name(i).split("/")[1] for i in (2, 6, 7)]
    assert dataset.split == "test" and dataset.has_boxes
    assert dataset.samples[1].boxes == [(20.0, 10.0, 36.0, 28.0)]  # up to the right and bottom edges
    assert load_dataset(cub, MODEL, 3, limit=1).listed == dataset.listed
    assert [s.path.name for s in load_dataset(cub, MODEL, 3, limit=1).samples] == [dataset.samples[0].path.name]
    entries = dataset_entries(cub, [])
    assert entries == [(cub / "images" / name(i), CLASSES[IMAGES[i][0]]) for i in sorted(IMAGES)]
    with pytest.raises(CamlensError, match="CUB-200-2011 folder, whose boxes are its bounding_boxes.txt"):
        load_dataset(cub, MODEL, 3, boxes=cub / "bounding_boxes.txt")


def test_labels_map_by_name_mapping_file_or_are_refused(cub, tmp_path):
    with pytest.raises(CamlensError, match="3 label\\(s\\) the model does not know: 001.Black_footed_Albatross"):
        load_cub(cub, "test", ["cat", "dog", "cup"], 3)
    (tmp_path / "map.json").write_text(json.dumps({n: 2 - c + 1 for c, n in CLASSES.items()}))
    dataset = load_cub(cub, "test", ["cat", "dog", "cup"], 3, mapping=tmp_path / "map.json")
    assert [s.label for s in dataset.samples] == [2, 1, 0]
    assert [s.label for s in load_cub(cub, "test", [n.upper() for n in MODEL], 3).samples] == [2, 1, 0]


def test_problems_of_single_images_are_reported(cub):
    (cub / "images" / name(2)).unlink()
    (cub / "images" / name(7)).write_bytes(b"not a png")
    lines = (cub / "bounding_boxes.txt").read_text().splitlines()
    boxes = {int(line.split()[0]): line for line in lines}
    boxes[6] = "6 20.0 10.0 17.0 18.0"  # one pixel past the right edge
    del boxes[3]
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes.values()) + "\n")
    test = load_cub(cub, "test", MODEL, 3)
    assert [s.path.name for s in test.samples] == [name(6).split("/")[1]] and test.samples[0].boxes == []
    assert len(test.skipped) == 2 and "no such file" in test.skipped[0] and "unreadable image" in test.skipped[1]
    assert test.notes == [f"{cub / 'images' / name(6)}: box (20.0, 10.0, 37.0, 28.0) is outside the 36x28 image "
                          "or empty (box skipped)"]
    train = load_cub(cub, "train", MODEL, 3)
    assert train.notes == [f"{cub / 'images' / name(3)}: bounding_boxes.txt has no box for image id 3 (no box)"]
    assert [len(s.boxes) for s in train.samples] == [1, 0, 1, 1, 1, 1]


def test_without_bounding_boxes_there_are_no_boxes(cub):
    (cub / "bounding_boxes.txt").unlink()
    dataset = load_cub(cub, "train", MODEL, 3)
    assert not dataset.has_boxes and all(s.boxes == [] for s in dataset.samples) and dataset.problems == []
    assert len(dataset.samples) == 6


def edit(file, old, new):
    def change(root):
        path = root / file
        path.write_text(path.read_text().replace(old, new, 1))
    return change


@pytest.mark.parametrize(
    "damage, message",
    [
        (edit("images.txt", f"9 {name(9)}", "9"), "images.txt: line 1 is not <image_id> <image_name>: '9'"),
        (edit("images.txt", "9 ", "9x "), "images.txt: line 1 is not <image_id> <image_name>: '9x "),
        (edit("image_class_labels.txt", "8 3", "8 3 1"), "image_class_labels.txt: line 2 is not <image_id> <class_id>"),
        (edit("image_class_labels.txt", "8 3", "8 7"), "image_class_labels.txt: line 2: class id '7' is not in classes.txt"),
        (edit("image_class_labels.txt", "8 3", "8 x"), "image_class_labels.txt: line 2: class id 'x' is not in classes.txt"),
        (edit("image_class_labels.txt", "8 3\n", ""), "image_class_labels.txt: no line for image id 8 of images.txt"),
        (edit("train_test_split.txt", "8 1", "7 1"), "train_test_split.txt: line 3 repeats id 7 of line 2"),
        (edit("train_test_split.txt", "8 1", "99 1"), "train_test_split.txt: line 2: image id 99 is not in images.txt"),
        (edit("train_test_split.txt", "8 1", "8 yes"), "train_test_split.txt: line 2: is_training_image must be 1 or 0, not 'yes'"),
        (edit("bounding_boxes.txt", "8 0.0", "8 zero"), "bounding_boxes.txt: line 2: x, y, width and height must be numbers"),
        (edit("bounding_boxes.txt", "8 0.0 ", "8 "), "bounding_boxes.txt: line 2 is not <image_id> <x> <y> <width> <height>"),
        (edit("bounding_boxes.txt", "8 0.0", "42 0.0"), "bounding_boxes.txt: line 2: image id 42 is not in images.txt"),
        (edit("classes.txt", "2 002", "1 002"), "classes.txt: line 3 repeats id 1 of line 2"),
        (edit("classes.txt", "002.Laysan_Albatross", "003.Sooty_Albatross"),
         "classes.txt: line 2 repeats the class name '003.Sooty_Albatross' of line 1"),
        (lambda root: (root / "classes.txt").unlink(), "classes.txt: missing; a CUB-200-2011 folder has classes.txt"),
        (lambda root: (root / "classes.txt").write_text("\n\n"), "classes.txt: empty"),
        (lambda root: (root / "classes.txt").write_bytes(b"1 \xff\n"), "classes.txt: cannot read it"),
        (lambda root: (root / "images").rename(root / "pictures"), "images: no such folder"),
        (lambda root: (root / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in IMAGES)),
         "train_test_split.txt: no image is in the test split"),
    ],
)
def test_damaged_files_are_refused_in_one_line(cub, damage, message):
    damage(cub)
    with pytest.raises(CamlensError) as error:
        load_dataset(cub, MODEL, 3)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(cub) in str(error.value)


def test_the_folder_above_cub_is_pointed_at(cub):
    with pytest.raises(CamlensError, match="did you mean the CUB-200-2011 folder .*CUB_200_2011"):
        load_dataset(cub.parent, MODEL, 3)
    with pytest.raises(CamlensError, match="split must be 'train' or 'test'"):
        load_cub(cub, "val", MODEL, 3)
    with pytest.raises(CamlensError, match="not a CUB-200-2011 folder"):
        load_cub(cub.parent, "test", MODEL, 3)


def test_camlens_evaluate_on_a_cub_folder(cub, tmp_path, monkeypatch, capsys):
    (tmp_path / "cubnet.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "names.txt").write_text("\n".join(MODEL) + "\n")
    code, out, err = run(["evaluate", cub, "--model", "cubnet:build", "--class-names", tmp_path / "names.txt",
                          "--input-size", "16", "--steps", "2", "-m", "cam", "--metric", "drop",
                          "--metric", "pointing", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(f"images/{name(i)}" for i in (2, 6, 7))
    assert "camlens evaluate: 3 images of its official test split" in out
    code, _, err = run(["evaluate", cub, "--boxes", cub / "bounding_boxes.txt", "--out", tmp_path / "other"], capsys)
    one_line_error(code, err, 1, "leave out --boxes")
