"""``camlens sanity``: the cascading model-randomisation test."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import torch
from rich.table import Table

from .. import __version__
from ..capture import check_scores, record, resolve_layer
from ..charts import (
    sanity_figure,
    similarity_plot,
)
from ..combine import is_constant
from ..distributed import WorkQueue, join
from ..errors import CamlensError
from ..evaluate import quantise
from ..io import (
    RunFolder,
    file_digest,
    held_output_dir,
    is_array_file,
    load_image,
    write_atomic,
)
from ..methods import METHODS
from ..methods.gradcam import SmoothGradCAMPlusPlus
from ..methods.scorecam import ScoreCAM
from ..metrics.sanity import (
    cascade_steps,
    cascading_randomisation,
    randomisation_groups,
    reinitialise,
    sanity_verdict,
    spearman,
    ssim,
)
from ..render import model_view
from .common import (
    SEEDED,
    Finite,
    console,
    copies_per_image,
    core_method,
    echo_error,
    engine_options,
    engine_settings,
    fc_option,
    input_dtype,
    layer_layout,
    method_objects,
    model_options,
    note_skip,
    output_given,
    prepare,
    printable,
    resolve_class,
    run_options,
    smooth_options,
    speak_for,
    takes_option,
    top_channels_option,
)
from .progress import LogProgress
from .report import html_option, write_html

# Score-CAM is left out: it forwards the image once per channel of the layer at every step
# (1,281 forwards a map on the embedded model), where the four below take one to nine.
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++")

T = TypeVar("T")
_clock = time.perf_counter  # the timer of the planned cost (a test gives it a fake)


@click.command(short_help="Randomise the model layer by layer: do the maps change?")
@click.argument("image")
@click.option("--method", "-m", "methods", multiple=True, metavar="M",
              help="A method (repeatable; default: CAM, Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++; 'all': every "
                   "method). "
                   "Score-CAM (-m scorecam) forwards the image once per channel at every step (1,281 "
                   "forwards a map on the embedded model, against 1 to 9 for the others): see --steps.")
@click.option("--target-layer", help="Layer to explain (default: the last feature map before pooling).")
@click.option("--class", "class_", metavar="C", help="Class to explain (default: the trained model's top-1).")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Randomise in N steps spread over the model, the classifier alone first "
                   "(default: one step per block; the embedded model has 21).")
@click.option("--threshold", type=Finite(-1, 1), default=0.5, show_default=True,
              help="A map is still similar to the trained model's while its Spearman correlation "
                   "with it is at least this.")
@click.option("--max-similar", type=Finite(0, 1), default=0.25, show_default=True,
              help="PASS needs the map to be similar at no more than this fraction of the steps "
                   "(and changed at the last); more is LATE; similar at the last step is FAIL.")
@click.option("--out", default="camlens-sanity", show_default=True, help="Output directory.")
@fc_option
@top_channels_option
@smooth_options
@run_options(seed_help=f"Seed of the re-initialisation (and of the noise of {SEEDED}).")
@engine_options(default="off: each re-initialised model is explained once, which does not repay making its copy")
@html_option
@model_options
def sanity(image, methods, target_layer, class_, steps, threshold, max_similar, out, fc, top_channels, aug_smooth,
           eigen_smooth, device, batch_size, seed, optimize, compile_model, html, **model_args) -> None:
    """The model-randomisation test: re-initialise layers from the top, watch the maps change."""
    if is_array_file(image):  # said before the model loads
        raise CamlensError(f"{printable(image)}: camlens sanity draws each step's maps over a photo; for a signal, "
                           "volume or clip use camlens.metrics.sanity.cascading_randomisation from Python (rank "
                           "correlations over all positions)")
    group = speak_for(join())
    skipped: dict[str, str] = {}

    def skip(method: str, reason: str) -> None:
        skipped[method] = reason
        note_skip(method, reason)  # now, before a long run, and again under the table

    # The layer, the default one found once: each model copy would look for it again.
    layers: list[str] = []
    chosen, torch_device, loaded, classes = prepare(methods, out, device, target_layer, model_args, fc=fc,
                                                    on_skip=skip, on_layer=layers.append,
                                                    smooth={"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth})
    layer = layers[0]
    torch_device = group.device(torch_device)
    if not methods:
        chosen = [name for name in chosen if name in DEFAULT_METHODS]
    engine = engine_settings(optimize, compile_model, torch_device, default=False)
    photo = load_image(image)
    # One run at a time; clears what killed runs left. An earlier complete run's files stay until
    # this run's replace them, its record (sanity.json) last: it names each file by its digest, so
    # a run killed half-way leaves a record that the report can check, never a mix taken for one run.
    # Of a run of several processes, the first holds the folder and writes every file; each
    # process runs the cascade of the methods it takes, one at a time.
    with contextlib.ExitStack() as stack:
        run_folder: RunFolder | None = None

        def claim() -> str:
            nonlocal run_folder
            run_folder = held_output_dir(stack, out, "sanity", RUN_FILES)
            return str(run_folder.path)

        out_dir = Path(group.from_main(claim))
        model = loaded.module.to(torch_device)
        x = loaded.preprocess(photo).unsqueeze(0).to(torch_device, input_dtype(model))
        logits, forward_seconds = _timed_forward(model, x)
        target = resolve_class(class_, loaded, classes) if class_ is not None else int(logits.argmax(dim=1)[0])
        groups = randomisation_groups(model, x)
        plan = cascade_steps(groups, steps)
        if steps is not None and steps > len(groups):
            echo_error(f"camlens: note: --steps {steps} is more than the model's {len(groups)} layer groups: "
                       f"one step per group, {len(groups)} steps")
        labels = [names[-1] for names in plan]
        takes_top = {name for name in chosen if takes_option(name, "top_channels")}
        smooth = {"aug_smooth": aug_smooth, "eigen_smooth": eigen_smooth}
        objects = method_objects(model, chosen, layer, batch_size, seed, fc, engine, top_channels=top_channels,
                                 smooth=smooth)
        channels = _channels(model, x, layer) if any(isinstance(core_method(m), ScoreCAM) for m in objects.values()) else 0
        passes = {name: _passes(method, channels) for name, method in objects.items()}
        estimate = 0.0
        if group.main:  # the plan is said once
            per_map, per_cascade = _measure(model, x, target, layer, objects, groups, len(plan), torch_device,
                                            forward_seconds)
            estimate = _estimate(per_map, per_cascade, len(plan))
            shared = f" (shared by {group.world} processes, a method each at a time)" if group.distributed else ""
            echo_error(_plan_line(passes, per_map, per_cascade, len(plan), estimate, torch_device) + shared)

        started = time.monotonic()
        results = {}
        view = model_view(photo, loaded.preprocess.crop_box(*photo.size), max_side=224)
        names = {n: objects[n].display_name for n in chosen}
        criterion = (f"a step is similar when Spearman >= {threshold} (a blank map counts as changed); "
                     f"PASS: similar at <= {max_similar:.0%} of the steps and not at the last; "
                     f"LATE: similar at more; FAIL: still similar with the whole model randomised")

        def finish(status: str) -> tuple[dict, float, float]:
            """Judge the finished methods and write the run's files: the model view and every
            step's maps first, sanity.json (which says the run is there) last, each atomically."""
            elapsed = time.monotonic() - started
            verdicts = {}
            for name, r in results.items():
                # NaN: the map is blank (constant), which differs from the trained model's map.
                rho = [None if math.isnan(v) else v for v in map(float, r["spearman"][:, 0, 0])]
                judged = sanity_verdict(rho, threshold, max_similar,
                                        trained_blank=bool(is_constant(r["maps"][0, 0, 0])))
                changed = judged["changed_from"]
                verdicts[name] = {
                    **judged, "changed_from": None if changed is None else labels[changed],
                    "spearman": rho, "ssim": [float(v) for v in r["ssim"][:, 0, 0]], "final_spearman": rho[-1],
                    "passed": judged["verdict"] == "PASS", "display_name": names[name],
                }
            drawing = time.monotonic()
            written = {}

            def write(name, save):
                write_atomic(out_dir / name, save)
                written[name] = file_digest(out_dir / name)

            write("view.jpg", lambda p: view.save(p, format="JPEG", quality=90))
            # 8 bits per pixel (the maps are in [0, 1]): a quarter of float32, and finer than the
            # colours a map is drawn with; as evaluate keeps its maps.
            arrays = {n: quantise(np.stack([m[0, 0].detach().cpu().float().numpy() for m in r["maps"]]))
                      for n, r in results.items()}
            write("maps.npz", lambda p: np.savez_compressed(p, **arrays))
            if status == "complete" and results:
                rows = {names[n]: [m[0, 0].cpu().float().numpy() for m in r["maps"]] for n, r in results.items()}
                notes = {names[n]: ["reference", *("blank" if v is None else f"ρ {v:.2f}"
                                                   for v in verdicts[n]["spearman"])] for n in results}
                write("sanity.png", lambda p: sanity_figure(view, rows, ["trained", *labels], notes, p))
                similarity = {names[n]: {"spearman": [math.nan if s is None else s for s in v["spearman"]],
                                         "ssim": v["ssim"]} for n, v in verdicts.items()}
                write("similarity.png", lambda p: similarity_plot(
                    similarity, labels, threshold, p, {names[n]: v["verdict"] for n, v in verdicts.items()}))
            else:  # an earlier run's figures are not this run's
                run_folder.remove("sanity.png")
                run_folder.remove("similarity.png")
            figures = time.monotonic() - drawing
            report = {"camlens": __version__, "status": status, "image": printable(image), "class": target,
                      "class_name": loaded.class_name(target), "model": loaded.name, "target_layer": layer,
                      "seed": seed, "threshold": threshold, "max_similar": max_similar, "criterion": criterion,
                      "groups": groups, "steps": labels, "step_groups": plan, "skipped_methods": skipped,
                      "smoothing": smooth, "planned_methods": [names[n] for n in chosen],
                      "files": {"view": "view.jpg", "maps": "maps.npz"}, "digests": written,
                      "seconds": {"maps_estimated": round(estimate, 1), "maps": round(elapsed, 1),
                                  "figures": round(figures, 1)},
                      "methods": verdicts}
            write_atomic(out_dir / "sanity.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
            return verdicts, elapsed, figures

        try:
            with LogProgress() as bar:
                queue = WorkQueue(group, "sanity", len(chosen))
                overall = bar.add_task("methods", total=len(chosen), visible=group.distributed)
                for index in queue:
                    name = chosen[index]
                    task = bar.add_task(METHODS[name].display_name, total=len(plan) + 1)
                    built: dict[int, Any] = {}  # one method object per model copy: its layer lookup is cached
                    done = [0]

                    def within(part, whole, task=task, done=done):
                        bar.update(task, completed=done[0] + round(part / max(whole, 1), 2))

                    def explain_with(m, name=name, built=built, within=within):
                        if id(m) not in built:
                            built[id(m)] = method_objects(m, [name], layer, batch_size, seed, fc, engine,
                                                          top_channels=top_channels if name in takes_top else None,
                                                          smooth=smooth)[name]
                        return built[id(m)](x, target, progress=within).maps

                    def finished(count, total, task=task, done=done):
                        done[0] = count
                        bar.update(task, completed=count)

                    results[name] = cascading_randomisation(explain_with, model, x, groups=groups, seed=seed,
                                                            progress=finished, steps=steps)
                    bar.update(overall, completed=queue.finished())
                if group.main:  # the others' last methods
                    queue.wait(len(chosen), lambda done: bar.update(overall, completed=done))
        except KeyboardInterrupt:
            if results and run_folder is not None:  # the methods that finished, for `camlens report` to show
                finish("interrupted")
            raise
        everyone = group.collect({name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in r.items()}
                                  for name, r in results.items()})
        if run_folder is None:  # the first process judges, writes and says
            return
        merged = {name: r for part in everyone for name, r in part.items()}
        results = {name: merged[name] for name in chosen if name in merged}
        verdicts, elapsed, figures = finish("complete")
        if html:
            write_html(out_dir)

    caption = [f"Criterion: {criterion}.",
               *(f"{METHODS[n].display_name} skipped: {reason}" for n, reason in skipped.items())]
    table = Table(title=f"camlens sanity: {printable(Path(image).name)}, class {loaded.class_name(target)}, "
                        f"{len(plan)} steps: maps in {elapsed:.0f} s (estimated {_duration(estimate)}), "
                        f"figures in {figures:.0f} s -> {printable(out_dir)}",
                  caption="\n".join(caption), title_justify="left", caption_justify="left")
    for column in ("method", "similar at", "changed for good from", "Spearman, fully random",
                   "SSIM, fully random", "verdict"):
        table.add_column(column)
    for name, v in verdicts.items():
        rho = v["final_spearman"]
        table.add_row(names[name], f"{v['similar_steps']}/{len(plan)} steps", v["changed_from"] or "never",
                      "blank" if rho is None else f"{rho:.3f}", f"{v['ssim'][-1]:.3f}", _verdict_text(v, len(plan)))
    console("stdout").print(table)


# What a run writes into OUT.
RUN_FILES = ("sanity.json", "report.html", "maps.npz", "view.jpg", "sanity.png", "similarity.png")


def _timed(work: Callable[[], T], device: torch.device) -> tuple[T, float]:
    start = _clock()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, _clock() - start


def _timed_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The model's logits and the seconds of one forward pass: the faster of two, after one
    that pays the one-off costs (the faster is the less disturbed by other work)."""
    with torch.no_grad():
        runs = [_timed(lambda: model(x), x.device) for _ in range(3)]
    return check_scores(runs[0][0], x, output_given()), min(seconds for _, seconds in runs[1:])


def _channels(model: torch.nn.Module, x: torch.Tensor, layer: str) -> int:
    return int(_activation(model, x, layer).shape[1])


def _activation(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    name, module = resolve_layer(model, layer)
    return record(model, x, {name: module}, reshape=layer_layout())[1][name]


def _forwarded_channels(method: ScoreCAM, channels: int) -> int:
    """The channels Score-CAM (and its variants) forward at most: all, or its --top-channels."""
    top = method.top_channels
    if top is None:
        return channels
    return min(channels, max(1, int(top * channels + 0.5))) if isinstance(top, float) else min(top, channels)


def _passes(method: Any, channels: int) -> int:
    """Forward passes of one map. Score-CAM's is at most: a constant channel is not forwarded,
    though the all-zero input is, once. The backward of a gradient method is not counted. A
    smoothed method (--aug-smooth) makes one map per augmented copy."""
    core = core_method(method)
    passes = 1
    if isinstance(core, SmoothGradCAMPlusPlus):
        passes += core.n_samples
    if isinstance(core, ScoreCAM):
        passes += _forwarded_channels(core, channels) * core.forwards_per_channel()
    return passes * copies_per_image(method)


def _measure(model: torch.nn.Module, x: torch.Tensor, target: int, layer: str, objects: dict[str, Any],
             groups: list[str], steps: int, device: torch.device, forward: float) -> tuple[dict[str, float], float]:
    """Seconds of one map of each method, and of the rest of one cascade: copying the model,
    re-initialising every group, comparing the maps.

    A map is timed as a real explanation on the trained model (backward passes, upsampling and
    all), the faster of two: the first may pay one-off costs, the faster is the less disturbed
    by other work. Score-CAM's is not, as that would cost a whole map: its clean forward pass
    (and the all-zero input's, if a channel is constant), plus its non-constant channels at the
    cost of an image in a timed batch of its masked inputs, counted on the trained model for its
    map and on the fully randomised one for the steps (a randomised network has fewer dead,
    constant, channels).
    """
    per_map = {}
    with torch.random.fork_rng(devices=[]):  # the re-initialisation below leaves the caller's random state alone
        work, copying = _timed(lambda: copy.deepcopy(model), device)
        modules = dict(work.named_modules())
        resetting = _timed(lambda: [reinitialise(modules[g]) for g in groups], device)[1]
        for name, method in objects.items():
            core = core_method(method)
            if isinstance(core, ScoreCAM):
                # The channels it forwards: the trained model's for its map; the fully randomised
                # model's for the steps, where channels a trained network leaves dead (constant, not
                # forwarded) come alive: about twice the work on the embedded model, which the
                # trained count alone missed (73 s estimated, 104 s taken).
                live = []
                for each_model in (model, work):
                    activation = _activation(each_model, x, layer)
                    constant = is_constant(activation)
                    live.append((core._chosen(activation) & ~constant)[0])
                    if each_model is model:
                        trained_constant = bool(constant.any())
                # Each channel at its cost in a real call on a sample of the trained model's (masks
                # made, upsampled and forwarded in batches, as in a whole map), not a forward's alone.
                sample = live[0].nonzero().flatten()[: 4 * core.batch_size].tolist()
                each = _per_channel(core, x, target, sample, device, forward) if sample else 0.0
                channels = (int(live[0].sum()) + steps * int(live[1].sum())) / (steps + 1)
                per_map[name] = copies_per_image(method) * (forward * (1 + trained_constant) + channels * each)
            else:
                per_map[name] = min(_timed(lambda method=method: method(x, target).maps, device)[1] for _ in range(2))
        maps = torch.rand(steps, 1, 1, *x.shape[-2:]).to(device)
        reference = maps[:1].expand_as(maps)
        comparing = _timed(lambda: (spearman(maps, reference), ssim(maps, reference)), device)[1]
    return per_map, copying + resetting + comparing


def _per_channel(core: ScoreCAM, x: torch.Tensor, target: int, sample: list[int], device: torch.device,
                 forward: float) -> float:
    """Seconds per channel of a Score-CAM call on a ``sample`` of its channels (masks made,
    upsampled and forwarded in batches, as in a whole map), the faster of two."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = min(_timed(lambda: core(x, target, channels=sample).maps, device)[1] for _ in range(2))
    return max(seconds - forward, 0.0) / len(sample)


def _estimate(per_map: dict[str, float], per_cascade: float, steps: int) -> float:
    """Seconds of the cascades: each method explains the trained model and every step, once per
    cascade of its own (every group is re-initialised in each, whatever the number of steps)."""
    return sum((steps + 1) * seconds + per_cascade for seconds in per_map.values())


def _plan_line(passes: dict[str, int], per_map: dict[str, float], per_cascade: float, steps: int,
               estimate: float, device: torch.device) -> str:
    maps = steps + 1
    each = "; ".join(f"{METHODS[n].display_name} {p:,} forward{'s' if p > 1 else ''}, {_seconds(per_map[n])}"
                     for n, p in passes.items())
    return (f"camlens sanity: {len(passes)} method(s) x {maps} maps (trained + {steps} steps) = "
            f"{len(passes) * maps} explanations, about {maps * sum(passes.values()):,} forward passes; "
            f"estimated {_duration(estimate)} on {device.type}, then the figures (a map, timed on the "
            f"trained model, Score-CAM's per channel on a sample of them and counted with the randomised "
            f"model's live channels for the steps: {each}; a method's model copy, re-initialisation and comparisons: "
            f"{_seconds(per_cascade)})")


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 90 else f"about {minutes / 60:.1f} h"


def _verdict_text(v: dict, steps: int) -> str:
    if v["verdict"] == "UNTESTED":
        return "UNTESTED: the trained model's map is blank"
    if v["verdict"] == "FAIL":
        return "FAIL: still similar with every layer randomised: the map does not depend on the weights"
    similar = f"similar at {v['similar_steps']}/{steps} steps"
    if v["verdict"] == "LATE":
        return f"LATE: {similar}; changes only deep in the cascade"
    return f"PASS: {similar}" + ("" if v["final_spearman"] is not None else "; blank at the end")
