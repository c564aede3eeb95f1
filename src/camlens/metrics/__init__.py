"""Metrics: can an explanation be trusted? The Score-CAM paper's protocol (section 5).

Faithfulness (Average Drop and Increase, deletion and insertion), localisation (energy-based
pointing game, pointing game, weakly supervised boxes and IoU) and the cascading-randomisation
sanity check. Every function is batched, runs on the tensors' device, and returns per-image
values; maps may come from an :class:`~camlens.Explanation` (``explanation.maps[:, t]``) or
from anywhere else.
"""

from .faithfulness import (
    area_under_curve,
    average_drop,
    average_increase,
    class_probabilities,
    deletion_curve,
    drop_and_increase,
    explanation_images,
    gaussian_blur,
    insertion_curve,
)
from .localisation import (
    box_iou,
    box_mask,
    connected_components,
    energy_pointing_game,
    localisation_boxes,
    localisation_correct,
    pointing_game,
)
from .sanity import cascading_randomisation, randomisation_groups, reinitialise, spearman, ssim

__all__ = [
    "area_under_curve",
    "average_drop",
    "average_increase",
    "box_iou",
    "box_mask",
    "cascading_randomisation",
    "class_probabilities",
    "connected_components",
    "deletion_curve",
    "drop_and_increase",
    "energy_pointing_game",
    "explanation_images",
    "gaussian_blur",
    "insertion_curve",
    "localisation_boxes",
    "localisation_correct",
    "pointing_game",
    "randomisation_groups",
    "reinitialise",
    "spearman",
    "ssim",
]
