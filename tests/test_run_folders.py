"""Output folders: camlens touches only what it can prove it wrote, never follows a link out of a
run folder, and a re-run killed half-way never leaves the last complete record replaced or mixed
(issue 20, findings 3 to 7 and 10)."""

from __future__ import annotations

import importlib
import json
import os
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from camlens.io import RUN_MARKER, Arrays, RunFolder
from camlens.errors import CamlensError
from camlens.report import build_report
from helpers import NET_MODELS, SAMPLES, model_module, one_line_error, random_photo, run

explain_module = importlib.import_module("camlens.cli.explain")
sanity_module = importlib.import_module("camlens.cli.sanity")


class Killed(BaseException):
    """A stand-in for kill -9: nothing of camlens's own clean-up for Ctrl-C runs."""


@pytest.fixture
def model(tmp_path, monkeypatch):
    model_module(tmp_path, "runfolders_net", NET_MODELS, monkeypatch)
    return ["--model", "runfolders_net:net", "--input-size", "16"]


@pytest.fixture
def data(tmp_path):
    """A labelled dataset of 3 photos in class folders, and its class names: evaluate's arguments."""
    folder = tmp_path / "data"
    for n, label in enumerate(["cat", "cat", "dog"]):
        (folder / label).mkdir(parents=True, exist_ok=True)
        random_photo(folder / label / f"{n}.png", 20, 20 + n)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\ncup\nhat\n")
    return [folder, "-m", "gradcam", "--metric", "drop", "--class-names", names]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(3):
        random_photo(folder / f"p{n}.png", 20 + n, 24)
    return folder


def explain(args, out, model, capsys, *extra):
    return run(["explain", *args, "-m", "gradcam", "--out", out, *model, *extra], capsys)


# -- 3: only files camlens wrote --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["notes.txt", "report.html", "manifest.json", "summary.json", "view.jpg"])
def test_a_folder_with_files_of_the_user_is_refused_and_left_alone(tmp_path, photos, data, model, name, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("the user's own")
    for command in (["explain", photos, "-m", "gradcam"], ["sanity", photos / "p0.png", "-m", "gradcam"],
                    ["evaluate", *data]):
        code, _, err = run([*command, "--out", out, *model], capsys)
        one_line_error(code, err, 1, "camlens did not write")
        assert name in err
        assert (out / name).read_text() == "the user's own"
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".camlens-")) == [name]


def test_a_run_folder_of_another_kind_is_refused(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    code, _, err = explain([photos], out, model, capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = run(["sanity", photos / "p0.png", "-m", "gradcam", "--out", out, *model], capsys)
    one_line_error(code, err, 1, "holds a camlens explain run, not a sanity run")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_run_replaces_its_own_files_and_records_them(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    code, _, err = explain([photos], out, model, capsys, "--html")
    assert code == 0, err
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["kind"] == "explain"
    assert {"manifest.json", "report.html", "p0", "p1", "p2"} <= set(marker["files"])
    code, _, err = explain([photos / "p1.png"], out, model, capsys)
    assert code == 0, err
    assert not (out / "report.html").exists()  # its own earlier report, removed: it was not this run's
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["output"] for r in manifest["images"]] == ["p1"]
    assert sorted(k["output"] for k in manifest["kept"]) == ["p0", "p2"]


def test_a_user_file_added_to_a_run_folder_later_is_refused(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    assert explain([photos], out, model, capsys)[0] == 0
    (out / "my-notes.md").write_text("mine")
    code, _, err = explain([photos], out, model, capsys)
    one_line_error(code, err, 1, "files camlens did not write: my-notes.md")
    assert (out / "my-notes.md").read_text() == "mine"


def test_the_report_never_replaces_a_report_html_camlens_did_not_write(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    assert explain([photos], out, model, capsys)[0] == 0
    # Written after the run, beside its files: not the run's.
    (out / "report.html").write_text("<p>mine</p>")
    code, _, err = run(["report", out], capsys)
    one_line_error(code, err, 1, "camlens did not write the file of that name there")
    assert (out / "report.html").read_text() == "<p>mine</p>"


# -- 4: a killed re-run keeps the last complete record ---------------------------------------------

def test_a_killed_rerun_of_explain_keeps_the_complete_manifest_and_the_report_says_which_run(
        tmp_path, photos, model, capsys, monkeypatch):
    out = tmp_path / "out"
    assert explain([photos], out, model, capsys)[0] == 0
    complete = (out / "manifest.json").read_bytes()
    old_id = json.loads(complete)["run id"]
    real = explain_module.explain_one
    done = []

    def dying(*args, **kwargs):
        if done:
            raise Killed
        done.append(real(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(explain_module, "explain_one", dying)
    with pytest.raises(Killed):
        explain([photos], out, model, capsys, "-m", "cam")
    assert (out / "manifest.json").read_bytes() == complete  # still the last complete run's
    replaced = json.loads((out / "p0" / ".camlens").read_text())
    assert replaced["run"]["id"] != old_id and replaced["run"]["methods"] == ["gradcam", "cam"]
    monkeypatch.setattr(explain_module, "explain_one", real)
    made = build_report(out)
    html = made.path.read_text()
    assert "replaced 1 of this run" in html and "(p0)" in html
    assert made.status == "complete"
    assert "p1.png" in html and "p2.png" in html


def test_a_killed_rerun_of_sanity_keeps_the_complete_record(tmp_path, photos, model, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["sanity", photos / "p0.png", "-m", "gradcam", "--steps", "2", "--out", out, *model]
    code, _, err = run(args, capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".camlens")}
    assert {"sanity.json", "maps.npz", "view.jpg", "sanity.png", "similarity.png"} <= set(before)

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(sanity_module, "cascading_randomisation", killed)
    with pytest.raises(Killed):
        run([*args[:-len(model)], *model, "-m", "cam"], capsys)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".camlens")}
    assert after == before


def test_the_sanity_report_refuses_files_of_another_run(tmp_path, photos, model, capsys):
    """Killed between writing maps.npz and sanity.json: the record names its files by digest."""
    out = tmp_path / "out"
    args = ["sanity", photos / "p0.png", "-m", "gradcam", "--steps", "2", *model]
    assert run([*args, "--out", out], capsys)[0] == 0
    assert run([*args, "--out", tmp_path / "other", "--seed", "5", "-m", "cam"], capsys)[0] == 0
    (out / "maps.npz").write_bytes((tmp_path / "other" / "maps.npz").read_bytes())
    code, _, err = run(["report", out], capsys)
    one_line_error(code, err, 1, "maps.npz: not the file the run's record describes")


def test_evaluate_removes_its_summary_before_the_results_grow(tmp_path, data, model, capsys, monkeypatch):
    evaluate_module = importlib.import_module("camlens.cli.evaluate")
    args = ["evaluate", *data, "--out", tmp_path / "out", *model]
    assert run([*args, "--limit", "1"], capsys)[0] == 0
    out = tmp_path / "out"
    assert (out / "summary.json").is_file() and (out / "metrics.png").is_file()
    real = evaluate_module.evaluate_image

    def dying(*a, **k):
        raise Killed

    monkeypatch.setattr(evaluate_module, "evaluate_image", dying)
    with pytest.raises(Killed):
        run(args, capsys)
    for name in ("summary.json", "summary.csv", "metrics.png"):
        assert not (out / name).exists(), name
    monkeypatch.setattr(evaluate_module, "evaluate_image", real)
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["images"] == 3


def test_the_report_counts_the_images_the_summary_counts(tmp_path, data, model, capsys):
    """After `--limit 1` on a folder with 3 done, summary.json says n=1: so does the report."""
    args = ["evaluate", *data, "--out", tmp_path / "out", *model]
    assert run(args, capsys)[0] == 0
    assert run([*args, "--limit", "1"], capsys)[0] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["summary"]["gradcam"]["drop"]["n"] == 1
    from camlens.report import render_report

    _, _, _, context = render_report(tmp_path / "out")
    assert "the last run summarised 1 of them (its --limit), and so does this report" in " ".join(context["notes"])
    assert len(context["images"]) == 1
    assert context["table"]["gradcam"]["drop"] == summary["summary"]["gradcam"]["drop"]


# -- 5: links ------------------------------------------------------------------------------------

def test_a_linked_picture_is_never_embedded_in_a_report(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    assert explain([photos], out, model, capsys)[0] == 0
    secret = SAMPLES / "chelsea.png"
    (out / "p0" / "view.jpg").unlink()
    (out / "p0" / "view.jpg").symlink_to(secret)
    code, _, err = run(["report", out], capsys)
    one_line_error(code, err, 1, "a symbolic link")
    assert not (out / "report.html").exists()


def test_a_linked_image_folder_is_never_read(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    assert explain([photos], out, model, capsys)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    (out / "p0").rename(elsewhere)
    (out / "p0").symlink_to(elsewhere)
    code, _, err = run(["report", out], capsys)
    one_line_error(code, err, 1, "a symbolic link")


def test_a_linked_results_file_is_refused_and_the_target_untouched(tmp_path, data, model, capsys):
    out = tmp_path / "out"
    code, _, err = run(["evaluate", *data, "--limit", "1", "--out", out, *model], capsys)
    assert code == 0, err
    target = tmp_path / "precious.jsonl"
    target.write_text("mine\n")
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").symlink_to(target)
    code, _, err = run(["evaluate", *data, "--out", out, *model], capsys)
    one_line_error(code, err, 1, "results.jsonl is a symbolic link")
    assert target.read_text() == "mine\n"


def test_a_linked_marker_is_not_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps({"kind": "explain", "id": "x", "files": ["stuff"]}))
    (out / RUN_MARKER).symlink_to(fake)
    with pytest.raises(CamlensError, match="symbolic link"):
        RunFolder.claim(out, "explain")


def test_a_training_run_names_only_weights_of_its_own_folder(tmp_path):
    from camlens.ggam.run import RUN_FILE, load_run

    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("/etc/passwd", "../best.pt", "sub/best.pt"):
        (folder / RUN_FILE).write_text(json.dumps({"camlens version": camlens_version(), "status": "finished",
                                                   "weights": name}))
        with pytest.raises(CamlensError, match="plain file name of the run's folder"):
            load_run(folder)


def camlens_version() -> str:
    from camlens import __version__

    return __version__


# -- 6: a zip bomb -------------------------------------------------------------------------------

def bomb(path: Path, arrays: dict, extra_bytes: int) -> None:
    """An .npz of ``arrays`` plus an unused array of ``extra_bytes`` zeros (compressed to little)."""
    np.savez_compressed(path, **arrays, unused=np.zeros(extra_bytes, dtype=np.uint8))


def test_only_the_arrays_needed_are_decompressed(tmp_path):
    path = tmp_path / "maps.npz"
    bomb(path, {"gradcam": np.ones((3, 4, 4), dtype=np.uint8)}, 2**29)  # 512 MB of zeros
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    arrays = Arrays(path)
    assert arrays["gradcam"].shape == (3, 4, 4)
    assert arrays.shape("unused") == (2**29,)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20
    with pytest.raises(CamlensError, match="more than a camlens run writes"):
        arrays["unused"]


def test_a_header_that_declares_more_than_its_data_is_refused(tmp_path):
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (9_999_999,)})
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.npy", buffer.getvalue() + bytes(4))
    with pytest.raises(CamlensError, match="declares more data than the file holds"):
        Arrays(path)["a"]


def test_a_bomb_in_a_sanity_run_is_refused_or_ignored(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    assert run(["sanity", photos / "p0.png", "-m", "gradcam", "--steps", "2", "--out", out, *model], capsys)[0] == 0
    real = dict(np.load(out / "maps.npz"))
    bomb(out / "maps.npz", real, 2**30)
    record = json.loads((out / "sanity.json").read_text())
    record["digests"].pop("maps.npz")  # as a record without digests (or a crafted one) would be
    (out / "sanity.json").write_text(json.dumps(record))
    tracemalloc.start()
    made = build_report(out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert made.path.is_file()
    assert peak < 200 * 2**20
    os.remove(made.path)


def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path, photos, model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "bashrc"
    target.write_text("precious")
    (out / ".camlens-lock").symlink_to(target)
    code, _, err = explain([photos], out, model, capsys)
    one_line_error(code, err, 1, ".camlens-lock is a symbolic link")
    assert target.read_text() == "precious"
