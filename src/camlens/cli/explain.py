"""``camlens explain``: every method on every image, overlays, a comparison figure, maps and a manifest."""

from __future__ import annotations

import json
import platform
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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .. import __version__
from ..errors import CamlensError
from ..io import (
    ensure_writable_dir,
    expand_inputs,
    load_image,
    publish_mode,
    write_atomic,
)
from ..methods import METHODS
from ..models import LoadedModel
from ..render import (
    Panel,
    comparison_figure,
    model_view,
    overlay,
)
from ..targets import TopK
from .common import (
    MARKER,
    console,
    echo_error,
    first_line,
    method_objects,
    model_options,
    prepare,
    printable,
    resolve_class,
    run_options,
    slug,
)


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


@click.command()
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

