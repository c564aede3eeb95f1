"""Loading the models users bring (issue 21): a factory module in the current folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import NET_MODELS, SAMPLES

CAMLENS = Path(sys.executable).parent / "camlens"


def test_a_factory_module_in_the_current_folder_is_found_as_python_m_would(tmp_path):
    """The console script's path starts with its own folder: `--model mymodule:factory` failed with
    "No module named 'mymodule'" although mymodule.py was in the current folder."""
    (tmp_path / "mymodule.py").write_text(NET_MODELS)
    shutil.copy(SAMPLES / "coffee.png", tmp_path / "coffee.png")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(CAMLENS), "explain", "coffee.png", "--model", "mymodule:net", "--input-size", "16",
                           "-m", "gradcam", "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "coffee" / "maps.npz").is_file()
    done = subprocess.run([str(CAMLENS), "explain", "coffee.png", "--model", "elsewhere:net", "--out", "out2"],
                          cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "camlens: error: cannot import 'elsewhere' for --model elsewhere:net: no module 'elsewhere' in the current "
        "folder or on the Python path; run camlens from the folder that holds it, or add that folder to PYTHONPATH"]


# -- torch.compile'd models -------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import camlens  # noqa: E402
from camlens.methods import METHODS  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


OPTIONS = {"gradcam++-general": {"score": "exp"}, "sscam": {"seed": 0}, "smoothgradcam++": {"seed": 0}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_compiled_model_takes_its_own_layer_names_and_gives_the_eager_maps(name):
    """On a torch.compile'd model the layers had to be written _orig_mod.<name>."""
    model = Net().double().eval()
    compiled = torch.compile(model)
    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = OPTIONS.get(name, {})
    for layer, targets in (("features", [0, 3]), ("features.3" if name == "cam" else "features.2", [2, 1])):
        got = camlens.explain(compiled, images, name, target_layer=layer, targets=targets, **options)
        expected = camlens.explain(model, images, name, target_layer=layer, targets=targets, **options)
        torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=1e-10)
    got = camlens.explain(compiled, images, name, target_layer="_orig_mod.features", **options)  # the old spelling
    torch.testing.assert_close(got.maps, camlens.explain(model, images, name, target_layer="features", **options).maps,
                               rtol=0, atol=1e-10)


# -- one map per image, always ------------------------------------------------------------------------

class Folded(nn.Module):
    """A layer whose output folds the batch with a split of the map (2N rows), unfolded after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fold = nn.Identity()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.stem(x)
        n, c, h, w = a.shape
        folded = self.fold(a.reshape(n, c, 2, h // 2, w).transpose(1, 2).reshape(2 * n, c, h // 2, w))
        return self.fc(folded.reshape(n, 2, c, h // 2, w).mean(dim=(1, 3, 4)))


@pytest.mark.parametrize("name", ["gradcam", "scorecam", "ablationcam", "eigencam"])
def test_a_layer_without_one_row_per_image_is_refused_in_one_line(name):
    """A bias table or a batch folded with heads gave one map for two images, without a word."""
    images = torch.randn(3, 3, 8, 8)
    with pytest.raises(camlens.CamlensError, match=r"layer 'fold' outputs .*6 rows for 3 images, not one per image"):
        camlens.explain(Folded().eval(), images, name, target_layer="fold")


def test_the_default_layer_has_one_row_per_image():
    """Without a layer named, the folded layer (the last 4-D map) is passed over for the stem."""
    images = torch.randn(3, 3, 8, 8)
    got = camlens.explain(Folded().eval(), images, "gradcam")
    assert got.maps.shape[0] == 3
    expected = camlens.explain(Folded().eval(), images, "gradcam", target_layer="stem")
    torch.testing.assert_close(got.maps, expected.maps)
