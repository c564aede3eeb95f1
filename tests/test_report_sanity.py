"""`camlens report` of a sanity run, and the files `camlens sanity` saves for it: checked in a
real browser."""

from __future__ import annotations

import html
import importlib
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from camlens import __version__
from camlens.cli import main
from camlens.report import RunError, build_report
from helpers import NET_MODELS, assert_offline, copy_run, page_data, random_photo, shot
from helpers import run as cli

command = importlib.import_module("camlens.cli.sanity")  # the module, not the click command


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model's module on sys.path and a photo: the sanity command line without --out."""
    folder = tmp_path_factory.mktemp("sanity-model")
    (folder / "report_sanity_models.py").write_text(NET_MODELS)
    sys.path.insert(0, str(folder))
    photo = random_photo(folder / "photo.png", 40, 48)
    yield ["sanity", photo, "--model", "report_sanity_models:net", "--input-size", "32", "-m", "cam",
           "-m", "gradcam++", "--steps", "2"]
    sys.path.remove(str(folder))
    sys.modules.pop("report_sanity_models", None)


@pytest.fixture(scope="module")
def run_dir(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("sanity") / "run"
    try:
        main([str(a) for a in [*base, "--out", out, "--html"]])
    except SystemExit as done:
        assert not done.code, done.code
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    return run_dir / "report.html"


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share theirs), by plain loops."""
    flat = list(values.ravel())
    order = sorted(range(len(flat)), key=lambda i: flat[i])
    result = np.empty(len(flat))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and flat[order[j + 1]] == flat[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2
        i = j + 1
    return result


def test_run_saves_version_status_view_and_every_steps_maps(run_dir):
    data = json.loads((run_dir / "sanity.json").read_text())
    assert data["camlens"] == __version__ and data["status"] == "complete"
    assert data["steps"] == ["fc", "stem"] and list(data["methods"]) == ["cam", "gradcam++"]
    with Image.open(run_dir / "view.jpg") as view:
        assert view.width == view.height > 0  # the crop the model saw, at the photo's scale
    with np.load(run_dir / "maps.npz") as maps:
        assert sorted(maps.files) == ["cam", "gradcam++"]
        for name in maps.files:
            stack = maps[name].astype(np.float64) / 255
            assert stack.shape == (3, 32, 32) and maps[name].dtype == np.uint8
            assert stack.max(axis=(1, 2)).tolist() == [1.0] * 3  # each map scaled to [0, 1], then to 0..255
            # The saved maps are the ones the verdict was judged on: Spearman of each step's map
            # with the reference (first), recomputed here, is the run's.
            for step, rho in enumerate(data["methods"][name]["spearman"], start=1):
                a, b = ranks(stack[0]), ranks(stack[step])
                if a.std() == 0 or b.std() == 0:
                    assert rho is None
                    continue
                assert np.corrcoef(a, b)[0, 1] == pytest.approx(rho, abs=0.02)


def test_report_is_self_contained_and_stores_each_picture_once(report, run_dir):
    text = report.read_text(encoding="utf-8")
    assert_offline(text)
    store, data = page_data(report, "camlens-sanity")
    assert len(set(store.values())) == len(store)
    sanity = json.loads((run_dir / "sanity.json").read_text())
    assert data["steps"] == ["trained", *sanity["steps"]]
    assert data["methods"] == list(sanity["methods"])
    assert all(len(row) == 3 and all(ref in store for ref in row) for row in data["heat"])
    assert data["spearman"] == [v["spearman"] for v in sanity["methods"].values()]
    # the similarity curves are inline SVG drawn from sanity.json: one line per method and chart
    assert text.count('<g class="series"') == 4 and "<polyline" in text
    assert html.escape(sanity["criterion"], quote=False) in text  # autoescaped


def shown(browser):
    """The references the step cards show, per method."""
    return browser.js("""return Array.from(document.querySelectorAll('.step-cards article.card')).map(
        c => [c.getAttribute('data-method'), c.querySelector('img.heat').getAttribute('data-shown')]);""")


def test_in_browser(browser, report, run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.open(report)
    assert browser.errors() == []
    assert browser.broken_images() == [] and browser.store_loads() == []
    _, data = page_data(report, "camlens-sanity")
    assert shown(browser) == [[m, data["heat"][i][0]] for i, m in enumerate(data["methods"])]
    # the step slider shows every method's map at that step
    browser.js("const s = document.getElementById('step'); s.value = 2; s.dispatchEvent(new Event('input'));")
    assert shown(browser) == [[m, data["heat"][i][2]] for i, m in enumerate(data["methods"])]
    assert browser.driver.find_element(By.ID, "step-value").text == "stem"
    assert browser.broken_images() == []
    # a column of the grid picks its step
    browser.driver.find_element(By.CSS_SELECTOR, "#grid button[data-step='1']").click()
    assert shown(browser) == [[m, data["heat"][i][1]] for i, m in enumerate(data["methods"])]
    assert browser.js("return document.querySelectorAll('#grid td.current').length") == len(data["methods"])
    # the grid: rows methods, columns steps, every map there
    assert browser.js("return document.querySelectorAll('#grid tbody tr').length") == 2
    assert browser.js("return document.querySelectorAll('#grid td img.heat').length") == 6
    # verdicts shown are the run's
    sanity = json.loads((run_dir / "sanity.json").read_text())
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#verdicts tbody tr")
    assert [(r.get_attribute("data-method"), r.find_elements(By.TAG_NAME, "td")[1].get_attribute("data-value"))
            for r in rows] == [(n, v["verdict"]) for n, v in sanity["methods"].items()]
    # picking one method hides the others everywhere (cards, grid, curves)
    Select(browser.driver.find_element(By.ID, "method")).select_by_value("cam")
    visible = browser.js("""return Array.from(document.querySelectorAll('[data-method]'))
        .filter(e => getComputedStyle(e).display !== 'none').map(e => e.getAttribute('data-method'));""")
    assert visible and set(visible) == {"cam"}
    Select(browser.driver.find_element(By.ID, "method")).select_by_value("")
    browser.js("const o = document.getElementById('opacity'); o.value = 80; o.dispatchEvent(new Event('input'));")
    assert browser.js("return getComputedStyle(document.querySelector('.step-cards img.heat')).opacity") == "0.8"
    assert browser.errors() == []
    browser.driver.set_window_size(1280, 2000)
    shot(browser, tmp_path, "report-sanity.png")


def test_keyboard(browser, report):
    from selenium.webdriver.common.action_chains import ActionChains

    browser.open(report)
    _, data = page_data(report, "camlens-sanity")
    browser.js("document.activeElement.blur()")
    ActionChains(browser.driver).send_keys("ss").perform()
    assert browser.js("return document.getElementById('step').value") == "2"
    assert shown(browser)[0][1] == data["heat"][0][2]
    ActionChains(browser.driver).send_keys("S").perform()
    assert browser.js("return document.getElementById('step').value") == "1"
    ActionChains(browser.driver).send_keys("m").perform()
    assert browser.js("return document.getElementById('method').value") == "cam"
    assert browser.errors() == []


def test_phone(browser, report, tmp_path):
    browser.open(report, width=390, height=844)
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth")
    assert browser.broken_images() == [] and browser.errors() == []
    shot(browser, tmp_path, "report-sanity-phone.png")


def edit(folder, change):
    data = json.loads((folder / "sanity.json").read_text())
    change(data)
    (folder / "sanity.json").write_text(json.dumps(data))


def test_other_version_and_unversioned(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path)
    edit(folder, lambda d: d.update(camlens="0.0.1"))
    with pytest.raises(RunError, match="made by camlens 0.0.1"):
        build_report(folder)
    edit(folder, lambda d: d.pop("camlens"))
    with pytest.raises(RunError, match="does not say which camlens"):
        build_report(folder)
    assert not (folder / "report.html").exists()


@pytest.mark.parametrize("damage", ["maps", "view", "json", "steps"])
def test_damaged_run_leaves_no_report(run_dir, tmp_path, damage):
    folder = copy_run(run_dir, tmp_path)
    if damage == "maps":
        data = (folder / "maps.npz").read_bytes()
        (folder / "maps.npz").write_bytes(data[: len(data) // 2])
    elif damage == "view":
        (folder / "view.jpg").unlink()
    elif damage == "json":
        (folder / "sanity.json").write_text('{"camlens": ')
    else:
        edit(folder, lambda d: d["methods"]["cam"]["spearman"].pop())
    with pytest.raises(RunError) as error:
        build_report(folder)
    assert "\n" not in str(error.value)
    assert not (folder / "report.html").exists()


def test_interrupted_run_is_reported_with_what_it_has(base, tmp_path, capsys, monkeypatch):
    real = command.cascading_randomisation
    calls = []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "cascading_randomisation", second_interrupted)
    out = tmp_path / "run"
    code, _, err = cli([*base, "--out", out], capsys)
    assert code == 130, err
    data = json.loads((out / "sanity.json").read_text())
    assert data["status"] == "interrupted" and list(data["methods"]) == ["cam"]
    made = build_report(out)
    assert made.status == "interrupted"
    text = made.path.read_text(encoding="utf-8")
    assert "This run was interrupted" in text and "not run: Grad-CAM++" in text


def test_html_flag_and_no_stale_report(base, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli([*base, "--out", out, "--html"], capsys)
    assert code == 0, err
    assert (out / "report.html").is_file() and "report:" in stdout
    # a later run into the same folder without --html leaves no old report beside it
    code, stdout, err = cli([*base[:-6], "-m", "gradcam", "--steps", "1", "--out", out], capsys)
    assert code == 0, err
    assert not (out / "report.html").exists()
    assert list(json.loads((out / "sanity.json").read_text())["methods"]) == ["gradcam"]
    # a run that stops before it has a method leaves the last complete results as they were, and
    # removes the report camlens made of them (its own file)
    assert cli([*base, "--out", out, "--html"], capsys)[0] == 0
    results = {name: (out / name).read_bytes() for name in ("sanity.json", "maps.npz", "view.jpg", "sanity.png")}
    code, _, err = cli([*base, "--out", out, "--class", "nosuchclass"], capsys)
    assert code != 0
    assert not (out / "report.html").exists()
    assert {name: (out / name).read_bytes() for name in results} == results


def test_report_command(run_dir, tmp_path, capsys):
    target = tmp_path / "r.html"
    code, out, err = cli(["report", run_dir, "--out", target], capsys)
    assert code == 0, err
    assert target.is_file() and "sanity report" in out


def test_float16_maps_of_earlier_runs_give_the_same_pictures(run_dir, tmp_path):
    """maps.npz is 8-bit now; a run that saved float16 maps (camlens 0.3.0 before) still reports,
    with the same map pictures."""
    folder = copy_run(run_dir, tmp_path)
    with np.load(folder / "maps.npz") as maps:
        half = {name: (maps[name].astype(np.float32) / 255).astype(np.float16) for name in maps.files}
    np.savez_compressed(folder / "maps.npz", **half)
    record = json.loads((folder / "sanity.json").read_text())
    del record["digests"]  # as those runs wrote it
    (folder / "sanity.json").write_text(json.dumps(record))
    assert build_report(folder).images == build_report(copy_run(run_dir, tmp_path / "again")).images
    before, _ = page_data(run_dir / "report.html", "camlens-sanity")
    after, _ = page_data(folder / "report.html", "camlens-sanity")
    assert len(after) == len(before)


def test_coinciding_similarity_lines_are_named_together(run_dir, tmp_path):
    """Methods whose similarities agree at every step are said to coincide under the chart, and
    their lines differ in width and dashes so that both stay visible."""
    folder = copy_run(run_dir, tmp_path)
    text = build_report(folder).path.read_text(encoding="utf-8")
    assert "their lines coincide" not in text

    def same(d):
        d["methods"]["gradcam++"]["spearman"] = [v + 1e-4 if v is not None else None
                                                 for v in d["methods"]["cam"]["spearman"]]

    edit(folder, same)
    text = build_report(folder).path.read_text(encoding="utf-8")
    assert text.count("CAM = Grad-CAM++: their lines coincide") == 1  # the Spearman chart, not SSIM's
    widths = [float(w) for w in
              re.findall(r'<polyline points="[^"]*" fill="none" stroke-width="([0-9.]+)"', text)]
    assert len(set(widths)) == 2


@pytest.mark.parametrize("width", [1280, 390])
def test_every_table_fits_or_scrolls_in_its_card(report, browser, width):
    """Issue 28, item 6: no table cut off, at a laptop's width and a phone's."""
    browser.open(report, width=width)
    browser.js("document.querySelectorAll('details').forEach(function (d) { d.open = true; });")
    assert browser.cut_off() == []


def test_verdicts_are_said_once_and_names_break_only_between_words(report, browser):
    """The verdict cell said "PASS" above "PASS: similar at ..."; the grid's row labels wrapped
    mid-word ("Grad-CAM+" / "+") (issue 28, item 6)."""
    browser.open(report, width=1280)
    cells = browser.js("return Array.from(document.querySelectorAll('#verdicts td.verdict-cell'))"
                       ".map(function (td) { return td.textContent; });")
    assert cells and all(len(re.findall(r"\b(PASS|LATE|FAIL)\b", cell)) == 1 for cell in cells), cells
    breaks = browser.js("""
        var bad = [];
        document.querySelectorAll('#grid th[scope=row], #verdicts td:first-child').forEach(function (cell) {
          var text = cell.firstChild, range = document.createRange(), top = null;
          for (var i = 0; i < text.length; i++) {
            range.setStart(text, i); range.setEnd(text, i + 1);
            var rect = range.getBoundingClientRect();
            if (top !== null && rect.top > top + 2 && !/[\\s-]/.test(text.data[i - 1])) bad.push(text.data);
            top = rect.top;
          }
        });
        return bad;""")
    assert breaks == []
