"""Signals and volumes (docs/models.md, "Signals, volumes and clips"): camlens's batched Score-CAM,
at batch sizes 16 (the default), 4 and 1, against a plain loop that forwards one masked input at
a time (the same maps, checked), and
Grad-CAM's time per input, on a Conv1d model of ECG-like signals and a Conv3d model of CT-like
volumes with random weights. Times are medians of repeats in one run; say whether the machine
was otherwise idle.

    .venv/bin/python benchmarks/nd_inputs.py
    .venv/bin/python benchmarks/nd_inputs.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import camlens


def signal_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(12, 32, 7, padding=3), nn.ReLU(), nn.Conv1d(32, 64, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(64, 64, 5, stride=2, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 5),
    ).eval()


def volume_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv3d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 2),
    ).eval()


def plain_scorecam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Score-CAM one masked input at a time: w_k = softmax(f(X * s(Up(A^k))))_c."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    a, top = seen["a"], logits.argmax(dim=1)
    mode = {3: "linear", 5: "trilinear"}[x.dim()]
    maps = []
    for n in range(x.shape[0]):
        weights = []
        for k in range(a.shape[1]):
            up = F.interpolate(a[n:n + 1, k:k + 1], size=x.shape[2:], mode=mode, align_corners=False)
            low, high = up.min(), up.max()
            mask = torch.zeros_like(up) if high - low <= 0 else (up - low) / (high - low)
            with torch.no_grad():
                weights.append(model(x[n:n + 1] * mask).softmax(dim=1)[0, top[n]])
        raw = torch.relu((torch.stack(weights).view(-1, *(1,) * (a.dim() - 2)) * a[n]).sum(dim=0))
        up = F.interpolate(raw[None, None], size=x.shape[2:], mode=mode, align_corners=False)[0, 0]
        maps.append((up - up.min()) / (up.max() - up.min()))
    return torch.stack(maps)


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [
        ("signals 4 x 12 x 2000 (Conv1d)", signal_model(), torch.randn(4, 12, 2000)),
        ("volumes 2 x 1 x 32 x 64 x 64 (Conv3d)", volume_model(), torch.randn(2, 1, 32, 64, 64)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats}")
    for title, model, x in cases:
        layer = model[5]  # the last ReLU before the pooling
        per = x.shape[0]
        plain_seconds, plain = timed(lambda: plain_scorecam(model, layer, x), args.repeats)
        parts = []
        for batch_size in (16, 4, 1):  # 16: the default
            scorecam = camlens.ScoreCAM(model, layer, batch_size=batch_size)
            seconds, explanation = timed(lambda: scorecam(x), args.repeats)
            difference = float((explanation.maps[:, 0] - plain).abs().max())
            parts.append(f"batch {batch_size} {seconds / per * 1000:.0f} ms ({plain_seconds / seconds:.2f}x the loop, "
                         f"maps within {difference:.0e})")
        gradcam_seconds, _ = timed(lambda: camlens.GradCAM(model, layer)(x), args.repeats)
        print(f"{title}: Score-CAM per input: plain loop {plain_seconds / per * 1000:.0f} ms; camlens "
              f"{'; '.join(parts)}. Grad-CAM {gradcam_seconds / per * 1000:.1f} ms per input")


if __name__ == "__main__":
    main()
