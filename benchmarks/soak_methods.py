"""Soak every method: resident memory over 2,000 ``camlens.explain`` calls of each, in one process.

``soak.py`` soaks one method on the embedded model; this one soaks all of them, on a small CNN
(three convolutions with batch norm, global pooling, a linear head; 32x32 inputs), so that 2,000
calls of each of the 16 methods fit in a few minutes. Every call goes through
``camlens.explain`` (a new method object each time, the default layer found on the way), which
is how a leak per method object shows: torch.fx's generated source, kept per traced model by
torch and never dropped, grew Ablation-CAM and Recipro-CAM by 1 to 2 KB a call (+13 MB over
2,000 calls) until camlens forgot it with the model's cut.

For each method: the held RSS (after ``gc.collect()`` and ``malloc_trim``, see ``soak.py``) every
``--every`` (100) calls after ``--warmup`` (500) calls, up to ``--calls`` (2,000). The allocator
takes memory in steps of about 5 MiB that come and go with no trend, so the growth judged is the
median of the last third of those readings less the median of the first third: a leak of 1 KB a
call shows as about 1 MiB over 2,000 calls, one step of the allocator not at all. PASS when that
is within ``--tolerance`` MiB (default 1) and torch.fx's source cache and ``linecache`` did not
grow at all.

Run::

    .venv/bin/python benchmarks/soak_methods.py                    # 16 methods x 2,000 calls
    .venv/bin/python benchmarks/soak_methods.py --method ablationcam --calls 5000
"""

from __future__ import annotations

import argparse
import gc
import linecache
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.fx.graph_module import _loader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from camlens.methods import METHODS  # noqa: E402
from soak import held_rss_mib  # noqa: E402

OPTIONS = {"gradcam++-general": {"score": "exp"}, "sscam": {"seed": 0}}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", choices=sorted(METHODS), help="a method (repeatable; default: all)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=1.0, help="MiB of growth allowed after the warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = small_cnn()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    failed = 0
    print(f"{'method':20} {'calls':>6} {'s/call':>7} {'held MiB: first third':>22} {'last third':>11} "
          f"{'growth':>7} {'fx sources':>11} {'linecache':>10}  verdict")
    for name in args.method or sorted(METHODS):
        options = OPTIONS.get(name, {})
        for _ in range(args.warmup):
            camlens.explain(model, images, name, **options)
        gc.collect()
        sources, lines = len(_loader.eval_cache), len(linecache.cache)
        readings, seconds = [], 0.0
        for done in range(args.warmup, args.calls, args.every):
            start = time.perf_counter()
            for _ in range(min(args.every, args.calls - done)):
                camlens.explain(model, images, name, **options)
            seconds += time.perf_counter() - start
            readings.append(held_rss_mib())
        third = max(1, len(readings) // 3)
        first, last = statistics.median(readings[:third]), statistics.median(readings[-third:])
        gc.collect()
        grown_sources, grown_lines = len(_loader.eval_cache) - sources, len(linecache.cache) - lines
        ok = last - first <= args.tolerance and grown_sources <= 0 and grown_lines <= 0
        failed += not ok
        print(f"{name:20} {args.calls:>6} {seconds / (args.calls - args.warmup):>7.4f} {first:>22.1f} {last:>11.1f} "
              f"{last - first:>+7.2f} {grown_sources:>+11d} {grown_lines:>+10d}  {'PASS' if ok else 'FAIL'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
