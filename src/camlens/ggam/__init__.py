"""GGAM: Grad-CAM guided channel-spatial attention, a training-time head for fine-grained
classification. :class:`GGAM` is the head on a backbone feature map; :func:`ggam_training_loss`
is cross-entropy plus the symmetric KL between its channel attention and the true class's
Grad-CAM weights."""

from __future__ import annotations

from .loss import GGAMLoss, ggam_loss, ggam_training_loss, label_gradcam_weights
from .module import GGAM, GGAMOutput, spatial_weights

__all__ = [
    "GGAM",
    "GGAMLoss",
    "GGAMOutput",
    "ggam_loss",
    "ggam_training_loss",
    "label_gradcam_weights",
    "spatial_weights",
]
