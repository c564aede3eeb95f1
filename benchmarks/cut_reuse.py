"""Ablation-CAM and Recipro-CAM with the cut of the model at the target layer reused from the
previous call (the default) against cut afresh on every call: medians of interleaved calls on
the embedded model, one photo-sized random input, layer ``features``.

    .venv/bin/python benchmarks/cut_reuse.py [--threads 1] [--calls 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import camlens
import camlens.methods.gradient_free as gradient_free
from camlens.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("efficientnet_lite0").module.eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    reuse = gradient_free.remembered_cut
    for name in ("ablationcam", "reciprocam"):
        method = camlens.methods.METHODS[name](model, "features")
        method(x)  # warm-up; remembers the cut
        times: dict[str, list[float]] = {"reused": [], "fresh": []}
        for _ in range(args.calls):
            for mode in times:
                gradient_free.remembered_cut = reuse if mode == "reused" else (lambda *args: None)
                start = time.perf_counter()
                method(x)
                times[mode].append(time.perf_counter() - start)
        gradient_free.remembered_cut = reuse
        reused, fresh = statistics.median(times["reused"]), statistics.median(times["fresh"])
        print(f"{name}: cut reused {reused * 1000:.1f} ms, cut afresh {fresh * 1000:.1f} ms per call: "
              f"{fresh / reused:.2f} x")


if __name__ == "__main__":
    main()
