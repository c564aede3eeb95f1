"""Scaffolding shared by the test files: the command line run in-process, tiny models (as classes,
and as module sources that a test writes to its tmp folder for ``--model MODULE:FACTORY``),
photos, report pages and run folders.

tests/ is on sys.path (pytest puts a conftest.py's folder there), so test files import it as
``from helpers import ...``. A model source written to a tmp folder is imported by its module name:
each test file gives it a name of its own, so that Python's module cache never hands one file's
model to another.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from camlens.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# Screenshots the browser tests take, to look at: $CAMLENS_SCREENSHOTS, else pytest's tmp folder.
SHOTS = os.environ.get("CAMLENS_SCREENSHOTS")


# -- the command line ----------------------------------------------------------------------------

def run(args, capsys=None):
    """Run the CLI in-process; return (exit code, stdout, stderr). Without ``capsys`` the output is
    left alone and returned as empty strings."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, expected_code, text):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("camlens: error: ") and text in lines[0], lines[0]


# -- tiny models written to a module for --model ---------------------------------------------------

# ``net()``: stem conv, body conv (stride 2) + ReLU, global mean, fc: 4 classes, seeded.
NET_MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def net():
    return Net()
'''

# ``build(seed=0)``: features (conv-ReLU, conv stride 2-ReLU), average pool, fc: 3 classes.
FACTORY_NET = """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(seed=0):
    torch.manual_seed(seed)
    return Net()
"""


def model_module(folder: Path, name: str, source: str, monkeypatch) -> None:
    """``source`` as ``folder/name.py``, importable as ``name`` for this test: the folder first on
    sys.path, and any module of that name imported before forgotten."""
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)


def random_photo(path: Path, height: int, width: int) -> Path:
    """A photo of uniform noise (seed 0), ``height`` x ``width`` pixels."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# -- tiny models for the targets -------------------------------------------------------------------

class Segmenter(nn.Module):
    """Conv features (12x12 -> 6x6), a 1x1 classifier per pixel: output (N, 4, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU())
        self.classifier = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.classifier(self.features(x))


class Head(nn.Module):
    """Conv features, global average pool, a linear head of ``outputs`` values ((N,) if squeezed)."""

    def __init__(self, outputs: int, squeeze: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, outputs)
        self.squeeze = squeeze

    def forward(self, x):
        out = self.fc(self.features(x).mean(dim=(2, 3)))
        return out[:, 0] if self.squeeze else out


def build(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` seeded with 0, in float64 and eval mode."""
    torch.manual_seed(0)
    return cls(*args, **kwargs).double().eval()


def by_hand(model, images, score):
    """``score(output)`` (N,) of the model, its gradient at ``features`` and the Grad-CAM raw map,
    all by hand: ``(scores, mean gradient per channel (N, K), raw map (N, h, w))``."""
    kept = {}
    handle = model.features.register_forward_hook(lambda m, i, out: kept.setdefault("a", out))
    try:
        output = model(images)
    finally:
        handle.remove()
    scores = score(output)
    (grad,) = torch.autograd.grad(scores.sum(), kept["a"])
    weights = grad.mean(dim=(2, 3))
    raw = torch.relu(torch.einsum("nk,nkhw->nhw", weights, kept["a"]))
    return scores.detach(), weights, raw.detach()


# -- train-ggam runs -------------------------------------------------------------------------------

GGAM_TINY = ["--epochs", "2", "--batch-size", "4", "--input-size", "64", "--resize", "64", "--no-pretrained",
             "--device", "cpu", "--seed", "3"]


def ggam_data(root: Path):
    """(train, val): test_ggam_train's tiny class folders, 2 images a class to train, 1 to validate."""
    from test_ggam_train import make_split

    return make_split(root / "train", 2, 0), make_split(root / "val", 1, 1)


def ggam_args(data, out, *extra):
    """``camlens train-ggam`` on ``ggam_data`` into ``out``: 2 tiny epochs, then ``extra``."""
    train, val = data
    return ["train-ggam", train, "--val-data", val, "--val-boxes", val / "boxes.csv", "--out", out, *GGAM_TINY,
            *extra]


# -- reports and run folders -----------------------------------------------------------------------

def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run folder to damage, without its report and lock."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("report.html", ".camlens-lock"))
    return target


OUTSIDE = ("http://", "https://", "//fonts.", "url(", "@import", "<link", "<iframe", " src=")


def assert_offline(text: str) -> None:
    """A report's HTML names nothing outside itself: no URL, stylesheet link, import, frame or
    source attribute (its pictures come from the embedded store)."""
    lowered = text.lower()
    for outside in OUTSIDE:
        assert outside not in lowered, outside


def page_script(text: str, name: str = "camlens-images"):
    """The JSON of the report page's <script id=name> (by default its picture store)."""
    start = text.index(f'id="{name}">') + len(name) + 6
    return json.loads(text[start:text.index("</script>", start)])


def page_data(report: Path, name: str) -> tuple[dict, dict]:
    """The report's picture store and the JSON of its <script id=name>."""
    text = report.read_text(encoding="utf-8")
    return page_script(text), page_script(text, name)


def shot(browser, tmp_path: Path, name: str) -> Path:
    """A screenshot into $CAMLENS_SCREENSHOTS (else ``tmp_path``), which must not be blank."""
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = browser.screenshot(folder / name)
    assert np.asarray(Image.open(path).convert("L"), dtype=float).std() > 10, "the screenshot is blank"
    return path
