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
- **Split at the target layer** (with ``compile=True``, for the passes that observe one layer,
  gradients included): every gradient a method takes is that of a score with respect to the
  target layer's output, so nothing below that layer needs autograd. The copy's graph
  (``torch.fx``, every module without children a leaf) is cut there: the part up to the layer is
  compiled and frozen like the forward above (one compilation per batch size), the rest runs
  eagerly from the layer's output, which autograd sees as a leaf. The cut is verified against the
  copy per input signature: the layer's output, the logits and their gradient with respect to
  the layer's output (torch.fx records no ``torch.no_grad()`` block and traces into custom
  autograd functions), and the compiled part against the same part run eagerly; a shape at which
  the compiled part fails runs that part eagerly. Models that ``torch.fx`` cannot trace, where the
  layer runs more than once, or where the cut does not agree, use the copy as it is.

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

import contextlib
import copy
import linecache
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree
from torch import Tensor, nn

from .capture import hooked_pass, preserved
from .timing import one_time

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
    # layer -> its SplitForward, or None where the copy cannot be split there.
    _splits: dict = field(default_factory=dict, repr=False)

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
            self._compiled = _compile(self.module)
        return self._compiled

    def split(self, layer: str, example: Tensor) -> SplitForward | None:
        """The copy cut at ``layer`` (see the module docstring), verified for inputs like
        ``example`` against the copy itself; None where it cannot be cut or does not agree."""
        if layer not in self._splits:
            self._splits[layer] = SplitForward.make(self, layer)
        split = self._splits[layer]
        return split if split is not None and split.verified(example) else None


def _compile(module: nn.Module) -> nn.Module:
    _persistent_cache()
    return torch.compile(module, dynamic=False, options={"freezing": True})


def _persistent_cache() -> None:
    """Keep inductor's compiled code in the user's cache folder (not /tmp, emptied at reboot),
    unless the user chose a folder."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "camlens", "torchinductor")


class CompiledForward(nn.Module):
    """Logits of a compiled inference copy, in batches of exactly ``batch`` rows (the last one
    padded with zeros, its extra rows dropped): one shape, one compilation. Rows are
    independent in eval mode, so padding changes no row. Without gradients only.
    ``select(output, inputs)`` picks the logits in what the model returns (a tuple, a dict)."""

    def __init__(
        self, inference: InferenceCopy, batch: int, select: Callable[[object, Tensor], Tensor] | None = None
    ) -> None:
        super().__init__()
        self.inference = inference
        self.batch = batch
        self.copy = inference.module  # a submodule, so that preserved() and .to() see it
        self.select = select or (lambda output, inputs: output)
        self._compiled_shapes: set = set()

    def forward(self, inputs: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not self.inference.rows_independent:
            return self.select(self.copy(self.inference.prepare(inputs)), inputs)
        compiled = self.inference.compiled()
        parts = []
        for start in range(0, inputs.shape[0], self.batch):
            chunk = inputs[start : start + self.batch]
            rows = chunk.shape[0]
            if rows < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch - rows, *chunk.shape[1:])])
            signature = (tuple(chunk.shape), chunk.dtype, chunk.device)
            # The first pass of a shape compiles it: start-up, timed apart (camlens.timing).
            with one_time("compiling the model") if signature not in self._compiled_shapes else contextlib.nullcontext():
                parts.append(self.select(compiled(self.inference.prepare(chunk)), chunk)[:rows])
            self._compiled_shapes.add(signature)
        return torch.cat(parts)


class PlainForward(nn.Module):
    """Logits of an inference copy, eagerly, inputs in the copy's memory format."""

    def __init__(self, inference: InferenceCopy) -> None:
        super().__init__()
        self.inference = inference
        self.copy = inference.module

    def forward(self, inputs: Tensor) -> Tensor:
        return self.copy(self.inference.prepare(inputs))


class _LeafTracer(torch.fx.Tracer):
    """Traces through containers only: a module without children, or the layer cut at, is one
    node (its own forward may do anything: it is called, not traced)."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer or next(module.children(), None) is None


def cut(module: nn.Module, layer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None:
    """``module`` cut in two at its submodule ``layer``: ``(before, after)`` with
    ``before(x) = (a, *rest)``, ``a`` the layer's output and ``rest`` what else the part after
    it needs (a skip connection from below, the input), and ``after(a, *rest)`` the module's
    output. ``before`` is everything the graph runs before the layer, in its order, not only
    what the layer depends on: an in-place update whose result is not used by name
    (``a.mul_(2)``) is no ancestor of the layer in the graph, yet must run before it. Traced by
    ``torch.fx`` with every module without children a leaf (called, not traced); None where the
    module cannot be traced or the layer is not exactly one call in its graph. Both parts share
    ``module``'s submodules and parameters. (torch.fx records neither grad mode nor custom
    autograd functions: :meth:`SplitForward.verified` compares the gradients.)"""
    try:
        graph = _LeafTracer(layer).trace(module)
    except Exception:  # data-dependent control flow, an untraceable container: no cut
        return None
    nodes = list(graph.nodes)
    found = [node for node in nodes if node.op == "call_module" and node.target == layer]
    if len(found) != 1:
        return None
    # Before the cut: every node up to the layer's, in the graph's (execution) order.
    before_nodes = set(nodes[: nodes.index(found[0]) + 1])
    # What the rest uses of it: the layer's output first, then the rest in graph order.
    crossing = [found[0]] + [
        node
        for node in nodes
        if node in before_nodes
        and node is not found[0]
        and node.op != "get_attr"
        and any(user not in before_nodes for user in node.users)
    ]
    first, env = torch.fx.Graph(), {}
    for node in nodes:
        if node in before_nodes:
            env[node] = first.node_copy(node, env.__getitem__)
    first.output(tuple(env[node] for node in crossing))
    second = torch.fx.Graph()
    env = {node: second.placeholder(f"{node.name}_given") for node in crossing}

    def value(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:  # a parameter read before the cut, and after it too
            env[node] = second.node_copy(node, value)
        return env[node]

    for node in nodes:
        if node not in before_nodes:
            env[node] = second.node_copy(node, value)
    try:
        return _graph_module(module, first), _graph_module(module, second)
    except Exception:
        return None


def _graph_module(root: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule(root, graph)``, whose generated source is forgotten with it.

    torch.fx keeps the source of every GraphModule it compiles, for tracebacks, in its own cache
    and in ``linecache``, and never drops it: 1 to 2 KB per cut, so a process that cuts a model
    per call (``camlens.explain`` makes a new method object each time) grew without bound.
    """
    made = torch.fx.GraphModule(root, graph)
    key = type(made).forward.__code__.co_filename
    weakref.finalize(made, _forget_source, key)
    return made


def _forget_source(key: str) -> None:
    from torch.fx.graph_module import (
        _loader,  # where torch.fx keeps the sources it compiled
    )

    _loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)


class CutMemory:
    """The cuts one owner (a method object) made: module -> {layer: (the module's structure when
    cut, (before, after))}. Weak keys: a remembered cut keeps the module's submodules alive only
    as long as the module itself is. A copy of the owner (``copy.deepcopy``, pickling) starts
    with nothing remembered."""

    def __init__(self) -> None:
        self.cuts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> CutMemory:
        return CutMemory()

    def __reduce__(self) -> tuple:
        return (CutMemory, ())


_MODULE_KEYS = frozenset(vars(nn.Module()))  # what every module keeps for torch itself
_PLAIN = frozenset((type(None), bool, int, float, complex, str, bytes))


def _value(value: object, seen: dict, depth: int = 0) -> object:
    """What a traced graph may have recorded of an attribute ``value``: a number, a string or a
    container of them by value (tracing reads them as constants); a tensor that is no parameter
    (read as a number, or kept by the graph as it was) by identity, storage and version; an
    object with attributes (a config) by identity and its attributes; anything else by identity."""
    if type(value) in _PLAIN:
        return type(value), value
    if type(value) in (tuple, list):
        types = tuple(map(type, value))
        if _PLAIN.issuperset(types):  # a stride, class names
            return type(value), types, tuple(value)
    if isinstance(value, Tensor):
        return _tensor(value)
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = shallow = (type(value), id(value))
    if depth > 4 or isinstance(value, (nn.Module, type)) or callable(value):
        return shallow
    if isinstance(value, (tuple, list)) and len(value) <= 10_000:
        inner = tuple(_value(item, seen, depth + 1) for item in value)
    elif isinstance(value, dict) and len(value) <= 10_000:
        inner = tuple((_value(key, seen, depth + 1), _value(item, seen, depth + 1)) for key, item in value.items())
    elif _attributes(value) is not None:
        inner = _value(_attributes(value), seen, depth + 1)
    else:
        return shallow
    seen[id(value)] = snapshot = (*shallow, inner)
    return snapshot


def _attributes(value: object) -> dict | None:
    try:
        attributes = getattr(value, "__dict__", None)
    except Exception:  # a proxy of something gone
        return None
    return attributes if isinstance(attributes, dict) else None


def _tensor(tensor: Tensor) -> tuple:
    """A tensor by identity, version and storage, where it has them (an inference tensor has no
    version, a sparse one no storage: changes to those are not seen)."""
    try:
        version = tensor._version
    except Exception:
        version = None
    try:
        pointer = tensor.data_ptr()
    except Exception:
        pointer = None
    return Tensor, id(tensor), version, pointer


def _structure(module: nn.Module) -> list[tuple]:
    """What a traced graph of ``module`` depends on besides the values of its parameters: each
    module (its class, training mode, class and instance forward, and its other attributes, which
    tracing reads as constants: :func:`_value`) and each parameter and buffer object, by name, a
    buffer with its storage and version too (a forward may read it as a number). (In-place
    updates of a parameter are seen by a graph that holds it.)"""
    state: list[tuple] = []
    seen: dict = {}
    for name, sub in module.named_modules():
        own = vars(sub)
        attributes = tuple((key, _value(own[key], seen)) for key in sorted(own.keys() - _MODULE_KEYS, key=str))
        state.append((name, sub, type(sub), sub.training, id(sub.__dict__.get("forward")),
                      id(getattr(type(sub), "forward", None)), attributes))
        for key, tensor in sub._parameters.items():
            if tensor is not None:
                state.append((key, tensor))
        for key, tensor in sub._buffers.items():
            if tensor is not None:
                state.append((key, tensor, *_tensor(tensor)[2:]))
    return state


def remembered_cut(module: nn.Module, layer: str, memory: CutMemory) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None:
    """The parts of :func:`cut` that :func:`remember_cut` kept in ``memory`` for ``module`` and
    ``layer``, while no module, parameter or buffer of ``module`` was replaced and no module's
    class, training mode, ``forward`` or other attribute changed since (:func:`_structure`); else
    None. Tracing also records what is not watched here (a global or class attribute read in
    ``forward`` becomes a constant of the graph): a caller checks the parts against the model
    before it uses them, and its owner's memory is its own (a new method object cuts afresh)."""
    with memory.lock:
        remembered = memory.cuts.get(module, {}).get(layer)
    if remembered is not None and _same_state(remembered[0], _structure(module)):
        return remembered[1]
    return None


def remember_cut(module: nn.Module, layer: str, parts: tuple | None, memory: CutMemory) -> None:
    """Keep ``parts`` (checked by the caller) in ``memory`` for :func:`remembered_cut`; None forgets."""
    with memory.lock:
        if parts is None:
            memory.cuts.get(module, {}).pop(layer, None)
        else:
            memory.cuts.setdefault(module, {})[layer] = (_remembered(_structure(module)), parts)


class SplitForward(nn.Module):
    """An inference copy cut at one layer: ``before`` (input -> the layer's output and whatever
    the rest still needs, e.g. a skip connection) runs compiled without gradients; the layer's
    output goes through ``tap`` (an identity: hook it to observe the layer, or to make the output
    a leaf of autograd); ``after`` computes the model's output from there, eagerly."""

    def __init__(
        self, inference: InferenceCopy, layer: str, before: torch.fx.GraphModule, after: torch.fx.GraphModule
    ) -> None:
        super().__init__()
        self.inference = inference
        self.layer = layer
        self.copy = inference.module  # a submodule, so that preserved() and .to() see it
        self.before = before
        self.after = after
        self.tap = nn.Identity()
        self._compiled = None
        self._verified: dict = {}
        self._eager: set = set()  # input shapes where the compiled part failed
        self._compiled_shapes: set = set()  # input shapes compiled (the first pass of each)

    @classmethod
    def make(cls, inference: InferenceCopy, layer: str) -> SplitForward | None:
        """The copy cut at ``layer`` (:func:`cut`), or None where it cannot be cut there."""
        parts = cut(inference.module, layer)
        return None if parts is None else cls(inference, layer, *parts)

    def forward(self, inputs: Tensor) -> object:
        inputs = self.inference.prepare(inputs)
        with torch.no_grad():
            given = self._before(inputs)
        return self.after(self.tap(given[0]), *given[1:])

    def _before(self, inputs: Tensor) -> tuple:
        """``before`` compiled; eagerly for input shapes where the compiled code failed (the
        compiler may fail at a shape the verification did not see: the eager part is what
        the copy computes, and raises the model's own error if the model fails)."""
        if self._compiled is None:
            self._compiled = _compile(self.before)
        shape = tuple(inputs.shape)
        if shape not in self._eager:
            try:
                if shape in self._compiled_shapes:
                    return self._compiled(inputs)
                with one_time("compiling the model"):  # the first pass of a shape compiles it
                    given = self._compiled(inputs)
                self._compiled_shapes.add(shape)
                return given
            except Exception:
                self._eager.add(shape)
        return self.before(inputs)

    def verified(self, example: Tensor) -> bool:
        """Whether the split agrees with the copy for inputs like ``example`` (see
        :meth:`_agrees`); checked once per input signature."""
        signature = (tuple(example.shape[1:]), example.dtype, example.device)
        if signature not in self._verified:
            self._verified[signature] = self._agrees(example[:1])
        return self._verified[signature]

    def _agrees(self, example: Tensor) -> bool:
        """The cut run eagerly gives the copy's layer output, logits and gradient of the logits
        (a fixed random combination) with respect to the layer's output; the compiled part
        before the layer gives what the eager one gives. Each is observed on its own run: a
        hook on the copy's layer would also fire inside ``before``, which calls that module.
        Gradients, because torch.fx records no grad mode (``torch.no_grad()`` blocks) and
        traces into custom autograd functions, so the part after the cut can differentiate
        otherwise than the model while computing the same values."""
        try:
            inputs = self.inference.prepare(example)
            expected = _observed(lambda: self.copy(inputs), self.copy.get_submodule(self.layer))
            with torch.no_grad():
                given = self.before(inputs)
                compiled = self._before(inputs)
            got = _observed(lambda: self.after(self.tap(given[0]), *given[1:]), self.tap)
        except Exception:
            return False
        # _close passes anything that is not a tensor: a gradient against none is a difference.
        same_kind = (expected[2] is None) == (got[2] is None)
        return same_kind and _close(given, compiled) and all(map(_close, expected, got))


def _observed(run: Callable[[], object], layer: nn.Module) -> tuple:
    """``(layer output, output, gradient)`` of one run: the gradient of a fixed random
    combination of the output with respect to the layer's output (made a leaf, as the methods
    do), None where the output does not depend on it."""
    leaves: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1].clone()  # the clone onwards, so that an in-place op leaves the leaf alone

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            output = run()
    finally:
        handle.remove()
    # Every floating-point tensor of what the model returns (a tensor, a tuple, a dict).
    outputs = [
        value for value in torch.utils._pytree.tree_leaves(output)
        if isinstance(value, Tensor) and value.is_floating_point()
    ]
    if len(leaves) != 1 or not outputs:
        raise ValueError("not one layer output, or no floating-point output")
    generator = torch.Generator().manual_seed(0)  # not the global generator: seeds stay the user's
    total = sum(
        (value * torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)).sum()
        for value in outputs
    )
    grad = None
    if total.requires_grad:
        (grad,) = torch.autograd.grad(total, leaves[0], allow_unused=True)
    detached = torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, output)
    return leaves[0].detach(), detached, grad


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
        with preserved(model), one_time("the inference copy"):
            if remembered is None or not _same_state(remembered[0], state):
                remembered = (_remembered(state), _make(model, example[:1], self.fold, self.channels_last), {})
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


def _state(model: nn.Module) -> list[tuple]:
    """What a change of the model changes: each module and tensor (held here only while
    compared; :func:`_remembered` keeps weak references), and each tensor's storage, shape,
    dtype, device and version counter (bumped by in-place updates). One walk of the modules:
    this runs on every call."""
    state: list[tuple] = []
    for name, module in model.named_modules():
        state.append((name, module))
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None:
                    state.append(
                        (key, tensor, tensor.data_ptr(), tensor._version, tensor.shape, tensor.dtype, tensor.device)
                    )
    return state


def _remembered(state: list[tuple]) -> tuple:
    return tuple((entry[0], weakref.ref(entry[1]), *entry[2:]) for entry in state)


def _same_state(old: tuple, new: list[tuple]) -> bool:
    return len(old) == len(new) and all(
        o[0] == n[0] and o[1]() is n[1] and o[2:] == n[2:] for o, n in zip(old, new)
    )


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
    if hasattr(expected, "__dict__") and not isinstance(expected, nn.Module):  # e.g. an output with .logits
        return type(got) is type(expected) and _close(vars(expected), vars(got))
    return True  # not a tensor: nothing numeric to compare
