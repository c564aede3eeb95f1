"""Errors a user can cause: one exception type, a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens import CamlensError

from conftest import make_tiny


def raises(match):
    return pytest.raises(CamlensError, match=match)


def test_unknown_layer_lists_the_closest_names(tiny, images):
    with raises(r"unknown layer 'featurs'; closest: features"):
        camlens.GradCAM(tiny, "featurs")
    with raises(r"closest: features\.3"):
        camlens.explain(tiny, images, target_layer="features.33")


def test_module_not_in_the_model(tiny):
    with raises("not a submodule of the model"):
        camlens.GradCAM(tiny, nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("method", list(camlens.list_methods()))
def test_class_out_of_range_gives_the_valid_range(method, tiny, images):
    with raises(r"class 5 is out of range: the model has 5 classes \(valid: 0 to 4\)"):
        camlens.explain(tiny, images, method, targets=[0, 5, 1])
    with raises(r"class -1 is out of range"):
        camlens.explain(tiny, images, method, targets=-1)


def test_bad_targets(tiny, images):
    with raises("2 class targets for 3 image"):
        camlens.explain(tiny, images, targets=[1, 2])
    with raises("top-6 asked for, but the model has only 5 classes"):
        camlens.explain(tiny, images, targets=camlens.TopK(6))
    with raises("positive integer k"):
        camlens.TopK(0)
    with raises("class targets must be integers"):
        camlens.explain(tiny, images, targets=[0.5, 1.0, 2.0])
    with raises("unknown score 'prob'"):
        camlens.ClassTarget(1, score="prob")
    with raises("targets must be None"):
        camlens.explain(tiny, images, targets="cat")


def test_non_finite_images_are_refused_before_any_forward(tiny, images):
    images = images.clone()
    images[1, 0, 0, 0] = float("nan")
    images[2, 1, 3, 3] = float("inf")
    for method in camlens.list_methods():
        with raises(r"non-finite input images \(NaN or inf\) for image\(s\) \[1, 2\]"):
            camlens.explain(tiny, images, method)


class Overflows(nn.Module):
    """The tiny model, with an infinite logit for every image whose first pixel exceeds 100."""

    def __init__(self):
        super().__init__()
        self.net = make_tiny()

    def forward(self, x):
        return self.net(x) + torch.where(x[:, :1, 0, 0] > 100, float("inf"), 0.0)


def test_non_finite_scores_are_reported(images):
    images = images.clone()
    images[1, 0, 0, 0] = 1000.0
    for method in camlens.list_methods():
        with raises(r"non-finite model outputs \(NaN or inf\) for image\(s\) \[1\]"):
            camlens.explain(Overflows(), images, method, target_layer="net.features")


class SqrtHead(nn.Module):
    """sqrt of post-ReLU features: finite scores, infinite gradient where a feature is 0."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.features(x).sqrt().mean(dim=(2, 3)))


def test_non_finite_gradients_are_reported(images):
    torch.manual_seed(0)
    model = SqrtHead().double()
    assert torch.isfinite(model(images)).all()
    for method in ("gradcam", "gradcam++"):
        with raises(r"non-finite gradients at layer 'features'"):
            camlens.explain(model, images, method, target_layer="features")


def test_cam_needs_a_gap_linear_head(images):
    flat_head = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)).double()
    with raises("no nn.Linear with 4 inputs"):
        camlens.CAM(flat_head, "1")(images)
    relu_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with raises(r"not fc\(global average pool of layer '1'\)"):
        camlens.CAM(relu_head, "1")(images)
    with raises("fc must be an nn.Linear"):
        camlens.CAM(relu_head, "1", fc="0")


def test_cam_with_an_explicit_classifier(tiny, images):
    auto = camlens.CAM(tiny, "features")(images)
    given = camlens.CAM(tiny, "features", fc="fc")(images)
    torch.testing.assert_close(given.maps, auto.maps, rtol=0, atol=0)
    assert given.options == {"fc": "fc"}


def test_layer_without_a_feature_map(tiny, images):
    with raises(r"layer 'fc' outputs a tensor of shape \(3, 5\), not a feature map"):
        camlens.GradCAM(tiny, "fc")(images)


def test_layer_used_twice(images):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with raises("runs more than once in one forward pass"):
        camlens.GradCAM(Twice().double(), "conv")(images)


def test_layer_that_does_not_run(images):
    model = make_tiny()
    model.unused = nn.Conv2d(3, 3, 1).double()
    with raises("did not run during the forward pass"):
        camlens.GradCAM(model, "unused")(images)


def test_model_without_class_scores(images):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_tiny()

        def forward(self, x):
            logits = self.net(x)
            return logits, logits.softmax(1)

    with raises(r"the model returned tuple; camlens needs class scores of shape \(3, classes\)"):
        camlens.explain(Pair(), images, target_layer="net.features")


def test_bad_images(tiny):
    with raises("images must be a torch.Tensor"):
        camlens.explain(tiny, [[1.0]])
    with raises(r"images must have shape \(N, C, H, W\)"):
        camlens.explain(tiny, torch.zeros(12, 12))
    with raises("float tensor"):
        camlens.explain(tiny, torch.zeros(1, 3, 12, 12, dtype=torch.uint8))
    with raises("model must be a torch.nn.Module"):
        camlens.GradCAM("resnet")


def test_unknown_method_and_options(tiny, images):
    with raises(r"unknown method 'gradcm'; did you mean gradcam"):
        camlens.explain(tiny, images, "gradcm")
    for alias in ("Grad-CAM++", "gradcampp", "smooth_grad_cam++", "Score-CAM"):
        assert camlens.get_method(alias).name in camlens.list_methods()
    with raises(r"unknown option\(s\) n_samples for method 'gradcam' \(its options: optimize, compile, output, reshape\)"):
        camlens.explain(tiny, images, "gradcam", n_samples=3)
    with raises(r"its options: score, baseline, channel_softmax, batch_size"):
        camlens.explain(tiny, images, "scorecam", noise_level=0.1)


def test_bad_option_values(tiny, images):
    with raises("n_samples must be a positive integer"):
        camlens.SmoothGradCAMPlusPlus(tiny, n_samples=0)
    with raises("batch_size must be a positive integer"):
        camlens.ScoreCAM(tiny, batch_size=0)
    with raises("noise_level must be a finite number >= 0"):
        camlens.SmoothGradCAMPlusPlus(tiny, noise_level=-1)
    with raises("either seed or generator"):
        camlens.SmoothGradCAMPlusPlus(tiny, seed=1, generator=torch.Generator())
    with raises("unknown score 'prob'"):
        camlens.ScoreCAM(tiny, score="prob")
    with raises("baseline must be None, 'zeros' or a tensor"):
        camlens.ScoreCAM(tiny, baseline="ones")
    with raises(r"the baseline has shape \(3, 5, 5\)"):
        camlens.ScoreCAM(tiny, baseline=torch.zeros(3, 5, 5))(images)


def test_bad_channel_subsets(tiny, images):
    with raises(r"channel 8 is out of range: layer 'features' has 8 channels \(valid: 0 to 7\)"):
        camlens.GradCAM(tiny, "features")(images, channels=[0, 8])
    with raises("more than once"):
        camlens.GradCAM(tiny, "features")(images, channels=[1, 1])
    with raises("non-empty list of integer"):
        camlens.GradCAM(tiny, "features")(images, channels=[])
    with raises("not a target layer"):
        camlens.GradCAM(tiny, "features")(images, channels={"features.0": [0]})


# -- issue 20, finding 16: the meta device ---------------------------------------------------------

def _meta_net():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "cam", "ablationcam", "smoothgradcam++", "eigencam"])
@pytest.mark.parametrize("where, text", [
    ("model", "the model's weights are on the meta device"),
    ("images", "the input images are on the meta device"),
])
def test_the_meta_device_gets_one_line(method, where, text):
    import camlens

    model = _meta_net().to("meta") if where == "model" else _meta_net()
    images = torch.randn(2, 3, 8, 8, device="meta" if where == "images" else "cpu")
    with pytest.raises(camlens.CamlensError, match=text):
        camlens.explain(model, images, method)


def test_the_metrics_on_the_meta_device_get_one_line():
    import camlens
    from camlens.metrics import class_probabilities

    with pytest.raises(camlens.CamlensError, match="the model's weights are on the meta device"):
        class_probabilities(_meta_net().to("meta"), torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
