"""Build a small labelled evaluation set from the sample photos: crops and flips of each.

Four photos are too few for stable means, so each gives eight views: the photo, its mirror
image, four corner crops and a centre crop (each 80% / 70% of the side) and the centre crop's
mirror image. Labels are the ImageNet classes closest to what each photo shows (ImageNet has no
rocket class: a Falcon 9 launch is labelled "missile", class 657; its folder is named by that
index because "missile" is also a synonym of class 744, projectile). The set is written as
class folders:

    .venv/bin/python benchmarks/sample_dataset.py eval-data
    .venv/bin/camlens evaluate eval-data --out eval-out
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
LABELS = {"chelsea.png": "tabby", "coffee.png": "espresso", "rocket.jpg": "657", "cameraman.png": "tripod"}


def views(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    w, h = round(width * 0.8), round(height * 0.8)
    corners = {"top-left": (0, 0), "top-right": (width - w, 0), "bottom-left": (0, height - h),
               "bottom-right": (width - w, height - h)}
    cw, ch = round(width * 0.7), round(height * 0.7)
    centre = image.crop(((width - cw) // 2, (height - ch) // 2, (width - cw) // 2 + cw, (height - ch) // 2 + ch))
    result = {"full": image, "mirror": ImageOps.mirror(image), "centre": centre, "centre-mirror": ImageOps.mirror(centre)}
    result.update({name: image.crop((x, y, x + w, y + h)) for name, (x, y) in corners.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    for name, label in LABELS.items():
        folder = args.out / label
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(SAMPLES / name).convert("RGB")
        for view, picture in views(image).items():
            picture.save(folder / f"{Path(name).stem}-{view}.png")
    print(f"wrote {sum(1 for _ in args.out.rglob('*.png'))} images to {args.out}")


if __name__ == "__main__":
    main()
