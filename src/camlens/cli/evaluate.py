"""``camlens evaluate``: the Score-CAM paper's metrics over a labelled dataset, resumable."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import click
import torch
from rich.table import Table

from .. import __version__, timing
from ..charts import (
    bar_chart,
    curve_plot,
)
from ..datasets import Sample, dataset_entries, load_dataset
from ..distributed import Group, WorkQueue, join
from ..errors import CamlensError
from ..evaluate import (
    CORRELATION_RUNS,
    HIGHER_IS_BETTER,
    INTERVAL,
    LOCALISATION,
    METRICS,
    PAPER,
    RANGES,
    TITLES,
    ResultStore,
    evaluate_image,
    file_digest,
    mean_curves,
    mean_interval,
    module_digest,
    shard_name,
    summarise,
)
from ..io import (
    held_output_dir,
    write_atomic,
)
from ..methods import METHODS
from ..models import REGISTRY, LoadedModel
from ..render import array_kind, model_view
from ..timing import take_start_up
from .common import (
    BATCHED,
    console,
    describe_start_up,
    echo_error,
    engine_options,
    engine_settings,
    fc_option,
    first_array_shape,
    method_objects,
    method_option,
    model_input,
    model_options,
    prepare,
    printable,
    run_options,
    smooth_options,
    speak_for,
    top_channels_option,
    warm_and_plan,
    warm_up,
    yes_option,
)
from .progress import LogProgress
from .report import html_option, write_html

STATISTIC = f"mean [{INTERVAL}] over n images"
SET_ASIDE_SHOWN = 5  # notes on single set-aside lines; a total stands for the rest
VIEW_SIDE = 224  # pixels of the longer side of each image's view (views/), kept for the report
# What an evaluate run writes in its folder; the derived files are computed from results.jsonl.
DERIVED = ("summary.json", "summary.csv", "curves.png", "metrics.png", "report.html")
RUN_FILES = ("config.json", "results.jsonl", "results.set-aside.jsonl", "classes.json", "views", "maps", *DERIVED)


@click.command(short_help="The Score-CAM paper's metrics over a labelled dataset.")
@click.argument("data")
@method_option
@click.option("--metric", "metrics", multiple=True, type=click.Choice([*METRICS, "all"]),
              help="A metric (repeatable; default: the Score-CAM paper's, its box metrics when the data has boxes; "
                   "all: every metric, those against the boxes where the data has boxes).")
@click.option("--limit", type=click.IntRange(min=1),
              help="Evaluate the first N images of DATA only (folders and files in name order, CSV order, or image id "
                   "order for CUB-200-2011, whose test split is evaluated); "
                   "a larger N later resumes and adds the rest.")
@click.option("--out", default="camlens-eval", show_default=True,
              help="Output directory; a run with the same settings resumes from it.")
@click.option("--boxes", type=click.Path(), help="Boxes: a CSV path,xmin,ymin,xmax,ymax or a folder of VOC XML files.")
@click.option("--mapping", type=click.Path(dir_okay=False), help="Label to class index: JSON {label: index} or CSV label,index.")
@click.option("--steps", type=click.IntRange(2, 1024), default=16, show_default=True, help="Deletion/insertion steps.")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling).")
@fc_option
@top_channels_option
@smooth_options
@run_options(batch_size_help=f"Inputs per forward pass of {BATCHED}, and of the metrics (default 8 for the "
                             "metrics); it may differ between runs into one --out.")
@engine_options(passes="Score-CAM's masked inputs and the metrics' perturbed inputs")
@html_option
@yes_option
@model_options
def evaluate(data, methods, metrics, limit, out, boxes, mapping, steps, target_layer, fc, top_channels, aug_smooth,
             eigen_smooth, device, batch_size, seed, optimize, compile_model, html, yes, **model_args) -> None:
    """Every method on every image of DATA: the Score-CAM paper's metrics, mean and 95% CI."""
    group = speak_for(join())
    skipped_methods: dict[str, str] = {}
    layers: list[str] = []
    # Arrays (signals, volumes, clips) instead of images: the model is checked on one of their shape.
    example = first_array_shape([path for path, _ in dataset_entries(Path(data), [])]) if Path(data).exists() else None
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args, fc=fc,
                                                    on_skip=skipped_methods.__setitem__, on_layer=layers.append,
                                                    smooth={"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth},
                                                    example=example)
    torch_device = group.device(torch_device)
    dataset = load_dataset(data, loaded.class_names, classes, loaded.class_labels, mapping, boxes, limit)
    every = "all" in metrics
    wanted = ([m for m in METRICS if dataset.has_boxes or m not in LOCALISATION] if every
              else list(dict.fromkeys(metrics)) or [m for m in PAPER if dataset.has_boxes or m not in LOCALISATION])
    if any(m in LOCALISATION for m in wanted) and not dataset.has_boxes:
        raise CamlensError("localisation metrics need boxes: give --boxes, or VOC XML files beside the images")
    engine = engine_settings(optimize, compile_model, torch_device)
    root = Path(data) if Path(data).is_dir() else Path(data).parent

    def key(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    method_notes = [f"{METHODS[m].display_name} skipped: {reason}" for m, reason in skipped_methods.items()]
    notes = [*method_notes, *dataset.notes]
    samples = dataset.samples
    listed = len(dataset.listed[:limit])
    input_boxes = {key(s.path): _input_boxes(s, loaded, notes) for s in samples}
    if any(m in LOCALISATION for m in wanted):
        boxless = sum(not boxes for boxes in input_boxes.values())
        if boxless:
            notes.append(f"{boxless} of {len(samples)} images have no box the model sees: the box metrics are "
                         f"over the other {len(samples) - boxless}")
    weights_digest = module_digest(loaded.module)
    model = loaded.module.to(torch_device)
    objects = method_objects(model, chosen, target_layer, batch_size, seed, fc=fc, engine=engine,
                             top_channels=top_channels,
                             smooth={"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth})
    config = _identity(data, model_args, loaded, weights_digest, mapping, boxes, chosen, objects, wanted, steps,
                       layers[0], torch_device, engine)
    images = {key(path) for path in dataset.listed}
    by_key = {key(s.path): s for s in samples}

    # One run at a time: two would compute and append the same pairs. Of a run of several
    # processes, the first (rank 0) holds the folder; the others write only their own results.
    with contextlib.ExitStack() as stack:
        store: ResultStore | None = None

        def claim() -> tuple[str, list[tuple[str, str]]]:
            nonlocal store
            run_folder = held_output_dir(stack, out, "evaluate", RUN_FILES)
            out_dir = run_folder.path
            for rank in range(1, group.world):
                run_folder.own(shard_name(rank))
            store = ResultStore(out_dir, config, images)
            _refuse_changed_images(store, samples, key, out_dir)
            # The class names, for the HTML report's label and prediction columns (display only:
            # the model and --class-names that fix them are part of the run's identity in config.json).
            names_file = out_dir / "classes.json"
            if loaded.class_names is not None:
                write_atomic(names_file, lambda p: p.write_text(json.dumps(list(loaded.class_names)) + "\n"))
            else:
                names_file.unlink(missing_ok=True)
            todo = [(key(s.path), m) for s in samples for m in chosen if not store.done(key(s.path), m)]
            if todo:
                # The results are about to grow: what was derived from them goes first, so that a
                # run killed now never leaves a summary beside results it was not computed from.
                for name in DERIVED:
                    run_folder.remove(name)
            return str(out_dir), todo

        folder, todo = group.from_main(claim)
        out_dir = Path(folder)
        if store is None:
            store = ResultStore(out_dir, config, images, rank=group.rank)
        chunk = batch_size or 8
        pending = [(by_key[image], name) for image, name in todo]
        by_image: dict[str, tuple[Sample, list[str]]] = {}
        for sample, name in pending:
            by_image.setdefault(key(sample.path), (sample, []))[1].append(name)
        units = list(by_image.values())  # an image and the methods it still needs
        start_up: dict[str, float] = {}
        _plan(objects, loaded, pending, wanted, steps, torch_device, start_up, yes, group)
        skipped: list[str] = []
        queue = WorkQueue(group, "evaluate", len(units))
        with LogProgress() as bar:
            task = bar.add_task("evaluating", total=len(pending))
            for unit in queue:
                sample, names = units[unit]
                try:
                    digest = file_digest(sample.path)
                    x, image, values = model_input(loaded, sample.path, torch_device)
                except CamlensError as error:
                    skipped.append(f"{error} (skipped)")
                    bar.update(task, completed=queue.finished(len(names)))
                    continue
                x = x[0]
                # The region the model sees, without a map: the report lays the maps over it. An
                # array's (a signal's, a volume's) maps are not drawn there: its values and curves are.
                view = None if image is None else model_view(image, loaded.preprocess.crop_box(*image.size),
                                                             max_side=VIEW_SIDE)
                for name in names:
                    bar.update(task, description=f"{printable(sample.path.name)} {METHODS[name].display_name}")
                    take_start_up()
                    if not start_up:  # the run's one-time work, timed apart (camlens.timing)
                        warm_up(objects, x)
                        start_up.update(take_start_up())
                    tick = timing.clock()
                    kept: dict | None = {} if image is not None else None
                    record = evaluate_image(objects[name], x, sample.label, input_boxes[key(sample.path)], wanted,
                                            steps, chunk, keep=kept, seed=int(digest.split(":")[-1][:8], 16))
                    if image is None:
                        record["kind"] = array_kind(values)
                    elapsed = timing.clock() - tick
                    for what, seconds in (once := take_start_up()).items():
                        start_up[what] = start_up.get(what, 0.0) + seconds
                    record.update(image=key(sample.path), method=name, label=sample.label, sha256=digest,
                                  boxes=[list(b) for b in sample.boxes],
                                  seconds=round(max(0.0, elapsed - sum(once.values())), 4))
                    store.add(record, view=view, saliency=kept)
                    bar.update(task, completed=queue.finished())
            if group.main:  # the others' last images
                queue.wait(len(pending), lambda done: bar.update(task, description="evaluating (other processes)",
                                                                 completed=done))
        everyone = group.collect(skipped)
        if not group.main:  # rank 0 merges and summarises; this process's part is done
            return
        skipped = [*dataset.skipped, *(line for lines in everyone for line in lines)]
        store.merge()

        keys = {key(s.path) for s in samples}
        records = [r for r in store.records.values() if r["image"] in keys and r["method"] in chosen]
        counted = len({r["image"] for r in records})
        for metric in wanted:
            undefined = sum(not math.isfinite(r[metric]) for r in records if metric in r)
            if undefined:
                notes.append(f"{TITLES[metric]}: {undefined} value(s) undefined (not a number, e.g. a class probability "
                             "of 0 on the image), left out of the mean and of n")
        summary = summarise(records, chosen, wanted)
        blank = {m: sum(bool(r.get("blank")) for r in records if r["method"] == m) for m in chosen}
        for m, count in blank.items():
            if count:
                notes.append(f"{METHODS[m].display_name}: {count} of {counted} map(s) are blank (zero everywhere), "
                             "and count in its means as a map that ranks no pixel above another; "
                             "camlens explain says why")
        speed = {m: mean_interval(r["seconds"] for r in records if r["method"] == m) for m in chosen}
        set_aside = store.set_aside[:SET_ASIDE_SHOWN]
        if len(store.set_aside) > SET_ASIDE_SHOWN:
            set_aside.append(f"and {len(store.set_aside) - SET_ASIDE_SHOWN} more line(s) of {store.path.name} set "
                             f"aside; all in {store.aside_path.name}")
        report = {"config": store.config, "images": counted, "images_listed": listed, "statistic": STATISTIC,
                  "summary": summary, "seconds_per_image": {m: speed[m]["mean"] for m in chosen},
                  "skipped": [printable(p) for p in skipped], "skipped_methods": skipped_methods,
                  "set_aside_lines": len(store.set_aside), "notes": [printable(p) for p in [*notes, *set_aside]],
                  # Which images it summarised (a --limit summarises some of the results), so that
                  # the report shows the same selection.
                  "summarised images": sorted({r["image"] for r in records}),
                  "blank maps": blank,
                  # Work done once by this run (an earlier run's, resumed, is not here): not in the seconds per image.
                  "start-up seconds": {what: round(seconds, 4) for what, seconds in start_up.items()},
                  # What it summarised: a report finds a results file that grew since (a later
                  # run, interrupted) by its size.
                  "results.jsonl bytes": store.path.stat().st_size if store.path.exists() else 0}
        write_atomic(out_dir / "summary.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
        lines = ["method,metric,mean,ci95_low,ci95_high,n"] + [
            f"{m},{metric},{_csv(v['mean'])},{_csv(v['low'])},{_csv(v['high'])},{v['n']}"
            for m in chosen for metric, v in summary[m].items()
        ]
        write_atomic(out_dir / "summary.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
        names = {m: objects[m].display_name for m in chosen}
        curves = {kind: mean_curves(records, chosen, f"{kind}_curve") for kind in ("deletion", "insertion")}
        if any(curves.values()):
            write_atomic(out_dir / "curves.png", lambda p: curve_plot(curves, p, names, counted))
        write_atomic(out_dir / "metrics.png",
                     lambda p: bar_chart(summary, wanted, TITLES, p, names, HIGHER_IS_BETTER, RANGES))

        if start_up_note := describe_start_up(start_up):
            notes.append(start_up_note)
        for line in [*notes, *set_aside]:
            echo_error(f"note: {printable(line)}")
        for line in skipped:
            echo_error(f"skipped: {printable(line)}")
        shown = f"{counted} images" if counted == listed else f"{counted} of {listed} images"
        if dataset.split is not None:  # a CUB-200-2011 folder: say which of its splits was evaluated
            shown += f" of its official {dataset.split} split"
        title = f"camlens evaluate: {shown} -> {printable(out_dir)}"

        def cell(m: str, metric: str) -> str:
            v = summary[m][metric]
            interval = " (n < 5)" if v["low"] is None else f" [{v['low']:.3g}, {v['high']:.3g}]"
            return "-" if v["mean"] is None else f"{v['mean']:.3g}{interval}"

        def per_second(m: str) -> str:
            return "-" if speed[m]["mean"] is None else f"{speed[m]['mean']:.2f}"

        def arrow(metric: str) -> str:
            return "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"

        def counted(metric: str) -> str:
            return "/".join(map(str, sorted({summary[m][metric]["n"] for m in chosen})))

        table = Table(title=title, title_justify="left",
                      caption="\n".join([f"{STATISTIC}; n per column", *(f"note: {n}" for n in method_notes)]),
                      caption_justify="left")
        table.add_column("method")
        for metric in wanted:
            table.add_column(f"{TITLES[metric]}\n{arrow(metric)}\nn = {counted(metric)}", justify="right")
        table.add_column("s / image", justify="right")
        for m in chosen:
            table.add_row(METHODS[m].display_name, *(cell(m, metric) for metric in wanted), per_second(m))
        screen = console("stdout")
        if screen.measure(table, options=screen.options.update(max_width=1_000_000)).maximum > screen.width:
            # Squeezed, the columns would cut their titles and numbers: one row per metric instead.
            table = Table(title=title, title_justify="left",
                          caption="\n".join([f"{STATISTIC}; n per row", *(f"note: {n}" for n in method_notes)]),
                          caption_justify="left")
            for column in ("metric", "better", "n"):
                table.add_column(column)
            for m in chosen:
                table.add_column(METHODS[m].display_name, justify="right")
            for metric in wanted:
                table.add_row(TITLES[metric], arrow(metric).split()[0], counted(metric), *(cell(m, metric) for m in chosen))
            table.add_row("s / image", "", "", *(per_second(m) for m in chosen))
        try:
            screen.print(table)
        except BrokenPipeError:
            pass
        if html and records:
            write_html(out_dir)
        if skipped:
            sys.exit(1)


def _plan(objects: dict, loaded: LoadedModel, pending: list, wanted: list[str], steps: int, device: torch.device,
          start_up: dict[str, float], yes: bool, group: Group) -> None:
    """Warm up on the first pending image that loads and say the run's plan when it is long
    (:func:`announce_plan`): the methods' passes and the metrics' (one forward for Average Drop and
    Increase, ``steps`` each for deletion and insertion), per image still to do."""
    counts: dict[str, int] = {}
    for _, name in pending:
        counts[name] = counts.get(name, 0) + 1
    samples = list({id(sample): sample for sample, _ in pending}.values())
    extra = (int(bool({"drop", "increase"} & set(wanted))) + steps * len({"deletion", "insertion"} & set(wanted))
             + (CORRELATION_RUNS + 1) * ("faithfulness-correlation" in wanted))
    start_up.update(warm_and_plan(
        objects, loaded, [sample.path for sample in samples], device, len(samples), yes,
        "or fewer methods (-m), --top-channels N for Score-CAM and its variants, fewer --steps, or --limit N "
        "images (a later run resumes)", extra_forwards=extra, per_method=counts, group=group))


def _csv(value: float | None) -> str:
    return "" if value is None else repr(value)


def _input_boxes(sample: Sample, loaded: LoadedModel, notes: list[str]) -> list[tuple[float, float, float, float]]:
    """The sample's boxes in model-input pixels; a box the centre crop cuts away is noted."""
    kept = []
    for box in sample.boxes:
        mapped = loaded.preprocess.map_box(box, *sample.size)
        if mapped is None:
            notes.append(f"{sample.path}: box {box} lies outside the centre crop the model sees (box skipped)")
        else:
            kept.append(mapped)
    return kept


def _identity(data, model_args: dict, loaded: LoadedModel, weights_digest: str, mapping, boxes, chosen, objects,
              wanted, steps, layer: str, torch_device: torch.device, engine: dict) -> dict:
    """Every setting and input file that can change a result (the run's identity, in config.json).

    The batch size is left out on purpose: it changes how inputs are grouped, not the numbers,
    so a run stopped for lack of memory can resume with a smaller one. So is the labels CSV's
    content: each result records its image's label, checked image by image, so that rows can
    be added to the CSV as images can to a folder.
    """
    spec = model_args["model_spec"]
    # As load_model reads --model: a registered name first, then an existing file, else a factory.
    is_file = spec not in REGISTRY and Path(spec).is_file()
    factory = None if spec in REGISTRY or is_file else spec.partition(":")[0]
    boxes_path = Path(boxes) if boxes else None
    if boxes_path is not None and boxes_path.is_dir():
        boxes_digest = {p.name: file_digest(p) for p in sorted(boxes_path.glob("*.xml"))}
    else:
        boxes_digest = file_digest(boxes_path) if boxes_path else None
    return {
        "camlens version": __version__,
        "torch version": torch.__version__,
        "DATA": str(Path(data).resolve()),
        "--model": spec,
        "model file": file_digest(spec) if is_file else None,
        "model code": _code_digests(loaded, factory),
        "--weights": file_digest(model_args["weights"]) if model_args.get("weights") else None,
        "model weights": weights_digest,
        "--class-names": file_digest(model_args["class_names"]) if model_args.get("class_names") else None,
        "--mapping": file_digest(mapping) if mapping else None,
        "--boxes": boxes_digest,
        "preprocessing": loaded.preprocess.to_dict(),
        "--method": chosen,
        "method options": {m: {k: v for k, v in objects[m].options().items() if k not in ("batch_size", "chunk_size")} for m in chosen},
        "--metric": wanted,
        "--steps": steps,
        "--target-layer": layer,
        "device": torch_device.type,
        # Like the device, the engine moves results by float rounding (about 1e-6) only, but a
        # resumed run is all from one computation.
        "engine": engine,
    }


def _code_digests(loaded: LoadedModel, factory_module: str | None) -> dict[str, str]:
    """Digests of the source files that define the model: the factory's module and the modules of
    its layers' classes (PyTorch's own left out; the torch version stands for them)."""
    names = {type(m).__module__ for m in loaded.module.modules()}
    if factory_module and factory_module in sys.modules:
        names.add(factory_module)
    digests = {}
    for name in sorted(names):
        source = getattr(sys.modules.get(name), "__file__", None)
        if name.split(".")[0] != "torch" and source and Path(source).is_file():
            digests[name] = file_digest(source)
    return digests


def _refuse_changed_images(store: ResultStore, samples: list[Sample], key, out_dir: Path) -> None:
    """Results of an image whose file, label or boxes changed since they were computed are
    refused: they would be old numbers presented as new."""
    by_image: dict[str, list[dict]] = {}
    for (image, _), record in store.records.items():
        by_image.setdefault(image, []).append(record)
    changed = []
    for sample in samples:
        records = by_image.get(key(sample.path))
        if not records:
            continue
        now = {"sha256": file_digest(sample.path), "label": sample.label, "boxes": [list(b) for b in sample.boxes]}
        fields = [name for name in now if any(r[name] != now[name] for r in records)]
        if fields:
            what = ", ".join("content" if f == "sha256" else f for f in fields)
            changed.append(f"{key(sample.path)} ({what})")
    if changed:
        raise CamlensError(
            f"{out_dir} holds results of {len(changed)} image(s) that changed since: {'; '.join(changed[:3])}"
            + (" ..." if len(changed) > 3 else "") + "; use another --out"
        )
