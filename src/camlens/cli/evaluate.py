"""``camlens evaluate``: the Score-CAM paper's metrics over a labelled dataset, resumable."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..charts import (
    bar_chart,
    curve_plot,
)
from ..datasets import load_dataset
from ..errors import CamlensError
from ..evaluate import (
    FAITHFULNESS,
    HIGHER_IS_BETTER,
    LOCALISATION,
    METRICS,
    TITLES,
    ResultStore,
    evaluate_image,
    mean_curves,
    mean_interval,
    summarise,
)
from ..io import (
    ensure_writable_dir,
    load_image,
    write_atomic,
)
from ..methods import METHODS
from .common import (
    console,
    echo_error,
    method_objects,
    model_options,
    prepare,
    printable,
    run_options,
)


@click.command()
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

