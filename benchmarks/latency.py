"""Latency of each camlens method against a plain forward of the same model and input.

What is measured (CPU, eval mode, a from-scratch ResNet-18 with random weights from a fixed
seed, target layer ``layer4`` = the final post-ReLU 512 x 7 x 7 map for a 224 x 224 input):

- baseline A: ``model(x)`` under ``torch.no_grad()``;
- baseline B: ``model(x)`` with autograd on (parameters require grad, no backward);
- for information, a plain no_grad forward of ``n_samples`` copies in one batch: with the
  clean forward, the least work Smooth Grad-CAM++ can do;
- ``gradcam``, ``gradcam++``, ``cam``: one call of the method object;
- ``smoothgradcam++`` with ``n_samples=8`` at ``batch_size`` 8 and 16 (the best is used);
- ``scorecam`` at ``batch_size`` 1, 8, 16, 32, 64 (the best is used). Its cost is one forward
  per non-constant channel of ``layer4`` (a channel is constant when its map has max == min)
  plus the clean forward, so it is compared with ``(non-constant + 1) x baseline A``.

Each figure is the median wall-clock time (``time.perf_counter``) of several repeats after a
warm-up; method objects are built once and reused, as an application would. The speed of a
small shared VM drifts by tens of percent over minutes, so every ratio uses baselines measured
right next to the method (a short block of baseline A, and a full one of B where B is the
reference, just before it; for Score-CAM, before, between and after its timed calls), not the baseline
measured once at the start. Score-CAM is warmed up on a channel subset (same batch shapes,
fewer forwards) and timed over fewer repeats, because one call is ~500 forwards.

Goals (PASS/FAIL):
  Grad-CAM                       <= 1.15 x baseline B
  Smooth Grad-CAM++ (8 copies)   <= 6 x baseline A
  Score-CAM (best batch size)    <= 1.2 x (non-constant channels + 1) x baseline A

The "other" column is the mean number of cores that *other* processes kept busy during the
measurement; a figure with other > 0.1 is marked with '!' because on a 2-core machine such
contention can slow a 2-thread forward down many times over.

Run (``make bench`` runs this, then ``benchmarks/memory.py``)::

    .venv/bin/python benchmarks/latency.py                 # 2 to 3 minutes on 2 idle cores
    .venv/bin/python benchmarks/latency.py --repeats 5 --scorecam-repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from models import resnet18  # noqa: E402
from timing import CONTENTION_LIMIT, CpuMonitor, Timing, measure  # noqa: E402

TARGET_LAYER = "layer4"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats of the cheap methods")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up calls before timing")
    parser.add_argument(
        "--baseline-repeats", type=int, default=5, help="calls of baseline A paired with each method"
    )
    parser.add_argument("--scorecam-repeats", type=int, default=2, help="timed Score-CAM calls per batch size")
    parser.add_argument("--scorecam-batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--smooth-batch-sizes", default="8,16")
    parser.add_argument("--samples", type=int, default=8, help="Smooth Grad-CAM++ n_samples")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser.parse_args(argv)


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def layer_channels(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """``(channels, non-constant)`` of ``layer4``: its channel count, and the number of
    (image, channel) pairs whose map is not constant (max != min) for ``images``."""
    captured = {}
    layer = dict(model.named_modules())[TARGET_LAYER]
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o.detach().clone()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    flat = captured["a"].flatten(2)
    return flat.shape[1], int((flat.amax(-1) != flat.amin(-1)).sum())


@dataclass
class Row:
    """One measured method, with the baselines measured right next to it."""

    name: str
    timing: Timing
    a: Timing  # baseline A, measured just before (and, for Score-CAM, between and after)
    ref: float  # the goal's reference time, from these local baselines
    ref_label: str

    @property
    def vs_a(self) -> float:
        return self.timing.median / self.a.median

    @property
    def vs_ref(self) -> float:
        return self.timing.median / self.ref


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = resnet18(seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    copies = x.repeat_interleave(args.samples, dim=0)  # as many images as Smooth's noisy copies
    # As after construction (camlens freezes the parameters only during its own calls).
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    channels, non_constant = layer_channels(model, x)
    per_image = non_constant / args.batch

    def baseline_a() -> None:
        with torch.no_grad():
            model(x)

    def baseline_b() -> None:
        with torch.enable_grad():
            model(x)

    def batch_forward() -> None:
        with torch.no_grad():
            model(copies)

    def local_a() -> Timing:
        return measure(baseline_a, repeats=args.baseline_repeats, warmup=2)

    rows: list[Row] = []

    def report(row: Row) -> Row:
        rows.append(row)
        flag = " !" if row.timing.contended else ""
        print(
            f"  {row.name:<28} {row.timing.median:8.4f} s  (local A {row.a.median:.4f} s){flag}",
            flush=True,
        )
        return row

    def timed(name: str, fn, reference: str = "A") -> Row:
        a = local_a()
        # Baseline B settles more slowly than A (its first calls are often faster than the
        # steady state): give it the full warm-up and repeats.
        b = measure(baseline_b, repeats=args.repeats, warmup=args.warmup) if reference == "B" else None
        timing = measure(fn, repeats=args.repeats, warmup=args.warmup)
        ref = b.median if b is not None else a.median
        return report(Row(name, timing, a, ref, reference))

    print(
        f"timing: median of {args.repeats} after {args.warmup} warm-up calls (Score-CAM: "
        f"{args.scorecam_repeats}), each paired with {args.baseline_repeats} calls of baseline A "
        "measured right before it",
        flush=True,
    )
    wall = CpuMonitor().start()
    base_a = timed("baseline A (no_grad)", baseline_a)
    timed("baseline B (autograd on)", baseline_b, reference="B")
    timed(f"plain forward x{copies.shape[0]} (info)", batch_forward)
    for method in ("gradcam", "gradcam++", "cam"):
        explainer = camlens.get_method(method)(model, target_layer=TARGET_LAYER)
        timed(method, lambda e=explainer: e(x), reference="B" if method.startswith("gradcam") else "A")

    smooth_rows = []
    for batch_size in int_list(args.smooth_batch_sizes):
        explainer = camlens.SmoothGradCAMPlusPlus(
            model, target_layer=TARGET_LAYER, n_samples=args.samples, seed=0, batch_size=batch_size
        )
        smooth_rows.append(timed(f"smoothgradcam++ (bs={batch_size})", lambda e=explainer: e(x)))

    score_rows = []
    for batch_size in int_list(args.scorecam_batch_sizes):
        explainer = camlens.ScoreCAM(model, target_layer=TARGET_LAYER, batch_size=batch_size)
        # Warm up on a channel subset: the same batch shapes as the timed call, far fewer forwards.
        subset = list(range(min(channels, 2 * batch_size)))
        explainer(x, channels=subset)
        # One call is ~500 forwards: bracket every timed call with baseline A measurements.
        runs, baselines = [], [local_a()]
        for _ in range(args.scorecam_repeats):
            runs.append(measure(lambda e=explainer: e(x), repeats=1, warmup=0))
            baselines.append(local_a())
        a = Timing.combine(baselines)
        unit = (per_image + 1) * a.median
        score_rows.append(report(Row(f"scorecam (bs={batch_size})", Timing.combine(runs), a, unit, "(nc+1)A")))
    wall.stop()

    # --- ratios and goals -----------------------------------------------------------------
    by_name = {row.name: row for row in rows}
    # "Best" by the goal's ratio (each against its own local baseline), not by raw time.
    best_smooth = min(smooth_rows, key=lambda r: r.vs_a)
    best_score = min(score_rows, key=lambda r: r.vs_ref)
    batch_row = by_name[f"plain forward x{copies.shape[0]} (info)"]
    goals = [
        ("Grad-CAM <= 1.15 x baseline B", by_name["gradcam"].vs_ref, 1.15),
        (
            f"Smooth Grad-CAM++ ({args.samples} copies, best: {best_smooth.name}) <= 6 x baseline A",
            best_smooth.vs_a,
            6.0,
        ),
        (
            f"Score-CAM (best: {best_score.name}) <= 1.2 x (non-constant + 1) x baseline A",
            best_score.vs_ref,
            1.2,
        ),
    ]

    print()
    print(
        f"ResNet-18, input {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.machine()}"
    )
    print(
        f"layer4: {channels} channels, {non_constant} non-constant ({per_image:g} per image): "
        f"Score-CAM reference (nc+1) x A = {per_image + 1:g} x local A"
    )
    header = (
        f"{'method':<28} {'median s':>9} {'min s':>8} {'local A s':>9} {'x A':>7} "
        f"{'x ref':>7} {'ref':>8} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        timing = row.timing
        other = "  n/a" if timing.other_cores is None else f"{timing.other_cores:5.2f}"
        flag = "!" if timing.contended else " "
        print(
            f"{row.name:<28} {timing.median:9.4f} {timing.best:8.4f} {row.a.median:9.4f} "
            f"{row.vs_a:7.2f} {row.vs_ref:7.2f} {row.ref_label:>8} {other}{flag}"
        )
    print(
        "x A: median / the baseline A measured next to it; x ref: median / the goal's reference "
        "(B, A or (nc+1) x A, from the baselines measured next to it)"
    )
    print()
    print(f"info: Grad-CAM / baseline A = {by_name['gradcam'].vs_a:.2f}")
    forwards_alone = base_a.timing.median + batch_row.timing.median
    print(
        f"info: {best_smooth.name} / (baseline A + plain forward x{copies.shape[0]}) = "
        f"{best_smooth.timing.median / forwards_alone:.2f}  (those forwards alone are "
        f"{forwards_alone / base_a.timing.median:.2f} x baseline A)"
    )
    for text, ratio, limit in goals:
        verdict = "PASS" if ratio <= limit else "FAIL"
        print(f"{verdict}  {text}: {ratio:.2f} (limit {limit:g})")
    contended = [row.name for row in rows if row.timing.contended]
    if contended:
        print(
            f"WARNING: other processes used more than {CONTENTION_LIMIT} core during: "
            f"{', '.join(contended)}; rerun on an idle machine before trusting those figures"
        )
    if wall.other_cores is not None:
        print(f"other processes over the whole run: {wall.other_cores:.2f} cores on average")

    return {
        "config": {
            "model": "resnet18",
            "target_layer": TARGET_LAYER,
            "batch": args.batch,
            "size": args.size,
            "threads": args.threads,
            "torch": torch.__version__,
            "camlens": camlens.__version__,
            "channels": channels,
            "non_constant_channels": non_constant,
        },
        "results": {
            row.name: {
                **row.timing.as_dict(),
                "local_a": row.a.as_dict(),
                "vs_a": row.vs_a,
                "vs_ref": row.vs_ref,
                "ref": row.ref_label,
            }
            for row in rows
        },
        "goals": [
            {"goal": text, "ratio": ratio, "limit": limit, "pass": ratio <= limit}
            for text, ratio, limit in goals
        ],
        "other_cores_whole_run": wall.other_cores,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
