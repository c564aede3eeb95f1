"""Out of memory on the device (issue 22, item 4): the methods with batches halve them and weigh
again, say so once, and give the weights of a run at the smaller size; below one row they refuse
in one line. The device's error is played by a model that raises torch.OutOfMemoryError on a
batch of more than ``limit`` rows (there is no GPU here)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import camlens
from camlens.errors import BatchHalvedWarning, CamlensError


class Limited(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
        self.limit = limit
        self.largest = 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]}")
        self.largest = max(self.largest, x.shape[0])
        return self.head(self.features(x))


IMAGES = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
OPTIONS = {"smoothgradcam++": {"seed": 0, "n_samples": 12}, "sscam": {"seed": 0, "n_samples": 3}}


@pytest.mark.parametrize("name", ["scorecam", "sscam", "iscam", "ablationcam", "reciprocam", "smoothgradcam++"])
def test_a_method_out_of_memory_halves_its_batches_says_so_once_and_keeps_them(name):
    model = Limited(limit=3).eval()
    method = camlens.METHODS[name](model, "features", batch_size=16, **OPTIONS.get(name, {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = method(IMAGES, [0, 2])
    said = [w for w in caught if issubclass(w.category, BatchHalvedWarning)]
    assert [str(w.message) for w in said] == [
        f"{method.display_name} ran out of memory on cpu with batch_size 16: its batches were halved to 2, for "
        "the rest of the run too (the same numbers, in more passes)"]
    assert said[0].filename == __file__  # the caller's line
    assert method.batch_size == 2 and model.largest <= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = camlens.METHODS[name](Limited(limit=3).eval(), "features", batch_size=2,
                                         **OPTIONS.get(name, {}))(IMAGES, [0, 2])
    assert torch.allclose(got.weights["features"], expected.weights["features"], rtol=1e-5, atol=1e-7)
    with warnings.catch_warnings(record=True) as caught:  # the next call starts at the halved size
        warnings.simplefilter("always")
        method(IMAGES, [0, 2])
    assert not [w for w in caught if issubclass(w.category, BatchHalvedWarning)]


class FirstCallOnly(Limited):
    """Runs once (the capture), then is out of memory whatever the batch."""

    def __init__(self) -> None:
        super().__init__(limit=100)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def test_out_of_memory_at_one_row_is_refused_in_one_line():
    method = camlens.ScoreCAM(FirstCallOnly().eval(), "features", batch_size=4)
    with pytest.raises(CamlensError) as error:
        method(IMAGES[:1], 0)
    assert str(error.value) == ("Score-CAM ran out of memory on cpu even with batch_size 1 (OutOfMemoryError: CUDA "
                                "out of memory. Tried to allocate 2.00 GiB): use fewer images per call, a smaller "
                                "input, or another device")


def test_out_of_memory_on_the_images_themselves_is_the_models_failure_in_one_line():
    """Where no batch of the method's can shrink (the forward of the images given), the error is
    the model's failure on that input, as any other."""
    with pytest.raises(CamlensError) as error:
        camlens.ScoreCAM(Limited(limit=1).eval(), "features")(IMAGES, 0)
    assert str(error.value) == ("the model failed on an input of shape (2, 3, 8, 8): OutOfMemoryError: CUDA out of "
                                "memory. Tried to allocate a batch of 2 (check the input's shape and preprocessing, "
                                "or the model)")


def test_the_command_line_says_a_halving_once_as_a_note():
    from camlens.cli import common, halving_notes, warning_notes
    from camlens.distributed import Group

    message = "Score-CAM ran out of memory on cuda:0 with batch_size 32: its batches were halved to 8, ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn(message, BatchHalvedWarning)
    assert halving_notes(caught) == [f"camlens: note: {message}"] and warning_notes(caught) == []
    # A process of a torchrun run other than the first says its own halving, marked; no other note.
    common.speak_for(Group(rank=1, world=2))
    try:
        with pytest.MonkeyPatch.context() as patch:
            said = []
            patch.setattr(common.click, "echo", lambda text, err: said.append(text))
            common.echo_error(f"camlens: note: {message}", every_process=True)
            common.echo_error("camlens: note: start-up, once per run: 0.2 s")
            common.echo_error("camlens: error: no such file")
    finally:
        common.speak_for(Group())
    assert said == [f"camlens: note (process 1): {message}", "camlens: error (process 1): no such file"]
