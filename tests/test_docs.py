"""The docs' own promises: the design page's example method works; no link leaves the repository."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import camlens
from camlens.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_design_page_example_method_is_a_working_method(monkeypatch):
    text = (ROOT / "docs" / "design.md").read_text()
    source = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {"CAMMethod": camlens.CAMMethod}
    exec(source, namespace)
    method = namespace["MeanActivationCAM"]
    monkeypatch.setitem(METHODS, method.name, method)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(2, 3, 8, 8)
    explanation = camlens.explain(model, images, method="meancam", targets=camlens.TopK(2))

    activation = model[1](model[0](images))
    expected = torch.relu((activation.mean(dim=(2, 3))[:, :, None, None] * activation).sum(dim=1))
    assert explanation.maps.shape == (2, 2, 8, 8)
    torch.testing.assert_close(explanation.raw["1"][:, 0], expected)
    torch.testing.assert_close(explanation.raw["1"][:, 1], expected)  # the same for every target


def test_docs_do_not_point_outside_the_repository():
    for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        assert "../shared" not in path.read_text(), path
