r"""Explaining object detectors: the detections of common output formats as one tensor, and the
score of a detection box (:class:`BoxTarget`).

A detector's output is read as **detections** (N, D, 4 + C): for each image, D candidate boxes
``x1, y1, x2, y2`` followed by the C class scores of each (probabilities, or a score where the
detector gives one class per box). One function per output format turns what the model returns
into that tensor; give it to a method as ``output=``:

- :func:`detr_detections`: DETR-style (``logits`` (N, Q, C + 1) with a last "no object" class,
  ``pred_boxes`` (N, Q, 4) as normalised ``cx, cy, w, h``): class probabilities without the
  no-object class, boxes in the same normalised units;
- :func:`torchvision_detections` (``classes``): torchvision-style, a list of one dict per image
  with ``boxes`` (pixels), ``labels`` and ``scores``: each box gets its score at its label and 0
  at the other classes; images with fewer boxes are padded with empty boxes (no overlap, no
  score);
- :func:`yolov5_detections`: YOLOv5-style raw heads (N, anchors, 4 + 1 + C): ``cx, cy, w, h``
  (pixels), objectness, class probabilities; a class's score is objectness x class probability;
- :func:`yolov8_detections`: YOLOv8-style raw heads (N, 4 + C, anchors): ``cx, cy, w, h``
  (pixels), class probabilities.

:class:`BoxTarget` scores detections as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does,
with the overlap as a factor: for each reference box :math:`b` of class :math:`c`, every
detection :math:`d` whose box overlaps it by an IoU of at least ``iou_threshold`` adds its class
score times that overlap,

.. math:: y = \sum_{(b, c)} \sum_{d:\ \mathrm{IoU}(b, d) \ge t} s_{d,c} \, \mathrm{IoU}(b, d),

differentiable through both the class scores and the boxes. The reference boxes are given, or
are the model's own detections on the images explained (each box whose best class score reaches
``score_threshold``, with that class), fixed before any masked or noisy copy is scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .capture import describe
from .errors import CamlensError
from .metrics.localisation import box_iou
from .targets import ScoreTarget


def _field(output: object, name: str) -> Tensor:
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if not isinstance(value, Tensor):
        raise CamlensError(f"a DETR-style output has a tensor {name!r}; this one is {describe(output)}")
    return value


def _corners(boxes: Tensor) -> Tensor:
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2``."""
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def detr_detections(output: object) -> Tensor:
    """DETR-style output -> detections (N, Q, 4 + C), boxes in normalised units (0 to 1 of the
    input's width and height)."""
    logits, boxes = _field(output, "logits"), _field(output, "pred_boxes")
    if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4) or logits.shape[-1] < 2:
        raise CamlensError(f"DETR-style logits (N, Q, C + 1) and pred_boxes (N, Q, 4), got {describe(logits)} and "
                           f"{describe(boxes)}")
    return torch.cat([_corners(boxes), logits.softmax(dim=-1)[..., :-1]], dim=-1)


def torchvision_detections(classes: int):
    """The ``output=`` for torchvision-style detectors of ``classes`` classes (labels 0 to
    ``classes`` - 1, background included where the model counts it)."""
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise CamlensError(f"classes must be a positive integer, got {classes!r}")

    def detections(output: object) -> Tensor:
        if not (isinstance(output, Sequence) and output and all(isinstance(o, Mapping) for o in output)):
            raise CamlensError(f"a torchvision-style output is a list of dicts (boxes, labels, scores), got "
                               f"{describe(output)}")
        rows = []
        for found in output:
            boxes, labels, scores = (found.get(name) for name in ("boxes", "labels", "scores"))
            if not (isinstance(boxes, Tensor) and isinstance(labels, Tensor) and isinstance(scores, Tensor)
                    and boxes.dim() == 2 and boxes.shape[1] == 4 and labels.shape == scores.shape == boxes.shape[:1]):
                raise CamlensError("each dict of a torchvision-style output holds boxes (D, 4), labels (D,) and "
                                   "scores (D,)")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise CamlensError(f"a detection's label is outside 0 to {classes - 1}: give torchvision_detections "
                                   "the model's number of classes")
            one_hot = torch.nn.functional.one_hot(labels.long(), classes).to(scores.dtype)
            rows.append(torch.cat([boxes.to(scores.dtype), one_hot * scores[:, None]], dim=1))
        most = max(row.shape[0] for row in rows)
        return torch.stack([torch.cat([row, row.new_zeros(most - row.shape[0], 4 + classes)]) for row in rows])

    detections.__qualname__ = f"torchvision_detections({classes})"
    return detections


def yolov5_detections(output: object) -> Tensor:
    """YOLOv5-style raw head (N, anchors, 4 + 1 + C) -> detections (N, anchors, 4 + C), pixels."""
    head = output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) else output
    if not isinstance(head, Tensor) or head.dim() != 3 or head.shape[-1] < 6:
        raise CamlensError(f"a YOLOv5-style head is (N, anchors, 4 + 1 + classes), got {describe(head)}")
    return torch.cat([_corners(head[..., :4]), head[..., 4:5] * head[..., 5:]], dim=-1)


def yolov8_detections(output: object) -> Tensor:
    """YOLOv8-style raw head (N, 4 + C, anchors) -> detections (N, anchors, 4 + C), pixels."""
    head = output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) else output
    if not isinstance(head, Tensor) or head.dim() != 3 or head.shape[1] < 5:
        raise CamlensError(f"a YOLOv8-style head is (N, 4 + classes, anchors), got {describe(head)}")
    head = head.transpose(1, 2)
    return torch.cat([_corners(head[..., :4]), head[..., 4:]], dim=-1)


class BoxTarget(ScoreTarget):
    """The score of the detections that overlap reference boxes (see the module docstring).

    Args:
        boxes: reference boxes ``x1, y1, x2, y2`` in the units of the detections (normalised for
            :func:`detr_detections`, pixels for the others): (B, 4) for every image or a list of
            one (B_i, 4) per image. None: the model's own detections on the images explained.
        labels: the class of each reference box, (B,) or a list of one (B_i,) per image; with
            ``boxes`` only.
        iou_threshold: the least overlap that matches a detection to a reference box.
        score_threshold: with ``boxes=None``, the least class score of a detection taken as a
            reference.
    """

    moves_with_the_image = True

    def __init__(self, boxes: Tensor | Sequence[Tensor] | None = None, labels: Tensor | Sequence[Tensor] | None = None,
                 iou_threshold: float = 0.5, score_threshold: float = 0.5) -> None:
        for name, value in (("iou_threshold", iou_threshold), ("score_threshold", score_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise CamlensError(f"{name} must be a number from 0 to 1, got {value!r}")
        if (boxes is None) != (labels is None):
            raise CamlensError("give reference boxes and their labels together, or neither (the model's own "
                               "detections)")
        self.iou_threshold, self.score_threshold = float(iou_threshold), float(score_threshold)
        self.references: list[tuple[Tensor, Tensor] | None] | None = None
        if boxes is not None and not isinstance(boxes, Tensor) and not any(isinstance(b, Tensor) for b in boxes):
            boxes = torch.as_tensor(boxes, dtype=torch.get_default_dtype())  # numbers: boxes for every image
            labels = torch.as_tensor(labels)
        self.shared = boxes is not None and isinstance(boxes, Tensor)
        if boxes is not None:
            pairs = [(boxes, labels)] if isinstance(boxes, Tensor) else list(zip(boxes, labels, strict=False))
            if not isinstance(boxes, Tensor) and (isinstance(labels, Tensor) or len(boxes) != len(labels)):
                raise CamlensError("per-image reference boxes need per-image labels: two lists of the same length")
            self.references = [self._checked(torch.as_tensor(b), torch.as_tensor(c)) for b, c in pairs]

    @staticmethod
    def _checked(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise CamlensError(f"reference boxes are (B, 4) floats x1, y1, x2, y2, got {describe(boxes)}")
        if labels.shape != boxes.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
            raise CamlensError(f"reference labels are (B,) integers, one per box, got {describe(labels)}")
        if labels.numel() and int(labels.min()) < 0:
            raise CamlensError("a reference label is negative: labels are class indices >= 0")
        return boxes, labels.long()

    def resolved(self, output: Tensor) -> BoxTarget:
        """This target with its reference boxes fixed: those given, or the model's own
        detections in ``output`` (the detections of the images explained)."""
        check_detections(output)
        if self.references is not None:
            return self
        best, label = output[..., 4:].detach().max(dim=-1)
        references: list[tuple[Tensor, Tensor] | None] = []
        for image in range(output.shape[0]):
            keep = best[image] >= self.score_threshold
            # An image without a detection is refused when it is scored (a target of other images may not need it).
            references.append((output[image, keep, :4].detach().clone(), label[image, keep]) if bool(keep.any())
                              else None)
        bound = BoxTarget(iou_threshold=self.iou_threshold, score_threshold=self.score_threshold)
        bound.references = references
        return bound

    def check(self, images: int) -> None:
        if self.references is not None and not self.shared and len(self.references) != images:
            raise CamlensError(f"reference boxes given for {len(self.references)} image(s), for {images} image(s): "
                               "give one (B_i, 4) per image, or one (B, 4) for all")

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        check_detections(output)
        if self.references is None:
            raise CamlensError("BoxTarget without boxes takes the model's detections as references: explain with "
                               "it as a target, or call target.resolved(detections) first")
        classes = output.shape[-1] - 4
        scores = []
        for row, image in enumerate(rows.tolist()):
            reference = self.references[0 if self.shared else image]
            if reference is None:
                raise CamlensError(
                    f"image {image} has no detection with a class score of at least {self.score_threshold}: "
                    "lower score_threshold, or give reference boxes and labels"
                )
            boxes, labels = reference
            if labels.numel() and int(labels.max()) >= classes:
                raise CamlensError(f"a reference label ({int(labels.max())}) is outside the detections' {classes} "
                                   "classes")
            boxes = boxes.to(device=output.device, dtype=output.dtype)
            iou = box_iou(boxes[:, None], output[row, None, :, :4])  # (B, D)
            class_scores = output[row, :, 4:][:, labels.to(output.device)].T  # (B, D)
            matched = iou >= self.iou_threshold
            scores.append((class_scores * iou * matched).sum())
        return torch.stack(scores)

    def __repr__(self) -> str:
        given = "the model's detections" if self.references is None else (
            f"{sum(len(r[0]) for r in self.references if r is not None)} reference box(es)")
        return f"BoxTarget({given}, iou_threshold={self.iou_threshold})"


def check_detections(output: object) -> Tensor:
    """``output`` if it is detections (N, D, 4 + classes), else the one-line error that names the readers."""
    if not isinstance(output, Tensor) or output.dim() != 3 or output.shape[-1] < 5:
        raise CamlensError(
            f"BoxTarget scores detections (N, D, 4 + classes), got {describe(output)}: pick them with output= "
            "(camlens.detection.detr_detections, torchvision_detections(classes), yolov5_detections, "
            "yolov8_detections, or your own function)"
        )
    return output


FORMATS = ("detr", "torchvision:C", "yolov5", "yolov8")


def is_detr_style(output: object) -> bool:
    """Whether a detector's output is DETR-style (``logits`` and ``pred_boxes``, boxes normalised)."""
    return all(isinstance(output.get(name) if isinstance(output, Mapping) else getattr(output, name, None), Tensor)
               for name in ("logits", "pred_boxes"))


def detections_reader(spec: str | None = None, classes: int | None = None):
    """The ``output=`` of a detector named as on the command line (``--detections``): ``detr``,
    ``torchvision:C`` (``torchvision`` where ``classes``, e.g. the number of class names, is
    known), ``yolov5`` or ``yolov8``; None or ``auto`` reads a DETR-style output, or a
    torchvision-style one where ``classes`` is known, and refuses others in one line."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "detr":
        return detr_detections
    if text in ("yolov5", "yolov8"):
        return yolov5_detections if text == "yolov5" else yolov8_detections
    if text.startswith("torchvision"):
        count = text.partition(":")[2]
        if count.isdigit():
            return torchvision_detections(int(count))
        if not count and classes is not None:
            return torchvision_detections(classes)
        raise CamlensError("torchvision-style detections need the number of classes: torchvision:C (e.g. "
                           "torchvision:91 for COCO with background)")
    if text != "auto":
        raise CamlensError(f"unknown detections format {spec!r}: give one of {', '.join(FORMATS)}")

    def auto_detections(output: object) -> Tensor:
        if is_detr_style(output):
            return detr_detections(output)
        if isinstance(output, Sequence) and output and all(isinstance(o, Mapping) for o in output):
            if classes is None:
                raise CamlensError("the detector returns torchvision-style dicts: give their number of classes, "
                                   "--detections torchvision:C")
            return torchvision_detections(classes)(output)
        raise CamlensError(f"camlens cannot tell how this detector's output ({describe(output)}) reads as boxes and "
                           "class scores: give --detections yolov5 ((N, anchors, 4 + 1 + classes)) or yolov8 "
                           "((N, 4 + classes, anchors)), or detr, torchvision:C")

    auto_detections.__qualname__ = "auto_detections"
    return auto_detections
