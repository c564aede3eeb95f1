"""camlens side by side with TorchCAM and pytorch-grad-cam: same model, same input, same maps.

For the embedded EfficientNet-Lite0, a real photo (224 x 224 after its preprocessing) and the
final feature map (``features``, 1280 x 7 x 7) given as the target layer, at batch 1 and 8,
every method that camlens and a peer both have is computed by both, the libraries alternating
run by run. Each pair first checks that the maps agree, camlens set to the peer's variant, and
prints the largest absolute difference: a timing of different maps gets no verdict. Then the
medians, their ratio (peer / camlens) and a verdict against the goals of issue 9:

    Grad-CAM, layer given    >= 1.5 x TorchCAM, >= 3 x pytorch-grad-cam
    Grad-CAM++               >= 1.5 x TorchCAM, >= 3 x pytorch-grad-cam
    Smooth Grad-CAM++, 8     >= 2 x TorchCAM
    Score-CAM, 1280 ch       >= 4 x TorchCAM, >= 4 x pytorch-grad-cam

How camlens is set to each peer's variant (the table's "camlens variant" column):
- Grad-CAM: camlens as shipped; both peers compute the same map.
- CAM (TorchCAM only; no goal): camlens as shipped. TorchCAM 0.5.0's CAM leaves out the ReLU of
  the paper (and of its own docstring), so its unnormalised map goes through a ReLU and TorchCAM's
  normalisation, inside its timing; otherwise the maps differ wherever a class map has negative
  values.
- Grad-CAM++: TorchCAM 0.5.0 divides its alpha in place on a masked copy, so the division is
  lost and its weights are sum g^2 ReLU(g); pytorch-grad-cam adds 1e-6 to alpha's denominator,
  which is not small beside g^2 at this layer. Neither is reachable through camlens's options,
  so a subclass below puts the peer's formula into camlens's ``weigh`` step ("engine + peer's
  formula"): the maps agree, and what is timed is camlens's engine (capture, gradients, maps).
- Smooth Grad-CAM++ (TorchCAM only): TorchCAM adds N(0, 0.3^2) noise in input units, drawn from
  torch's global generator one copy at a time, uses E[g^2] / (2 E[g^2] + sum E[g^3] A), multiplies
  by the ReLU of the *last* copy's gradient and draws the map from the last copy's activation. A
  subclass below does the same on camlens's engine, with the same noise. camlens's own Smooth
  Grad-CAM++ (the paper's formula, noise 0.15 of the value range) is timed beside it for
  information, without a verdict: its maps differ.
- Score-CAM: camlens with ``score="logit", channel_softmax=True``, both peers' variant (their
  baselines do not change a softmax). Their masks are not the paper's s(Up(A)) that camlens
  computes: TorchCAM normalises each channel at layer resolution and then upsamples,
  pytorch-grad-cam upsamples with ``align_corners=True`` (the maps then differ by about 1e-3
  and 4e-2 on the default photo), so a subclass below gives camlens's engine the peer's masks
  and changes nothing else ("engine + peer's masks").

Fairness: each library builds its extractor (hooks on) before its run and removes it after,
outside the timing, so no library runs with another's hooks (camlens's method objects hold no
hooks between calls: each is built once and reused, as an application would, and with the
inference copy it keeps the copy made at its first call), and the model's gradients are
cleared between runs. What is timed is what a user runs per batch: for TorchCAM the caller's own
forward (with autograd for Grad-CAM and Grad-CAM++, as its documentation shows; without for
CAM, Smooth Grad-CAM++ and Score-CAM, whose extractors do their own forwards) and the
extractor's call. TorchCAM returns maps at layer resolution (7 x 7); camlens and
pytorch-grad-cam also upsample to 224 x 224, inside their timings. The order of the libraries
rotates from run to run; warm-up runs come first (Score-CAM's minute-long runs need none: its
agreement run is its first timed run); torch's thread count is pinned (``--threads``) and idle
OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, see below). The "load" column is the mean
number of cores that *other* processes kept busy meanwhile: on a shared machine the absolute
times move with it, the ratios of alternated runs much less. Peer methods that camlens lacks
(LayerCAM, XGrad-CAM, ...) are left out.

The peers are an optional extra, never a camlens dependency:

    .venv/bin/pip install -c constraints.txt -e ".[dev,peers]"    # TorchCAM 0.5.0, no torchvision
    .venv/bin/pip install --no-deps grad-cam==1.5.7 ttach tqdm opencv-python-headless

pytorch-grad-cam declares torchvision and scikit-learn, but its CAM methods use neither: installed
with ``--no-deps``, it imports here because this script puts stand-in modules for the two into
``sys.modules`` of its own process (only where they are missing). A peer that cannot be imported
is skipped, and the plan says so.

Run (the plan and an estimate at the machine's current speed are printed first; the default
took 20 minutes on the project's 2 cores while other work kept one of them busy, half of it
Score-CAM and a quarter Smooth Grad-CAM++ at batch 8):

    .venv/bin/python benchmarks/compare.py
    .venv/bin/python benchmarks/compare.py --methods gradcam gradcam++ --repeats 50
    .venv/bin/python benchmarks/compare.py --methods scorecam --score-cam-batch-sizes 8   # opt-in: hours
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

# Before tqdm is imported (by pytorch-grad-cam): no progress bars inside the timings.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Before torch starts OpenMP: idle threads sleep instead of spinning. With one of the 2 cores
# taken by another process, camlens's and pytorch-grad-cam's Grad-CAM took 28 and 92 ms with one
# thread, 0.1 and 2.8 s (erratically) with two spinning threads, 40 and 152 ms with two sleeping.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.distributions import Normal  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import camlens  # noqa: E402
from camlens.methods import CAM, GradCAM, GradCAMPlusPlus, ScoreCAM, SmoothGradCAMPlusPlus  # noqa: E402
from camlens.methods.base import hooked  # noqa: E402
from timing import CONTENTION_LIMIT, CpuMonitor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYER, FC = "features", "_fc"  # the embedded model's final feature map and classifier
TOLERANCE = 2e-3  # the largest |difference| of two maps in [0, 1] that is the same map (issue 9)
SMOOTH_SAMPLES = 8
TORCHCAM_SMOOTH_STD = 0.3  # TorchCAM's default
TORCHCAM, PGC = "torchcam", "pgc"
METHODS = ("cam", "gradcam", "gradcam++", "smoothgradcam++", "scorecam")
TITLES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM, layer given",
    "gradcam++": "Grad-CAM++",
    "smoothgradcam++": f"Smooth Grad-CAM++, {SMOOTH_SAMPLES} copies",
    "scorecam": "Score-CAM, final layer (1280 ch)",
}
GOALS = {
    ("gradcam", TORCHCAM): 1.5,
    ("gradcam", PGC): 3.0,
    ("gradcam++", TORCHCAM): 1.5,
    ("gradcam++", PGC): 3.0,
    ("smoothgradcam++", TORCHCAM): 2.0,
    ("scorecam", TORCHCAM): 4.0,
    ("scorecam", PGC): 4.0,
}
# One run of every library, in forwards of one image, from the idle figures of issue 9: for the
# time estimate only.
RUN_COST = {"cam": 2, "gradcam": 5.5, "gradcam++": 7, "smoothgradcam++": 30, "scorecam": 6200}
WARMUP = 2  # untimed runs of the millisecond methods before the timed ones; the first checks the maps


# -- camlens's engine with a peer's formula ------------------------------------------------------


class TorchCAMGradCAMPlusPlus(GradCAMPlusPlus):
    """TorchCAM 0.5.0's Grad-CAM++: weights sum_ij g^2 ReLU(g) (its in-place division is lost)."""

    def weigh(self, context):
        return {name: (g * g * torch.relu(g)).sum(dim=(-2, -1)) for name, g in context.gradients.items()}


class PgcGradCAMPlusPlus(GradCAMPlusPlus):
    """pytorch-grad-cam 1.5.7's Grad-CAM++: alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6), 0 where g = 0."""

    def weigh(self, context):
        weights = {}
        for name, g in context.gradients.items():
            total = context.activations[name].sum(dim=(-2, -1))[:, None, :, None, None]
            g2 = g * g
            alpha = torch.where(g != 0, g2 / (2 * g2 + total * g2 * g + 1e-6), 0)
            weights[name] = (alpha * torch.relu(g)).sum(dim=(-2, -1))
        return weights


class TorchCAMSmoothGradCAMPlusPlus(SmoothGradCAMPlusPlus):
    r"""TorchCAM 0.5.0's Smooth Grad-CAM++ on camlens's engine (the noisy copies batched).

    Noise N(0, std^2) in input units, drawn from torch's global generator one copy at a time for
    the whole batch, as TorchCAM draws it; :math:`\alpha = E[g^2] / (2 E[g^2] + \sum_{ij} E[g^3] A
    + 10^{-8})` with A the clean activation; weights :math:`\sum_{ij} \alpha\, \mathrm{ReLU}(g)`
    with the last copy's gradient g; the map combines the last copy's activation (TorchCAM's
    activation hook stays on during its noisy forwards).
    """

    def __init__(self, model: nn.Module, target_layer, n_samples: int, std: float, **options) -> None:
        super().__init__(model, target_layer, n_samples=n_samples, **options)
        self.std = std

    def weigh(self, context):
        ((name, layer),) = context.layers.items()
        x, samples = context.images, self.n_samples
        draws = torch.stack([Normal(0.0, self.std).sample(x.shape) for _ in range(samples)], dim=1)
        copies = (x.unsqueeze(1) + draws.to(x.device)).flatten(0, 1)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(samples)
        is_last = torch.arange(rows.numel(), device=x.device) % samples == samples - 1
        outputs: list[Tensor] = []
        # The module that runs: the layer of the same name in camlens's inference copy of the model.
        running = hooked(context.runner, {name: layer})[name]
        handle = running.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
        try:
            for start in range(0, rows.numel(), self.batch_size):
                part = slice(start, start + self.batch_size)
                grad = context.gradients_at(copies[part], rows[part])[name]  # (B, T, K, h, w)
                if start == 0:
                    sum2, sum3, last_grad = (grad.new_zeros(x.shape[0], *grad.shape[1:]) for _ in range(3))
                    last_activation = torch.zeros_like(context.activations[name])
                grad2 = grad * grad
                sum2.index_add_(0, rows[part], grad2)
                sum3.index_add_(0, rows[part], grad2 * grad)
                last, images = is_last[part], rows[part][is_last[part]]
                last_grad[images] = grad[last]
                last_activation[images] = outputs[-1][last]
        finally:
            handle.remove()
        mean2, mean3 = sum2 / samples, sum3 / samples
        moment = (mean3 * context.activations[name][:, None]).sum(dim=(-2, -1), keepdim=True)
        alpha = mean2 / (2 * mean2 + moment + 1e-8)
        context.activations[name] = last_activation
        return {name: (alpha * torch.relu(last_grad)).sum(dim=(-2, -1))}


def torchcam_masks(maps: Tensor, size: Sequence[int]) -> Tensor:
    """TorchCAM 0.5.0's Score-CAM masks: min-max normalised (+1e-8) at layer resolution, then upsampled."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    normalised = (maps - low) / (high - low + 1e-8)
    return F.interpolate(normalised, size=tuple(size), mode="bilinear", align_corners=False)


def pgc_masks(maps: Tensor, size: Sequence[int]) -> Tensor:
    """pytorch-grad-cam 1.5.7's Score-CAM masks: upsampled with align_corners=True, then min-max
    normalised (+1e-8)."""
    up = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=True)
    flat = up.flatten(-2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (up - low) / (high - low + 1e-8)


class PeerMaskScoreCAM(ScoreCAM):
    """camlens's Score-CAM (logit, channel softmax) with a peer's masks.

    ``ScoreCAM.masks`` makes the masks; this subclass gives it the peer's, and everything else
    (constant channels skipped, batching, the forwards) stays camlens's. Any drift shows in the
    agreement check.
    """

    def __init__(self, model: nn.Module, target_layer, peer_masks: Callable[[Tensor, Sequence[int]], Tensor],
                 **engine: Any):
        super().__init__(model, target_layer, score="logit", channel_softmax=True, **engine)
        self.peer_masks = peer_masks

    def masks(self, activations: Tensor, size: Sequence[int]) -> Tensor:
        return self.peer_masks(activations, size)


# -- the peers ----------------------------------------------------------------------------------


def import_torchcam() -> types.ModuleType | None:
    try:
        return importlib.import_module("torchcam.methods")
    except ImportError:
        return None


def import_pgc() -> types.ModuleType | None:
    """pytorch_grad_cam, with stand-ins for torchvision and scikit-learn where they are missing."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return None

    def unavailable(*args, **kwargs):
        raise RuntimeError("a stand-in module of benchmarks/compare.py: not available here")

    stand_ins = {
        "torchvision": {},
        "torchvision.transforms": dict.fromkeys(("Compose", "Normalize", "ToTensor"), unavailable),
        "torchvision.transforms.functional": {"resize": unavailable},
        "sklearn": {},
        "sklearn.decomposition": dict.fromkeys(("KernelPCA", "NMF"), unavailable),
    }
    missing = {root for root in ("torchvision", "sklearn") if importlib.util.find_spec(root) is None}
    added = [name for name in stand_ins if name.split(".")[0] in missing]
    for name in added:
        module = types.ModuleType(name)
        module.__dict__.update(stand_ins[name])
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    try:
        return importlib.import_module("pytorch_grad_cam")
    except ImportError:
        return None
    finally:
        # pytorch_grad_cam keeps what it imported; torch.compile, which probes for torchvision
        # and scikit-learn when it is first used, must not find the stand-ins.
        for name in added:
            sys.modules.pop(name, None)


# -- what is timed -------------------------------------------------------------------------------


@dataclass
class Contender:
    """One library computing one method's maps: ``build`` and ``close`` are not timed, ``call`` is."""

    label: str
    build: Callable[[], Any]
    call: Callable[[Any], Any]
    close: Callable[[Any], None] = lambda state: None
    times: list[float] = field(default_factory=list)

    def run(self, model: nn.Module) -> tuple[Any, float]:
        torch.manual_seed(0)  # the same noise for Smooth Grad-CAM++ on both sides
        state = self.build()
        try:
            start = time.perf_counter()
            out = self.call(state)
            elapsed = time.perf_counter() - start
        finally:
            self.close(state)
            model.zero_grad(set_to_none=True)
        return out, elapsed


@dataclass
class Pair:
    """camlens against one peer for one method; ``verdict`` False: other maps by design."""

    method: str
    peer_kind: str
    camlens: Contender
    peer: Contender
    variant: str
    verdict: bool = True
    difference: float | None = None

    @property
    def goal(self) -> float | None:
        return GOALS.get((self.method, self.peer_kind)) if self.verdict else None


def map_difference(explanation, peer_output, peer_kind: str) -> float:
    """Largest |difference| between camlens's maps and the peer's, as the peer gives them."""
    if peer_kind == TORCHCAM:
        # Layer resolution, min-max normalised with 1e-8 added to the range: that matters for
        # small maps (its Grad-CAM++ weights are cubes of gradients), so camlens's raw maps are
        # normalised the same way here.
        raw = explanation.raw[LAYER][:, 0]
        flat = raw.flatten(-2)
        low = flat.amin(-1)[..., None, None]
        mine = (raw - low) / (flat.amax(-1)[..., None, None] - low + 1e-8)
        theirs = peer_output.detach()
    else:  # NumPy maps in [0, 1] at input resolution
        mine = explanation.maps[:, 0]
        theirs = torch.from_numpy(np.asarray(peer_output))
    return float((mine - theirs).abs().max())


# How camlens runs the model (camlens.accelerate): "plain" is the library's default, the model
# itself; "optimize" its verified inference copy (optimize=True, the command line's default on
# CPU); "compile" that copy compiled for the forward-only passes (Score-CAM's masked inputs).
ENGINES = {"plain": {}, "optimize": {"optimize": True}, "compile": {"compile": True}}


class Setup:
    """The model, its images and the contenders of every method.

    ``model`` has modules named LAYER (the target) and FC (the classifier); a batch of size b is
    the first b images of ``pool``.
    """

    def __init__(self, model: nn.Module, pool: Tensor, torchcam, pgc, engine: str = "optimize") -> None:
        self.model, self.pool, self.torchcam, self.pgc = model, pool, torchcam, pgc
        self.layer = dict(model.named_modules())[LAYER]
        self.engine = engine  # how camlens runs the model: a key of ENGINES

    @classmethod
    def embedded(cls, image: Path, torchcam, pgc) -> Setup:
        """The embedded model; the photo, the other samples, then their mirror images: 8 real
        images, all different."""
        model = camlens.models.efficientnet_lite0()
        others = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".png", ".jpg") and p != image)
        tensors = [model.preprocess(Image.open(path)) for path in [image, *others]]
        return cls(model, torch.stack(tensors + [t.flip(-1) for t in tensors]), torchcam, pgc)

    def batch(self, size: int) -> tuple[Tensor, list[int]]:
        """``size`` images and their top-1 classes, the targets of every library."""
        x = self.pool[:size].clone()
        with torch.no_grad():
            return x, self.model(x).argmax(1).tolist()

    def pairs(self, method: str, x: Tensor, classes: list[int]) -> list[Pair]:
        model, engine = self.model, ENGINES[self.engine]

        def mine(label: str, make: Callable[[], Any]) -> Contender:
            # Built once and reused, as an application does: a camlens method object holds no
            # hooks between calls (so it costs nothing during a peer's turn), and with the
            # inference copy it holds the copy it made at its first call (the agreement check).
            made: list = []

            def build() -> Any:
                if not made:
                    made.append(make())
                return made[0]

            return Contender(label, build, lambda explainer: explainer(x, classes))

        def tc(name: str, **options) -> Contender | None:
            return None if self.torchcam is None else self.torchcam_contender(name, x, classes, **options)

        def pgc(name: str) -> Contender | None:
            return None if self.pgc is None else self.pgc_contender(name, x, classes)

        formula, masks = "engine + peer's formula", "logit, channel softmax; engine + peer's masks"
        if method == "cam":
            shipped = mine("camlens", lambda: CAM(model, LAYER, **engine))
            candidates = [(TORCHCAM, shipped, tc("CAM", relu=True, fc_layer=FC), "as shipped; TorchCAM's + ReLU")]
        elif method == "gradcam":
            shipped = mine("camlens", lambda: GradCAM(model, LAYER, **engine))
            candidates = [
                (TORCHCAM, shipped, tc("GradCAM"), "as shipped"),
                (PGC, shipped, pgc("GradCAM"), "as shipped"),
            ]
        elif method == "gradcam++":
            torchcams = mine("camlens (TorchCAM's formula)", lambda: TorchCAMGradCAMPlusPlus(model, LAYER, **engine))
            pgcs = mine("camlens (pytorch-grad-cam's formula)", lambda: PgcGradCAMPlusPlus(model, LAYER, **engine))
            candidates = [
                (TORCHCAM, torchcams, tc("GradCAMpp"), formula),
                (PGC, pgcs, pgc("GradCAMPlusPlus"), formula),
            ]
        elif method == "smoothgradcam++":
            theirs = tc("SmoothGradCAMpp", num_samples=SMOOTH_SAMPLES, std=TORCHCAM_SMOOTH_STD)
            torchcams = mine(
                "camlens (TorchCAM's formula)",
                lambda: TorchCAMSmoothGradCAMPlusPlus(model, LAYER, SMOOTH_SAMPLES, TORCHCAM_SMOOTH_STD, **engine),
            )
            own = mine("camlens", lambda: SmoothGradCAMPlusPlus(model, LAYER, n_samples=SMOOTH_SAMPLES, **engine))
            candidates = [
                (TORCHCAM, torchcams, theirs, formula),
                (TORCHCAM, own, theirs, "camlens's own: other noise and formula", False),
            ]
        else:
            torchcams = mine("camlens (TorchCAM's masks)", lambda: PeerMaskScoreCAM(model, LAYER, torchcam_masks, **engine))
            pgcs = mine("camlens (pytorch-grad-cam's masks)", lambda: PeerMaskScoreCAM(model, LAYER, pgc_masks, **engine))
            candidates = [
                (TORCHCAM, torchcams, tc("ScoreCAM"), masks),
                (PGC, pgcs, pgc("ScoreCAM"), masks),
            ]
        return [Pair(method, kind, ours, theirs, *rest) for kind, ours, theirs, *rest in candidates if theirs]

    def torchcam_contender(self, name: str, x: Tensor, classes: list[int], relu=False, **options) -> Contender:
        """TorchCAM's extractor, the caller's forward included in the timing."""
        model, caller_grad = self.model, name in ("GradCAM", "GradCAMpp")

        def call(extractor):
            if caller_grad:
                return extractor(class_idx=classes, scores=model(x))[0]
            with torch.no_grad():
                model(x)
            if relu:  # the paper's CAM, and TorchCAM's own docstring, have a ReLU that its code lacks
                return extractor._normalize(torch.relu(extractor(class_idx=classes, normalized=False)[0]))
            return extractor(class_idx=classes)[0]

        def close(extractor):
            extractor.remove_hooks()
            extractor.reset_hooks()

        make = lambda: getattr(self.torchcam, name)(model, LAYER, **options)  # noqa: E731
        return Contender(f"TorchCAM {version('torchcam')}", make, call, close)

    def pgc_contender(self, name: str, x: Tensor, classes: list[int]) -> Contender:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(c) for c in classes]
        return Contender(
            f"pytorch-grad-cam {version('grad-cam')}",
            lambda: getattr(self.pgc, name)(model=self.model, target_layers=[self.layer]),
            lambda cam: cam(input_tensor=x, targets=targets),
            lambda cam: cam.activations_and_grads.release(),
        )


@dataclass
class Group:
    """One method at one batch size: its contenders run in turn, in an order rotating by run."""

    method: str
    batch: int
    pairs: list[Pair]
    repeats: int
    warmup: int  # 0: the agreement run is the first timed run
    load: float | None = None

    @property
    def contenders(self) -> list[Contender]:
        unique: dict[int, Contender] = {}
        for pair in self.pairs:
            unique.setdefault(id(pair.camlens), pair.camlens)
            unique.setdefault(id(pair.peer), pair.peer)
        return list(unique.values())

    def runs(self) -> int:
        return self.repeats + max(self.warmup, 1) - (self.warmup == 0)

    def run(self, model: nn.Module, say: Callable[[str], None]) -> None:
        contenders = self.contenders
        with CpuMonitor() as monitor:
            outputs = {}
            for contender in contenders:
                outputs[id(contender)], elapsed = contender.run(model)
                if self.warmup == 0:
                    contender.times.append(elapsed)
            for pair in self.pairs:
                mine, theirs = outputs[id(pair.camlens)], outputs[id(pair.peer)]
                pair.difference = map_difference(mine, theirs, pair.peer_kind)
                same = "agree" if pair.difference <= TOLERANCE else "DIFFERENT"
                say(f"  {pair.camlens.label} vs {pair.peer.label}: max |diff| {pair.difference:.1e}, {same}")
            del outputs
            if self.warmup == 0:
                self.show_times(1, say)
            for _ in range(self.warmup - 1):
                for contender in contenders:
                    contender.run(model)
            for repeat in range(self.warmup == 0, self.repeats):
                shift = repeat % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    contender.times.append(contender.run(model)[1])
                if self.warmup == 0:
                    self.show_times(repeat + 1, say)
        self.load = monitor.other_cores

    def show_times(self, run: int, say: Callable[[str], None]) -> None:
        """For the minute-long runs: each run's times as it ends."""
        say(f"  run {run}: " + ", ".join(f"{c.label} {describe(c.times[-1])}" for c in self.contenders))


# -- reporting -----------------------------------------------------------------------------------


def describe(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def forward_time(model: nn.Module, x: Tensor) -> float:
    """Seconds per image of a plain forward, now."""
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(3):
            model(x)
    return (time.perf_counter() - start) / 3 / x.shape[0]


def verdict(pair: Pair, ratio: float) -> str:
    if pair.difference > TOLERANCE:
        return f"maps differ by {pair.difference:.1e}: timed for information only"
    if not pair.verdict:
        return "other maps by design: for information"
    if pair.goal is None:
        return "no goal"
    return "PASS" if ratio >= pair.goal else "**FAIL**"


def table(groups: list[Group]) -> str:
    lines = [
        "| method | batch | peer | camlens variant | max abs diff | camlens | peer | ratio | ratio by run | goal "
        "| verdict | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        for pair in group.pairs:
            mine, theirs = statistics.median(pair.camlens.times), statistics.median(pair.peer.times)
            ratio = theirs / mine
            by_run = [t / m for m, t in zip(pair.camlens.times, pair.peer.times)]
            if len(by_run) >= 4:
                low, _, high = statistics.quantiles(by_run, n=4)
                spread = f"{low:.2f}-{high:.2f} (quartiles, {len(by_run)} runs)"
            else:
                spread = f"{min(by_run):.2f}-{max(by_run):.2f} (range, {len(by_run)} runs)"
            goal = "" if pair.goal is None else f">= {pair.goal:g} x"
            load = "" if group.load is None else f"{group.load:.2f}{' !' * (group.load > CONTENTION_LIMIT)}"
            lines.append(
                f"| {TITLES[pair.method]} | {group.batch} | {pair.peer.label} | {pair.variant} "
                f"| {pair.difference:.1e} | {describe(mine)} | {describe(theirs)} | {ratio:.2f} x | {spread} "
                f"| {goal} | {verdict(pair, ratio)} | {load} |"
            )
    return "\n".join(lines)


LEGEND = """\
ratio: the peer's median over camlens's; ratio by run: of the runs side by side. camlens
variant "engine + peer's formula" / "masks": a subclass in benchmarks/compare.py puts the peer's
formula into camlens's weigh step (its masks into camlens's Score-CAM), so that the maps agree and
camlens's engine does the rest. TorchCAM's maps are 7 x 7 (layer resolution); camlens's and
pytorch-grad-cam's are upsampled to 224 x 224 inside their timings. load: mean cores kept busy
by other processes during the group's runs ('!' above 0.1)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="all methods but Score-CAM")
    parser.add_argument(
        "--score-cam-batch-sizes", nargs="+", type=int, default=[1],
        help="8 is opt-in: each run is about 8 times as long as at batch 1 (minutes per library)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per library, all but Score-CAM")
    parser.add_argument("--score-cam-repeats", type=int, default=3, help="timed runs per library, Score-CAM")
    parser.add_argument("--threads", type=int, default=2, help="torch's thread count")
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "coffee.png", help="the batch-1 photo")
    parser.add_argument("--json", type=Path, help="also write every time measured to this file")
    parser.add_argument("--engine", choices=list(ENGINES), default="optimize",
                        help="how camlens runs the model: its inference copy (optimize, the command line's default "
                             "on CPU), the model itself (plain, the library's default), or the copy compiled")
    args = parser.parse_args(argv)
    if min(args.repeats, args.score_cam_repeats, args.threads) < 1:
        parser.error("repeats and threads must be at least 1")
    if not all(1 <= size <= 8 for size in args.batch_sizes + args.score_cam_batch_sizes):
        parser.error("batch sizes are 1 to 8 (the photo, the other samples and their mirror images)")
    if not args.image.is_file():
        parser.error(f"no image at {args.image}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    say = lambda line: print(line, flush=True)  # noqa: E731
    torchcam, pgc = import_torchcam(), import_pgc()
    if torchcam is None and pgc is None:
        raise SystemExit("compare.py: error: no peer installed: see the docstring of benchmarks/compare.py")
    peers = [f"TorchCAM {version('torchcam')}" if torchcam else "TorchCAM not installed: skipped"]
    peers.append(f"pytorch-grad-cam {version('grad-cam')}" if pgc else "pytorch-grad-cam not found: skipped")
    if pgc is not None:
        import cv2

        cv2.setNumThreads(args.threads)

    setup = Setup.embedded(args.image.resolve(), torchcam, pgc)
    setup.engine = args.engine
    groups = []
    for method in args.methods:
        score_cam = method == "scorecam"
        for size in args.score_cam_batch_sizes if score_cam else args.batch_sizes:
            pairs = setup.pairs(method, *setup.batch(size))
            if pairs:
                repeats = args.score_cam_repeats if score_cam else args.repeats
                groups.append(Group(method, size, pairs, repeats, 0 if score_cam else WARMUP))
    with CpuMonitor() as monitor:
        per_image = {size: forward_time(setup.model, setup.pool[:size]) for size in {g.batch for g in groups}}
    estimate = sum(g.runs() * RUN_COST[g.method] * g.batch * per_image[g.batch] for g in groups)

    conditions = (
        f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{os.cpu_count()} cores"
    )
    say(f"camlens {camlens.__version__}; {conditions}; peers: {', '.join(peers)}")
    say(f"embedded EfficientNet-Lite0, layer {LAYER!r}; batch 1: {args.image.name}, then the samples, mirrored")
    say(f"camlens runs the model with --engine {args.engine}: {ENGINES[args.engine] or 'the model itself'}")
    say("plan:")
    for g in groups:
        libraries = ", ".join(c.label for c in g.contenders)
        say(f"  {TITLES[g.method]}, batch {g.batch}: {libraries}; {g.repeats} timed runs each")
    say(
        f"estimate: about {estimate / 60:.0f} min at the current speed (a forward takes "
        f"{per_image[min(per_image)] * 1000:.0f} ms per image now; other processes keep "
        f"{monitor.other_cores or 0:.1f} cores busy)"
    )
    started = time.perf_counter()
    for group in groups:
        say(f"{TITLES[group.method]}, batch {group.batch}:")
        group.run(setup.model, say)
    say(f"done in {(time.perf_counter() - started) / 60:.0f} min\n")
    say(f"{conditions}; times are medians\n")
    say(table(groups))
    say("\n" + LEGEND)
    if args.json:
        records = [
            {"method": g.method, "batch": g.batch, "peer": p.peer.label, "camlens_variant": p.variant,
             "max_abs_diff": p.difference, "goal": p.goal, "other_cores": g.load,
             "camlens_s": p.camlens.times, "peer_s": p.peer.times}
            for g in groups for p in g.pairs
        ]
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
