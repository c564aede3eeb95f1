"""GGAM: Grad-CAM guided channel-spatial attention, a training-time head for fine-grained
classification. :class:`GGAM` is the head on a backbone feature map; :func:`ggam_training_loss`
is cross-entropy plus the symmetric KL between its channel attention and the true class's
Grad-CAM weights. :func:`ggam_efficientnet_lite0` puts the head on the embedded backbone
(:class:`GGAMNet` on any other); :func:`save_run` and :func:`load_run` keep a trained model in a
folder that ``camlens explain --model RUN_DIR`` loads; :func:`train_ggam` trains one into such a
folder."""

from __future__ import annotations

from .loss import GGAMLoss, ggam_loss, ggam_training_loss, label_gradcam_weights
from .model import EfficientNetLite0Features, GGAMNet, ggam_efficientnet_lite0
from .module import GGAM, GGAMOutput, spatial_weights
from .run import BUILDERS, load_run, save_run
from .train import TrainPlan, TrainResult, localisation_report, train_ggam

__all__ = [
    "BUILDERS",
    "EfficientNetLite0Features",
    "GGAM",
    "GGAMLoss",
    "GGAMNet",
    "GGAMOutput",
    "ggam_efficientnet_lite0",
    "ggam_loss",
    "ggam_training_loss",
    "label_gradcam_weights",
    "load_run",
    "save_run",
    "spatial_weights",
    "TrainPlan",
    "TrainResult",
    "localisation_report",
    "train_ggam",
]
