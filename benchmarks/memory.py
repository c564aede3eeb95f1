"""Score-CAM's peak memory as the target layer's channel count K grows.

Score-CAM forwards one masked copy of the image per channel. camlens builds and forwards the
masked inputs ``batch_size`` at a time, so its peak memory should not depend on K (building
every mask at once would take K x 3 x 224 x 224 x 4 bytes: 1.1 GiB for K = 2048).

For each K (default 64, 256, 1024, 2048) a fresh Python process (``sys.executable``) builds
:func:`models.channel_net` (five stride-2 convolutions to 7 x 7, then a 1x1 convolution to K
channels: the target layer, ReLU, GAP, linear) and a 1 x 3 x 224 x 224 input, and reports the
process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

1. after the model and the input are created (``setup``);
2. after a plain forward under ``torch.no_grad()`` (``forward``);
3. after ``camlens.ScoreCAM(model, target_layer="target", batch_size=B)(x)`` (``scorecam``).
   For small K the call is repeated until about ``--min-masked`` (2048) masked inputs were
   forwarded: glibc's high-water mark creeps up by a few tens of MiB over the first few dozen
   chunks whatever K is, and a 2-chunk run (K = 64) would otherwise read anywhere between
   ~100 and ~150 MiB from one run to the next.

The increment ``scorecam - forward`` is what Score-CAM adds to the peak. For reference a
second fresh process per K runs, instead of Score-CAM, one plain forward of a batch of B
random images (``batch B``): the model's own memory for one chunk. Part of Score-CAM's
increment does grow with K, and legitimately: the model's own K x 7 x 7 outputs for a chunk
(conv and ReLU, 2 x B x K x 49 x 4 bytes: 24.5 MiB for B = 32, K = 2048).

PASS when the largest K's increment is at most 1.5 x the smallest K's increment + 20 MiB.

Run (``make bench`` runs ``benchmarks/latency.py``, then this)::

    .venv/bin/python benchmarks/memory.py                     # about 30 seconds on 2 cores
    .venv/bin/python benchmarks/memory.py --channels 64,512,4096 --batch-size 16 --json m.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MASK_BYTES_PER_CHANNEL = 3 * 224 * 224 * 4  # one float32 masked copy of a 3 x 224 x 224 image


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", default="64,256,1024,2048", help="values of K, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="Score-CAM batch_size")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--min-masked",
        type=int,
        default=2048,
        help="repeat Score-CAM for small K until about this many masked inputs were forwarded",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the batch-forward reference")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    # Internal: run one configuration in this (fresh) process and print its result as JSON.
    parser.add_argument("--child", choices=("scorecam", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one configuration, in a fresh process -----------------------------------------------------
def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import camlens
    from models import channel_net

    torch.set_num_threads(args.threads)
    model = channel_net(args.k)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    result = {"k": args.k, "mode": args.child, "setup_mib": peak_rss_mib()}

    with torch.no_grad():
        model(x)
    result["forward_mib"] = peak_rss_mib()

    if args.child == "scorecam":
        explainer = camlens.ScoreCAM(model, target_layer="target", batch_size=args.batch_size)
        # Repeat the call for small K so that every configuration forwards about the same number
        # of masked inputs: the allocator's high-water mark creeps up over the first few dozen
        # chunks whatever K is, and that creep must not be mistaken for growth with K.
        calls = max(1, math.ceil(args.min_masked / args.k))
        start = time.perf_counter()
        for _ in range(calls):
            explanation = explainer(x)
        result["seconds"] = (time.perf_counter() - start) / calls
        result["calls"] = calls
        assert explanation.maps.shape == (1, 1, args.size, args.size)
        result["non_constant"] = non_constant_channels(model, x)
    else:
        batch = torch.randn(args.batch_size, 3, args.size, args.size)
        start = time.perf_counter()
        with torch.no_grad():
            model(batch)
        result["seconds"] = time.perf_counter() - start
    result["after_mib"] = peak_rss_mib()
    result["increment_mib"] = result["after_mib"] - result["forward_mib"]
    return result


def non_constant_channels(model, x) -> int:
    """Channels of ``model.target`` whose 7 x 7 map is not constant (max != min) for ``x``."""
    import torch

    captured = {}
    handle = model.target.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    flat = captured["a"].flatten(2)
    return int((flat.amax(-1) != flat.amin(-1)).sum())


def spawn(args: argparse.Namespace, mode: str, k: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child", mode,
        "--k", str(k),
        "--batch-size", str(args.batch_size),
        "--size", str(args.size),
        "--threads", str(args.threads),
        "--min-masked", str(args.min_masked),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} K={k} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the whole benchmark -----------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    ks = sorted(int(k) for k in args.channels.split(",") if k.strip())
    rows = []
    for k in ks:
        row = {"k": k, "scorecam": spawn(args, "scorecam", k)}
        if not args.no_reference:
            row["reference"] = spawn(args, "reference", k)
        rows.append(row)
        s = row["scorecam"]
        print(
            f"  K={k:<5} Score-CAM +{s['increment_mib']:.1f} MiB, {s['calls']} call(s) of {s['seconds']:.2f} s",
            flush=True,
        )

    print()
    print(
        f"channel_net, input 1x3x{args.size}x{args.size}, target 'target' (K x 7 x 7), "
        f"Score-CAM batch_size={args.batch_size}, {args.threads} threads; peak RSS in MiB"
    )
    header = (
        f"{'K':>6} {'non-const':>9} {'setup':>8} {'forward':>8} {'scorecam':>9} "
        f"{'increment':>10} {f'batch {args.batch_size}':>9} {'all masks':>10} {'calls':>6} {'s/call':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["scorecam"]
        reference = f"{row['reference']['increment_mib']:9.1f}" if "reference" in row else f"{'-':>9}"
        all_masks = row["k"] * MASK_BYTES_PER_CHANNEL * (args.size / 224) ** 2 / 2**20
        print(
            f"{row['k']:>6} {s['non_constant']:>9} {s['setup_mib']:8.1f} {s['forward_mib']:8.1f} "
            f"{s['after_mib']:9.1f} {s['increment_mib']:10.1f} {reference} {all_masks:10.0f} "
            f"{s['calls']:6d} {s['seconds']:7.2f}"
        )
    print(
        "increment = scorecam - forward (what Score-CAM adds to the peak); batch "
        f"{args.batch_size} = the same increment for one plain forward of {args.batch_size} images; "
        "all masks = what building every masked input at once would take; calls = Score-CAM "
        f"calls in the process (repeated for small K so that each forwards >= {args.min_masked} "
        "masked inputs)"
    )

    smallest = rows[0]["scorecam"]["increment_mib"]
    largest = rows[-1]["scorecam"]["increment_mib"]
    limit = 1.5 * smallest + 20
    passed = largest <= limit
    print()
    print(
        f"{'PASS' if passed else 'FAIL'}  Score-CAM peak increment flat in K: "
        f"K={rows[-1]['k']} +{largest:.1f} MiB <= 1.5 x (K={rows[0]['k']} +{smallest:.1f} MiB) + 20 "
        f"= {limit:.1f} MiB"
    )
    return {
        "config": {"batch_size": args.batch_size, "size": args.size, "threads": args.threads},
        "rows": rows,
        "goal": {"largest_mib": largest, "limit_mib": limit, "pass": passed},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    report = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
