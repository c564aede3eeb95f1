"""How big the HTML report of an explain run gets: N images (random crops of the sample photos,
some mirrored), the fast methods, then `camlens report`; prints the file size and its parts.

    .venv/bin/python benchmarks/report_size.py --images 100 --out /tmp/report-size

Score-CAM and the other slow methods make maps of the same size as the fast ones, so the size
does not depend on which methods run, only on how many (and how many of their maps coincide:
CAM's equal Grad-CAM's on the embedded model's default layer, and are stored once).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.iterdir()) if p.suffix in (".png", ".jpg")]
    folder.mkdir(parents=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.uniform(0.55, 0.95)
        w, h = round(photo.width * side), round(photo.height * side)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        view = photo.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        view.save(folder / f"view-{index:03d}.jpg", quality=92)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("report-size"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    make_images(args.out / "images", args.images)
    camlens = [sys.executable, "-m", "camlens"]
    start = time.perf_counter()
    command = [*camlens, "explain", str(args.out / "images"), "--out", str(args.out / "run"), "--threads", "2"]
    for method in METHODS:
        command += ["-m", method]
    subprocess.run(command, check=True, capture_output=True)
    explained = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*camlens, "report", str(args.out / "run")], check=True)
    reported = time.perf_counter() - start
    text = (args.out / "run" / "report.html").read_text(encoding="utf-8")
    begin = text.index('id="camlens-images">') + len('id="camlens-images">')
    store = json.loads(text[begin:text.index("</script>", begin)])
    photos = sum(len(v) for k, v in store.items())
    print(f"{args.images} images x {len(METHODS)} methods: report {len(text.encode()) / 1e6:.2f} MB, "
          f"{len(store)} pictures ({photos / 1e6:.2f} MB of them as base64 data), "
          f"{len(text.encode()) / args.images / 1e3:.1f} KB per image; explain {explained:.0f} s, report {reported:.1f} s")


if __name__ == "__main__":
    main()
