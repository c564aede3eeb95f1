"""The HTML reports as a user interface, in Chromium: keyboard moves through every image, what
is scrolled to is not hidden under the sticky toolbar, a phone keeps room for the pictures and
shows a comparison side by side, the page without JavaScript shows no dead controls or broken
pictures, the maps have alt text, and the train-ggam charts stay readable on a phone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens.cli import main
from camlens.report import build_report
from helpers import NET_MODELS, random_photo

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHONE = (390, 844)
LAPTOP = (1280, 800)


def run(args):
    try:
        main([str(a) for a in args])
    except SystemExit as done:
        assert not done.code, done.code


@pytest.fixture(scope="module")
def explain_report(tmp_path_factory):
    """Four photos (two rows of cards on a laptop), three methods, two classes each."""
    out = tmp_path_factory.mktemp("ui-explain") / "run"
    run(["explain", *(SAMPLES / n for n in ("cameraman.png", "chelsea.png", "coffee.png", "rocket.jpg")),
         "-m", "gradcam", "-m", "gradcam++", "-m", "cam", "--top-k", "2", "--out", out, "--html"])
    return out / "report.html"


def press(browser, keys, element=None):
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(browser.driver)
    if element is not None:
        chain = chain.send_keys_to_element(element, keys)
    else:
        chain = chain.send_keys(keys)
    chain.perform()


def active_card(browser):
    return browser.js("return document.activeElement.id")


def test_j_and_k_visit_every_image_in_a_grid(browser, explain_report):
    """Cards side by side share their top: j went 0 -> 1 -> 3 (never 2) and k stopped at 1."""
    browser.open(explain_report, *LAPTOP)
    columns = browser.js("""const tops = Array.from(document.querySelectorAll('article.card'))
                              .map(c => c.getBoundingClientRect().top); return tops.filter(t => t === tops[0]).length""")
    assert columns >= 2  # the case of the fault: more than one card per row
    seen = []
    for _ in range(4):
        press(browser, "j")
        seen.append(active_card(browser))
    assert seen == ["image-1", "image-2", "image-3", "image-3"]
    seen = []
    for _ in range(4):
        press(browser, "k")
        seen.append(active_card(browser))
    assert seen == ["image-2", "image-1", "image-0", "image-0"]
    assert browser.errors() == []


@pytest.mark.parametrize("size", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_the_image_j_goes_to_is_not_under_the_toolbar(browser, explain_report, size):
    """On a phone the sticky toolbar is taller than the 4rem the cards kept free above them: the
    image's name was hidden under it."""
    browser.open(explain_report, *size)
    for _ in range(3):
        press(browser, "j")
        toolbar, heading = browser.js("""return [document.querySelector('.toolbar').getBoundingClientRect().bottom,
                                                 document.activeElement.querySelector('h2').getBoundingClientRect().top]""")
        assert heading >= toolbar, (active_card(browser), heading, toolbar)
    assert browser.errors() == []


def test_phone_toolbar_leaves_room_for_the_pictures(browser, explain_report):
    browser.open(explain_report, *PHONE)
    height, window = browser.js("return [document.querySelector('.toolbar').offsetHeight, window.innerHeight]")
    assert height <= 0.15 * window, (height, window)  # it was 145 px of 701, a fifth of the screen
    # every control still there and inside the screen
    for name in ("method", "compare", "target", "opacity"):
        left, right = browser.js(f"const r = document.getElementById('{name}').getBoundingClientRect(); return [r.left, r.right]")
        assert 0 <= left and right <= browser.js("return document.documentElement.clientWidth"), name
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_phone_compares_side_by_side(browser, explain_report):
    """Compare stacked the two maps one above the other on a phone, one screen each."""
    browser.open(explain_report, *PHONE)
    browser.js("const s = document.getElementById('compare'); s.value = 'cam'; s.dispatchEvent(new Event('change'))")
    main_, other = browser.js("""const f = s => document.querySelector('#image-0 figure[data-role=' + s + ']').getBoundingClientRect();
                                 const a = f('main'), b = f('compare'); return [[a.left, a.right, a.top], [b.left, b.right, b.top]]""")
    assert main_[1] <= other[0] and main_[2] == other[2]
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert browser.broken_images() == []


def test_maps_have_alt_text_that_follows_the_controls(browser, explain_report):
    browser.open(explain_report, *LAPTOP)
    alt = "return document.querySelector('#image-1 figure[data-role=main] img.heat').alt"
    assert browser.js(alt) == "Grad-CAM map of tiger cat"
    browser.js("const s = document.getElementById('method'); s.value = 'gradcam++'; s.dispatchEvent(new Event('change'))")
    browser.js("const s = document.getElementById('target'); s.value = '1'; s.dispatchEvent(new Event('change'))")
    assert browser.js(alt) == "Grad-CAM++ map of Egyptian cat"
    assert all(browser.js("return Array.from(document.images).filter(i => !i.hidden).map(i => i.alt.length > 0)"))


def test_shift_t_and_no_shortcuts_while_in_a_control(browser, explain_report):
    from selenium.webdriver.common.by import By

    browser.open(explain_report, *LAPTOP)
    target = "return document.getElementById('target').value"
    press(browser, "t")
    assert browser.js(target) == "1"
    press(browser, "T")
    assert browser.js(target) == "0"
    press(browser, "T")
    assert browser.js(target) == "1"  # round the list
    # typing in a select or on the slider is the control's own business
    method = browser.driver.find_element(By.ID, "method")
    press(browser, "c", method)
    assert browser.js("return document.getElementById('compare').value") == ""
    opacity = browser.driver.find_element(By.ID, "opacity")
    press(browser, "]", opacity)
    assert browser.js("return document.getElementById('opacity').value") == "50"
    assert browser.errors() == []


def test_without_javascript(browser, explain_report, tmp_path):
    """No script: the note says so, the controls that cannot work are not shown, nor are boxes of
    pictures that cannot load; the names, the predictions and the run's facts are."""
    driver = browser.driver
    driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.open(explain_report, *LAPTOP)
        from selenium.webdriver.common.by import By

        assert not driver.find_element(By.CSS_SELECTOR, ".toolbar").is_displayed()
        assert not any(img.is_displayed() for img in driver.find_elements(By.TAG_NAME, "img"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "needs JavaScript" in body and "chelsea.png" in body and "tiger cat 0.385" in body
        assert "Run facts" in body
        shot = np.asarray(Image.open(browser.screenshot(tmp_path / "nojs.png")).convert("L"), dtype=float)
        assert shot.std() > 10
    finally:
        driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
    browser.open(explain_report, *LAPTOP)
    assert browser.js("return document.querySelector('.toolbar').offsetHeight") > 0
    assert browser.broken_images() == []


# --- train-ggam: the charts on a phone -------------------------------------------------------


@pytest.fixture(scope="module")
def ggam_report(tmp_path_factory):
    from test_ggam_train import make_split

    root = tmp_path_factory.mktemp("ui-ggam")
    train, val = make_split(root / "train", 2, 0), make_split(root / "val", 1, 1)
    run(["train-ggam", train, "--val-data", val, "--val-boxes", val / "boxes.csv", "--out", root / "run",
         "--epochs", "2", "--batch-size", "4", "--input-size", "64", "--resize", "64", "--no-pretrained",
         "--device", "cpu", "--seed", "3", "--freeze-backbone", "--html"])
    return root / "run" / "report.html"


@pytest.mark.parametrize("size", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_ggam_chart_labels_readable_and_inside(browser, ggam_report, size):
    """The charts are 640 units wide, scaled to the page: on a phone their labels were 6 px high."""
    browser.open(ggam_report, *size)
    boxes = browser.js("""return Array.from(document.querySelectorAll('svg.curve')).map(svg => {
        const s = svg.getBoundingClientRect();
        return Array.from(svg.querySelectorAll('text')).map(t => { const r = t.getBoundingClientRect();
          return [r.height, r.left - s.left, s.right - r.right, r.top - s.top, s.bottom - r.bottom, t.textContent]; }); })""")
    assert boxes and all(boxes)
    for chart in boxes:
        for height, left, right, top, bottom, text in chart:
            assert height >= 9, (text, height)  # about 11 px font or more
            assert min(left, right, top, bottom) >= -0.5, text  # not cut off at the chart's edge
    assert browser.errors() == []


# --- the toolbar's height is kept free for every report that scrolls to something ------------


@pytest.fixture(scope="module")
def sanity_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-sanity")
    (folder / "ui_sanity_models.py").write_text(NET_MODELS)
    sys.path.insert(0, str(folder))
    photo = random_photo(folder / "photo.png", 40, 48)
    try:
        run(["sanity", photo, "--model", "ui_sanity_models:net", "--input-size", "32", "-m", "cam",
             "-m", "gradcam++", "--steps", "2", "--out", folder / "run"])
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("ui_sanity_models", None)
    return build_report(folder / "run").path


@pytest.mark.parametrize("size", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_sanity_step_button_scrolls_its_maps_below_the_toolbar(browser, sanity_report, size):
    browser.open(sanity_report, *size)
    browser.js("document.querySelectorAll('#grid button[data-step]')[1].click()")
    toolbar, title = browser.js("""return [document.querySelector('.toolbar').getBoundingClientRect().bottom,
                                           document.getElementById('step-title').getBoundingClientRect().top]""")
    assert title >= toolbar, (title, toolbar)
    assert browser.errors() == []
