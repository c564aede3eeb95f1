"""Soak: resident memory while one process explains 2,000 images.

Users of a peer library report memory that grows over ImageNet's 50,000 validation images. This
explains ``--images`` (2,000) images in one process with the embedded EfficientNet-Lite0 and
prints the process's resident set size (``VmRSS`` of ``/proc/self/status``) every ``--every``
(200) images. Each image goes the way ``camlens explain`` takes a file: a sample photo (cycling
over ``samples/``) read with ``camlens.io.load_image``, randomly cropped (70 to 100 % of each
side) and flipped so that no two inputs are the same, preprocessed by the model's own
``preprocess``, explained, its map turned into a PNG overlay (``camlens.render``). ``--api``
chooses how it is explained:

- ``explain`` (default): ``camlens.explain(model, x, method)``, a new method object per call;
- ``object``: one method object (``camlens.GradCAM(model)``, ...) reused for every call;
- ``cli``: the per-image work of ``camlens explain`` itself (its ``Explainer``: overlays with
  captions, the comparison figure, ``maps.npz``), one image at a time, each crop written to a
  temporary file first. About 0.4 to 0.7 s per image on 2 shared cores (mostly the figure):
  give it ``--images 500`` or the time.

Each report shows the RSS twice: as ``top`` shows it, and "held": right after ``gc.collect()``
and glibc's ``malloc_trim(0)`` have freed unreachable Python objects and given the allocator's
free memory back to the system. Held is what the process still keeps, and what is judged: the
first also counts garbage not yet collected (matplotlib's figures are cycles) and glibc's free
lists, which swing with the allocator's state, not with anything kept. Measured here for
Score-CAM (16 masked inputs per forward) over 300 images: 550 to 675 MiB untrimmed after each
image, up and down with no trend, against 308 to 312 MiB trimmed (every 10th image); for
``--api cli`` without ``gc.collect()``, the trimmed figure moved by up to 4 % from report to
report, with it by 0.1 MiB. The reference is the held RSS at the first report at or after
``--warmup`` (200) images (the default-layer cache, matplotlib's fonts and torch's pools are
filled by then); PASS when every later report is within 5 % of it. The trims change the
process's later RSS as ``top`` shows it too; ``--no-trim`` leaves the process alone and judges
that instead.

Score-CAM forwards one masked copy per channel (1,280 at the default layer, about 25 s an image
here), so by default it is given channels 0 to 15 only (``--channels``); its masked inputs
still go through the same code.

Run (one thread by default: on a shared machine torch's default thread count can make a call
many times slower, and the soak measures memory, not speed)::

    .venv/bin/python benchmarks/soak.py                      # Grad-CAM, 2,000 images: 3 to 4 min here
    .venv/bin/python benchmarks/soak.py --method gradcam++ --api object --batch-size 8
    .venv/bin/python benchmarks/soak.py --method scorecam --images 1000 --every 100 --warmup 100
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from camlens.io import expand_inputs, load_image  # noqa: E402
from camlens.models import LoadedModel, load_model  # noqa: E402
from camlens.render import model_view, overlay  # noqa: E402
from timing import CpuMonitor  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
TOLERANCE = 0.05
SCORECAM_CHANNELS = 16


def percent(share: float) -> str:
    """A signed percentage to one decimal; a change that rounds to zero is +0.0%, never -0.0%."""
    return f"{round(100 * share, 1) + 0.0:+.1f}%"


def rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux: ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def held_rss_mib() -> float | None:
    """The RSS once ``gc.collect()`` and glibc's ``malloc_trim(0)`` have freed what is no longer
    reachable and given the allocator's free memory back (None without glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    gc.collect()
    trim(0)
    return rss_mib()


@dataclass
class Sample:
    images: int  # explained so far
    rss: float  # MiB, as ps and top show it
    held: float | None  # MiB, held_rss_mib(); None without glibc

    @classmethod
    def now(cls, images: int, hold: bool = True) -> Sample:
        return cls(images, rss_mib(), held_rss_mib() if hold else None)

    @property
    def judged(self) -> float:
        """What the verdict judges: the held RSS where there is one."""
        return self.rss if self.held is None else self.held


@dataclass
class Verdict:
    reference_images: int
    reference_mib: float
    worst_images: int
    worst_deviation: float  # (rss - reference) / reference, the largest in absolute value
    passed: bool


def verdict(samples: Sequence[tuple[int, float]], warmup: int, tolerance: float = TOLERANCE) -> Verdict:
    """Flat after warm-up: ``samples`` are (images done, RSS); the reference is the first sample
    at or after ``warmup`` images, and every later one must be within ``tolerance`` of it."""
    after = [(n, rss) for n, rss in samples if n >= warmup]
    if len(after) < 2:
        raise ValueError(f"need two RSS samples at or after the warm-up ({warmup} images), got {len(after)}")
    (start, reference), later = after[0], after[1:]
    worst, deviation = max(((n, (rss - reference) / reference) for n, rss in later), key=lambda s: abs(s[1]))
    return Verdict(start, reference, worst, deviation, abs(deviation) <= tolerance)


def varied(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop (70 to 100 % of each side), flipped left-right half of the time."""
    width, height = image.size
    w, h = round(width * rng.uniform(0.7, 1.0)), round(height * rng.uniform(0.7, 1.0))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((left, top, left + w, top + h))
    return ImageOps.mirror(image) if rng.random() < 0.5 else image


def steps(loaded: LoadedModel, args: argparse.Namespace, workdir: Path) -> Callable:
    """``step(paths, rng)``: explain one batch of photos the way ``args.api`` says."""
    model, preprocess = loaded.module, loaded.preprocess
    if args.api == "cli":
        from camlens.cli.explain import Explainer

        explainer = Explainer(loaded, methods=[args.method], target_layer=None, class_index=None, top_k=1,
                              device=torch.device("cpu"), batch_size=None, seed=args.seed)
        crop = workdir / "input.png"

        def step(paths: Sequence[Path], rng: random.Random) -> None:
            varied(load_image(paths[0]), rng).save(crop)
            explainer.run(crop, workdir, lambda method, done, total: None)

        return step

    options = {"seed": args.seed} if args.method == "smoothgradcam++" else {}
    channels = list(range(args.channels)) if args.channels else None
    if args.api == "object":
        method = camlens.get_method(args.method)(model, **options)
        explain: Callable = lambda x: method(x, channels=channels)  # noqa: E731
    else:
        explain = lambda x: camlens.explain(model, x, args.method, channels=channels, **options)  # noqa: E731

    def step(paths: Sequence[Path], rng: random.Random) -> None:
        images = [varied(load_image(path), rng) for path in paths]
        maps = explain(torch.stack([preprocess(image) for image in images])).to_numpy()["maps"]
        for image, saliency in zip(images, maps):
            view = model_view(image, preprocess.crop_box(*image.size))
            overlay(view, saliency[0]).save(io.BytesIO(), format="png")

    return step


def soak(loaded: LoadedModel, photos: Sequence[Path], args: argparse.Namespace,
         report: Callable[[str], None] = print) -> list[Sample]:
    """Explain ``args.images`` varied photos; report and return a :class:`Sample` before the
    first, every ``args.every`` images and at the end."""
    rng = random.Random(args.seed)
    samples = [Sample.now(0, not args.no_trim)]
    reference = None
    report(f"{'images':>7} {'RSS MiB':>8} {'held':>8} {'vs ref':>7} {'images/s':>9} {'elapsed s':>10}")

    def row(sample: Sample, rate: str, elapsed: float) -> None:
        held = "-" if sample.held is None else f"{sample.held:.1f}"
        change = percent((sample.judged - reference) / reference) if reference else ""
        report(f"{sample.images:>7} {sample.rss:8.1f} {held:>8} {change:>7} {rate:>9} {elapsed:10.1f}")

    row(samples[0], "", 0.0)
    with tempfile.TemporaryDirectory(prefix="camlens-soak-") as workdir:
        step = steps(loaded, args, Path(workdir))
        start = last_time = time.perf_counter()
        done = last_done = 0
        while done < args.images:
            batch = min(args.batch_size, args.images - done)
            step([photos[(done + i) % len(photos)] for i in range(batch)], rng)
            done += batch
            if done // args.every > last_done // args.every or done == args.images:
                now = time.perf_counter()
                samples.append(Sample.now(done, not args.no_trim))
                if reference is None and done >= args.warmup:
                    reference = samples[-1].judged
                row(samples[-1], f"{(done - last_done) / (now - last_time):.2f}", now - start)
                last_done, last_time = done, time.perf_counter()  # the rate leaves out gc and trim
    return samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images to explain in this process")
    parser.add_argument("--every", type=int, default=200, help="report RSS every this many images")
    parser.add_argument("--warmup", type=int, default=200, help="the RSS reference: the report at this many images")
    parser.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++", "smoothgradcam++", "scorecam"))
    parser.add_argument("--api", default="explain", choices=("explain", "object", "cli"),
                        help="camlens.explain per call, one method object reused, or camlens explain's per-image work")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (not with --api cli)")
    parser.add_argument("--channels", type=int, default=None,
                        help=f"explain with channels 0 to N-1 of the target layer only (default: all; "
                             f"{SCORECAM_CHANNELS} for scorecam; not with --api cli)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds the crops and flips (and Smooth Grad-CAM++)")
    parser.add_argument("--no-trim", action="store_true",
                        help="judge RSS as top shows it: no gc.collect() or malloc_trim(0) at the reports")
    parser.add_argument("--photos", type=Path, default=SAMPLES, help="folder of photos to cycle over")
    args = parser.parse_args(argv)
    for name in ("images", "every", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.warmup < args.images:
        parser.error("--warmup must be between 1 and --images - 1")
    if args.api == "cli" and (args.batch_size != 1 or args.channels is not None or args.method == "scorecam"):
        parser.error("--api cli explains one image at a time with every channel: no --batch-size, "
                     "--channels or scorecam")
    if args.channels is None and args.method == "scorecam":
        args.channels = SCORECAM_CHANNELS
    elif args.channels is not None and args.channels < 1:
        parser.error("--channels must be at least 1")
    return args


def main(argv: list[str] | None = None, loaded: LoadedModel | None = None) -> int:
    """Run the soak on ``loaded`` (default: the embedded EfficientNet-Lite0); 0 on PASS, 1 on FAIL."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    photos, _, _ = expand_inputs([args.photos])
    loaded = loaded or load_model("efficientnet_lite0")
    print(
        f"soak: {loaded.name}, {camlens.METHODS[args.method].display_name} via --api {args.api}, "
        f"{args.images} images ({len(photos)} photos from {args.photos}, random crops and flips), "
        f"batch {args.batch_size}, {args.threads} thread(s), "
        f"{f'channels 0-{args.channels - 1}' if args.channels else 'every channel'}, torch {torch.__version__}",
        flush=True,
    )
    with CpuMonitor() as monitor:
        start = time.perf_counter()
        samples = soak(loaded, photos, args, report=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
    result = verdict([(s.images, s.judged) for s in samples], args.warmup)
    raw = verdict([(s.images, s.rss) for s in samples], args.warmup)
    label = "RSS" if samples[0].held is None else "held RSS (after gc.collect, malloc_trim)"
    final = samples[-1]
    load = f"{monitor.other_cores:.2f}" if monitor.other_cores is not None else "unknown"
    print()
    print(f"{args.images} images in {seconds:.0f} s: {args.images / seconds:.2f} images/s "
          f"(other processes kept {load} cores busy on average)")
    print(f"{label}: {samples[0].judged:.1f} MiB before the first image, {result.reference_mib:.1f} MiB after "
          f"{result.reference_images} (the reference), {final.judged:.1f} MiB after {final.images} "
          f"({percent((final.judged - result.reference_mib) / result.reference_mib)})")
    if samples[0].held is not None:
        print(f"RSS as top shows it (garbage and glibc's free lists included): largest deviation after warm-up "
              f"{percent(raw.worst_deviation)} (after {raw.worst_images} images) from "
              f"{raw.reference_mib:.1f} MiB")
    print(f"{'PASS' if result.passed else 'FAIL'}  memory flat after warm-up ({label}): largest deviation "
          f"{percent(result.worst_deviation)} (after {result.worst_images} images) "
          f"{'<=' if result.passed else '>'} {100 * TOLERANCE:.0f}%")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
