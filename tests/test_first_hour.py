"""Issue 28, "no surprises in the first hour": a run with nothing to do leaves nothing behind (item 4)."""

from __future__ import annotations

import json
import shutil

from helpers import SAMPLES, run


def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in folder.rglob("*"))


def test_a_missing_input_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(["explain", tmp_path / "nothere.jpg", "--out", out], capsys)
    assert code == 1
    assert err.splitlines() == [f"camlens: error: nothing to explain: {tmp_path / 'nothere.jpg'}: no such file"]
    assert printed == "" and not out.exists()  # was a table of dashes, a manifest and a lock file


def test_a_missing_input_leaves_an_earlier_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["explain", SAMPLES / "coffee.png", "-m", "cam", "--out", out], capsys)
    assert code == 0, err
    before = listing(out)
    code, _, err = run(["explain", tmp_path / "nothere.jpg", tmp_path / "gone.png", "--out", out], capsys)
    assert code == 1
    assert err.splitlines() == [f"failed: {tmp_path / 'nothere.jpg'}: no such file",
                                f"failed: {tmp_path / 'gone.png'}: no such file",
                                "camlens: error: nothing to explain: none of the inputs is an image file that can be read"]
    assert listing(out) == before


def test_a_missing_input_beside_a_good_one_is_one_failed_line(tmp_path, capsys):
    out = tmp_path / "out"
    photo = tmp_path / "coffee.png"
    shutil.copy(SAMPLES / "coffee.png", photo)
    code, _, err = run(["explain", photo, tmp_path / "nothere.jpg", "-m", "cam", "--out", out], capsys)
    assert code == 1
    assert f"failed: {tmp_path / 'nothere.jpg'}: no such file" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(image["status"] for image in manifest["images"]) == ["failed", "ok"]
