"""The methods, looked up by name."""

from __future__ import annotations

import difflib

from ..errors import CamlensError
from .base import CAMMethod, Context
from .cam import CAM, cam_weights
from .gradcam import (
    GradCAM,
    GradCAMPlusPlus,
    SmoothGradCAMPlusPlus,
    gradcam_weights,
    gradcampp_weights,
)
from .family import (
    EigenCAM,
    EigenGradCAM,
    GradCAMElementWise,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    gradcam_elementwise_weights,
    hirescam_weights,
    layercam_weights,
    principal_axis,
    xgradcam_weights,
)
from .gradcampp_general import GradCAMPlusPlusGeneral
from .meta import AugmentSmooth, EigenSmooth
from .gradient_free import SSCAM, AblationCAM, ISCAM, ReciproCAM, ablation_weights
from .scorecam import ScoreCAM, scorecam_weights

METHODS: dict[str, type[CAMMethod]] = {
    cls.name: cls
    for cls in (
        CAM,
        GradCAM,
        GradCAMPlusPlus,
        GradCAMPlusPlusGeneral,
        SmoothGradCAMPlusPlus,
        ScoreCAM,
        SSCAM,
        ISCAM,
        AblationCAM,
        ReciproCAM,
        XGradCAM,
        EigenCAM,
        HiResCAM,
        LayerCAM,
        GradCAMElementWise,
        EigenGradCAM,
    )
}


def _key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    return key.replace("pp", "++") if key.endswith("pp") or "campp" in key else key  # gradcampp-general


def list_methods() -> dict[str, str]:
    """Every method's registry name with a one-line summary, in the order of the papers."""
    return {name: cls.summary for name, cls in METHODS.items()}


def get_method(name: str) -> type[CAMMethod]:
    """The method class for a name; case, '-', '_' and 'pp' for '++' do not matter."""
    if not isinstance(name, str):
        raise CamlensError(f"a method is named by a string, not {type(name).__name__}")
    key = _key(name)
    for registered, cls in METHODS.items():
        if _key(registered) == key:  # registry names may hold '-' (gradcam-elementwise)
            return cls
    close = difflib.get_close_matches(key, list(METHODS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise CamlensError(f"unknown method {name!r}{hint} (available: {', '.join(METHODS)})")


__all__ = [
    "AblationCAM",
    "AugmentSmooth",
    "CAM",
    "CAMMethod",
    "Context",
    "EigenSmooth",
    "EigenCAM",
    "EigenGradCAM",
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
    "XGradCAM",
    "cam_weights",
    "get_method",
    "gradcam_elementwise_weights",
    "gradcam_weights",
    "gradcampp_weights",
    "hirescam_weights",
    "layercam_weights",
    "list_methods",
    "principal_axis",
    "ablation_weights",
    "scorecam_weights",
    "xgradcam_weights",
]
