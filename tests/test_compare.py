"""benchmarks/compare.py's agreement logic: camlens set to each peer's variant gives the peer's maps.

Needs the optional peers (TorchCAM, pytorch-grad-cam, see the script's docstring); skipped
without them. Timings are never asserted: only that every pair computes the same maps, on a
tiny model, through the very contenders the benchmark times, and that the check can fail.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchcam")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
_spec = importlib.util.spec_from_file_location("compare", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
sys.modules["compare"] = compare  # its dataclasses look their module up there
_environment = dict(os.environ)
_spec.loader.exec_module(compare)
# The script sets OpenMP and tqdm variables for its own process: keep them from other tests' subprocesses.
os.environ.clear()
os.environ.update(_environment)


@pytest.fixture(scope="module")
def peers():
    """Both peers; pytorch-grad-cam's stand-in modules are taken out of sys.modules afterwards."""
    before = set(sys.modules)
    pgc = compare.import_pgc()
    yield compare.import_torchcam(), pgc
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("torchvision", "sklearn") and not hasattr(sys.modules[name], "__file__"):
            del sys.modules[name]


def tiny_model(channels: int = 6) -> nn.Module:
    torch.manual_seed(3)
    layers = OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, stride=2, padding=1),
        act1=nn.ReLU(),
        conv2=nn.Conv2d(8, channels, 3, stride=2, padding=1),
        features=nn.ReLU6(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        _fc=nn.Linear(channels, 5),
    )
    assert compare.LAYER in layers and compare.FC in layers
    return nn.Sequential(layers).eval()


@pytest.fixture(scope="module")
def setup(peers):
    torch.manual_seed(4)
    pool = torch.randn(3, 3, 32, 32)
    return compare.Setup(tiny_model(), pool, *peers)


def run_pairs(setup, method: str, size: int):
    x, classes = setup.batch(size)
    pairs = setup.pairs(method, x, classes)
    outputs = {}
    for pair in pairs:
        for contender in (pair.camlens, pair.peer):
            if id(contender) not in outputs:
                outputs[id(contender)] = contender.run(setup.model)[0]
    return [
        (pair, compare.map_difference(outputs[id(pair.camlens)], outputs[id(pair.peer)], pair.peer_kind))
        for pair in pairs
    ]


@pytest.mark.parametrize("method", compare.METHODS)
@pytest.mark.parametrize("size", [1, 3])
def test_every_timed_pair_computes_the_same_maps(setup, method, size):
    results = run_pairs(setup, method, size)
    kinds = {pair.peer_kind for pair, _ in results}
    pgc_has_it = setup.pgc is not None and method in ("gradcam", "gradcam++", "scorecam")
    expected = {compare.TORCHCAM, compare.PGC} if pgc_has_it else {compare.TORCHCAM}
    assert kinds == expected
    for pair, difference in results:
        if pair.verdict:
            assert difference <= 1e-5, (pair.variant, pair.peer.label, difference)
        else:  # camlens's own Smooth Grad-CAM++ next to TorchCAM's: other noise, other formula
            assert difference > compare.TOLERANCE


def test_the_check_sees_a_different_map(setup):
    """camlens's paper Grad-CAM++ is not TorchCAM's (sum g^2 ReLU(g)): the check must say so."""
    x, classes = setup.batch(3)
    (tc_pair, *_) = setup.pairs("gradcam++", x, classes)
    paper = compare.GradCAMPlusPlus(setup.model, compare.LAYER)(x, classes)
    theirs = tc_pair.peer.run(setup.model)[0]
    assert compare.map_difference(paper, theirs, compare.TORCHCAM) > compare.TOLERANCE
    assert compare.map_difference(tc_pair.camlens.run(setup.model)[0], theirs, compare.TORCHCAM) <= 1e-5


def test_smooth_subclass_follows_torchcam_across_uneven_chunks(setup):
    """Copies split across forward batches that do not line up with the images."""
    x, classes = setup.batch(3)
    (pair, _) = setup.pairs("smoothgradcam++", x, classes)
    uneven = compare.TorchCAMSmoothGradCAMPlusPlus(
        setup.model, compare.LAYER, compare.SMOOTH_SAMPLES, compare.TORCHCAM_SMOOTH_STD, batch_size=5
    )
    torch.manual_seed(0)
    mine = uneven(x, classes)
    theirs = pair.peer.run(setup.model)[0]  # seeds 0 itself
    assert compare.map_difference(mine, theirs, compare.TORCHCAM) <= 1e-5


def test_no_hooks_are_left_behind(setup):
    """A library's hooks must not run, and cost, during another's turn."""
    x, classes = setup.batch(2)
    for method in compare.METHODS:
        for pair in setup.pairs(method, x, classes):
            pair.peer.run(setup.model)
            pair.camlens.run(setup.model)
    for module in setup.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in setup.model.parameters())


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        compare.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "layercam"])
    args = compare.parse_args([])
    assert args.batch_sizes == [1, 8] and args.score_cam_batch_sizes == [1] and args.repeats >= 30


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_group_times_each_library_once_per_run_and_tables_every_pair(setup, warmup):
    x, classes = setup.batch(2)
    lines = []
    group = compare.Group("gradcam++", 2, setup.pairs("gradcam++", x, classes), repeats=3, warmup=warmup)
    group.run(setup.model, lines.append)
    assert all(len(contender.times) == 3 for contender in group.contenders)
    assert sum("agree" in line for line in lines) == len(group.pairs)
    assert sum(line.startswith("  run ") for line in lines) == (3 if warmup == 0 else 0)
    rows = compare.table([group]).splitlines()[2:]
    assert len(rows) == len(group.pairs)
    assert all(("PASS" in row) != ("FAIL" in row) for row in rows)  # agreeing maps: a verdict
