"""`camlens report` of an explain run: a self-contained file, checked in a real browser."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from camlens import __version__
from camlens.cli import main
from camlens.report import RunError, build_report
from helpers import SAMPLES, assert_offline, copy_run, page_script, shot
from helpers import run as cli


def explain(args):
    try:
        main(["explain", *map(str, args)])
    except SystemExit as done:
        assert not done.code, done.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two photos, three fast methods, the two most probable classes each."""
    out = tmp_path_factory.mktemp("explain") / "run"
    explain([SAMPLES / "chelsea.png", SAMPLES / "coffee.png", "-m", "gradcam", "-m", "gradcam++", "-m", "cam",
             "--top-k", "2", "--out", out])
    return out


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    built = build_report(run_dir, path)
    assert built.path == path and built.kind == "explain" and built.status == "complete"
    return path


class Resources(HTMLParser):
    """Every URL the page would fetch: src and href attributes, and url(...) in its styles."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value:
                self.urls.append(value)


def test_self_contained(report):
    text = report.read_text(encoding="utf-8")
    parser = Resources()
    parser.feed(text)
    assert parser.urls == [], parser.urls  # images come from the embedded store, not from URLs
    assert "link" not in parser.tags and "iframe" not in parser.tags
    assert_offline(text)


def test_every_picture_stored_once(report, run_dir):
    text = report.read_text(encoding="utf-8")
    store = page_script(text)
    # a photo per image, a map per image, method and class (2 + 2 x 3 x 2), but CAM's maps are
    # Grad-CAM's on this network (it pools globally before its one linear layer): stored once; and
    # the colour bar
    assert len(store) == 2 + 2 * 2 * 2 + 1
    assert len(set(store.values())) == len(store)
    for uri in store.values():
        assert text.count(uri) == 1


def test_maps_are_the_runs_maps(report, run_dir):
    """The map shown for (image, method, class) is that run's map: its hottest region is where
    the stored map's is."""
    from camlens.report.common import ImageStore
    from camlens.report.explain import load

    store = ImageStore()
    context = load(run_dir, store)
    import base64
    import io

    for image in context["images"]:
        maps = np.load(run_dir / image["output"] / "maps.npz")
        for method, refs in image["heat"].items():
            assert len(refs) == 2
            for k, ref in enumerate(refs):
                data = base64.b64decode(store.images[ref].split(",", 1)[1])
                shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
                from camlens.render import colorize

                expected = np.asarray(Image.fromarray(colorize(maps[f"{method}/maps"][k])).resize(
                    shown.shape[1::-1], Image.Resampling.BILINEAR), dtype=float)
                assert np.abs(shown - expected).mean() < 6  # JPEG and resampling, nothing more


def test_in_browser(browser, report, tmp_path):
    browser.open(report)
    assert browser.errors() == []
    assert browser.broken_images() == []
    assert browser.store_loads() == []
    shown = "return document.querySelector('#image-0 figure[data-role=main] img.heat').getAttribute('data-shown')"
    caption = "return document.querySelector('#image-0 figure[data-role=main] figcaption').textContent"
    assert browser.js(caption).startswith("Grad-CAM · tiger cat")
    first = browser.js(shown)

    # the method control changes the map and its caption
    browser.js("const s = document.getElementById('method'); s.value = 'gradcam++'; s.dispatchEvent(new Event('change'))")
    assert browser.js(shown) != first and browser.js(caption).startswith("Grad-CAM++ · ")

    # the class control shows the second class's map
    before = browser.js(shown)
    browser.js("const s = document.getElementById('target'); s.value = '1'; s.dispatchEvent(new Event('change'))")
    assert browser.js(shown) != before and "Egyptian cat" in browser.js(caption)

    # compare: a second panel with the other method, side by side
    compare = "document.querySelector('#image-0 figure[data-role=compare]')"
    assert browser.js(f"return {compare}.hidden")
    browser.js("const s = document.getElementById('compare'); s.value = 'cam'; s.dispatchEvent(new Event('change'))")
    assert not browser.js(f"return {compare}.hidden")
    assert browser.js(f"return {compare}.querySelector('figcaption').textContent").startswith("CAM · ")
    left, right = browser.js(f"""const a = document.querySelector('#image-0 figure[data-role=main]').getBoundingClientRect();
                                 const b = {compare}.getBoundingClientRect(); return [a.right, b.left];""")
    assert left <= right  # beside it, not below
    assert browser.broken_images() == []

    # opacity
    browser.js("const r = document.getElementById('opacity'); r.value = '80'; r.dispatchEvent(new Event('input'))")
    opacity = "return getComputedStyle(document.querySelector('#image-0 img.heat')).opacity"
    assert float(browser.js(opacity)) == pytest.approx(0.8)
    shot(browser, tmp_path, "report-explain.png")
    assert browser.errors() == []


def test_keyboard(browser, report):
    from selenium.webdriver.common.by import By

    browser.open(report)
    body = browser.driver.find_element(By.TAG_NAME, "body")
    method = "return document.getElementById('method').value"
    assert browser.js(method) == "gradcam"
    body.send_keys("m")
    assert browser.js(method) == "gradcam++"
    body.send_keys("M")
    assert browser.js(method) == "gradcam"
    body.send_keys("]")
    assert browser.js("return document.getElementById('opacity').value") == "60"
    body.send_keys("c")
    assert not browser.js("return document.querySelector('#image-0 figure[data-role=compare]').hidden")
    body.send_keys("j")
    assert browser.js("return document.activeElement.id") == "image-1"
    # the controls are reachable with Tab, and a select works from the keyboard
    assert browser.js("return document.getElementById('method').tabIndex") >= 0
    assert browser.errors() == []


def test_phone(browser, report, tmp_path):
    browser.open(report, width=390, height=844)
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert browser.broken_images() == []
    browser.js("const s = document.getElementById('compare'); s.value = 'cam'; s.dispatchEvent(new Event('change'))")
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot(browser, tmp_path, "report-explain-phone.png")
    assert browser.errors() == []


# --- bad input ------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        build_report(tmp_path / "nothing")


def test_not_a_run(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(RunError, match="not a camlens run folder"):
        build_report(tmp_path)
    with pytest.raises(RunError, match="not a directory"):
        build_report(tmp_path / "a.txt")


def test_other_version(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["camlens"] = "0.2.0"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=rf"made by camlens 0\.2\.0; this is camlens {__version__}"):
        build_report(run)
    del manifest["camlens"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="does not say which camlens made it"):
        build_report(run)
    assert not (run / "report.html").exists()


def test_interrupted_with_manifest(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    manifest["images"] = manifest["images"][:1]
    (run / "manifest.json").write_text(json.dumps(manifest))
    built = build_report(run)
    assert built.status == "interrupted"
    text = built.path.read_text()
    assert "This run was interrupted" in text and "chelsea.png" in text and "coffee.png" not in text


def test_killed_without_manifest(run_dir, tmp_path):
    """A run killed outright has no manifest: its finished folders are reported, as interrupted."""
    run = copy_run(run_dir, tmp_path)
    (run / "manifest.json").unlink()
    shutil.rmtree(run / "coffee")
    built = build_report(run)
    assert built.status == "interrupted"
    text = built.path.read_text()
    assert "interrupted before it wrote manifest.json" in text and "chelsea.png" in text


def test_damaged_maps_leave_no_report(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "report.html").write_text("the old report")
    data = (run / "coffee" / "maps.npz").read_bytes()
    (run / "coffee" / "maps.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"maps\.npz: cannot be read"):
        build_report(run)
    assert (run / "report.html").read_text() == "the old report"  # untouched, never half-written
    assert not list(run.glob(".camlens-partial-*"))


def test_missing_view(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "chelsea" / "view.jpg").unlink()
    with pytest.raises(RunError, match=r"view\.jpg: missing"):
        build_report(run)


def test_report_while_running(run_dir, tmp_path):
    from filelock import FileLock

    run = copy_run(run_dir, tmp_path)
    with FileLock(run / ".camlens-lock"):
        with pytest.raises(RunError, match="writing to it now"):
            build_report(run)


# --- the command line ---------------------------------------------------------------------------


def test_report_command(run_dir, tmp_path, capsys):
    target = tmp_path / "r.html"
    code, out, err = cli(["report", run_dir, "--out", target], capsys)
    assert code == 0, err
    assert target.is_file() and "explain report" in out
    code, out, err = cli(["report", tmp_path / "nowhere"], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "no such directory" in err and "Traceback" not in err


def test_html_flag_and_no_stale_report(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(["explain", SAMPLES / "coffee.png", "-m", "gradcam", "--out", out, "--html"], capsys)
    assert code == 0, err
    assert (out / "report.html").is_file() and "report:" in stdout
    # a later run into the same folder without --html does not leave the old report beside it
    code, stdout, err = cli(["explain", SAMPLES / "chelsea.png", "-m", "cam", "--out", out], capsys)
    assert code == 0, err
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("width", [1280, 390])
def test_every_table_fits_or_scrolls_in_its_card(report, browser, width):
    """Issue 28, item 6: no table cut off, at a laptop's width and a phone's."""
    browser.open(report, width=width)
    browser.js("document.querySelectorAll('details').forEach(function (d) { d.open = true; });")
    assert browser.cut_off() == []


def test_the_maps_have_a_colour_bar_that_says_what_it_means(report, browser):
    """The header only said "coloured with jet" (issue 28, item 6)."""
    browser.open(report, width=1280)
    bar = browser.js("var img = document.querySelector('.colourbar img'); return img && "
                     "[img.complete && img.naturalWidth, img.alt, img.closest('p').textContent];")
    assert bar and bar[0] == 256
    assert bar[1].startswith("colour scale of the maps (") and "from 0 on the left to 1 on the right" in bar[1]
    assert "0: the least" in bar[2] and "1: the most that map's method credits with the class" in bar[2]
    assert browser.broken_images() == []
