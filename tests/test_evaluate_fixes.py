"""camlens evaluate against a hostile first hour: a run's identity, damaged results, silent
losses, and what the figures and tables say. A tiny factory model keeps every run quick."""

from __future__ import annotations

import itertools
import re
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.charts import bar_chart, curve_plot
from camlens.evaluate import HIGHER_IS_BETTER, RANGES, TITLES, ResultStore, evaluate_image, file_digest

from conftest import make_tiny
from helpers import FACTORY_NET as NET
from helpers import one_line_error, run

NUMBER = itertools.count()


def picture(path, seed, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A module with a tiny model factory, its weights, class names, and 4 images in 3 class folders."""
    module = f"evalnet_{next(NUMBER)}"
    (tmp_path / f"{module}.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\ncup\n")
    data = tmp_path / "data"
    for seed, path in enumerate(("cat/0.png", "cat/1.png", "dog/0.png", "cup/0.png")):
        picture(data / path, seed)
    ns = SimpleNamespace(root=tmp_path, data=data, module=module, names=names, out=tmp_path / "out")
    ns.args = lambda *extra, data=data, out=None, methods=("cam", "gradcam"): [
        "evaluate", data, "--model", f"{module}:build", "--class-names", names, "--input-size", "16",
        "--steps", "2", *(f"--method={m}" for m in methods), "--out", out or ns.out, *extra,
    ]
    return ns


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((out / "summary.json").read_text())


# -- 3: a run's identity ----------------------------------------------------------------------------

def test_an_interrupted_run_resumes_and_counts_nothing_twice(setup, capsys):
    code, _, err = run(setup.args(out=setup.root / "whole"), capsys)
    assert code == 0, err
    code, _, err = run(setup.args("--limit", "2"), capsys)
    assert code == 0, err
    lines = (setup.out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # Interrupted while writing the fourth record:
    (setup.out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    assert "results.jsonl line 4: cut short (an interrupted run); set aside in results.set-aside.jsonl" in err
    got = records(setup.out)
    assert len(got) == 8 and len({(r["image"], r["method"]) for r in got}) == 8
    assert summary(setup.out)["summary"] == summary(setup.root / "whole")["summary"]
    assert (setup.out / "results.set-aside.jsonl").read_text() == lines[3][:25] + "\n"
    # Once more, with another batch size (it changes how inputs are grouped, not the numbers):
    before = (setup.out / "results.jsonl").read_bytes()
    code, _, err = run(setup.args("--batch-size", "3"), capsys)
    assert code == 0, err
    assert "note:" not in err
    assert (setup.out / "results.jsonl").read_bytes() == before


def test_the_batch_size_does_not_change_the_numbers(images):
    model = make_tiny()
    results = []
    for size in (1, 7):
        explainer = camlens.ScoreCAM(model, "features", batch_size=size)
        results.append(evaluate_image(explainer, images[0], 2, [(0, 0, 6, 6)], list(TITLES), steps=5, batch_size=size))
    for name, value in results[0].items():
        assert results[1][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def _rewrite(path, text):
    return lambda ns: path(ns).write_text(text)


CHANGES = {
    "weights": (["--weights", "w.pt"], lambda ns: torch.save(_build(ns, 1).state_dict(), ns.root / "w.pt"), [],
                "--weights: other content; model weights: other content"),
    "class names": ([], lambda ns: ns.names.write_text("cat\ndog\ncup, mug\n"), [], "--class-names: other content"),
    "model code": ([], lambda ns: (ns.root / f"{ns.module}.py").write_text(NET + "# edited\n"), [],
                   "model code: other content"),
    "steps": ([], None, ["--steps", "3"], "--steps: 2 -> 3"),
    "layer": ([], None, ["--target-layer", "features.1"], "--target-layer: features -> features.1"),
    "input size": ([], None, ["--input-size", "20"], "preprocessing size: 16 -> 20; preprocessing resize: 18 -> 23"),
    "methods": ([], None, ["-m", "gradcam++"], "--method: cam, gradcam -> cam, gradcam, gradcam++"),
    "seed": (["-m", "smoothgradcam++"], None, ["-m", "smoothgradcam++", "--seed", "5"],
             "method options smoothgradcam++ seed: 0 -> 5"),
    "image": ([], lambda ns: picture(ns.data / "cat" / "0.png", 99), [],
              "holds results of 1 image(s) that changed since: cat/0.png (content); use another --out"),
    "boxes beside": (["--metric", "energy"],
                     lambda ns: (ns.data / "cat" / "0.xml").write_text(_voc(2, 2, 30, 30)), ["--metric", "energy"],
                     "cat/0.png (boxes)"),
}


def _build(ns, seed):
    import importlib

    return importlib.import_module(ns.module).build(seed)


def _voc(*box):
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<annotation><object><bndbox>{tags}</bndbox></object></annotation>"


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_run_with_other_settings_is_refused_naming_what_changed(setup, change, capsys):
    first, edit, second, text = CHANGES[change]
    if change == "weights":
        torch.save(_build(setup, 0).state_dict(), setup.root / "w.pt")
        first = ["--weights", setup.root / "w.pt"]
        second = first
    if change == "boxes beside":
        (setup.data / "cat" / "0.xml").write_text(_voc(1, 1, 20, 20))
    methods = ("gradcam",) if change == "layer" else ("cam", "gradcam")  # CAM needs the pooled layer
    code, _, err = run(setup.args("--limit", "1", *first, methods=methods), capsys)
    assert code == 0, err
    if change == "layer":  # naming the default layer is no change
        code, _, err = run(setup.args("--limit", "1", "--target-layer", "features", methods=methods), capsys)
        assert code == 0, err
    if edit is not None:
        edit(setup)
    code, _, err = run(setup.args("--limit", "1", *second, methods=methods), capsys)
    one_line_error(code, err, 1, text)


def test_changed_mapping_and_boxes_files_are_refused(setup, capsys):
    """The same paths with new content: --mapping and --boxes (a labels CSV is checked image by image)."""
    (setup.root / "labels.csv").write_text("path,label\ndata/cat/0.png,kitty\ndata/dog/0.png,dog\n")
    (setup.root / "map.csv").write_text("kitty,0\ndog,1\n")
    (setup.root / "boxes.csv").write_text("data/cat/0.png,0,0,20,20\n")
    args = setup.args("--mapping", setup.root / "map.csv", "--boxes", setup.root / "boxes.csv",
                      "--metric", "energy", data=setup.root / "labels.csv")
    code, _, err = run(args, capsys)
    assert code == 0, err
    for name, text in (("map.csv", "kitty,2\ndog,1\n"), ("boxes.csv", "data/cat/0.png,0,0,30,30\n")):
        saved = (setup.root / name).read_text()
        (setup.root / name).write_text(text)
        code, _, err = run(args, capsys)
        what = {"map.csv": "--mapping", "boxes.csv": "--boxes"}[name]
        one_line_error(code, err, 1, f"holds results of other settings ({what}: other content)")
        (setup.root / name).write_text(saved)
    code, _, err = run(args, capsys)
    assert code == 0, err


def test_a_replaced_model_file_is_refused(setup, capsys):
    path = setup.root / "net.pt2"
    example = (torch.randn(2, 3, 16, 16),)
    dynamic = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(_build(setup, 0), example, dynamic_shapes=dynamic), path)
    args = ["evaluate", setup.data, "--model", path, "--class-names", setup.names, "--input-size", "16",
            "--steps", "2", "-m", "gradcam", "--limit", "1", "--out", setup.out]
    code, _, err = run(args, capsys)
    assert code == 0, err
    with warnings.catch_warnings():  # torch's own FutureWarnings of export would land in the run's stderr
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(_build(setup, 1), example, dynamic_shapes=dynamic), path)
    capsys.readouterr()
    code, _, err = run(args, capsys)
    one_line_error(code, err, 1, "model file: other content; model weights: other content")


# -- 4: damaged results and config -------------------------------------------------------------------

def test_damaged_and_foreign_lines_are_set_aside_and_said_truthfully(setup, capsys):
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    good = (setup.out / "results.jsonl").read_text().splitlines()
    expected = summary(setup.out)["summary"]
    first = json.loads(good[0])
    bad = [
        '{"image": "cat/0.png", "meth',  # damaged in the middle (was a JSONDecodeError)
        "[1, 2, 3]",  # valid JSON, not an object (was a TypeError)
        json.dumps({k: v for k, v in first.items() if k != "drop"}),  # a field missing
        json.dumps({**first, "deletion_curve": "flat"}),  # a field of the wrong type
        json.dumps({**first, "image": "cat/elsewhere.png"}),  # an image not in the dataset
        json.dumps({**first, "method": "scorecam"}),  # a method not in this run
        json.dumps({**first, "seconds": 99.0}),  # a pair recorded twice: the first copy stays
    ]
    bad = [line.encode() for line in bad] + [b"\xff\xfe"]  # not UTF-8
    # Lines 2 and 5 of the good ones are lost (overwritten) and must be computed again.
    good = [line.encode() for line in good]
    damaged = [good[0], bad[0], bad[1], good[2], good[3], *bad[2:], *good[5:]]
    (setup.out / "results.jsonl").write_bytes(b"\n".join(damaged) + b"\n")
    saved_config = json.loads((setup.out / "config.json").read_text())
    code, _, err = run(setup.args(), capsys)
    assert code == 0, err
    assert "Traceback" not in err
    # Five lines said one by one, then the total:
    single = [line for line in err.splitlines() if "set aside in results.set-aside.jsonl" in line]
    assert [line.split(";")[0] for line in single] == [
        "note: results.jsonl line 2: not JSON", "note: results.jsonl line 3: a JSON list, not a record",
        "note: results.jsonl line 6: field 'drop' is missing or not a number",
        "note: results.jsonl line 7: field 'deletion_curve' is missing or not 3 numbers",
        "note: results.jsonl line 8: image 'cat/elsewhere.png' is not in this dataset",
    ]
    assert all(line.endswith("its result is computed again if this run needs it") for line in single)
    assert "note: and 3 more line(s) of results.jsonl set aside; all in results.set-aside.jsonl" in err.splitlines()
    report = summary(setup.out)
    assert report["set_aside_lines"] == len(bad)
    assert report["notes"][-1] == "and 3 more line(s) of results.jsonl set aside; all in results.set-aside.jsonl"
    got = records(setup.out)
    assert len(got) == 8 and len({(r["image"], r["method"]) for r in got}) == 8
    assert first in got  # the first copy of the pair kept, not the second
    assert report["summary"] == expected
    assert len((setup.out / "results.set-aside.jsonl").read_bytes().splitlines()) == len(bad)
    # Every line's reason, the three not shown above included:
    again = setup.root / "again"
    again.mkdir()
    (again / "config.json").write_text(json.dumps(saved_config))
    (again / "results.jsonl").write_bytes(b"\n".join(damaged) + b"\n")
    store = ResultStore(again, saved_config, {"cat/0.png", "cat/1.png", "dog/0.png", "cup/0.png"})
    assert store.set_aside[5:] == [
        "results.jsonl line 9: method 'scorecam' is not in this run; set aside in results.set-aside.jsonl, "
        "its result is computed again if this run needs it",
        "results.jsonl line 10: a second result for the same image and method; set aside in "
        "results.set-aside.jsonl, the first one is kept",
        "results.jsonl line 11: not JSON; set aside in results.set-aside.jsonl, "
        "its result is computed again if this run needs it",
    ]
    assert store.records[(first["image"], first["method"])] == first


def test_undefined_values_are_said_not_dropped(setup, capsys):
    code, _, err = run(setup.args("--limit", "2"), capsys)
    assert code == 0, err
    lines = (setup.out / "results.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "drop": float("nan")})  # Y = 0 gives 0 / 0
    (setup.out / "results.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run(setup.args("--limit", "2"), capsys)
    assert code == 0, err
    assert "note: Average Drop (%): 1 value(s) undefined" in err
    assert summary(setup.out)["summary"][json.loads(lines[0])["method"]]["drop"]["n"] == 1


def test_a_damaged_config_is_reported_as_damaged(setup, capsys):
    code, _, err = run(setup.args("--limit", "1"), capsys)
    assert code == 0, err
    assert json.loads((setup.out / "config.json").read_text())["--steps"] == 2
    assert not [p for p in setup.out.iterdir() if p.name.startswith(".config")]  # written atomically
    (setup.out / "config.json").write_text('{"camlens version": "0.1')
    code, _, err = run(setup.args("--limit", "1"), capsys)
    one_line_error(code, err, 1, "config.json is damaged (not a JSON object)")
    (setup.out / "config.json").unlink()
    code, _, err = run(setup.args("--limit", "1"), capsys)
    one_line_error(code, err, 1, "results.jsonl has no config.json beside it")


# -- 9: silent losses ---------------------------------------------------------------------------------

def test_skipped_images_and_cropped_boxes_are_said(setup, capsys):
    (setup.data / "cup" / "1.png").write_bytes(b"\x89PNG cut")
    picture(setup.data / "dog" / "wide.png", 7, size=(160, 40))
    # The centre crop of a 160x40 photo is x 60..100: a box at the left edge is cut away.
    (setup.root / "boxes.csv").write_text("dog/wide.png,0,0,30,40\ncat/0.png,0,0,20,20\n")
    code, out, err = run(setup.args("--boxes", setup.root / "boxes.csv"), capsys)
    assert code == 1
    assert "camlens evaluate: 5 of 6 images" in out
    assert "wide.png: box (0.0, 0.0, 30.0, 40.0) lies outside the centre crop the model sees (box skipped)" in err
    assert "4 of 5 images have no box the model sees: the box metrics are over the other 1" in err
    assert "1.png: unreadable image" in err
    report = summary(setup.out)
    assert report["images"] == 5 and report["images_listed"] == 6
    assert report["summary"]["cam"]["energy"]["n"] == 1 and report["summary"]["cam"]["drop"]["n"] == 5


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--boxes", "missing.csv"], "--boxes missing.csv: no such file or folder"),
        (["--mapping", "{root}/far.json"], "far.json: label 'cup' maps to class 7, but the model has 3 classes (0 to 2)"),
    ],
)
def test_bad_boxes_and_mappings_stop_before_any_work(setup, extra, text, capsys):
    (setup.root / "far.json").write_text('{"cat": 0, "dog": 1, "cup": 7}')
    extra = [e.format(root=setup.root) for e in extra]
    code, _, err = run(setup.args(*extra), capsys)
    one_line_error(code, err, 1, text)
    assert not (setup.out / "results.jsonl").exists()


# -- 12 and 14: what the figures, tables and help say -------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """The figures the charts save, kept for inspection."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k)))
    return figures


def test_curves_of_methods_that_coincide_share_a_labelled_line(drawn, tmp_path):
    """On a pooled layer CAM and Grad-CAM are equal in theory, and to the last few digits in floats."""
    curves = {"deletion": {"cam": [0.9, 0.5, 0.2], "gradcam": [0.9, 0.5004, 0.2], "scorecam": [0.9, 0.4, 0.1]},
              "insertion": {"cam": [0.1, 0.5], "gradcam": [0.1, 0.6]}}
    curve_plot(curves, tmp_path / "c.png", {"cam": "CAM", "gradcam": "Grad-CAM", "scorecam": "Score-CAM"}, 4)
    deletion, insertion = drawn[0].axes
    assert [t.get_text() for t in deletion.get_legend().get_texts()] == ["CAM = Grad-CAM", "Score-CAM"]
    assert len(deletion.lines) == 2 and deletion.lines[0].get_linestyle() != deletion.lines[1].get_linestyle()
    assert [t.get_text() for t in insertion.get_legend().get_texts()] == ["CAM", "Grad-CAM"]
    assert "lower is better" in deletion.get_title() and "higher is better" in insertion.get_title()
    assert "over 4 images" in deletion.get_title()
    assert deletion.get_legend().get_title().get_text() == "A = B: within 0.001 at every step"


def test_bars_clip_the_interval_to_the_metric_range_and_mark_equal_bars(drawn, tmp_path):
    stats = {
        "cam": {"increase": {"mean": 90.0, "low": 65.0, "high": 105.0, "n": 4},
                "deletion": {"mean": 0.05, "low": -0.05, "high": 0.15, "n": 4}},
        "gradcam": {"increase": {"mean": 90.05, "low": 65.07, "high": 105.0, "n": 4},
                    "deletion": {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 4}},
        "scorecam": {"increase": {"mean": 50.0, "low": 30.0, "high": 70.0, "n": 4},
                     "deletion": {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 3}},
    }
    names = {"cam": "CAM", "gradcam": "Grad-CAM", "scorecam": "Score-CAM"}
    bar_chart(stats, ["increase", "deletion"], TITLES, tmp_path / "m.png", names, HIGHER_IS_BETTER, RANGES)
    increase, deletion = drawn[0].axes
    ends = sorted(tuple(np.round(segment[:, 0], 6)) for segment in increase.collections[0].get_segments())
    assert ends == [(30.0, 70.0), (65.0, 100.0), (65.07, 100.0)]  # 90 ± 25 stops at 100
    low = sorted(tuple(np.round(segment[:, 0], 6)) for segment in deletion.collections[0].get_segments())[0]
    assert low == (0.0, 0.15)  # 0.05 ± 0.1 stops at 0
    assert [t.get_text() for t in increase.get_yticklabels()] == ["CAM", "Grad-CAM (= CAM)", "Score-CAM"]
    assert [t.get_text() for t in deletion.get_yticklabels()] == ["CAM", "Grad-CAM", "Score-CAM (= Grad-CAM)"]
    assert "higher is better, n = 4" in increase.get_title() and "lower is better, n = 3/4" in deletion.get_title()
    assert increase.get_xlim()[1] <= 100.0
    assert "mean and 95% bootstrap interval" in drawn[0].get_suptitle()


def test_tables_say_what_their_numbers_are(setup, capsys):
    code, out, err = run(setup.args(), capsys)
    assert code == 0, err
    assert "mean [95% bootstrap percentile interval of the mean" in " ".join(out.split()) and "n = 4" in out
    assert (setup.out / "summary.csv").read_text().splitlines()[0] == "method,metric,mean,ci95_low,ci95_high,n"
    assert summary(setup.out)["statistic"].startswith("mean [95% bootstrap percentile interval")
    assert "(n < 5)" in out  # 4 images: no interval


def test_help_names_the_default_methods(capsys):
    code, out, _ = run(["evaluate", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert "cam, gradcam, gradcam++, smoothgradcam++, scorecam" in flat
    assert "seed method" not in flat


def test_one_run_at_a_time_per_output_folder(setup, capsys):
    """Two runs into one --out would compute the same pairs and append them twice."""
    from camlens.io import locked_output_dir

    setup.out.mkdir()
    with locked_output_dir(setup.out, "evaluate"):
        code, _, err = run(setup.args("--limit", "1"), capsys)
    one_line_error(code, err, 1, "another camlens run is writing to")
    assert not (setup.out / "results.jsonl").exists()
    code, _, err = run(setup.args("--limit", "1"), capsys)
    assert code == 0, err


# -- issue 7 review: what the first hour still hit ---------------------------------------------------

def test_a_boxes_csv_with_paths_relative_to_the_working_directory_stops_the_run(setup, capsys, monkeypatch):
    monkeypatch.chdir(setup.root)
    (setup.root / "boxes.csv").write_text("data/cat/0.png,0,0,20,20\ndata/dog/0.png,0,0,20,20\n")
    code, _, err = run(setup.args("--boxes", "boxes.csv"), capsys)
    one_line_error(code, err, 1, f"--boxes boxes.csv: no row names an image of the dataset; its paths are relative "
                                 f"to the dataset folder {setup.data}")
    assert f"'data/cat/0.png' is {setup.data / 'data' / 'cat' / '0.png'}" in err
    assert not (setup.out / "results.jsonl").exists()


def test_progress_in_a_log_is_lines_and_no_blank_line(setup, capsys):
    code, _, err = run(setup.args(), capsys)  # capsys: stderr is not a terminal
    assert code == 0, err
    lines = err.splitlines()
    assert "" not in lines and not err.startswith("\n"), repr(err)
    progress = [line for line in lines if re.search(r": \d+/8 \(\d+ s", line)]
    assert progress and re.search(r"\.png (CAM|Grad-CAM): 8/8 \(\d+ s\)$", progress[-1]), err


def test_cam_left_out_of_the_default_methods_is_said_in_the_summary_and_under_the_table(setup, capsys):
    """features.1 does not feed the pooling: CAM cannot explain it, the other four run."""
    code, out, err = run(setup.args("--limit", "1", "--target-layer", "features.1", methods=()), capsys)
    assert code == 0, err
    reason = ("the model's output is not fc(global average pool of layer 'features.1'), fc being 'fc': CAM needs a "
              "head 'features -> global average pooling -> linear' with that layer as the features, and this model "
              "does something else between the layer and its linear classifier (a norm, an activation, another "
              "layer)")
    assert f"note: CAM skipped: {reason}" in err.splitlines()
    assert "camlens: note" not in err
    report = summary(setup.out)
    assert report["skipped_methods"] == {"cam": reason}
    assert f"CAM skipped: {reason}" in report["notes"]
    assert sorted(report["summary"]) == ["gradcam", "gradcam++", "scorecam", "smoothgradcam++"]
    caption = out[out.index("mean [95% bootstrap"):]
    assert "note: CAM skipped: the model's output is not fc(global average pool of layer 'features.1')" in caption


def test_a_row_added_to_a_labels_csv_resumes_and_a_changed_label_is_refused(setup, capsys):
    labels = setup.root / "labels.csv"
    labels.write_text("path,label\ndata/cat/0.png,cat\ndata/dog/0.png,dog\n")
    args = setup.args(data=labels)
    code, _, err = run(args, capsys)
    assert code == 0, err
    before = records(setup.out)
    assert sorted({r["image"] for r in before}) == ["data/cat/0.png", "data/dog/0.png"]
    labels.write_text("path,label\ndata/cat/0.png,cat\ndata/dog/0.png,dog\ndata/cup/0.png,cup\n")
    code, out, err = run(args, capsys)
    assert code == 0, err
    after = records(setup.out)
    assert after[:len(before)] == before  # nothing recomputed
    assert [(r["image"], r["method"]) for r in after[len(before):]] == [("data/cup/0.png", "cam"),
                                                                          ("data/cup/0.png", "gradcam")]
    assert summary(setup.out)["images"] == 3 and "3 images" in out
    labels.write_text("path,label\ndata/cat/0.png,cat\ndata/dog/0.png,cup\ndata/cup/0.png,cup\n")
    code, _, err = run(args, capsys)
    one_line_error(code, err, 1, "holds results of 1 image(s) that changed since: data/dog/0.png (label); "
                                 "use another --out")


def test_a_model_file_is_known_by_its_path_not_by_how_it_is_described(setup, capsys, monkeypatch):
    """The run's identity holds the model file's content whatever words LoadedModel.source uses."""
    import camlens.cli.common as common

    path = setup.root / "net.pt2"
    example = (torch.randn(2, 3, 16, 16),)
    torch.export.save(torch.export.export(_build(setup, 0), example,
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    load = common.load_model

    def reworded(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.source = f"exported program from {path}"
        return loaded

    monkeypatch.setattr(common, "load_model", reworded)
    args = ["evaluate", setup.data, "--model", path, "--class-names", setup.names, "--input-size", "16",
            "--steps", "2", "-m", "gradcam", "--limit", "1", "--out", setup.out]
    code, _, err = run(args, capsys)
    assert code == 0, err
    config = json.loads((setup.out / "config.json").read_text())
    assert config["model file"] == file_digest(path)
    code, _, err = run(setup.args("--limit", "1", out=setup.root / "factory"), capsys)
    assert code == 0, err
    config = json.loads((setup.root / "factory" / "config.json").read_text())
    assert config["model file"] is None and setup.module in config["model code"]


class InPlaceHead(torch.nn.Module):
    """A ReLU applied in place after the feature block: logits = fc(GAP(relu(A))), not fc(GAP(A))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1))
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu_(self.features(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("layer, fits", [(None, True), ("features", True), ("features.1", False)])
def test_one_blank_forward_checks_the_model_finds_the_layer_and_tells_whether_cam_fits(setup, layer, fits,
                                                                                        monkeypatch):
    from camlens.capture import find_default_layer
    from camlens.cli.common import prepare

    import camlens.cli.common as common

    calls = []
    open_model = common.open_model

    def counted(**args):
        loaded = open_model(**args)
        loaded.module.register_forward_pre_hook(lambda module, inputs: calls.append(tuple(inputs[0].shape)))
        return loaded

    monkeypatch.setattr(common, "open_model", counted)
    model_args = {"model_spec": f"{setup.module}:build", "weights": None, "input_size": 16, "resize": None,
                  "mean": None, "std": None, "class_names": str(setup.names)}
    skipped, layers = {}, []
    chosen, _, loaded, classes = prepare([], "out", "cpu", layer, model_args, on_skip=skipped.__setitem__,
                                         on_layer=layers.append)
    assert calls == [(2, 3, 16, 16)]  # one forward pass of the blank batch of two, no more
    assert classes == 3
    expected = layer or find_default_layer(loaded.module, torch.zeros(1, 3, 16, 16))
    assert layers == [expected] == [layer or "features"]
    assert ("cam" in chosen) == fits and (skipped == {}) == fits


def test_an_in_place_operation_after_the_layer_does_not_fool_the_cam_check(monkeypatch):
    """The probe keeps a copy of the layer's output, as CAM's own capture does."""
    from camlens.cli.common import cam_misfit, probe
    from camlens.models import LoadedModel, Preprocess

    model = InPlaceHead().eval()
    loaded = LoadedModel(model, Preprocess(size=16), None, "inplace", "test")
    found = probe(loaded, None)
    assert found.layer == "features"
    assert "is not fc(global average pool of layer 'features')" in cam_misfit(loaded, found, None)
    with pytest.raises(camlens.CamlensError, match="is not fc"):  # the method agrees on a real image
        camlens.CAM(model)(torch.randn(1, 3, 16, 16))


def test_an_os_error_without_a_reason_is_still_named(tmp_path, monkeypatch):
    import camlens.io as io  # where file_digest lives; camlens.evaluate gives it too

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(io, "open", fail, raising=False)
    with pytest.raises(camlens.CamlensError, match=r"x.png: cannot be read \(OSError\)$"):
        file_digest(tmp_path / "x.png")


def test_threads_option_sets_torchs_cpu_threads(setup, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _, stderr = run(setup.args("--threads", "1", methods=("gradcam",)), capsys)
        assert code == 0, stderr
        assert torch.get_num_threads() == 1
        code, _, stderr = run(setup.args("--threads", "0", methods=("gradcam",), out=setup.root / "other"), capsys)
        one_line_error(code, stderr, 2, "--threads")
    finally:
        torch.set_num_threads(before)
