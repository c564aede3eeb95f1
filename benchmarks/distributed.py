"""``camlens evaluate`` on one process against the same run under ``torchrun`` (docs/distributed.md).

On a machine of C cores, one process of C threads (PyTorch's default) against C processes of one
thread each, on the same images, methods and metrics, into fresh folders: wall time of the whole
command (start-up included: each process loads the model), and whether the two summaries agree
(the same n, means equal to 1e-6). Both run in turn, never at once; say whether the machine was
otherwise idle.

    .venv/bin/python benchmarks/distributed.py                 # 16 sample views, Grad-CAM and Score-CAM
    .venv/bin/python benchmarks/distributed.py --images 32 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds


def largest_difference(one: dict, other: dict) -> float:
    """The largest difference of two means of the summaries (inf where an n differs)."""
    largest = 0.0
    for method, metrics in one["summary"].items():
        for metric, value in metrics.items():
            theirs = other["summary"][method][metric]
            if value["n"] != theirs["n"] or (value["mean"] is None) != (theirs["mean"] is None):
                return float("inf")
            if value["mean"] is not None:
                largest = max(largest, abs(value["mean"] - theirs["mean"]))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="sample views evaluated (at most 32)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--methods", default="gradcam,scorecam")
    parser.add_argument("--top-channels", default="32", help="Score-CAM's channels (keeps the run short)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="camlens-distributed-"))
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_dataset.py"), str(work / "data")],
                       check=True, capture_output=True)
        methods = [flag for name in args.methods.split(",") for flag in ("-m", name)]
        common = ["evaluate", str(work / "data"), *methods, "--top-channels", args.top_channels,
                  "--limit", str(args.images), "--yes"]
        single = run([str(BIN / "camlens"), *common, "--out", str(work / "one")], args.processes)
        several = run([str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={args.processes}", "-m", "camlens",
                       *common, "--out", str(work / "several")], 1)
        one = json.loads((work / "one" / "summary.json").read_text())
        other = json.loads((work / "several" / "summary.json").read_text())
        print(f"{args.images} images x {len(methods) // 2} methods ({args.methods}), the embedded model, "
              f"{os.cpu_count()} cores")
        print(f"1 process of {args.processes} threads:   {single:7.1f} s")
        print(f"{args.processes} processes of 1 thread: {several:7.1f} s   ({single / several:.2f}x)")
        print(f"the same n, means apart by at most {largest_difference(one, other):.2g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
