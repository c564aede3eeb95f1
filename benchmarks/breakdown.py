"""Where Smooth Grad-CAM++'s time goes: the model's forwards versus camlens's own work.

A diagnosis aid for ``latency.py`` (not part of ``make bench``). On the benchmark ResNet-18:

1. plain ``torch.no_grad()`` forward at batch sizes 1 to 32: time per call and per image,
   i.e. how much batching amortises on this machine;
2. a cProfile of ``SmoothGradCAMPlusPlus(n_samples=8)`` calls, split by camlens stage: the
   clean forward (``capture.record`` called from ``CAMMethod.__call__``), the noisy-copy
   forwards (``capture.record`` from ``Context.gradients_at``), the backward
   (``capture.gradients``), the noise (``SmoothGradCAMPlusPlus.noise``) and the rest;
3. the lower bound that the forwards alone put on the Smooth Grad-CAM++ / baseline A ratio,
   next to the goal (6 x baseline A);
4. a what-if for a possible change in camlens: every input camlens forwards converted to
   ``torch.channels_last`` (simulated with a forward pre-hook on the model; the model and the
   user's own forward stay NCHW), against the plain NCHW baseline A, with the largest
   difference in the maps.

Run::

    .venv/bin/python benchmarks/breakdown.py                   # about 30 seconds
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from models import resnet18  # noqa: E402
from timing import measure  # noqa: E402

GOAL = 6.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=8, help="Smooth Grad-CAM++ n_samples")
    parser.add_argument("--batch-size", type=int, default=8, help="Smooth Grad-CAM++ batch_size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes of the forward table")
    return parser.parse_args(argv)


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    return measure(fn, repeats=repeats, warmup=warmup).median


def cumulative(stats: pstats.Stats, path_suffix: str, name: str, caller: str | None = None) -> float:
    """Cumulative seconds of function ``name`` in a file ending with ``path_suffix``.

    With ``caller``, only the time of the calls made from a function of that name.
    """
    total = 0.0
    for (filename, _, function), (_, _, _, ct, callers) in stats.stats.items():
        if not filename.endswith(path_suffix) or function != name:
            continue
        if caller is None:
            total += ct
        else:
            total += sum(v[3] for (_, _, f), v in callers.items() if f == caller)
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = resnet18()
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, args.size, args.size, generator=generator)

    # 1. how much batching amortises --------------------------------------------------------
    print(f"plain no_grad forward, ResNet-18, {args.threads} threads:")
    print(f"{'batch':>6} {'ms/call':>9} {'ms/image':>9} {'vs bs 1':>8}")
    per_call: dict[int, float] = {}
    for n in [int(b) for b in args.batches.split(",")]:
        x = images(n)

        def forward(x=x) -> None:
            with torch.no_grad():
                model(x)

        per_call[n] = median_time(forward, args.repeats if n <= 8 else max(3, args.repeats // 2))
        base = per_call.get(1, per_call[n] / n)
        print(f"{n:>6} {per_call[n] * 1e3:9.1f} {per_call[n] / n * 1e3:9.1f} {base / (per_call[n] / n):7.2f}x")

    # 2. Smooth Grad-CAM++ by stage ---------------------------------------------------------
    x = images(1)
    explainer = camlens.SmoothGradCAMPlusPlus(
        model, target_layer="layer4", n_samples=args.samples, seed=0, batch_size=args.batch_size
    )
    smooth = median_time(lambda: explainer(x), args.repeats)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.repeats):
        explainer(x)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = cumulative(stats, "camlens/methods/base.py", "__call__")
    stages = {
        "clean forward (record from __call__)": cumulative(stats, "camlens/capture.py", "record", "__call__"),
        "noisy forwards (record from gradients_at)": cumulative(
            stats, "camlens/capture.py", "record", "gradients_at"
        ),
        "backward to layer4 (gradients)": cumulative(stats, "camlens/capture.py", "gradients"),
        "noise (torch.randn)": cumulative(stats, "camlens/methods/gradcam.py", "noise"),
    }
    stages["everything else"] = total - sum(stages.values())
    print()
    print(
        f"Smooth Grad-CAM++ n_samples={args.samples} batch_size={args.batch_size}: "
        f"median {smooth * 1e3:.1f} ms; cProfile of {args.repeats} calls (per call):"
    )
    for name, seconds in stages.items():
        print(f"  {name:<44} {seconds / args.repeats * 1e3:8.1f} ms {seconds / total:6.1%}")

    # 3. the bound the forwards put on the ratio --------------------------------------------
    if 1 not in per_call:
        with torch.no_grad():
            per_call[1] = median_time(lambda: model(x), args.repeats)
    a = per_call[1]
    chunk = min(args.batch_size, args.samples)  # copies per forward (the last may be fewer)
    chunks = math.ceil(args.samples / chunk)
    if chunk not in per_call:
        copies = images(chunk)
        with torch.no_grad():
            per_call[chunk] = median_time(lambda: model(copies), args.repeats)
    noisy = chunks * per_call[chunk]
    bound = (a + noisy) / a
    print()
    print(f"baseline A (batch 1): {a * 1e3:.1f} ms")
    print(
        f"forwards alone: 1 clean + {chunks} x batch {chunk} = {(a + noisy) * 1e3:.1f} ms "
        f"= {bound:.2f} x A (goal {GOAL:g} x A)"
    )
    print(f"measured Smooth Grad-CAM++ = {smooth / a:.2f} x A = {smooth / (a + noisy):.2f} x the forwards alone")
    if bound > GOAL:
        need = (GOAL - 1) * a / args.samples
        print(
            f"the goal needs a batched forward of <= {need * 1e3:.1f} ms/image "
            f"({a / need:.2f}x faster per image than batch 1); this machine gives "
            f"{per_call[chunk] / chunk * 1e3:.1f} ms/image"
        )

    # 4. what-if: camlens forwards its inputs in channels_last -------------------------------
    def to_channels_last(module, inputs):
        return tuple(
            t.contiguous(memory_format=torch.channels_last) if torch.is_tensor(t) and t.dim() == 4 else t
            for t in inputs
        )

    reference = explainer(x).maps
    handle = model.register_forward_pre_hook(to_channels_last)
    try:
        converted = median_time(lambda: explainer(x), args.repeats)
        difference = float((explainer(x).maps - reference).abs().max())
    finally:
        handle.remove()
    with torch.no_grad():
        a_now = median_time(lambda: model(x), args.repeats)
    print()
    print(
        f"what-if, inputs forwarded in channels_last: Smooth Grad-CAM++ {converted * 1e3:.1f} ms "
        f"(NCHW {smooth * 1e3:.1f} ms) = {converted / a_now:.2f} x baseline A "
        f"({a_now * 1e3:.1f} ms, NCHW); max |map difference| {difference:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
