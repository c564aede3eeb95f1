"""Review of issue 10's methods (the gradient family, the gradient-free family, the general
Grad-CAM++ and the smoothing meta-methods) against computations written here from the formulas.

Every reference is a plain loop over images and targets on tiny float64 models: the target
layer's output captured by a hook of the test's own (which hands the model a copy, so that an
in-place operation after the layer cannot change what was captured), its gradient from
``torch.autograd.grad``, masked or ablated forwards of the whole model, higher derivatives
from ``torch.autograd.functional`` and principal components from NumPy's SVD. Nothing here
calls camlens's own weighing functions.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camlens import CamlensError
from camlens.methods import (
    AugmentSmooth,
    EigenSmooth,
    GradCAM,
    GradCAMPlusPlus,
    GradCAMPlusPlusGeneral,
    get_method,
)
from camlens.methods.meta import smoothed
from camlens.targets import ClassTarget, UnitTarget

# -- tiny models ---------------------------------------------------------------------------------


class Residual(nn.Module):
    """stem (conv stride 2 + ReLU) -> ``layer`` (conv: values of both signs) -> a residual block
    that reads ``layer``'s output twice (``branch(a) + a``, the branch starting with an in-place
    ReLU) -> SiLU -> global average pool -> linear. The gradient at ``layer`` varies over
    positions and changes sign."""

    def __init__(self, seed: int = 0, classes: int = 4, inplace: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU())
        self.layer = nn.Conv2d(4, 5, 3, padding=1)
        self.branch = nn.Sequential(nn.ReLU(inplace=inplace), nn.Conv2d(5, 5, 3, padding=1))
        self.unit = nn.Identity()
        self.fc = nn.Linear(5, classes)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer(self.stem(x))
        b = self.unit(self.branch(a) + a)
        return self.fc(F.adaptive_avg_pool2d(F.silu(b), 1).flatten(1))


class Untraceable(Residual):
    """The same network with a Python branch on a tensor value (torch.fx cannot trace it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        if bool(s.sum() > -1e30):
            s = s * 1.0
        a = self.layer(s)
        b = self.unit(self.branch(a) + a)
        return self.fc(F.adaptive_avg_pool2d(F.silu(b), 1).flatten(1))


def images(count: int = 3, height: int = 10, width: int = 14, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(count, 3, height, width, dtype=torch.float64)


# -- references ----------------------------------------------------------------------------------


def run(model: nn.Module, x: torch.Tensor, layer: str, replace: torch.Tensor | None = None, units=()):
    """The model's output on ``x`` (one image, (1, C, H, W)), the output of ``layer`` (the
    tensor itself, for gradients) and of the unit layers; with ``replace``, the layer's output
    replaced by it."""
    store = {}

    def keep(name):
        def hook(module, inputs, output):
            store[name] = output
            return (output if replace is None or name != layer else replace).clone()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in {layer, *units}]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, store[layer], store


def score_of(out: torch.Tensor, target, kind: str, store) -> torch.Tensor:
    """The score of one target of one image: a class index (logit, probability or exp) or a
    UnitTarget (the channel's mean, or its value at a position)."""
    if isinstance(target, UnitTarget):
        channel = store[target.layer][0, target.channel]
        return channel.mean() if target.position is None else channel[target.position]
    if kind == "logit":
        return out[0, target]
    if kind == "exp":
        return out[0, target].exp()
    return out.softmax(1)[0, target]


def grad_and_activation(model, x, layer, target, kind="logit"):
    units = (target.layer,) if isinstance(target, UnitTarget) else ()
    with torch.enable_grad():
        out, a, store = run(model, x, layer, units=units)
        if not a.requires_grad:  # parameters frozen by the caller: start the graph at the layer
            raise AssertionError("the reference model must have trainable parameters")
        (g,) = torch.autograd.grad(score_of(out, target, kind, store), a)
    return a.detach()[0], g[0]


def svd_projection(features: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM's projection of (K, h, w) ``features`` on their first principal component, with
    NumPy: rows are positions, centred; the sign makes the largest magnitude positive."""
    k, h, w = features.shape
    matrix = features.reshape(k, h * w).T.numpy()
    matrix = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    projection = matrix @ vt[0]
    if -projection.min() > projection.max():
        projection = -projection
    return torch.from_numpy(projection.reshape(h, w))


def gradient_reference(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Raw map (h, w) of a gradient method from A (K, h, w) and its gradient (K, h, w)."""
    relu = torch.relu
    if method == "gradcam":
        return relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(0))
    if method == "xgradcam":
        weights = []
        for k in range(a.shape[0]):
            total = a[k].sum()
            weights.append(0.0 if total == 0 else float((a[k] * g[k]).sum() / total))
        return relu((torch.tensor(weights, dtype=a.dtype)[:, None, None] * a).sum(0))
    if method == "hirescam":
        return relu((g * a).sum(0))
    if method == "gradcam-elementwise":
        return relu(relu(g * a).sum(0))
    if method == "layercam":
        return relu((relu(g) * a).sum(0))
    if method == "eigengradcam":
        return relu(svd_projection(g * a))
    if method == "eigencam":
        return relu(svd_projection(a))
    raise ValueError(method)


def reference_maps(model, x, layer, method, targets, kind="logit"):
    """Raw maps (N, T, h, w) of a gradient method, one image and one target at a time."""
    maps = []
    for n in range(x.shape[0]):
        row = []
        for target in targets[n]:
            a, g = grad_and_activation(model, x[n : n + 1], layer, target, kind)
            row.append(gradient_reference(method, a, g))
        maps.append(torch.stack(row))
    return torch.stack(maps)


def s_up(raw: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling and min-max normalisation of one (h, w) map; a constant map gives 0."""
    up = F.interpolate(raw[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    span = up.max() - up.min()
    if raw.max() == raw.min():
        return torch.zeros_like(up)
    return (up - up.min()) / span


GRADIENT = ("xgradcam", "hirescam", "gradcam-elementwise", "layercam", "eigengradcam", "eigencam")


def class_score(out: torch.Tensor, cls: int, kind: str) -> float:
    return float(out[0, cls] if kind == "logit" else out.softmax(1)[0, cls])


def ablation_reference(model, x, layer, targets, kind="logit"):
    """Ablation-CAM raw maps: w_k = (y - y_k) / y, y_k with channel k of the layer zeroed."""
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            out, a, _ = run(model, x[n : n + 1], layer)
            a = a.clone()
            row = []
            for cls in targets[n]:
                y = class_score(out, cls, kind)
                weights = []
                for k in range(a.shape[1]):
                    ablated = a.clone()
                    ablated[:, k] = 0
                    y_k = class_score(run(model, x[n : n + 1], layer, replace=ablated)[0], cls, kind)
                    weights.append((y - y_k) / y)
                w = torch.tensor(weights, dtype=a.dtype)
                row.append(torch.relu((w[:, None, None] * a[0]).sum(0)))
            maps.append(torch.stack(row))
    return torch.stack(maps)


def recipro_reference(model, x, layer, targets, kind="probability"):
    """Recipro-CAM raw maps: the score with the layer's features kept at one position only."""
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            _, a, _ = run(model, x[n : n + 1], layer)
            a = a.clone()
            h, w = a.shape[-2:]
            row = torch.zeros(len(targets[n]), h, w, dtype=a.dtype)
            for i in range(h):
                for j in range(w):
                    kept = torch.zeros_like(a)
                    kept[..., i, j] = a[..., i, j]
                    out = run(model, x[n : n + 1], layer, replace=kept)[0]
                    for t, cls in enumerate(targets[n]):
                        row[t, i, j] = class_score(out, cls, kind)
            maps.append(torch.relu(row))
    return torch.stack(maps)


def masked_reference(model, x, layer, targets, versions, kind="probability"):
    """Score-CAM-family raw maps: w_k = the mean over ``versions(image, mask)`` (a list of
    inputs) of the target's score, H^k = s(Up(A^k)) (0 for a constant channel)."""
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            image = x[n : n + 1]
            _, a, _ = run(model, image, layer)
            a = a.clone()[0]
            weights = torch.zeros(len(targets[n]), a.shape[0], dtype=a.dtype)
            for k in range(a.shape[0]):
                mask = s_up(a[k], image.shape[-2:])
                inputs = versions(image, mask)
                for t, cls in enumerate(targets[n]):
                    weights[t, k] = sum(class_score(model(v), cls, kind) for v in inputs) / len(inputs)
            maps.append(torch.relu(torch.einsum("tk,khw->thw", weights, a)))
    return torch.stack(maps)


def general_reference(model, x, layer, targets, kind):
    """gradcam++-general's raw maps with the derivatives from torch.autograd.functional: the
    score as a function of the layer's output alone (the whole model run with that output
    replaced), its gradient from ``jacobian``, and for each element e the second and third
    derivatives of the one-variable function t -> y(A + t e) at 0 (``hessian``, and ``jacobian``
    of the hessian), which are the diagonal ones; then the paper's alpha and weights written
    out (alpha 0 where its denominator is 0)."""

    from torch.autograd.functional import hessian, jacobian

    maps = []
    for n in range(x.shape[0]):
        image = x[n : n + 1]
        with torch.no_grad():
            _, a, _ = run(model, image, layer)
            a = a.clone()
        row = []
        for cls in targets[n]:
            def y(features):
                out = run(model, image, layer, replace=features)[0]
                return score_of(out, cls, kind, {})

            with torch.enable_grad():
                d1 = jacobian(y, a)[0]
            d2 = torch.zeros_like(d1)
            d3 = torch.zeros_like(d1)
            for index in np.ndindex(*d1.shape):
                e = torch.zeros_like(a)
                e[(0, *index)] = 1.0

                def along(t):
                    return y(a + t * e)

                def second(t):
                    return hessian(along, t, create_graph=True)

                t0 = torch.zeros((), dtype=a.dtype)
                with torch.enable_grad():
                    d2[index] = hessian(along, t0)
                    d3[index] = jacobian(second, t0)
            total = a[0].sum(dim=(1, 2))[:, None, None]
            denominator = 2 * d2 + total * d3
            alpha = torch.where(denominator != 0, d2 / torch.where(denominator != 0, denominator, 1), 0)
            weights = (alpha * torch.relu(d1)).sum(dim=(1, 2))
            row.append(torch.relu((weights[:, None, None] * a[0]).sum(0)))
        maps.append(torch.stack(row))
    return torch.stack(maps)


def eigen_reference(weighted: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's eigen_smooth of weighted activations (K, h, w), with NumPy's SVD:
    the centred projection on the first principal axis v, signed so that sum_k v_k >= 0 (the
    projection then co-varies with the method's own map), after a ReLU."""
    k, h, w = weighted.shape
    matrix = weighted.reshape(k, h * w).T.numpy()
    matrix = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    axis = vt[0] if vt[0].sum() >= 0 else -vt[0]
    return torch.relu(torch.from_numpy((matrix @ axis).reshape(h, w)))


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, what: str = "") -> None:
    """``got`` equals ``expected`` up to ``rtol`` of its largest magnitude."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = max(float(expected.abs().max()), 1e-300)
    error = float((got.double() - expected.double()).abs().max())
    assert error <= rtol * scale, f"{what}: max error {error:.3g} for values up to {scale:.3g}"


def check_maps(explanation, layer: str, raw: torch.Tensor, rtol: float = 1e-9) -> None:
    """The raw maps at layer resolution and the final maps, s(Up(raw)), against a reference."""
    close(explanation.raw[layer], raw, rtol, "raw maps")
    size = explanation.maps.shape[-2:]
    maps = torch.stack([torch.stack([s_up(r, size) for r in row]) for row in raw])
    close(explanation.maps, maps, max(rtol, 1e-9), "maps")
    assert torch.isfinite(explanation.maps).all()


SHAPES = [(5, 10, 14), (1, 2, 2), (2, 2, 6)]  # non-square maps, 1x1 maps, a 1x3 map; batch 5 and 1
NEW_METHODS = (
    "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam", "eigencam",
    "ablationcam", "sscam", "iscam", "reciprocam", "gradcam++-general",
)
QUICK = {"sscam": {"n_samples": 2, "seed": 3}, "iscam": {"n_steps": 2}}


def per_image_targets(count: int, classes: int = 4) -> list[list[int]]:
    """Two different classes per image, different between images."""
    return [[n % classes, (n + 2) % classes] for n in range(count)]


# -- the gradient family -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Residual, Untraceable])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", GRADIENT)
def test_gradient_family_equals_a_plain_loop(cls, shape, method):
    model = cls()
    x = images(*shape)
    targets = per_image_targets(shape[0])
    explanation = get_method(method)(model, "layer")(x, targets)
    check_maps(explanation, "layer", reference_maps(model, x, "layer", method, targets))


@pytest.mark.parametrize("method", GRADIENT)
def test_gradient_family_on_units_and_every_form_of_class_target(method):
    model = Residual()
    x = images(2, 8, 10)
    units = [UnitTarget("unit", 2), UnitTarget("unit", 4, (1, 3))]
    check_maps(get_method(method)(model, "layer")(x, units), "layer",
               reference_maps(model, x, "layer", method, [units, units]))
    expected = reference_maps(model, x, "layer", method, [[2], [2]])
    for spec in (2, [2, 2], torch.tensor([2, 2]), torch.tensor([[2], [2]]), ClassTarget(2)):
        check_maps(get_method(method)(model, "layer")(x, spec), "layer", expected)
    probability = ClassTarget([[0, 1], [2, 3]], "probability")
    check_maps(get_method(method)(model, "layer")(x, probability), "layer",
               reference_maps(model, x, "layer", method, [[0, 1], [2, 3]], "probability"))


def test_layercam_scales_a_shallow_layer_before_the_fusion():
    model = Residual()
    x = images(2, 8, 10)
    explanation = get_method("layercam")(model, ["stem.1", "layer"], scale={"stem.1": 2.0})(x, [[1], [2]])
    for n, cls in enumerate((1, 2)):
        shallow = gradient_reference("layercam", *grad_and_activation(model, x[n : n + 1], "stem.1", cls))
        shallow = torch.tanh(2.0 * shallow / shallow.max())
        deep = gradient_reference("layercam", *grad_and_activation(model, x[n : n + 1], "layer", cls))
        close(explanation.raw["stem.1"][n, 0], shallow, what="scaled raw map")
        close(explanation.raw["layer"][n, 0], deep, what="unscaled raw map")
        close(explanation.maps[n, 0], (s_up(shallow, (8, 10)) + s_up(deep, (8, 10))) / 2, what="fused")


# -- the gradient-free family --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Residual, Untraceable])
@pytest.mark.parametrize("shape", [(3, 6, 8), (1, 2, 2)])
def test_gradient_free_family_equals_plain_loops(cls, shape):
    model = cls()
    x = images(*shape)
    targets = per_image_targets(shape[0])
    check_maps(get_method("ablationcam")(model, "layer", batch_size=3)(x, targets), "layer",
               ablation_reference(model, x, "layer", targets))
    check_maps(get_method("reciprocam")(model, "layer", batch_size=4)(x, targets), "layer",
               recipro_reference(model, x, "layer", targets))
    steps = 3
    check_maps(
        get_method("iscam")(model, "layer", n_steps=steps, batch_size=5)(x, targets), "layer",
        masked_reference(model, x, "layer", targets,
                         lambda im, m: [im * m * (i * (i + 1) / (2 * steps)) for i in range(1, steps + 1)]),
    )
    height, width = shape[1:]
    for noise, channels in (("mask", 1), ("input", 3)):
        delta = torch.randn((3, channels, height, width), generator=torch.Generator().manual_seed(7),
                            dtype=torch.float64) * 0.5
        if noise == "mask":
            versions = lambda im, m: [im * (m + d) for d in delta]  # noqa: E731
        else:
            versions = lambda im, m: [im * m + d for d in delta]  # noqa: E731
        method = get_method("sscam")(model, "layer", n_samples=3, sigma=0.5, seed=7, noise=noise, batch_size=5)
        check_maps(method(x, targets), "layer", masked_reference(model, x, "layer", targets, versions))


def test_gradient_free_family_on_unit_targets():
    model = Residual()
    x = images(1, 6, 8)
    units = [UnitTarget("unit", 1), UnitTarget("unit", 3, (2, 1))]

    def unit_score(image, unit, replace=None):
        out, _, store = run(model, image, "layer", replace=replace, units=("unit",))
        return float(score_of(out, unit, "unit", store))

    with torch.no_grad():
        _, a, _ = run(model, x, "layer")
        a = a.clone()
        ablation, recipro, iscam = [], [], []
        for unit in units:
            y = unit_score(x, unit)
            weights = []
            for k in range(a.shape[1]):
                ablated = a.clone()
                ablated[:, k] = 0
                weights.append((y - unit_score(x, unit, ablated)) / y)
            ablation.append(torch.relu(torch.einsum("k,khw->hw", torch.tensor(weights, dtype=a.dtype), a[0])))
            scores = torch.zeros(a.shape[-2:], dtype=a.dtype)
            for i, j in np.ndindex(*a.shape[-2:]):
                kept = torch.zeros_like(a)
                kept[..., i, j] = a[..., i, j]
                scores[i, j] = unit_score(x, unit, kept)
            recipro.append(torch.relu(scores))
            weights = [
                sum(unit_score(x * s_up(a[0, k], (6, 8)) * (i * (i + 1) / 4), unit) for i in (1, 2)) / 2
                for k in range(a.shape[1])
            ]
            iscam.append(torch.relu(torch.einsum("k,khw->hw", torch.tensor(weights, dtype=a.dtype), a[0])))
    check_maps(get_method("ablationcam")(model, "layer")(x, units), "layer", torch.stack(ablation)[None])
    check_maps(get_method("reciprocam")(model, "layer")(x, units), "layer", torch.stack(recipro)[None])
    check_maps(get_method("iscam")(model, "layer", n_steps=2)(x, units), "layer", torch.stack(iscam)[None])


def test_sscam_seed_reproducible_different_seeds_differ():
    model, x = Residual(), images(2, 6, 8)
    first = get_method("sscam")(model, "layer", n_samples=2, seed=1)(x)
    again = get_method("sscam")(model, "layer", n_samples=2, seed=1)(x)
    other = get_method("sscam")(model, "layer", n_samples=2, seed=2)(x)
    assert torch.equal(first.maps, again.maps) and torch.equal(first.weights["layer"], again.weights["layer"])
    assert not torch.allclose(first.weights["layer"], other.weights["layer"])


def test_sscam_draws_the_same_noise_in_float32_and_float64():
    """Fault: the noise was drawn in the images' dtype, and torch draws other numbers from one
    seed in float32 than in float64: a float32 copy of a model got another map than the model."""
    model, x = Residual(), images(2, 6, 8)
    for noise in ("mask", "input"):
        method = get_method("sscam")
        double = method(model, "layer", n_samples=3, sigma=1.0, seed=4, noise=noise)(x, [[1], [2]])
        single = method(copy.deepcopy(model).float(), "layer", n_samples=3, sigma=1.0, seed=4, noise=noise)(
            x.float(), [[1], [2]]
        )
        close(single.weights["layer"], double.weights["layer"], 1e-4, f"SS-CAM {noise} float32")


# -- every new method ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW_METHODS)
def test_batch_equals_one_by_one(method):
    model = Residual()
    x = images(5, 4, 6)
    targets = per_image_targets(5)
    explainer = get_method(method)(model, "layer", **QUICK.get(method, {}))
    batch = explainer(x, targets)
    for n in range(5):
        one = explainer(x[n : n + 1], [targets[n]])
        close(batch.raw["layer"][n : n + 1], one.raw["layer"], 1e-12, f"{method} raw {n}")
        close(batch.maps[n : n + 1], one.maps, 1e-12, f"{method} maps {n}")
        close(batch.weights["layer"][n : n + 1], one.weights["layer"], 1e-12, f"{method} weights {n}")


@pytest.mark.parametrize("method", NEW_METHODS)
def test_float32_gives_float64_maps_up_to_rounding(method):
    model, x = Residual(), images(2, 6, 8)
    options = QUICK.get(method, {})
    double = get_method(method)(model, "layer", **options)(x, [[1, 3], [0, 2]])
    single = get_method(method)(copy.deepcopy(model).float(), "layer", **options)(x.float(), [[1, 3], [0, 2]])
    assert single.maps.dtype == torch.float32
    close(single.raw["layer"], double.raw["layer"], 1e-4, method)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_model_state_is_restored(method):
    model = Residual().train()
    model.fc.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    explainer = get_method(method)(model, "layer", **QUICK.get(method, {}))
    explainer(images(2, 4, 6), [[1], [2]])
    failing = [UnitTarget("unit", 1)] if method == "gradcam++-general" else torch.tensor([[1], [9]])
    with pytest.raises(CamlensError):
        explainer(images(2, 4, 6), failing)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


class Flat(nn.Module):
    """conv -> ReLU (the target layer) -> SiLU -> spatial mean -> linear: ``zero``, every channel
    of the layer is 0; ``constant``, every channel is constant over positions; ``some``, two of
    four channels are 0."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            if mode == "zero":
                self.conv.bias.fill_(-100)
            elif mode == "constant":
                self.conv.weight.zero_()
                self.conv.bias.copy_(torch.tensor([1.0, 0.0, 2.0, -1.0]))
            else:
                self.conv.bias[:2] = -100
        self.layer = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.silu(self.layer(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("mode", ["zero", "constant", "some"])
def test_zero_and_constant_layers_give_finite_maps(mode):
    x = images(2, 5, 7)
    for method in NEW_METHODS:
        for wrap in (lambda m: m, EigenSmooth, AugmentSmooth):
            if method == "reciprocam" and wrap is EigenSmooth:
                continue
            explanation = wrap(get_method(method)(Flat(mode), "layer", **QUICK.get(method, {})))(x)
            assert torch.isfinite(explanation.maps).all(), (mode, method, wrap)
            assert all(torch.isfinite(r).all() for r in explanation.raw.values())
            if mode != "some":  # nothing varies over positions: no map
                assert explanation.maps.abs().max() == 0, (mode, method, wrap)


def test_no_hard_coded_device():
    import camlens.methods.family as family
    import camlens.methods.gradcampp_general as general
    import camlens.methods.gradient_free as free
    import camlens.methods.meta as meta

    for module in (family, general, free, meta):
        source = inspect.getsource(module)
        assert "cuda" not in source and ".cpu()" not in source, module.__name__


# -- the general Grad-CAM++ ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["probability", "exp"])
def test_general_gradcampp_equals_torch_autograd_functional(kind):
    """A curved head (SiLU after a residual block) and a softmax score: the first, second and
    third diagonal derivatives from torch.autograd.functional, element by element."""
    model = Residual(inplace=False)
    x = images(1, 4, 4)
    explanation = GradCAMPlusPlusGeneral(model, "layer", score=kind, chunk_size=7)(x, [[1, 3]])
    check_maps(explanation, "layer", general_reference(model, x, "layer", [[1, 3]], kind), 1e-9)


@pytest.mark.parametrize("cls", [Residual, Untraceable])
@pytest.mark.parametrize("optimize", [False, True])
def test_general_gradcampp_after_an_in_place_operation(cls, optimize):
    """Fault: the part after the layer (a ReLU(inplace=True) there) ran on the method's own
    activations, which it changed in place: the weights and the map were made from ReLU(A)."""
    model = cls(inplace=True)
    x = images(2, 4, 4)
    targets = [[1], [2]]
    store = []
    handle = model.layer.register_forward_hook(lambda module, inputs, out: store.append(out.detach().clone()))
    model(x)
    handle.remove()
    assert store[0].min() < 0  # the ReLU after the layer changes it
    explanation = GradCAMPlusPlusGeneral(model, "layer", optimize=optimize)(x, targets)
    check_maps(explanation, "layer", general_reference(model, x, "layer", targets, "probability"), 1e-9)


class LinearHead(nn.Module):
    """stem -> ``layer`` (ReLU) -> flatten -> linear: every logit is linear in the layer's
    output, without a global pool (so one direction per channel and position)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.layer = nn.ReLU()
        self.fc = nn.Linear(4 * 2 * 3, 3)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(self.stem(x)).flatten(1))


def test_general_gradcampp_is_the_closed_form_for_exp_of_a_linear_score():
    """Y = exp(S), S linear in A: d^n Y/dA^n = exp(S) g^n, so alpha is the closed form's and the
    weights are exp(S) times gradcam++'s: the same map."""
    model, x = LinearHead(), images(3, 4, 6)
    targets = per_image_targets(3, 3)
    general = GradCAMPlusPlusGeneral(model, "layer", score="exp", batch_size=5)(x, targets)
    closed = GradCAMPlusPlus(model, "layer")(x, targets)
    logits = model(x).detach()
    factor = torch.stack([logits[n, targets[n]].exp() for n in range(3)])
    close(general.weights["layer"], factor[..., None] * closed.weights["layer"], 1e-9, "weights")
    close(general.maps, closed.maps, 1e-9, "maps")


def test_general_gradcampp_takes_batch_size_as_its_chunk_size():
    """Known gap: --batch-size reaches every method whose constructor takes batch_size."""
    from camlens.cli.common import method_objects

    model, x = Residual(), images(2, 4, 4)
    assert GradCAMPlusPlusGeneral(model).chunk_size == 64
    assert GradCAMPlusPlusGeneral(model, batch_size=7).chunk_size == 7
    assert GradCAMPlusPlusGeneral(model, chunk_size=5).chunk_size == 5
    assert GradCAMPlusPlusGeneral(model, chunk_size=5, batch_size=7).chunk_size == 5  # its own name wins
    assert method_objects(model, ["gradcam++-general"], "layer", 3, 0)["gradcam++-general"].chunk_size == 3
    assert method_objects(model, ["gradcam++-general"], "layer", None, 0)["gradcam++-general"].chunk_size == 64
    for bad in (0, -1, 2.0, True):
        with pytest.raises(CamlensError, match="batch_size must be a positive integer"):
            GradCAMPlusPlusGeneral(model, batch_size=bad)
    totals = []
    chunked = GradCAMPlusPlusGeneral(model, "layer", batch_size=3)(x, [[1], [2]], progress=lambda d, t: totals.append(d))
    whole = GradCAMPlusPlusGeneral(model, "layer")(x, [[1], [2]])
    close(chunked.weights["layer"], whole.weights["layer"], 1e-12, "chunks")
    assert totals[:2] == [3, 6]  # chunks of three directions
    assert chunked.options == {"score": "probability", "chunk_size": 3, "max_directions": 50_000}


# -- the meta-methods ----------------------------------------------------------------------------


def _resized(image: torch.Tensor, size) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


@pytest.mark.parametrize("method", ["xgradcam", "eigencam"])
def test_aug_smooth_is_the_mean_of_the_copies_maps_mapped_back(method):
    """Each copy (flipped or not, resized by 1 or 1.5 to a non-square size, times 0.9 or 1)
    explained by the plain loop, its normalised map un-flipped and resized back, averaged."""
    model, x = Residual(), images(2, 8, 10)
    targets = [[1, 2], [3, 0]]
    height, width = x.shape[-2:]
    smoothed = AugmentSmooth(get_method(method)(model, "layer"), flip=True, scales=(1.0, 1.5), factors=(0.9,))
    got = smoothed(x, targets)
    expected = torch.zeros_like(got.maps)
    for n in range(2):
        for scale in (1.0, 1.5):
            size = (round(scale * height), round(scale * width))
            for flip in (False, True):
                for factor in (0.9, 1.0):
                    copy_ = _resized(x[n : n + 1], size)
                    copy_ = (copy_.flip(-1) if flip else copy_) * factor
                    for t, cls in enumerate(targets[n]):
                        raw = gradient_reference(method, *grad_and_activation(model, copy_, "layer", cls))
                        mapped = s_up(raw, size)
                        mapped = mapped.flip(-1) if flip else mapped
                        expected[n, t] += _resized(mapped[None, None], (height, width))[0, 0] / 8
    close(got.maps, expected, 1e-9, "aug-smoothed maps")
    assert got.options["aug_smooth"] == {"flip": True, "scales": [1.0, 1.5], "factors": [0.9, 1.0]}


def symmetric() -> nn.Module:
    """Left-right symmetric kernels, stride 1, a GAP head: flip-equivariant features."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),
    ).double()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return model.eval()


@pytest.mark.parametrize("method", NEW_METHODS)
def test_aug_smooth_of_a_flip_equivariant_model_is_the_plain_map(method):
    model = symmetric()
    torch.manual_seed(3)
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    explainer = get_method(method)(model, "3", **QUICK.get(method, {}))
    plain = explainer(x, [[0, 1], [2, 3]])
    smoothed = AugmentSmooth(explainer, flip=True, factors=(1.0,))(x, [[0, 1], [2, 3]])
    close(smoothed.maps, plain.maps, 1e-9, method)
    close(smoothed.raw["3"], plain.raw["3"], 1e-9, method)


@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "hirescam", "layercam", "ablationcam"])
def test_eigen_smooth_is_the_principal_component_of_the_weighted_activations(method):
    model, x = Residual(), images(3, 8, 10)
    targets = [[1, 2]] * 3
    got = EigenSmooth(get_method(method)(model, "layer"))(x, targets)
    plain = get_method(method)(model, "layer")(x, targets)
    _, activation, _ = run(model, x, "layer")
    activation = activation.detach()
    expected = torch.zeros_like(got.raw["layer"])
    for n in range(3):
        for t in range(2):
            weight = plain.weights["layer"][n, t]  # the method's weights, checked by the loops above
            weighted = (weight if weight.dim() == 3 else weight[:, None, None]) * activation[n]
            expected[n, t] = eigen_reference(weighted)
    check_maps(got, "layer", expected)
    assert got.options == {**plain.options, "eigen_smooth": True}


def test_eigen_smooth_keeps_layercams_scaling():
    """Fault: EigenSmooth replaced LayerCAM's raw map, its scaling of shallow layers with it,
    while the options still said scale 2."""
    model, x = Residual(), images(2, 8, 10)
    layercam = get_method("layercam")(model, "layer", scale=2.0)
    smoothed = EigenSmooth(layercam)(x, [[1], [2]])
    unscaled = EigenSmooth(get_method("layercam")(model, "layer"))(x, [[1], [2]])
    raw = unscaled.raw["layer"]
    close(smoothed.raw["layer"], torch.tanh(2.0 * raw / raw.amax(dim=(-2, -1), keepdim=True)), 1e-12)
    assert smoothed.options["scale"] == 2.0 and smoothed.options["eigen_smooth"] is True


def test_eigen_smooth_refuses_recipro_cam_in_one_line():
    """Fault: Recipro-CAM's map is a score per position, not a sum of weighted channels;
    EigenSmooth broadcast its (N, T, h, w) scores against the activations and failed with a
    RuntimeError from torch."""
    model = Residual()
    with pytest.raises(CamlensError, match="Recipro-CAM's map is not a weighted sum of channels"):
        EigenSmooth(get_method("reciprocam")(model, "layer"))
    with pytest.raises(CamlensError, match="not a weighted sum"):
        smoothed(get_method("reciprocam")(model, "layer"), aug_smooth=True, eigen_smooth=True)
    AugmentSmooth(get_method("reciprocam")(model, "layer"))(images(1, 4, 4))  # aug smoothing applies


def test_smoothed_methods_say_so_in_their_display_name():
    """Known gap: a smoothed method showed its method's display name, so figures and tables
    could not tell Grad-CAM from smoothed Grad-CAM. Its registry name stays the method's."""
    model = Residual()
    gradcam = GradCAM(model, "layer")
    assert AugmentSmooth(gradcam).display_name == "Grad-CAM (aug-smooth)"
    assert EigenSmooth(gradcam).display_name == "Grad-CAM (eigen-smooth)"
    both = smoothed(gradcam, aug_smooth=True, eigen_smooth=True)
    assert both.display_name == "Grad-CAM (aug-smooth, eigen-smooth)"
    assert smoothed(gradcam).display_name == "Grad-CAM"
    for wrapper in (AugmentSmooth(gradcam), EigenSmooth(gradcam), both):
        assert wrapper.name == "gradcam" and get_method(wrapper.name) is GradCAM
        assert wrapper(images(1, 4, 4)).method == "gradcam"
    assert gradcam.display_name == "Grad-CAM" and GradCAM.display_name == "Grad-CAM"  # untouched
    layercam = get_method("layercam")(model, "layer")
    assert smoothed(layercam, eigen_smooth=True).display_name == "LayerCAM (eigen-smooth)"


def test_explain_titles_say_the_smoothing(tmp_path, monkeypatch, capsys):
    import importlib

    explain_cli = importlib.import_module("camlens.cli.explain")  # the package exports a command of that name
    from helpers import SAMPLES
    from helpers import run as run_cli

    (tmp_path / "tinyreview10.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    titles = []
    real = explain_cli.comparison_figure
    monkeypatch.setattr(explain_cli, "comparison_figure", lambda rows, *args, **kwargs: (
        titles.extend(panel.title for row in rows for panel in row), real(rows, *args, **kwargs))[1])
    code, _, err = run_cli(["explain", SAMPLES / "coffee.png", "--model", "tinyreview10:factory", "--input-size",
                            "16", "-m", "gradcam", "--no-optimize", "--aug-smooth", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert any(title.startswith("Grad-CAM (aug-smooth)") for title in titles), titles


def test_evaluate_resumes_gradcampp_general_with_another_batch_size(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from helpers import run as run_cli

    (tmp_path / "evalreview10.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=4), nn.Softplus(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    for index, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        pixels = np.random.default_rng(index).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / name / "0.png")
    args = ["evaluate", tmp_path / "data", "--model", "evalreview10:build", "--class-names", tmp_path / "names.txt",
            "--input-size", "16", "--steps", "2", "-m", "gradcam++-general", "--limit", "1", "--out", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--batch-size", "3"], capsys)
    assert code == 0, err


def test_smooth_gradcampp_draws_the_same_noise_in_float32_and_float64():
    model, x = Residual(), images(2, 6, 8)
    method = get_method("smoothgradcam++")
    double = method(model, "layer", n_samples=3, noise_level=0.3, seed=4)(x, [[1], [2]])
    single = method(copy.deepcopy(model).float(), "layer", n_samples=3, noise_level=0.3, seed=4)(x.float(), [[1], [2]])
    close(single.weights["layer"], double.weights["layer"], 1e-3, "Smooth Grad-CAM++ float32")
