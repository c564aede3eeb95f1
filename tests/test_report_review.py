"""Adversarial checks of `camlens report`: hostile file and class names, odd folder names, bad --out."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from camlens.cli import main
from camlens.report import RunError, build_report

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
HOSTILE = "<img src=x onerror=alert(1)>\"'&amp;.png"
BROKEN = "<script>alert(2)<!--.png"
CLASS = "</script><script>alert(3)</script>&\"'"
NET = """import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
"""


def run_cli(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model whose classes have hostile names; one photo under a hostile name (explained),
    one unreadable file (failed); a run folder with spaces and non-ASCII letters."""
    base = tmp_path_factory.mktemp("review")
    (base / "reviewnet.py").write_text(NET)
    (base / "names.txt").write_text(f"{CLASS}\n{CLASS}\n", encoding="utf-8")
    sys.path.insert(0, str(base))
    inputs = base / "in dir é"
    inputs.mkdir()
    shutil.copy(SAMPLES / "coffee.png", inputs / HOSTILE)
    (inputs / BROKEN).write_bytes(b"not a picture")
    out = base / "run ü x"
    try:
        main(["explain", str(inputs / HOSTILE), str(inputs / BROKEN), "-m", "gradcam", "--model", "reviewnet:build",
              "--class-names", str(base / "names.txt"), "--input-size", "32", "--out", str(out)])
    except SystemExit:
        pass  # one image failed: exit 1, the run is still written
    finally:
        sys.path.remove(str(base))
    return out


def test_hostile_names_are_text_in_the_browser(run_dir, browser):
    report = build_report(run_dir).path
    browser.open(report)
    assert browser.errors() == []
    assert browser.broken_images() == []
    assert browser.js("return document.querySelector('article.card h2').textContent") == HOSTILE
    assert BROKEN in browser.js("return document.querySelector('section.note').textContent")
    assert CLASS in browser.js("return document.querySelector('figcaption').textContent")
    assert CLASS in browser.js("return document.querySelector('ol.predictions').textContent")
    # Only the report's own elements: every img is one of its pictures, and only its 4 scripts.
    assert browser.js("return document.querySelectorAll('img:not([data-ref])').length") == 0
    assert browser.js("return document.scripts.length") == 4
    assert browser.js("return document.querySelectorAll('b, [onerror]').length") == 0
    text = report.read_text(encoding="utf-8").lower()
    for outside in ("http://", "https://", "url(", "@import"):
        assert outside not in text


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file names must be valid UTF-8")
def test_undecodable_folder_name(run_dir, tmp_path):
    """A folder whose name is not UTF-8 (bytes 0xff) was a UnicodeEncodeError traceback."""
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff"))
    shutil.copytree(run_dir, folder)
    made = build_report(folder)
    text = made.path.read_bytes().decode("utf-8")  # valid UTF-8
    assert "run\ufffd" in text


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    """A folder name with a newline made the version-mismatch error two lines."""
    folder = tmp_path / "two\nlines"
    shutil.copytree(run_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["camlens"] = "0.0.1"
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(RunError, match="made by camlens 0.0.1") as error:
        build_report(folder)
    assert "\n" not in str(error.value) and "two\\nlines" in str(error.value)
    code, out, err = run_cli(["report", folder], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("camlens: error: ")


def test_out_missing_directory_and_directory(run_dir, tmp_path, capsys):
    code, out, err = run_cli(["report", run_dir, "--out", tmp_path / "missing" / "r.html"], capsys)
    assert code == 1 and "is not a directory" in err and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()
    code, out, err = run_cli(["report", run_dir, "--out", tmp_path], capsys)
    assert code == 0 and (tmp_path / "report.html").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_all_images_failed(run_dir, tmp_path, browser):
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["images"] = [r for r in manifest["images"] if r.get("status") != "ok"]
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    made = build_report(folder)
    assert made.images == 0
    browser.open(made.path)
    assert browser.errors() == []
    assert browser.js("return document.querySelectorAll('article.card').length") == 0
    assert BROKEN in browser.js("return document.querySelector('section.note').textContent")


def damaged(run_dir, tmp_path, change):
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    (folder / "report.html").unlink(missing_ok=True)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    change(manifest, next(r for r in manifest["images"] if r.get("status") == "ok"))
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.mark.parametrize("change", [
    lambda m, r: r.update(targets=None),
    lambda m, r: r.update(predictions=[{"name": 5, "probability": None}]),
    lambda m, r: m.update(methods=None),
    lambda m, r: m.update(target_layers=5),
    lambda m, r: m.update(versions=[1]),
    lambda m, r: m.update(status=None),
], ids=["targets-null", "probability-null", "methods-null", "layers-int", "versions-list", "status-null"])
def test_damaged_manifest_values_still_report(run_dir, tmp_path, change):
    """Values of the wrong type in manifest.json were TypeError/UndefinedError tracebacks."""
    made = build_report(damaged(run_dir, tmp_path, change))
    assert made.path.is_file() and made.status == "complete"


@pytest.mark.parametrize("change, message", [
    (lambda m, r: m.update(images=None), "no explained images"),
    (lambda m, r: r.update(files=[1]), "names its files wrongly"),
    (lambda m, r: r.update(files={"view": str(SAMPLES / "chelsea.png")}), "names no valid file"),
    (lambda m, r: r.update(files={"maps": "../other/maps.npz"}), "names no valid file"),
    (lambda m, r: m.update(summary={"ok": 1}), "values this camlens does not expect"),
], ids=["images-null", "files-list", "view-elsewhere", "maps-elsewhere", "summary-partial"])
def test_damaged_manifest_is_one_line(run_dir, tmp_path, capsys, change, message):
    """Wrong values were tracebacks, and a view path outside the image's folder was embedded."""
    folder = damaged(run_dir, tmp_path, change)
    code, out, err = run_cli(["report", folder], capsys)
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (folder / "report.html").exists()


def test_missing_probability_in_browser(run_dir, tmp_path, browser):
    folder = damaged(run_dir, tmp_path, lambda m, r: [t.update(probability=None) for t in r["targets"]])
    browser.open(build_report(folder).path)
    assert browser.errors() == []
    assert browser.js("return document.querySelector('figcaption').textContent").startswith("Grad-CAM · ")
    assert "(-)" in browser.js("return document.querySelector('figcaption').textContent")


@pytest.mark.parametrize("name", [str(SAMPLES / "chelsea.png"), "../view.jpg", ["view.jpg"]])
def test_sanity_files_stay_in_the_run(run_dir, tmp_path, capsys, name):
    """sanity.json's files were joined to the folder as given: an absolute path or ../ embedded a
    picture from elsewhere; a list was a TypeError traceback."""
    sys.path.insert(0, str(run_dir.parent))  # reviewnet.py, written by the run_dir fixture
    try:
        code, out, err = run_cli(["sanity", SAMPLES / "coffee.png", "--model", "reviewnet:build", "--input-size", "32",
                                  "-m", "cam", "--steps", "2", "--out", tmp_path / "san"], capsys)
    finally:
        sys.path.remove(str(run_dir.parent))
    assert code == 0, err
    data = json.loads((tmp_path / "san" / "sanity.json").read_text(encoding="utf-8"))
    data["files"]["view"] = name
    (tmp_path / "san" / "sanity.json").write_text(json.dumps(data), encoding="utf-8")
    code, out, err = run_cli(["report", tmp_path / "san"], capsys)
    assert code == 1 and "names no valid file" in err and err.count("\n") == 1
    assert not (tmp_path / "san" / "report.html").exists()


def test_out_never_replaces_a_run_file(run_dir, tmp_path, capsys):
    """`--out RUN/manifest.json` replaced the manifest with the page, destroying the run."""
    folder = damaged(run_dir, tmp_path, lambda m, r: None)
    before = (folder / "manifest.json").read_bytes()
    code, out, err = run_cli(["report", folder, "--out", folder / "manifest.json"], capsys)
    assert code == 1 and "is not an .html file" in err and err.count("\n") == 1
    assert (folder / "manifest.json").read_bytes() == before
    code, out, err = run_cli(["report", folder, "--out", tmp_path / "new.htm"], capsys)
    assert code == 0 and (tmp_path / "new.htm").is_file()
