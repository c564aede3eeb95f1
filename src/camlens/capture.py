"""Capture: layer lookup, hook lifetime, and what one forward (and backward) pass records.

Everything here leaves the model as it found it: hooks are removed, train/eval flags and
``requires_grad`` are restored, also when an exception is raised half-way.
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from .errors import CamlensError, first_line

LayerSpec = Union[str, int, nn.Module]
LayersSpec = Union[LayerSpec, Sequence[LayerSpec]]


def display_name(name: str) -> str:
    return name if name else "<model>"


def check_hookable(model: nn.Module) -> None:
    """Refuse TorchScript models: PyTorch allows no forward hooks on ScriptModules."""
    if isinstance(model, torch.jit.ScriptModule):
        raise CamlensError(
            "TorchScript models cannot be explained: PyTorch allows no forward hooks on ScriptModules, "
            "so no layer can be observed; save the model with torch.export (dynamic batch size) or "
            "load it from a package.module:factory"
        )


def describe(value: object) -> str:
    """How an error message names a value that should have been a tensor of some shape."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a layer given by name (from ``named_modules()``) or as a module.

    An integer is the name it spells: ``3`` is the child ``"3"`` of an ``nn.Sequential``.
    """
    if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        layer = str(layer)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer in modules:
            return layer, modules[layer]
        names = [name for name in modules if name]
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        if not close:  # a typo in a dotted path: compare with the names that share its last part
            tail = layer.rsplit(".", 1)[-1]
            close = [name for name in names if name.rsplit(".", 1)[-1] == tail][:5]
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise CamlensError(
            f"unknown layer {layer!r}{hint} (every name from model.named_modules() is accepted)"
        )
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise CamlensError(
            f"the target layer {type(layer).__name__} is not a submodule of the model; "
            "pass a module of this model or its name"
        )
    raise CamlensError(
        f"a layer is a module name (str, or int for an nn.Sequential child), an nn.Module, "
        f"or a list of them; not {type(layer).__name__}"
    )


def resolve_layers(model: nn.Module, layers: LayersSpec) -> dict[str, nn.Module]:
    """Resolve one layer or a list of layers to an ordered ``{name: module}`` mapping."""
    items = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not items:
        raise CamlensError("the list of target layers is empty")
    resolved: dict[str, nn.Module] = {}
    for item in items:
        name, module = resolve_layer(model, item)
        resolved[name] = module
    return resolved


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode with frozen parameters, and restore both afterwards.

    Eval mode makes an explanation deterministic and independent of the other images in the
    batch (batch norm uses its running statistics, dropout is off). Freezing the parameters
    means autograd records nothing below the target layer and never computes a weight gradient.
    """
    # One walk of the modules, and only what differs is set: this runs on every call.
    modules = list(model.modules())
    modes = [(module, module.training) for module in modules]
    flags = [
        (parameter, parameter.requires_grad)
        for module in modules
        for parameter in module._parameters.values()
        if parameter is not None
    ]
    # Checked before anything is set: requires_grad_ on one raises a ValueError, and camlens's
    # forward pass would initialise the user's model's weights.
    if any(isinstance(parameter, nn.parameter.UninitializedParameter) for parameter, _ in flags):
        raise CamlensError(
            "the model has uninitialised (lazy) parameters: run one forward pass of a batch of "
            "images through it before explaining"
        )
    try:
        for module, mode in modes:
            if mode:
                module.training = False
        for parameter, flag in flags:
            if flag:
                parameter.requires_grad_(False)
        yield
    finally:
        # Set the attribute directly: a model may override train() with side effects.
        for module, mode in modes:
            if module.training != mode:
                module.training = mode
        for parameter, flag in flags:
            if parameter.requires_grad != flag:
                parameter.requires_grad_(flag)


class Recorder:
    """Forward hooks that record the outputs of some modules during one forward pass.

    With ``track_grad`` the recorded output becomes a tensor that requires grad, so that the
    gradient of a score with respect to it can be taken. Because the parameters are frozen
    and the input does not require grad, autograd records only what comes after the first
    recorded layer: the backward pass never goes below it.

    The model receives a copy of each recorded output, so an in-place operation that follows
    the layer (``ReLU(inplace=True)``) cannot change what was recorded.
    """

    def __init__(self, modules: Mapping[str, nn.Module], track_grad: bool = False) -> None:
        self.modules = dict(modules)
        self.track_grad = track_grad
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Recorder:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise CamlensError(
                    f"layer {display_name(name)!r} outputs {describe(output)}, not a feature map "
                    "(N, channels, height, width); pick a convolutional layer "
                    "(see model.named_modules())"
                )
            if name in self.outputs:
                raise CamlensError(
                    f"layer {display_name(name)!r} runs more than once in one forward pass; "
                    "pick a layer that is used once"
                )
            if self.track_grad and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output.clone()

        return hook


@contextlib.contextmanager
def model_failures(model: nn.Module, inputs: Tensor) -> Iterator[None]:
    """Report a failure of ``model`` on ``inputs`` (any exception but a CamlensError) in one line.

    A model fails on a wrong input most often because of its channels: when its first
    convolution says which it expects, the message names the shape the model wants. The
    model's own exception stays attached as ``__cause__``.
    """
    try:
        yield
    except CamlensError:
        raise
    except Exception as error:
        shape = tuple(inputs.shape)
        expected = _input_channels(model)
        if expected is not None and len(shape) == 4 and expected != shape[1]:
            fix = (
                "the images look channels-last: use images.permute(0, 3, 1, 2)"
                if shape[3] == expected
                else f"convert the images to {expected} channel(s) (e.g. greyscale to RGB)"
            )
            got = f"(N, {', '.join(map(str, shape[1:]))})"
            raise CamlensError(f"the model expects (N, {expected}, H, W) images, got {got}: {fix}") from error
        raise CamlensError(
            f"the model failed on an input of shape {shape}: {first_line(error)} "
            "(check the input's shape and preprocessing, or the model)"
        ) from error


def _input_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution, when it has one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.in_channels
            return channels if isinstance(channels, int) and channels > 0 else None
    return None


def forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """Run the model and check that it returns class scores of shape (N, classes)."""
    return check_scores(model(inputs), inputs)


def check_scores(output: object, inputs: Tensor) -> Tensor:
    """``output`` if it is class scores (N, classes) for ``inputs``, else a clear error."""
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != inputs.shape[0]:
        raise CamlensError(
            f"the model returned {describe(output)}; camlens needs class scores of shape "
            f"({inputs.shape[0]}, classes): wrap the model so that forward() returns them"
        )
    return output


def record(
    model: nn.Module,
    inputs: Tensor,
    modules: Mapping[str, nn.Module],
    track_grad: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass, recording the outputs of ``modules``. Returns (logits, outputs)."""
    with Recorder(modules, track_grad=track_grad) as recorder:
        with torch.enable_grad() if track_grad else torch.no_grad():
            logits = forward(model, inputs)
    missing = [display_name(name) for name in modules if name not in recorder.outputs]
    if missing:
        raise CamlensError(
            f"layer(s) {', '.join(missing)} did not run during the forward pass; "
            "pick layers that the model's forward() calls"
        )
    return logits, recorder.outputs


def gradients(
    scores: Tensor,
    activations: Mapping[str, Tensor],
    rows: Tensor | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> dict[str, Tensor]:
    """Gradients of every target score with respect to each recorded activation.

    ``scores`` is (B, T); each activation (B, K, h, w). Returns ``{name: (B, T, K, h, w)}``.
    Row b of the scores depends only on row b of the activations (the model is in eval mode),
    so one backward of the column sum gives every image's gradient; the T targets share one
    vmapped backward (``is_grads_batched``) instead of T separate ones. ``rows`` (B,): the
    image each row is a version of, for error messages. ``create_graph`` and ``retain_graph``
    go to ``torch.autograd.grad``: a training step (GGAM) keeps the graph for its own backward,
    and differentiates through the gradients when they are not detached.
    """
    names = list(activations)
    tensors = [activations[name] for name in names]
    if not scores.requires_grad:
        raise CamlensError(
            f"the target score does not depend on layer(s) {', '.join(map(display_name, names))}: "
            "a unit target must be at or after the target layer"
        )
    count = scores.shape[1]
    if count == 1:
        grads = torch.autograd.grad(
            scores.sum(), tensors, allow_unused=True, create_graph=create_graph, retain_graph=retain_graph
        )
        grads = tuple(None if g is None else g.unsqueeze(1) for g in grads)
    else:
        selector = torch.eye(count, dtype=scores.dtype, device=scores.device)
        selector = selector.unsqueeze(1).expand(count, scores.shape[0], count)
        grads = torch.autograd.grad(
            scores,
            tensors,
            grad_outputs=selector,
            is_grads_batched=True,
            allow_unused=True,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
        grads = tuple(None if g is None else g.movedim(0, 1) for g in grads)
    result: dict[str, Tensor] = {}
    for name, grad in zip(names, grads):
        if grad is None:
            raise CamlensError(
                f"the target score does not depend on layer {display_name(name)!r}: "
                "a unit target must be at or after the target layer"
            )
        check_finite(grad, f"gradients at layer {display_name(name)!r}", rows)
        result[name] = grad
    return result


def check_finite(values: Tensor, what: str, rows: Tensor | None = None) -> None:
    """Raise a CamlensError naming the images whose values are NaN or infinite.

    Row b of ``values`` belongs to image ``rows[b]`` (a noisy copy, a masked input); by
    default to image b.
    """
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = (~finite).flatten(1).any(1)
    bad = (bad.nonzero().flatten() if rows is None else rows[bad].unique()).tolist()
    raise CamlensError(
        f"non-finite {what} (NaN or inf) for image(s) {bad}: check the input values "
        "(preprocessing, dtype) and the model; no map was made from them"
    )


def hooked_pass(
    model: nn.Module, example: Tensor, seen: Callable[[str, object, nn.Module, tuple], None]
) -> object:
    """One forward pass without gradients, every submodule hooked: ``seen(name, output, module,
    inputs)`` is called for each in order of completion. Returns what the model returned."""
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(
                    lambda m, inputs, output, name=name: seen(name, output, m, inputs)))
        with torch.no_grad():
            return model(example)
    finally:
        for handle in handles:
            handle.remove()


def _shape(output: object) -> torch.Size | str:
    return output.shape if isinstance(output, Tensor) else type(output).__name__


def trace_outputs(model: nn.Module, example: Tensor) -> list[tuple[str, torch.Size | str]]:
    """One forward pass with every submodule hooked: ``(name, output shape)`` in order of
    completion (the type name for outputs that are not tensors)."""
    trace: list[tuple[str, torch.Size | str]] = []
    hooked_pass(model, example, lambda name, output, *_: trace.append((name, _shape(output))))
    return trace


def default_layer_output(model: nn.Module, example: Tensor) -> tuple[Tensor, str, Tensor]:
    """One forward pass that finds :func:`default_layer` and keeps its output:
    ``(class scores, layer name, a copy of the layer's output)``.

    A layer that runs more than once in a forward pass has no single output to explain: refused.
    """
    trace: list[tuple[str, torch.Size | str]] = []
    kept: dict[str, Tensor] = {}

    def seen(name: str, output: object, *_: object) -> None:
        trace.append((name, _shape(output)))
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
            kept.clear()  # the default layer is the last such map: keep that one only
            kept[name] = output.clone()  # a copy: an in-place operation after the layer must not change it

    scores = hooked_pass(model, example, seen)
    layer = default_layer(trace)
    if sum(name == layer for name, _ in trace) > 1:
        raise CamlensError(f"layer {display_name(layer)!r} runs more than once in one forward pass; "
                           "name a layer that is used once (target_layer= or --target-layer)")
    return check_scores(scores, example), layer, kept[layer]


def default_layer(trace: Sequence[tuple[str, torch.Size | str]]) -> str:
    """The last module, in order of execution, whose output is a 4-D feature map larger than 1x1.

    That is the feature map that the classifier's global pooling reduces. Among modules that
    return the same map (a block and the container that ends with it), the outermost wins,
    because a container finishes after its children.
    """
    maps = [name for name, shape in trace if not isinstance(shape, str) and len(shape) == 4 and shape[-2:].numel() > 1]
    if not maps:
        raise CamlensError(
            "no module of this model outputs a 4-D feature map larger than 1x1; "
            "name a convolutional layer as the target layer (target_layer= or --target-layer)"
        )
    return maps[-1]


def find_default_layer(model: nn.Module, example: Tensor) -> str:
    """:func:`default_layer` of one traced forward pass of ``example``."""
    return default_layer(trace_outputs(model, example))


# model -> (its module tree when traced, {image signature: default layer name}). Weak keys: the
# cache never keeps a model alive. The tree is held as weak references to the module objects, so
# that a module replaced by a new one of the same type (possibly at the same address) is seen.
_found_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_found_layers_lock = threading.Lock()
_SHAPES_PER_MODEL = 32  # bounds the memory of a process that explains images of many sizes


def remembered_default_layer(model: nn.Module, images: Tensor) -> tuple[str, nn.Module]:
    """``(name, module)`` of :func:`find_default_layer` for ``images`` (N, C, H, W), traced on
    the first image once per model, module tree and image signature, then remembered.

    The signature is (C, H, W), dtype and device, not N: every module's output for a batch of N
    is that for one image with N rows (the trace already runs one image), while H and W can
    bring a late map down to 1x1. Adding, removing or replacing a module under any name
    re-traces. A forward whose shapes change with other state (an attribute set in place, such
    as a convolution's stride) is not seen: name the target layer for such a model.
    """
    modules = list(model.named_modules())
    signature = (tuple(images.shape[1:]), images.dtype, images.device)
    name = _remember(model, modules, signature)
    if name is None:
        name = find_default_layer(model, images[:1])  # not under the lock: a forward can be long
        _remember(model, modules, signature, name)
    return name, dict(modules)[name]


def _remember(
    model: nn.Module, modules: list[tuple[str, nn.Module]], signature: tuple, name: str | None = None
) -> str | None:
    """The default layer remembered for ``model`` with module tree ``modules`` and images of
    ``signature``; with ``name``, remember that (replacing a record made for another module
    tree, or one that holds too many signatures)."""
    with _found_layers_lock:
        tree, found = _found_layers.get(model, ((), {}))
        same = len(tree) == len(modules) and all(
            seen == named and ref() is module for (named, module), (seen, ref) in zip(modules, tree)
        )
        if name is None:
            return found.get(signature) if same else None
        if not same or len(found) >= _SHAPES_PER_MODEL:
            found = {}
            _found_layers[model] = (tuple((named, weakref.ref(module)) for named, module in modules), found)
        found[signature] = name
        return name
