"""Training a GGAM classifier into a run folder: deterministic, resumable, explainable.

The run folder ``out`` holds ``train.json`` (the settings; a resume must repeat them),
``history.jsonl`` and ``history.csv`` (one row per epoch), ``last.pt`` (model, optimiser,
epoch, random states and history, for ``resume=True``), the best model by validation accuracy
as a run (``run.json`` + ``best.pt``, which ``camlens explain --model out`` loads once the
training finished), when the validation images have boxes, ``localisation.json``, and at the
end a few validation images with the kept model's Grad-CAM maps (``examples/``: the model
views, ``maps.npz`` and, written last, ``examples.json``) for ``camlens report``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import numbers
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import explain
from ..combine import upsample_normalise
from ..datasets import (
    Dataset,
    cub_class_names,
    dataset_entries,
    is_cub,
    load_cub,
    load_dataset,
)
from ..distributed import Group
from ..errors import CamlensError, check_positive_int
from ..io import file_digest, load_image, locked_output_dir, write_atomic
from ..methods.base import nested
from ..metrics import box_mask, energy_pointing_game, localisation_correct
from ..models import Preprocess
from .loss import ggam_training_loss
from .model import GGAMNet, ggam_efficientnet_lite0
from .module import GGAMOutput
from .run import FINISHED, RUN_FILE, save_run

BACKBONES = {"efficientnet_lite0": ("ggam_efficientnet_lite0", ggam_efficientnet_lite0)}
# attention -> (channel_attention, spatial_attention) of the GGAM head.
ATTENTION = {"both": (True, True), "channel": (True, False), "spatial": (False, True), "none": (False, False)}
SETTINGS_FILE = "train.json"
LAST = "last.pt"
BEST = "best.pt"
LOCALISATION = "localisation.json"
EXAMPLES = "examples"  # folder: view-N.jpg, maps.npz, examples.json (written last)
EXAMPLE_COUNT = 6
HISTORY_COLUMNS = ("epoch", "train_ce", "train_ggam", "train_accuracy", "val_accuracy", "val_ce", "seconds")
# Files that make a folder a training run (refused without resume).
RUN_MARKERS = (SETTINGS_FILE, RUN_FILE, LAST)
# Everything a run writes in its folder (the command line adds its chart of the curves).
RUN_FILES = (*RUN_MARKERS, BEST, LOCALISATION, EXAMPLES, "history.jsonl", "history.csv", "curves.png", "report.html")


@dataclass
class TrainResult:
    """What :func:`train_ggam` did: the run folder, one history row per epoch, the best epoch
    (the model saved in the run) and its validation accuracy, the last epoch's validation
    accuracy, the localisation report (None without boxes) and the images it could not use."""

    folder: Path
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    final_val_accuracy: float
    localisation: dict | None
    problems: list[str]
    kept: str = "best"  # which model the run keeps: "best" by validation accuracy, or "last"


@dataclass
class TrainPlan:
    """What :func:`train_ggam` is about to do, once every check passed: the images of each
    set, the classes, the history of the epochs a resumed run has done, and whether the frozen
    backbone's feature maps are computed first."""

    training_images: int
    validation_images: int
    classes: list[str]
    history: list[dict]
    # With freeze_backbone: the feature maps of every image are computed next, before the first batch.
    frozen_features: bool = False


def train_ggam(
    data: str | Path,
    out: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    lam: float = 1.0,
    attention: str = "both",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    val_split: float = 0.2,
    val_data: str | Path | None = None,
    boxes: str | Path | None = None,
    val_boxes: str | Path | None = None,
    flip: bool = True,
    resume: bool = False,
    device: str = "cpu",
    pretrained: bool = True,
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    detach: bool = True,
    renormalise: bool = True,
    freeze_backbone: bool = False,
    feature_cache: dict | None = None,
    keep: str = "best",
    num_workers: int = 0,
    processes: Group | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    on_plan: Callable[[TrainPlan], None] | None = None,
    on_epoch: Callable[[list[dict]], None] | None = None,
    on_finish: Callable[[], None] | None = None,
) -> TrainResult:
    """Train GGAM on ``backbone`` with loss ``CE + lam * L_GGAM`` and keep the run in ``out``.

    Data: ``data`` is a folder of class folders or a ``path,label`` CSV (as
    :func:`camlens.datasets.load_dataset` reads them); the classes are ``class_names`` if given,
    else the folder names / labels, sorted. Validation uses ``val_data`` if given, else a
    stratified split of ``val_split`` of each class of ``data``, drawn with ``seed``. ``boxes``
    and ``val_boxes``: box CSVs of either set (VOC XML files beside the images are found
    without them); boxes of the validation images give the localisation report. ``data`` may
    also be a CUB-200-2011 folder in its native layout (images.txt, train_test_split.txt ...):
    its official training split trains, its test split validates (unless ``val_data`` is given),
    its classes are those of classes.txt in id order and its boxes those of bounding_boxes.txt,
    all used as they are (:func:`camlens.datasets.load_cub`). Images are decoded and
    preprocessed batch by batch as the training reads them (:class:`ImageFiles`), by
    ``num_workers`` processes of a ``DataLoader`` ahead of the training (0: by this process), so
    memory does not grow with the dataset; the batches, and so the weights, are the same for any
    ``num_workers``. ``preprocess`` defaults to the backbone's; ``flip`` mirrors each training
    image with probability 1/2.

    ``attention``: ``both``, ``channel``, ``spatial`` or ``none`` (the GGAM head's channel and
    spatial attention). ``lam`` weighs the GGAM loss, which compares the *channel* attention
    with Grad-CAM's weights: without channel attention (``spatial``, ``none``) it has no effect.
    ``detach``, ``renormalise``: as in :func:`camlens.ggam.ggam_training_loss`.

    ``freeze_backbone=True`` trains the head only, on a backbone fixed in evaluation mode: the
    feature map of every image (and of its mirror image, with ``flip``) is computed once before
    the first epoch and kept in memory (C x H x W floats per image: 250 KB for
    EfficientNet-Lite0 at 224 x 224), so an epoch costs the head's forwards and backwards only,
    typically hundreds of times less than fine-tuning on a CPU. The Grad-CAM weights of the GGAM
    loss are the same either way: they are gradients at ``A``, above the backbone. The paper
    fine-tunes the whole network; freezing is the cheap variant for small data and small machines.
    ``keep``: the model the run keeps (``best.pt``, what ``--model RUN_DIR`` loads, and what
    the localisation report measures): ``"best"`` by validation accuracy (the default), or
    ``"last"``, the last epoch's, for when the validation set is a test set that must not choose
    the model.
    ``feature_cache``: a dict to keep those feature maps in across calls (several heads trained
    on the same images, backbone weights, preprocessing, batch size and device compute them
    once; an image file rewritten in place, by its size or modification time, is a new image).

    Optimiser: AdamW (weight decay 0.01) at a constant ``lr`` on all parameters: it needs no
    schedule tuned per dataset for the new head beside the pretrained backbone, and a constant
    rate makes a run extended by a resume the same as one planned that long. Batches are drawn
    with a generator seeded by ``seed``, the head is initialised from ``seed``, and the global
    random state is left as it was: the same call on the CPU gives the same weights, and
    ``resume=True`` continues from ``last.pt`` to exactly the weights of an uninterrupted run
    (``epochs`` may grow; every other setting must be the same).

    ``processes``: the processes of a ``torchrun`` run (:func:`camlens.distributed.join`), which
    train the model together (``DistributedDataParallel``): every process takes its share of each
    batch of ``batch_size`` (the batch is the same as for one process), the gradients are averaged
    before each step, the validation images are shared out without padding, and the first process
    alone holds the folder, writes the checkpoint once an epoch, measures the kept model and calls
    the callbacks. The checkpoint does not depend on the number of processes: a run resumes with
    any. The backbone's batch norms take their statistics over each process's share of the batch
    (as ``DistributedDataParallel`` leaves them; PyTorch's ``SyncBatchNorm`` needs a GPU and
    NCCL, and the processes here talk over gloo), so a fine-tuned backbone differs from one
    process's by more than rounding; a frozen backbone (``freeze_backbone``) does not.

    ``progress(epoch, batch, batches)`` is called after each training batch (1-based);
    ``on_plan(TrainPlan)`` once, after every check and before the first batch;
    ``on_epoch(history)`` after each epoch, once its row and checkpoint are written;
    ``on_finish()`` at the end, every file written, while the run still holds its folder's lock.
    Bad settings or data raise :class:`CamlensError` before anything is trained.
    """
    kind = _check_settings(backbone, lam, attention, epochs, lr, batch_size, seed, val_split, val_data,
                           device, progress, keep)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise CamlensError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    channel, spatial = ATTENTION[attention]
    builder_name, builder = BACKBONES[backbone]
    out = Path(out)
    names, train, val, problems = _datasets(data, val_data, boxes, val_boxes, class_names, val_split, seed)
    kwargs = {"num_classes": len(names), "reduction": 16, "channel_attention": channel, "spatial_attention": spatial}
    with torch.random.fork_rng(devices=[]):  # the user's global random state is left untouched
        torch.manual_seed(seed)
        model = builder(**kwargs, pretrained=pretrained, class_names=names, preprocess=preprocess)
    preprocess = model.preprocess
    _check_feature_map(model, preprocess.size)
    settings = {
        "backbone": backbone, "attention": attention, "lam": float(lam), "lr": float(lr),
        "batch size": batch_size, "seed": seed,
        "val split": None if val_data is not None or is_cub(data) else float(val_split),
        "flip": bool(flip), "pretrained": bool(pretrained), "detach": bool(detach),
        "renormalise": bool(renormalise), "freeze backbone": bool(freeze_backbone), "keep": keep, "class names": names, "preprocessing": preprocess.to_dict(),
        "data": str(Path(data).resolve()), "val data": None if val_data is None else str(Path(val_data).resolve()),
        "training images": _digest(train), "validation images": _digest(val),
    }
    group = Group() if processes is None else processes
    main = group.main  # the process that holds the folder, writes every file and calls back
    kind = group.device(kind)
    if out.exists() and not out.is_dir():
        raise CamlensError(f"{out}: not a folder; choose another out")
    with contextlib.ExitStack() as stack:
        def claim() -> int:
            out.mkdir(parents=True, exist_ok=True)
            run_folder = stack.enter_context(locked_output_dir(out, "train-ggam", RUN_FILES))
            epochs_done = _prepare(out, settings, epochs, resume)
            if resume:  # an earlier end's report and examples would be taken for this run's
                run_folder.remove("report.html")
                (out / EXAMPLES / "examples.json").unlink(missing_ok=True)
            return epochs_done

        done = group.from_main(claim)
        y_train, y_val = (torch.tensor([s.label for s in part.samples]) for part in (train, val))
        model.to(kind)
        if freeze_backbone:
            model.backbone.requires_grad_(False)
            model.backbone.eval()
        else:  # decoded batch by batch, mirrored batch by batch
            inputs = (ImageFiles(train.samples, preprocess), None)
            val_inputs = ImageFiles(val.samples, preprocess)
        attend = _Attend(model, freeze_backbone)
        # A training step of every process on its share of each batch, the gradients averaged.
        step = group.parallel(attend, kind)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history: list[dict] = []
        best = {"epoch": 0, "accuracy": -1.0}
        best_state = None
        with torch.random.fork_rng(devices=[]):
            if done:
                checkpoint = _load(out / LAST)
                model.load_state_dict(checkpoint["model"])
                optimiser.load_state_dict(checkpoint["optimizer"])
                generator.set_state(checkpoint["generator"])
                torch.set_rng_state(checkpoint["torch rng"])
                history = checkpoint["history"]
                best = {"epoch": checkpoint["best epoch"], "accuracy": checkpoint["best val accuracy"]}
                best_state = checkpoint["best state"]
            else:
                torch.manual_seed(seed)
            if on_plan is not None and main:
                on_plan(TrainPlan(len(train.samples), len(val.samples), list(names), list(history),
                                  bool(freeze_backbone)))
            if freeze_backbone:  # after the plan: on a CPU this is most of a frozen run's time
                inputs, val_inputs = _frozen_features(model.backbone, train, val, preprocess, batch_size, kind,
                                                      flip, feature_cache, num_workers)
            if not resume and main:  # written once the images loaded: a failed start leaves the folder reusable
                text = json.dumps(settings, indent=2) + "\n"
                write_atomic(out / SETTINGS_FILE, lambda path: path.write_text(text, encoding="utf-8"))
            if main:
                _write_history(out, history)
            # What run.json says of the run: always that of the last checkpoint written (an epoch
            # stopped half-way is not done, and its model not kept).
            extra = lambda: {"epochs": epochs, "epochs done": len(history), "best epoch": best["epoch"],
                             "best val accuracy": best["accuracy"],
                             "to finish": f"camlens.ggam.train_ggam(..., out={str(out)!r}, resume=True)",
                             "checkpoint sha256": file_digest(out / LAST) if (out / LAST).is_file() else None}
            recorded = extra() if main else {}
            if done and main:  # what a run killed after its checkpoint had not published yet, published now
                _publish(out, model, best_state, builder_name, kwargs, names, preprocess, recorded, "running")
            try:
                for epoch in range(done + 1, epochs + 1):
                    start = time.perf_counter()
                    row = _train_epoch(model, step, optimiser, generator, inputs, y_train, batch_size, lam,
                                       detach, renormalise, flip, kind, epoch, progress, num_workers, group)
                    row.update(_validate(model, attend, val_inputs, y_val, batch_size, kind, num_workers, group))
                    row = {"epoch": epoch, **row, "seconds": time.perf_counter() - start}
                    history.append(row)
                    status = FINISHED if epoch == epochs else "running"
                    improved = keep == "last" or row["val_accuracy"] > best["accuracy"]
                    if improved:
                        best = {"epoch": epoch, "accuracy": row["val_accuracy"]}
                        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    # The checkpoint first, holding everything (the kept model's weights too), then
                    # what is published from it: the kept weights and run.json, which records the
                    # checkpoint's digest. A run killed in between resumes from the checkpoint and
                    # publishes again; run.json never claims an epoch the checkpoint lacks.
                    state = {
                        "model": model.state_dict(), "optimizer": optimiser.state_dict(), "epoch": epoch,
                        "generator": generator.get_state(), "torch rng": torch.get_rng_state(),
                        "best epoch": best["epoch"], "best val accuracy": best["accuracy"], "history": history,
                        "best state": best_state,
                    }
                    if not main:
                        continue  # one checkpoint an epoch, by the first process
                    write_atomic(out / LAST, lambda path: torch.save(state, path))
                    _publish(out, model, best_state if improved else None, builder_name, kwargs, names, preprocess,
                             extra(), status)
                    recorded = extra()  # what run.json says now
                    _append_history(out, row, history)
                    if on_epoch is not None:
                        on_epoch(list(history))
            except (Exception, KeyboardInterrupt):
                # Killed outright, the run stays "running"; stopped by an error or Ctrl-C, it says so.
                if main and (out / RUN_FILE).is_file():
                    _set_status(out, "interrupted", recorded)
                raise
            if done == epochs and main:  # resumed a run that had all its epochs: finish it
                _set_status(out, FINISHED, recorded)
        if not main:  # the first process measures the kept model and writes the rest
            return TrainResult(out, history, best["epoch"], best["accuracy"], history[-1]["val_accuracy"], None,
                               problems, keep)
        model.load_state_dict(best_state)
        model.eval()
        report = _localisation(model, val_inputs, y_val, val.samples, preprocess, batch_size, kind, freeze_backbone,
                               num_workers)
        if report is not None:
            text = json.dumps(report, indent=2) + "\n"
            write_atomic(out / LOCALISATION, lambda path: path.write_text(text, encoding="utf-8"))
        _save_examples(out, model, val_inputs, y_val, val.samples, names, preprocess, kind, freeze_backbone,
                       best["epoch"])
        if on_finish is not None:
            on_finish()
    return TrainResult(out, history, best["epoch"], best["accuracy"], history[-1]["val_accuracy"], report, problems,
                       keep)


def _check_feature_map(model: GGAMNet, size: int) -> None:
    """Refuse, before any training, an input size that leaves the backbone a 1x1 feature map: the
    Grad-CAM maps of the loss, the spatial attention and the localisation report need a grid."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        was = model.backbone.training
        model.backbone.eval()
        try:
            features = model.backbone(torch.zeros(1, 3, size, size))
        finally:
            model.backbone.train(was)
    if features.shape[-2:].numel() < 2:
        raise CamlensError(f"input size {size} leaves the backbone a {features.shape[-2]}x{features.shape[-1]} "
                           "feature map: Grad-CAM's maps and GGAM's attention need at least 2 cells; give a larger "
                           "input size (--input-size; the backbone divides it by 32)")


def _check_settings(backbone, lam, attention, epochs, lr, batch_size, seed, val_split, val_data, device,
                    progress, keep) -> torch.device:
    if backbone not in BACKBONES:
        raise CamlensError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    if attention not in ATTENTION:
        raise CamlensError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if keep not in ("best", "last"):
        raise CamlensError(f"keep must be 'best' or 'last', got {keep!r}")
    for name, value, low in (("lam", lam, "finite number >= 0"), ("lr", lr, "finite number > 0")):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0 or (name == "lr" and value == 0):
            raise CamlensError(f"{name} must be a {low}, got {value!r}")
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CamlensError(f"seed must be an integer >= 0, got {seed!r}")
    if val_data is None and (not isinstance(val_split, numbers.Real) or isinstance(val_split, bool)
                             or not 0 < val_split < 1):
        raise CamlensError(f"val_split must be a fraction between 0 and 1 (exclusive), got {val_split!r}; "
                           "or give val_data")
    if progress is not None and not callable(progress):
        raise CamlensError("progress must be a callable progress(epoch, batch, batches) or None")
    try:
        kind = torch.device(device)
        torch.empty(0, device=kind)
    except (RuntimeError, TypeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CamlensError(f"device {device!r} is not usable here ({reason})") from None
    return kind


def _datasets(data, val_data, boxes, val_boxes, class_names, val_split, seed):
    """Class names, training and validation datasets, and the problems found in them."""
    data = Path(data)
    if not data.exists():
        raise CamlensError(f"{data}: no such dataset (a folder of class folders, or a CSV of path,label)")
    cub = is_cub(data)
    if val_data is not None and is_cub(val_data) and val_boxes is not None:
        raise CamlensError(f"{val_data} is a CUB-200-2011 folder, whose boxes are its bounding_boxes.txt; "
                           "leave out val_boxes")
    if cub and boxes is not None:
        raise CamlensError(f"{data} is a CUB-200-2011 folder, whose boxes are its bounding_boxes.txt; leave out boxes")
    if class_names is None:
        names = cub_class_names(data) if cub else sorted({label for _, label in dataset_entries(data, [])})
    else:
        names = list(class_names)
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise CamlensError("class_names must be distinct strings")
    if len(names) < 2:
        raise CamlensError(f"{data}: a classifier needs at least two classes, the dataset has {len(names)}")
    train = load_cub(data, "train", names, len(names)) if cub else load_dataset(data, names, len(names), boxes=boxes)
    problems = list(train.problems)
    if cub and val_data is None:  # its official split, as it is
        val = load_cub(data, "test", names, len(names))
        problems += val.problems
    elif val_data is not None:
        val = load_dataset(val_data, names, len(names), boxes=val_boxes)
        problems += val.problems
    else:
        train, val = _split(train, len(names), val_split, seed)
    counts = [sum(s.label == c for s in train.samples) for c in range(len(names))]
    empty = [names[c] for c, count in enumerate(counts) if count == 0]
    if empty:
        why = "" if val_data is not None or cub else f" after the validation split of {val_split}"
        raise CamlensError(f"class(es) with no training image{why}: {', '.join(empty[:10])}; "
                           + ("add images or lower val_split" if why else "add images or leave the class out"))
    if not val.samples:
        raise CamlensError(f"no validation image: with val_split {val_split} every class is too small; "
                           "raise val_split or give val_data")
    return names, train, val, problems


def _split(dataset: Dataset, classes: int, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A stratified split: round(fraction x count) images of each class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    val_indices = set()
    for c in range(classes):
        members = [i for i, s in enumerate(dataset.samples) if s.label == c]
        order = torch.randperm(len(members), generator=generator).tolist()
        val_indices.update(members[i] for i in order[:round(fraction * len(members))])
    parts = ([s for i, s in enumerate(dataset.samples) if i not in val_indices],
             [s for i, s in enumerate(dataset.samples) if i in val_indices])
    return tuple(Dataset(part, [], [], dataset.has_boxes) for part in parts)


def _digest(dataset: Dataset) -> str:
    listing = "\n".join(f"{s.path.resolve()}\t{s.label}" for s in dataset.samples)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _prepare(out: Path, settings: dict, epochs: int, resume: bool) -> int:
    """Check ``out`` against ``resume``; return the epochs already done."""
    present = [p.name for p in out.iterdir() if not p.name.startswith(".camlens-")]
    if not resume:
        if any(name in RUN_MARKERS for name in present):
            raise CamlensError(f"{out}: holds a previous training run; continue it with resume=True (--resume) "
                               "or choose another out")
        if present:
            raise CamlensError(f"{out}: not empty; choose a new or empty folder for the run")
        return 0
    try:
        before = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CamlensError(f"{out}: no training run to resume (no {SETTINGS_FILE}); train without resume") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CamlensError(f"{out / SETTINGS_FILE}: damaged ({type(error).__name__}); start a new run") from None
    changed = [f"{key} ({before.get(key)!r} then, {value!r} now)" for key, value in settings.items()
               if before.get(key) != value]
    if changed:
        raise CamlensError(f"cannot resume {out}: settings changed: {'; '.join(changed)}; "
                           "resume with the same settings or train into another out")
    if not (out / LAST).is_file():
        return 0
    checkpoint = _load(out / LAST)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("epoch"), int) or "best state" not in checkpoint:
        raise CamlensError(f"{out / LAST}: not a checkpoint of this camlens (made by an older one?); start a new run")
    done = checkpoint["epoch"]
    try:
        published = json.loads((out / RUN_FILE).read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        published = {}
    recorded = published.get("epochs done", 0) if isinstance(published, dict) else 0
    if recorded == done:
        if published.get("checkpoint sha256") != file_digest(out / LAST):
            raise CamlensError(f"{out / LAST}: damaged (its digest is not the one {RUN_FILE} records); start a new "
                               "run, or train into another out")
    elif recorded != done - 1:  # one behind: killed after the checkpoint, before its publication
        raise CamlensError(f"{out}: {RUN_FILE} records {recorded} epoch(s) done, {LAST} {done}: the run's files do "
                           "not belong together; start a new run")
    if epochs < done:
        raise CamlensError(f"cannot resume {out}: {done} epochs are done, epochs={epochs} asks for fewer")
    return done


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a damaged file
        raise CamlensError(f"{path}: cannot be read ({type(error).__name__}); start a new run") from None


class ImageFiles(torch.utils.data.Dataset):
    """The preprocessed images of ``samples``, decoded when read, never all at once: ``files[i]``
    is one image (C, H, W), ``files[index]`` the images of a tensor, list or slice of indices
    stacked (N, C, H, W). :meth:`batches` reads batches of indices in order, decoded ahead by
    ``workers`` processes of a ``torch.utils.data.DataLoader`` (0: by this process, as it goes).
    Memory holds a batch and what the workers prepare, whatever the size of the set."""

    def __init__(self, samples: Sequence, preprocess: Preprocess) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        if isinstance(index, int):
            return self.preprocess(load_image(self.samples[index].path))
        chosen = range(len(self))[index] if isinstance(index, slice) else [int(i) for i in index]
        return torch.stack([self[i] for i in chosen])

    def batches(self, batches: Sequence[Tensor], workers: int) -> Iterator[Tensor]:
        if workers == 0:
            yield from (self[batch] for batch in batches)
            return
        loader = torch.utils.data.DataLoader(self, batch_sampler=[batch.tolist() for batch in batches],
                                             num_workers=workers, collate_fn=torch.stack)
        try:
            yield from loader
        except CamlensError as error:  # a worker's: its message is the last line of the traceback it carries
            last = str(error).strip().splitlines()[-1]
            raise CamlensError(last.removeprefix(f"{CamlensError.__module__}.{CamlensError.__name__}: ")) from None


def _read(x: Tensor | ImageFiles, batches: Sequence[Tensor], workers: int) -> Iterator[Tensor]:
    """The rows of ``x`` (feature maps in memory, or image files) for each batch of indices."""
    if isinstance(x, ImageFiles):
        return x.batches(batches, workers)
    return (x[batch] for batch in batches)


def _in_order(count: int, batch_size: int) -> list[Tensor]:
    """Batches of the indices 0 .. count - 1 in order, each index once (no padding)."""
    return [torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _frozen_features(backbone, train: Dataset, val: Dataset, preprocess: Preprocess, batch_size: int, kind,
                     flip: bool, cache: dict | None, workers: int) -> tuple[tuple[Tensor, Tensor | None], Tensor]:
    """The frozen backbone's feature maps: ((training images, their mirror images or None),
    validation images), from ``cache`` when it holds those of the same backbone weights,
    preprocessing, image files, batch size and device."""
    weights = hashlib.sha256()
    for name, value in backbone.state_dict().items():
        weights.update(name.encode())
        weights.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    # Each set's images by path, size and modification time (a file rewritten in place is a new
    # image); the batch size too, since a backbone's output can differ in its last bits between batchings.
    files = [[(str(s.path.resolve()), *_size_and_time(s.path)) for s in part.samples] for part in (train, val)]
    key = (weights.hexdigest(), json.dumps(preprocess.to_dict(), sort_keys=True), json.dumps(files), bool(flip),
           str(kind), batch_size)
    if cache is not None and key in cache:
        return cache[key]
    def run(images: ImageFiles, mirror: bool = False) -> Tensor:
        return torch.cat([backbone((batch.flip(-1) if mirror else batch).to(kind))
                          for batch in images.batches(_in_order(len(images), batch_size), workers)])

    with torch.no_grad():
        x = ImageFiles(train.samples, preprocess)
        features = ((run(x), run(x, mirror=True) if flip else None), run(ImageFiles(val.samples, preprocess)))
    if cache is not None:
        cache[key] = features
    return features


def _size_and_time(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


class _Attend(nn.Module):
    """What a training step runs: the whole model, or (``frozen``) its head on the frozen
    backbone's feature maps, made leaves so that Grad-CAM's weights are taken at them."""

    def __init__(self, model: GGAMNet, frozen: bool) -> None:
        super().__init__()
        self.model, self.frozen = model, frozen

    def forward(self, x: Tensor) -> GGAMOutput:
        if self.frozen:
            return self.model.head(x.detach().requires_grad_())
        return self.model.attend(x)


def _train_epoch(model, step, optimiser, generator, inputs, y, batch_size, lam, detach, renormalise, flip,
                 kind, epoch, progress, workers, group: Group) -> dict:
    """One epoch over ``inputs``: (image files or feature maps, the feature maps of their mirror
    images or None); each batch goes through ``step`` (:class:`_Attend`, or it data-parallel).
    Image files are decoded batch by batch (by ``workers`` processes), and mirrored here, so the
    batches are those of images held in memory.

    Every process draws the same order and flips and takes its share of each batch
    (:meth:`Group.share`); its loss, a mean over its share, is weighed by its share of the batch
    times the number of processes, so that the gradients averaged over the processes are those of
    the batch's mean loss. A process whose share is empty (a last batch smaller than the number
    of processes) still takes part, with one image weighed 0. The Grad-CAM branch of the GGAM
    loss is each process's own, on its images."""
    model.train()
    x, mirrored = inputs
    order = torch.randperm(len(y), generator=generator)
    flips = torch.rand(len(y), generator=generator) < 0.5
    batches = math.ceil(len(y) / batch_size)
    indices = [order[b * batch_size:(b + 1) * batch_size] for b in range(batches)]
    # This process's share of each batch and its weight (an empty share: one image weighed 0).
    shares = [group.share(index) for index in indices]
    weights = [len(share) * group.world / len(index) for share, index in zip(shares, indices)]
    shares = [share if len(share) else index[:1] for share, index in zip(shares, indices)]
    totals = torch.zeros(3, dtype=torch.float64)  # cross-entropy and GGAM loss summed, images right
    for b, (share, weight, images) in enumerate(zip(shares, weights, _read(x, shares, workers))):
        if flip:
            flipped = images.flip(-1) if mirrored is None else mirrored[share]
            images = torch.where(flips[share, None, None, None].to(images.device), flipped, images)
        images, labels = images.to(kind), y[share].to(kind)
        optimiser.zero_grad()
        result = step(images)
        loss = ggam_training_loss(result, labels, lam, detach, renormalise)
        (loss.total * weight if group.distributed else loss.total).backward()
        optimiser.step()
        if weight:
            totals += torch.tensor([float(loss.ce.detach()) * len(share), float(loss.ggam.detach()) * len(share),
                                    float((result.logits.argmax(1) == labels).sum())], dtype=torch.float64)
        if progress is not None:
            progress(epoch, b + 1, batches)
    ce, ggam, correct = (float(v) / len(y) for v in group.all_sum(totals))
    return {"train_ce": ce, "train_ggam": ggam, "train_accuracy": correct}


def _validate(model, attend, x, y, batch_size, kind, workers, group: Group) -> dict:
    """Accuracy and cross-entropy over every validation image once (in order, no padding; each
    process its share, the sums added up)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    batches = [index for index in (group.share(b) for b in _in_order(len(y), batch_size)) if len(index)]
    with torch.no_grad():
        for index, images in zip(batches, _read(x, batches, workers)):
            logits = attend(images.to(kind)).logits
            labels = y[index].to(kind)
            totals += torch.tensor([float(F.cross_entropy(logits, labels, reduction="sum")),
                                    float((logits.argmax(1) == labels).sum())], dtype=torch.float64)
    ce, correct = group.all_sum(totals).tolist()
    return {"val_accuracy": correct / len(y), "val_ce": ce / len(y)}


def _publish(out: Path, model: nn.Module, best_state: dict | None, builder_name: str, kwargs: dict,
             names: Sequence[str], preprocess: Preprocess, extra: dict, status: str) -> None:
    """best.pt (when ``best_state`` is given: the model is saved with those weights) and run.json."""
    if best_state is None:
        _set_status(out, status, extra)
        return
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    try:
        save_run(out, model, builder_name, kwargs, names, preprocess, BEST, extra, status)
    finally:
        model.load_state_dict(current)


def _set_status(out: Path, status: str, extra: dict) -> None:
    """Rewrite run.json's status and extra; the weights file stays as it is."""
    record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    record.update(status=status, extra=extra)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    write_atomic(out / RUN_FILE, lambda path: path.write_text(text, encoding="utf-8"))


def _write_history(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    write_atomic(out / "history.jsonl", lambda path: path.write_text(text, encoding="utf-8"))
    _write_csv(out, history)


def _append_history(out: Path, row: dict, history: list[dict]) -> None:
    with (out / "history.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _write_csv(out, history)


def _write_csv(out: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    text = buffer.getvalue()
    write_atomic(out / "history.csv", lambda path: path.write_text(text, encoding="utf-8"))


def localisation_report(maps: Tensor, boxes: Sequence[Sequence[Sequence[float]]]) -> dict:
    """Mean energy-based pointing game, mean best box IoU and the share of IoU >= 0.5 of
    ``maps`` (N, H, W) against each image's ``boxes`` (model-input pixels).

    A blank map (all zero: Grad-CAM when every channel of the true class weighs negatively)
    points nowhere and scores 0 on every measure. The top-level means are over all images,
    blank ones included; ``blank maps`` counts them and ``non-blank`` holds the same means over
    the other images only (None when every map is blank), so that a model whose maps are often
    blank is not mistaken for one that localises badly, nor the other way round.
    """
    height, width = maps.shape[-2:]
    masks = torch.stack([box_mask(b, height, width, maps.device) for b in boxes])
    energy = energy_pointing_game(maps, masks).double()
    iou, correct = localisation_correct(maps, boxes)
    blank = ~(maps.flatten(1) > 0).any(1).cpu()
    energy, iou, correct = energy.cpu(), iou.cpu(), correct.cpu()

    def means(keep: Tensor) -> dict:
        return {"images": int(keep.sum()), "energy pointing game": float(energy[keep].mean()),
                "box iou": float(iou[keep].mean()), "localisation accuracy (iou >= 0.5)": float(correct[keep].mean())}

    everything = torch.ones_like(blank)
    return {**means(everything), "blank maps": int(blank.sum()),
            "non-blank": means(~blank) if not blank.all() else None}


def _localisation(model: GGAMNet, x, y, samples, preprocess: Preprocess, batch_size: int, kind,
                  frozen: bool, workers: int) -> dict | None:
    """Grad-CAM maps of the true class on the validation images with boxes, scored against them.

    ``x``: the images, or with ``frozen`` the frozen backbone's feature maps of them; the head
    is then explained on those, at the same layer (the map ``A``), and the maps are brought to
    the input size as ``camlens.explain`` brings them (the same maps, without the backbone)."""
    chosen, boxes = [], []
    for i, sample in enumerate(samples):
        mapped = [preprocess.map_box(b, *sample.size) for b in sample.boxes]
        mapped = [b for b in mapped if b is not None]
        if mapped:
            chosen.append(i)
            boxes.append(mapped)
    if not chosen:
        return None
    index = torch.tensor(chosen)
    batches = [index[s:s + batch_size] for s in range(0, len(chosen), batch_size)]
    # The default target layer is the backbone: the map GGAM attends to.
    with nested():  # blank maps are counted in the report, not warned of one call at a time
        if frozen:
            head = nn.Sequential(OrderedDict(features=nn.Identity(), head=_Logits(model.head)))
            size = (preprocess.size, preprocess.size)
            maps = torch.cat([upsample_normalise(explain(head, rows.to(kind), "gradcam", "features", y[b].tolist())
                                                 .raw["features"], size)[:, 0].cpu()
                              for b, rows in zip(batches, _read(x, batches, workers))])
        else:
            maps = torch.cat([explain(model, rows.to(kind), "gradcam", targets=y[b].tolist()).maps[:, 0].cpu()
                              for b, rows in zip(batches, _read(x, batches, workers))])
    report = localisation_report(maps, boxes)
    report["method"] = "gradcam, true class, kept model"
    return report


class _Logits(nn.Module):
    """The GGAM head's logits only: a classifier camlens can explain on feature maps."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features).logits


def _example_indices(labels: list[int], count: int) -> list[int]:
    """Up to ``count`` validation images, one per class in turn (the first of each class, then
    the second ...), in their order."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count and any(rank < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if rank < len(by_class[label]) and len(chosen) < count:
                chosen.append(by_class[label][rank])
        rank += 1
    return sorted(chosen)


def _save_examples(out: Path, model: GGAMNet, x, y, samples, names, preprocess: Preprocess, kind,
                   frozen: bool, epoch: int, count: int = EXAMPLE_COUNT) -> None:
    """A few validation images with the kept model's Grad-CAM maps of their true class and of
    its prediction: each image's model view, the maps (N, 2, H, W) float16 and, last,
    examples.json, which says they are there."""
    import numpy as np

    from ..render import model_view

    chosen = _example_indices([int(v) for v in y], count)
    if not chosen:
        return
    index = torch.tensor(chosen)
    inputs = x[index].to(kind)
    size = (preprocess.size, preprocess.size)
    with torch.no_grad():
        logits = (model.head(inputs).logits if frozen else model(inputs)).float().cpu()
    probabilities = logits.softmax(dim=1)
    predicted = probabilities.argmax(dim=1)
    maps = []
    for targets in (y[index].tolist(), predicted.tolist()):
        with nested():  # the report marks the blank ones
            if frozen:
                head = nn.Sequential(OrderedDict(features=nn.Identity(), head=_Logits(model.head)))
                maps.append(upsample_normalise(explain(head, inputs, "gradcam", "features", targets).raw["features"],
                                               size)[:, 0].cpu())
            else:
                maps.append(explain(model, inputs, "gradcam", targets=targets).maps[:, 0].cpu())
    stack = torch.stack(maps, dim=1).float().numpy().astype(np.float16)  # (N, 2, H, W)
    folder = out / EXAMPLES
    folder.mkdir(exist_ok=True)
    records = []
    for n, i in enumerate(chosen):
        sample = samples[i]
        photo = load_image(sample.path)
        view = model_view(photo, preprocess.crop_box(*photo.size), max_side=224)
        name = f"view-{n}.jpg"
        write_atomic(folder / name, lambda path, view=view: view.save(path, format="JPEG", quality=90))
        label, guess = int(y[i]), int(predicted[n])
        records.append({"input": str(sample.path), "view": name, "label": label, "label_name": names[label],
                        "predicted": guess, "predicted_name": names[guess],
                        "probability": float(probabilities[n, guess]),
                        "true_probability": float(probabilities[n, label])})

    write_atomic(folder / "maps.npz", lambda path: np.savez_compressed(path, maps=stack))  # its temporary ends in .npz
    text = json.dumps({"epoch": epoch, "method": "gradcam", "maps": "maps.npz",
                       "map_targets": ["true class", "predicted class"], "images": records}, indent=2) + "\n"
    write_atomic(folder / "examples.json", lambda path: path.write_text(text, encoding="utf-8"))
