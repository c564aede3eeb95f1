"""What each speed lever buys, measured in one process on the embedded model (issue 9).

The levers of ``camlens.accelerate``, each against the plain model (``optimize=False``), on the
embedded EfficientNet-Lite0 at 224 x 224, target layer ``features`` (1280 x 7 x 7), the sample
photos:

- ``channels-last``: the inference copy with channels-last memory only;
- ``fold``: the copy with batch norms folded into the convolutions only;
- ``copy``: both (what ``optimize=True``, the CPU default, runs);
- ``copy + compile``: the copy, compiled (inductor, frozen weights; ``compile=True``): whole for
  the forward-only work (Score-CAM's masked inputs, the metrics), and up to the target layer for
  the passes that observe it (gradients included; the rest runs eagerly). Its compilation is
  outside the timing and reported apart.

Workloads: Grad-CAM at batch 1 and 8; Smooth Grad-CAM++ (8 copies) at batch 1; Score-CAM at
batch 1 (every non-constant channel of ``features``); and ``evaluate_image`` with Grad-CAM and
the four faithfulness metrics (16 steps), as ``camlens evaluate`` runs it, in images per second.
Every configuration is checked first against the plain one (max |map difference|, and for the
metrics the largest difference of any value). Configurations alternate run by run in a rotating
order, so a slow spell of a shared machine falls on all of them; medians and the quartiles of
the per-run ratio are printed. Then a throughput curve of forward-only batches (ms per image at
batch 1 to 32), plain, copy and compiled copy, and Smooth Grad-CAM++'s time per batch size:
the default batch sizes were chosen from these.

Run::

    .venv/bin/python benchmarks/levers.py                 # about 15 minutes on 2 idle cores
    .venv/bin/python benchmarks/levers.py --repeats 5 --skip-compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from camlens.accelerate import InferenceCopies  # noqa: E402
from camlens.capture import preserved  # noqa: E402
from camlens.evaluate import evaluate_image  # noqa: E402
from camlens.models import efficientnet_lite0  # noqa: E402
from camlens.io import load_image  # noqa: E402
from timing import CpuMonitor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYER = "features"
METRICS = ["drop", "increase", "deletion", "insertion"]
EVALUATE_BATCH = 33  # one image's perturbed inputs at 16 steps: 1 + 16 + 16
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
    parser.add_argument("--only", metavar="TEXT", help="only the workloads whose name contains TEXT (e.g. Grad-CAM)")
    return parser.parse_args(argv)


def build(name: str, model, config: str, **options):
    """The method object of ``config``: its inference copies made with the config's settings."""
    optimize, compile, settings = CONFIGS[config]
    method = camlens.get_method(name)(model, LAYER, optimize=optimize, compile=compile, **options)
    if settings:
        method._copies = InferenceCopies(**settings)
    return method


def photos(model) -> torch.Tensor:
    names = ["coffee.png", "chelsea.png", "cameraman.png", "rocket.jpg"]
    shots = [model.preprocess(load_image(ROOT / "samples" / name)) for name in names]
    return torch.stack(shots + [s.flip(-1) for s in shots])


def workloads(model, x: torch.Tensor, evaluate_images: int) -> dict[str, tuple[Callable, set[str]]]:
    """name -> (run(config) -> result, configurations that apply). Method objects are built once
    per configuration and reused, as an application would."""
    every = {"plain", "channels-last", "fold", "copy", "copy + compile"}
    cache: dict = {}

    def maps(name, images, **options):
        def run(config):
            key = (name, id(images), config)
            if key not in cache:
                cache[key] = build(name, model, config, **options)
            return cache[key](images).maps
        return run

    def evaluate(config):
        key = ("evaluate", config)
        if key not in cache:
            cache[key] = build("gradcam", model, config)
        labels, values = [967, 281, 834, 812], []
        for i in range(evaluate_images):
            record = evaluate_image(cache[key], x[i], labels[i % 4], [], METRICS, steps=16, batch_size=EVALUATE_BATCH)
            values.append([record[k] for k in ("probability", "explained_probability", "drop", "deletion",
                                               "insertion")] + record["deletion_curve"] + record["insertion_curve"])
        return torch.tensor(values)

    return {
        "Grad-CAM, batch 1": (maps("gradcam", x[:1]), every),
        "Grad-CAM, batch 8": (maps("gradcam", x), every),
        "Smooth Grad-CAM++ (8 copies, batch_size 8), batch 1": (
            maps("smoothgradcam++", x[:1], seed=0, batch_size=8), every),
        "Score-CAM, batch 1": (maps("scorecam", x[:1]), every),
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
        first = time.perf_counter()
        result = run(config)
        first = time.perf_counter() - first
        if reference is None:
            reference = result
        difference = (result - reference).abs().max().item()
        note = f", first call {first:.1f} s (copy made{', compiled' if 'compile' in config else ''})" if config != "plain" else ""
        print(f"  {config:15s} max |difference| against plain {difference:.1e}{note}", flush=True)
    times: dict[str, list[float]] = {c: [] for c in configs}
    with CpuMonitor() as monitor:
        for r in range(repeats):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for config in order:
                times[config].append(timed(lambda: run(config)))
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
    sizes = [1, 8, 16, 32]
    print("  batch          " + "  ".join(f"{s:>6d}" for s in sizes))
    configs = ["plain", "copy"] + (["copy + compile"] if compile else [])
    with preserved(model), torch.no_grad():
        for config in configs:
            cells = []
            for size in sizes:
                batch = x.repeat(size // x.shape[0] + 1, 1, 1, 1)[:size]
                forward = build("gradcam", model, config).fast_forward(batch, size)
                forward(batch)
                runs = [timed(lambda: forward(batch)) for _ in range(max(3, 32 // size))]
                cells.append(statistics.median(runs) * 1000 / size)
            print(f"  {config:15s}" + "  ".join(f"{c:6.1f}" for c in cells), flush=True)


def smooth_batch_curve(model, x: torch.Tensor) -> None:
    """Smooth Grad-CAM++'s 64 noisy copies of 8 images (forward and backward) per batch size."""
    print("\n## Smooth Grad-CAM++ on 8 images (64 noisy copies), seconds per call by batch_size (copy)", flush=True)
    sizes = [4, 8, 16, 32]
    methods = {size: build("smoothgradcam++", model, "copy", seed=0, batch_size=size) for size in sizes}
    reference = methods[8](x).maps
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for size, method in methods.items():
        assert torch.equal(method(x).maps, reference) or (method(x).maps - reference).abs().max() < 1e-5
    for _ in range(3):
        for size, method in methods.items():
            times[size].append(timed(lambda method=method: method(x)))
    print("  " + "  ".join(f"{size}: {statistics.median(times[size]):.2f} s" for size in sizes), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = efficientnet_lite0()
    x = photos(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; embedded EfficientNet-Lite0, "
          f"layer {LAYER!r}, 224 x 224")
    for name, (run, applies) in workloads(model, x, args.evaluate_images).items():
        if args.only and args.only not in name:
            continue
        configs = [c for c in CONFIGS if c in applies and not (args.skip_compile and c == "copy + compile")]
        slow = name.startswith(("Score-CAM", "evaluate"))
        run_workload(name, run, configs, args.slow_repeats if slow else args.repeats)
    if not args.skip_curve:
        throughput_curve(model, x, not args.skip_compile)
        smooth_batch_curve(model, x)


if __name__ == "__main__":
    main()
