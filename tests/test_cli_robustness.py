"""Regression tests from an adversarial review of the command line: no traceback, no data loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import SAMPLES, one_line_error, run

COFFEE = SAMPLES / "coffee.png"


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_folder_camlens_did_not_make_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "coffee").mkdir(parents=True)
    (out / "coffee" / "precious.txt").write_text("mine")
    code, _, err = run(["explain", COFFEE, "-m", "cam", "--out", out], capsys)
    assert code == 1 and "holds files camlens did not write" in err and ": coffee;" in err
    assert (out / "coffee" / "precious.txt").read_text() == "mine"
    # A folder camlens made is replaced by the next run, and the old manifest with it.
    out = tmp_path / "fresh"
    code, _, err = run(["explain", COFFEE, "-m", "cam", "--out", out], capsys)
    assert code == 0, err
    code, _, err = run(["explain", COFFEE, "-m", "gradcam", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "coffee").glob("*.png")) == ["comparison.png", "gradcam_1_espresso.png"]
    assert manifest(out)["methods"] == ["gradcam"]


def test_output_names_never_collide(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("cat.png", "cat-2.png", "cat.jpg"):
        Image.open(COFFEE).convert("RGB").resize((64, 64)).save(folder / name)
    code, _, err = run(["explain", folder / "cat.png", folder / "cat-2.png", folder / "cat.jpg", "-m", "cam",
                        "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    outputs = [image["output"] for image in manifest(tmp_path / "out")["images"]]
    assert len(set(outputs)) == 3


def test_odd_file_names(tmp_path, capsys):
    image = Image.open(COFFEE).convert("RGB").resize((64, 64))
    long_name = tmp_path / ("b" * 250 + ".png")
    unicode_name = tmp_path / "猫 photo.png"
    raw_name = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"x\xff.png"))
    for path in (long_name, unicode_name, raw_name):
        image.save(path)
    code, _, err = run(["explain", long_name, unicode_name, raw_name, "-m", "cam", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    outputs = [entry["output"] for entry in manifest(tmp_path / "out")["images"]]
    assert outputs[1] == "猫-photo" and len(outputs[0]) <= 80


def test_fifo_is_reported_not_waited_for(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, _, err = run(["explain", fifo, COFFEE, "-m", "cam", "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert f"failed: {fifo}: not a regular file" in err


def test_exif_orientation_is_applied(tmp_path, capsys):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.open(COFFEE).convert("RGB").resize((120, 80)).save(path, exif=exif)
    code, _, err = run(["explain", path, "-m", "cam", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert manifest(tmp_path / "out")["images"][0]["size"] == [80, 120]


def test_float_and_16_bit_images_are_not_black():
    from camlens.io import to_rgb

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert np.asarray(to_rgb(Image.fromarray(ramp, mode="F"))).max() == 255
    deep = Image.fromarray((ramp * 65535).astype(np.uint16))
    assert np.asarray(to_rgb(deep)).max() == 255


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--out", ""], 1, "--out is empty"),
        (["--input-size", "100000"], 2, "100000 is not in the range 1<=x<=4096"),
        (["--seed", "99999999999999999999"], 2, "is not in the range"),
        (["--std", "1", "nan", "1"], 2, "'nan' is not a finite number"),
        (["--device", "xla"], 1, "unknown device 'xla'"),
        (["--device", "meta"], 1, "unknown device 'meta'"),
        (["--model", ":x"], 1, "write an absolute package.module:factory"),
        (["--model", ".relative:x"], 1, "write an absolute package.module:factory"),
        (["-m", "cam", "--target-layer", "_blocks.3"], 1, "CAM needs a head"),
        (["--input-size", "1"], 1, "no module of this model outputs a feature map larger than 1x1"),
        (["--class", "crane"], 1, "class 'crane' is ambiguous: give its index, one of 134 (crane), 517 (crane)"),
        (["--class-names", COFFEE], 1, "class names must be UTF-8 text"),
    ],
)
def test_more_user_errors_are_one_line(args, code, text, tmp_path, capsys):
    got, _, err = run(["explain", COFFEE, "--out", tmp_path / "out", *args], capsys)
    one_line_error(got, err, code, text)


def test_full_label_and_synonyms_name_a_class(tmp_path, capsys):
    code, _, err = run(["explain", COFFEE, "-m", "cam", "--class", "Tabby Cat", "--out", tmp_path], capsys)
    assert code == 0, err
    assert manifest(tmp_path)["targets"] == {"class": 281}


def test_long_input_path(tmp_path, capsys):
    got, _, err = run(["explain", "a" * 5000, "--out", tmp_path], capsys)
    assert got == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('import boom')\n")
    (tmp_path / "syntax_error.py").write_text("def (:\n")
    (tmp_path / "exits.py").write_text("def factory():\n    raise SystemExit(3)\n")
    (tmp_path / "unpadded.py").write_text(
        "from torch import nn\n\n"
        "def factory():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    "spec, text",
    [
        ("raises_on_import:x", "cannot import 'raises_on_import' for --model raises_on_import:x: RuntimeError: import boom"),
        ("syntax_error:x", "SyntaxError"),
        ("exits:factory", "the factory raised SystemExit: 3"),
    ],
)
def test_factory_modules_that_misbehave(user_modules, spec, text, tmp_path, capsys):
    got, _, err = run(["explain", COFFEE, "--model", spec, "--out", tmp_path / "out"], capsys)
    one_line_error(got, err, 1, text)


def test_layers_errors_are_one_line(user_modules, capsys):
    got, _, err = run(["layers", "--model", "unpadded:factory", "--input-size", "2"], capsys)
    one_line_error(got, err, 1, "the model fails on a 1x3x2x2 input (RuntimeError")
    got, out, err = run(["layers", "--input-size", "1"], capsys)
    assert got == 0 and "_conv_stem" in out
    assert "no default target layer" in err


def test_explain_on_a_model_that_fails_at_that_size(user_modules, tmp_path, capsys):
    got, _, err = run(["explain", COFFEE, "--model", "unpadded:factory", "--input-size", "2", "--out", tmp_path], capsys)
    one_line_error(got, err, 1, "the model fails on a batch of 2x3x2x2 (RuntimeError")


def test_no_arguments_prints_help(capsys):
    code, out, err = run([], capsys)
    assert code == 0 and "Usage: camlens" in out and not err


def test_closed_stdout_and_broken_pipe(tmp_path):
    camlens = [sys.executable, "-m", "camlens"]
    closed = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *camlens, "methods"], capture_output=True, text=True)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr
    missing = tmp_path / "missing.png"
    piped = subprocess.run(
        ["sh", "-c", '"$@" | true', "sh", *camlens, "explain", str(COFFEE), str(missing), "-m", "cam",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert f"failed: {missing}: no such file" in piped.stderr
    assert "Traceback" not in piped.stderr
