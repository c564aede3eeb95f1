"""What the GGAM loss costs in a training step, on the embedded EfficientNet-Lite0 with GGAM.

Three training steps (forward, loss, backward, AdamW update) at the same batch size, run in
turn so that a change in the machine's load hits each of them alike:

- ``CE``: cross-entropy only (the GGAM head, no Grad-CAM branch);
- ``CE + GGAM``: the default training loss, the Grad-CAM weights detached (one extra backward
  from the logits down to the feature map);
- ``CE + GGAM, second order``: ``detach=False``, the gradient differentiated through.

    .venv/bin/python benchmarks/ggam_speed.py [--size 128] [--batch-size 16] [--steps 12]

The goal of issue 8: the Grad-CAM branch costs under 25% of a training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from camlens.ggam import ggam_efficientnet_lite0, ggam_training_loss, label_gradcam_weights


def step(model, optimiser, images, labels, variant: str) -> None:
    optimiser.zero_grad(set_to_none=True)
    result = model.attend(images)
    if variant == "CE":
        loss = F.cross_entropy(result.logits, labels)
    else:
        loss = ggam_training_loss(result, labels, lam=1.0, detach=variant == "CE + GGAM").total
    loss.backward()
    optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="input side in pixels (the GGAM data set's is 128)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--classes", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ggam_efficientnet_lite0(args.classes, pretrained=False).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    labels = torch.arange(args.batch_size) % args.classes
    variants = ["CE", "CE + GGAM", "CE + GGAM, second order"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for variant in variants:  # warm-up
        step(model, optimiser, images, labels, variant)
    branch_times: list[float] = []
    for _ in range(args.steps):
        for variant in variants:
            start = time.perf_counter()
            step(model, optimiser, images, labels, variant)
            times[variant].append(time.perf_counter() - start)
        # The Grad-CAM branch alone, on a forward's result: whole steps differ by less than the
        # machine's noise, so it is timed by itself too.
        result = model.attend(images)
        start = time.perf_counter()
        label_gradcam_weights(result, labels)
        branch_times.append(time.perf_counter() - start)
        del result

    base = statistics.median(times["CE"])
    print(f"EfficientNet-Lite0 + GGAM, {args.size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps each, run in turn")
    print(f"{'training step':<26} {'s / step':>9} {'images / s':>11} {'vs CE':>7}")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"{variant:<26} {median:>9.4f} {args.batch_size / median:>11.1f} {median / base:>6.3f}x")
    alone = statistics.median(branch_times)
    verdict = "PASS" if alone / base < 0.25 else "FAIL"
    print(f"Grad-CAM branch timed alone: {alone:.4f} s = {100 * alone / base:.1f}% of a CE training step "
          f"(goal < 25%): {verdict}; whole steps: CE + GGAM {100 * (statistics.median(times['CE + GGAM']) / base - 1):+.1f}%")


if __name__ == "__main__":
    main()
