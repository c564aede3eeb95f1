"""``camlens sanity``: the cascading model-randomisation test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..charts import (
    sanity_figure,
    similarity_plot,
)
from ..io import (
    ensure_writable_dir,
    load_image,
    write_atomic,
)
from ..methods import METHODS
from ..metrics import cascading_randomisation
from .common import (
    console,
    method_objects,
    model_options,
    prepare,
    printable,
    resolve_class,
    run_options,
)


@click.command()
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

