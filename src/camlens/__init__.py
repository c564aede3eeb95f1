"""camlens: what a convolutional network looks at when it decides.

>>> import camlens
>>> explanation = camlens.explain(model, images, method="gradcam++")   # doctest: +SKIP
>>> explanation.maps.shape                                            # doctest: +SKIP
torch.Size([N, 1, H, W])

The names below, and the subpackages (``camlens.models``, ``camlens.metrics``, ...), are
imported on first use (PEP 562), so that the command line can start, and be interrupted,
before torch is loaded.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

_EXPORTS = {
    "explain": "camlens.api",
    "CamlensError": "camlens.errors",
    "Explanation": "camlens.explanation",
    "AugmentSmooth": "camlens.methods",
    "CAM": "camlens.methods",
    "EigenSmooth": "camlens.methods",
    "CAMMethod": "camlens.methods",
    "EigenCAM": "camlens.methods",
    "EigenGradCAM": "camlens.methods",
    "GradCAMElementWise": "camlens.methods",
    "HiResCAM": "camlens.methods",
    "LayerCAM": "camlens.methods",
    "XGradCAM": "camlens.methods",
    "GradCAM": "camlens.methods",
    "GradCAMPlusPlus": "camlens.methods",
    "GradCAMPlusPlusGeneral": "camlens.methods",
    "METHODS": "camlens.methods",
    "ScoreCAM": "camlens.methods",
    "SSCAM": "camlens.methods",
    "ISCAM": "camlens.methods",
    "AblationCAM": "camlens.methods",
    "ReciproCAM": "camlens.methods",
    "SmoothGradCAMPlusPlus": "camlens.methods",
    "get_method": "camlens.methods",
    "list_methods": "camlens.methods",
    "BoxTarget": "camlens.detection",
    "ClassTarget": "camlens.targets",
    "MultiLabelTarget": "camlens.targets",
    "RegressionTarget": "camlens.targets",
    "ScoreTarget": "camlens.targets",
    "SemanticSegmentationTarget": "camlens.targets",
    "SimilarityTarget": "camlens.targets",
    "TokenGrid": "camlens.capture",
    "PerImage": "camlens.capture",
    "TopK": "camlens.targets",
    "UnitTarget": "camlens.targets",
}

__all__ = [
    "AblationCAM",
    "AugmentSmooth",
    "BoxTarget",
    "CAM",
    "CAMMethod",
    "CamlensError",
    "ClassTarget",
    "EigenCAM",
    "EigenGradCAM",
    "EigenSmooth",
    "Explanation",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradCAMPlusPlusGeneral",
    "HiResCAM",
    "LayerCAM",
    "METHODS",
    "ISCAM",
    "ReciproCAM",
    "SSCAM",
    "ScoreCAM",
    "SmoothGradCAMPlusPlus",
    "MultiLabelTarget",
    "RegressionTarget",
    "ScoreTarget",
    "SemanticSegmentationTarget",
    "SimilarityTarget",
    "PerImage",
    "TokenGrid",
    "TopK",
    "UnitTarget",
    "XGradCAM",
    "__version__",
    "explain",
    "get_method",
    "list_methods",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _submodules():
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'camlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_submodules()})


def _submodules() -> set[str]:
    """The public modules and subpackages (``models``, ``metrics``, ...), found on disk so that
    a new module needs no entry here; ``__main__`` and private modules are left out."""
    return {info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")}


if TYPE_CHECKING:
    from .api import explain
    from .errors import CamlensError
    from .explanation import Explanation
    from .methods import (
        CAM,
        AugmentSmooth,
        METHODS,
        CAMMethod,
        EigenCAM,
        EigenGradCAM,
        EigenSmooth,
        GradCAM,
        GradCAMElementWise,
        GradCAMPlusPlus,
        GradCAMPlusPlusGeneral,
        HiResCAM,
        LayerCAM,
        ISCAM,
        SSCAM,
        AblationCAM,
        ReciproCAM,
        ScoreCAM,
        SmoothGradCAMPlusPlus,
        XGradCAM,
        get_method,
        list_methods,
    )
    from .capture import TokenGrid
    from .detection import BoxTarget
    from .targets import (
        ClassTarget,
        MultiLabelTarget,
        RegressionTarget,
        ScoreTarget,
        SemanticSegmentationTarget,
        SimilarityTarget,
        TopK,
        UnitTarget,
    )
