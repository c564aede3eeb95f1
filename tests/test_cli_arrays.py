"""`camlens explain` on arrays (issue 23, item 2): signals, volumes and clips from .npy and .npz
files, their figures and maps against the Python API's, the report drawn from what the run saved,
and hostile array files refused in one line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import model_module, one_line_error, run

import camlens
from camlens.cli.common import MARKER
from camlens.errors import CamlensError
from camlens.io import load_array

MODELS = """
import torch
from torch import nn


def signal():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def volume():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv3d(5, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


class Frames(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, clips):
        n, c, t, h, w = clips.shape
        maps = self.backbone(clips.transpose(1, 2).reshape(n * t, c, h, w))
        return self.head(maps.unflatten(0, (n, t)).mean(dim=(1, 3, 4)))


def clip():
    return Frames().eval()
"""


@pytest.fixture
def models(tmp_path, monkeypatch):
    model_module(tmp_path, "arraynets", MODELS, monkeypatch)
    import arraynets

    return arraynets


def saved(folder):
    with np.load(folder / "maps.npz", allow_pickle=False) as data:
        return dict(data)


@pytest.mark.parametrize("kind, factory, shape, suffix", [
    ("signal", "signal", (2, 50), ".npy"),
    ("volume", "volume", (1, 6, 9, 8), ".npz"),
    ("clip", "clip", (3, 4, 10, 12), ".npy"),
])
def test_an_array_is_explained_as_the_python_api_explains_it(tmp_path, capsys, models, kind, factory, shape, suffix):
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / f"input{suffix}"
    if suffix == ".npz":
        np.savez(path, anything=values)
    else:
        np.save(path, values)
    out = tmp_path / "out"
    code, stdout, err = run(["explain", path, "--model", f"arraynets:{factory}", "-m", "gradcam", "-m", "scorecam",
                             "--out", out, "--html"], capsys)
    assert code == 0, err
    folder = out / "input"
    manifest = json.loads((out / "manifest.json").read_text())
    (record,) = manifest["images"]
    assert record["files"]["kind"] == kind
    assert record["size"] == list(shape[1:])
    assert sorted(os.listdir(folder)) == sorted(["comparison.png", "maps.npz", "view.png", MARKER,
                                                 *(f"{m}_1_{record['targets'][0]['name'].replace(' ', '-')}.png"
                                                   for m in ("gradcam", "scorecam"))])
    arrays = saved(folder)
    model = getattr(models, factory)()
    x = torch.from_numpy(values)[None]
    for method in ("gradcam", "scorecam"):
        expected = camlens.explain(model, x, method)
        assert arrays[f"{method}/maps"].shape == (1, *shape[1:])  # one map per target, of the input's shape
        assert np.allclose(arrays[f"{method}/maps"], expected.maps[0].numpy(), atol=1e-6)
        assert record["targets"][0]["class"] == int(expected.targets[0, 0])
    assert np.array_equal(arrays["input"], values)
    report = (out / "report.html").read_text()
    assert "Grad-CAM" in report and "data:image/" in report


def test_a_folder_gives_its_arrays_and_images_beside(tmp_path, capsys, models):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(2):
        np.save(data / f"s{index}.npy", np.random.default_rng(index).normal(size=(2, 40)))
    (data / "notes.txt").write_text("not an input")
    code, stdout, err = run(["explain", data, "--model", "arraynets:signal", "-m", "gradcam", "--out",
                             tmp_path / "out"], capsys)
    assert code == 0, err
    assert "skipped (not an image or array file)" in err and "notes.txt" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["s0", "s1"]


def hostile(tmp_path):
    cases = {}
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases["objects.npy"] = r"holds object values; an input is real numbers \(bool, int or float\)"
    np.save(tmp_path / "complex.npy", np.ones((2, 8), dtype=np.complex64))
    cases["complex.npy"] = r"holds complex64 values"
    np.savez(tmp_path / "two.npz", a=np.ones((2, 8)), b=np.ones((2, 8)))
    cases["two.npz"] = r"holds 2 arrays \(a, b\); camlens takes one input per file"
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]]))
    cases["nan.npy"] = r"holds NaN or infinite values"
    np.save(tmp_path / "batch.npy", np.ones((1, 1, 2, 3, 4)))
    cases["batch.npy"] = r"an array of shape \(1, 1, 2, 3, 4\); an input is one signal \(C, L\)"
    np.save(tmp_path / "empty.npy", np.ones((2, 0)))
    cases["empty.npy"] = r"an array of shape \(2, 0\)"
    whole = (tmp_path / "nan.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:-8])  # the header declares more data than the file holds
    cases["cut.npy"] = r"declares 48 bytes of data but holds 40 \(damaged\)"
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    cases["junk.npz"] = r"not a .npz file"
    (tmp_path / "text.npy").write_bytes(b"hello")
    cases["text.npy"] = r"cannot be read as an array"
    return cases


def test_hostile_array_files_are_refused_in_one_line(tmp_path, capsys, models):
    for name, message in hostile(tmp_path).items():
        code, stdout, err = run(["explain", tmp_path / name, "--model", "arraynets:signal", "-m", "gradcam",
                                 "--out", tmp_path / "out"], capsys)
        one_line_error(code, err, 1, f"camlens: error: nothing to explain: {tmp_path / name}: ")
        assert re.search(message, err) and not (tmp_path / "out").exists()  # said before any output
        with pytest.raises(CamlensError, match=rf"^{tmp_path / name}: {message}"):
            load_array(tmp_path / name)


def test_the_report_refuses_an_input_array_it_would_not_draw(tmp_path, capsys, models):
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(2, 30)))
    out = tmp_path / "out"
    assert run(["explain", tmp_path / "s.npy", "--model", "arraynets:signal", "-m", "gradcam", "--out", out],
               capsys)[0] == 0
    arrays = saved(out / "s")
    arrays["input"] = np.ones((2, 31))  # no longer the maps' shape
    np.savez_compressed(out / "s" / "maps.npz", **arrays)
    code, stdout, err = run(["report", out], capsys)
    assert code != 0 and "Traceback" not in err
    assert "gradcam's maps have shape (1, 30), not one per target (1) of the input's (31,)" in err


def test_the_report_of_signals_lays_each_figure_over_the_signal_alone(tmp_path, capsys, models, browser):
    """In a real browser: the signal alone and each method's figure are the same picture but for the
    map, so that the opacity slider fades the map in and out over the signal."""
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(2, 60)))
    out = tmp_path / "out"
    assert run(["explain", tmp_path / "s.npy", "--model", "arraynets:signal", "-m", "gradcam", "-m", "scorecam",
                "--out", out, "--html"], capsys)[0] == 0
    browser.open(out / "report.html")
    assert browser.errors() == [] and browser.broken_images() == []
    sizes = browser.js("""const f = document.querySelector('#image-0 figure[data-role=main]');
        const p = f.querySelector('img.photo'), h = f.querySelector('img.heat');
        return [p.naturalWidth / p.naturalHeight, h.naturalWidth / h.naturalHeight,
                p.getBoundingClientRect().width, h.getBoundingClientRect().width, h.getAttribute('data-shown')];""")
    assert sizes[0] == pytest.approx(sizes[1], rel=0.01) and sizes[2] == pytest.approx(sizes[3], abs=1)
    assert sizes[4]


def test_evaluate_measures_signals_as_the_metrics_do_on_each(tmp_path, capsys, models):
    """`camlens evaluate` on class folders of .npy signals: each record's Average Drop, Increase,
    deletion and insertion areas equal the metrics computed on the signal by the Python API."""
    from camlens.metrics import area_under_curve
    from camlens.metrics.faithfulness import deletion_curve, drop_and_increase, insertion_curve

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("0", "2"):
        (data / label).mkdir(parents=True)
        for index in range(2):
            np.save(data / label / f"{index}.npy", rng.normal(size=(2, 40)).astype(np.float32))
    out = tmp_path / "out"
    code, stdout, err = run(["evaluate", data, "--model", "arraynets:signal", "-m", "gradcam", "--steps", "4",
                             "--out", out, "--html"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["kind"] for r in records} == {"signal"}
    model = models.signal()
    for record in records:
        x = torch.from_numpy(np.load(data / record["image"]))[None]
        label = torch.tensor([record["label"]])
        explanation = camlens.GradCAM(model)(x, label)
        maps = explanation.maps[:, 0]
        drop = drop_and_increase(model, x, maps, label)
        assert record["drop"] == pytest.approx(float(drop["drop"][0]), abs=1e-4)
        assert record["increase"] == pytest.approx(float(drop["increase"][0]))
        assert record["deletion"] == pytest.approx(float(area_under_curve(deletion_curve(model, x, maps, label, 4))[0]),
                                                   abs=1e-5)
        assert record["insertion"] == pytest.approx(
            float(area_under_curve(insertion_curve(model, x, maps, label, 4))[0]), abs=1e-5)
    report = (out / "report.html").read_text()
    assert "4 input(s) are arrays (signals, volumes or clips)" in report


def test_layers_and_methods_trace_a_signal_model_on_an_example(tmp_path, capsys, models):
    np.save(tmp_path / "s.npy", np.zeros((2, 40), dtype=np.float32))
    code, stdout, err = run(["layers", "--model", "arraynets:signal"], capsys)
    one_line_error(code, err, 1, "the model takes (N, C, L) signals (its first convolution is 1-D), not photos: give "
                                 "--example FILE.npy")
    code, stdout, err = run(["layers", "--model", "arraynets:signal", "--example", tmp_path / "s.npy"], capsys)
    assert code == 0, err
    assert "input 2x40" in stdout and "output (C x L)" in stdout and "8x20" in stdout
    assert "default target layer: 3: the last feature map (N, C, l) of more than one position" in err
    code, stdout, err = run(["methods", "--model", "arraynets:signal", "--example", tmp_path / "s.npy"], capsys)
    assert code == 0, err
    # Recipro-CAM: one pass after the layer per position (20) and two for its check of the cut.
    assert "(8 channels, 20)" in stdout and "≤ 22" in stdout


def test_sanity_refuses_an_array_before_the_model_loads(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.zeros((2, 40), dtype=np.float32))
    code, stdout, err = run(["sanity", tmp_path / "s.npy", "--model", "no_such_module:net", "--out", tmp_path / "o"],
                            capsys)
    one_line_error(code, err, 1, "camlens sanity draws each step's maps over a photo; for a signal, volume or clip "
                                 "use camlens.metrics.sanity.cascading_randomisation")
    assert not (tmp_path / "o").exists()


def test_the_report_refuses_an_input_too_large_to_draw(tmp_path, capsys, models):
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(2, 30)))
    out = tmp_path / "out"
    assert run(["explain", tmp_path / "s.npy", "--model", "arraynets:signal", "-m", "gradcam", "--out", out],
               capsys)[0] == 0
    arrays = saved(out / "s")
    arrays["input"] = np.zeros((1, 1, 5000), dtype=np.float32)  # one slice 5000 wide: a crafted picture's size
    np.savez_compressed(out / "s" / "maps.npz", **arrays)
    code, stdout, err = run(["report", out], capsys)
    assert code != 0 and "Traceback" not in err
    assert "has slices larger than camlens draws in a report (4096 values a side)" in err
