"""Ablation-CAM, SS-CAM, IS-CAM and Recipro-CAM against plain loops written from their papers.

Each reference runs the model itself, one image, target and channel (or position, or noisy
version) at a time, with a hook of its own where the layer's output is changed; nothing from
camlens computes a reference value. Models are tiny and in float64, so tolerances are tight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import CamlensError, UnitTarget
from camlens.methods import gradient_free

LAYER = "body"
RTOL, ATOL = 1e-9, 1e-10


class Skip(nn.Module):
    """stem -> body (the target layer, 6 channels at 6x6) + a skip connection from the stem,
    which the part after the cut reads -> post (a conv, for unit targets) -> mean -> head.

    Channel 0 of ``body`` is all zero (bias -100 before the ReLU), channel 1 the constant 0.5,
    so all-zero, constant and ordinary channels are covered.
    """

    def __init__(self, seed: int = 0, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU())
        self.skip = nn.Conv2d(4, 6, 1, stride=2)
        self.post = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, classes)
        with torch.no_grad():
            self.body[0].bias[0] = -100.0
            self.body[0].weight[1] = 0.0
            self.body[0].bias[1] = 0.5
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.tanh(self.post(self.body(s) + self.skip(s))).mean(dim=(2, 3)))


class Untraceable(Skip):
    """The same network, with control flow on a value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) < 0:
            return x
        return super().forward(x)


@pytest.fixture
def model() -> Skip:
    return Skip()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 3, 12, 12), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(got, expected, rtol=RTOL, atol=ATOL, what=""):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# -- independent references ---------------------------------------------------------------------
def run(model, x, replace=None, unit=None):
    """The model on ``x`` (one image), ``replace(a)`` changing the body's output; returns the
    logits, and the mean of ``unit`` = (layer, channel) if given."""
    seen = {}
    handles = []
    if replace is not None:
        handles.append(model.body.register_forward_hook(lambda m, i, out: replace(out.clone())))
    if unit is not None:
        layer = dict(model.named_modules())[unit[0]]

        def keep(module, inputs, out):
            seen["unit"] = out[:, unit[1]].mean()

        handles.append(layer.register_forward_hook(keep))
    try:
        with torch.no_grad():
            logits = model(x[None])[0]
    finally:
        for handle in handles:
            handle.remove()
    return (logits, seen["unit"]) if unit is not None else logits


def activation(model, x):
    with torch.no_grad():
        return model.body(model.stem(x))


def s(m):
    lo, hi = m.min(), m.max()
    return torch.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


def up(m, size=(12, 12)):
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def check_map(expl, n, t, raw):
    """The pipeline's raw map and final map for image n, target t, from ``raw``."""
    close(expl.raw[LAYER][n, t], raw, what=f"raw map {n} {t}")
    close(expl.maps[n, t], s(up(raw)), 1e-9, 1e-10, f"map {n} {t}")


def ablation_reference(model, x, classes):
    """Desai & Ramaswamy: w_k = (y - y_k) / y, y the logit, y_k with channel k set to zero."""
    a = activation(model, x)
    weights = torch.zeros(*classes.shape, a.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        y = run(model, x[n])
        for k in range(a.shape[1]):
            def zero(out, k=k):
                out[:, k] = 0
                return out
            y_k = run(model, x[n], zero)
            for t, c in enumerate(classes[n].tolist()):
                weights[n, t, k] = (y[c] - y_k[c]) / y[c]
    return weights, a


def recipro_reference(model, x, classes, channels=None):
    """Byun & Lee: L_ij = softmax(f(A kept at (i, j) only))_c."""
    a = activation(model, x)
    h, w = a.shape[-2:]
    maps = torch.zeros(*classes.shape, h, w, dtype=x.dtype)
    for n in range(x.shape[0]):
        for i in range(h):
            for j in range(w):
                def keep(out, i=i, j=j):
                    kept = torch.zeros_like(out)
                    kept[:, :, i, j] = out[:, :, i, j]
                    if channels is not None:
                        kept[:, [k for k in range(out.shape[1]) if k not in channels]] = 0
                    return kept
                p = run(model, x[n], keep).softmax(0)
                for t, c in enumerate(classes[n].tolist()):
                    maps[n, t, i, j] = p[c]
    return maps


def masked_score_reference(model, x, classes, versions):
    """Score-CAM's loop with each masked input in versions: ``versions(xn, h)`` lists the inputs
    for image xn and mask h = s(Up(A^k)) (0 for a constant A^k); the weight is the mean of
    their probabilities of the class."""
    a = activation(model, x)
    weights = torch.zeros(*classes.shape, a.shape[1], dtype=x.dtype)
    for n in range(x.shape[0]):
        for k in range(a.shape[1]):
            h = torch.zeros(12, 12, dtype=x.dtype) if a[n, k].max() == a[n, k].min() else s(up(a[n, k]))
            inputs = versions(x[n], h)
            for t, c in enumerate(classes[n].tolist()):
                weights[n, t, k] = sum(run(model, v).softmax(0)[c] for v in inputs) / len(inputs)
    return weights, a


def combine(w, a):
    return torch.relu(torch.einsum("k,khw->hw", w, a))


def count_rows(module):
    rows = []
    return rows, module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))


# -- Ablation-CAM ---------------------------------------------------------------------------------
CLASSES = torch.tensor([[0, 3], [2, 4], [1, 1]])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_ablation_against_loop(model, batch_size):
    x = images()
    expected, a = ablation_reference(model, x, CLASSES)
    expl = camlens.AblationCAM(model, LAYER, batch_size=batch_size)(x, CLASSES.tolist())
    close(expl.weights[LAYER], expected, what="weights")
    for n in range(3):
        for t in range(2):
            check_map(expl, n, t, combine(expected[n, t], a[n]))
    assert (expl.weights[LAYER][:, :, 0] == 0).all()  # the all-zero channel weighs exactly 0
    assert expl.options == {"batch_size": batch_size}


def test_ablation_runs_only_the_layers_after_the_target_layer(model):
    """Below the layer: the clean forward and one run of the cut's first part, N rows each.
    After it: the clean forward, the cut's check (N + 1 rows), y (N rows) and one row per
    channel that is not all zero (the all-zero channel 0 is never forwarded)."""
    x = images()
    below, handle_below = count_rows(model.stem[0])  # a leaf: tracing does not call it
    after, handle_after = count_rows(model.head)
    try:
        camlens.AblationCAM(model, LAYER, batch_size=4)(x)
    finally:
        handle_below.remove()
        handle_after.remove()
    live = int(activation(model, x).flatten(2).ne(0).any(-1).sum())
    assert live == 3 * 5  # every channel but the all-zero one, in every image
    assert sum(below) == 2 * 3
    assert sum(after) == 3 + (3 + 1) + 3 + live


@pytest.mark.parametrize("name, options", [("ablationcam", {}), ("reciprocam", {})])
def test_cut_path_equals_hook_fallback(model, monkeypatch, name, options):
    x = images()
    cut = camlens.explain(model, x, name, target_layer=LAYER, targets=camlens.TopK(2), batch_size=5)
    below, handle = count_rows(model.stem[0])
    monkeypatch.setattr(gradient_free, "cut", lambda module, layer: None)
    monkeypatch.setattr(gradient_free, "remembered_cut", lambda *args: None)  # nor the last call's
    try:
        hooked = camlens.explain(model, x, name, target_layer=LAYER, targets=camlens.TopK(2), batch_size=5)
    finally:
        handle.remove()
    assert sum(below) > 2 * 3  # the fallback runs the whole model for every batch
    close(hooked.weights[LAYER], cut.weights[LAYER], 1e-12, 1e-12, "weights")
    close(hooked.maps, cut.maps, 1e-12, 1e-12, "maps")


@pytest.mark.parametrize("name", ["ablationcam", "reciprocam"])
def test_untraceable_model_uses_the_hooks(name):
    model = Untraceable()
    x = images(2)
    classes = CLASSES[:2]
    expl = camlens.explain(model, x, name, target_layer=LAYER, targets=classes.tolist())
    if name == "ablationcam":
        close(expl.weights[LAYER], ablation_reference(model, x, classes)[0], what="weights")
    else:
        close(expl.weights[LAYER], recipro_reference(model, x, classes), what="weights")


def test_cut_that_disagrees_with_the_model_is_not_used(model, monkeypatch):
    """A cut whose second part gives other outputs than the model (here: it ignores the skip
    connection) fails the check, and the hooks give the right weights."""
    real = gradient_free.cut

    def wrong(module, layer):
        before, after = real(module, layer)
        return before, lambda a, *rest: after(a, *[torch.zeros_like(r) for r in rest])

    monkeypatch.setattr(gradient_free, "cut", wrong)
    x = images()
    expl = camlens.AblationCAM(model, LAYER)(x, CLASSES.tolist())
    close(expl.weights[LAYER], ablation_reference(model, x, CLASSES)[0], what="weights")


def test_ablation_batch_equals_one_by_one(model):
    x = images()
    method = camlens.AblationCAM(model, LAYER, batch_size=3)
    batch = method(x, camlens.TopK(2))
    for n in range(3):
        one = method(x[n : n + 1], camlens.TopK(2))
        close(batch.weights[LAYER][n : n + 1], one.weights[LAYER], what=f"weights {n}")
        close(batch.maps[n : n + 1], one.maps, what=f"maps {n}")


def test_ablation_channel_subset_weighs_as_the_full_layer(model):
    """Ablating channel k does not depend on the others: a subset's weights are the full ones."""
    x = images()
    full = camlens.AblationCAM(model, LAYER)(x, CLASSES.tolist())
    subset = camlens.AblationCAM(model, LAYER)(x, CLASSES.tolist(), channels=[5, 1, 3])
    close(subset.weights[LAYER][..., [5, 1, 3]], full.weights[LAYER][..., [5, 1, 3]], what="subset weights")
    assert (subset.weights[LAYER][..., [0, 2, 4]] == 0).all()


def test_ablation_of_a_unit_target(model):
    """A unit after the target layer: its mean activation is the score (through the hooks)."""
    x = images(2)
    expl = camlens.AblationCAM(model, LAYER)(x, UnitTarget("post", 2))
    a = activation(model, x)
    for n in range(2):
        y = run(model, x[n], unit=("post", 2))[1]
        for k in range(6):
            def zero(out, k=k):
                out[:, k] = 0
                return out
            y_k = run(model, x[n], zero, unit=("post", 2))[1]
            close(expl.weights[LAYER][n, 0, k], (y - y_k) / y, what=f"unit weight {n} {k}")
        check_map(expl, n, 0, combine(expl.weights[LAYER][n, 0], a[n]))


def test_ablation_with_the_inference_copy(model):
    x = images()
    plain = camlens.AblationCAM(model, LAYER)(x, CLASSES.tolist())
    copied = camlens.AblationCAM(model, LAYER, optimize=True)(x, CLASSES.tolist())
    close(copied.weights[LAYER], plain.weights[LAYER], 1e-6, 1e-9, "weights")


def test_ablation_refuses_a_zero_score():
    model = Skip()
    with torch.no_grad():
        model.head.weight[3] = 0.0
        model.head.bias[3] = 0.0
    with pytest.raises(CamlensError, match=r"divides by the target score, which is 0 for image\(s\) \[0, 1\]"):
        camlens.AblationCAM(model, LAYER)(images(2), 3)


def test_ablation_reports_progress(model):
    seen = []
    method = camlens.AblationCAM(model, LAYER, batch_size=4)
    method(images(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3 + 15, 3 + 15) and [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- Recipro-CAM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_recipro_against_loop(model, batch_size):
    x = images()
    expected = recipro_reference(model, x, CLASSES)
    expl = camlens.ReciproCAM(model, LAYER, batch_size=batch_size)(x, CLASSES.tolist())
    assert expl.weights[LAYER].shape == (3, 2, 6, 6)
    close(expl.weights[LAYER], expected, what="scores per position")
    for n in range(3):
        for t in range(2):
            check_map(expl, n, t, expected[n, t])


def test_recipro_channel_subset_keeps_only_those_channels(model):
    x = images(2)
    expected = recipro_reference(model, x, CLASSES[:2], channels=[2, 4])
    expl = camlens.ReciproCAM(model, LAYER)(x, CLASSES[:2].tolist(), channels=[2, 4])
    close(expl.weights[LAYER], expected, what="scores per position")


def test_recipro_batch_equals_one_by_one(model):
    x = images()
    method = camlens.ReciproCAM(model, LAYER, batch_size=10)
    batch = method(x, camlens.TopK(2))
    for n in range(3):
        one = method(x[n : n + 1], camlens.TopK(2))
        close(batch.weights[LAYER][n : n + 1], one.weights[LAYER], what=f"weights {n}")
        close(batch.maps[n : n + 1], one.maps, what=f"maps {n}")


# -- SS-CAM and IS-CAM ----------------------------------------------------------------------------
def noise(seed, samples, channels, sigma):
    return torch.randn((samples, channels, 12, 12), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * sigma


@pytest.mark.parametrize("where", ["mask", "input"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_sscam_against_loop(model, where, batch_size):
    x = images()
    delta = noise(7, 4, 1 if where == "mask" else 3, 0.3)
    if where == "mask":
        versions = lambda xn, h: [xn * (h + d) for d in delta]  # noqa: E731
    else:
        versions = lambda xn, h: [xn * h + d for d in delta]  # noqa: E731
    expected, a = masked_score_reference(model, x, CLASSES, versions)
    expl = camlens.SSCAM(model, LAYER, n_samples=4, sigma=0.3, noise=where, seed=7, batch_size=batch_size)(
        x, CLASSES.tolist()
    )
    close(expl.weights[LAYER], expected, what="weights")
    check_map(expl, 1, 1, combine(expected[1, 1], a[1]))
    assert expl.options["n_samples"] == 4 and expl.options["sigma"] == 0.3 and expl.options["seed"] == 7


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_iscam_against_loop(model, steps):
    x = images()

    def versions(xn, h):
        accumulated, inputs = torch.zeros_like(h), []
        for i in range(1, steps + 1):
            accumulated = accumulated + i / steps * h
            inputs.append(xn * accumulated)
        return inputs

    expected, a = masked_score_reference(model, x, CLASSES, versions)
    expl = camlens.ISCAM(model, LAYER, n_steps=steps, batch_size=4)(x, CLASSES.tolist())
    close(expl.weights[LAYER], expected, what="weights")
    check_map(expl, 0, 1, combine(expected[0, 1], a[0]))
    assert expl.options["n_steps"] == steps


@pytest.mark.parametrize("name, options", [("sscam", {"n_samples": 3, "sigma": 0.0}), ("iscam", {"n_steps": 1})])
def test_identities_with_score_cam(model, name, options):
    """SS-CAM without noise and IS-CAM in one step are Score-CAM."""
    x = images()
    for extra in ({}, {"score": "logit", "baseline": "zeros", "channel_softmax": True}):
        score = camlens.ScoreCAM(model, LAYER, **extra)(x, CLASSES.tolist())
        other = camlens.explain(model, x, name, target_layer=LAYER, targets=CLASSES.tolist(), **options, **extra)
        close(other.weights[LAYER], score.weights[LAYER], what=f"{name} {extra}")


@pytest.mark.parametrize("where", ["mask", "input"])
def test_sscam_forwards_constant_channels_once_per_image(model, where):
    """Channels 0 and 1 are constant (H = 0): their noisy inputs are forwarded once per image,
    through one of them, and shared; the others once each, n_samples times."""
    x = images()
    rows, handle = count_rows(model)
    try:
        expl = camlens.SSCAM(model, LAYER, n_samples=3, noise=where, seed=0, batch_size=4)(x)
    finally:
        handle.remove()
    assert sum(rows) == 3 + 3 * (3 * 4 + 3)  # clean forward; 4 ordinary channels and 1 shared, per image
    close(expl.weights[LAYER][:, :, 0], expl.weights[LAYER][:, :, 1], 0, 0, "shared score")


def test_iscam_forwards_the_blank_input_once(model):
    x = images()
    rows, handle = count_rows(model)
    try:
        camlens.ISCAM(model, LAYER, n_steps=4)(x)
    finally:
        handle.remove()
    assert sum(rows) == 3 + 1 + 4 * 3 * 4  # clean; X * 0 once for all; 4 steps of 4 channels per image


@pytest.mark.parametrize("name, options", [("sscam", {"n_samples": 3, "seed": 5}), ("iscam", {"n_steps": 3})])
def test_noisy_and_integrated_batch_equals_one_by_one(model, name, options):
    x = images()
    method = camlens.get_method(name)(model, LAYER, batch_size=4, **options)
    batch = method(x, camlens.TopK(2))
    for n in range(3):
        one = method(x[n : n + 1], camlens.TopK(2))
        close(batch.weights[LAYER][n : n + 1], one.weights[LAYER], what=f"{name} weights {n}")


def test_sscam_seed_makes_it_reproducible_and_changes_it(model):
    x = images(1)
    first = camlens.SSCAM(model, LAYER, n_samples=2, seed=1)(x).weights[LAYER]
    again = camlens.SSCAM(model, LAYER, n_samples=2, seed=1)(x).weights[LAYER]
    other = camlens.SSCAM(model, LAYER, n_samples=2, seed=2)(x).weights[LAYER]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_faster_score_cam_choice_carries_over(model):
    """top_channels chooses the same channels, and every chosen channel weighs as without it."""
    x = images()
    full = camlens.ISCAM(model, LAYER, n_steps=2)(x)
    fast = camlens.ISCAM(model, LAYER, n_steps=2, top_channels=2)(x)
    for n, chosen in enumerate(fast.options["chosen_channels"][LAYER]):
        close(fast.weights[LAYER][n, 0, chosen], full.weights[LAYER][n, 0, chosen], what=f"chosen {n}")


# -- options --------------------------------------------------------------------------------------
BAD = [
    ("ablationcam", {"batch_size": 0}, "batch_size must be a positive integer"),
    ("reciprocam", {"batch_size": 2.5}, "batch_size must be a positive integer"),
    ("sscam", {"n_samples": 0}, "n_samples must be a positive integer"),
    ("sscam", {"sigma": -1.0}, r"sigma must be a finite number >= 0, got -1.0"),
    ("sscam", {"sigma": float("nan")}, "sigma must be a finite number >= 0"),
    ("sscam", {"sigma": True}, "sigma must be a finite number >= 0"),
    ("sscam", {"noise": "pixels"}, "noise must be 'mask' or 'input', got 'pixels'"),
    ("sscam", {"seed": 1.5}, "seed must be an integer that fits in 64 bits"),
    ("sscam", {"seed": True}, "seed must be an integer"),
    ("sscam", {"score": "odds"}, "unknown score 'odds'"),
    ("iscam", {"n_steps": -3}, "n_steps must be a positive integer"),
    ("iscam", {"top_channels": 0}, "top_channels must be a number of channels"),
]


@pytest.mark.parametrize("name, options, message", BAD)
def test_bad_options_are_refused(model, name, options, message):
    with pytest.raises(CamlensError, match=message):
        camlens.get_method(name)(model, LAYER, **options)


def test_registered_with_their_cost():
    methods = camlens.list_methods()
    for name, cost in [("ablationcam", "forwards of the layers after the target layer, batched"),
                       ("sscam", "n_samples forwards per non-constant channel, batched"),
                       ("iscam", "n_steps forwards per non-constant channel, batched"),
                       ("reciprocam", "h x w forwards of the layers after the target layer, batched")]:
        assert methods[name].endswith(cost)
        assert camlens.get_method(name.upper()).name == name


# -- the embedded model ---------------------------------------------------------------------------
def test_embedded_model_ablation_inside_a_residual_block():
    """Cut inside an MBConv block, whose residual input crosses the cut: a few channels against
    the loop, and the part below the layer run twice (the clean forward and the cut's first part)."""
    from camlens.models import efficientnet_lite0

    model = efficientnet_lite0()
    x = model.preprocess(camlens.io.load_image("samples/chelsea.png"))[None]
    layer = dict(model.named_modules())["_blocks.14._bn2"]
    stem, handle = count_rows(model._conv_stem)
    try:
        expl = camlens.AblationCAM(model, "_blocks.14._bn2")(x, 281, channels=[3, 50, 191])
    finally:
        handle.remove()
    assert sum(stem) == 2
    with torch.no_grad():
        y = model(x)[0, 281]
        for k in (3, 50, 191):
            def zero(module, inputs, out, k=k):
                out = out.clone()
                out[:, k] = 0
                return out
            handle = layer.register_forward_hook(zero)
            try:
                y_k = model(x)[0, 281]
            finally:
                handle.remove()
            close(expl.weights["_blocks.14._bn2"][0, 0, k], (y - y_k) / y, 1e-4, 1e-6, f"channel {k}")
