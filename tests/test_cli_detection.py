"""`camlens explain --task detection` (issue 23, item 1): each detected object explained with its
own box as a BoxTarget, the maps equal to the Python API's on the same input, the boxes drawn on
the figures, and what does not fit refused in one line."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.detection import BoxTarget, detr_detections, yolov5_detections
from camlens.render import model_view, overlay
from camlens.report.common import ImageStore, heat_image
from camlens.report.explain import load
from helpers import model_module, one_line_error, random_photo, run

YOLO = """
import torch
from torch import nn


class TinyYolo(nn.Module):
    def __init__(self):
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


def net():
    return TinyYolo().eval()


def detr():
    import transformers

    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         out_features=["stage2"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                     d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                                     num_queries=5, num_labels=3)
    torch.manual_seed(0)
    return transformers.DetrForObjectDetection(config).eval()
"""


@pytest.fixture
def detectors(tmp_path, monkeypatch):
    model_module(tmp_path, "detectors", YOLO, monkeypatch)
    import detectors

    return detectors


def preprocessed(photo, out):
    """The run's preprocessing, as its manifest records it, and the photo through it."""
    recorded = json.loads((out / "manifest.json").read_text())["model"]["preprocess"]
    preprocess = camlens.models.Preprocess(**{key: tuple(v) if isinstance(v, list) else v for key, v in recorded.items()})
    return preprocess, preprocess(Image.open(photo).convert("RGB"))[None]


def test_each_detected_object_is_explained_with_its_box(tmp_path, capsys, detectors):
    photo = random_photo(tmp_path / "street.png", 80, 96)
    out = tmp_path / "out"
    code, stdout, err = run(["explain", photo, "--model", "detectors:net", "--input-size", "32", "--task", "detection",
                             "--detections", "yolov5", "--score-threshold", "0.3", "-m", "gradcam", "-m", "scorecam",
                             "--out", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"] == {"task": "detection", "detections": "yolov5", "objects at most": 3,
                                   "score_threshold": 0.3, "iou_threshold": 0.5}
    assert "cam" not in manifest["methods"]
    (record,) = manifest["images"]
    preprocess, x = preprocessed(photo, out)
    model = detectors.net()
    with torch.no_grad():
        detections = yolov5_detections(model(x))[0]
    best, classes = detections[:, 4:].max(dim=1)
    order = [i for i in best.argsort(descending=True, stable=True).tolist() if best[i] >= 0.3]
    assert [t["class"] for t in record["predictions"]] == classes[order[:5]].tolist()
    assert len(record["targets"]) == 3
    arrays = np.load(out / "street" / "maps.npz")
    view = model_view(Image.open(photo).convert("RGB"), preprocess.crop_box(96, 80))
    for index, (target, i) in enumerate(zip(record["targets"], order)):
        assert target["box"] == pytest.approx(detections[i, :4].tolist(), abs=1e-3) and target["units"] == "pixels"
        assert target["on input"] == pytest.approx((detections[i, :4] / 32).tolist(), abs=1e-6)  # a 32x32 input
        assert target["probability"] == pytest.approx(float(best[i]), abs=1e-5)
        box_target = BoxTarget(detections[i, None, :4], classes[i, None])
        for method in ("gradcam", "scorecam"):
            expected = camlens.explain(model, x, method, targets=box_target, output=yolov5_detections)
            assert np.allclose(arrays[f"{method}/maps"][index], expected.maps[0, 0].numpy(), atol=1e-5)
        # The overlay is the map over the view with the box drawn: the same pixels away from the box.
        drawn = np.asarray(Image.open(out / "street" / record["files"]["overlays"]["gradcam"][index]))
        plain = np.asarray(overlay(view, arrays["gradcam/maps"][index]))
        assert drawn.shape[0] > plain.shape[0]  # the caption below
        changed = np.argwhere((drawn[:plain.shape[0]] != plain).any(axis=2))
        x1, y1, x2, y2 = (v * view.width for v in target["on input"])
        near = ((np.abs(changed[:, 1] - np.clip(x1, 0, view.width)) <= 6) | (np.abs(changed[:, 1] - np.clip(x2, 0, view.width)) <= 6)
                | (np.abs(changed[:, 0] - np.clip(y1, 0, view.height)) <= 6) | (np.abs(changed[:, 0] - np.clip(y2, 0, view.height)) <= 6)
                | (changed[:, 0] <= max(0, y1) + 2) & (changed[:, 1] >= x1 - 1))  # the label above or at the top
        assert len(changed) and near.all()
    # The report draws each object's box on its maps too: white, which the jet colour map never is,
    # shows on the heat picture along the box's edges only.
    store = ImageStore()
    page = load(out, store)
    (image,) = page["images"]
    reference = image["heat"]["gradcam"][0]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(store.images[reference].split(",", 1)[1]))), dtype=float)
    plain = np.asarray(heat_image(arrays["gradcam/maps"][0], Image.open(out / "street" / "view.jpg").size,
                                  "jet", max(shown.shape[:2])), dtype=float)
    assert plain.shape == shown.shape
    assert not (plain.min(axis=2) > 200).any()
    differs = np.argwhere(shown.min(axis=2) > 200)
    x1, y1, x2, y2 = (min(max(v * shown.shape[1], 0), shown.shape[1] - 1) for v in record["targets"][0]["on input"])
    on_edge = ((np.abs(differs[:, 1] - x1) <= 8) | (np.abs(differs[:, 1] - x2) <= 8) | (np.abs(differs[:, 0] - y1) <= 8)
               | (np.abs(differs[:, 0] - y2) <= 8))
    assert len(differs) > 10 and on_edge.all()


def test_detr_is_read_by_itself_and_its_normalised_boxes_drawn_on_the_view(tmp_path, capsys, detectors):
    pytest.importorskip("transformers")
    photo = random_photo(tmp_path / "room.png", 70, 70)
    out = tmp_path / "out"
    code, stdout, err = run(["explain", photo, "--model", "detectors:detr", "--input-size", "64", "--task", "detection",
                             "--score-threshold", "0.2", "--top-k", "1", "-m", "gradcam", "--target-layer",
                             "model.backbone.model.encoder.stages.1", "--out", out], capsys)
    assert code == 0, err
    (record,) = json.loads((out / "manifest.json").read_text())["images"]
    (target,) = record["targets"]
    assert target["units"] == "normalised" and all(-1 <= v <= 2 for v in target["box"])
    preprocess, x = preprocessed(photo, out)
    model = detectors.detr()
    box = torch.tensor([target["box"]], dtype=torch.float32)
    expected = camlens.explain(model, x, "gradcam", "model.backbone.model.encoder.stages.1",
                               BoxTarget(box, torch.tensor([target["class"]])), output=detr_detections)
    # The box exactly as the manifest records it: the overlap's gradient has a kink where a detection's box
    # is the reference (IoU 1), and a box rounded to 6 decimals moved this map by 2e-3.
    assert np.allclose(np.load(out / "room" / "maps.npz")["gradcam/maps"][0], expected.maps[0, 0].numpy(), atol=1e-5)


def test_what_does_not_fit_a_detector_is_refused_in_one_line(tmp_path, capsys, detectors):
    photo = random_photo(tmp_path / "p.png", 40, 40)
    base = ["explain", photo, "--model", "detectors:net", "--input-size", "32", "-m", "gradcam", "--out", tmp_path / "o"]
    cases = [
        (["--task", "detection", "--detections", "yolov5", "--score-threshold", "0.99"], 1,
         "no detection with a class score of at least 0.99: lower --score-threshold"),
        (["--detections", "yolov5"], 1, "--detections, --score-threshold and --iou-threshold are for "
                                                        "--task detection"),
        (["--task", "detection"], 1, "camlens cannot tell how this detector's output (a tensor of shape (2, 256, 8)) "
                                     "reads as boxes and class scores: give --detections yolov5"),
        (["--task", "detection", "--detections", "yolov7"], 1, "unknown detections format 'yolov7'"),
        (["--task", "detection", "--detections", "yolov5", "-m", "cam"], 1,
         "CAM explains classes of a classifier's scores, not a detector's boxes"),
        (["--task", "detection", "--detections", "torchvision"], 1, "torchvision-style detections need the number of "
                                                                   "classes: torchvision:C"),
    ]
    for extra, status, message in cases:
        code, stdout, err = run([*base, *extra], capsys)
        if "no detection" in message:  # the image fails; the run says so and exits 1
            assert code == 1 and message in err and "Traceback" not in err
            continue
        one_line_error(code, err, status, message)
