"""``camlens sanity``: the cascading model-randomisation test."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import torch
from rich.table import Table

from ..capture import find_default_layer, record, resolve_layer
from ..charts import (
    sanity_figure,
    similarity_plot,
)
from ..combine import is_constant
from ..io import (
    ensure_writable_dir,
    load_image,
    write_atomic,
)
from ..methods import METHODS
from ..methods.gradcam import SmoothGradCAMPlusPlus
from ..methods.scorecam import ScoreCAM
from ..metrics.sanity import cascade_steps, cascading_randomisation, randomisation_groups, sanity_verdict
from ..render import model_view
from .common import (
    console,
    echo_error,
    fc_option,
    method_objects,
    model_options,
    prepare,
    printable,
    resolve_class,
    run_options,
)
from .progress import LogProgress

# Score-CAM is left out: it forwards the image once per channel of the layer at every step
# (1,281 forwards a map on the embedded model: 90 s a map, half an hour for the 22 maps of the
# whole cascade, on a busy 2-core CPU), where the four below take seconds in all.
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++")


@click.command(short_help="Randomise the model layer by layer: do the maps change?")
@click.argument("image")
@click.option("--method", "-m", "methods", multiple=True, metavar="M",
              help="A method (repeatable; default: CAM, Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++). "
                   "Score-CAM (-m scorecam) forwards the image once per channel at every step: 1,281 "
                   "forwards a map on the embedded model, over a minute on a 2-core CPU; see --steps.")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling).")
@click.option("--class", "class_", metavar="C", help="Class to explain (default: the trained model's top-1).")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Randomise in N steps spread over the model, the classifier alone first "
                   "(default: one step per block; the embedded model has 21).")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.5, show_default=True,
              help="A map is still similar to the trained model's while its Spearman correlation "
                   "with it is at least this.")
@click.option("--max-similar", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="PASS needs the map to be similar at no more than this fraction of the steps "
                   "(and changed at the last); more is LATE; similar at the last step is FAIL.")
@click.option("--out", default="camlens-sanity", show_default=True, help="Output directory.")
@fc_option
@run_options(seed_help="Seed of the re-initialisation (and of Smooth Grad-CAM++'s noise).")
@model_options
def sanity(image, methods, target_layer, class_, steps, threshold, max_similar, out, fc, device, batch_size, seed,
           **model_args) -> None:
    """The model-randomisation test: re-initialise layers from the top, watch the maps change."""
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args, fc=fc)
    if not methods:
        chosen = [name for name in chosen if name in DEFAULT_METHODS]
    out_dir = ensure_writable_dir(out)
    photo = load_image(image)
    model = loaded.module.to(torch_device)
    x = loaded.preprocess(photo).unsqueeze(0).to(torch_device)
    logits, seconds = _timed_forward(model, x)
    target = resolve_class(class_, loaded, classes) if class_ is not None else int(logits.argmax(dim=1)[0])
    groups = randomisation_groups(model, x)
    plan = cascade_steps(groups, steps)
    labels = [names[-1] for names in plan]
    objects = method_objects(model, chosen, target_layer, batch_size, seed, fc)
    scorecam = next((method for method in objects.values() if isinstance(method, ScoreCAM)), None)
    channels = _channels(model, x, target_layer) if scorecam else 0
    passes = {name: _passes(method, channels) for name, method in objects.items()}
    estimate = sum(passes.values()) * seconds
    if scorecam:  # its masked inputs go in batches, which cost less an image: time one
        size = scorecam.batch_size
        each = _timed_forward(model, x.expand(size, -1, -1, -1).contiguous())[1] / size
        estimate -= channels * (seconds - each)
    echo_error(_plan_line(passes, len(plan), estimate, seconds, torch_device))

    started = time.monotonic()
    results = {}
    with LogProgress() as bar:
        for name in chosen:
            task = bar.add_task(METHODS[name].display_name, total=len(plan) + 1)
            built: dict[int, Any] = {}  # one method object per model copy: its layer lookup is cached
            done = [0]

            def within(part, whole, task=task, done=done):
                bar.update(task, completed=done[0] + round(part / max(whole, 1), 2))

            def explain_with(m, name=name, built=built, within=within):
                if id(m) not in built:
                    built[id(m)] = method_objects(m, [name], target_layer, batch_size, seed, fc)[name]
                return built[id(m)](x, target, progress=within).maps

            def finished(count, total, task=task, done=done):
                done[0] = count
                bar.update(task, completed=count)

            results[name] = cascading_randomisation(explain_with, model, x, groups=groups, seed=seed,
                                                    progress=finished, steps=steps)
    elapsed = time.monotonic() - started

    verdicts = {}
    for name, r in results.items():
        # NaN: the map is blank (constant), which differs from the trained model's map.
        rho = [None if math.isnan(v) else v for v in map(float, r["spearman"][:, 0, 0])]
        judged = sanity_verdict(rho, threshold, max_similar, trained_blank=bool(is_constant(r["maps"][0, 0, 0])))
        changed = judged["changed_from"]
        verdicts[name] = {
            **judged, "changed_from": None if changed is None else labels[changed],
            "spearman": rho, "ssim": [float(v) for v in r["ssim"][:, 0, 0]], "final_spearman": rho[-1],
            "passed": judged["verdict"] == "PASS",
        }
    criterion = (f"a step is similar when Spearman >= {threshold} (a blank map counts as changed); "
                 f"PASS: similar at <= {max_similar:.0%} of the steps and not at the last; "
                 f"LATE: similar at more; FAIL: still similar with the whole model randomised")
    report = {"image": printable(image), "class": target, "class_name": loaded.class_name(target),
              "threshold": threshold, "max_similar": max_similar, "criterion": criterion,
              "groups": groups, "steps": labels, "step_groups": plan, "methods": verdicts}

    names = {n: METHODS[n].display_name for n in chosen}
    view = model_view(photo, loaded.preprocess.crop_box(*photo.size), max_side=224)
    rows = {names[n]: [m[0, 0].cpu().numpy() for m in r["maps"]] for n, r in results.items()}
    notes = {names[n]: ["reference", *("blank" if v is None else f"ρ {v:.2f}" for v in verdicts[n]["spearman"])]
             for n in chosen}
    write_atomic(out_dir / "sanity.png", lambda p: sanity_figure(view, rows, ["trained", *labels], notes, p))
    similarity = {names[n]: {"spearman": [math.nan if s is None else s for s in v["spearman"]], "ssim": v["ssim"]}
                  for n, v in verdicts.items()}
    write_atomic(out_dir / "similarity.png", lambda p: similarity_plot(
        similarity, labels, threshold, p, {names[n]: v["verdict"] for n, v in verdicts.items()}))
    write_atomic(out_dir / "sanity.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))

    table = Table(title=f"camlens sanity: {printable(Path(image).name)}, class {loaded.class_name(target)}, "
                        f"{len(plan)} steps in {elapsed:.0f} s -> {printable(out_dir)}",
                  caption=f"Criterion: {criterion}.", title_justify="left", caption_justify="left")
    for column in ("method", "similar at", "changed for good from", "Spearman, fully random",
                   "SSIM, fully random", "verdict"):
        table.add_column(column)
    for name, v in verdicts.items():
        rho = v["final_spearman"]
        table.add_row(names[name], f"{v['similar_steps']}/{len(plan)} steps", v["changed_from"] or "never",
                      "blank" if rho is None else f"{rho:.3f}", f"{v['ssim'][-1]:.3f}", _verdict_text(v, len(plan)))
    console("stdout").print(table)


def _timed_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The model's logits and the seconds of one forward pass: the faster of two, after one
    that pays the one-off costs (the faster is the less disturbed by other work)."""
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            logits = model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    return logits, min(times[1:])


def _channels(model: torch.nn.Module, x: torch.Tensor, target_layer: str | None) -> int:
    name, module = resolve_layer(model, target_layer or find_default_layer(model, x))
    return int(record(model, x, {name: module})[1][name].shape[1])


def _passes(method: Any, channels: int) -> int:
    """Forward passes of one map. Score-CAM's is at most: a constant channel is not forwarded,
    though the all-zero input is, once. The backward of a gradient method stops at the target
    layer, near the output: it is not counted."""
    passes = 1
    if isinstance(method, SmoothGradCAMPlusPlus):
        passes += method.n_samples
    if isinstance(method, ScoreCAM):
        passes += channels
    return passes


def _plan_line(passes: dict[str, int], steps: int, seconds_a_map: float, seconds: float,
               device: torch.device) -> str:
    maps = steps + 1
    each = ", ".join(f"{METHODS[n].display_name} {p:,}" for n, p in passes.items())
    return (f"camlens sanity: {len(passes)} method(s) x {maps} maps (trained + {steps} steps) = "
            f"{len(passes) * maps} explanations, about {maps * sum(passes.values()):,} forward passes "
            f"(a map: {each}); estimated {_duration(maps * seconds_a_map)} on {device.type} "
            f"({seconds:.3f} s a forward)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _verdict_text(v: dict, steps: int) -> str:
    if v["verdict"] == "UNTESTED":
        return "UNTESTED: the trained model's map is blank"
    if v["verdict"] == "FAIL":
        return "FAIL: still similar with every layer randomised: the map does not depend on the weights"
    similar = f"similar at {v['similar_steps']}/{steps} steps"
    if v["verdict"] == "LATE":
        return f"LATE: {similar}; changes only deep in the cascade"
    return f"PASS: {similar}" + ("" if v["final_spearman"] is not None else "; blank at the end")
