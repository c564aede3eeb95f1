"""`camlens report` of a train-ggam run, and the example maps `camlens train-ggam` saves for it:
checked in a real browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens
from camlens import __version__
from camlens.io import load_image
from camlens.ggam.run import load_run
from camlens.ggam.train import _example_indices
from camlens.report import RunError, build_report
from helpers import assert_offline, copy_run, ggam_args, ggam_data, page_data, shot
from helpers import run as cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ggam_data(tmp_path_factory.mktemp("data"))


def args(data, out, *extra):
    return ggam_args(data, out, "--freeze-backbone", *extra)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ggam") / "run"
    code, _, _ = cli(args(data, out, "--html"))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    return run_dir / "report.html"


def test_example_indices_take_each_class_in_turn():
    assert _example_indices([0, 0, 1, 2, 2, 1], 4) == [0, 1, 2, 3]
    assert _example_indices([1, 1, 1], 2) == [0, 1]
    assert _example_indices([], 6) == []


def test_examples_are_the_kept_models_grad_cam(run_dir):
    facts = json.loads((run_dir / "examples" / "examples.json").read_text())
    images = facts["images"]
    assert len(images) == 3 and sorted(e["label_name"] for e in images) == ["circle", "square", "stripe"]
    with np.load(run_dir / "examples" / "maps.npz") as saved:
        maps = saved["maps"]
    assert maps.shape == (3, 2, 64, 64) and maps.dtype == np.float16
    # Independently: the kept model loaded as `explain --model` loads it, explained on the full
    # images (the run computed them on the frozen backbone's features, through the head only).
    loaded = load_run(run_dir)
    x = torch.stack([loaded.preprocess(load_image(Path(e["input"]))) for e in images])
    with torch.no_grad():
        probabilities = loaded.module(x).softmax(dim=1)
    assert [int(p.argmax()) for p in probabilities] == [e["predicted"] for e in images]
    for e, p in zip(images, probabilities):
        assert p[e["predicted"]].item() == pytest.approx(e["probability"], abs=1e-4)
    for k, key in enumerate(("label", "predicted")):
        expected = camlens.explain(loaded.module, x, "gradcam", targets=[e[key] for e in images]).maps[:, 0]
        np.testing.assert_allclose(maps[:, k].astype(np.float64), expected.numpy(), atol=2e-3)


def test_report_is_self_contained_and_shows_the_history(report, run_dir):
    text = report.read_text(encoding="utf-8")
    assert_offline(text)
    store, data = page_data(report, "camlens-ggam")
    assert len(set(store.values())) == len(store)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert text.count("<polyline") == 5  # 3 losses + 2 accuracies, one line each (no gaps)
    assert text.count('<tr class="best">') + text.count("<tr>") - 1 == len(history)
    assert len(data["heat"]) == 3 and all(len(h) == 2 for h in data["heat"])


def test_in_browser(browser, report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.open(report)
    assert browser.errors() == []
    assert browser.broken_images() == [] and browser.store_loads() == []
    _, data = page_data(report, "camlens-ggam")
    shown = lambda: browser.js("""return Array.from(document.querySelectorAll('article.example img.heat'))
        .map(img => img.getAttribute('data-shown'));""")
    assert shown() == [h[0] for h in data["heat"]]
    Select(browser.driver.find_element(By.ID, "target")).select_by_value("1")
    assert shown() == [h[1] for h in data["heat"]]
    assert "predicted class" in browser.driver.find_element(By.CSS_SELECTOR, ".map-of").text
    assert browser.broken_images() == [] and browser.errors() == []
    browser.driver.find_element(By.CSS_SELECTOR, "details.facts summary").click()  # the history table
    browser.driver.set_window_size(1280, 1800)
    shot(browser, tmp_path, "report-train-ggam.png")
    browser.open(report, width=390, height=844)
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth")
    assert browser.errors() == []


def test_other_version(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path)
    record = json.loads((folder / "run.json").read_text())
    record["camlens version"] = "0.0.1"
    (folder / "run.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match="made by camlens 0.0.1"):
        build_report(folder)
    assert not (folder / "report.html").exists()


def test_unfinished_run_is_reported_as_interrupted(run_dir, tmp_path):
    folder = copy_run(run_dir, tmp_path)
    record = json.loads((folder / "run.json").read_text())
    record["status"] = "interrupted"
    (folder / "run.json").write_text(json.dumps(record))
    shutil.rmtree(folder / "examples")
    made = build_report(folder)
    assert made.status == "interrupted" and made.kind == "train_ggam"
    assert "did not finish" in made.path.read_text(encoding="utf-8")
    # finished, but stopped before its examples: said too
    record["status"] = "finished"
    (folder / "run.json").write_text(json.dumps(record))
    assert build_report(folder).status == "interrupted"


@pytest.mark.parametrize("damage", ["maps", "view", "history", "no run.json"])
def test_damaged_run_leaves_no_report(run_dir, tmp_path, damage):
    folder = copy_run(run_dir, tmp_path)
    if damage == "maps":
        data = (folder / "examples" / "maps.npz").read_bytes()
        (folder / "examples" / "maps.npz").write_bytes(data[: len(data) // 2])
    elif damage == "view":
        (folder / "examples" / "view-0.jpg").unlink()
    elif damage == "history":
        (folder / "history.jsonl").unlink()
    else:
        (folder / "run.json").unlink()
    with pytest.raises(RunError) as error:
        build_report(folder)
    assert "\n" not in str(error.value)
    assert not (folder / "report.html").exists()


def test_resume_removes_the_old_report(data, run_dir, tmp_path, capsys):
    folder = copy_run(run_dir, tmp_path)
    (folder / "report.html").write_text("old")
    code, _, err = cli(args(data, folder, "--resume", "--epochs", "3"), capsys)
    assert code == 0, err
    assert not (folder / "report.html").exists() and (folder / "examples" / "examples.json").is_file()
    assert json.loads((folder / "examples" / "examples.json").read_text())["epoch"] in (1, 2, 3)
    assert __version__ == json.loads((folder / "run.json").read_text())["camlens version"]
