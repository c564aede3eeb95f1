"""The pipeline every method shares: capture -> weigh -> combine -> Explanation.

A method only supplies ``weigh``: a function from what was captured (:class:`Context`) to
channel weights. Everything else (layer lookup, hooks, targets, gradients, channel subsets,
normalisation, fusion, restoring the model) happens here, once, for all methods.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import Tensor, nn

from ..accelerate import CompiledForward, InferenceCopies, InferenceCopy, PlainForward, SplitForward
from ..capture import (
    batch_of,
    LayersSpec,
    OutputSpec,
    ReshapeSpec,
    ForwardInputs,
    PerImage,
    SelectedOutput,
    Layout,
    batch_rows,
    bound_inputs,
    forward_inputs,
    check_finite,
    check_has_values,
    eager,
    check_hookable,
    gradients,
    model_failures,
    model_output,
    out_of_memory_retried,
    preserved,
    record,
    remembered_default_layer,
    resolve_layer,
    resolve_layers,
    token_grid,
)
from ..combine import fuse, upsample_normalise, weighted_sum
from ..errors import BatchHalvedWarning, CamlensError, first_line
from ..explanation import Explanation, warn_blank
from ..targets import TargetSpec, Targets, resolve_targets, unit_layers

Progress = Callable[[int, int], None]
ChannelsSpec = Union[None, Sequence[int], Tensor, Mapping[Union[str, nn.Module], Sequence[int]]]


def hooked(runner: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules of ``runner`` to hook for the model's ``layers``: those of the same names in
    its inference copy (the tap of a copy split at the one layer), or the layers themselves when
    the runner is the model."""
    if isinstance(runner, SplitForward):
        return {name: runner.tap for name in layers}
    if isinstance(runner, PlainForward):
        return {name: runner.copy.get_submodule(name) for name in layers}
    return dict(layers)


@dataclass
class Context:
    """What the weigh step of a method sees for N images.

    ``activations`` and ``gradients`` are already restricted to the channel subset, if any:
    a method weighs exactly the channels it is given.
    """

    model: nn.Module
    images: Tensor  # (N, C, H, W) on the model's device
    logits: Tensor  # (N, classes) on the clean images
    targets: Targets
    layers: dict[str, nn.Module]
    activations: dict[str, Tensor]  # {layer: (N, K', h, w)}
    full_activations: dict[str, Tensor]  # {layer: (N, K, h, w)}, every channel
    channels: dict[str, Tensor | None]  # {layer: channel indices} or None for all
    gradients: dict[str, Tensor] | None  # {layer: (N, T, K', h, w)} for gradient methods
    progress: Progress | None = None
    # The module that runs forward passes, when it is not ``model`` (its inference copy), with
    # hookable modules of the same names; ``scorer`` gives the output the targets score (picked
    # by ``output``) of hook-free passes.
    runner: nn.Module | None = None
    scorer: nn.Module | None = None
    output: OutputSpec = None  # the method's output selector (capture.model_output)
    reshape: Layout | None = None  # how token or channels-last layers become maps (capture.token_grid)

    def __post_init__(self) -> None:
        # "is None", not "or": a model may define __len__ (nn.Sequential) and so its truth.
        if self.runner is None:
            self.runner = self.model
        if self.scorer is None:
            self.scorer = SelectedOutput(self.runner, self.output)


    def select(self, name: str, tensor: Tensor, dim: int) -> Tensor:
        index = self.channels[name]
        return tensor if index is None else tensor.index_select(dim, index)

    def forward_scores(self, inputs: Tensor, rows: Tensor) -> Tensor:
        """Target scores (B, T) of a batch whose row b is a version of image ``rows[b]``.

        No gradients, no hooks on the target layers. A batch of one row that stands for every
        image in ``rows`` (the all-zero input) is forwarded once and its outputs shared.
        """
        units = self.targets.unit_layers
        given = forward_inputs()
        if given is not None and given.per_image and inputs.shape[0] == 1 and rows.numel() > 1:
            inputs = inputs.expand(rows.numel(), *inputs.shape[1:])  # a baseline scored with each image's inputs
        with model_failures(self.model, inputs), batch_rows(rows):
            if units:
                logits, outputs = record(
                    self.runner, inputs, hooked(self.runner, units), output=self.output, reshape=self.reshape
                )
            else:
                with torch.no_grad():
                    logits, outputs = model_output(self.scorer(inputs), inputs), {}
        if inputs.shape[0] == 1 and rows.numel() > 1:
            logits = logits.expand(rows.numel(), *logits.shape[1:])
            outputs = {name: out.expand(rows.numel(), *out.shape[1:]) for name, out in outputs.items()}
        scores = self.targets.score(logits, outputs, rows)
        check_finite(scores, "target scores of masked or baseline inputs", rows)
        return scores

    def gradients_at(self, inputs: Tensor, rows: Tensor) -> dict[str, Tensor]:
        """Gradients ``{layer: (B, T, K', h, w)}`` of the target scores of a batch of versions."""
        with model_failures(self.model, inputs), batch_rows(rows):
            logits, outputs = record(
                self.runner, inputs, hooked(self.runner, {**self.layers, **self.targets.unit_layers}), track_grad=True,
                output=self.output, reshape=self.reshape,
            )
        scores = self.targets.score(logits, outputs, rows)
        check_finite(scores, "target scores of noisy copies", rows)
        grads = gradients(scores, {name: outputs[name] for name in self.layers}, rows)
        return {name: self.select(name, grad, 2) for name, grad in grads.items()}


# True while a meta-method (AugmentSmooth, EigenSmooth) calls the method it wraps: the blank maps
# of its result are said once, by the outermost call.
_NESTED: ContextVar[bool] = ContextVar("camlens_nested", default=False)


@contextlib.contextmanager
def nested() -> Iterator[None]:
    """Calls of methods inside this block are parts of a larger call: they say nothing of their own."""
    token = _NESTED.set(True)
    try:
        yield
    finally:
        _NESTED.reset(token)


def _described(inputs: ForwardInputs) -> str:
    """The forward inputs of a call in words, for the Explanation's options."""
    def one(value: object) -> str:
        kind = "per image" if isinstance(value, PerImage) else "fixed"
        tensor = value.value if isinstance(value, PerImage) else value
        return f"{kind} {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else f"{kind} {type(tensor).__name__}"

    parts = [f"arg {index}: {one(value)}" for index, value in enumerate(inputs.args)]
    parts += [f"{key}: {one(value)}" for key, value in inputs.kwargs.items()]
    if inputs.images_as is not None:
        parts.insert(0, f"images as {inputs.images_as}")
    return "; ".join(parts)


def finished(explanation: Explanation) -> Explanation:
    """``explanation``, after a BlankMapWarning that names its blank maps (by the outermost call)."""
    if not _NESTED.get():
        warn_blank(explanation, stacklevel=4)
    return explanation


@dataclass(frozen=True)
class Cost:
    """What a call costs per image, on a target layer of K channels and an h x w map: passes of
    the whole model (``forwards``), backward passes (``backwards``), and passes of the layers
    after the target layer (``after``: of the whole model where camlens cannot cut it there).
    ``at_most``: the counts are bounds (Score-CAM does not forward a constant channel);
    ``note``: what else to know, in words (a refusal above a budget)."""

    forwards: int
    backwards: int = 0
    after: int = 0
    at_most: bool = False
    note: str = ""


class CAMMethod:
    """Base class of every method: reusable across calls, on any model, images and targets.

    Args:
        model: any ``nn.Module``: one returning class scores (N, classes) for class targets,
            any output for target functions (see :mod:`camlens.targets`).
        target_layer: a name from ``model.named_modules()``, a module, or a list of either
            (maps fused by averaging). None chooses the last module with a 4-D output before
            the global pooling; the choice is recorded in the Explanation.
        output: which tensor of what the model returns the targets score
            (:func:`camlens.capture.model_output`): None picks the only sensible one (the
            tensor returned, a ``logits`` attribute or key, the single tensor of a tuple or
            dict) and says what to choose from where there is none; an int indexes a tuple, a
            str is a key or an attribute, a function takes the model's output and returns it.
        reshape: how a target layer's output becomes a feature map (N, C, h, w): tokens (a
            vision transformer's (N, L, D)) by ``"tokens"`` (prefix tokens and grid inferred),
            ``"tokens:PREFIX"``, ``"tokens:HxW"`` or a :class:`~camlens.capture.TokenGrid`
            (layers with a 4-D output are then used as they are); a channels-last map (N, H, W, C)
            by ``"nhwc"``; anything else by a function of the output to (N, C, h, w), as
            pytorch-grad-cam's ``reshape_transform`` (:class:`~camlens.capture.Reshaped`).
            Applied to the activation and so to its gradient. Needs a named ``target_layer``.
        optimize: run a verified inference copy of the model (batch norm folded into
            convolutions, channels-last memory; see :mod:`camlens.accelerate`): the same maps up
            to float rounding (about 1e-6), faster. The copy is a snapshot that this object
            makes at its first call: reuse the object, and build a new one after changing the
            model other than through its tensors (its attributes, hooks, ``.data``).
        compile: run that copy compiled (``torch.compile``): whole for the forward-only passes
            (Score-CAM's masked inputs, the metrics' perturbed inputs), and up to the target
            layer for the passes that observe it, gradients included (nothing below the layer
            needs autograd; the rest runs eagerly). Faster again, after a compilation of up to a
            minute the first time per model and input shape (cached on disk). Implies
            ``optimize``.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = False
    default_score: ClassVar[str] = "logit"

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        *,
        optimize: bool = False,
        compile: bool = False,
        output: OutputSpec = None,
        reshape: ReshapeSpec = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise CamlensError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        model = eager(model)  # a torch.compile'd model: the model it wraps, its layers by their own names
        check_hookable(model)
        for flag, value in (("optimize", optimize), ("compile", compile)):
            if not isinstance(value, bool):
                raise CamlensError(f"{flag} must be True or False, got {value!r}")
        if isinstance(output, bool) or not (output is None or isinstance(output, (int, str)) or callable(output)):
            raise CamlensError(
                "output must be None (automatic), an int (an index), a str (a key or attribute) or a "
                f"function of the model's output, not {type(output).__name__}"
            )
        self.model = model
        self.optimize = optimize or compile
        self.compile = compile
        self.output = output
        self.reshape = token_grid(reshape)
        if self.reshape is not None and target_layer is None:
            # The default layer comes with the layout found for it: reshape= reads a layer the user names.
            raise CamlensError(
                "reshape needs a named target layer: with none, camlens finds the default layer and reads its "
                "tokens or channels-last map itself; name the layer whose output reshape= reads (target_layer=, "
                "--target-layer; see camlens layers)"
            )
        self._copies = InferenceCopies()
        self._layers = None if target_layer is None else resolve_layers(model, target_layer)

    # -- what a method supplies -------------------------------------------------------------
    def weigh(self, context: Context) -> dict[str, Tensor]:
        """Weights ``{layer: (N, T, K')}`` per channel, or ``{layer: (N, T, K', h, w)}`` per
        activation, for the channels in ``context.activations``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, recorded in every Explanation."""
        return {}

    def raw_map(self, name: str, weight: Tensor, activation: Tensor) -> Tensor:
        """The raw map (N, T, h, w) of layer ``name`` from the weights ``weigh`` gave, (N, T, K')
        or (N, T, K', h, w), and the activation (N, K', h, w): by default
        :func:`~camlens.combine.weighted_sum`. A method whose map is not a weighted sum of
        channels overrides it."""
        return weighted_sum(weight, activation)

    def score_kind(self) -> str:
        """The score of class targets that do not name one."""
        return self.default_score

    def cost(self, channels: int, height: int, width: int) -> Cost:
        """What one call costs per image with these options, on a target layer of ``channels``
        channels and an ``height`` x ``width`` map (:class:`Cost`): by default one forward pass,
        and one backward pass for a gradient method."""
        return Cost(1, int(self.needs_gradients))

    # -- the pipeline -----------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        channels: ChannelsSpec = None,
        progress: Progress | None = None,
        forward_args: object = None,
        forward_kwargs: Mapping[str, object] | None = None,
        images_as: str | None = None,
    ) -> Explanation:
        """Explain ``images`` (N, C, H, W), or one image (C, H, W), for ``targets``.

        Args:
            targets: None (top-1), an int, one int per image, a list of lists, ``TopK``,
                ``ClassTarget`` or ``UnitTarget`` (or a list of them), or target functions of
                the model's output (one, one per image, or a list per image; see
                :mod:`camlens.targets`).
            channels: build the maps from these channels of the target layer only: a list of
                indices, or ``{layer: indices}`` for several layers.
            progress: called as ``progress(done, total)`` during long work (Score-CAM).
            forward_args, forward_kwargs: what the model takes besides the images, in every
                forward pass: ``model(images, *forward_args, **forward_kwargs)`` (Captum's
                ``additional_forward_args``). Wrap a value with one row per image in
                :class:`~camlens.capture.PerImage` (an ``attention_mask``): the passes over
                masked, noisy or augmented versions of the images then get the rows of the images
                they are versions of; anything else is the same in every pass (a set of texts).
            images_as: the keyword the images go to, where it is not the model's first argument
                (``"pixel_values"`` for a Hugging Face CLIP model).
        """
        model = self.model
        if progress is not None and not callable(progress):
            raise CamlensError(f"progress must be a function progress(done, total), not {type(progress).__name__}")
        x = self._prepare(images)
        inputs = ForwardInputs.make(forward_args, forward_kwargs, images_as, x.shape[0])
        with preserved(model), bound_inputs(model, inputs):
            with model_failures(model, x):
                layers, chosen, layout = self._target_layers(x)
                units = unit_layers(model, targets)
                runner, scorer = self._runners(x, [*layers, *units])
                logits, outputs = record(
                    runner, x, hooked(runner, {**layers, **units}), track_grad=self.needs_gradients,
                    output=self.output, reshape=layout,
                )
            check_finite(logits, "model outputs")
            resolved = resolve_targets(model, targets, logits, outputs, self.score_kind())
            rows = torch.arange(x.shape[0], device=x.device)
            scores = resolved.score(logits, outputs, rows)
            check_finite(scores, "target scores")
            full = {name: outputs[name] for name in layers}
            context = Context(
                model=model,
                images=x,
                logits=logits.detach(),
                targets=resolved,
                layers=layers,
                activations={},
                full_activations={},
                channels=self._channel_subsets(channels, full),
                gradients=None,
                progress=progress,
                runner=runner,
                scorer=scorer,
                output=self.output,
                reshape=layout,
            )
            if self.needs_gradients:
                context.gradients = {
                    name: context.select(name, grad, 2)
                    for name, grad in gradients(scores, full).items()
                }
            context.full_activations = {name: a.detach() for name, a in full.items()}
            context.activations = {
                name: context.select(name, a, 1) for name, a in context.full_activations.items()
            }
            weights = self._weigh_in_memory(context)
        explanation = self._explanation(context, weights, scores.detach(), chosen)
        if self.output is not None:
            explanation.options["output"] = getattr(self.output, "__qualname__", self.output)
        if layout is not None:
            explanation.options["reshape"] = layout.describe()
        if inputs is not None:
            explanation.options["forward inputs"] = _described(inputs)
        return finished(explanation)

    def _explanation(
        self, context: Context, weights: dict[str, Tensor], scores: Tensor, chosen: bool
    ) -> Explanation:
        size = context.images.shape[2:]
        raw, full_weights, maps = {}, {}, []
        for name, activation in context.activations.items():
            weight = weights[name]
            check_finite(weight, f"weights at layer {name!r}")
            raw[name] = self.raw_map(name, weight, activation)
            maps.append(upsample_normalise(raw[name], size))
            full_weights[name] = self._scatter(weight, context, name)
        targets = context.targets
        probabilities = None
        if targets.classes is not None:
            probabilities = context.logits.softmax(dim=1).gather(1, targets.classes)
        return Explanation(
            maps=fuse(maps),
            raw=raw,
            weights=full_weights,
            targets=targets.as_index_tensor(context.images.shape[0]).to(scores.device),
            scores=scores,
            score_kind=targets.score_kind,
            probabilities=probabilities,
            method=self.name,
            target_layers=tuple(context.layers),
            default_layer=chosen,
            units=targets.units,
            channels={
                name: index.tolist() for name, index in context.channels.items() if index is not None
            }
            or None,
            options=self.options(),
            logits=context.logits,
        )

    @staticmethod
    def _scatter(weight: Tensor, context: Context, name: str) -> Tensor:
        index = context.channels[name]
        if index is None:
            return weight
        # Dimension 2 holds the channels of (N, T, K) and (N, T, K, h, w) weights alike.
        shape = list(weight.shape)
        shape[2] = context.full_activations[name].shape[1]
        return weight.new_zeros(shape).index_copy_(2, index, weight)

    def _prepare(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            if type(images).__module__.startswith("PIL."):
                raise CamlensError(
                    "images must be a torch.Tensor (N, C, H, W), not a PIL image: preprocess it as the model "
                    "expects, e.g. camlens.models.Preprocess()(image) (ImageNet's resize, crop and normalisation; "
                    "the embedded model's own is camlens.models.efficientnet_lite0().preprocess)"
                )
            raise CamlensError(
                f"images must be a torch.Tensor (N, C, H, W), not {type(images).__name__}"
            )
        images = batch_of(images, self.model)
        if images.numel() == 0:
            raise CamlensError(
                f"images of shape {tuple(images.shape)} hold no pixels: give at least one image "
                "with at least one channel and one pixel"
            )
        if not images.is_floating_point():
            raise CamlensError(
                f"images must be a float tensor after preprocessing, got {images.dtype}"
            )
        check_has_values(images, "input images")
        check_has_values(self.model)
        reference = next(self.model.parameters(), None)
        if reference is None:
            reference = next(self.model.buffers(), None)
        if reference is not None:
            dtype = reference.dtype if reference.is_floating_point() else images.dtype
            images = images.to(device=reference.device, dtype=dtype)
        check_finite(images, "input images")
        return images.detach()

    def _inference(self, x: Tensor, names: Sequence[str] = ()) -> InferenceCopy | None:
        """The inference copy to run for inputs like ``x`` when observing layers ``names``:
        None without ``optimize``, or where the copy does not apply."""
        if forward_inputs() is not None:
            return None  # the copy would not get the forward inputs: the model itself runs
        inference = self._copies.get(self.model, x) if self.optimize else None
        return inference if inference is not None and inference.serves(names) else None

    def _runners(self, x: Tensor, names: Sequence[str]) -> tuple[nn.Module, nn.Module]:
        """What runs the forward passes: ``(runner, scorer)``, the model's inference copy where it
        applies to ``names``, else the model. With ``compile``, the scorer (hook-free passes) is
        the copy compiled, and the runner the copy split at the one layer observed, where there
        is one (see :class:`~camlens.accelerate.SplitForward`). The scorer gives the output that
        ``output`` picks; the runner what the model returns."""
        inference = self._inference(x, names)
        if inference is None:
            return self.model, SelectedOutput(self.model, self.output)
        if not self.compile:
            runner = PlainForward(inference)
            return runner, SelectedOutput(runner, self.output)
        split = inference.split(names[0], x) if len(set(names)) == 1 else None
        runner = split if split is not None else PlainForward(inference)
        return runner, self._compiled(inference, getattr(self, "batch_size", 16))

    def _weigh_in_memory(self, context: Context) -> dict[str, Tensor]:
        """:meth:`weigh`; after an out-of-memory error of the device (CUDA), a method with batches
        (``batch_size``: the Score-CAM family, Ablation-CAM, Recipro-CAM, Smooth Grad-CAM++) halves
        them and weighs again, as often as needed, and says so in one
        :class:`~camlens.errors.BatchHalvedWarning`; the batch size stays halved for the object's
        later calls. The weights do not depend on the batch size."""
        first = getattr(self, "batch_size", None)
        while True:
            try:
                with out_of_memory_retried():
                    weights = self.weigh(context)
                break
            except torch.OutOfMemoryError as error:
                reason = first_line(error)  # not the error itself: its frames hold the batch's tensors
            size = getattr(self, "batch_size", None)
            if not isinstance(size, int) or size <= 1:
                raise CamlensError(
                    f"{self.display_name or self.name} ran out of memory on {context.images.device}"
                    + (f" even with batch_size 1 ({reason})" if isinstance(size, int) else f" ({reason})")
                    + ": use fewer images per call, a smaller input, or another device"
                )
            self.batch_size = size // 2
            if context.images.is_cuda:
                torch.cuda.empty_cache()
        if first != getattr(self, "batch_size", None):
            warnings.warn(f"{self.display_name or self.name} ran out of memory on {context.images.device} with "
                          f"batch_size {first}: its batches were halved to {self.batch_size}, for the rest of the "
                          "run too (the same numbers, in more passes)", BatchHalvedWarning, stacklevel=3)
        return weights

    def fast_forward(self, images: Tensor, batch_size: int = 32) -> nn.Module:
        """A module giving the model's logits (the output that ``output`` picks) the way this
        method runs it (its inference copy, compiled in batches of ``batch_size`` with
        ``compile``): for forward-only work such as the metrics."""
        inference = self._inference(images)
        if inference is None:
            return SelectedOutput(self.model, self.output)
        if self.compile:
            return self._compiled(inference, batch_size)
        return SelectedOutput(PlainForward(inference), self.output)

    def _compiled(self, inference: InferenceCopy, batch_size: int) -> CompiledForward:
        return CompiledForward(inference, batch_size, select=lambda out, x: model_output(out, x, self.output))

    def _target_layers(self, x: Tensor) -> tuple[dict[str, nn.Module], bool, Layout | None]:
        """``(target layers, whether the default was chosen, how their outputs become maps)``:
        the layers given with ``reshape``, or the default layer with the layout found for it."""
        if self._layers is not None:
            return self._layers, False, self.reshape
        # Remembered across method objects: camlens.explain builds a new one on every call.
        with batch_rows(torch.arange(1, device=x.device)):  # the search runs the first image
            found, module = remembered_default_layer(self.model, x, self.output)
        return {found.name: module}, True, found.layout

    def _channel_subsets(
        self, channels: ChannelsSpec, activations: dict[str, Tensor]
    ) -> dict[str, Tensor | None]:
        subsets: dict[str, Tensor | None] = {name: None for name in activations}
        if channels is None:
            return subsets
        if isinstance(channels, Mapping):
            given = {resolve_layer(self.model, layer)[0]: index for layer, index in channels.items()}
            unknown = [name for name in given if name not in activations]
            if unknown:
                raise CamlensError(
                    f"channel subset given for {', '.join(unknown)}, which is not a target layer "
                    f"(target layers: {', '.join(activations)})"
                )
        else:
            given = {name: channels for name in activations}
        for name, index in given.items():
            subsets[name] = self._channel_index(index, activations[name], name)
        return subsets

    @staticmethod
    def _channel_index(index: object, activation: Tensor, name: str) -> Tensor:
        count = activation.shape[1]
        try:
            tensor = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError):
            raise CamlensError("a channel subset is a list of channel indices") from None
        if (
            tensor.dim() != 1
            or tensor.numel() == 0
            or tensor.is_floating_point()
            or tensor.is_complex()
            or tensor.dtype == torch.bool
        ):
            raise CamlensError("a channel subset is a non-empty list of integer channel indices")
        tensor = tensor.long()
        bad = tensor[(tensor < 0) | (tensor >= count)]
        if bad.numel():
            raise CamlensError(
                f"channel {bad[0].item()} is out of range: layer {name!r} has {count} channels "
                f"(valid: 0 to {count - 1})"
            )
        if tensor.unique().numel() != tensor.numel():
            raise CamlensError("a channel subset lists a channel more than once")
        return tensor.to(activation.device)
