"""Peak memory of reading a training set for ``train-ggam``: streamed batch by batch (``ImageFiles``,
what train-ggam does) against every image preprocessed into one tensor (what it did before),
for two sizes of the set. Each reading runs in a fresh process (its peak resident memory, from
``getrusage``); noise photos of 320 x 240 pixels, the embedded model's preprocessing (224 x 224).

    .venv/bin/python benchmarks/ggam_memory.py            # 200 and 800 images
    .venv/bin/python benchmarks/ggam_memory.py --sizes 100 400 1600
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

READ = """
import resource, sys, torch
from pathlib import Path
from camlens.datasets import Sample
from camlens.ggam.train import ImageFiles, _in_order
from camlens.models import load_model

files = sorted(Path(sys.argv[1]).glob("*.png"))[: int(sys.argv[2])]
preprocess = load_model("efficientnet_lite0").preprocess
images = ImageFiles([Sample(path, 0) for path in files], preprocess)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "streamed":
    total = sum(float(batch.sum()) for batch in images.batches(_in_order(len(images), 32), 0))
else:
    whole = images[:]
    total = float(whole.sum())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="camlens-ggam-memory-") as folder:
        rng = np.random.default_rng(0)
        for i in range(max(args.sizes)):
            Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(Path(folder) / f"{i:05}.png")
        print("images | streamed (batches of 32) | all in one tensor | the tensor itself")
        for size in args.sizes:
            grown = {}
            for how in ("streamed", "whole"):
                out = subprocess.run([sys.executable, "-c", READ, folder, str(size), how], capture_output=True,
                                     text=True, check=True).stdout
                grown[how] = int(out.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
            tensor = size * 3 * 224 * 224 * 4 / 2**20
            print(f"{size:6} | {grown['streamed']:8.0f} MiB more at peak | {grown['whole']:8.0f} MiB more at peak "
                  f"| {tensor:6.0f} MiB")


if __name__ == "__main__":
    main()
