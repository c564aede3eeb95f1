"""Object detectors (issue 23, item 1): the detections of each output format against hand
conversions, BoxTarget's score against a hand computation, Grad-CAM on a YOLO-style head and on
transformers' DETR against plain-torch Grad-CAM, and the gradient-free methods on a detector."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import camlens
from camlens.detection import (
    BoxTarget,
    detr_detections,
    torchvision_detections,
    yolov5_detections,
    yolov8_detections,
)
from camlens.errors import CamlensError
from camlens.metrics import box_iou


def iou_by_hand(a, b):
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def test_box_target_sums_class_score_times_overlap_over_matched_detections():
    # one image, three detections of two classes
    detections = torch.tensor([[[0.0, 0.0, 4.0, 4.0, 0.9, 0.1],
                                [1.0, 1.0, 5.0, 5.0, 0.3, 0.6],
                                [10.0, 10.0, 12.0, 12.0, 0.8, 0.2]]], dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 0.0, 5.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    target = BoxTarget(boxes, labels, iou_threshold=0.4)
    expected = 0.0
    for box, label in zip(boxes.tolist(), labels.tolist()):
        for detection in detections[0].tolist():
            overlap = iou_by_hand(box, detection[:4])
            if overlap >= 0.4:
                expected += detection[4 + label] * overlap
    assert float(target(detections)[0]) == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(box_iou(boxes[:, None], detections[0, None, :, :4]),
                          torch.tensor([[iou_by_hand(b, d[:4]) for d in detections[0].tolist()]
                                        for b in boxes.tolist()], dtype=torch.float64))
    # Boxes and labels as numbers: the same boxes for every image.
    assert torch.allclose(BoxTarget([[0, 0, 4, 4], [1, 0, 5, 4]], [0, 1], iou_threshold=0.4)(detections.float()),
                          target(detections).float())
    # No detection overlaps enough: 0, not an error.
    assert float(BoxTarget(torch.tensor([[20.0, 20.0, 21.0, 21.0]]), torch.tensor([0]))(detections)[0]) == 0.0


def test_each_output_format_becomes_detections_as_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]]])  # 2 queries, 2 classes + no object
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    got = detr_detections({"logits": logits, "pred_boxes": pred_boxes})
    probabilities = logits.softmax(-1)
    assert torch.allclose(got[0, 0], torch.tensor([0.4, 0.3, 0.6, 0.7, *probabilities[0, 0, :2].tolist()]))
    assert torch.allclose(got[0, 1, :4], torch.tensor([0.0, 0.5, 0.5, 1.0]))

    listed = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.7])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}]
    got = torchvision_detections(3)(listed)
    assert got.shape == (2, 1, 7)
    assert torch.equal(got[0, 0], torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.7])) and not got[1].any()
    with pytest.raises(CamlensError, match="label is outside 0 to 1"):
        torchvision_detections(2)(listed)

    raw5 = torch.tensor([[[10.0, 20.0, 4.0, 8.0, 0.5, 0.2, 0.8]]])
    assert torch.allclose(yolov5_detections(raw5), torch.tensor([[[8.0, 16.0, 12.0, 24.0, 0.1, 0.4]]]))
    raw8 = torch.tensor([[[10.0], [20.0], [4.0], [8.0], [0.2], [0.8]]])
    assert torch.allclose(yolov8_detections(raw8), torch.tensor([[[8.0, 16.0, 12.0, 24.0, 0.2, 0.8]]]))
    with pytest.raises(CamlensError, match=r"^BoxTarget scores detections \(N, D, 4 \+ classes\)"):
        BoxTarget(torch.zeros(1, 4), torch.tensor([0]))(torch.zeros(2, 3))


class TinyYolo(nn.Module):
    """conv features (stride 2) -> a 1x1 head of 5 + 3 channels, decoded as YOLOv5 does:
    (N, anchors = h x w, cx, cy, w, h, objectness, 3 class probabilities), pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        p = self.head(self.features(x))
        n, _, h, w = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        cx, cy = (p[:, 0].sigmoid() + gx) * 2, (p[:, 1].sigmoid() + gy) * 2
        size = p[:, 2:4].exp() * 4
        decoded = torch.cat([cx[:, None], cy[:, None], size, p[:, 4:].sigmoid()], dim=1)
        return decoded.flatten(2).transpose(1, 2)


def plain_gradcam_weights(model, layer, x, score_of_output):
    seen = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.__setitem__("a", output))
    try:
        output = model(x)
    finally:
        handle.remove()
    score = score_of_output(output)
    gradient = torch.autograd.grad(score.sum(), seen["a"])[0]
    return gradient.mean(dim=(2, 3))


def test_gradcam_on_a_yolo_style_head_is_plain_torch_gradcam():
    model = TinyYolo().double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes = [torch.tensor([[2.0, 2.0, 8.0, 9.0], [6.0, 6.0, 12.0, 12.0]], dtype=torch.float64),
             torch.tensor([[0.0, 4.0, 7.0, 10.0]], dtype=torch.float64)]
    labels = [torch.tensor([1, 2]), torch.tensor([0])]
    target = BoxTarget(boxes, labels, iou_threshold=0.1)
    expl = camlens.GradCAM(model, "features.3", output=yolov5_detections)(x, target)

    def by_hand(output):
        detections = yolov5_detections(output)
        scores = []
        for image in range(2):
            total = detections.new_zeros(())
            for box, label in zip(boxes[image], labels[image]):
                overlap = box_iou(box, detections[image, :, :4])
                total = total + (detections[image, :, 4 + int(label)] * overlap * (overlap >= 0.1)).sum()
            scores.append(total)
        return torch.stack(scores)

    expected = plain_gradcam_weights(model, model.features[3], x, by_hand)
    assert expl.weights["features.3"].shape == (2, 1, 8)
    assert torch.allclose(expl.weights["features.3"][:, 0], expected, rtol=1e-9, atol=1e-12)
    assert float(expected.abs().max()) > 1e-6
    assert torch.allclose(expl.scores[:, 0], by_hand(model(x)), rtol=1e-12)


def test_the_models_own_detections_are_the_references_fixed_on_the_images_explained():
    model = TinyYolo().double().eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        detections = yolov5_detections(model(x))
    threshold = float(detections[0, :, 4:].max()) - 1e-6  # the best detection only
    own = camlens.GradCAM(model, "features.3", output=yolov5_detections)(x, BoxTarget(score_threshold=threshold))
    best = detections[0, :, 4:].max(dim=-1)
    index = int(best.values.argmax())
    given = BoxTarget(detections[0, index:index + 1, :4], best.indices[index:index + 1])
    same = camlens.GradCAM(model, "features.3", output=yolov5_detections)(x, given)
    assert torch.allclose(own.weights["features.3"], same.weights["features.3"], rtol=1e-12)
    # Score-CAM scores masked copies against the references of the clean image, not their own.
    masked = camlens.ScoreCAM(model, "features.3", output=yolov5_detections)(x, BoxTarget(score_threshold=threshold))
    fixed = camlens.ScoreCAM(model, "features.3", output=yolov5_detections)(x, given)
    assert torch.allclose(masked.weights["features.3"], fixed.weights["features.3"], rtol=1e-10)
    with pytest.raises(CamlensError) as error:
        camlens.GradCAM(model, "features.3", output=yolov5_detections)(x, BoxTarget(score_threshold=1.0))
    assert str(error.value) == ("image 0 has no detection with a class score of at least 1.0: lower score_threshold, "
                                "or give reference boxes and labels")


@pytest.mark.parametrize("name", ["eigencam", "scorecam", "ablationcam"])
def test_the_gradient_free_methods_explain_a_detector(name):
    model = TinyYolo().double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = BoxTarget(torch.tensor([[2.0, 2.0, 10.0, 10.0]], dtype=torch.float64), torch.tensor([1]),
                       iou_threshold=0.05)
    expl = camlens.METHODS[name](model, "features.3", output=yolov5_detections)(x, target)
    assert expl.maps.shape == (2, 1, 16, 16) and bool(torch.isfinite(expl.maps).all())
    assert float(expl.maps.amax()) > 0


def test_augmentation_smoothing_refuses_boxes_it_would_move():
    model = TinyYolo().double().eval()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    target = BoxTarget(torch.tensor([[2.0, 2.0, 10.0, 10.0]], dtype=torch.float64), torch.tensor([1]))
    with pytest.raises(CamlensError, match="augmentation smoothing flips and resizes the images, which moves what "
                                           r"BoxTarget\(1 reference box\(es\), iou_threshold=0.5\) compares them"):
        camlens.AugmentSmooth(camlens.GradCAM(model, "features.3", output=yolov5_detections))(x, target)


def test_gradcam_on_transformers_detr_is_plain_torch_gradcam():
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         out_features=["stage2"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                     d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                                     num_queries=5, num_labels=3)
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    layer = "model.backbone.model.encoder.stages.1"
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9]])  # normalised, as DETR's
    labels = torch.tensor([0, 2])
    target = BoxTarget(boxes, labels, iou_threshold=0.0)
    expl = camlens.GradCAM(model, layer, output=detr_detections)(x, target)

    def by_hand(output):
        probabilities = output.logits.softmax(-1)
        cx, cy, w, h = output.pred_boxes.unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        total = []
        for image in range(2):
            score = probabilities.new_zeros(())
            for box, label in zip(boxes, labels):
                overlap = box_iou(box, corners[image])
                score = score + (probabilities[image, :, int(label)] * overlap).sum()
            total.append(score)
        return torch.stack(total)

    stage = model.get_submodule(layer)
    seen = {}
    handle = stage.register_forward_hook(lambda module, inputs, output: seen.__setitem__("a", output[0]
                                                                                        if isinstance(output, tuple)
                                                                                        else output))
    try:  # the input requires grad: DETR freezes its backbone's first stages, so nothing else would
        output = model(x.clone().requires_grad_())
    finally:
        handle.remove()
    score = by_hand(output)
    gradient = torch.autograd.grad(score.sum(), seen["a"])[0]
    assert torch.allclose(expl.scores[:, 0], score.detach(), rtol=1e-5)
    assert torch.allclose(expl.weights[layer][:, 0], gradient.mean(dim=(2, 3)), rtol=1e-4, atol=1e-7)
    assert float(gradient.abs().max()) > 1e-6
    # With no layer named: not a box or class head (one row per query), but the encoder's
    # sequence, the backbone's 8x8 grid flattened, with a map per image that is not blank.
    default = camlens.GradCAM(model, output=detr_detections)(x, target)
    assert default.target_layers == ("model.encoder.layers.0",) and default.options["reshape"] == "tokens:0:8x8"
    assert not bool(default.blank.any())
    assert math.isfinite(float(expl.maps.sum()))


def test_a_list_of_layers_of_a_detector_weighs_each_as_alone():
    """Several feature maps (an FPN's levels): each layer weighed as when explained alone; the
    maps fused by averaging, as for a classifier."""
    model = TinyYolo().double().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = BoxTarget(torch.tensor([[2.0, 2.0, 10.0, 10.0]], dtype=torch.float64), torch.tensor([1]),
                       iou_threshold=0.05)
    both = camlens.GradCAM(model, ["features.1", "features.3"], output=yolov5_detections)(x, target)
    for layer in ("features.1", "features.3"):
        alone = camlens.GradCAM(model, layer, output=yolov5_detections)(x, target)
        assert torch.allclose(both.weights[layer], alone.weights[layer], rtol=1e-12)
    assert both.maps.shape == (2, 1, 16, 16)


def test_gradcam_on_transformers_yolos_reads_the_patches_between_the_class_and_detection_tokens():
    """YOLOS: tokens (N, 1 + 16 + 5, D), a class token, a 4x4 grid of patches and 5 detection
    tokens after them (``suffix``): the map is the patches' grid, the model goes on with the
    detection tokens as they were, and the weights are plain-torch Grad-CAM's on the patch tokens."""
    transformers = pytest.importorskip("transformers")
    config = transformers.YolosConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                      image_size=[32, 32], patch_size=8, num_detection_tokens=5, num_labels=3,
                                      use_mid_position_embeddings=False)
    torch.manual_seed(0)
    model = transformers.YolosForObjectDetection(config).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    layer = "vit.encoder.layer.1.layernorm_before"
    target = BoxTarget(torch.tensor([[0.0, 0.0, 0.6, 0.6]]), torch.tensor([1]), iou_threshold=0.0)
    grid = camlens.TokenGrid(prefix=1, size=(4, 4), suffix=5)
    expl = camlens.GradCAM(model, layer, output=detr_detections, reshape=grid)(x, target)
    assert expl.options["reshape"] == "tokens:1:4x4:+5"

    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: seen.__setitem__("a", output))
    try:
        output = model(x)
    finally:
        handle.remove()
    score = target(detr_detections(output))
    gradient = torch.autograd.grad(score.sum(), seen["a"])[0]  # (N, 22, D)
    assert torch.allclose(expl.scores[:, 0], score.detach(), rtol=1e-5)
    expected = gradient[:, 1:17].mean(dim=1)  # the patches' gradient, averaged over the grid
    assert float(expected.abs().max()) > 1e-7
    assert torch.allclose(expl.weights[layer][:, 0], expected, rtol=1e-4, atol=1e-8)
    assert expl.maps.shape == (2, 1, 32, 32)
    assert camlens.capture.token_grid("tokens:1:4x4:+5") == grid
    # With no layer named: 22 tokens read as 6 + 4x4 could as well be 1 + 4x4 + 5: refused, not guessed.
    with pytest.raises(CamlensError, match=r"output tokens \(.*vit.layernorm \(22, 16\)\) that camlens cannot read as "
                                           r"a grid .* with :\+SUFFIX for tokens after the patches"):
        camlens.GradCAM(model, output=detr_detections)(x, target)
    with pytest.raises(CamlensError, match="leave none before the 30 suffix token"):
        camlens.GradCAM(model, layer, output=detr_detections, reshape=camlens.TokenGrid(suffix=30))(x, target)


def test_box_target_refuses_what_it_cannot_read_in_one_line():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    for kwargs, message in (
        ({"boxes": box}, "give reference boxes and their labels together, or neither"),
        ({"boxes": [box, box], "labels": [torch.tensor([0])]}, "per-image reference boxes need per-image labels"),
        ({"boxes": box[0], "labels": torch.tensor([0])}, r"reference boxes are \(B, 4\) floats"),
        ({"boxes": box, "labels": torch.tensor([0.5])}, r"reference labels are \(B,\) integers"),
        ({"boxes": box, "labels": torch.tensor([-1])}, "a reference label is negative"),
        ({"iou_threshold": 2}, "iou_threshold must be a number from 0 to 1, got 2"),
    ):
        with pytest.raises(CamlensError, match=message):
            BoxTarget(**kwargs)
    model = TinyYolo().double().eval()
    target = BoxTarget([box.double(), box.double()], [torch.tensor([0]), torch.tensor([1])])
    with pytest.raises(CamlensError, match=r"^reference boxes given for 2 image\(s\), for 1 image\(s\)"):
        camlens.GradCAM(model, "features.3", output=yolov5_detections)(torch.rand(1, 3, 16, 16).double(), target)
    with pytest.raises(CamlensError, match=r"^a reference label \(7\) is outside the detections' 3 classes$"):
        BoxTarget(box, torch.tensor([7]))(torch.zeros(1, 2, 7))


def test_the_default_layer_of_a_yolo_style_detector_is_no_raw_head():
    """The head's 1x1 convolution outputs the detections as a map (5 + 3 channels a cell): a map of
    the score's own values, passed over; the default is the last feature map before it."""
    model = TinyYolo().double().eval()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    explanation = camlens.GradCAM(model, output=yolov5_detections)(x, BoxTarget(score_threshold=0.0))
    assert explanation.default_layer and explanation.target_layers == ("features",)
    named = camlens.GradCAM(model, "features", output=yolov5_detections)(x, BoxTarget(score_threshold=0.0))
    assert torch.equal(named.maps, explanation.maps)
