"""The GGAM ablation on the generated fine-grained data: which parts of the module help?

Configurations (the paper's ablation, on the embedded pretrained EfficientNet-Lite0):
backbone only (no attention), channel attention, spatial attention, channel + spatial, and
channel + spatial + the GGAM loss at each --lambdas value; each trained with --seeds seeds.
Every run is ``camlens.ggam.train_ggam`` with the backbone frozen (the head trains on feature
maps computed once and shared by all runs: fine-tuning 27+ runs does not fit in half an hour
on 2 CPU cores) and ``keep="last"``: the held-out test split validates but never chooses the
model, so the figures are those of the last epoch, not a selection on the test set.

Reported per configuration, mean and sample standard deviation over the seeds: held-out
accuracy, the Grad-CAM (true class) energy-based pointing game on the part box, and the last
epoch's mean L_GGAM. The energy a uniform map would get (the mean share of the image the box
covers) is printed as the chance level of the pointing game.

    .venv/bin/python benchmarks/ggam_dataset.py ggam-data --size 224
    .venv/bin/python benchmarks/ggam_experiment.py ggam-data --out ggam-experiment

writes ggam-experiment/<config>-seed<k>/ (each a run folder ``camlens explain --model`` loads),
results.json and results.md (the table). An existing --out is refused: results are never mixed
with an earlier run's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from camlens.errors import CamlensError
from camlens.ggam import train_ggam
from camlens.models import LITE_MEAN, LITE_STD, Preprocess


def configurations(lambdas: list[float]) -> list[tuple[str, str, float]]:
    """(name, attention, lambda) of each configuration, in the table's order."""
    return [("backbone only", "none", 0.0), ("channel", "channel", 0.0), ("spatial", "spatial", 0.0),
            ("channel + spatial", "both", 0.0),
            *((f"channel + spatial + GGAM loss, lambda {lam:g}", "both", lam) for lam in lambdas)]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def box_share(split: Path, size: int) -> float:
    """Mean share of the image its part box covers: the energy of a uniform map."""
    with (split / "boxes.csv").open(newline="") as handle:
        rows = [row for row in csv.reader(handle)][1:]
    return statistics.fmean((float(r[3]) - float(r[1])) * (float(r[4]) - float(r[2])) / size ** 2 for r in rows)


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the generated dataset (ggam_dataset.py OUT): train/, test/")
    parser.add_argument("--out", type=Path, default=Path("ggam-experiment"), help="a new folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (default 1e-3)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    parser.add_argument("--fine-tune", action="store_true",
                        help="train the backbone too, as the paper does (about 200 times the time of a run on a CPU)")
    args = parser.parse_args()
    train, test = args.data / "train", args.data / "test"
    if not (train / "boxes.csv").is_file() or not (test / "boxes.csv").is_file():
        parser.error(f"{args.data}: not a dataset from ggam_dataset.py (train/ and test/ with boxes.csv)")
    if args.out.exists():
        parser.error(f"{args.out}: exists; give a new folder (results are never mixed with an earlier run's)")
    if args.seeds < 1 or args.epochs < 1 or not 0 < args.lr < math.inf \
            or not all(0 <= lam < math.inf for lam in args.lambdas):
        parser.error("--seeds and --epochs must be at least 1, --lr a finite number above 0, --lambdas finite, 0 or more")
    if len(set(args.lambdas)) != len(args.lambdas):
        parser.error("--lambdas: each value once")
    images = sorted(test.glob("*/*.png"))
    if not images:
        parser.error(f"{test}: no images (class folders of .png files)")
    with Image.open(images[0]) as image:
        size = image.size[0]
    preprocess = Preprocess(size=size, resize=size, mean=LITE_MEAN, std=LITE_STD)
    configs = configurations(args.lambdas)
    cache: dict = {}
    rows: list[dict] = []
    start = time.perf_counter()
    total = len(configs) * args.seeds
    for seed in range(args.seeds):
        for name, attention, lam in configs:
            run_start = time.perf_counter()
            folder = args.out / f"{slug(name)}-seed{seed}"
            try:
                result = train_ggam(train, folder, val_data=test, val_boxes=test / "boxes.csv", attention=attention,
                                    lam=lam, epochs=args.epochs, lr=args.lr, seed=seed, preprocess=preprocess,
                                    freeze_backbone=not args.fine_tune, feature_cache=cache, keep="last")
            except CamlensError as error:
                print(f"ggam_experiment: error: {error}", file=sys.stderr)
                return 1
            last = result.history[-1]
            rows.append({"config": name, "attention": attention, "lambda": lam, "seed": seed,
                         "accuracy": last["val_accuracy"], "energy": result.localisation["energy pointing game"],
                         "blank maps": result.localisation["blank maps"], "L_GGAM": last["train_ggam"],
                         "seconds": time.perf_counter() - run_start})
            print(f"[{len(rows)}/{total}] seed {seed}, {name}: accuracy {last['val_accuracy']:.1%}, "
                  f"energy {rows[-1]['energy']:.3f}, L_GGAM {last['train_ggam']:.4f} "
                  f"({rows[-1]['seconds']:.0f} s; {time.perf_counter() - start:.0f} s in all)", flush=True)
    chance = box_share(test, size)
    table = [
        "| configuration | held-out accuracy | energy pointing game | L_GGAM (last epoch) |",
        "|---|---|---|---|",
    ]
    summary = []
    for name, attention, lam in configs:
        mine = [r for r in rows if r["config"] == name]
        accuracy, energy, ggam = (spread([r[key] for r in mine]) for key in ("accuracy", "energy", "L_GGAM"))
        summary.append({"config": name, "accuracy": accuracy, "energy": energy, "L_GGAM": ggam})
        if args.seeds > 1:
            table.append(f"| {name} | {accuracy[0]:.1%} ± {accuracy[1]:.1%} | {energy[0]:.3f} ± {energy[1]:.3f} "
                         f"| {ggam[0]:.4f} |")
        else:  # no spread from one seed
            table.append(f"| {name} | {accuracy[0]:.1%} | {energy[0]:.3f} | {ggam[0]:.4f} |")
    seconds = time.perf_counter() - start
    over = f"Mean ± sample standard deviation over {args.seeds} seeds" if args.seeds > 1 else "One seed"
    table += ["", f"{over}; {args.epochs} epochs, lr {args.lr:g}, "
              f"{'fine-tuned' if args.fine_tune else 'frozen'} backbone, the last epoch's model. Energy of a uniform map (the box's share of the "
              f"image): {chance:.3f}. {len(rows)} runs in {seconds / 60:.1f} min."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"settings": {**vars(args), "data": str(args.data), "out": str(args.out), "input size": size},
         "runs": rows, "summary": summary, "uniform map energy": chance, "seconds": seconds}, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
