"""Class names that are numbers, and boxes from a folder of VOC files (issue 20, findings 19, 20):
explain and evaluate read a class the same way, ambiguity is refused in one line, and one damaged
VOC file is one note."""

from __future__ import annotations

import pytest

from camlens.cli.common import resolve_class
from camlens.datasets import load_dataset
from camlens.errors import CamlensError
from camlens.models import LoadedModel, Preprocess
from helpers import NET_MODELS, model_module, one_line_error, random_photo, run


def loaded(names):
    return LoadedModel(None, Preprocess(), list(names), "test", "test", {})


@pytest.mark.parametrize("names", [["1", "0", "2", "3"], ["b", "c", "1", "d"]])
def test_a_number_that_is_an_index_and_another_class_name_is_ambiguous_everywhere(names, tmp_path):
    with pytest.raises(CamlensError, match=r"class '1' is ambiguous: an index and a class name, of classes .*"
                                           r"give --class index=1 or --class name=1"):
        resolve_class("1", loaded(names), 4)
    folder = tmp_path / "data"
    random_photo((folder / "1").mkdir(parents=True) or folder / "1" / "x.png", 8, 8)
    expected = sorted({names.index("1"), 1})
    if len(expected) > 1:
        with pytest.raises(CamlensError, match=rf"1 label\(s\) name several classes \('1': classes "
                                               rf"{expected[0]}, {expected[1]}\)"):
            load_dataset(folder, names, 4)


def test_index_and_name_say_which(tmp_path):
    names = ["1", "0", "2", "3"]
    assert resolve_class("index=1", loaded(names), 4) == 1
    assert resolve_class("name=1", loaded(names), 4) == 0
    assert resolve_class("3", loaded(names), 4) == 3  # the index and the name agree: no doubt
    assert resolve_class(" 2 ", loaded(names), 4) == 2
    with pytest.raises(CamlensError, match="unknown class 'name=7'|unknown class"):
        resolve_class("name=7", loaded(names), 4)
    with pytest.raises(CamlensError, match="class 9 is out of range"):
        resolve_class("index=9", loaded(names), 4)


def test_names_that_agree_with_their_indices_are_read_alike(tmp_path):
    names = ["0", "1", "2", "3"]
    folder = tmp_path / "data"
    for label in names:
        (folder / label).mkdir(parents=True)
        random_photo(folder / label / "x.png", 8, 8)
    dataset = load_dataset(folder, names, 4)
    assert [s.label for s in dataset.samples] == [0, 1, 2, 3]
    assert [resolve_class(n, loaded(names), 4) for n in names] == [0, 1, 2, 3]


def test_explain_refuses_an_ambiguous_class_in_one_line(tmp_path, monkeypatch, capsys):
    model_module(tmp_path, "labelnet", NET_MODELS, monkeypatch)
    (tmp_path / "names.json").write_text('["1", "0", "2", "3"]')
    photo = random_photo(tmp_path / "p.png", 16, 16)
    base = ["explain", photo, "--model", "labelnet:net", "--input-size", "16", "--class-names", tmp_path / "names.json",
            "-m", "gradcam"]
    code, _, err = run([*base, "--class", "1", "--out", tmp_path / "a"], capsys)
    one_line_error(code, err, 1, "class '1' is ambiguous")
    code, _, err = run([*base, "--class", "name=1", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    import json

    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["targets"] == {"class": 0}


def voc(path, body):
    path.write_text(f"<annotation><object><bndbox>{body}</bndbox></object></annotation>")


def test_one_damaged_voc_file_is_one_note_and_gives_no_box(tmp_path):
    folder = tmp_path / "data"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        random_photo(folder / label / f"{label}.png", 20, 20)
    voc(folder / "a" / "a.xml", "<xmin>1</xmin><ymin>x</ymin><xmax>5</xmax><ymax>5</ymax>")
    dataset = load_dataset(folder, ["a", "b"], 2)
    assert [n for n in dataset.notes if "not a Pascal VOC annotation" in n] == [
        f"{folder / 'a' / 'a.xml'}: not a Pascal VOC annotation (boxes skipped)"]
    assert all(sample.boxes == [] for sample in dataset.samples)


def test_a_voc_folder_cannot_tell_images_of_one_name_apart(tmp_path):
    """Each of a/1.png, b/1.png and c/1.png got the boxes of boxes/1.xml (and its note, three times)."""
    folder, boxes = tmp_path / "data", tmp_path / "boxes"
    boxes.mkdir()
    for label in ("a", "b", "c"):
        (folder / label).mkdir(parents=True)
        random_photo(folder / label / "1.png", 20, 20)
    voc(boxes / "1.xml", "<xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>")
    with pytest.raises(CamlensError, match=r"--boxes .*: 1 XML file\(s\) there would stand for several images of "
                                           r"the same name \(1.xml: "):
        load_dataset(folder, ["a", "b", "c"], 3, boxes=boxes)
