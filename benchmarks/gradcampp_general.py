"""Grad-CAM++'s closed form against its general form, on the embedded model and the sample photos.

``gradcam++`` uses the closed form of Chattopadhyay et al. (2018), exact only when the score is
the exponential of a function linear in the target layer's activations. ``gradcam++-general``
takes the true second and third derivatives of the score. Per photo (its top-1 class) and score
of the general form (logit, probability, exp(logit)) this prints the largest absolute difference
between the two normalised maps (at input resolution, in [0, 1]), their Spearman rank
correlation ("-" where a map is constant), and the cost: the median wall time of each method
over ``--repeats`` calls (alternating), and the ratio general / closed.

What to expect: after any of its layers EfficientNet-Lite0 is piecewise linear (convolutions,
batch norm, ReLU6, pooling, linear), so the logit has no second or third derivative there and the
general form with ``logit`` gives an empty map (every alpha is 0/0), with ``exp`` the closed
form's map (the closed form's own assumption holds), and with ``probability`` a different map
(the softmax is curved). At the default layer (``features``, which the classifier pools) the
general form needs one direction per channel (1,280); at an earlier layer (``--layer``) one per
channel and position, through more of the network: minutes per photo on a CPU.

    .venv/bin/python benchmarks/gradcampp_general.py
    .venv/bin/python benchmarks/gradcampp_general.py samples/coffee.png --layer _blocks.15 --repeats 1 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from camlens.io import load_image  # noqa: E402
from camlens.methods import GradCAMPlusPlus, GradCAMPlusPlusGeneral  # noqa: E402
from camlens.metrics.sanity import spearman  # noqa: E402
from camlens.models import efficientnet_lite0  # noqa: E402
from timing import CpuMonitor  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SCORES = ("logit", "probability", "exp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="*", type=Path, help="images (default: samples/*.png|jpg)")
    parser.add_argument("--layer", default="features", help="target layer (default: features)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and photo")
    parser.add_argument("--chunk-size", type=int, default=64, help="gradcam++-general's chunk_size")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU thread count")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def timed(method, image: torch.Tensor, class_index: int) -> tuple[object, float]:
    if image.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    explanation = method(image, class_index)
    if image.device.type == "cuda":
        torch.cuda.synchronize()
    return explanation, time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = efficientnet_lite0().to(args.device)
    closed = GradCAMPlusPlus(model, args.layer)
    general = {score: GradCAMPlusPlusGeneral(model, args.layer, score=score, chunk_size=args.chunk_size)
               for score in SCORES}
    photos = args.photos or sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    rows = []
    for index, photo in enumerate(photos):
        image = model.preprocess(load_image(photo))[None].to(args.device)
        with torch.no_grad():
            class_index = int(model(image).argmax())
        if index == 0:  # warm-up, untimed: the default layer, torch.func's first use, caches
            for method in (closed, *general.values()):
                method(image, class_index)
        for score, method in general.items():
            times: dict[str, list[float]] = {"closed": [], "general": []}
            with CpuMonitor() as monitor:
                for _ in range(args.repeats):
                    reference, seconds = timed(closed, image, class_index)
                    times["closed"].append(seconds)
                    explanation, seconds = timed(method, image, class_index)
                    times["general"].append(seconds)
            rho = float(spearman(explanation.maps, reference.maps).flatten()[0])
            row = {
                "photo": photo.name,
                "class": model.class_names[class_index] if hasattr(model, "class_names") else class_index,
                "probability": float(reference.probabilities.flatten()[0]),
                "score": score,
                "max_diff": float((explanation.maps - reference.maps).abs().max()),
                "spearman": rho,
                "closed_s": statistics.median(times["closed"]),
                "general_s": statistics.median(times["general"]),
                "other_cores": monitor.other_cores,
            }
            rows.append(row)
            print(f"  {row['photo']} {score}: max |diff| {row['max_diff']:.3g}, Spearman {rho:.4f}, "
                  f"{row['general_s']:.2f} s", file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> list[str]:
    loads = [row["other_cores"] for row in rows if row["other_cores"] is not None]
    load = f"{statistics.mean(loads):.2f}" if loads else "unknown"
    lines = [
        f"EfficientNet-Lite0, layer {args.layer}, top-1 class, device {args.device}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}, "
        f"median of {args.repeats} calls; other processes kept {load} cores busy on average",
        "",
        "| photo | class (p) | score | max abs map difference | Spearman | gradcam++ (s) | gradcam++-general (s) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rho = "-" if row["spearman"] != row["spearman"] else f"{row['spearman']:.4f}"
        lines.append(
            f"| {row['photo']} | {row['class']} ({row['probability']:.2f}) | {row['score']} | {row['max_diff']:.3g} | {rho} | "
            f"{row['closed_s']:.3f} | {row['general_s']:.2f} | {row['general_s'] / row['closed_s']:.0f} x |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("\n".join(report(run(args), args)))


if __name__ == "__main__":
    main()
