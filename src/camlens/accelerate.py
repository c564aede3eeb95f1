"""Faster forward passes with the same maps: a private, verified inference copy of the model.

Explaining runs the model in eval mode with frozen weights, so camlens can run a copy made for
inference instead of the model itself:

- **Batch norm folded** into the convolution that feeds it: ``BN(conv(x)) = conv'(x)`` with
  :math:`W' = W \\gamma / \\sqrt{\\sigma^2 + \\epsilon}` and
  :math:`b' = (b - \\mu) \\gamma / \\sqrt{\\sigma^2 + \\epsilon} + \\beta`; the batch norm
  becomes an ``nn.Identity`` under the same name, so its output (and a hook on it) is unchanged.
  A pair is folded only when the batch norm's input is the very tensor the convolution
  returned, both run once, and the convolution is not a layer being observed.
- **Channels-last memory** (``torch.channels_last``) for models with 2-D convolutions, which
  oneDNN runs faster on a CPU.
- **Compiled, frozen forward** (opt-in, ``compile=True``): for forward-only work (Score-CAM's
  masked inputs, the metrics' perturbed inputs), ``torch.compile`` with inductor's freezing, on
  batches padded to one fixed size so that it compiles once per input shape; inductor's cache
  on disk lets the next process skip most of the compilation.

The copy is **verified** before use, for each input signature (size, dtype, device): one
forward pass of the first image through the model and through the copy, every submodule
hooked; every output but the folded convolutions' must agree to ``1000 eps`` of the dtype
(at most 1e-3) relative to its own largest magnitude (folding leaves about ``50 eps``). A model
that cannot be copied, fails, or does not agree is run as it is.

**A copy is a snapshot** held by one method object (:class:`InferenceCopies`): it is made at its
first use and made again when a module, parameter or buffer of the model is replaced or updated
in place (through the tensor itself: an optimizer step, ``load_state_dict``, batch norm
statistics); changes it cannot see (through ``.data``, to a module's attributes, hooks added
later) call for a new method object. Hooks on the model do not run on the copy. A forward that
branches on the values of its input is verified on the first image only. That is why the
library leaves it off unless asked (``optimize=True``), and the command line, which owns its
model, turns it on for CPU.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capture import hooked_pass, preserved


# Agreement asked of the copy, in epsilons of the dtype, relative to each output's magnitude.
TOLERANCE_EPS = 1000
TOLERANCE_MAX = 1e-3
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass
class InferenceCopy:
    """A verified inference copy: ``module`` computes what the model computes, faster.

    ``folded``: names of the convolutions whose output now includes their batch norm (their
    own output is not the model's; everything else is). ``channels_last``: inputs are converted.
    """

    module: nn.Module
    folded: frozenset[str]
    channels_last: bool
    # False when a batch norm uses the batch's own statistics in eval mode: padding a batch
    # would change its rows, so the compiled forward is not used.
    rows_independent: bool = True
    _compiled: nn.Module | None = field(default=None, repr=False)

    def serves(self, names: Iterable[str]) -> bool:
        """Whether observing the layers ``names`` on the copy is observing them on the model."""
        return not any(name in self.folded for name in names)

    def prepare(self, inputs: Tensor) -> Tensor:
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def compiled(self) -> nn.Module:
        """The copy compiled for inference (inductor, frozen weights): call it under no_grad only."""
        if self._compiled is None:
            _persistent_cache()
            self._compiled = torch.compile(self.module, dynamic=False, options={"freezing": True})
        return self._compiled


def _persistent_cache() -> None:
    """Keep inductor's compiled code in the user's cache folder (not /tmp, emptied at reboot),
    unless the user chose a folder."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "camlens", "torchinductor")


class CompiledForward(nn.Module):
    """Logits of a compiled inference copy, in batches of exactly ``batch`` rows (the last one
    padded with zeros, its extra rows dropped): one shape, one compilation. Rows are
    independent in eval mode, so padding changes no row. Without gradients only."""

    def __init__(self, inference: InferenceCopy, batch: int) -> None:
        super().__init__()
        self.inference = inference
        self.batch = batch
        self.copy = inference.module  # a submodule, so that preserved() and .to() see it

    def forward(self, inputs: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not self.inference.rows_independent:
            return self.copy(self.inference.prepare(inputs))
        compiled = self.inference.compiled()
        parts = []
        for start in range(0, inputs.shape[0], self.batch):
            chunk = inputs[start : start + self.batch]
            rows = chunk.shape[0]
            if rows < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch - rows, *chunk.shape[1:])])
            parts.append(compiled(self.inference.prepare(chunk))[:rows])
        return torch.cat(parts)


class PlainForward(nn.Module):
    """Logits of an inference copy, eagerly, inputs in the copy's memory format."""

    def __init__(self, inference: InferenceCopy) -> None:
        super().__init__()
        self.inference = inference
        self.copy = inference.module

    def forward(self, inputs: Tensor) -> Tensor:
        return self.copy(self.inference.prepare(inputs))


class InferenceCopies:
    """The inference copies of one owner (a method object): at most one per model and settings,
    verified per input signature, made again when the model changes (see the module docstring).

    ``fold`` and ``channels_last`` turn each change off (to measure what each buys).
    """

    def __init__(self, fold: bool = True, channels_last: bool = True) -> None:
        self.fold = fold
        self.channels_last = channels_last
        # model -> (state signature, InferenceCopy or None, {input signature: verified}). Weak
        # keys: the owner keeps a model alive only as long as the owner itself does.
        self._made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, model: nn.Module, example: Tensor) -> InferenceCopy | None:
        """The copy of ``model`` for inputs like ``example``, or None where there is none.
        The model is in eval mode with frozen weights while the copy is made and verified."""
        state = _state(model)
        signature = (tuple(example.shape[1:]), example.dtype, example.device)
        with self._lock:
            remembered = self._made.get(model)
        if remembered is not None and _same_state(remembered[0], state) and signature in remembered[2]:
            return remembered[1] if remembered[2][signature] else None
        with preserved(model):
            if remembered is None or not _same_state(remembered[0], state):
                remembered = (state, _make(model, example[:1], self.fold, self.channels_last), {})
            made, verified = remembered[1], remembered[2]
            verified[signature] = made is not None and _agrees(model, made, example[:1])
        with self._lock:
            self._made[model] = remembered
        return made if verified[signature] else None


def inference_copy(
    model: nn.Module, example: Tensor, *, fold: bool = True, channels_last: bool = True
) -> InferenceCopy | None:
    """A new verified inference copy of ``model`` for inputs like ``example`` (see the module
    docstring), or None where there is none. :class:`InferenceCopies` remembers them."""
    return InferenceCopies(fold, channels_last).get(model, example)


def _state(model: nn.Module) -> tuple:
    """What a change of the model changes: each module's and tensor's identity, and each
    tensor's storage, shape, dtype, device and version counter (bumped by in-place updates)."""
    modules = tuple((name, weakref.ref(module)) for name, module in model.named_modules())
    tensors = tuple(
        (name, weakref.ref(tensor), tensor.data_ptr(), tensor._version, tensor.shape, tensor.dtype, tensor.device)
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    )
    return modules, tensors


def _same_state(old: tuple, new: tuple) -> bool:
    def same(a: tuple, b: tuple) -> bool:
        return a[0] == b[0] and a[1]() is b[1]() is not None and a[2:] == b[2:]

    return all(len(o) == len(n) and all(map(same, o, n)) for o, n in zip(old, new))


def _make(model: nn.Module, example: Tensor, fold: bool, channels_last: bool) -> InferenceCopy | None:
    """The copy, unverified; None where the model cannot be traced, copied or folded."""
    try:
        _, pairs = _trace(model, example)
        clone = copy.deepcopy(model)
        for module in clone.modules():
            for attribute in _HOOK_DICTS:
                hooks = getattr(module, attribute, None)
                if hooks:
                    hooks.clear()
        for parameter in clone.parameters():
            parameter.requires_grad_(False)
        pairs = pairs if fold else {}
        _fold_batch_norms(clone, pairs)
        channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in clone.modules())
        if channels_last:
            clone = clone.to(memory_format=torch.channels_last)
    except Exception:  # e.g. a parametrized weight, an attribute that cannot be copied, a model
        return None  # that fails on one image: run the model as it is
    independent = not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in clone.modules()
    )
    return InferenceCopy(clone, frozenset(pairs), channels_last, independent)


def _agrees(model: nn.Module, made: InferenceCopy, example: Tensor) -> bool:
    """Every submodule output (but the folded convolutions') and the model's output agree."""
    try:
        expected, _ = _trace(model, example)
        got, _ = _trace(made.module, made.prepare(example))
    except Exception:
        return False
    return set(expected) == set(got) and all(
        len(values) == len(got[name]) and all(map(_close, values, got[name]))
        for name, values in expected.items()
        if name not in made.folded
    )


def _trace(model: nn.Module, example: Tensor) -> tuple[dict[str, list], dict[str, str]]:
    """One forward pass without gradients, every submodule hooked. Returns the outputs of each
    (a copy; ``""`` for the model's own) and ``{convolution: batch norm}`` for every
    BatchNorm2d in eval mode whose input is the tensor a Conv2d returned, unchanged in place
    since, each running once. (A Conv2d subclass whose forward does not use ``weight`` and
    ``bias`` as a convolution does is caught by the verification.)"""
    outputs: dict[str, list] = {}
    conv_outputs: dict[str, tuple[Tensor, int]] = {}
    bn_inputs: dict[str, object] = {}

    def seen(name: str, output: object, module: nn.Module, inputs: tuple) -> None:
        if isinstance(module, nn.Conv2d) and isinstance(output, Tensor):
            conv_outputs[name] = (output, output._version)
        elif isinstance(module, nn.BatchNorm2d) and inputs:
            bn_inputs[name] = inputs[0]
        # A copy: an in-place operation after the module must not change what is compared.
        outputs.setdefault(name, []).append(output.clone() if isinstance(output, Tensor) else output)

    outputs[""] = [hooked_pass(model, example, seen)]
    modules = dict(model.named_modules())
    pairs = {}
    for bn, given in bn_inputs.items():
        norm = modules[bn]
        if len(outputs[bn]) != 1 or norm.training or norm.running_mean is None or norm.running_var is None:
            continue
        for conv, (output, version) in conv_outputs.items():
            if given is output and output._version == version and len(outputs[conv]) == 1:
                pairs[conv] = bn
    return outputs, pairs


def _fold_batch_norms(model: nn.Module, pairs: Mapping[str, str]) -> None:
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs.items():
        conv, norm = modules[conv_name], modules[bn_name]
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        bias = shift if conv.bias is None else conv.bias * scale + shift
        with torch.no_grad():
            weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(weight, requires_grad=False)
            conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
        parent, _, child = bn_name.rpartition(".")
        setattr(modules[parent], child, nn.Identity())


def _close(expected: object, got: object) -> bool:
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor) or expected.shape != got.shape or expected.dtype != got.dtype:
            return False
        if not expected.is_floating_point():
            return bool(torch.equal(expected, got))
        if expected.numel() == 0:
            return True
        scale = float(expected.abs().max()) if bool(torch.isfinite(expected).all()) else float("nan")
        tolerance = min(TOLERANCE_EPS * torch.finfo(expected.dtype).eps, TOLERANCE_MAX)
        return bool((expected - got).abs().max() <= tolerance * scale + torch.finfo(expected.dtype).tiny)
    if isinstance(expected, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(expected) == len(got) and all(map(_close, expected, got))
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(_close(expected[k], got[k]) for k in expected)
    return True  # not a tensor: nothing numeric to compare
