"""``camlens explain``: every method on every image, overlays, a comparison figure, maps and a manifest."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image
from rich.table import Table

from .. import __version__, timing
from ..capture import preserved
from ..detection import (
    FORMATS,
    BoxTarget,
    check_detections,
    detections_reader,
    is_detr_style,
)
from ..distributed import Group, WorkQueue, join
from ..errors import CamlensError
from ..io import (
    ARRAY_SUFFIXES,
    IMAGE_SUFFIXES,
    MAX_MARKER_BYTES,
    RunFolder,
    expand_inputs,
    held_output_dir,
    is_array_file,
    load_array,
    os_reason,
    publish_mode,
    read_plain,
)
from ..methods import METHODS
from ..models import LoadedModel
from ..render import (
    DEFAULT_COLORMAP,
    Panel,
    array_kind,
    captioned,
    check_colormap,
    comparison_figure,
    draw_relative_box,
    input_figure,
    model_view,
    overlay,
    stacked,
)
from ..targets import TopK
from ..timing import take_start_up
from .common import (
    MARKER,
    OUTPUT,
    Finite,
    class_count,
    console,
    describe_start_up,
    echo_error,
    engine_options,
    engine_settings,
    fc_option,
    first_array_shape,
    first_line,
    method_objects,
    method_option,
    model_input,
    model_options,
    output_given,
    prepare,
    printable,
    resolve_class,
    run_options,
    slug,
    smooth_options,
    speak_for,
    top_channels_option,
    warm_and_plan,
    warm_up,
    yes_option,
)
from .progress import LogProgress
from .report import html_option, write_html


@dataclass
class ImageResult:
    path: Path
    status: str = "ok"
    error: str | None = None
    output: str | None = None
    size: tuple[int, int] | None = None
    predictions: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # method -> the blank maps (zero everywhere): [{"target": index of the target, "reason": why}]
    blank: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = {"input": printable(self.path), "status": self.status}
        if self.error:
            data["error"] = self.error
            return data
        data.update(output=self.output, size=list(self.size or ()), predictions=self.predictions,
                    targets=self.targets, files=self.files,
                    timings={key: round(value, 4) for key, value in self.timings.items()}, blank=self.blank)
        return data


class Explainer:
    """Explains one image at a time with every method, writing its outputs into a folder."""

    def __init__(self, loaded: LoadedModel, methods: Sequence[str], target_layer: str | None,
                 class_index: int | None, top_k: int, device: torch.device,
                 batch_size: int | None, seed: int, fc: str | None = None,
                 colormap: str = DEFAULT_COLORMAP, caption: bool = True, engine: dict | None = None,
                 top_channels: int | float | None = None, smooth: dict[str, bool] | None = None,
                 detection: Detection | None = None) -> None:
        self.loaded = loaded
        self.detection = detection  # an object detector: its detected objects are the targets
        self.engine = engine or {}
        self.model = loaded.module.to(device)
        self.device = device
        self.class_index = class_index
        self.top_k = top_k
        self.colormap = colormap
        self.caption = caption
        self.target_layers: tuple[str, ...] = ()
        self.default_layer: bool | None = None
        self.layout: str | None = None  # how the target layer's output was read (tokens, nhwc), if not as a map
        # Work done once (the default layer's search, the inference copy, a cut, a compilation), by
        # kind: timed apart from each method's seconds per image (camlens.timing).
        self.start_up: dict[str, float] = {}
        self.methods = method_objects(self.model, methods, target_layer, batch_size, seed, fc=fc, engine=engine,
                                      top_channels=top_channels, smooth=smooth)

    def targets(self):
        return self.class_index if self.class_index is not None else TopK(self.top_k)

    def plan(self, files: Sequence[Path], yes: bool, group: Group | None = None) -> None:
        """Warm up on the first image that loads and say the run's plan when it is long
        (:func:`announce_plan`); the warm-up and the timed probe are the run's start-up."""
        self.start_up.update(warm_and_plan(
            self.methods, self.loaded, files, self.device, len(files), yes,
            "or fewer methods (-m), --top-channels N for Score-CAM and its variants, or fewer images", group=group))

    def run(self, path: Path, folder: Path, progress: Callable[[str, int, int], None]) -> ImageResult:
        result = ImageResult(path)
        start = time.perf_counter()
        x, image, values = model_input(self.loaded, path, self.device)
        # A photo's (width, height); an array's positions, (L), (H, W) or (D, H, W).
        result.size = image.size if image is not None else tuple(values.shape[1:])
        result.timings["load"] = time.perf_counter() - start

        explanations = {}
        take_start_up()
        if not self.start_up:
            warm_up(self.methods, x)
            self.start_up.update(take_start_up())
        targets, detected = self.targets(), None
        if self.detection is not None:
            targets, detected = self.detection.objects(self.model, x, self.class_index, self.top_k, self.loaded)
        for name, method in self.methods.items():
            tick = timing.clock()
            explanations[name] = method(x, targets, progress=lambda done, total, n=name: progress(n, done, total))
            elapsed = timing.clock() - tick
            once = take_start_up()
            for what, seconds in once.items():
                self.start_up[what] = self.start_up.get(what, 0.0) + seconds
            result.timings[name] = max(0.0, elapsed - sum(once.values()))
        first = next(iter(explanations.values()))
        self.target_layers, self.default_layer = first.target_layers, first.default_layer
        self.layout = first.options.get("reshape")
        if detected is not None:  # the detections above the threshold, the most confident first
            result.predictions, result.targets = detected[:5], detected[:len(targets[0])]
        else:
            # The methods' own clean forward gives the predictions: no extra forward pass.
            probabilities = first.logits.softmax(dim=1)[0].cpu()
            top = probabilities.topk(min(5, probabilities.numel()))
            result.predictions = [self._describe(int(i), float(p)) for p, i in zip(top.values, top.indices)]
            result.targets = [
                self._describe(int(c), float(p))
                for c, p in zip(first.targets[0].tolist(), first.probabilities[0].tolist())
            ]
        for name, explanation in explanations.items():
            reasons = explanation.blank_reasons()
            if reasons:
                result.blank[name] = [{"target": t, "reason": why} for (_, t), why in sorted(reasons.items())]

        tick = time.perf_counter()
        if image is None:
            result.files = self._write_array(values, explanations, result, folder)
        else:
            result.files = self._write(image, explanations, result, folder)
        result.timings["render"] = time.perf_counter() - tick
        result.timings["total"] = time.perf_counter() - start
        return result

    def _describe(self, index: int, probability: float) -> dict:
        return {"class": index, "name": self.loaded.class_name(index), "probability": round(probability, 6)}

    def _write(self, image: Image.Image, explanations: dict, result: ImageResult, folder: Path) -> dict:
        view = model_view(image, self.loaded.preprocess.crop_box(*image.size))
        layer = ", ".join(self.target_layers)
        overlays: dict[str, list[str]] = {}

        def boxed(picture: Image.Image, index: int) -> Image.Image:
            """A detected object's box on a picture of the view (the model's input, at any size)."""
            target = result.targets[index]
            return picture if "on input" not in target else draw_relative_box(picture, target["on input"], label(target))

        rows = [[Panel(boxed(view, index), f"input\n{label(t)}")] for index, t in enumerate(result.targets)]
        arrays: dict[str, np.ndarray] = {}
        for name, explanation in explanations.items():
            data = self._keep_arrays(explanation, name, arrays)
            overlays[name] = []
            display = self.methods[name].display_name
            for index, target in enumerate(result.targets):
                picture = boxed(overlay(view, data["maps"][0, index], colormap=self.colormap), index)
                filename = f"{name}_{index + 1}_{slug(target['name'], 'class')}.png"
                saved = captioned(picture, f"{display} · {label(target)} · layer {layer}") if self.caption else picture
                saved.save(folder / filename)
                overlays[name].append(filename)
                rows[index].append(Panel(picture, f"{display}\n{label(target)}"))
        self._save_arrays(arrays, result, folder)
        # The region the model saw, without a map: `camlens report` lays each map over it.
        view.save(folder / "view.jpg", quality=90)
        title = f"{printable(result.path.name)}, layer {layer}\n{self.explained(result)}"
        comparison_figure(rows, folder / "comparison.png", title=title, colormap=self.colormap)
        return {"comparison": "comparison.png", "maps": "maps.npz", "view": "view.jpg", "overlays": overlays}

    @staticmethod
    def _keep_arrays(explanation, name: str, arrays: dict[str, np.ndarray]) -> dict:
        """The explanation's maps, raw maps and weights of the one input, into ``arrays`` under the
        method's ``name``; returns them all as NumPy arrays."""
        data = explanation.to_numpy()
        arrays[f"{name}/maps"] = data["maps"][0]
        for layer_name, raw in data["raw"].items():
            arrays[f"{name}/raw/{layer_name}"] = raw[0]
        for layer_name, weights in data["weights"].items():
            arrays[f"{name}/weights/{layer_name}"] = weights[0]
        return data

    @staticmethod
    def _save_arrays(arrays: dict[str, np.ndarray], result: ImageResult, folder: Path) -> None:
        arrays["targets"] = np.array([t["class"] for t in result.targets])
        arrays["probabilities"] = np.array([t["probability"] for t in result.targets], dtype=np.float32)
        np.savez_compressed(folder / "maps.npz", **arrays)

    def _write_array(self, values: np.ndarray, explanations: dict, result: ImageResult, folder: Path) -> dict:
        """An array input's outputs: per method and target its figure with the map (a signal's band,
        a volume's slices, a clip's frames, an image's overlay), ``view.png`` the input alone, the
        comparison (the input, then every figure, one under another), and the maps with the input
        (from which `camlens report` draws the same figures)."""
        layer = ", ".join(self.target_layers)
        arrays: dict[str, np.ndarray] = {}
        overlays: dict[str, list[str]] = {}
        view = input_figure(values, None, self.colormap)
        pictures = [captioned(view.copy(), f"input {printable(result.path.name)}")]
        for name, explanation in explanations.items():
            data = self._keep_arrays(explanation, name, arrays)
            display = self.methods[name].display_name
            overlays[name] = []
            for index, target in enumerate(result.targets):
                figure = input_figure(values, data["maps"][0, index], self.colormap)
                filename = f"{name}_{index + 1}_{slug(target['name'], 'class')}.png"
                text = f"{display} · {label(target)} · layer {layer}"
                (captioned(figure, text) if self.caption else figure).save(folder / filename)
                overlays[name].append(filename)
                pictures.append(captioned(figure, text))
        arrays["input"] = values  # `camlens report` draws each figure from it and the maps, as here
        self._save_arrays(arrays, result, folder)
        view.save(folder / "view.png")
        stacked(pictures).save(folder / "comparison.png")
        return {"comparison": "comparison.png", "maps": "maps.npz", "view": "view.png", "overlays": overlays,
                "kind": array_kind(values)}

    def explained(self, result: ImageResult) -> str:
        """What the maps explain, in words: with --class that is not the model's top-1."""
        targets, top = result.targets, result.predictions[0]
        if self.detection is not None:
            which = "" if self.class_index is None else f" of class {self.loaded.class_name(self.class_index)}"
            return (f"explained: {len(targets)} detected object(s){which}, class score >= "
                    f"{self.detection.score_threshold}, one per row")
        if self.class_index is not None:
            return f"explained: {label(targets[0])}, chosen with --class; top-1: {label(top)}"
        if len(targets) > 1:
            return f"explained: the top {len(targets)} classes, one per row"
        return f"explained: the top-1 class, {label(top)}"


@dataclass
class Detection:
    """``--task detection``: the model is an object detector, its output read as detections
    (N, D, 4 + classes) by ``reader`` (:mod:`camlens.detection`). Each detected object whose best
    class score reaches ``score_threshold`` is a target, the most confident first:
    :class:`~camlens.detection.BoxTarget` of its own box and class, matching detections that
    overlap it by ``iou_threshold``."""

    reader: Callable[[object], torch.Tensor]
    spec: str
    score_threshold: float
    iou_threshold: float

    def objects(self, model: torch.nn.Module, x: torch.Tensor, class_index: int | None, most: int,
                loaded: LoadedModel) -> tuple[list[list[BoxTarget]], list[dict]]:
        """``([targets of the one image], [each detection above the threshold, described])``: the
        targets are the ``most`` most confident (of ``class_index`` only, where given)."""
        with preserved(model), torch.no_grad():  # in eval mode, as the methods run it
            output = model(x)
            detections = check_detections(self.reader(output)).detach()[0].float().cpu()
        units = "normalised" if is_detr_style(output) else "pixels"
        # The box on the model's input as fractions of its width and height: where it is drawn.
        scale = torch.tensor([1.0, 1.0, 1.0, 1.0]) if units == "normalised" else torch.tensor(
            [x.shape[-1], x.shape[-2]] * 2, dtype=torch.float32)
        best, classes = detections[:, 4:].max(dim=1)
        keep = best >= self.score_threshold
        if class_index is not None:
            keep &= classes == class_index
        kept = keep.nonzero().flatten()
        kept = kept[best[kept].argsort(descending=True, stable=True)]
        if not kept.numel():
            which = "" if class_index is None else f" of class {loaded.class_name(class_index)}"
            raise CamlensError(f"no detection{which} with a class score of at least {self.score_threshold}: lower "
                               "--score-threshold")
        found = [{"class": int(classes[i]), "name": loaded.class_name(int(classes[i])),
                  "probability": round(float(best[i]), 6), "box": [float(v) for v in detections[i, :4]],
                  "units": units, "on input": [round(float(v), 6) for v in detections[i, :4] / scale]}
                 for i in kept.tolist()]
        targets = [BoxTarget(detections[i, None, :4], classes[i, None], iou_threshold=self.iou_threshold)
                   for i in kept[:most].tolist()]
        return [targets], found


def label(target: dict) -> str:
    return f"{target['name']} ({target['probability']:.2f})"


def output_names(paths: Sequence[Path], out_dir: Path) -> list[str]:
    """A distinct output folder per input, named after the file. An existing folder is reused
    only when camlens made it for the same file: never a folder of the user's, and never the
    outputs of another image that happens to have the same name."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = slug(path.stem, "image")
        name, count = stem, 1
        while name in taken or ((out_dir / name).exists() and not made_for(out_dir / name, path)):
            count += 1
            name = f"{stem}-{count}"
        taken.add(name)
        names.append(name)
    return names


def made_for(folder: Path, path: Path) -> bool:
    """Whether camlens made ``folder`` for the image file ``path``."""
    record = folder_record(folder)
    return record is not None and record.get("source") == str(path.resolve())


def folder_record(folder: Path) -> dict | None:
    """What the marker of an image folder camlens made records (its run and image), or None: no
    marker, a damaged one, or a link (never followed)."""
    try:
        record = json.loads(read_plain(folder / MARKER, MAX_MARKER_BYTES).decode("utf-8"))
    except (CamlensError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


@click.command(short_help="Overlays, a comparison figure and maps for each image.")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT_OR_DIR...")
@method_option
@click.option("--target-layer", metavar="NAME", help="Layer to explain (default: the last feature map before pooling). See `camlens layers`.")
@click.option("--class", "class_", metavar="C", help="Explain this class (index or name) instead of the top-1.")
@click.option("--top-k", type=click.IntRange(min=1), help="Explain the K most probable classes.")
@click.option("--out", default="camlens-out", show_default=True,
              help="Output directory (one run at a time; folders of earlier runs are kept and listed).")
@click.option("--colormap", default=DEFAULT_COLORMAP, show_default=True, metavar="NAME",
              help="Colour map of the maps: any matplotlib colour map (viridis, inferno, turbo, ...).")
@click.option("--caption/--no-caption", default=True, show_default=True,
              help="Write the method, class and layer under each overlay image.")
@click.option("--task", type=click.Choice(["classification", "detection"]), default="classification",
              show_default=True,
              help="detection: the model is an object detector. Each object it detects (best class score at least "
                   "--score-threshold; of --class only, where given) is explained, the most confident first, at "
                   "most --top-k (default 3), its box drawn on the maps.")
@click.option("--detections", "detections_format", metavar="|".join(FORMATS),
              help="With --task detection: how the detector's output reads as boxes and class scores (default: "
                   "detr where it has logits and pred_boxes, torchvision where it is a list of dicts and the class "
                   "names give their number; yolov5 and yolov8 are raw heads).")
@click.option("--score-threshold", type=Finite(0, 1), default=0.5, show_default=True,
              help="With --task detection: the least class score of a detection explained.")
@click.option("--iou-threshold", type=Finite(0, 1), default=0.5, show_default=True,
              help="With --task detection: the least overlap (IoU) with an explained box of the detections its "
                   "score sums (class score times overlap, as pytorch-grad-cam's FasterRCNNBoxScoreTarget).")
@fc_option
@top_channels_option
@smooth_options
@run_options
@engine_options
@html_option
@yes_option
@model_options
def explain(inputs, methods, target_layer, class_, top_k, out, colormap, caption, task, detections_format,
            score_threshold, iou_threshold, fc, top_channels, aug_smooth, eigen_smooth, device, batch_size, seed,
            optimize, compile_model, html, yes, **model_args) -> None:
    """Explain INPUT_OR_DIR... (image files, or .npy/.npz arrays: signals, volumes, clips) with each
    method: overlays or figures, a comparison figure, maps and a manifest."""
    started = time.perf_counter()
    detector = task == "detection"
    if class_ is not None and top_k is not None and not detector:
        raise CamlensError("give --class or --top-k, not both")
    if not detector and (detections_format is not None or score_threshold != 0.5 or iou_threshold != 0.5):
        raise CamlensError("--detections, --score-threshold and --iou-threshold are for --task detection")
    if detector and output_given() is not None:
        raise CamlensError("--output picks class scores; a detector's output is read by --detections")
    check_colormap(colormap)
    files, skipped, unreadable = expand_inputs(inputs, IMAGE_SUFFIXES | ARRAY_SUFFIXES)
    if not files:
        # Nothing to explain: said before the model loads, and no output folder is made or touched.
        if len(unreadable) == 1 and not skipped:
            raise CamlensError(f"nothing to explain: {printable(next(iter(unreadable.values())))}")
        for path in skipped:
            echo_error(f"skipped (not an image or array file): {printable(path)}")
        for reason in unreadable.values():
            echo_error(f"failed: {printable(reason)}")
        raise CamlensError("nothing to explain: none of the inputs is an image or array file that can be read")
    example = first_array_shape(files)
    if example is None and all(is_array_file(path) for path in files):
        # No array reads: said before the model loads (it would be probed on a photo's shape).
        errors = []
        for path in files:
            try:
                load_array(path)
            except CamlensError as error:
                errors.append(str(error))
        if len(errors) == 1 and not unreadable and not skipped:
            raise CamlensError(f"nothing to explain: {printable(errors[0])}")
        for reason in [*errors, *unreadable.values()]:
            echo_error(f"failed: {printable(reason)}")
        raise CamlensError("nothing to explain: none of the array inputs can be read")
    detection = None
    if detector:
        # Read before the model loads where the format is named; "torchvision" takes the class names' count.
        detection = Detection(detections_reader(detections_format, class_count(model_args)), detections_format or "auto",
                              score_threshold, iou_threshold)
        click.get_current_context().meta[OUTPUT] = detection.reader
    group = speak_for(join())
    skipped_methods: dict[str, str] = {}
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args, fc=fc,
                                                    on_skip=skipped_methods.__setitem__,
                                                    smooth={"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth},
                                                    example=example, detector=detector)
    torch_device = group.device(torch_device)
    class_index = resolve_class(class_, loaded, classes) if class_ is not None else None
    if top_k is not None and top_k > classes and not detector:
        raise CamlensError(f"--top-k {top_k} is more than the model's {classes} classes")
    explainer = Explainer(loaded, chosen, target_layer, class_index, top_k or (3 if detector else 1), torch_device,
                          batch_size, seed, fc=fc, colormap=colormap, caption=caption,
                          engine=engine_settings(optimize, compile_model, torch_device), top_channels=top_channels,
                          smooth={"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth}, detection=detection)
    explainer.plan(files, yes, group)  # before any output: a run declined leaves nothing
    results = [ImageResult(path, status="failed", error=reason) for path, reason in unreadable.items()]

    # Of a run of several processes, the first (rank 0) holds the folder and names every output
    # folder before the work starts; each process publishes the folders of the images it takes.
    with contextlib.ExitStack() as stack:
        run_folder: RunFolder | None = None

        def claim() -> tuple[str, list[str], dict]:
            nonlocal run_folder
            run_folder = held_output_dir(stack, out, "explain")
            out_dir = run_folder.path
            names = output_names(files, out_dir)
            if group.distributed:
                run_folder.own_all(names)
            # Each run has an id, in its manifest and in the marker of every image folder it
            # writes: the manifest of the last complete run stays until this run's replaces it,
            # and the report tells which folders are still that run's.
            record = {"id": uuid.uuid4().hex, "camlens": __version__, "created": now(), "command": command_line(),
                      "methods": chosen, "model": loaded.name}
            return str(out_dir), names, record

        folder, names, run_record = group.from_main(claim)
        out_dir = Path(folder)
        place = run_folder.own if run_folder is not None and not group.distributed else out_dir.joinpath

        def finish(status: str) -> list[dict]:
            kept = earlier_folders(out_dir, results)
            manifest = build_manifest(loaded, classes, explainer, chosen, skipped_methods, results, kept, skipped,
                                      torch_device, time.perf_counter() - started, top_k, class_index, seed,
                                      batch_size, status, run_record["id"])
            try:
                run_folder.write("manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
            except OSError as error:
                raise CamlensError(f"cannot write {out_dir / 'manifest.json'}: {os_reason(error)}") from None
            return kept

        mine: list[tuple[int, ImageResult]] = []
        try:
            with LogProgress() as bar:
                overall = bar.add_task("images", total=len(files))
                step = bar.add_task("", total=1, visible=False)

                def report(method: str, done: int, total: int) -> None:
                    bar.update(step, description=f"  {METHODS[method].display_name}", completed=done, total=total, visible=True)

                queue = WorkQueue(group, "explain", len(files))
                for index in queue:
                    path = files[index]
                    bar.update(overall, description=printable(path.name))
                    mine.append((index, explain_one(explainer, path, out_dir, names[index], place, report,
                                                    run_record)))
                    bar.update(step, visible=False)
                    bar.update(overall, completed=queue.finished())
                if group.main:  # the others' last images
                    queue.wait(len(files), lambda done: bar.update(overall, description="images (other processes)",
                                                                   completed=done))
        except KeyboardInterrupt:
            if run_folder is not None:
                results.extend(result for _, result in sorted(mine, key=lambda item: item[0]))
                finish("interrupted")
            raise
        everyone = group.collect(mine)
        if run_folder is None:  # rank 0 writes the manifest and says what was done
            return
        results.extend(result for _, result in sorted((item for part in everyone for item in part),
                                                      key=lambda item: item[0]))
        if group.distributed:
            run_folder.forget(names)  # the names of images that failed: never written
        kept = finish("complete")
        if html and any(r.status == "ok" for r in results):
            write_html(out_dir)
    for path in skipped:
        echo_error(f"skipped (not an image or array file): {printable(path)}")
    for r in results:
        if r.status != "ok":
            echo_error(f"failed: {r.error}")
        for name, blanks in r.blank.items():
            for blank in blanks:
                target = r.targets[blank["target"]]["name"] if blank["target"] < len(r.targets) else "?"
                echo_error(f"blank map: {printable(r.path.name)}, {METHODS[name].display_name}, {target}: "
                           f"{blank['reason']}")
    print_summary(results, chosen, out_dir, class_index is not None, skipped_methods, kept, explainer.start_up)
    if any(r.status != "ok" for r in results):
        sys.exit(1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> list[str]:
    return ["camlens", *map(printable, sys.argv[1:])]


def explain_one(explainer: Explainer, path: Path, out_dir: Path, name: str, place: Callable[[str], Path], report,
                run_record: dict) -> ImageResult:
    """Explain one image into ``out_dir``'s ``name`` (``place(name)``: the path, recorded as
    camlens's before it is written); on failure leave nothing behind but the error."""
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".camlens-staging-"))
        result = explainer.run(path, staging, report)
        result.output = name
        # The marker says camlens made the folder, and which run: a later run into the same
        # --out lists the folder from it.
        record = {"run": {**run_record, "target_layers": list(explainer.target_layers)}, "image": result.to_dict(),
                  "source": str(path.resolve())}
        (staging / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        publish(staging, place(name))
        return result
    except CamlensError as error:
        message = str(error)
        if not message.startswith(printable(path)):
            message = f"{printable(path)}: {message}"
        return ImageResult(path, status="failed", error=message)
    except Exception as error:  # the model or a library failed on this image: report it, go on
        if isinstance(error, OSError) and error.errno is not None:  # the image was read: writing failed
            reason = f"cannot write its outputs in {printable(out_dir)} ({os_reason(error)})"
        else:
            reason = first_line(error)
        return ImageResult(path, status="failed", error=f"{printable(path)}: {reason}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, final: Path) -> None:
    """Move a finished folder into place, replacing only a folder camlens made earlier."""
    publish_mode(staging)
    if final.exists():
        aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=".camlens-old-"))
        final.rename(aside / "old")
        staging.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(final)


def earlier_folders(out_dir: Path, results: Sequence[ImageResult]) -> list[dict]:
    """The folders earlier runs made in ``out_dir`` and this run left in place, each with the
    image entry and the run (command, time, methods, layers) its marker records."""
    ours = {r.output for r in results if r.output}
    kept = []
    for marker in sorted(out_dir.glob(f"*/{MARKER}")):
        folder = marker.parent.name
        if folder in ours or folder.startswith(".") or marker.parent.is_symlink():
            continue
        record = folder_record(marker.parent)
        try:
            kept.append({**record["image"], "output": folder, "run": record["run"]})
        except (KeyError, TypeError):
            kept.append({"output": folder, "run": None})  # damaged: the folder is kept, its run unknown
    return kept


def build_manifest(loaded, classes, explainer, methods, skipped_methods, results, kept, skipped, device, seconds,
                   top_k, class_index, seed, batch_size, status, run_id) -> dict:
    return {
        "camlens": __version__,
        "run id": run_id,
        "status": status,
        "created": now(),
        "command": command_line(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
        "device": str(device),
        "model": {"name": loaded.name, "source": loaded.source, "preprocess": loaded.preprocess.to_dict(),
                  "classes": classes, **loaded.details},
        "methods": methods,
        "skipped_methods": skipped_methods,
        "options": {name: m.options() for name, m in explainer.methods.items()},
        "target_layers": list(explainer.target_layers),
        "default_layer": explainer.default_layer,
        "layout": explainer.layout,
        "start-up seconds": {what: round(seconds, 4) for what, seconds in explainer.start_up.items()},
        "targets": ({"class": class_index} if class_index is not None else {"top_k": top_k or 1})
        if explainer.detection is None else {
            "task": "detection", "detections": explainer.detection.spec, "objects at most": explainer.top_k,
            "score_threshold": explainer.detection.score_threshold,
            "iou_threshold": explainer.detection.iou_threshold,
            **({"class": class_index} if class_index is not None else {})},
        "seed": seed,
        "batch_size": batch_size,
        "engine": explainer.engine,
        "render": {"colormap": explainer.colormap, "captions": explainer.caption},
        "images": [r.to_dict() for r in results],
        "kept": kept,
        "skipped": [printable(p) for p in skipped],
        "summary": {"ok": sum(r.status == "ok" for r in results),
                    "failed": sum(r.status != "ok" for r in results),
                    "skipped": len(skipped), "kept": len(kept), "seconds": round(seconds, 3)},
    }


WIDE_UP_TO = 3  # methods that always get a column of seconds each in the summary table


def print_summary(results: list[ImageResult], methods: list[str], out_dir: Path, chosen_class: bool,
                  skipped_methods: dict[str, str], kept: list[dict], start_up: dict[str, float] | None = None) -> None:
    """The run in a table: one row per image with a column of seconds per method (always for up to
    ``WIDE_UP_TO`` methods, and for more where that fits the terminal); else one row per image,
    with the seconds of all methods, then one row per method with its seconds. ``start_up``: the
    seconds of work done once, by kind, said under the table (not in the methods' seconds)."""
    notes = [f"{METHODS[name].display_name} skipped: {reason}" for name, reason in skipped_methods.items()]
    if start_up_note := describe_start_up(start_up or {}):
        notes.append(start_up_note)
    if kept:
        notes.append(f"{len(kept)} folder(s) of earlier runs kept in {printable(out_dir)}: "
                     "listed under \"kept\" in manifest.json")
    screen = console("stdout")
    title = f"camlens explain -> {printable(out_dir)}"
    caption = "\n".join(notes) or None
    table = _image_table(results, methods, chosen_class, title, caption, per_method=True)
    tables = [table]
    natural = screen.measure(table, options=screen.options.update(max_width=1_000_000)).maximum
    if len(methods) > WIDE_UP_TO and natural > screen.width:  # squeezed, the columns would cut their titles
        tables = [_image_table(results, methods, chosen_class, title, None, per_method=False),
                  _method_table(results, methods, caption)]
    try:
        for each in tables:
            screen.print(each)
    except BrokenPipeError:  # `camlens explain ... | head`: the results are on disk all the same
        pass


def _image_table(results: list[ImageResult], methods: list[str], chosen_class: bool, title: str,
                 caption: str | None, per_method: bool) -> Table:
    """One row per image; the seconds of each method in a column of its own (``per_method``),
    or of all of them in one."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("image")
    table.add_column("explained class" if chosen_class else "prediction")
    table.add_column("p", justify="right")
    if chosen_class:
        table.add_column("top-1")
    if per_method:
        for name in methods:
            table.add_column(f"{METHODS[name].display_name} s", justify="right")
    else:
        table.add_column(f"{len(methods)} methods s", justify="right")
    table.add_column("status")
    for r in results:
        if r.status == "ok":
            names = ", ".join(t["name"] for t in r.targets)
            probabilities = ", ".join(f"{t['probability']:.2f}" for t in r.targets)
            top = [label(r.predictions[0])] if chosen_class else []
            times = ([f"{r.timings[name]:.2f}" for name in methods] if per_method
                     else [f"{sum(r.timings[name] for name in methods):.2f}"])
            status = "ok" if not r.blank else "blank: " + ", ".join(METHODS[m].display_name for m in r.blank)
            table.add_row(printable(r.path.name), names, probabilities, *top, *times, status)
        else:
            table.add_row(printable(r.path.name), "-", "-", *(["-"] if chosen_class else []),
                          *["-"] * (len(methods) if per_method else 1), "failed")
    return table


def _method_table(results: list[ImageResult], methods: list[str], caption: str | None) -> Table:
    """One row per method: its seconds per image (mean over the images explained) and in all."""
    done = [r for r in results if r.status == "ok"]
    table = Table(title=f"seconds per method, over {len(done)} image(s) explained", title_justify="left",
                  caption=caption, caption_justify="left")
    table.add_column("method")
    table.add_column("name")
    table.add_column("s per image", justify="right")
    table.add_column("total s", justify="right")
    for name in methods:
        seconds = [r.timings[name] for r in done]
        mean = f"{sum(seconds) / len(seconds):.2f}" if seconds else "-"
        table.add_row(METHODS[name].display_name, name, mean, f"{sum(seconds):.2f}" if seconds else "-")
    return table
