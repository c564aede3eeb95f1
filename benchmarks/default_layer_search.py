"""The default-layer search on a ViT-B/16-sized transformers model (random weights, 224x224,
12 blocks of 768): ``camlens.explain(model, images, "gradcam")`` with no layer given against the
same call with the layer and its layout given, after the first call (which searches, once per
model and image size), as medians of interleaved calls. Needs transformers (the dev extra).

    .venv/bin/python benchmarks/default_layer_search.py [--threads 2] [--calls 7] [--images 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import camlens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    import transformers

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    images = torch.randn(args.images, 3, 224, 224)
    start = time.perf_counter()
    first = camlens.explain(model, images, "gradcam")
    first_seconds = time.perf_counter() - start
    layer, layout = first.target_layers[0], first.options["reshape"]
    named = camlens.explain(model, images, "gradcam", target_layer=layer, reshape=layout)
    assert torch.equal(first.maps, named.maps)
    times: dict[str, list[float]] = {"default": [], "named": []}
    for _ in range(args.calls):
        for mode in times:
            options = {} if mode == "default" else {"target_layer": layer, "reshape": layout}
            start = time.perf_counter()
            camlens.explain(model, images, "gradcam", **options)
            times[mode].append(time.perf_counter() - start)
    default, given = statistics.median(times["default"]), statistics.median(times["named"])
    print(f"ViT-B/16 config, {args.images} images 224x224, {args.threads} threads, {args.calls} interleaved calls each")
    print(f"default layer found: {layer} ({layout})")
    print(f"first call (searches): {first_seconds:.2f} s")
    print(f"later calls, no layer given: median {default:.3f} s (min {min(times['default']):.3f}, "
          f"max {max(times['default']):.3f})")
    print(f"later calls, layer given:    median {given:.3f} s (min {min(times['named']):.3f}, "
          f"max {max(times['named']):.3f})")
    print(f"ratio no layer / layer given: {default / given:.3f}")


if __name__ == "__main__":
    main()
