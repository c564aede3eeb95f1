"""What each speed lever buys, measured in one process on the embedded model (issue 9).

The levers of ``camlens.accelerate``, each against the plain model (``optimize=False``), on the
embedded EfficientNet-Lite0 at 224 x 224, target layer ``features`` (1280 x 7 x 7), the sample
photos:

- ``channels-last``: the inference copy with channels-last memory only;
- ``fold``: the copy with batch norms folded into the convolutions only;
- ``copy``: both (what ``optimize=True``, the CPU default, runs);
- ``copy + compile``: the copy, compiled (inductor, frozen weights) for the forward-only work
  (``compile=True``); the gradient methods do not use it, so it is timed for Score-CAM and the
  metrics only. Its compilation is outside the timing and reported apart.

Workloads: Grad-CAM at batch 1 and 8; Smooth Grad-CAM++ (8 copies) at batch 1; Score-CAM at
batch 1 (every non-constant channel of ``features``); and ``evaluate_image`` with Grad-CAM and
the four faithfulness metrics (16 steps), as ``camlens evaluate`` runs it, in images per second.
Every configuration is checked first against the plain one (max |map difference|, and for the
metrics the largest difference of any value). Configurations alternate run by run in a rotating
order, so a slow spell of a shared machine falls on all of them; medians and the quartiles of
the per-run ratio are printed. Then a throughput curve of forward-only batches (ms per image at
batch 1 to 64), plain, copy and compiled copy, from which the default batch sizes were chosen.

Run::

    .venv/bin/python benchmarks/levers.py                 # about 15 minutes on 2 idle cores
    .venv/bin/python benchmarks/levers.py --repeats 5 --skip-compile
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from camlens import accelerate  # noqa: E402
from camlens.capture import preserved  # noqa: E402
from camlens.evaluate import evaluate_image  # noqa: E402
from camlens.methods import base  # noqa: E402
from camlens.models import efficientnet_lite0  # noqa: E402
from camlens.io import load_image  # noqa: E402
from timing import CpuMonitor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYER = "features"
METRICS = ["drop", "increase", "deletion", "insertion"]
# name -> (optimize, compile, inference_copy settings)
CONFIGS = {
    "plain": (False, False, None),
    "channels-last": (True, False, {"fold": False, "channels_last": True}),
    "fold": (True, False, {"fold": True, "channels_last": False}),
    "copy": (True, False, {"fold": True, "channels_last": True}),
    "copy + compile": (True, True, {"fold": True, "channels_last": True}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per configuration (gradient methods)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs for Score-CAM and evaluate")
    parser.add_argument("--evaluate-images", type=int, default=4, help="images per evaluate run")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled configuration")
    parser.add_argument("--skip-curve", action="store_true", help="leave out the throughput curve")
    return parser.parse_args(argv)


def engine(settings: dict | None):
    """Make the methods' inference copy the one of ``settings`` (the plain config has none)."""
    made = functools.partial(accelerate.inference_copy, **settings) if settings else (lambda model, images: None)
    base.inference_copy = made


def photos(model) -> torch.Tensor:
    names = ["coffee.png", "chelsea.png", "cameraman.png", "rocket.jpg"]
    shots = [model.preprocess(load_image(ROOT / "samples" / name)) for name in names]
    return torch.stack(shots + [s.flip(-1) for s in shots])


def workloads(model, x: torch.Tensor, evaluate_images: int) -> dict[str, tuple[Callable, set[str]]]:
    """name -> (run(optimize, compile) -> result, configurations that apply)."""
    gradient = {"plain", "channels-last", "fold", "copy"}
    every = gradient | {"copy + compile"}

    def method(name, **options):
        return lambda optimize, compile: camlens.get_method(name)(model, LAYER, optimize=optimize, compile=compile,
                                                                  **options)

    def maps(make, images):
        def run(optimize, compile, make=make):
            key = (optimize, compile)
            if key not in cache.setdefault(id(make), {}):
                cache[id(make)][key] = make(optimize, compile)
            return cache[id(make)][key](images).maps
        return run

    def evaluate(optimize, compile):
        key = ("evaluate", optimize, compile)
        if key not in cache:
            cache[key] = camlens.GradCAM(model, LAYER, optimize=optimize, compile=compile)
        explainer, labels = cache[key], [967, 281, 834, 812]
        values = []
        for i in range(evaluate_images):
            record = evaluate_image(explainer, x[i], labels[i % 4], [], METRICS, steps=16, batch_size=33)
            values.append([record[k] for k in ("probability", "explained_probability", "drop", "deletion",
                                               "insertion")] + record["deletion_curve"] + record["insertion_curve"])
        return torch.tensor(values)

    cache: dict = {}
    return {
        "Grad-CAM, batch 1": (maps(method("gradcam"), x[:1]), gradient),
        "Grad-CAM, batch 8": (maps(method("gradcam"), x), gradient),
        "Smooth Grad-CAM++ (8 copies, batch_size 8), batch 1": (
            maps(method("smoothgradcam++", seed=0, batch_size=8), x[:1]), gradient),
        "Score-CAM, batch 1": (maps(method("scorecam"), x[:1]), every),
        f"evaluate_image, Grad-CAM, 4 metrics ({evaluate_images} images)": (evaluate, every),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_workload(name: str, run, configs: list[str], repeats: int) -> None:
    print(f"\n## {name}", flush=True)
    reference = None
    for config in ["plain", *[c for c in configs if c != "plain"]]:
        optimize, compile, settings = CONFIGS[config]
        engine(settings)
        first = time.perf_counter()
        result = run(optimize, compile)
        first = time.perf_counter() - first
        if reference is None:
            reference = result
        difference = (result - reference).abs().max().item()
        note = f", first call (copy made, compiled) {first:.1f} s" if compile else ""
        print(f"  {config:15s} max |difference| against plain {difference:.1e}{note}", flush=True)
    times: dict[str, list[float]] = {c: [] for c in configs}
    with CpuMonitor() as monitor:
        for r in range(repeats):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for config in order:
                optimize, compile, settings = CONFIGS[config]
                engine(settings)
                times[config].append(timed(lambda: run(optimize, compile)))
    plain = times["plain"]
    print(f"  {'configuration':15s} {'median':>10s} {'speed-up':>9s}  per-run speed-up (quartiles)")
    for config in configs:
        ratios = sorted(p / t for p, t in zip(plain, times[config]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        median = statistics.median(times[config])
        print(f"  {config:15s} {median * 1000:8.1f} ms {statistics.median(plain) / median:8.2f}x  "
              f"{q[0]:.2f}-{q[2]:.2f}", flush=True)
    load = monitor.other_cores
    print(f"  cores kept busy by other processes: {load:.2f}" + (" (contended)" if load and load > 0.1 else ""))


def throughput_curve(model, x: torch.Tensor, compile: bool) -> None:
    print("\n## Forward-only throughput, ms per image (no_grad)", flush=True)
    sizes = [1, 4, 8, 16, 32, 64]
    print("  batch  " + "  ".join(f"{s:>6d}" for s in sizes))
    with preserved(model), torch.no_grad():
        engine({"fold": True, "channels_last": True})
        modules = {"plain": model,
                   "copy": camlens.GradCAM(model, optimize=True).fast_forward(x, 64)}
        if compile:
            modules["copy + compile"] = None
        for label, module in modules.items():
            cells = []
            for size in sizes:
                batch = x.repeat(size // x.shape[0] + 1, 1, 1, 1)[:size]
                forward = module
                if label == "copy + compile":
                    forward = camlens.GradCAM(model, compile=True).fast_forward(batch, size)
                forward(batch)
                runs = [timed(lambda: forward(batch)) for _ in range(max(2, 16 // size))]
                cells.append(statistics.median(runs) * 1000 / size)
            print(f"  {label:15s}" + "  ".join(f"{c:6.1f}" for c in cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = efficientnet_lite0()
    x = photos(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; embedded EfficientNet-Lite0, "
          f"layer {LAYER!r}, 224 x 224")
    for name, (run, applies) in workloads(model, x, args.evaluate_images).items():
        configs = [c for c in CONFIGS if c in applies and not (args.skip_compile and c == "copy + compile")]
        slow = name.startswith(("Score-CAM", "evaluate"))
        run_workload(name, run, configs, args.slow_repeats if slow else args.repeats)
    if not args.skip_curve:
        throughput_curve(model, x, not args.skip_compile)
    engine({"fold": True, "channels_last": True})


if __name__ == "__main__":
    main()
