"""`camlens report` of an evaluate run, and what evaluate keeps for it (views/, maps/): checked
against the run's own files and plain computations, and in a real browser."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens import __version__
from camlens.evaluate import maps_name, view_name
from camlens.report import RunError, build_report
from helpers import FACTORY_NET, SAMPLES, assert_offline, copy_run, page_script, shot
from helpers import run as run_cli

METHODS = ("gradcam", "gradcam++", "cam")


def cli(args):
    """The command line's exit code."""
    return run_cli(args)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny factory model (32 x 32 input) and 4 photos in 3 class folders."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "evalreportnet.py").write_text(FACTORY_NET)
    sys.path.insert(0, str(root))
    (root / "names.txt").write_text("cat\ncoffee\ncup\n")
    data = root / "data"
    for name, label in (("chelsea.png", "cat"), ("coffee.png", "coffee"), ("cameraman.png", "cup"),
                        ("rocket.jpg", "cup")):
        (data / label).mkdir(parents=True, exist_ok=True)
        Image.open(SAMPLES / name).convert("RGB").resize((96, 80)).save(data / label / (Path(name).stem + ".png"))

    def args(out, *extra):
        return ["evaluate", data, "--model", "evalreportnet:build", "--class-names", root / "names.txt",
                "--input-size", "32", "--steps", "4", *(f"--method={m}" for m in METHODS), "--out", out, *extra]

    yield root, data, args
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def run_dir(setup):
    root, _, args = setup
    out = root / "run"
    assert cli(args(out, "--limit", "2")) == 0  # then resumed: the rest is added
    assert cli(args(out, "--html")) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    path = run_dir / "report.html"
    assert path.is_file()  # written by --html
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


# --- what evaluate keeps -------------------------------------------------------------------------


def test_views_and_maps_are_the_runs(run_dir, setup):
    """Each result has its image's view and its own map, keyed by content and label: the map is the
    method's map of the preprocessed image (input 32 x 32, kept whole), quantised to 0..255."""
    import camlens
    from camlens.models import Preprocess

    import evalreportnet

    _, data, _ = setup
    found = records(run_dir)
    assert len(found) == 4 * 3
    preprocess = Preprocess(**json.loads((run_dir / "config.json").read_text())["preprocessing"])
    model = evalreportnet.build().eval()
    for record in found:
        assert (run_dir / view_name(record["sha256"])).is_file()
        stored = np.load(run_dir / maps_name(record["sha256"], record["label"]))
        assert set(stored.files) == {*METHODS, *(f"{m}/layer_side" for m in METHODS)}
        saved = stored[record["method"]]
        assert saved.dtype == np.uint8 and saved.shape == (32, 32)
        assert int(stored[f"{record['method']}/layer_side"]) == 16
        x = preprocess(Image.open(data / record["image"]).convert("RGB"))[None]
        expected = camlens.get_method(record["method"])(model, "features")(x, record["label"]).maps[0, 0]
        assert np.abs(saved.astype(int) - np.round(expected.numpy() * 255)).max() <= 1
    assert not list(run_dir.glob("*/.camlens-partial-*"))


def test_a_rerun_removes_the_old_report_and_keeps_maps_consistent(setup, tmp_path):
    _, _, args = setup
    out = tmp_path / "again"
    assert cli(args(out, "--limit", "1", "--html")) == 0
    assert (out / "report.html").is_file()
    # resumed without --html: no stale report beside the new results
    assert cli(args(out, "--limit", "2")) == 0
    assert not (out / "report.html").exists()
    # a run that starts afresh (no results to resume, other methods) keeps no map of the earlier
    # run's in the file it adds to: each map in it has its result
    record = records(out)[0]
    path = out / maps_name(record["sha256"], record["label"])
    assert set(np.load(path).files) == {*METHODS, *(f"{m}/layer_side" for m in METHODS)}
    (out / "results.jsonl").write_text("")
    code = cli([a for a in args(out, "--limit", "1") if not str(a).startswith("--method")] + ["--method=cam"])
    assert code == 0
    assert set(np.load(path).files) == {"cam", "cam/layer_side"}


# --- the report ----------------------------------------------------------------------------------


def test_table_is_the_summary_and_a_plain_mean(run_dir):
    from camlens.report.common import ImageStore
    from camlens.report.evaluate import load

    context = load(run_dir, ImageStore())
    assert context["status"] == "complete" and context["notes"] == []
    summary = json.loads((run_dir / "summary.json").read_text())["summary"]
    assert context["table"] == summary
    for method in METHODS:  # and an independent mean of one metric; 4 images: no interval
        values = [r["deletion"] for r in records(run_dir) if r["method"] == method]
        got = context["table"][method]["deletion"]
        assert got["mean"] == pytest.approx(sum(values) / len(values)) and got["n"] == 4
        assert got["low"] is None and got["high"] is None
    assert [image["name"] for image in context["images"]] == list(dict.fromkeys(r["image"] for r in records(run_dir)))
    # CAM's and Grad-CAM's means differ in the last digits only: bold both or neither
    for metric, methods in context["best"].items():
        assert ("cam" in methods) == ("gradcam" in methods), metric


def test_self_contained_and_every_picture_once(report):
    text = report.read_text(encoding="utf-8")
    assert_offline(text)
    store = page_script(text)
    # a view per image and a map per image and method, but CAM's map is Grad-CAM's on this
    # network (it pools globally before its one linear layer): stored once
    assert len(store) == 4 + 4 * 2
    assert len(set(store.values())) == len(store)
    for uri in store.values():
        assert text.count(uri) == 1


def column(browser, key):
    return browser.js(f"""return Array.from(document.querySelectorAll('#images tbody tr'))
        .map(r => r.querySelector('td[data-key="{key}"]').getAttribute('data-value'))""")


def test_in_browser(browser, report, run_dir, tmp_path):
    browser.open(report)
    assert browser.errors() == []
    assert browser.broken_images() == []
    assert browser.store_loads() == []
    found = records(run_dir)
    names = list(dict.fromkeys(r["image"] for r in found))
    by = {(r["image"], r["method"]): r for r in found}

    # the table shows the chosen method's values; the selector changes them
    rows = "return Array.from(document.querySelectorAll('#images tbody tr')).map(r => r.cells[0].textContent.trim())"
    assert browser.js(rows) == names
    assert [float(v) for v in column(browser, "deletion")] == pytest.approx([by[n, "gradcam"]["deletion"] for n in names], rel=1e-5)
    browser.js("const s = document.getElementById('method'); s.value = 'gradcam++'; s.dispatchEvent(new Event('change'))")
    assert [float(v) for v in column(browser, "deletion")] == pytest.approx([by[n, "gradcam++"]["deletion"] for n in names], rel=1e-5)
    assert column(browser, "deletion") != [str(by[n, "gradcam"]["deletion"]) for n in names]

    # clicking a header sorts numerically, a second click the other way
    browser.js("document.querySelector('#images th[data-metric=insertion] button').click()")
    values = [float(v) for v in column(browser, "insertion")]
    assert values == sorted(values)
    browser.js("document.querySelector('#images th[data-metric=insertion] button').click()")
    values = [float(v) for v in column(browser, "insertion")]
    assert values == sorted(values, reverse=True)
    # changing the method keeps the table sorted by that column
    browser.js("const s = document.getElementById('method'); s.value = 'gradcam'; s.dispatchEvent(new Event('change'))")
    values = [float(v) for v in column(browser, "insertion")]
    assert values == sorted(values, reverse=True)
    assert sorted(values) == pytest.approx(sorted(by[n, "gradcam"]["insertion"] for n in names), rel=1e-5)

    # choosing an image shows its view, every method's map, its values and curves
    heat = "return document.querySelector(\"#detail figure[data-method='gradcam++'] img.heat\").getAttribute('data-shown')"
    first = browser.js(heat)
    last = browser.js("const b = document.querySelectorAll('#images tbody button.pick'); b[b.length - 1].click(); "
                      "return b[b.length - 1].textContent")
    assert browser.js("return document.getElementById('detail-name').textContent") == last
    assert browser.js(heat) != first and browser.js(heat)
    cell = "return document.querySelector(\"#detail-values tr[data-method='gradcam++'] td[data-key=insertion]\").textContent"
    assert float(browser.js(cell)) == pytest.approx(by[last, "gradcam++"]["insertion"], rel=2e-3)
    points = browser.js("return document.querySelector(\"#detail svg[data-kind=deletion] polyline[data-method=cam]\")"
                        ".getAttribute('points')")
    assert len(points.split()) == 5  # --steps 4
    assert browser.broken_images() == []
    shot(browser, tmp_path, "report-evaluate.png")
    assert browser.errors() == []


def test_keyboard_and_phone(browser, report, tmp_path):
    from selenium.webdriver.common.by import By

    browser.open(report)
    body = browser.driver.find_element(By.TAG_NAME, "body")
    name = "return document.getElementById('detail-name').textContent"
    first = browser.js(name)
    body.send_keys("j")
    assert browser.js(name) != first
    body.send_keys("m")
    assert browser.js("return document.getElementById('method').value") == "gradcam++"
    browser.open(report, width=390, height=844)
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert browser.broken_images() == []
    shot(browser, tmp_path, "report-evaluate-phone.png")
    assert browser.errors() == []


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["laptop", "phone"])
def test_layout_table_fits_and_detail_below_the_toolbar(browser, report, size):
    """On a laptop the per-image table fits its box (every metric column shown without scrolling
    sideways); at both sizes the picked image's panel lands below the sticky toolbar, and the
    phone's column headers stay a few lines tall."""
    browser.open(report, *size)
    box = browser.js("const t = document.getElementById('images'); return [t.scrollWidth, t.parentNode.clientWidth]")
    if size[0] >= 1280:
        assert box[0] <= box[1] + 1, box
    browser.js("const b = document.querySelectorAll('#images tbody button.pick'); b[b.length - 1].click()")
    toolbar, panel = browser.js("""return [document.querySelector('.toolbar').getBoundingClientRect().bottom,
                                           document.getElementById('detail').getBoundingClientRect().top]""")
    assert panel >= toolbar - 1, (panel, toolbar)
    header = browser.js("return document.querySelector('#images thead').getBoundingClientRect().height")
    assert header < 120, header
    assert browser.errors() == []


# --- interrupted and damaged runs ----------------------------------------------------------------


def test_interrupted_without_summary(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "summary.json").unlink()
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])  # the last line cut short
    built = build_report(run)
    assert built.status == "interrupted"
    text = built.path.read_text()
    assert "interrupted before it wrote summary.json" in text and "could not be used" in text


def test_interrupted_after_an_old_summary(run_dir, tmp_path):
    from camlens.report.common import ImageStore
    from camlens.report.evaluate import load

    run = copy_run(run_dir, tmp_path)
    with (run / "results.jsonl").open("a") as handle:  # a later run appended, then was killed
        handle.write('{"image": "cup/cam')
    context = load(run, ImageStore())
    assert context["status"] == "interrupted" and "grew after summary.json" in context["notes"][0]


def test_missing_map_and_view_are_said(run_dir, tmp_path, browser):
    run = copy_run(run_dir, tmp_path)
    record = records(run)[0]
    (run / maps_name(record["sha256"], record["label"])).unlink()
    (run / view_name(record["sha256"])).unlink()
    built = build_report(run)
    text = built.path.read_text()
    assert "have no saved maps" in text and "have no saved view" in text
    browser.open(built.path)
    assert browser.js("return document.getElementById('detail-name').textContent") == record["image"]
    assert not browser.js("return document.getElementById('detail-missing').hidden")
    assert not browser.js("return document.querySelector(\"#detail figure[data-method=cam] .missing\").hidden")
    assert browser.broken_images() == [] and browser.errors() == []


def test_damaged_map_leaves_no_report(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "report.html").write_text("the old report")
    record = records(run)[0]
    path = run / maps_name(record["sha256"], record["label"])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunError, match=r"\.npz: cannot be read"):
        build_report(run)
    assert (run / "report.html").read_text() == "the old report"


def test_other_version_and_no_results(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["camlens version"] = "0.2.0"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=rf"made by camlens 0\.2\.0; this is camlens {__version__}"):
        build_report(run)
    config["camlens version"] = __version__
    (run / "config.json").write_text(json.dumps(config))
    (run / "results.jsonl").write_text("")
    with pytest.raises(RunError, match="no results yet"):
        build_report(run)
    (run / "config.json").write_text("{")
    with pytest.raises(RunError, match=r"config\.json: not a valid run config"):
        build_report(run)
    assert not (run / "report.html").exists()


def test_class_names_beside_indices(browser, report, run_dir, tmp_path):
    """evaluate keeps the model's class names (classes.json); the table, the drill-down and the
    table after a change of method show each class index with its name."""
    assert json.loads((run_dir / "classes.json").read_text()) == ["cat", "coffee", "cup"]
    names = ["cat", "coffee", "cup"]
    found = {(r["image"], r["method"]): r for r in records(run_dir)}
    browser.open(report)
    cells = browser.js("return Array.from(document.querySelectorAll('#images tbody tr')).map(r => "
                       "[r.cells[0].textContent.trim(), r.cells[1].textContent.trim(), r.cells[2].textContent.trim()])")
    for image, label, predicted in cells:
        record = found[image, "gradcam"]
        assert label == f"{record['label']} {names[record['label']]}"
        assert predicted == f"{record['prediction']} {names[record['prediction']]}"
    browser.js("const s = document.getElementById('method'); s.value = 'cam'; s.dispatchEvent(new Event('change'))")
    cells = browser.js("return Array.from(document.querySelectorAll('#images tbody tr')).map(r => "
                       "[r.cells[0].textContent.trim(), r.cells[2].textContent.trim()])")
    assert all(p == f"{found[i, 'cam']['prediction']} {names[found[i, 'cam']['prediction']]}" for i, p in cells)
    facts = browser.js("return document.getElementById('detail-facts').textContent")
    first = found[cells[0][0], "cam"]
    assert facts.startswith(f"label {first['label']} ({names[first['label']]}), predicted {first['prediction']} "
                            f"({names[first['prediction']]})")
    assert browser.errors() == []

    # a damaged classes.json is said, and the classes are shown by index; none at all, silently
    damaged = copy_run(run_dir, tmp_path)
    (damaged / "classes.json").write_text('{"not": "a list"}')
    text = build_report(damaged).path.read_text()
    assert "not a list of class names" in text
    assert 'class="class-name"' not in text
    (damaged / "classes.json").unlink()
    text = build_report(damaged).path.read_text()
    assert 'class="class-name"' not in text and "class names" not in text.split("<script")[0]


def test_a_model_without_class_names_keeps_no_classes_json(setup, tmp_path):
    root, _, args = setup
    out = tmp_path / "named"
    assert cli(args(out, "--limit", "1", "--metric", "drop")) == 0
    assert (out / "classes.json").is_file()
    out2 = tmp_path / "unnamed"
    plain = args(out2, "--limit", "1", "--metric", "drop")
    i = plain.index("--class-names")
    (tmp_path / "mapping.json").write_text('{"cat": 0, "coffee": 1, "cup": 2}')
    plain[i:i + 2] = ["--mapping", tmp_path / "mapping.json"]
    out2.mkdir()
    from camlens.cli.evaluate import RUN_FILES
    from camlens.io import RunFolder

    RunFolder.claim(out2, "evaluate", RUN_FILES)  # an evaluate folder of camlens's ...
    (out2 / "classes.json").write_text('["stale"]')  # ... with a classes.json an earlier run left
    assert cli(plain) == 0
    assert not (out2 / "classes.json").exists()


def test_long_and_empty_class_names(browser, run_dir, tmp_path):
    """Long class names are cut short in the table (full in the title and the detail panel), so
    the table still fits a laptop; an empty name is shown as no name, before and after a change
    of method."""
    run = copy_run(run_dir, tmp_path)
    names = ["American Staffordshire terrier, Staffordshire terrier", "", "Greater Swiss Mountain dog"]
    (run / "classes.json").write_text(json.dumps(names))
    report = build_report(run).path
    browser.open(report, 1280, 800)
    box = browser.js("const t = document.getElementById('images'); return [t.scrollWidth, t.parentNode.clientWidth]")
    assert box[0] <= box[1] + 1, box
    titles = browser.js("return Array.from(document.querySelectorAll('#images .class-name')).map(s => s.title)")
    assert titles and set(titles) <= {names[0], names[2]}
    for method in ("cam", "gradcam"):
        browser.js(f"const s = document.getElementById('method'); s.value = '{method}'; "
                   "s.dispatchEvent(new Event('change'))")
        cells = browser.js("return Array.from(document.querySelectorAll('#images td.prediction')).map(c => c.textContent)")
        assert not any(c.rstrip().endswith(" ") or c.strip() == "1 " for c in cells), cells
        assert browser.js("return document.querySelectorAll('#images .class-name:empty').length") == 0
        for i in range(len(cells)):
            browser.js(f"document.querySelectorAll('#images tbody button.pick')[{i}].click()")
            assert "()" not in browser.js("return document.getElementById('detail-facts').textContent")
    assert browser.errors() == []


@pytest.mark.parametrize("width", [1280, 390])
def test_every_table_fits_or_scrolls_in_its_card(report, browser, width):
    """At 1280 px the per-image table was cut off on the right (issue 28, item 6)."""
    browser.open(report, width=width)
    browser.js("document.querySelectorAll('details').forEach(function (d) { d.open = true; });")
    assert browser.cut_off() == []
