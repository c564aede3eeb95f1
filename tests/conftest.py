"""Tiny models built in the tests: small enough for exact, fast comparisons."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """features (conv-bn-relu x2) -> global average pool -> linear, with a dropout in the head."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, channels, 3, padding=1, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


def make_tiny(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(**kwargs).to(dtype)
    # Non-trivial running statistics, so that eval mode differs from train mode.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tiny() -> TinyNet:
    return make_tiny()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


def count_rows(model):
    """Record the batch size of every forward pass of ``model``: (list, hook handle)."""
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


@pytest.fixture
def no_inference_copy(monkeypatch):
    """Explain the model itself, never its inference copy (camlens.accelerate): for tests that
    watch the model's own forward passes through hooks on it, which the copy does not carry.
    tests/test_accelerate.py checks that the copy gives the same numbers."""
    monkeypatch.setattr("camlens.accelerate.InferenceCopies.get", lambda self, model, images: None)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (tests/browser.py), shared by the session; skips the test, saying why,
    where none is installed."""
    from browser import Browser, missing

    reason = missing()
    if reason:
        pytest.skip(reason)
    driver = Browser()
    yield driver
    driver.close()
