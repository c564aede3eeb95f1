"""camlens: what a convolutional network looks at when it decides.

>>> import camlens
>>> explanation = camlens.explain(model, images, method="gradcam++")   # doctest: +SKIP
>>> explanation.maps.shape                                            # doctest: +SKIP
torch.Size([N, 1, H, W])
"""

from .api import explain
from .errors import CamlensError
from .explanation import Explanation
from .methods import (
    CAM,
    METHODS,
    CAMMethod,
    GradCAM,
    GradCAMPlusPlus,
    ScoreCAM,
    SmoothGradCAMPlusPlus,
    get_method,
    list_methods,
)
from .targets import ClassTarget, TopK, UnitTarget

__version__ = "0.1.0"

__all__ = [
    "CAM",
    "CAMMethod",
    "CamlensError",
    "ClassTarget",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "METHODS",
    "ScoreCAM",
    "SmoothGradCAMPlusPlus",
    "TopK",
    "UnitTarget",
    "__version__",
    "explain",
    "get_method",
    "list_methods",
]
