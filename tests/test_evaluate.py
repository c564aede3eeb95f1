"""camlens evaluate and camlens sanity: forward counts, resumption, boxes, bad datasets."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import camlens
from camlens.evaluate import evaluate_image, mean_interval

from conftest import count_rows, make_tiny
from helpers import SAMPLES, one_line_error, run


@pytest.mark.usefixtures("no_inference_copy")  # counts the model's own forwards
@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_no_forward_pass_runs_twice(method, images):
    """The method's own forward, one of E, and `steps` each for deletion and insertion."""
    model = make_tiny()
    explainer = camlens.get_method(method)(model, "features")
    rows, handle = count_rows(model)
    record = evaluate_image(explainer, images[0], 2, [], ["drop", "increase", "deletion", "insertion"], steps=5)
    handle.remove()
    assert sum(rows) == 1 + 1 + 5 + 5
    assert len(record["deletion_curve"]) == 6 and record["deletion_curve"][0] == pytest.approx(record["probability"], abs=1e-6)
    assert record["insertion_curve"][-1] == pytest.approx(record["probability"], abs=1e-6)


def test_mean_and_interval():
    """The bootstrap percentile interval, against an independent one: the same resamples drawn here."""
    import numpy as np

    values = [0.9, 0.1, 0.35, 0.8, 0.05, 0.6, 0.5]
    result = mean_interval(values)
    assert result["mean"] == pytest.approx(sum(values) / 7) and result["n"] == 7
    rng = np.random.default_rng(0)
    means = np.array(values)[rng.integers(0, 7, size=(2000, 7))].mean(axis=1)
    assert (result["low"], result["high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert 0.05 <= result["low"] < result["mean"] < result["high"] <= 0.9  # inside the values, so inside [0, 1]
    assert mean_interval([0.5, float("nan"), 0.7, 0.1]) == {"mean": pytest.approx(13 / 30), "low": None,
                                                          "high": None, "n": 3}  # n < 5: no interval
    assert mean_interval([]) == {"mean": None, "low": None, "high": None, "n": 0}


def test_an_interval_never_leaves_the_range_of_the_values():
    """Student's t gave 0.507 ± 4 for an AUC of two images, and 25 ± 80 for a percentage."""
    for values in ([0.0, 1.0, 1.0, 0.0, 0.02], [0.0] * 4 + [100.0], [99.0, 100.0, 100.0, 100.0, 100.0, 0.0]):
        result = mean_interval(values)
        assert min(values) <= result["low"] <= result["mean"] <= result["high"] <= max(values)


@pytest.fixture
def small_dataset(tmp_path):
    data = tmp_path / "data"
    for photo, label in (("coffee.png", "espresso"), ("chelsea.png", "tabby"), ("cameraman.png", "tripod")):
        (data / label).mkdir(parents=True)
        Image.open(SAMPLES / photo).convert("RGB").resize((256, 256)).save(data / label / photo)
    return data


ARGS = ["-m", "cam", "-m", "gradcam", "--steps", "4", "--metric", "drop", "--metric", "increase",
        "--metric", "deletion", "--metric", "insertion"]


def test_resumption_gives_the_same_table(small_dataset, tmp_path, capsys):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, out, err = run(["evaluate", small_dataset, *ARGS, "--out", whole], capsys)
    assert code == 0, err
    assert "Average Drop" in out and "Grad-CAM" in out
    code, _, err = run(["evaluate", small_dataset, *ARGS, "--out", resumed, "--limit", "1"], capsys)
    assert code == 0, err
    lines = (resumed / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Interrupted half-way through writing a third record:
    (resumed / "results.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + '{"image": "tabby/chel')
    code, _, err = run(["evaluate", small_dataset, *ARGS, "--out", resumed], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (resumed / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and len({(r["image"], r["method"]) for r in records}) == 6
    first = json.loads((whole / "summary.json").read_text())
    second = json.loads((resumed / "summary.json").read_text())
    assert first["summary"] == second["summary"]
    assert first["images"] == 3
    assert (whole / "curves.png").exists() and (whole / "metrics.png").exists()
    csv = (whole / "summary.csv").read_text().splitlines()
    assert csv[0] == "method,metric,mean,ci95_low,ci95_high,n" and len(csv) == 1 + 2 * 4


def test_box_metrics(small_dataset, tmp_path, capsys):
    boxes = tmp_path / "boxes.csv"  # image paths relative to the dataset folder
    boxes.write_text("path,xmin,ymin,xmax,ymax\nespresso/coffee.png,40,30,220,220\ntabby/chelsea.png,0,0,256,256\n"
                     "tripod/cameraman.png,500,500,600,600\n")
    code, _, err = run(["evaluate", small_dataset, "-m", "gradcam", "--steps", "2", "--boxes", boxes,
                        "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "outside the 256x256 image" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]["gradcam"]
    assert summary["energy"]["n"] == 2 and summary["pointing"]["n"] == 2
    # The whole-image box of the cat holds all the energy.
    records = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    cat = next(r for r in records if r["image"] == "tabby/chelsea.png")
    assert cat["energy"] == pytest.approx(1.0) and cat["pointing"] == 100.0


def test_bad_datasets_through_the_command_line(small_dataset, tmp_path, capsys):
    (small_dataset / "unicorn").mkdir()
    Image.new("RGB", (8, 8)).save(small_dataset / "unicorn" / "z.png")
    code, _, err = run(["evaluate", small_dataset, "--out", tmp_path / "o1"], capsys)
    one_line_error(code, err, 1, "1 label(s) the model does not know: unicorn")
    (small_dataset / "unicorn" / "z.png").unlink()
    (small_dataset / "unicorn").rmdir()
    code, _, err = run(["evaluate", small_dataset, "--metric", "energy", "--out", tmp_path / "o2"], capsys)
    one_line_error(code, err, 1, "localisation metrics need boxes")
    (small_dataset / "tripod" / "broken.png").write_bytes(b"\x89PNG broken")
    code, _, err = run(["evaluate", small_dataset, "-m", "cam", "--steps", "2", "--out", tmp_path / "o3"], capsys)
    assert code == 1
    assert "broken.png: unreadable image" in err
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["images"] == 3
    code, _, err = run(["evaluate", tmp_path / "nothing", "--out", tmp_path / "o4"], capsys)
    one_line_error(code, err, 1, "no such dataset")


def test_sanity_command(tmp_path, capsys):
    """Grad-CAM changes as soon as the classifier is randomised; Grad-CAM++ stays similar
    through most of the cascade and must not PASS on its last step alone (issue 7)."""
    code, out, err = run(["sanity", SAMPLES / "coffee.png", "-m", "gradcam", "-m", "gradcam++", "--out", tmp_path],
                         capsys)
    assert code == 0, err
    assert err.startswith("camlens sanity: 2 method(s) x 22 maps (trained + 21 steps) = 44 explanations, "
                          "about 44 forward passes; estimated about ")
    report = json.loads((tmp_path / "sanity.json").read_text())
    assert report["skipped_methods"] == {} and report["seconds"]["maps_estimated"] > 0
    assert report["class_name"] == "espresso"
    assert report["groups"][0] == "_fc" and report["groups"][-1] == "_conv_stem" and len(report["groups"]) == 21
    assert report["steps"] == report["groups"]
    gradcam, gradcampp = report["methods"]["gradcam"], report["methods"]["gradcam++"]
    assert len(gradcam["spearman"]) == 21 and gradcam["passed"] and gradcam["verdict"] == "PASS"
    assert gradcam["similar_steps"] == 0 and gradcam["changed_from"] == "_fc"
    assert all(v is None or v < 0.5 for v in gradcam["spearman"])
    assert gradcampp["verdict"] == "LATE" and not gradcampp["passed"]
    assert gradcampp["similar_steps"] == sum(v is not None and v >= 0.5 for v in gradcampp["spearman"]) > 0.25 * 21
    assert gradcampp["final_spearman"] < 0.5
    text = " ".join(out.split())
    assert "PASS: similar at 0/21 steps" in text and f"LATE: similar at {gradcampp['similar_steps']}/21 steps" in text
    assert (tmp_path / "sanity.png").exists() and (tmp_path / "similarity.png").exists()


def test_sanity_flags_a_method_that_ignores_the_weights(tmp_path, monkeypatch, capsys):
    """A 'method' whose map is the input's brightness passes through every randomisation unchanged."""
    from camlens.methods import METHODS

    class Brightness(camlens.GradCAM):
        name = "brightness"
        display_name = "Brightness"

        def __call__(self, images, targets=None, **kwargs):
            result = super().__call__(images, targets, **kwargs)
            result.maps = images.mean(dim=1, keepdim=True)
            return result

    monkeypatch.setitem(METHODS, "brightness", Brightness)
    code, out, err = run(["sanity", SAMPLES / "coffee.png", "-m", "brightness", "--out", tmp_path], capsys)
    assert code == 0, err
    assert "FAIL: still similar with every layer randomised" in " ".join(out.split())
    result = json.loads((tmp_path / "sanity.json").read_text())["methods"]["brightness"]
    assert not result["passed"] and result["verdict"] == "FAIL"
    assert result["similar_steps"] == 21 and result["changed_from"] is None
    assert result["spearman"] == [pytest.approx(1.0)] * 21
