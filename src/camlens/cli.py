"""The ``camlens`` command line: the only place that prints or draws progress bars.

click parses the arguments; rich draws the progress bars and tables. Every user error ends
as one line ``camlens: error: ...`` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import difflib
import json
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .capture import check_finite, check_hookable, default_layer, find_default_layer, record, resolve_layer, trace_outputs
from .errors import CamlensError
from .datasets import load_dataset
from .evaluate import FAITHFULNESS, HIGHER_IS_BETTER, LOCALISATION, METRICS, TITLES, ResultStore, evaluate_image, mean_curves, mean_interval, summarise
from .io import ensure_writable_dir, expand_inputs, load_image, publish_mode, write_atomic
from .methods import METHODS, get_method, list_methods
from .models import LoadedModel, Preprocess, class_names_from_file, load_model
from .metrics import cascading_randomisation
from .render import Panel, bar_chart, comparison_figure, curve_plot, model_view, overlay, sanity_figure, similarity_plot
from .targets import TopK

SEED_METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam")
BATCHED_METHODS = {"smoothgradcam++", "scorecam"}
MARKER = ".camlens"  # in every output folder camlens made: only those are ever replaced
MAX_INPUT_SIZE = 4096


def console(stream_name: str) -> Console:
    """A rich console on stdout or stderr, wide enough for tables in files and CI logs."""
    stream = getattr(sys, stream_name)
    wide = stream is None or not stream.isatty()
    return Console(file=stream, highlight=False, width=160 if wide else None)


def echo_error(text: str) -> None:
    """One line on stderr, never wrapped; a closed pipe is not an error worth a traceback."""
    try:
        click.echo(text, err=True)
    except (BrokenPipeError, OSError):
        pass


def first_line(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def printable(text: object) -> str:
    """A file name as text that can always be shown (undecodable bytes replaced)."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# -- shared options -----------------------------------------------------------------------------

def model_options(command: Callable) -> Callable:
    options = [
        click.option("--model", "model_spec", default="efficientnet_lite0", show_default=True,
                     help="A registered model, a TorchScript/torch.export archive, or package.module:factory."),
        click.option("--weights", type=click.Path(dir_okay=False), help="State dict for a factory model (loaded with weights_only=True)."),
        click.option("--input-size", type=click.IntRange(1, MAX_INPUT_SIZE), help="Side of the square model input (default: the model's, else 224)."),
        click.option("--resize", type=click.IntRange(1, 2 * MAX_INPUT_SIZE), help="Shorter side before the centre crop (default: input size x 8/7)."),
        click.option("--mean", type=(float, float, float), help="Per-channel mean of the normalisation (RGB, on [0, 1] pixels)."),
        click.option("--std", type=(float, float, float), help="Per-channel standard deviation of the normalisation."),
        click.option("--class-names", type=click.Path(dir_okay=False), help="Class names: a text file (one per line) or a JSON list."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_options(command: Callable) -> Callable:
    """--device, --batch-size and --seed, shared by the commands that run methods."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--batch-size", type=click.IntRange(min=1),
                     help="Inputs per forward pass (Score-CAM, Smooth Grad-CAM++, the metrics)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                     help="Seed of Smooth Grad-CAM++'s noise (and of the re-initialisation in sanity)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_model(
    model_spec: str,
    weights: str | None,
    input_size: int | None,
    resize: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    class_names: str | None,
) -> LoadedModel:
    names = class_names_from_file(class_names) if class_names else None
    loaded = load_model(model_spec, weights=weights, class_names=names)
    if any(value is not None for value in (input_size, resize, mean, std)):
        base = loaded.preprocess
        size = input_size or base.size
        if resize is None:
            # Keep the model's way of framing the image: a crop scales with the input size.
            resize = None if base.resize is None else (base.resize if input_size is None else round(size * 8 / 7))
        loaded.preprocess = Preprocess(size=size, resize=resize, mean=mean or base.mean,
                                       std=std or base.std, interpolation=base.interpolation)
    return loaded


def choose_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CamlensError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CamlensError("CUDA is not available on this machine: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CamlensError(f"there is no {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps_ok:
        raise CamlensError("MPS is not available on this machine: use --device cpu")
    return device


def resolve_class(value: str, loaded: LoadedModel, classes: int) -> int:
    """A class given as an index or a name: a short name, a full label or one of its synonyms."""
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < classes:
            raise CamlensError(f"class {index} is out of range: the model has {classes} classes (valid: 0 to {classes - 1})")
        return index
    names = loaded.class_names
    if not names:
        raise CamlensError(f"class {value!r} is a name, but the model has no class names: give an index or --class-names")
    labels = loaded.class_labels or names
    wanted = text.lower()
    matches = [
        index for index, (name, label) in enumerate(zip(names, labels))
        if wanted in {name.lower(), label.lower(), *(part.strip().lower() for part in label.split(","))}
    ]
    if len(matches) > 1:
        choices = ", ".join(f"{index} ({labels[index]})" for index in matches)
        raise CamlensError(f"class {value!r} is ambiguous: give its index, one of {choices}")
    if matches:
        return matches[0]
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise CamlensError(f"unknown class {value!r}{hint}")


def slug(text: str, fallback: str) -> str:
    """A file-name-safe, lower-case form of ``text`` (letters of any script kept), at most 80 characters."""
    cleaned = re.sub(r"[^\w]+", "-", printable(text).lower()).strip("-_")
    return cleaned[:80].rstrip("-_") or fallback


# -- explain ------------------------------------------------------------------------------------

def prepare(methods: Sequence[str], out: str, device: str, target_layer: str | None,
            model_args: dict) -> tuple[list[str], torch.device, LoadedModel, int]:
    """What every command checks before any work: methods, output, device, model, layer."""
    chosen = list(dict.fromkeys(get_method(m).name for m in methods)) or list(SEED_METHODS)
    if not out.strip():
        raise CamlensError("--out is empty: name an output directory")
    torch_device = choose_device(device)
    loaded = open_model(**model_args)
    classes = probe(loaded, target_layer, chosen)
    return chosen, torch_device, loaded, classes


def method_objects(model, methods: Sequence[str], target_layer: str | None, batch_size: int | None,
                   seed: int) -> dict[str, Any]:
    objects = {}
    for name in methods:
        options: dict[str, Any] = {}
        if name in BATCHED_METHODS and batch_size is not None:
            options["batch_size"] = batch_size
        if name == "smoothgradcam++":
            options["seed"] = seed
        objects[name] = METHODS[name](model, target_layer=target_layer, **options)
    return objects


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

    def to_dict(self) -> dict:
        data = {"input": printable(self.path), "status": self.status}
        if self.error:
            data["error"] = self.error
            return data
        data.update(output=self.output, size=list(self.size or ()), predictions=self.predictions,
                    targets=self.targets, files=self.files,
                    timings={key: round(value, 4) for key, value in self.timings.items()})
        return data


class Explainer:
    """Explains one image at a time with every method, writing its outputs into a folder."""

    def __init__(self, loaded: LoadedModel, methods: Sequence[str], target_layer: str | None,
                 class_index: int | None, top_k: int, device: torch.device,
                 batch_size: int | None, seed: int) -> None:
        self.loaded = loaded
        self.model = loaded.module.to(device)
        self.device = device
        self.class_index = class_index
        self.top_k = top_k
        self.target_layers: tuple[str, ...] = ()
        self.default_layer: bool | None = None
        self.methods = method_objects(self.model, methods, target_layer, batch_size, seed)

    def targets(self):
        return self.class_index if self.class_index is not None else TopK(self.top_k)

    def run(self, path: Path, folder: Path, progress: Callable[[str, int, int], None]) -> ImageResult:
        result = ImageResult(path)
        start = time.perf_counter()
        preprocess = self.loaded.preprocess
        image = load_image(path, draft_size=preprocess.resize or preprocess.size)
        result.size = image.size
        x = preprocess(image).unsqueeze(0).to(self.device)
        result.timings["load"] = time.perf_counter() - start

        explanations = {}
        for name, method in self.methods.items():
            tick = time.perf_counter()
            explanations[name] = method(x, self.targets(), progress=lambda done, total, n=name: progress(n, done, total))
            result.timings[name] = time.perf_counter() - tick
        first = next(iter(explanations.values()))
        self.target_layers, self.default_layer = first.target_layers, first.default_layer
        # The methods' own clean forward gives the predictions: no extra forward pass.
        probabilities = first.logits.softmax(dim=1)[0].cpu()
        top = probabilities.topk(min(5, probabilities.numel()))
        result.predictions = [self._describe(int(i), float(p)) for p, i in zip(top.values, top.indices)]
        result.targets = [
            self._describe(int(c), float(p)) for c, p in zip(first.targets[0].tolist(), first.probabilities[0].tolist())
        ]

        tick = time.perf_counter()
        result.files = self._write(image, explanations, result, folder)
        result.timings["render"] = time.perf_counter() - tick
        result.timings["total"] = time.perf_counter() - start
        return result

    def _describe(self, index: int, probability: float) -> dict:
        return {"class": index, "name": self.loaded.class_name(index), "probability": round(probability, 6)}

    def _write(self, image: Image.Image, explanations: dict, result: ImageResult, folder: Path) -> dict:
        view = model_view(image, self.loaded.preprocess.crop_box(*image.size))
        overlays: dict[str, list[str]] = {}
        rows = [[Panel(view, f"input\n{t['name']} ({t['probability']:.2f})")] for t in result.targets]
        arrays: dict[str, np.ndarray] = {}
        for name, explanation in explanations.items():
            data = explanation.to_numpy()
            arrays[f"{name}/maps"] = data["maps"][0]
            for layer, raw in data["raw"].items():
                arrays[f"{name}/raw/{layer}"] = raw[0]
            for layer, weights in data["weights"].items():
                arrays[f"{name}/weights/{layer}"] = weights[0]
            overlays[name] = []
            for index, target in enumerate(result.targets):
                picture = overlay(view, data["maps"][0, index])
                filename = f"{name}_{index + 1}_{slug(target['name'], 'class')}.png"
                picture.save(folder / filename)
                overlays[name].append(filename)
                title = f"{METHODS[name].display_name}\n{target['name']} ({target['probability']:.2f})"
                rows[index].append(Panel(picture, title))
        arrays["targets"] = np.array([t["class"] for t in result.targets])
        arrays["probabilities"] = np.array([t["probability"] for t in result.targets], dtype=np.float32)
        np.savez_compressed(folder / "maps.npz", **arrays)
        top = result.predictions[0]
        comparison_figure(rows, folder / "comparison.png",
                          title=f"{printable(result.path.name)}: {top['name']} ({top['probability']:.2f})")
        (folder / MARKER).write_text(f"made by camlens {__version__}\n")
        return {"comparison": "comparison.png", "maps": "maps.npz", "overlays": overlays}


def output_names(paths: Sequence[Path], out_dir: Path) -> list[str]:
    """A distinct output folder per input, named after the file; never one camlens did not make."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = slug(path.stem, "image")
        name, count = stem, 1
        while name in taken or ((out_dir / name).exists() and not (out_dir / name / MARKER).is_file()):
            count += 1
            name = f"{stem}-{count}"
        taken.add(name)
        names.append(name)
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="camlens")
def cli() -> None:
    """camlens: what a convolutional network looks at when it decides."""


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--method", "-m", "methods", multiple=True, metavar="M",
              help="A method (repeatable; default: the five seed methods). See `camlens methods`.")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling). See `camlens layers`.")
@click.option("--class", "class_", metavar="C", help="Explain this class (index or name) instead of the top-1.")
@click.option("--top-k", type=click.IntRange(min=1), help="Explain the K most probable classes.")
@click.option("--out", default="camlens-out", show_default=True, help="Output directory.")
@run_options
@model_options
def explain(inputs, methods, target_layer, class_, top_k, out, device, batch_size, seed, **model_args) -> None:
    """Explain IMAGE_OR_DIR... with each method: overlays, a comparison figure, maps and a manifest."""
    started = time.perf_counter()
    if class_ is not None and top_k is not None:
        raise CamlensError("give --class or --top-k, not both")
    files, skipped = expand_inputs(inputs)
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args)
    out_dir = ensure_writable_dir(out)
    class_index = resolve_class(class_, loaded, classes) if class_ is not None else None
    if top_k is not None and top_k > classes:
        raise CamlensError(f"--top-k {top_k} is more than the model's {classes} classes")
    explainer = Explainer(loaded, chosen, target_layer, class_index, top_k or 1, torch_device, batch_size, seed)

    # A manifest from an earlier run would describe folders this run replaces: it goes first.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    results: list[ImageResult] = []
    names = output_names(files, out_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())

    def finish(status: str) -> None:
        manifest = build_manifest(loaded, classes, explainer, chosen, results, skipped, torch_device,
                                  time.perf_counter() - started, top_k, class_index, seed, batch_size, status)
        write_atomic(out_dir / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))

    try:
        with Progress(*columns, console=console("stderr"), transient=True) as bar:
            overall = bar.add_task("images", total=len(files))
            step = bar.add_task("", total=1, visible=False)

            def report(method: str, done: int, total: int) -> None:
                bar.update(step, description=f"  {METHODS[method].display_name}", completed=done, total=total, visible=True)

            for path, name in zip(files, names):
                bar.update(overall, description=printable(path.name))
                results.append(explain_one(explainer, path, out_dir, name, report))
                bar.update(step, visible=False)
                bar.advance(overall)
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    finish("complete")
    for path in skipped:
        echo_error(f"skipped (not an image file): {printable(path)}")
    for r in results:
        if r.status != "ok":
            echo_error(f"failed: {r.error}")
    print_summary(results, chosen, out_dir)
    if any(r.status != "ok" for r in results):
        sys.exit(1)


def explain_one(explainer: Explainer, path: Path, out_dir: Path, name: str, report) -> ImageResult:
    """Explain one image into out_dir/name; on failure leave nothing behind but the error."""
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".camlens-staging-"))
        result = explainer.run(path, staging, report)
        publish(staging, out_dir / name)
        result.output = name
        return result
    except CamlensError as error:
        message = str(error)
        if not message.startswith(str(path)):
            message = f"{printable(path)}: {message}"
        return ImageResult(path, status="failed", error=message)
    except Exception as error:  # the model or a library failed on this image: report it, go on
        return ImageResult(path, status="failed", error=f"{printable(path)}: {first_line(error)}")
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


def probe(loaded: LoadedModel, target_layer: str | None, methods: Sequence[str]) -> int:
    """Check the model, preprocessing, target layer and CAM's head once, on a blank grey photo.

    A batch of two, because Score-CAM and Smooth Grad-CAM++ forward batches: a model exported
    with a fixed batch size of one fails here rather than on every image. Returns the number
    of classes.
    """
    check_hookable(loaded.module)
    preprocess = loaded.preprocess
    blank = preprocess(Image.new("RGB", (preprocess.size, preprocess.size), (128, 128, 128)))
    example = blank.unsqueeze(0).expand(2, -1, -1, -1).contiguous()
    layers = dict([resolve_layer(loaded.module, target_layer)]) if target_layer is not None else {}
    try:
        output, _ = record(loaded.module, example, layers)
        if target_layer is None:
            find_default_layer(loaded.module, example[:1])
    except CamlensError as error:
        raise CamlensError(f"{error} (checked on a blank {preprocess.size}x{preprocess.size} input)") from None
    except Exception as error:
        hint = "check --input-size"
        if loaded.source.startswith("torch.export"):
            hint += "; export with a dynamic batch size: dynamic_shapes=({0: torch.export.Dim('batch')},)"
        raise CamlensError(
            f"the model fails on a batch of 2x3x{preprocess.size}x{preprocess.size} ({first_line(error)}); {hint}"
        ) from None
    check_finite(output, "model outputs on a blank input (check --mean and --std)")
    if loaded.class_names is not None and len(loaded.class_names) != output.shape[1]:
        raise CamlensError(f"{len(loaded.class_names)} class names for a model with {output.shape[1]} classes")
    if "cam" in methods:  # whether the head suits CAM does not depend on the image
        METHODS["cam"](loaded.module, target_layer=target_layer)(example[:1])
    return int(output.shape[1])


def build_manifest(loaded, classes, explainer, methods, results, skipped, device, seconds,
                   top_k, class_index, seed, batch_size, status) -> dict:
    return {
        "camlens": __version__,
        "status": status,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["camlens", *map(printable, sys.argv[1:])],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
        "device": str(device),
        "model": {"name": loaded.name, "source": loaded.source, "preprocess": loaded.preprocess.to_dict(),
                  "classes": classes, **loaded.details},
        "methods": methods,
        "options": {name: m.options() for name, m in explainer.methods.items()},
        "target_layers": list(explainer.target_layers),
        "default_layer": explainer.default_layer,
        "targets": {"class": class_index} if class_index is not None else {"top_k": top_k or 1},
        "seed": seed,
        "batch_size": batch_size,
        "images": [r.to_dict() for r in results],
        "skipped": [printable(p) for p in skipped],
        "summary": {"ok": sum(r.status == "ok" for r in results),
                    "failed": sum(r.status != "ok" for r in results),
                    "skipped": len(skipped), "seconds": round(seconds, 3)},
    }


def print_summary(results: list[ImageResult], methods: list[str], out_dir: Path) -> None:
    table = Table(title=f"camlens explain -> {printable(out_dir)}", title_justify="left")
    for column, justify in (("image", "left"), ("prediction", "left"), ("p", "right")):
        table.add_column(column, justify=justify)
    for name in methods:
        table.add_column(f"{METHODS[name].display_name} s", justify="right")
    table.add_column("status")
    for r in results:
        if r.status == "ok":
            top = r.predictions[0]
            times = [f"{r.timings[name]:.2f}" for name in methods]
            table.add_row(printable(r.path.name), top["name"], f"{top['probability']:.2f}", *times, "ok")
        else:
            table.add_row(printable(r.path.name), "-", "-", *["-"] * len(methods), "failed")
    try:
        console("stdout").print(table)
    except BrokenPipeError:  # `camlens explain ... | head`: the results are on disk all the same
        pass


# -- evaluate, sanity -----------------------------------------------------------------------------

@cli.command()
@click.argument("data")
@click.option("--method", "-m", "methods", multiple=True, metavar="M", help="A method (repeatable; default: the five seed methods).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRICS),
              help="A metric (repeatable; default: all, the box metrics when the data has boxes).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N images only.")
@click.option("--out", default="camlens-eval", show_default=True, help="Output directory (a run resumes from it).")
@click.option("--boxes", type=click.Path(), help="Boxes: a CSV path,xmin,ymin,xmax,ymax or a folder of VOC XML files.")
@click.option("--mapping", type=click.Path(dir_okay=False), help="Label to class index: JSON {label: index} or CSV label,index.")
@click.option("--steps", type=click.IntRange(2, 1024), default=16, show_default=True, help="Deletion/insertion steps.")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling).")
@run_options
@model_options
def evaluate(data, methods, metrics, limit, out, boxes, mapping, steps, target_layer, device, batch_size, seed,
             **model_args) -> None:
    """Every method on every image of DATA: the Score-CAM paper's metrics, mean and 95% CI."""
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args)
    dataset = load_dataset(data, loaded.class_names, classes, loaded.class_labels, mapping, boxes)
    wanted = list(dict.fromkeys(metrics)) or [*FAITHFULNESS, *(LOCALISATION if dataset.has_boxes else ())]
    if any(m in LOCALISATION for m in wanted) and not dataset.has_boxes:
        raise CamlensError("localisation metrics need boxes: give --boxes, or VOC XML files beside the images")
    samples = dataset.samples[:limit] if limit else dataset.samples
    out_dir = ensure_writable_dir(out)
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    config = {"data": str(Path(data).resolve()), "model": loaded.name, "preprocess": loaded.preprocess.to_dict(),
              "methods": chosen, "metrics": wanted, "steps": steps, "target_layer": target_layer, "seed": seed}
    store = ResultStore(out_dir, config)
    model = loaded.module.to(torch_device)
    objects = method_objects(model, chosen, target_layer, batch_size, seed)
    chunk = batch_size or 32

    def key(sample) -> str:
        try:
            return str(sample.path.relative_to(root))
        except ValueError:
            return str(sample.path)

    pending = [(s, m) for s in samples for m in chosen if not store.done(key(s), m)]
    skipped = list(dataset.skipped)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console("stderr"), transient=True) as bar:
        task = bar.add_task("evaluating", total=len(pending))
        current = None
        for sample, name in pending:
            if current is None or current[0] is not sample:
                try:
                    image = load_image(sample.path, draft_size=loaded.preprocess.resize or loaded.preprocess.size)
                except CamlensError as error:
                    skipped.append(f"{error} (skipped)")
                    current = (sample, None, None)
                else:
                    x = loaded.preprocess(image).to(torch_device)
                    mapped = [loaded.preprocess.map_box(b, *image.size) for b in sample.boxes]
                    current = (sample, x, [b for b in mapped if b is not None])
            if current[1] is None:
                bar.advance(task)
                continue
            bar.update(task, description=f"{printable(sample.path.name)} {METHODS[name].display_name}")
            tick = time.perf_counter()
            record = evaluate_image(objects[name], current[1], sample.label, current[2], wanted, steps, chunk)
            record.update(image=key(sample), method=name, label=sample.label, seconds=round(time.perf_counter() - tick, 4))
            store.add(record)
            bar.advance(task)

    keys = {key(s) for s in samples}
    records = [r for r in store.records.values() if r["image"] in keys and r["method"] in chosen]
    summary = summarise(records, chosen, wanted)
    speed = {m: mean_interval(r["seconds"] for r in records if r["method"] == m) for m in chosen}
    report = {"config": config, "images": len(keys), "summary": summary,
              "seconds_per_image": {m: speed[m]["mean"] for m in chosen},
              "skipped": [printable(p) for p in skipped], "notes": [printable(p) for p in dataset.notes]}
    write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    lines = ["method,metric,mean,ci95,n"] + [
        f"{m},{metric},{v['mean'] if v['mean'] is not None else ''},{v['ci95'] if v['ci95'] is not None else ''},{v['n']}"
        for m in chosen for metric, v in summary[m].items()
    ]
    write_atomic(out_dir / "summary.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
    curves = {kind: mean_curves(records, chosen, f"{kind}_curve") for kind in ("deletion", "insertion")}
    if any(curves.values()):
        write_atomic(out_dir / "curves.png", lambda p: curve_plot(curves, p))
    write_atomic(out_dir / "metrics.png", lambda p: bar_chart(summary, wanted, TITLES, p))

    for line in [*dataset.notes, *skipped]:
        echo_error(f"skipped: {printable(line)}")
    table = Table(title=f"camlens evaluate: {len(keys)} images -> {printable(out_dir)}", title_justify="left")
    table.add_column("method")
    for metric in wanted:
        arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
        table.add_column(f"{TITLES[metric]}\n{arrow}", justify="right")
    table.add_column("s / image", justify="right")
    for m in chosen:
        cells = []
        for metric in wanted:
            v = summary[m][metric]
            cells.append("-" if v["mean"] is None else f"{v['mean']:.3g}" + (f" ± {v['ci95']:.2g}" if v["ci95"] else ""))
        seconds = speed[m]["mean"]
        table.add_row(m, *cells, "-" if seconds is None else f"{seconds:.2f}")
    try:
        console("stdout").print(table)
    except BrokenPipeError:
        pass
    if skipped:
        sys.exit(1)


@cli.command()
@click.argument("image")
@click.option("--method", "-m", "methods", multiple=True, metavar="M", help="A method (repeatable; default: the five seed methods).")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling).")
@click.option("--class", "class_", metavar="C", help="Class to explain (default: the trained model's top-1).")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.5, show_default=True,
              help="A method passes when the Spearman correlation with the trained model's map falls below this.")
@click.option("--out", default="camlens-sanity", show_default=True, help="Output directory.")
@run_options
@model_options
def sanity(image, methods, target_layer, class_, threshold, out, device, batch_size, seed, **model_args) -> None:
    """The model-randomisation test: re-initialise layers from the top, watch the maps change."""
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args)
    out_dir = ensure_writable_dir(out)
    photo = load_image(image, draft_size=loaded.preprocess.resize or loaded.preprocess.size)
    model = loaded.module.to(torch_device)
    x = loaded.preprocess(photo).unsqueeze(0).to(torch_device)
    if class_ is not None:
        target = resolve_class(class_, loaded, classes)
    else:
        with torch.no_grad():
            target = int(model(x).argmax(dim=1)[0])
    results = {}
    with Progress(*(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()),
                  console=console("stderr"), transient=True) as bar:
        task = bar.add_task("", total=None)
        for name in chosen:
            bar.update(task, description=METHODS[name].display_name, completed=0)

            built: dict[int, Any] = {}  # one method object per model copy: its layer lookup is cached

            def explain_with(m, name=name, built=built):
                if id(m) not in built:
                    built[id(m)] = method_objects(m, [name], target_layer, batch_size, seed)[name]
                return built[id(m)](x, target).maps

            results[name] = cascading_randomisation(
                explain_with, model, x, seed=seed,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    groups = results[chosen[0]]["groups"]
    rows = {METHODS[n].display_name: [m[0, 0].cpu().numpy() for m in r["maps"]] for n, r in results.items()}
    write_atomic(out_dir / "sanity.png", lambda p: sanity_figure(rows, ["trained", *groups], p))
    similarity = {METHODS[n].display_name: {k: [float(v) for v in r[k][:, 0, 0]] for k in ("spearman", "ssim")}
                  for n, r in results.items()}
    write_atomic(out_dir / "similarity.png", lambda p: similarity_plot(similarity, groups, threshold, p))
    verdicts = {}
    for name, r in results.items():
        # NaN: the map is blank (constant), which differs from the trained model's map.
        rho = [None if math.isnan(v) else v for v in map(float, r["spearman"][:, 0, 0])]
        below = [i for i, v in enumerate(rho) if v is None or v < threshold]
        verdicts[name] = {
            "spearman": rho, "ssim": [float(v) for v in r["ssim"][:, 0, 0]],
            "final_spearman": rho[-1], "first_below": groups[below[0]] if below else None,
            "passed": rho[-1] is None or rho[-1] < threshold,
        }
    report = {"image": printable(image), "class": target, "class_name": loaded.class_name(target),
              "threshold": threshold, "groups": groups, "methods": verdicts}
    write_atomic(out_dir / "sanity.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    table = Table(title=f"camlens sanity: {printable(Path(image).name)}, class {loaded.class_name(target)}, "
                        f"{len(groups)} steps -> {printable(out_dir)}", title_justify="left")
    for column in ("method", "Spearman, fully random", "SSIM, fully random", "first below threshold", "verdict"):
        table.add_column(column)
    for name, v in verdicts.items():
        rho = v["final_spearman"]
        if rho is None:
            verdict = "PASS: the map became blank"
        elif v["passed"]:
            verdict = f"PASS: Spearman {rho:.2f} < {threshold}"
        else:
            verdict = f"FAIL: Spearman {rho:.2f} >= {threshold}: the map does not depend on the weights"
        table.add_row(name, "blank" if rho is None else f"{rho:.3f}", f"{v['ssim'][-1]:.3f}",
                      v["first_below"] or "never", verdict)
    console("stdout").print(table)


# -- layers, methods ------------------------------------------------------------------------------

@cli.command()
@model_options
def layers(**model_args) -> None:
    """List the hookable layers with their output shapes; mark the default target layer."""
    loaded = open_model(**model_args)
    check_hookable(loaded.module)
    size = loaded.preprocess.size
    try:
        trace = trace_outputs(loaded.module, torch.zeros(1, 3, size, size))
    except Exception as error:
        raise CamlensError(f"the model fails on a 1x3x{size}x{size} input ({first_line(error)}); check --input-size") from None
    shapes: dict[str, str] = {}
    for name, shape in trace:
        shapes.setdefault(name, shape if isinstance(shape, str) else "x".join(map(str, shape[1:])))
    try:
        default = default_layer(trace)
    except CamlensError:
        default = None
    table = Table(title=f"{loaded.name}: input 3x{size}x{size}", title_justify="left")
    for column in ("layer", "type", "output (C x H x W)", ""):
        table.add_column(column)
    for name, module in loaded.module.named_modules():
        if name in shapes:
            table.add_row(name, type(module).__name__, shapes[name], "default target layer" if name == default else "")
    console("stdout").print(table)
    if default is None:
        echo_error("no layer outputs a feature map larger than 1x1: no default target layer")


@cli.command()
def methods() -> None:
    """The methods, one line each."""
    for name, summary in list_methods().items():
        click.echo(f"{name:<16} {summary}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command; user errors become one line on stderr and exit code 1 (2 for usage)."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="camlens", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else cli.get_help(click.Context(cli)))
        sys.exit(0)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        echo_error("camlens: interrupted")
        sys.exit(130)
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "camlens"
        echo_error(f"camlens: error: {error.format_message()} (see {where} --help)")
        sys.exit(2)
    except click.ClickException as error:
        echo_error(f"camlens: error: {error.format_message()}")
        sys.exit(error.exit_code)
    except CamlensError as error:
        echo_error(f"camlens: error: {error}")
        sys.exit(1)
    except KeyboardInterrupt:
        echo_error("camlens: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
