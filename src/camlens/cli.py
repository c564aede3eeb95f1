"""The ``camlens`` command line: the only place that prints or draws progress bars.

click parses the arguments; rich draws the progress bars and tables. Every user error ends
as one line ``camlens: error: ...`` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import difflib
import json
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .capture import check_hookable, find_default_layer, record, resolve_layer
from .errors import CamlensError
from .io import ensure_writable_dir, expand_inputs, load_image, publish_mode, write_atomic
from .methods import METHODS, get_method, list_methods
from .models import LoadedModel, Preprocess, class_names_from_file, load_model
from .render import Panel, comparison_figure, model_view, overlay
from .targets import TopK

SEED_METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam")
BATCHED_METHODS = {"smoothgradcam++", "scorecam"}

# Wide enough for the summary table when the output is a file or a CI log.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


# -- shared options -----------------------------------------------------------------------------

def model_options(command: Callable) -> Callable:
    options = [
        click.option("--model", "model_spec", default="efficientnet_lite0", show_default=True,
                     help="A registered model, a TorchScript/torch.export archive, or package.module:factory."),
        click.option("--weights", type=click.Path(dir_okay=False), help="State dict for a factory model (loaded with weights_only=True)."),
        click.option("--input-size", type=click.IntRange(min=1), help="Side of the square model input (default: the model's, else 224)."),
        click.option("--resize", type=click.IntRange(min=1), help="Shorter side before the centre crop (default: input size x 8/7)."),
        click.option("--mean", type=(float, float, float), help="Per-channel mean of the normalisation (RGB, on [0, 1] pixels)."),
        click.option("--std", type=(float, float, float), help="Per-channel standard deviation of the normalisation."),
        click.option("--class-names", type=click.Path(dir_okay=False), help="Class names: a text file (one per line) or a JSON list."),
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
        loaded.preprocess = Preprocess(
            size=size,
            resize=resize or (base.resize if input_size is None else round(size * 8 / 7)),
            mean=mean or base.mean,
            std=std or base.std,
            interpolation=base.interpolation,
        )
    return loaded


def choose_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CamlensError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CamlensError("CUDA is not available on this machine: use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CamlensError("MPS is not available on this machine: use --device cpu")
    return device


def resolve_class(value: str, loaded: LoadedModel, classes: int) -> int:
    """A class given as an index or a name (short name or full label, any case)."""
    if re.fullmatch(r"-?\d+", value.strip()):
        index = int(value)
        if not 0 <= index < classes:
            raise CamlensError(f"class {index} is out of range: the model has {classes} classes (valid: 0 to {classes - 1})")
        return index
    names = loaded.class_names
    if not names:
        raise CamlensError(f"class {value!r} is a name, but the model has no class names: give an index or --class-names")
    wanted = value.strip().lower()
    for index, name in enumerate(names):
        synonyms = [part.strip().lower() for part in name.split(",")]
        if wanted == name.lower() or wanted in synonyms:
            return index
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise CamlensError(f"unknown class {value!r}{hint}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


# -- explain ------------------------------------------------------------------------------------

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
        data = {"input": str(self.path), "status": self.status}
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
        self.methods = {}
        for name in methods:
            cls = METHODS[name]
            options: dict[str, Any] = {}
            if name in BATCHED_METHODS and batch_size is not None:
                options["batch_size"] = batch_size
            if name == "smoothgradcam++":
                options["seed"] = seed
            self.methods[name] = cls(self.model, target_layer=target_layer, **options)

    def targets(self):
        if self.class_index is not None:
            return self.class_index
        return TopK(self.top_k)

    def run(self, path: Path, folder: Path, progress: Callable[[str, int, int], None]) -> ImageResult:
        result = ImageResult(path)
        start = time.perf_counter()
        image = load_image(path, draft_size=self.loaded.preprocess.resize or self.loaded.preprocess.size)
        result.size = image.size
        x = self.loaded.preprocess(image).unsqueeze(0).to(self.device)
        result.timings["load"] = time.perf_counter() - start

        with torch.no_grad():
            probabilities = self.model(x).softmax(dim=1)[0].cpu()
        top = probabilities.topk(min(5, probabilities.numel()))
        result.predictions = [self._describe(int(i), float(p)) for p, i in zip(top.values, top.indices)]

        explanations = {}
        for name, method in self.methods.items():
            tick = time.perf_counter()
            explanations[name] = method(x, self.targets(), progress=lambda done, total, n=name: progress(n, done, total))
            result.timings[name] = time.perf_counter() - tick
        first = next(iter(explanations.values()))
        self.target_layers, self.default_layer = first.target_layers, first.default_layer
        result.targets = [
            self._describe(int(c), float(p)) for c, p in zip(first.targets[0].tolist(), first.probabilities[0].tolist())
        ]

        tick = time.perf_counter()
        result.files = self._write(image, explanations, result, folder)
        result.timings["render"] = time.perf_counter() - tick
        result.timings["total"] = time.perf_counter() - start
        return result

    def _describe(self, index: int, probability: float) -> dict:
        entry = {"class": index, "name": self.loaded.class_name(index), "probability": round(probability, 6)}
        return entry

    def _write(self, image, explanations, result: ImageResult, folder: Path) -> dict:
        box = self.loaded.preprocess.crop_box(*image.size)
        view = model_view(image, box)
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
                filename = f"{name}_{index + 1}_{slug(target['name'])}.png"
                picture.save(folder / filename)
                overlays[name].append(filename)
                title = f"{METHODS[name].display_name}\n{target['name']} ({target['probability']:.2f})"
                rows[index].append(Panel(picture, title))
        arrays["targets"] = np.array([t["class"] for t in result.targets])
        arrays["probabilities"] = np.array([t["probability"] for t in result.targets], dtype=np.float32)
        np.savez_compressed(folder / "maps.npz", **arrays)
        top = result.predictions[0]
        comparison_figure(rows, folder / "comparison.png",
                          title=f"{result.path.name}: {top['name']} ({top['probability']:.2f})")
        return {"comparison": "comparison.png", "maps": "maps.npz", "overlays": overlays}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """An output folder name per input: the file stem, made unique."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = slug(path.stem) if path.stem else "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count + 1}")
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
@click.option("--out", default="camlens-out", show_default=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Inputs per forward pass for Score-CAM and Smooth Grad-CAM++.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of Smooth Grad-CAM++'s noise.")
@model_options
def explain(inputs, methods, target_layer, class_, top_k, out, device, batch_size, seed, **model_args) -> None:
    """Explain IMAGE_OR_DIR... with each method: overlays, a comparison figure, maps and a manifest."""
    started = time.perf_counter()
    if class_ is not None and top_k is not None:
        raise CamlensError("give --class or --top-k, not both")
    chosen = [get_method(m).name for m in methods] or list(SEED_METHODS)
    chosen = list(dict.fromkeys(chosen))
    files, skipped = expand_inputs(inputs)
    out_dir = ensure_writable_dir(out)
    torch_device = choose_device(device)
    loaded = open_model(**model_args)
    classes = probe(loaded, target_layer)
    class_index = resolve_class(class_, loaded, classes) if class_ is not None else None
    if top_k is not None and top_k > classes:
        raise CamlensError(f"--top-k {top_k} is more than the model's {classes} classes")
    explainer = Explainer(loaded, chosen, target_layer, class_index, top_k or 1, torch_device, batch_size, seed)

    results: list[ImageResult] = []
    names = unique_names(files)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        overall = bar.add_task("images", total=len(files))
        step = bar.add_task("", total=1, visible=False)

        def report(method: str, done: int, total: int) -> None:
            bar.update(step, description=f"  {METHODS[method].display_name}", completed=done, total=total, visible=True)

        for path, name in zip(files, names):
            bar.update(overall, description=f"{path.name}")
            results.append(explain_one(explainer, path, out_dir, name, report))
            bar.update(step, visible=False)
            bar.advance(overall)

    manifest = build_manifest(loaded, explainer, chosen, results, skipped, torch_device,
                              time.perf_counter() - started, top_k, class_index, seed, batch_size)
    write_atomic(out_dir / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    print_summary(results, chosen, skipped, out_dir)
    if any(r.status != "ok" for r in results):
        sys.exit(1)


def explain_one(explainer: Explainer, path: Path, out_dir: Path, name: str, report) -> ImageResult:
    """Explain one image into out_dir/name; on failure leave nothing behind but the error."""
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    try:
        result = explainer.run(path, staging, report)
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        publish_mode(staging)
        staging.rename(final)
        result.output = name
        return result
    except CamlensError as error:
        return ImageResult(path, status="failed", error=str(error))
    except (RuntimeError, ValueError, OSError, MemoryError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ImageResult(path, status="failed", error=f"{path}: {type(error).__name__}: {message}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def probe(loaded: LoadedModel, target_layer: str | None) -> int:
    """Check the model and the target layer on a blank batch of two; return the number of classes.

    Two, because Score-CAM and Smooth Grad-CAM++ forward batches: a model exported with a
    fixed batch size of one fails here rather than in the middle of a method.
    """
    check_hookable(loaded.module)
    size = loaded.preprocess.size
    example = torch.zeros(2, 3, size, size)
    layers = {}
    if target_layer is not None:
        name, module = resolve_layer(loaded.module, target_layer)
        layers[name] = module
    try:
        output, _ = record(loaded.module, example, layers)
    except CamlensError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = "check --input-size"
        if loaded.source.startswith("torch.export"):
            hint += "; export with a dynamic batch size: dynamic_shapes=({0: torch.export.Dim('batch')},)"
        raise CamlensError(
            f"the model fails on a batch of 2x3x{size}x{size} ({type(error).__name__}: {first}); {hint}"
        ) from None
    if loaded.class_names is not None and len(loaded.class_names) != output.shape[1]:
        raise CamlensError(f"{len(loaded.class_names)} class names for a model with {output.shape[1]} classes")
    return int(output.shape[1])


def build_manifest(loaded, explainer, methods, results, skipped, device, seconds, top_k, class_index, seed, batch_size) -> dict:
    return {
        "camlens": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["camlens", *sys.argv[1:]],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
        "device": str(device),
        "model": {"name": loaded.name, "source": loaded.source, "preprocess": loaded.preprocess.to_dict(),
                  "classes": len(loaded.class_names) if loaded.class_names else None, **loaded.details},
        "methods": methods,
        "options": {name: m.options() for name, m in explainer.methods.items()},
        "target_layers": list(explainer.target_layers),
        "default_layer": explainer.default_layer,
        "targets": {"class": class_index} if class_index is not None else {"top_k": top_k or 1},
        "seed": seed,
        "batch_size": batch_size,
        "images": [r.to_dict() for r in results],
        "skipped": [str(p) for p in skipped],
        "summary": {"ok": sum(r.status == "ok" for r in results),
                    "failed": sum(r.status != "ok" for r in results),
                    "skipped": len(skipped), "seconds": round(seconds, 3)},
    }


def print_summary(results: list[ImageResult], methods: list[str], skipped: list[Path], out_dir: Path) -> None:
    table = Table(title=f"camlens explain -> {out_dir}", title_justify="left")
    table.add_column("image")
    table.add_column("prediction")
    table.add_column("p", justify="right")
    for name in methods:
        table.add_column(f"{METHODS[name].display_name} s", justify="right")
    table.add_column("status")
    for r in results:
        if r.status == "ok":
            top = r.predictions[0]
            times = [f"{r.timings[name]:.2f}" for name in methods]
            table.add_row(r.path.name, top["name"], f"{top['probability']:.2f}", *times, "ok")
        else:
            table.add_row(r.path.name, "-", "-", *["-"] * len(methods), "[red]failed[/red]")
    stdout.print(table)
    for path in skipped:
        click.echo(f"skipped (not an image file): {path}", err=True)
    for r in results:
        if r.status != "ok":
            click.echo(f"failed: {r.error}", err=True)


# -- layers, methods ------------------------------------------------------------------------------

@cli.command()
@model_options
def layers(**model_args) -> None:
    """List the hookable layers with their output shapes; mark the default target layer."""
    loaded = open_model(**model_args)
    size = loaded.preprocess.size
    example = torch.zeros(1, 3, size, size)
    shapes: dict[str, str] = {}
    handles = []

    def shape_of(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, "x".join(map(str, output.shape[1:])) if isinstance(output, torch.Tensor) else type(output).__name__)
        return hook

    check_hookable(loaded.module)
    try:
        for name, module in loaded.module.named_modules():
            if name:
                handles.append(module.register_forward_hook(shape_of(name)))
        with torch.no_grad():
            loaded.module(example)
    finally:
        for handle in handles:
            handle.remove()
    default = find_default_layer(loaded.module, example)
    table = Table(title=f"{loaded.name}: input 3x{size}x{size}", title_justify="left")
    for column in ("layer", "type", "output (C x H x W)", ""):
        table.add_column(column)
    for name, module in loaded.module.named_modules():
        if name in shapes:
            table.add_row(name, type(module).__name__, shapes[name], "default target layer" if name == default else "")
    stdout.print(table)


@cli.command()
def methods() -> None:
    """The methods, one line each."""
    for name, summary in list_methods().items():
        click.echo(f"{name:<16} {summary}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the command; user errors become one line on stderr and exit code 1 or 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="camlens", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("camlens: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as error:
        hint = f" (see camlens {error.ctx.command.name} --help)" if error.ctx and error.ctx.command.name != "cli" else " (see camlens --help)"
        click.echo(f"camlens: error: {error.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as error:
        click.echo(f"camlens: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except CamlensError as error:
        click.echo(f"camlens: error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("camlens: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
