"""Metrics: can an explanation be trusted? The Score-CAM paper's protocol (section 5), and more.

Faithfulness (Average Drop and Increase, deletion and insertion), localisation (energy-based
pointing game, pointing game, weakly supervised boxes and IoU; against a mask: relevance mass
and rank accuracy, top-k intersection, AUC), complexity (sparseness, complexity, effective
complexity) and the cascading-randomisation sanity check. Every function is batched, runs on the tensors' device, and returns per-image
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
    faithfulness_correlation,
    gaussian_blur,
    insertion_curve,
    random_subsets,
)
from .complexity import complexity, effective_complexity, sparseness
from .localisation import (
    box_iou,
    box_mask,
    connected_components,
    energy_pointing_game,
    localisation_boxes,
    localisation_correct,
    mask_auc,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from .sanity import (
    cascading_randomisation,
    random_logit,
    randomisation_groups,
    reinitialise,
    spearman,
    ssim,
    ssim_uniform,
)

__all__ = [
    "area_under_curve",
    "average_drop",
    "average_increase",
    "box_iou",
    "box_mask",
    "cascading_randomisation",
    "class_probabilities",
    "complexity",
    "connected_components",
    "deletion_curve",
    "drop_and_increase",
    "effective_complexity",
    "energy_pointing_game",
    "explanation_images",
    "faithfulness_correlation",
    "gaussian_blur",
    "insertion_curve",
    "localisation_boxes",
    "localisation_correct",
    "mask_auc",
    "pointing_game",
    "random_logit",
    "random_subsets",
    "randomisation_groups",
    "reinitialise",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "sparseness",
    "spearman",
    "ssim",
    "ssim_uniform",
    "top_k_intersection",
]
