"""A training run folder: ``run.json`` (how to rebuild the model) and its weights.

``run.json`` holds the camlens version, the builder's registered name and keyword arguments
(JSON values), the class names, the preprocessing, the status (``finished`` once training
ended) and the weights file's name. The weights are a state dict of plain tensors, read back
with ``torch.load(..., weights_only=True)``: nothing is unpickled. ``camlens explain --model
RUN_DIR`` (and every command taking ``--model``) loads such a folder with :func:`load_run`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import CamlensError
from ..io import file_digest, read_plain, write_atomic
from ..models import LoadedModel, Preprocess
from .model import ggam_efficientnet_lite0

RUN_FILE = "run.json"
MAX_WEIGHTS_BYTES = 2**34  # 16 GiB: a weights file camlens reads whole
FINISHED = "finished"
# The builders a run can name; each takes ``pretrained`` (False when a run is rebuilt: the
# weights come from the run's file).
BUILDERS = {"ggam_efficientnet_lite0": ggam_efficientnet_lite0}


def _major(version: object) -> str:
    return str(version).split(".")[0]


def save_run(
    folder: str | Path,
    model: nn.Module,
    builder_name: str,
    builder_kwargs: Mapping[str, object],
    class_names: Sequence[str],
    preprocess: Preprocess,
    weights_name: str = "best.pt",
    extra: Mapping[str, object] | None = None,
    status: str = FINISHED,
) -> Path:
    """Write the model's weights, then ``run.json``, into ``folder`` (created if needed), each
    atomically: a reader never finds a half-written file. Returns the path of ``run.json``.

    ``status`` other than ``finished`` marks a run still going (or stopped): :func:`load_run`
    refuses it. ``extra``: more JSON values to record (epochs, accuracy, ...).
    """
    if builder_name not in BUILDERS:
        raise CamlensError(f"unknown model builder {builder_name!r}: use one of {', '.join(BUILDERS)}")
    if "pretrained" in builder_kwargs:
        raise CamlensError("leave 'pretrained' out of the builder's arguments: a run is rebuilt from its weights")
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or weights_name in ("", ".", "..", RUN_FILE):
        raise CamlensError(f"the weights file name must be a plain file name other than {RUN_FILE}, got {weights_name!r}")
    names = list(class_names)
    if not all(isinstance(name, str) for name in names):
        raise CamlensError("class names must be strings")
    record = {
        "camlens version": __version__,
        "builder": builder_name,
        "builder kwargs": dict(builder_kwargs),
        "class names": names,
        "preprocessing": preprocess.to_dict(),
        "status": status,
        "weights": weights_name,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CamlensError(f"the builder's arguments and extra must be JSON values (no NaN): {error}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    write_atomic(folder / weights_name, lambda path: torch.save(state, path))
    # The weights' digest: a weights file damaged on disk, or replaced, is refused at load.
    record["weights sha256"] = file_digest(folder / weights_name)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    write_atomic(folder / RUN_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return folder / RUN_FILE


def load_run(folder: str | Path) -> LoadedModel:
    """Rebuild a finished run's model from its builder and load its weights (strictly: every
    key must match), in eval mode, with its preprocessing and class names."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.exists() and not path.is_symlink():
        raise CamlensError(f"{folder}: not a camlens training run (no {RUN_FILE} in it)")
    try:
        record = json.loads(read_plain(path, 2**24).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CamlensError(f"{path}: damaged ({type(error).__name__}); save the run again") from None
    if not isinstance(record, dict):
        raise CamlensError(f"{path}: damaged (not a JSON object); save the run again")
    version = record.get("camlens version")
    if _major(version) != _major(__version__):
        raise CamlensError(
            f"{folder}: a run saved by camlens {version}, this is camlens {__version__}: "
            f"load it with camlens {_major(version)}.x"
        )
    status = record.get("status")
    name = record.get("weights")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..", RUN_FILE) or "\\" in name:
        raise CamlensError(f"{path}: damaged: its weights file must be a plain file name of the run's folder, "
                           f"not {name!r}")
    weights = folder / name
    if status != FINISHED:
        has = f"weights in {weights.name}" if weights.is_file() else "no weights yet"
        raise CamlensError(
            f"{folder}: the training run did not finish (status {status!r}); it has {has}, "
            f"extra {json.dumps(record.get('extra'))}: finish the training first"
        )
    builder = record.get("builder")
    if builder not in BUILDERS:
        raise CamlensError(f"{path}: unknown model builder {builder!r} (this camlens knows {', '.join(BUILDERS)})")
    kwargs, names = record.get("builder kwargs"), record.get("class names")
    if not isinstance(kwargs, dict) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CamlensError(f"{path}: damaged (builder kwargs or class names); save the run again")
    classes = kwargs.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes != len(names) or not names:
        # Checked before the model is built: a crafted count (2e9) would allocate a head of that size.
        raise CamlensError(f"{path}: damaged: num_classes {classes!r} for {len(names)} class names")
    try:
        settings = dict(record["preprocessing"])
        preprocess = Preprocess(**{**settings, "mean": tuple(settings["mean"]), "std": tuple(settings["std"])})
        model = BUILDERS[builder](**kwargs, pretrained=False)
    except CamlensError as error:
        raise CamlensError(f"{path}: damaged: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise CamlensError(f"{path}: damaged (preprocessing or builder arguments: {error}); save the run again") from None
    if not weights.exists() and not weights.is_symlink():
        raise CamlensError(f"{folder}: the weights file {weights.name} named in {RUN_FILE} is missing")
    try:
        data = read_plain(weights, MAX_WEIGHTS_BYTES)
    except CamlensError as error:
        raise CamlensError(f"{error} (the weights file that {RUN_FILE} names)") from None
    digest = record.get("weights sha256")
    if digest is not None and digest != f"sha256:{hashlib.sha256(data).hexdigest()}":
        raise CamlensError(f"{weights}: damaged or replaced (its digest is not the one {RUN_FILE} records); "
                           "train again, or restore the file")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a damaged or unsafe file
        raise CamlensError(f"{weights}: not a state dict that loads with weights_only=True ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise CamlensError(f"{weights}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as error:
        first = " ".join(str(error).strip().splitlines()[:2])
        raise CamlensError(f"{weights}: the weights do not fit the {builder} model of {RUN_FILE}: {first}") from None
    model.preprocess = preprocess
    model.class_names = names
    model.eval()
    details = {"run": str(folder), "builder": builder, "weights": str(weights)}
    return LoadedModel(model, preprocess, names, str(folder), f"camlens run {folder} ({builder})", details)
