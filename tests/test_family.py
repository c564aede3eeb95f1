"""XGrad-CAM, LayerCAM, HiResCAM, element-wise Grad-CAM, Eigen-Grad-CAM and Eigen-CAM
(camlens.methods.family) against independent computations.

The references are plain per-image loops: the target layer's output captured by a hook of the
test's own, its gradient from ``torch.autograd.grad``, the formulas written out channel by
channel, and the principal component from NumPy's SVD. Models are tiny and in float64.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import count_rows, make_tiny
from torch import nn

import camlens
from camlens import CamlensError
from camlens.methods import get_method, list_methods
from camlens.methods.family import principal_axis, projection_map, xgradcam_weights
from camlens.targets import TopK

FAMILY = ("xgradcam", "hirescam", "layercam", "gradcam-elementwise", "eigengradcam", "eigencam")
ATOL = 1e-10


class Spatial(nn.Module):
    """``features`` (conv-ReLU-conv-SiLU, 6 x 6 for 12 x 12 inputs) -> conv -> tanh -> linear
    over every position: no global pooling, so the gradient at ``features`` varies over
    positions and changes sign, and with the SiLU's negative values the six methods give six
    different maps."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Sequential(
            nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def spatial() -> Spatial:
    return Spatial().double().eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


# -- the references ------------------------------------------------------------------------------


def captured(model: nn.Module, image: torch.Tensor, cls: int, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation A (K, h, w) of ``layer`` and the gradient of logit ``cls`` with respect to it."""
    store = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, out: store.append(out))
    try:
        logit = model(image[None])[0, cls]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logit, store[0])
    return store[0][0].detach(), grad[0]


def eigen_projection(features: torch.Tensor) -> torch.Tensor:
    """ReLU of the projection of (K, h, w) on its first principal component, by NumPy's SVD,
    signed so that the projection's largest magnitude is positive."""
    k, h, w = features.shape
    samples = features.reshape(k, h * w).T.numpy()
    samples = samples - samples.mean(axis=0)
    _, _, vt = np.linalg.svd(samples, full_matrices=False)
    projection = samples @ vt[0]
    if -projection.min() > projection.max():
        projection = -projection
    return torch.from_numpy(np.maximum(projection, 0).reshape(h, w))


def reference_raw(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The raw map (h, w) of ``method`` from one activation (K, h, w) and its gradient."""
    channels = range(a.shape[0])
    if method == "xgradcam":
        total = torch.zeros_like(a[0])
        for k in channels:
            size = float(a[k].sum())
            weight = float((a[k] * g[k]).sum()) / size if size != 0 else 0.0
            total = total + weight * a[k]
        return torch.relu(total)
    if method == "hirescam":
        return torch.relu(sum(g[k] * a[k] for k in channels))
    if method == "layercam":
        return torch.relu(sum(torch.relu(g[k]) * a[k] for k in channels))
    if method == "gradcam-elementwise":
        return torch.relu(sum(torch.relu(g[k] * a[k]) for k in channels))
    if method == "eigengradcam":
        return eigen_projection(g * a)
    if method == "eigencam":
        return eigen_projection(a)
    raise AssertionError(method)


def reference_map(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """s(Up(raw)): bilinear upsampling, then min-max to [0, 1] (all zeros when flat)."""
    up = F.interpolate(raw[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    span = up.max() - up.min()
    return torch.zeros_like(up) if span == 0 else (up - up.min()) / span


# -- against the references ----------------------------------------------------------------------


@pytest.mark.parametrize("method", FAMILY)
def test_maps_equal_a_plain_loop(spatial, batch, method):
    explanation = get_method(method)(spatial, "features")(batch, TopK(2))
    assert explanation.maps.shape == (3, 2, 12, 12)
    assert explanation.raw["features"].shape == (3, 2, 6, 6)
    for n in range(3):
        for t in range(2):
            a, g = captured(spatial, batch[n], int(explanation.targets[n, t]), "features")
            raw = reference_raw(method, a, g)
            assert raw.max() > 0
            torch.testing.assert_close(explanation.raw["features"][n, t], raw, rtol=0, atol=ATOL)
            torch.testing.assert_close(explanation.maps[n, t], reference_map(raw, (12, 12)), rtol=0, atol=ATOL)


def test_the_reference_model_tells_the_methods_apart(spatial, batch):
    """The gradient at ``features`` varies over positions and changes sign, and so does the
    activation, so a method that fell back on another's formula would fail the test above."""
    a, g = captured(spatial, batch[0], 0, "features")
    assert (g > 0).any() and (g < 0).any() and (a < 0).any()
    assert (g.flatten(1).std(dim=1) > 1e-3).all()
    raws = {method: reference_raw(method, a, g) for method in FAMILY}
    for first in FAMILY:
        for second in FAMILY:
            if first < second:
                assert (raws[first] - raws[second]).abs().max() > 1e-3, (first, second)


@pytest.mark.parametrize("method", FAMILY)
def test_batch_equals_one_by_one(spatial, batch, method):
    cam = get_method(method)(spatial, "features")
    together = cam(batch, TopK(2))
    alone = [cam(batch[n : n + 1], TopK(2)) for n in range(3)]
    torch.testing.assert_close(together.maps, torch.cat([e.maps for e in alone]), rtol=0, atol=1e-12)
    for field in ("raw", "weights"):
        torch.testing.assert_close(
            getattr(together, field)["features"],
            torch.cat([getattr(e, field)["features"] for e in alone]),
            rtol=0,
            atol=1e-12,
        )


@pytest.mark.parametrize("method", FAMILY)
def test_the_inference_copy_gives_the_same_maps(method, images):
    """optimize=True (batch norms folded, channels-last) gives the model's own maps."""
    plain = get_method(method)(make_tiny(), "features")(images, TopK(2))
    copy = get_method(method)(make_tiny(), "features", optimize=True)(images, TopK(2))
    torch.testing.assert_close(copy.maps, plain.maps, rtol=0, atol=1e-9)
    torch.testing.assert_close(copy.raw["features"], plain.raw["features"], rtol=0, atol=1e-9)


def test_half_precision_eigen_maps(batch):
    """torch.linalg.svd has no float16: the principal axis is found in float32."""
    axis = principal_axis(batch.half())
    assert axis.dtype == torch.float16
    torch.testing.assert_close(axis.float(), principal_axis(batch.float()), rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "method, shape",
    [
        ("xgradcam", (3, 2, 8)),
        ("hirescam", (3, 2, 8, 6, 6)),
        ("layercam", (3, 2, 8, 6, 6)),
        ("gradcam-elementwise", (3, 2, 8, 6, 6)),
        ("eigengradcam", (3, 2, 8, 6, 6)),
        ("eigencam", (3, 2, 8)),
    ],
)
def test_weight_shapes_and_a_channel_subset(spatial, batch, method, shape):
    """Weights per activation (N, T, K, h, w) and per channel (N, T, K) alike: the subset's
    maps are the reference's on those channels only, other channels weigh 0."""
    cam = get_method(method)(spatial, "features")
    assert cam(batch, TopK(2)).weights["features"].shape == shape
    subset = [1, 4, 6]
    explanation = cam(batch, TopK(2), channels=subset)
    weights = explanation.weights["features"]
    assert weights.shape == shape
    others = [k for k in range(8) if k not in subset]
    assert (weights[:, :, others] == 0).all() and (weights[:, :, subset] != 0).any()
    for n in range(3):
        for t in range(2):
            a, g = captured(spatial, batch[n], int(explanation.targets[n, t]), "features")
            raw = reference_raw(method, a[subset], g[subset])
            torch.testing.assert_close(explanation.raw["features"][n, t], raw, rtol=0, atol=ATOL)


# -- identities with Grad-CAM --------------------------------------------------------------------


def test_identities_with_gradcam_for_a_gap_linear_head(images):
    """A global-average-pool + linear head gives the same gradient W[c, k] / hw at every
    position. Then HiResCAM is Grad-CAM, and so is XGrad-CAM (sum_ij A_ij / sum A * g = g);
    with non-negative classifier weights the gradient is non-negative and LayerCAM and
    element-wise Grad-CAM (ReLU(g A) = g A after the layer's ReLU) are Grad-CAM too."""
    model = make_tiny()
    with torch.no_grad():
        model.fc.weight.abs_()
    gradcam = camlens.GradCAM(model, "features")(images, TopK(2))
    assert gradcam.raw["features"].amax(dim=(-2, -1)).min() > 0
    for method in ("hirescam", "xgradcam", "layercam", "gradcam-elementwise"):
        explanation = get_method(method)(model, "features")(images, TopK(2))
        torch.testing.assert_close(explanation.raw["features"], gradcam.raw["features"], rtol=0, atol=ATOL)
        torch.testing.assert_close(explanation.maps, gradcam.maps, rtol=0, atol=ATOL)
    hires = camlens.HiResCAM(model, "features")(images, TopK(2)).weights["features"]
    torch.testing.assert_close(hires.mean(dim=(-2, -1)), gradcam.weights["features"], rtol=0, atol=1e-12)
    assert (hires.flatten(-2).std(dim=-1) < 1e-12).all()  # constant: the premise holds


def test_elementwise_gradcam_is_layercam_on_a_non_negative_layer(images):
    """ReLU(g A) = ReLU(g) A where A >= 0 (after a ReLU), whatever the gradient."""
    model = make_tiny()
    assert (model.fc.weight < 0).any()
    layercam = camlens.LayerCAM(model, "features")(images, TopK(2))
    elementwise = camlens.GradCAMElementWise(model, "features")(images, TopK(2))
    torch.testing.assert_close(elementwise.raw["features"], layercam.raw["features"], rtol=0, atol=ATOL)
    torch.testing.assert_close(elementwise.maps, layercam.maps, rtol=0, atol=ATOL)


def test_the_identities_need_their_premises(images):
    """With mixed-sign classifier weights LayerCAM is no longer Grad-CAM: the identity test
    above can fail."""
    model = make_tiny()
    assert (model.fc.weight < 0).any()
    gradcam = camlens.GradCAM(model, "features")(images)
    layercam = camlens.LayerCAM(model, "features")(images)
    assert (layercam.raw["features"] - gradcam.raw["features"]).abs().max() > 1e-3


# -- XGrad-CAM's undefined weights ---------------------------------------------------------------


def test_xgradcam_weight_is_zero_where_the_channel_sums_to_zero():
    torch.manual_seed(0)
    activation = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    activation[0, 0] = 0  # a dead channel after a ReLU
    activation[0, 1, :2] = 1.0
    activation[0, 1, 2:] = -1.0  # sums to 0 exactly
    grad = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    weights = xgradcam_weights(activation, grad)
    assert weights.shape == (1, 2, 3) and torch.isfinite(weights).all()
    assert (weights[:, :, :2] == 0).all()
    for t in range(2):
        a, g = activation[0, 2], grad[0, t, 2]
        torch.testing.assert_close(weights[0, t, 2], (a * g).sum() / a.sum(), rtol=0, atol=1e-14)


# -- the principal component ---------------------------------------------------------------------


def test_principal_axis_is_the_first_right_singular_vector_signed_by_the_projection():
    torch.manual_seed(2)
    features = torch.randn(4, 5, 3, 7, dtype=torch.float64)
    axis = principal_axis(features)
    assert axis.shape == (4, 5)
    torch.testing.assert_close(axis.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    for n in range(4):
        samples = features[n].reshape(5, -1).T.numpy()
        samples = samples - samples.mean(axis=0)
        vt = np.linalg.svd(samples)[2]
        mine = axis[n].numpy()
        assert np.allclose(mine, vt[0], atol=1e-12) or np.allclose(mine, -vt[0], atol=1e-12)
        projection = samples @ mine
        assert projection.max() >= -projection.min()
    # The sign follows the data: the opposite features get the opposite axis.
    torch.testing.assert_close(principal_axis(-features), -axis, rtol=0, atol=1e-12)


def test_a_flat_layer_gives_a_zero_map_not_nan():
    activation = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    axis = principal_axis(activation)
    assert torch.isfinite(axis).all()
    raw = projection_map(axis[:, None], activation)
    assert raw.shape == (2, 1, 4, 4) and (raw == 0).all()


def test_eigencam_is_gradient_free_one_forward_and_class_agnostic(spatial, batch, no_inference_copy):
    rows, handle = count_rows(spatial)
    try:
        explanation = camlens.EigenCAM(spatial, "features")(batch, TopK(3))
    finally:
        handle.remove()
    assert rows == [3]
    assert not camlens.EigenCAM.needs_gradients
    for t in (1, 2):
        assert torch.equal(explanation.maps[:, t], explanation.maps[:, 0])
        assert torch.equal(explanation.weights["features"][:, t], explanation.weights["features"][:, 0])


# -- LayerCAM's scaling --------------------------------------------------------------------------


def test_layercam_scales_the_named_layers_only(spatial, batch):
    """tanh(gamma M / max M) on the raw map of the layers named, before normalisation; the
    other layer's map as the paper leaves the last layer's, unscaled."""
    layers = ["features.1", "features"]
    unscaled = camlens.LayerCAM(spatial, layers)(batch)
    assert unscaled.options == {"scale": None}
    shallow = camlens.LayerCAM(spatial, layers, scale={"features.1": 2.0})(batch)
    everywhere = camlens.LayerCAM(spatial, layers, scale=3)(batch)
    assert shallow.options == {"scale": {"features.1": 2.0}} and everywhere.options == {"scale": 3.0}
    for n in range(3):
        cls = int(unscaled.targets[n, 0])
        references = {}
        for layer in layers:
            a, g = captured(spatial, batch[n], cls, layer)
            references[layer] = reference_raw("layercam", a, g)
            torch.testing.assert_close(unscaled.raw[layer][n, 0], references[layer], rtol=0, atol=ATOL)
        deep, low = references["features"], references["features.1"]
        torch.testing.assert_close(shallow.raw["features"][n, 0], deep, rtol=0, atol=ATOL)
        torch.testing.assert_close(shallow.raw["features.1"][n, 0], torch.tanh(2 * low / low.max()), rtol=0, atol=ATOL)
        for layer, raw in references.items():
            torch.testing.assert_close(everywhere.raw[layer][n, 0], torch.tanh(3 * raw / raw.max()), rtol=0, atol=ATOL)
        fused = (reference_map(torch.tanh(2 * low / low.max()), (12, 12)) + reference_map(deep, (12, 12))) / 2
        torch.testing.assert_close(shallow.maps[n, 0], fused, rtol=0, atol=ATOL)
    assert (shallow.maps - unscaled.maps).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [0, -2.0, float("nan"), float("inf"), True, "2", {"features": 0}])
def test_layercam_refuses_a_bad_scale(spatial, scale):
    with pytest.raises(CamlensError, match="scale"):
        camlens.LayerCAM(spatial, "features", scale=scale)


def test_layercam_scale_must_name_a_target_layer(spatial, batch):
    with pytest.raises(CamlensError, match="features.1.*not a target layer"):
        camlens.LayerCAM(spatial, "features", scale={"features.1": 2.0})(batch)
    with pytest.raises(CamlensError):
        camlens.LayerCAM(spatial, "features", scale={"no.such.layer": 2.0})


# -- the registry ----------------------------------------------------------------------------------


def test_registry_names_and_costs():
    listed = list_methods()
    for method in FAMILY:
        assert method in listed
        cost = "; one forward" if method == "eigencam" else "; one forward + backward"
        assert listed[method].endswith(cost), listed[method]
    for spelling in ("gradcam-elementwise", "gradcamelementwise", "GradCAM_ElementWise", "gradcam elementwise"):
        assert get_method(spelling) is camlens.GradCAMElementWise
    assert get_method("Eigen-Grad-CAM") is camlens.EigenGradCAM and get_method("XGrad-CAM") is camlens.XGradCAM
    assert get_method("gradcampp") is camlens.GradCAMPlusPlus
    with pytest.raises(CamlensError, match="did you mean gradcam-elementwise"):
        get_method("gradcam-elementwis")


# -- pytorch-grad-cam ----------------------------------------------------------------------------

PEER_CLASSES = {
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigengradcam": "EigenGradCAM",
    "eigencam": "EigenCAM",
}


@pytest.fixture(scope="module")
def pgc():
    """pytorch-grad-cam, imported as benchmarks/compare.py does (stand-ins for torchvision)."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip("pytorch-grad-cam is not installed (an optional peer)")
    compare = sys.modules.get("compare")
    if compare is None:
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
        spec = importlib.util.spec_from_file_location("compare", script)
        compare = importlib.util.module_from_spec(spec)
        sys.modules["compare"] = compare
        environment = dict(os.environ)
        try:
            spec.loader.exec_module(compare)
        finally:  # the script sets variables for its own process
            os.environ.clear()
            os.environ.update(environment)
    module = compare.import_pgc()
    if module is None:
        pytest.skip("pytorch-grad-cam cannot be imported here")
    return module


@pytest.mark.parametrize("method", FAMILY)
def test_maps_equal_pytorch_grad_cams(pgc, method, monkeypatch):
    """pytorch-grad-cam 1.5.7 in float32; its Eigen methods with its own sign-corrected
    projection (get_2d_projection_with_sign_correction), camlens's rule, since its default
    projection has an arbitrary sign."""
    import pytorch_grad_cam.eigen_cam
    import pytorch_grad_cam.eigen_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    for module in (pytorch_grad_cam.eigen_cam, pytorch_grad_cam.eigen_grad_cam):
        monkeypatch.setattr(module, "get_2d_projection", get_2d_projection_with_sign_correction)
    model = Spatial(seed=3).eval()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 12, 12)
    mine = get_method(method)(model, "features")(x)
    classes = mine.targets[:, 0].tolist()
    cam = getattr(pgc, PEER_CLASSES[method])(model=model, target_layers=[model.features])
    try:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    finally:
        cam.activations_and_grads.release()
    difference = (mine.maps[:, 0] - torch.from_numpy(theirs)).abs().max()
    assert difference < 1e-5, difference
