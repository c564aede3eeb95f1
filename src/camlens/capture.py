"""Capture: layer lookup, hook lifetime, and what one forward (and backward) pass records.

Everything here leaves the model as it found it: hooks are removed, train/eval flags and
``requires_grad`` are restored, also when an exception is raised half-way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import numbers
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from .errors import CamlensError, first_line
from .timing import one_time

LayerSpec = Union[str, int, nn.Module]
LayersSpec = Union[LayerSpec, Sequence[LayerSpec]]
# What a model's forward() returned -> the tensor that targets score (see select_output).
OutputSpec = Union[None, int, str, Callable[[Any], Tensor]]


COMPILED_PREFIX = "_orig_mod."  # how torch.compile's wrapper names the modules of the model it wraps


def eager(model: nn.Module) -> nn.Module:
    """The model that ``torch.compile`` wrapped, or ``model`` itself.

    camlens hooks layers and takes gradients at them: on the compiled wrapper each new hook or
    layer would recompile the model, and the layers' names would all start with ``_orig_mod.``.
    The wrapped model holds the same parameters and gives the same maps (camlens's own
    ``compile=True`` compiles what can be compiled around the target layer).
    """
    wrapped = getattr(model, "_orig_mod", None)
    if isinstance(wrapped, nn.Module) and type(model).__name__ == "OptimizedModule":
        return wrapped
    return model


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
        if layer.startswith(COMPILED_PREFIX) and layer[len(COMPILED_PREFIX):] in modules:
            return layer[len(COMPILED_PREFIX):], modules[layer[len(COMPILED_PREFIX):]]  # a compiled model's name
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


# model -> its lock: one camlens call at a time on one model (see preserved). Weak keys, so a
# lock never keeps a model alive; the guard makes "get or create" atomic across threads.
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises camlens's calls on ``model`` across threads (one lock
    for a compiled model and the model it wraps)."""
    model = eager(model)
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode with frozen parameters, and restore both afterwards.

    Eval mode makes an explanation deterministic and independent of the other images in the
    batch (batch norm uses its running statistics, dropout is off). Freezing the parameters
    means autograd records nothing below the target layer and never computes a weight gradient.

    Calls on one model from several threads take turns (:func:`model_lock`, held for the whole
    block): the hooks of one call would otherwise record another's forward passes, and a call
    that began while another had frozen the model would "restore" it frozen.
    """
    with model_lock(model):
        yield from _preserved(model)


def _preserved(model: nn.Module) -> Iterator[None]:
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
    check_has_values(model)
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


@dataclass(frozen=True)
class TokenGrid:
    r"""How a layer that outputs tokens (a vision transformer's) becomes a feature map.

    Tokens (N, L, D), or (L, N, D), become the map (N, D, h, w): the first ``prefix`` tokens
    (class, distillation and register tokens) are left out, the other :math:`h w`, in row-major
    order as a patch embedding ``conv(x).flatten(2).transpose(1, 2)`` lays them, make the grid,
    and their D features are its channels. The model itself goes on with the same tokens, rebuilt
    from the recorded map, so the gradient of a score with respect to the map is its gradient
    with respect to the patch tokens, reshaped the same way, and every method works unchanged.

    Args:
        prefix: the number of tokens before the patches. None: inferred with the grid.
        size: the grid ``(h, w)``. None: inferred, as the largest grid of the input image's
            aspect ratio (a square for a square image) that fits in the L tokens, the tokens
            left over being the prefix. That is right whenever the prefix holds fewer than
            :math:`2\sqrt{hw} + 1` tokens (a class token, a distillation token and a few
            registers on any grid from 3x3); give ``prefix`` or ``size`` otherwise, and
            ``size`` when the input's aspect ratio is not the grid's.
        batch_first: whether the tokens are (N, L, D) (True) or (L, N, D) (False, e.g.
            ``nn.TransformerEncoderLayer`` without ``batch_first``). None: the dimension of
            size N is the batch; (N, L, D) when both are.
        suffix: the number of tokens after the patches (YOLOS's detection tokens), left out of
            the grid as the prefix is, and given back to the model as they were.
    """

    prefix: int | None = None
    size: tuple[int, int] | None = None
    batch_first: bool | None = None
    suffix: int = 0

    def __post_init__(self) -> None:
        if self.prefix is not None and not (_is_count(self.prefix) and self.prefix >= 0):
            raise CamlensError(f"a token grid's prefix is a number of tokens (an integer >= 0), got {self.prefix!r}")
        if self.size is not None:
            if not (isinstance(self.size, (tuple, list)) and len(self.size) == 2
                    and all(_is_count(side) and side >= 1 for side in self.size)):
                raise CamlensError(f"a token grid's size is a pair of positive integers (h, w), got {self.size!r}")
            object.__setattr__(self, "size", tuple(int(side) for side in self.size))
        if self.batch_first not in (None, True, False):
            raise CamlensError(f"batch_first must be True, False or None, got {self.batch_first!r}")
        if not (_is_count(self.suffix) and self.suffix >= 0):
            raise CamlensError(f"a token grid's suffix is a number of tokens (an integer >= 0), got {self.suffix!r}")

    def layout(self, length: int, image_size: Sequence[int]) -> tuple[int, int, int]:
        """``(prefix, h, w)`` for a sequence of ``length`` tokens from images of ``image_size``
        (H, W); a CamlensError, without the layer's name, where the tokens make no such grid."""
        if self.suffix:
            if length <= self.suffix:
                raise CamlensError(f"its {length} tokens leave none before the {self.suffix} suffix token(s)")
            return dataclasses.replace(self, suffix=0).layout(length - self.suffix, image_size)
        if self.size is not None:
            h, w = self.size
            prefix = length - h * w if self.prefix is None else self.prefix
            if prefix < 0 or prefix + h * w != length:
                raise CamlensError(f"its {length} tokens are not {prefix} prefix token(s) and a {h}x{w} grid")
            return prefix, h, w
        height, width = image_size
        common = math.gcd(height, width)
        a, b = height // common, width // common  # the smallest grid of the image's aspect ratio
        if self.prefix is not None:
            patches = length - self.prefix
            scale = math.isqrt(max(patches, 0) // (a * b))
            if scale == 0 or a * b * scale * scale != patches:
                shape = "square" if a == b else f"{a}:{b}, the input's aspect ratio"
                raise CamlensError(
                    f"its {length} tokens less {self.prefix} prefix token(s) leave {patches}, which make no "
                    f"grid ({shape}): give the grid's size (h, w)"
                )
            return self.prefix, a * scale, b * scale
        scale = math.isqrt(length // (a * b))
        if scale == 0:
            raise CamlensError(
                f"its {length} tokens make no grid of the input's aspect ratio {height}:{width}: "
                "give the grid's size (h, w)"
            )
        return length - a * b * scale * scale, a * scale, b * scale

    def applies(self, output: object) -> bool:
        """Whether ``output`` is tokens this grid reads (3-D); a 4-D map is taken as it is."""
        return isinstance(output, Tensor) and output.dim() == 3

    def describe(self) -> str:
        """The spec as ``reshape=`` and ``--reshape`` take it (:func:`token_grid`)."""
        parts = ["tokens"]
        if self.prefix is not None:
            parts.append(str(self.prefix))
        if self.size is not None:
            parts.append(f"{self.size[0]}x{self.size[1]}")
        if self.suffix:
            parts.append(f"+{self.suffix}")
        if self.batch_first is False:
            parts.append("lnd")
        return ":".join(parts)

    def to_grid(self, output: Tensor, images: Sequence[int], name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``(grid, rebuild)``: the map (N, D, h, w) of the tokens ``output`` of layer ``name``
        for a batch of ``images`` (N, C, H, W), and the function giving the layer's output, the
        same tokens, from a map (the recorded one, which may require grad)."""
        _images_only(self, images)
        count = images[0]
        batch_first = self.batch_first
        if batch_first is None:
            batch_first = output.shape[0] == count or output.shape[1] != count
        tokens = output if batch_first else output.transpose(0, 1)
        if tokens.shape[0] != count:
            order = "(N, L, D)" if batch_first else "(L, N, D)"
            raise CamlensError(
                f"layer {display_name(name)!r} outputs tokens of shape {tuple(output.shape)}, which is not "
                f"{order} for a batch of {count}: give batch_first"
            )
        try:
            prefix, h, w = self.layout(tokens.shape[1], images[-2:])
        except CamlensError as error:
            raise CamlensError(
                f"layer {display_name(name)!r} outputs tokens of shape {tuple(output.shape)}: {error} "
                "(reshape=TokenGrid(prefix=..., size=(h, w)), or --reshape tokens:PREFIX:HxW)"
            ) from None
        grid = tokens[:, prefix:prefix + h * w].transpose(1, 2).reshape(count, tokens.shape[2], h, w)
        head, tail = tokens[:, :prefix], tokens[:, prefix + h * w:]

        def rebuild(recorded: Tensor) -> Tensor:
            rebuilt = torch.cat([head, recorded.flatten(2).transpose(1, 2), tail], dim=1)
            return rebuilt if batch_first else rebuilt.transpose(0, 1)

        return grid, rebuild


def _images_only(layout: TokenGrid | ChannelsLast, images: Sequence[int]) -> None:
    if len(images) != 4:
        raise CamlensError(f"reshape {layout.describe()!r} reads a layer's output for images (N, C, H, W), not for "
                           f"inputs of shape {tuple(images)}: name a layer whose output is a feature map of them")


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChannelsLast:
    """A layer whose feature map is channels-last, (N, H, W, C) (ConvNeXt's and Swin's stages in
    some implementations): read as (N, C, H, W), and given back to the model as it was."""

    def applies(self, output: object) -> bool:
        return isinstance(output, Tensor) and output.dim() == 4

    def describe(self) -> str:
        return "nhwc"

    def to_grid(self, output: Tensor, images: Sequence[int], name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        _images_only(self, images)
        if output.shape[0] != images[0]:
            raise CamlensError(f"layer {display_name(name)!r} outputs {describe(output)}, not channels-last "
                               f"(N, H, W, C) for a batch of {images[0]}")
        return output.permute(0, 3, 1, 2), lambda recorded: recorded.permute(0, 2, 3, 1)


@dataclass(frozen=True)
class Frames:
    """A 2-D backbone's feature maps of a clip's frames, folded into the batch as a video model
    runs them (``x.transpose(1, 2).reshape(N * T, C, H, W)``, clip by clip, frame by frame):
    (N*T, K, h, w) for clips (N, C, T, H, W), read as the map (N, K, T, h, w) of each clip, whose
    map is then of the clip's own shape (T, H, W). ``reshape="frames"``."""

    def applies(self, output: object) -> bool:
        return isinstance(output, Tensor) and output.dim() == 4

    def describe(self) -> str:
        return "frames"

    def to_grid(self, output: Tensor, images: Sequence[int], name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if len(images) != 5 or output.shape[0] != images[0] * images[2]:
            clips = (f"clips (N, C, T, H, W) = {tuple(images)}" if len(images) == 5
                     else f"inputs {tuple(images)}, not clips (N, C, T, H, W)")
            raise CamlensError(f"reshape 'frames' reads a 2-D layer's maps of a clip's frames, one row per frame "
                               f"(N*T, K, h, w); layer {display_name(name)!r} outputs {describe(output)} for {clips}")
        count, frames = images[0], images[2]
        grid = output.unflatten(0, (count, frames)).transpose(1, 2)
        return grid, lambda recorded: recorded.transpose(1, 2).flatten(0, 1)


@dataclass(frozen=True)
class Reshaped:
    r"""A layer's output made a feature map (N, C, h, w) by a function of the user's, as
    pytorch-grad-cam's ``reshape_transform``: ``function(output) -> (N, C, h, w)``.

    The model goes on from the recorded map :math:`g = f(x)` through
    :math:`x' = J^	op g + (x - J^	op f(x))`, with :math:`J` the Jacobian of ``function`` at the
    layer's output :math:`x`: the model's own output is unchanged (:math:`x' = x`), and the
    gradient of a score with respect to the map is :math:`J \, \partial y / \partial x`, the
    output's gradient through the same function, as pytorch-grad-cam takes it (exact for the
    re-indexings such functions are: slicing off tokens, reshaping, permuting).
    """

    function: Callable[[Tensor], Tensor]

    def applies(self, output: object) -> bool:
        return isinstance(output, Tensor)

    def describe(self) -> str:
        return getattr(self.function, "__qualname__", None) or repr(self.function)

    def to_grid(self, output: Tensor, images: Sequence[int], name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        x = output.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                grid = self.function(x)
        except Exception as error:
            raise CamlensError(f"reshape {self.describe()} failed on layer {display_name(name)!r}'s output "
                               f"{describe(output)}: {first_line(error)}") from error
        if not (isinstance(grid, Tensor) and grid.dim() == len(images) and grid.shape[0] == images[0] and grid.requires_grad):
            raise CamlensError(f"reshape {self.describe()} made {describe(grid)} of layer {display_name(name)!r}'s "
                               f"output {describe(output)}, not a map {_map_shape(len(images))} of it for a batch "
                               f"of {images[0]}")
        with torch.enable_grad():
            (back,) = torch.autograd.grad(grid, x, grid.detach(), retain_graph=True)
        offset = output - back

        def rebuild(recorded: Tensor) -> Tensor:
            with torch.enable_grad():
                (placed,) = torch.autograd.grad(grid, x, recorded, retain_graph=True,
                                                create_graph=recorded.requires_grad)
            return placed + offset

        return grid.detach(), rebuild


ReshapeSpec = Union[None, str, TokenGrid, ChannelsLast, Frames, Reshaped, Callable[[Tensor], Tensor]]
Layout = Union[TokenGrid, ChannelsLast, Frames, Reshaped]
_TOKENS = re.compile(r"tokens(?::(\d+))?(?::(\d+)x(\d+))?(?::\+(\d+))?(:lnd)?")


def token_grid(spec: ReshapeSpec) -> Layout | None:
    """A ``reshape`` option as a layout: None; a :class:`TokenGrid`, :class:`ChannelsLast` or
    :class:`Reshaped`; the text ``tokens[:PREFIX][:HxW][:+SUFFIX][:lnd]`` (``tokens``: everything
    inferred; ``+SUFFIX``: tokens after the patches; ``lnd``: tokens (L, N, D)), ``nhwc`` or
    ``frames`` (:class:`Frames`); or a
    function of the layer's output to (N, C, h, w)."""
    if spec is None or isinstance(spec, (TokenGrid, ChannelsLast, Frames, Reshaped)):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return Reshaped(spec)
    if isinstance(spec, str) and spec.strip().lower() in ("nhwc", "frames"):
        return ChannelsLast() if spec.strip().lower() == "nhwc" else Frames()
    match = _TOKENS.fullmatch(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None:
        raise CamlensError(
            f"unknown reshape {spec!r}: give 'tokens' (a vision transformer's token sequence to a grid, "
            "everything inferred), 'tokens:PREFIX', 'tokens:HxW', 'tokens:PREFIX:HxW', 'tokens:PREFIX:HxW:+SUFFIX' "
            "(tokens after the patches), 'nhwc' (a channels-last "
            "map), 'frames' (a 2-D backbone's maps of a clip's frames), a TokenGrid, or a function of the layer's "
            "output to (N, C, h, w)"
        )
    prefix, h, w, suffix, lnd = match.groups()
    return TokenGrid(
        prefix=None if prefix is None else int(prefix),
        size=None if h is None else (int(h), int(w)),
        batch_first=False if lnd else None,
        suffix=0 if suffix is None else int(suffix),
    )


class PerImage:
    """A forward argument with one row per image (an ``attention_mask``, a per-image text's
    ``input_ids``): every pass that forwards versions of the images (masked, noisy, augmented)
    gives the model the rows of the images they are versions of. An argument not so marked is
    the same for every pass (a fixed set of texts, a flag)."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        if not isinstance(value, Tensor) or value.dim() == 0:
            raise CamlensError(f"PerImage holds a tensor with one row per image, not {describe(value)}")
        self.value = value

    def __repr__(self) -> str:
        return f"PerImage({describe(self.value)})"


@dataclass(frozen=True)
class ForwardInputs:
    """What the model takes besides the images, in every forward pass of a method
    (Captum's ``additional_forward_args``): ``model(images, *args, **kwargs)``, or, with
    ``images_as``, ``model(*args, **{images_as: images}, **kwargs)`` (Hugging Face's
    ``pixel_values=``). Values wrapped in :class:`PerImage` follow the images' rows; ``count``:
    the number of images."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    images_as: str | None = None
    count: int = 0

    @classmethod
    def make(cls, args: object, kwargs: object, images_as: object, count: int) -> ForwardInputs | None:
        """Checked inputs for ``count`` images; None when there are none."""
        if args is None and kwargs is None and images_as is None:
            return None
        if args is None:
            args = ()
        elif not isinstance(args, (tuple, list)):
            args = (args,)
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
            raise CamlensError(f"forward_kwargs is a dict of keyword arguments, not {type(kwargs).__name__}")
        if images_as is not None and (not isinstance(images_as, str) or not images_as.isidentifier()):
            raise CamlensError(f"images_as is the name of the model's image argument (e.g. 'pixel_values'), "
                               f"not {images_as!r}")
        if images_as is not None and images_as in kwargs:
            raise CamlensError(f"forward_kwargs gives {images_as!r}, the argument the images go to (images_as)")
        for value in _leaves((args, kwargs)):
            if isinstance(value, PerImage) and value.value.shape[0] != count:
                raise CamlensError(f"a PerImage argument of shape {tuple(value.value.shape)} has "
                                   f"{value.value.shape[0]} rows for {count} images: give one row per image")
        return cls(tuple(args), dict(kwargs), images_as, count)

    @property
    def per_image(self) -> bool:
        return any(isinstance(value, PerImage) for value in _leaves((self.args, self.kwargs)))

    def take(self, rows: Tensor) -> ForwardInputs:
        """The inputs of a batch whose row b is a version of image ``rows[b]``."""
        rows = rows.reshape(-1)
        return ForwardInputs(_rows(self.args, rows, True), _rows(dict(self.kwargs), rows, True), self.images_as,
                             rows.numel())

    def call(self, images: Tensor, given_args: tuple, given_kwargs: dict) -> tuple[tuple, dict]:
        """The arguments of ``model(images)`` with these inputs added, for the rows being run."""
        rows = _BATCH_ROWS.get()
        if rows is None:
            if images.shape[0] != self.count and self.per_image:
                raise CamlensError(
                    f"a forward pass of {images.shape[0]} inputs for {self.count} images, which camlens cannot "
                    "match to per-image arguments: pass the arguments as fixed ones, or report this"
                )
            rows = torch.arange(images.shape[0], device=images.device) if self.per_image else None
        args = _rows(self.args, rows)
        kwargs = {**given_kwargs, **_rows(dict(self.kwargs), rows)}
        if self.images_as is not None:
            return (*given_args[1:], *args), {self.images_as: images, **kwargs}
        return (*given_args, *args), kwargs


def _leaves(value: object) -> Iterator[object]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _rows(value: object, rows: Tensor | None, keep: bool = False) -> Any:
    """``value`` with every :class:`PerImage` taken at ``rows`` (kept marked with ``keep``, else
    unwrapped), the rest as it is."""
    if isinstance(value, PerImage):
        taken = value.value if rows is None else value.value.index_select(0, rows.to(value.value.device))
        return PerImage(taken) if keep else taken
    if isinstance(value, tuple):
        return tuple(_rows(item, rows, keep) for item in value)
    if isinstance(value, list):
        return [_rows(item, rows, keep) for item in value]
    if isinstance(value, dict):
        return {key: _rows(item, rows, keep) for key, item in value.items()}
    return value


_FORWARD_INPUTS: ContextVar[ForwardInputs | None] = ContextVar("camlens_forward_inputs", default=None)
_BATCH_ROWS: ContextVar[Tensor | None] = ContextVar("camlens_batch_rows", default=None)


def forward_inputs() -> ForwardInputs | None:
    """The forward inputs of the call running in this thread (None: the images alone)."""
    return _FORWARD_INPUTS.get()


@contextlib.contextmanager
def batch_rows(rows: Tensor) -> Iterator[None]:
    """Passes in this block forward versions of images ``rows`` (row b: of image ``rows[b]``)."""
    token = _BATCH_ROWS.set(rows.reshape(-1))
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


@contextlib.contextmanager
def bound_inputs(model: nn.Module, inputs: ForwardInputs | None) -> Iterator[None]:
    """In this block, every call ``model(x)`` from this thread gets ``inputs`` too (a forward
    pre-hook that reads them from a context variable: another thread's calls are left alone)."""
    if inputs is None:
        yield
        return
    token = _FORWARD_INPUTS.set(inputs)
    handle = model.register_forward_pre_hook(_add_inputs, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        _FORWARD_INPUTS.reset(token)


def _add_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    inputs = _FORWARD_INPUTS.get()
    if inputs is None or not args or not isinstance(args[0], Tensor):
        return None
    return inputs.call(args[0], args, kwargs)


class Recorder:
    """Forward hooks that record the outputs of some modules during one forward pass.

    With ``track_grad`` the recorded output becomes a tensor that requires grad, so that the
    gradient of a score with respect to it can be taken. Because the parameters are frozen
    and the input does not require grad, autograd records only what comes after the first
    recorded layer: the backward pass never goes below it.

    The model receives a copy of each recorded output, so an in-place operation that follows
    the layer (``ReLU(inplace=True)``) cannot change what was recorded.

    With ``reshape``, a layer that outputs tokens (3-D) is recorded as the feature map
    :meth:`TokenGrid.to_grid` makes of them (``images``: the shape of the batch); 4-D outputs
    are feature maps already and are recorded as they are.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        track_grad: bool = False,
        reshape: Layout | None = None,
        images: Sequence[int] = (),
    ) -> None:
        self.modules = dict(modules)
        self.track_grad = track_grad
        self.reshape = reshape
        self.images = tuple(images)
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
            laid_out = self.reshape is not None and self.reshape.applies(output)
            dims = len(self.images) or 4
            if not (isinstance(output, Tensor) and (output.dim() == dims or laid_out)):
                hint = ""
                if dims == 4 and isinstance(output, Tensor) and output.dim() == 3:
                    hint = ", or for a vision transformer's tokens (N, L, D) give reshape='tokens' (--reshape tokens)"
                elif dims == 5 and isinstance(output, Tensor) and output.dim() == 4:
                    hint = ", or for a 2-D backbone's maps of a clip's frames (N*T, K, h, w) give reshape='frames'"
                raise CamlensError(
                    f"layer {display_name(name)!r} outputs {describe(output)}, not a feature map "
                    f"{_map_shape(dims)}; pick a convolutional layer "
                    f"(see model.named_modules()){hint}"
                )
            if name in self.outputs:
                raise CamlensError(
                    f"layer {display_name(name)!r} runs more than once in one forward pass; "
                    "pick a layer that is used once"
                )
            if self.images and output.shape[0] != self.images[0] and not laid_out:
                # (N, ...) is one row per image; anything else (attention weights, a bias table, a
                # batch folded with heads) cannot be split into maps per image: never a map for
                # two images, or half a map each.
                raise CamlensError(
                    f"layer {display_name(name)!r} outputs {describe(output)}: {output.shape[0]} rows for "
                    f"{self.images[0]} images, not one per image; pick a layer whose output has one row per "
                    "image (see camlens layers)"
                )
            rebuild = None
            if laid_out:
                output, rebuild = self.reshape.to_grid(output, self.images, name)
                if output.dim() != dims:
                    raise CamlensError(
                        f"reshape {self.reshape.describe()!r} makes a map {tuple(output.shape)} of layer "
                        f"{display_name(name)!r}'s output, not {_map_shape(dims)} for inputs {tuple(self.images)}"
                    )
            if self.track_grad and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            # The model goes on from the recorded map, so that gradients reach it.
            return output.clone() if rebuild is None else rebuild(output)

        return hook


# True while a caller (CAMMethod's weigh step) retries after the device runs out of memory.
_RETRIED: ContextVar[bool] = ContextVar("camlens_out_of_memory_retried", default=False)


@contextlib.contextmanager
def out_of_memory_retried() -> Iterator[None]:
    """In this block, :func:`model_failures` lets the device's out-of-memory errors through as
    they are: the caller tries again with smaller batches (elsewhere they are a model's failure)."""
    token = _RETRIED.set(True)
    try:
        yield
    finally:
        _RETRIED.reset(token)


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
        if isinstance(error, torch.OutOfMemoryError) and _RETRIED.get():
            raise  # the caller tries again with smaller batches
        shape = tuple(inputs.shape)
        spatial, expected = _first_convolution(model) or (None, None)
        if expected is not None and len(shape) == spatial + 2 and expected != shape[1]:
            noun = "images" if spatial == 2 else "inputs"
            order = ", ".join(map(str, range(1, spatial + 1)))
            fix = (
                f"the {noun} look channels-last: use {noun}.permute(0, {spatial + 1}, {order})"
                if shape[-1] == expected
                else f"convert the {noun} to {expected} channel(s)" + (" (e.g. greyscale to RGB)" if spatial == 2 else "")
            )
            got = f"(N, {', '.join(map(str, shape[1:]))})"
            raise CamlensError(f"the model expects {input_kind(spatial, expected)}, got {got}: {fix}") from error
        raise CamlensError(
            f"the model failed on an input of shape {shape}: {first_line(error)} "
            "(check the input's shape and preprocessing, or the model)"
        ) from error


_CONVOLUTIONS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_POSITIONS = {1: "L", 2: "H, W", 3: "D, H, W"}


def _map_shape(dims: int) -> str:
    """A feature map's shape for inputs of ``dims`` dimensions, named."""
    return {3: "(N, channels, length)", 4: "(N, channels, height, width)"}.get(dims, "(N, channels, depth, height, width)")


def input_kind(spatial: int, channels: object = "C") -> str:
    """The shape of a batch with ``spatial`` dimensions of positions, named: (N, C, L) signals,
    (N, C, H, W) images, (N, C, D, H, W) volumes or clips."""
    kind = {1: "signals", 2: "images", 3: "volumes or clips"}[spatial]
    return f"(N, {channels}, {_POSITIONS[spatial]}) {kind}"


def _first_convolution(model: nn.Module) -> tuple[int, int | None] | None:
    """``(its dimensions, its input channels)`` of the model's first convolution (1-D, 2-D or
    3-D), when it has one; channels None where they are not a positive int."""
    for module in model.modules():
        for kind, spatial in _CONVOLUTIONS.items():
            if isinstance(module, kind):
                channels = module.in_channels
                return spatial, channels if isinstance(channels, int) and channels > 0 else None
    return None


def batch_of(inputs: Tensor, model: nn.Module) -> Tensor:
    """``inputs`` as a batch (N, C, *positions), with 1 to 3 dimensions of positions: one item
    gains the batch dimension, told apart from a batch by the model's first convolution: (C, H, W)
    is one image for a 2-D model (or one without convolutions), (C, L) one signal for a 1-D model,
    (C, D, H, W) one volume for a 3-D model. A 2-D model may take (N, C, T, H, W) clips, which it
    runs frame by frame itself."""
    spatial = input_spatial(model) or 2
    if inputs.dim() == spatial + 1:
        inputs = inputs.unsqueeze(0)
    if not 3 <= inputs.dim() <= 5:
        expected = ("images must have shape (N, C, H, W) or (C, H, W), or be (N, C, L) signals or (N, C, D, H, W) "
                    "volumes or clips" if spatial == 2 else
                    f"inputs must be {input_kind(spatial)} or one (C, {_POSITIONS[spatial]}), as the model's first "
                    "convolution takes")
        raise CamlensError(f"{expected}, got {tuple(inputs.shape)}")
    return inputs


def input_spatial(model: nn.Module) -> int | None:
    """How many dimensions of positions the model's inputs have, as its first convolution says:
    1 (Conv1d: signals), 2 (Conv2d: images), 3 (Conv3d: volumes, clips); None without one."""
    first = _first_convolution(model)
    return None if first is None else first[0]


def forward(model: nn.Module, inputs: Tensor) -> Tensor:
    """Run the model and check that it returns class scores of shape (N, classes)."""
    return check_scores(model(inputs), inputs)


def check_scores(output: object, inputs: Tensor, selector: OutputSpec = None) -> Tensor:
    """The class scores (N, classes) for ``inputs`` in what the model returned (picked as
    :func:`model_output` does with ``selector``), else a clear error."""
    scores = model_output(output, inputs, selector)
    if scores.dim() != 2:
        raise CamlensError(
            f"the model returned {describe(output)}; camlens needs class scores of shape "
            f"({inputs.shape[0]}, classes): wrap the model so that forward() returns them"
        )
    return scores


def model_output(output: object, inputs: Tensor, selector: OutputSpec = None) -> Tensor:
    """The tensor that targets score, with one row per input, in what the model returned.

    ``selector`` (a method's ``output=`` option):

    - None: the one tensor there is no doubt about: the output itself when it is a tensor; its
      ``logits`` (a Hugging Face output, any object with a ``logits`` tensor, a dict with a
      ``'logits'`` key); the single tensor in a dict, tuple or list. Anything else (a tuple
      ``(logits, features)``) is ambiguous, and the error lists what it holds.
    - an int: that element of a tuple or list (or key of a dict);
    - a str: that key of a dict, or attribute of an object;
    - a function: called with what the model returned, it returns the tensor.

    Class targets need the tensor to be class scores (N, classes); a target function takes
    any tensor with N rows (N, ...).
    """
    count = inputs.shape[0]
    chosen = _select(output, selector, count)
    if chosen.dim() == 0 or chosen.shape[0] != count:
        what = describe(output) if chosen is output else f"{describe(output)}, and output={_named(selector)} picks {describe(chosen)}"
        raise CamlensError(
            f"the model returned {what}; camlens needs class scores of shape ({count}, classes), or one "
            f"output per image ({count}, ...) for a target function: wrap the model so that forward() "
            "returns them, or pick them with output="
        )
    return chosen


def _named(selector: OutputSpec) -> str:
    return getattr(selector, "__qualname__", None) or repr(selector)


def _items(output: object) -> list[tuple[object, object]]:
    """What a model's output holds: ``(index, key or attribute, value)`` pairs of a dict, a
    tuple or list (named tuples too), a dataclass (with or without ``__slots__``) or another
    object's public attributes."""
    if isinstance(output, Mapping):
        return list(output.items())
    if isinstance(output, (tuple, list)):
        return list(enumerate(output))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [(field.name, getattr(output, field.name, None)) for field in dataclasses.fields(output)]
    return [(key, value) for key, value in getattr(output, "__dict__", {}).items() if not key.startswith("_")]


def _tensors_in(value: object, depth: int = 0) -> int:
    """How many tensors ``value`` holds, nested containers included (a few levels deep)."""
    if isinstance(value, Tensor):
        return 1
    if depth >= 4 or isinstance(value, (str, bytes)):
        return 0
    if isinstance(value, (Mapping, tuple, list)) or dataclasses.is_dataclass(value):
        return sum(_tensors_in(item, depth + 1) for _, item in _items(value))
    return 0


def _candidates(output: object) -> list[tuple[object, object]]:
    """The tensors a model's output holds, and the containers in it that hold tensors, with
    the index, key or attribute of each."""
    return [(key, value) for key, value in _items(output) if _tensors_in(value, 1)]


def _step(container: object, expression: str, key: object) -> str:
    """``expression`` (the container) followed by how to reach its item ``key``."""
    if isinstance(container, (Mapping, tuple, list)):
        return f"{expression}[{key!r}]"
    return f"{expression}.{key}"


def _path_to_tensor(value: object, expression: str, depth: int = 0) -> str | None:
    """How a function reaches the first tensor nested in ``value`` (``out[0]['logits']``)."""
    if isinstance(value, Tensor):
        return expression
    if depth >= 4:
        return None
    for key, item in _items(value):
        if _tensors_in(item, depth + 1):
            return _path_to_tensor(item, _step(value, expression, key), depth + 1)
    return None


def _listing(found: list[tuple[object, object]]) -> str:
    if not found:
        return "it holds no tensor"
    parts = []
    for key, value in found:
        if isinstance(value, Tensor):
            parts.append(f"{key!r} {tuple(value.shape)}")
        else:
            count = _tensors_in(value, 1)
            parts.append(f"{key!r} ({type(value).__name__} of {count} tensor{'s' if count > 1 else ''})")
    return "it holds " + ", ".join(parts)


def _select(output: object, selector: OutputSpec, count: int) -> Tensor:
    if isinstance(output, Tensor) and (selector is None or isinstance(selector, (int, str))):
        if selector is None:
            return output
        raise CamlensError(
            f"output={selector!r} picks from a tuple, list, dict or object, but the model returned "
            f"{describe(output)}: leave output=None"
        )
    found = _candidates(output)
    listing = _listing(found)
    if selector is None:
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        # The single tensor of a tuple, list or dict, where nothing else in it holds one: a
        # tensor beside a nested container of tensors ((logits, features), aux) is ambiguous.
        if len(found) == 1 and isinstance(found[0][1], Tensor) and isinstance(output, (Mapping, tuple, list)):
            return found[0][1]
        path = next((_path_to_tensor(value, _step(output, "out", key), 1) for key, value in found
                     if not isinstance(value, Tensor)), None)
        nested = f", e.g. output=lambda out: {path}" if path is not None else ""
        raise CamlensError(
            f"the model returned {describe(output)}; camlens needs class scores of shape ({count}, classes), "
            f"or one output per image for a target function: {listing}; pick one with output= (--output on "
            f"the command line: an index, a key, an attribute name, or in Python a function of the model's "
            f"output){nested}"
        )
    if isinstance(selector, bool) or not (isinstance(selector, (int, str)) or callable(selector)):
        raise CamlensError(
            "output must be None (automatic), an int (an index), a str (a key or attribute) or a function "
            f"of the model's output, not {type(selector).__name__}"
        )
    if callable(selector):
        try:
            chosen = selector(output)
        except CamlensError:
            raise
        except Exception as error:
            raise CamlensError(
                f"output={_named(selector)} failed on what the model returned ({describe(output)}): "
                f"{first_line(error)}"
            ) from error
    elif isinstance(output, Mapping) or isinstance(selector, int):
        try:
            chosen = output[selector]
        except (KeyError, IndexError, TypeError):
            raise CamlensError(
                f"output={selector!r}: the model returned {describe(output)}, which has no element "
                f"{selector!r}; {listing}"
            ) from None
    elif hasattr(output, selector):
        chosen = getattr(output, selector)
    else:
        raise CamlensError(
            f"output={selector!r}: the model returned {describe(output)}, which has no attribute "
            f"{selector!r}; {listing}"
        )
    if not isinstance(chosen, Tensor):
        raise CamlensError(
            f"output={_named(selector)} picks {describe(chosen)} in what the model returned, not a tensor; "
            f"{listing}"
        )
    return chosen


class SelectedOutput(nn.Module):
    """``module`` giving the tensor that ``selector`` picks in what it returns
    (:func:`model_output`)."""

    def __init__(self, module: nn.Module, selector: OutputSpec = None) -> None:
        super().__init__()
        self.module = module
        self.selector = selector

    def forward(self, inputs: Tensor) -> Tensor:
        return model_output(self.module(inputs), inputs, self.selector)


def record(
    model: nn.Module,
    inputs: Tensor,
    modules: Mapping[str, nn.Module],
    track_grad: bool = False,
    *,
    output: OutputSpec = None,
    reshape: Layout | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass, recording the outputs of ``modules`` (token layers as maps, with
    ``reshape``). Returns (the model's output picked by ``output``, :func:`model_output`;
    the recorded outputs)."""
    with Recorder(modules, track_grad=track_grad, reshape=reshape, images=inputs.shape) as recorder:
        with torch.enable_grad() if track_grad else torch.no_grad():
            scores = model_output(model(inputs), inputs, output)
    missing = [display_name(name) for name in modules if name not in recorder.outputs]
    if missing:
        raise CamlensError(
            f"layer(s) {', '.join(missing)} did not run during the forward pass; "
            "pick layers that the model's forward() calls"
        )
    return scores, recorder.outputs


_DEPENDS = (
    "a unit target must be at or after the target layer, and a target function must compute its score "
    "from the model's output with torch operations (no .item(), NumPy or detach())"
)


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
            f"{_DEPENDS}"
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
                f"the target score does not depend on layer {display_name(name)!r}: {_DEPENDS}"
            )
        check_finite(grad, f"gradients at layer {display_name(name)!r}", rows)
        result[name] = grad
    return result


def check_has_values(item: Tensor | nn.Module, what: str = "model's weights") -> None:
    """Refuse tensors, or a model's parameters and buffers, on the meta device (shapes, no values):
    torch's own errors there ("Tensor.item() cannot be called on meta tensors") say nothing of
    what to do."""
    tensors = [item] if isinstance(item, Tensor) else [*item.parameters(), *item.buffers()]
    if not any(tensor.is_meta for tensor in tensors):
        return
    fix = ("load them first (model.to_empty(device='cpu'), then model.load_state_dict(...)), or build the "
           "model on a real device") if isinstance(item, nn.Module) else "make them on a real device (cpu, cuda, mps)"
    raise CamlensError(f"the {what} are on the meta device, which holds no values: {fix}")


def check_finite(values: Tensor, what: str, rows: Tensor | None = None) -> None:
    """Raise a CamlensError naming the images whose values are NaN or infinite.

    Row b of ``values`` belongs to image ``rows[b]`` (a noisy copy, a masked input); by
    default to image b.
    """
    check_has_values(values, what)
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
    inputs)`` is called for each in order of completion. Returns what the model returned.

    In eval mode, under :func:`preserved`: a model in training mode would otherwise update its
    batch norm statistics (and drop out units) in a pass that only looks at it; and another
    thread's forward pass must not reach these hooks."""
    handles = []
    with preserved(model):
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


def default_layer_output(
    model: nn.Module, example: Tensor, output: OutputSpec = None, classes: bool = True
) -> tuple[Tensor, DefaultLayer, Tensor]:
    """:func:`default_layer` and, from the same pass, the layer's output:
    ``(class scores, the layer found, a copy of the layer's output as the layer returned it)``;
    with ``classes`` False, the output ``output`` picks, whatever its shape (a detector's).

    A layer that runs more than once in a forward pass has no single output to explain: refused.
    """
    found, scores, seen, versions = _default_search(model, example, output)
    layer = found.name
    if (signature := _signature(example, output)) is not None:  # the methods' own search is then done
        _remember(model, list(model.named_modules()), signature, found)
    kept = [out for name, out in seen if name == layer and isinstance(out, Tensor)]
    if len(kept) == 1 and kept[0]._version != versions[id(kept[0])]:
        # Changed in place after the layer (ReLU(inplace=True), a residual's +=): its own values,
        # from a pass that copies them as the layer returns them.
        kept = []
        hooked_pass(model, example, lambda name, out, *_: kept.append(out.clone()) if name == layer else None)
    kept = [out.detach().clone() for out in kept]
    scores = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, scores)
    if len(kept) != 1:
        raise CamlensError(f"layer {display_name(layer)!r} runs more than once in one forward pass; "
                           "name a layer that is used once (target_layer= or --target-layer)")
    return (check_scores if classes else model_output)(scores, example, output), found, kept[0]


def find_default_layer(model: nn.Module, example: Tensor, output: OutputSpec = None) -> str:
    """The name of the default target layer for images like ``example`` (see :func:`default_layer`);
    ``output`` picks the tensor that holds the scores, as the methods' ``output=``."""
    return default_layer(model, example, output).name


def default_layer(model: nn.Module, example: Tensor, output: OutputSpec = None) -> DefaultLayer:
    """The default target layer for images like ``example``, with how its output becomes a
    feature map and why it was chosen (:class:`DefaultLayer`)."""
    return _default_search(model, example, output)[0]


@dataclass(frozen=True)
class DefaultLayer:
    """The default target layer that :func:`default_layer` found.

    ``layout``: how its output becomes a feature map (N, C, h, w): None for a map already,
    a :class:`TokenGrid` (prefix and grid inferred) for tokens (N, L, D), :class:`ChannelsLast`
    for a channels-last map (N, h, w, C), :class:`Frames` for a clip's frames (N*T, C, h, w).
    ``why``: the rule that chose it, in words.
    """

    name: str
    layout: Layout | None = None
    why: str = ""


_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_WHY_MAP = "the last feature map (N, C, h, w) larger than 1x1, with one row per image, that the score depends on"
_WHY_FRAMES = ("the last feature map larger than 1x1 that the score depends on, a 2-D backbone's map of each frame "
               "(N*T, C, h, w), read as the clip's (N, C, T, h, w)")
_WHY_CHANNELS_LAST = ("the last feature map, channels-last (N, h, w, C), larger than 1x1, with one row per image, "
                      "that the score depends on")
_WHY_POOLED = ("the last token sequence whose patch tokens the score depends on (a head that pools the patch "
               "tokens reads it)")
_WHY_CLASS_TOKEN = ("the last token sequence whose patch tokens the score depends on: the input of the last "
                    "attention, as the head reads only the class token(s) after it")


def _inside_attention(name: str, modules: Mapping[str, nn.Module]) -> bool:
    """Whether module ``name`` is an attention module or part of one (its query, key, value and
    output projections, a bias table), by the names of the module and its parents and their types."""
    parts = name.split(".")
    return any(
        _ATTENTION.search(parts[depth - 1]) or _ATTENTION.search(type(modules.get(".".join(parts[:depth]))).__name__)
        for depth in range(1, len(parts) + 1)
    )


def _reading(shape: torch.Size, image: Sequence[int]) -> str | None:
    """How a 4-D output (N, A, B, C) of images ``image`` (H, W) reads as a feature map larger
    than 1x1: ``"nchw"`` (channels A, grid B x C), ``"nhwc"`` (grid A x B, channels C, as
    torchvision's Swin stages), or None (a 1x1 map).

    The reading whose grid has the image's aspect ratio the more closely (every stride keeps it,
    to rounding); channels-first, PyTorch's own layout, unless channels-last is closer by a clear
    margin, so that a square image's map with as many channels as its side stays channels-first.
    """
    aspect = math.log(image[0] / image[1])

    def off(h: int, w: int) -> float:
        return abs(math.log(h / w) - aspect) if h and w else math.inf

    if off(shape[1], shape[2]) + 0.05 < off(shape[2], shape[3]):
        return "nhwc" if shape[1] * shape[2] > 1 else None
    return "nchw" if shape[2] * shape[3] > 1 else None


def _detection_head(module: nn.Module, out: Tensor, selected: Tensor) -> bool:
    """Whether a map (N, K, h, w) is a YOLO-style raw head of detections (N, D, F = 4 + classes):
    the output of a 1x1 convolution whose K channels hold, for 1 to 9 anchors per cell, F or F + 1
    columns (boxes, objectness, classes) or the classes alone (YOLOv8's class branch), and whose
    cells make at most D detections: the detections themselves, as a map."""
    if out.dim() != 4 or selected.dim() != 3 or not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1):
        return False
    rows, columns = selected.shape[1:]
    return any(out.shape[1] % width == 0 and 1 <= out.shape[1] // width <= 9
               and out.shape[2] * out.shape[3] * (out.shape[1] // width) <= rows
               for width in (columns, columns + 1, columns - 4) if width > 0)


def _default_search(
    model: nn.Module, example: Tensor, output: OutputSpec = None
) -> tuple[DefaultLayer, object, list[tuple[str, object]], dict[int, int]]:
    """The default target layer for images like ``example``, found in one forward and one
    backward pass: the last feature map larger than 1x1 (N, C, h, w), or (N, h, w, C) where
    only that reads as the image's grid, or token sequence (N, L, D), that the explained score
    depends on.

    Passed over, as no map of what the model concluded: an output with another number of rows
    than images (a bias table, attention weights, a batch folded with heads), one that does not
    depend on the image, one the score (each image's top-1 class, or the sum of a dense output)
    does not depend on (an auxiliary head, a branch not used), a layer that runs more than once,
    and, for a dense output (N, K, H, W) or (N, H, W), a map of its size or with its K channels (one
    for depth): a segmentation model's logits, a depth head's depth map, before a last activation
    or resize or not; for a detector's output (N, D, 4 + classes), a sequence of D rows (its box
    and class heads, a decoder's queries), a YOLO-style raw head (its detections as a map:
    :func:`_detection_head`), and a sequence whose inferred prefix holds D tokens or more (they
    may be D detection tokens after the patches: the user names that layout).

    Token sequences (a vision transformer's) are read by :class:`TokenGrid`, prefix (class,
    distillation and register tokens) and grid inferred, and are candidates where the score
    depends on their patch tokens, not only on the prefix; attention internals (anything in a
    module named or typed ``attn``/``attention``) and ``nn.Identity`` (its output is its input,
    the module before it) are passed over. So a head that pools the patch tokens (DINOv2, BEiT,
    Swin) gets the sequence it pools, the final norm or the last block's output, where Grad-CAM
    is CAM as at a CNN's last map; a head that reads the class token alone (ViT, DeiT, CLIP) gets
    the input of the last block's attention (its first norm), the last sequence whose patch
    tokens reach the score: after the attention, the patch tokens no longer do, and every map
    there would be blank. Where token sequences come after the last map but none can be read
    as a grid, the choice is the user's, refused in one line naming the candidates.

    Returns ``(the layer found, what the model returned, [(module name, output)] in order of
    completion, {id(output): its version when the module returned it})``.
    """
    rows = example.shape[0]
    image = example.shape[-2:]
    seen: list[tuple[str, object]] = []
    versions: dict[int, int] = {}
    modules = dict(model.named_modules())

    def hook(module: nn.Module, inputs: object, out: object, name: str) -> None:
        seen.append((name, out))
        if isinstance(out, Tensor):
            versions[id(out)] = out._version  # an in-place change after the layer shows in it

    x = example.detach().clone().requires_grad_(True)  # so that what depends on the image has a graph
    with preserved(model), torch.enable_grad():
        handles = [module.register_forward_hook(lambda m, i, out, name=name: hook(m, i, out, name))
                   for name, module in modules.items() if name]
        try:
            result = model(x)
        finally:
            for handle in handles:
                handle.remove()
    runs: dict[str, int] = {}
    for name, _ in seen:
        runs[name] = runs.get(name, 0) + 1
    once = [(name, out) for name, out in seen if isinstance(out, Tensor) and runs[name] == 1 and out.shape[:1] == (rows,)]
    spatial = example.dim() - 2
    if spatial == 2:
        maps = [(name, out, reading) for name, out in once
                if out.dim() == 4 and (reading := _reading(out.shape, image)) is not None]
        tokens = [(name, out) for name, out in once  # (N, L, D): a pooled (N, D, 1) is no sequence
                  if out.dim() == 3 and min(out.shape[1:]) > 1 and not isinstance(modules[name], nn.Identity)
                  and not _inside_attention(name, modules)]
    else:
        # Signals and volumes: channels-first maps of the input's dimensions, and for clips a 2-D
        # backbone's maps of the frames, one row per frame (:class:`Frames`).
        frames = rows * example.shape[2] if spatial == 3 else None
        maps = [(name, out, "nchw" if out.shape[0] == rows else "frames") for name, out in seen
                if isinstance(out, Tensor) and runs[name] == 1 and math.prod(out.shape[2:]) > 1
                and ((out.dim() == example.dim() and out.shape[0] == rows) or (out.dim() == 4 and out.shape[0] == frames))]
        tokens = []
    graphed = [out for _, out, *_ in maps + tokens if out.requires_grad]
    try:
        selected = model_output(result, example, output)
    except CamlensError:
        selected = None  # no score to follow: the methods say why when they run
    grads: dict[int, Tensor | None] | None = None
    if selected is not None and selected.requires_grad and graphed:
        score = (selected.gather(1, selected.detach().argmax(dim=1, keepdim=True)) if selected.dim() == 2
                 else selected).sum()
        grads = dict(zip(map(id, graphed), torch.autograd.grad(score, graphed, allow_unused=True)))
    final = None if selected is None else selected.detach().reshape(-1)

    def usable(out: Tensor, part: slice = slice(None), module: nn.Module | None = None) -> bool:
        if not out.requires_grad:
            return False
        if grads is not None and ((grad := grads.get(id(out))) is None or not bool(grad[:, part].ne(0).any())):
            return False
        # A dense output's (segmentation, depth) own values, or a map of its size or of its channels: the
        # logits or depth before a last activation or resize. Class scores (N, classes) are no map.
        if final is None or selected.dim() <= 2:
            return True
        channels = selected.shape[1] if selected.dim() == example.dim() else 1
        return (out.numel() != final.numel() and not (out.dim() == example.dim() and out.shape[1] == channels)
                and not _detection_head(module, out, selected))

    order = {id(out): index for index, (_, out) in enumerate(seen)}
    found = [(name, out, reading) for name, out, reading in maps if usable(out, module=modules[name])]
    after = -1 if not found else order[id(found[-1][1])]
    # A map flattened channels-first, (N, C, h*w), is no token sequence: its "tokens" are channels.
    flattened = {(out.shape[1], out.shape[2] * out.shape[3]) for _, out, reading in maps if reading == "nchw" and spatial == 2}
    # A detector's output (N, D, 4 + classes) has one row per query or box: a sequence of D rows
    # (a box or class head, a decoder's queries) is no grid of patches, and a sequence read with D
    # tokens or more before its grid may hold D detection tokens after it instead (YOLOS): the
    # user names that layout.
    queries = selected.shape[1] if selected is not None and selected.dim() == 3 else None
    later, read = [], []
    for name, out in tokens:
        if order[id(out)] < after or not usable(out) or tuple(out.shape[1:]) in flattened or out.shape[1] == queries:
            continue
        later.append((name, out))
        try:
            prefix, h, w = TokenGrid().layout(out.shape[1], image)
        except CamlensError:
            continue
        if usable(out, slice(prefix, None)) and h * w > 1 and prefix < h * w and (queries is None or prefix < queries):
            read.append((name, out, TokenGrid(prefix=prefix, size=(h, w))))
    if read:
        name, out, grid = read[-1]
        # Later sequences reach the score by their prefix alone: a class-token head, after the last attention.
        class_token = any(order[id(other)] > order[id(out)] for _, other in later)
        return DefaultLayer(name, grid, _WHY_CLASS_TOKEN if class_token else _WHY_POOLED), result, seen, versions
    if later:
        shown = ", ".join(f"{display_name(name)} {tuple(out.shape[1:])}" for name, out in later[-3:])
        raise CamlensError(
            f"the model's last layers that the score depends on output tokens ({shown}) that camlens cannot read as "
            "a grid of patches; name one with target_layer= and its layout with reshape='tokens:PREFIX:HxW' "
            "(--target-layer NAME --reshape tokens:PREFIX:HxW, with :+SUFFIX for tokens after the patches; see "
            "camlens layers)"
        )
    if not found:
        raise CamlensError(
            "no module of this model outputs a feature map larger than 1x1 (N, C, h, w), or tokens (N, L, D), with "
            "one row per image, that the score depends on; name a convolutional layer as the target layer "
            "(target_layer= or --target-layer)"
        )
    name, _, reading = found[-1]
    if reading in ("nhwc", "frames"):
        layout, why = (ChannelsLast(), _WHY_CHANNELS_LAST) if reading == "nhwc" else (Frames(), _WHY_FRAMES)
        return DefaultLayer(name, layout, why), result, seen, versions
    if spatial == 2:
        return DefaultLayer(name, None, _WHY_MAP), result, seen, versions
    shape = {1: "(N, C, l)", 3: "(N, C, d, h, w)"}[spatial]
    why = _WHY_MAP.replace("(N, C, h, w) larger than 1x1", f"{shape} of more than one position")
    return DefaultLayer(name, None, why), result, seen, versions


# model -> (its module tree when traced, {image signature: default layer name}). Weak keys: the
# cache never keeps a model alive. The tree is held as weak references to the module objects, so
# that a module replaced by a new one of the same type (possibly at the same address) is seen.
_found_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_found_layers_lock = threading.Lock()
_SHAPES_PER_MODEL = 32  # bounds the memory of a process that explains images of many sizes


def remembered_default_layer(
    model: nn.Module, images: Tensor, output: OutputSpec = None
) -> tuple[DefaultLayer, nn.Module]:
    """``(the layer found, its module)`` of :func:`default_layer` for ``images`` (N, C, H, W),
    traced on the first image once per model, module tree and image signature, then remembered.

    The signature is (C, H, W), dtype and device, not N: every module's output for a batch of N
    is that for one image with N rows (the trace already runs one image), while H and W can
    bring a late map down to 1x1 and change a token grid. Adding, removing or replacing a module
    under any name re-traces. A forward whose shapes change with other state (an attribute set
    in place, such as a convolution's stride) is not seen: name the target layer for such a model.
    """
    modules = list(model.named_modules())
    signature = _signature(images, output)
    found = None if signature is None else _remember(model, modules, signature)
    if found is None:
        with one_time("finding the default layer"):  # not under the lock: a forward can be long
            found = default_layer(model, images[:1], output)
        if signature is not None:
            _remember(model, modules, signature, found)
    return found, dict(modules)[found.name]


def _signature(images: Tensor, output: OutputSpec) -> tuple | None:
    """What the default layer depends on besides the model: the images' (C, H, W), dtype and
    device, and which output holds the score; None where that cannot be a key (an unhashable
    selector): nothing is remembered then."""
    signature = (tuple(images.shape[1:]), images.dtype, images.device, output)
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def _remember(
    model: nn.Module, modules: list[tuple[str, nn.Module]], signature: tuple, name: DefaultLayer | None = None
) -> DefaultLayer | None:
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
