r"""Grad-CAM++ in its general form: true second and third derivatives, for any head and score.

Chattopadhyay et al. (2018) derive, for a score :math:`Y^c` with third derivatives,

.. math::
    \alpha^{kc}_{ij} = \frac{\partial^2 Y^c / (\partial A^k_{ij})^2}
        {2\, \partial^2 Y^c / (\partial A^k_{ij})^2
         + \sum_{ab} A^k_{ab}\, \partial^3 Y^c / (\partial A^k_{ij})^3}, \qquad
    w^c_k = \sum_{ij} \alpha^{kc}_{ij}\, \mathrm{ReLU}(\partial Y^c / \partial A^k_{ij}),

and only then assume :math:`Y^c = \exp(S^c)` with :math:`S^c` piecewise linear in :math:`A`,
which turns the derivatives into :math:`e^{S}g, e^{S}g^2, e^{S}g^3` and gives the closed form of
:func:`~camlens.methods.gradcam.gradcampp_weights`. Here the derivatives are the true diagonal
ones of the score, computed exactly by automatic differentiation, so the formula holds for a
softmax probability, a logit, ``exp(logit)``, and any head after the target layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..accelerate import cut
from ..capture import LayersSpec, forward_inputs, model_output
from ..errors import CamlensError, check_positive_int, first_line
from ..targets import SCORE_KINDS
from .base import CAMMethod, Context, Cost
from .gradcam import gradcampp_weights

Head = Callable[[Tensor], Tensor]


def _third_order(head: Head, a: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The second and third derivatives of ``head`` at ``a`` along ``v``: forward mode, nested."""

    def first(x: Tensor) -> Tensor:
        return jvp(head, (x,), (v,))[1]

    def second(x: Tensor) -> Tensor:
        return jvp(first, (x,), (v,))[1]

    return jvp(second, (a,), (v,))


def diagonal_derivatives(
    head: Head,
    a: Tensor,
    channels: Tensor | None,
    *,
    mean_only: bool = False,
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`\partial^2 Y / (\partial A_{kij})^2` and :math:`\partial^3 Y / (\partial A_{kij})^3`
    for every channel ``k`` in ``channels`` (all when None) and position ``(i, j)``.

    ``head(a)`` gives the target scores (N, T) from the layer's output ``a`` (N, K, h, w), row n
    depending on ``a[n]`` only (eval mode), so one direction serves every image: its one-hot
    ``e_{kij}`` is set in every row. Each direction is a third-order forward-mode derivative
    (``torch.func.jvp`` nested three times), ``chunk_size`` directions at a time under
    ``torch.func.vmap``; where vmap cannot run the head (an ``autograd.Function`` without a vmap
    rule), one direction at a time. With ``mean_only`` (proven by the caller: the head reads
    ``a`` only through its spatial mean), :math:`Y(A + t e_{kij}) = Y(A + t \mathbf{1}_k / hw)`
    for every position, so one direction per channel gives every position's derivatives.
    ``progress(done)`` is called after each chunk with the directions done.
    Returns two (N, T, K', h, w) tensors.
    """
    # Contiguous like the directions: a channels-last map (the inference copy's) sends pooling
    # through an op vmap has no batching rule for, many times slower.
    a = a.contiguous()
    count, channel_count, *where = a.shape  # positions: (h, w); (l) or (d, h, w) alike
    places = math.prod(where)
    index = torch.arange(channel_count, device=a.device) if channels is None else channels
    per_channel = 1 if mean_only else places
    total = index.numel() * per_channel
    rows = torch.arange(count, device=a.device)
    parts: list[tuple[Tensor, Tensor]] = []
    batched = vmap(lambda v: _third_order(head, a, v))
    for start in range(0, total, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, total), device=a.device)
        directions = a.new_zeros(flat.numel(), count, channel_count, places)
        channel = index[flat // per_channel]
        if mean_only:
            directions[torch.arange(flat.numel()), :, channel] = 1.0 / places
        else:
            directions[torch.arange(flat.numel())[:, None], rows, channel[:, None], (flat % per_channel)[:, None]] = 1.0
        directions = directions.view(flat.numel(), *a.shape)
        try:
            parts.append(batched(directions))
        except Exception:
            # vmap refuses e.g. a Python branch on a tensor; genuine errors recur one by one.
            results = [_third_order(head, a, v) for v in directions]
            parts.append(tuple(torch.stack(values) for values in zip(*results)))
        if progress is not None:
            progress(flat.numel())
    d2, d3 = (torch.cat(values) for values in zip(*parts))  # (directions, N, T)
    shape = (index.numel(), per_channel, *d2.shape[1:])
    d2, d3 = (d.reshape(shape).permute(2, 3, 0, 1) for d in (d2, d3))  # (N, T, K', per_channel)
    if mean_only:
        return tuple(d.expand(*d.shape[:3], places).reshape(*d.shape[:3], *where) for d in (d2, d3))
    return tuple(d.reshape(*d.shape[:3], *where) for d in (d2, d3))


def _is_spatial_mean(node: torch.fx.Node, given: torch.fx.Node, module: nn.Module) -> bool:
    """Whether ``node`` is the spatial mean of ``given`` (its only input): a plain
    ``AdaptiveAvgPool2d(1)`` without hooks, ``F.adaptive_avg_pool2d(x, 1)``, or a mean over
    dimensions (2, 3). Read on the traced graph: never guessed from numbers."""
    if not node.args or node.args[0] is not given:
        return False
    if node.op == "call_module":
        pool = module.get_submodule(node.target)
        hooks = (pool._forward_hooks, pool._forward_pre_hooks)
        return type(pool) is nn.AdaptiveAvgPool2d and _is_one(pool.output_size) and len(node.args) == 1 and not any(hooks)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return _is_one(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])
    return False


def _is_one(size: object) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and list(size) == [1, 1])


def _head(model: nn.Module, context: Context, name: str) -> tuple[Head, Tensor, bool]:
    """``(head, a, mean_only)``: the target scores as a function of the layer's map ``a``
    alone, the map, and whether the head reads ``a`` only through its spatial mean.

    Where :func:`~camlens.accelerate.cut` traces the model, the head is the part after the
    layer (whatever else it needs from below, e.g. a skip connection, computed once). Where it
    cannot (control flow on tensor values), the head is the whole model with the layer's output
    replaced by ``a`` through a forward hook: exact too, but the part below the layer runs again
    once per chunk of directions. The output selector (``output=``) and a token layer's grid
    (``reshape=``) apply as in every other pass.
    """
    images, grid = context.images, context.reshape
    rows = torch.arange(images.shape[0], device=images.device)

    def scores(output: object) -> Tensor:
        return context.targets.score(model_output(output, images, context.output), {}, rows)

    # A traced cut would not get the forward inputs (capture.bound_inputs): the hooked model runs then.
    parts = None if forward_inputs() is not None else cut(model, name)
    if parts is None:
        layer = context.layers[name]

        def replaced(a: Tensor) -> Tensor:
            def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
                # The layer runs once per pass (camlens refuses others): its one output is replaced,
                # by a copy: an in-place operation after the layer (ReLU(inplace=True), a
                # residual's +=) must change neither the map nor the derivatives' point.
                if grid is None or not grid.applies(output):
                    return a.clone()
                return grid.to_grid(output, images.shape, name)[1](a.clone())

            handle = layer.register_forward_hook(hook)
            try:
                return scores(model(images))
            finally:
                handle.remove()

        return replaced, context.full_activations[name], False

    before, after = parts
    given = [node for node in after.graph.nodes if node.op == "placeholder"]
    a, rest, rebuild = context.full_activations[name], (), None
    if len(given) > 1 or grid is not None:
        with torch.no_grad():
            a, *rest = before(images)
        if grid is not None and grid.applies(a):
            a, rebuild = grid.to_grid(a, images.shape, name)
    users = list(given[0].users)
    # The spatial means it recognises are those of an image's (h, w): a volume's or signal's map is
    # read position by position (exact, one pass per position).
    mean_only = (rebuild is None and a.dim() == 4 and bool(users)
                 and all(_is_spatial_mean(node, given[0], model) for node in users))

    def head(x: Tensor) -> Tensor:
        # Copies, as the model gets from camlens's hooks: an in-place operation of the part after
        # the layer (ReLU(inplace=True), a residual's +=) on its input or on a tensor from below
        # would otherwise change the layer's map (the method's activations) and what the next
        # chunk of directions reads.
        x = x.clone()
        return scores(after(x if rebuild is None else rebuild(x), *_copies(rest)))

    return head, a, mean_only


def _copies(values: list | tuple) -> list:
    return [value.clone() if isinstance(value, Tensor) else value for value in values]


@contextlib.contextmanager
def _composite_attention() -> Iterator[None]:
    """PyTorch's transformer layers take a fused inference kernel in eval mode, and attention a
    fused (flash) kernel, neither with a forward-mode derivative; their composite paths compute
    the same function and have one."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class GradCAMPlusPlusGeneral(CAMMethod):
    r"""Grad-CAM++ in its general form (Chattopadhyay et al. 2018, before the exponential
    assumption): :math:`\alpha` from the true diagonal second and third derivatives of the score
    (see the module docstring), the weights from its first derivative.

    :math:`w^c_k = \sum_{ij} \alpha^{kc}_{ij} \mathrm{ReLU}(\partial Y^c/\partial A^k_{ij})`
    as the paper writes it, with :func:`~camlens.methods.gradcam.gradcampp_weights` (``alpha``
    is 0 where its denominator is 0). Consequences:

    - ``score="exp"`` with a head linear in the layer (global average pool + linear, as at the
      layer that feeds the classifier) gives the closed form's ``alpha`` exactly and weights
      ``exp(S)`` times ``gradcam++``'s (which drops that positive factor): the same map.
    - ``score="logit"`` with such a head has zero second and third derivatives: every ``alpha``
      is 0/0, set to 0, and the map is empty. The general form needs a curved score there.
    - After a layer, most CNNs are piecewise linear (ReLU family, batch norm, pooling, linear
      layers): there ``logit`` has no curvature at any layer and ``exp`` gives the closed form
      almost everywhere; the forms differ through a curved score (``probability``) or a curved
      head (softplus, SiLU, GELU, sigmoid gates).
    - ``alpha`` may be negative or large where the score is concave or the denominator nearly 0;
      the paper's formula is kept as it is.

    Cost: one forward + backward, and for each channel and position of the target layer one
    third-order forward-mode pass of the part of the model after it, ``chunk_size`` at a time,
    nothing below the layer recomputed. Where the part after the layer reads it only through
    its spatial mean (a global average pool right after it, proven on the traced graph), every
    position has the same derivatives up to :math:`1/(hw)^n` and one pass per channel serves all
    positions. A model that ``torch.fx`` cannot trace runs whole, with the layer's output
    replaced through a hook: exact, but slower (the part below the layer runs once per chunk).
    Where ``torch.func.vmap`` cannot batch the model, directions go one at a time; a model
    without forward-mode derivatives (``torch.func.jvp``) is refused with a CamlensError.

    Args:
        score: the score :math:`Y^c` of class targets that do not name one: ``"probability"``
            (softmax, the default), ``"logit"`` or ``"exp"`` (``exp(logit)``, the paper's).
        chunk_size: directions (channel and position) per vectorised pass; memory grows with
            it (``chunk_size`` copies of the layer's output and of what comes after it).
            Default 64.
        batch_size: the same, under the name every batched method takes (the command line's
            ``--batch-size`` reaches it): the chunk size when ``chunk_size`` is not given.
            ``chunk_size``, this method's own name for it, wins where both are given.
        max_directions: the most third-order passes (channels x positions, or channels where
            one pass per channel serves every position) a call may take before any is run;
            above it the call is refused in one line that says the count and what to do
            (a three-convolution, 16-channel CNN took 364 s for its middle layer's 200,704).
            Default 50,000; None: no bound.
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "gradcam++-general"
    display_name = "Grad-CAM++ (general)"
    summary = (
        "Grad-CAM++ (Chattopadhyay et al. 2018), general form: true second and third derivatives "
        "of any score; one forward + backward + a third-order forward pass of the head per "
        "channel and position (per channel after a global average pool), batched"
    )
    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        score: str = "probability",
        chunk_size: int | None = None,
        batch_size: int | None = None,
        max_directions: int | None = 50_000,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, **engine)
        if max_directions is not None:
            check_positive_int("max_directions", max_directions)
        self.max_directions = max_directions
        if score not in SCORE_KINDS:
            raise CamlensError(f"unknown score {score!r}: choose one of {', '.join(SCORE_KINDS)}")
        for option, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
            if value is not None:
                check_positive_int(option, value)
        self.score = score
        self.chunk_size = chunk_size if chunk_size is not None else batch_size if batch_size is not None else 64

    def options(self) -> dict[str, Any]:
        return {"score": self.score, "chunk_size": self.chunk_size, "max_directions": self.max_directions}

    def score_kind(self) -> str:
        return self.score

    def cost(self, channels: int, height: int, width: int) -> Cost:
        mean_only = self._reads_mean_only()
        directions = channels * (1 if mean_only else height * width)
        note = "third-order passes: one per channel" + ("" if mean_only else (
            " and position" if mean_only is False else
            " and position, or per channel where the head reads the layer through its mean only"))
        if self.max_directions is not None and directions > self.max_directions:
            note += f"; refused above max_directions={self.max_directions:,} (--max-directions raises it)"
        return Cost(1, 1, after=directions, at_most=mean_only is None, note=note)

    def _reads_mean_only(self) -> bool | None:
        """Whether the part of the model after the one named target layer reads it only through
        its spatial mean (one third-order pass per channel then serves every position); None
        where that is not known here (the default layer, several layers, a token layer)."""
        if self._layers is None or len(self._layers) != 1 or self.reshape is not None:
            return None
        (name,) = self._layers
        parts = cut(self.model, name)
        if parts is None:
            return False
        given = [node for node in parts[1].graph.nodes if node.op == "placeholder"]
        users = list(given[0].users) if given else []
        return bool(users) and all(_is_spatial_mean(node, given[0], self.model) for node in users)

    def weigh(self, context: Context) -> dict[str, Tensor]:
        if context.targets.units is not None:
            raise CamlensError(
                "gradcam++-general explains classes and target functions, not units: use gradcam++ for "
                "unit targets"
            )
        heads = {name: _head(self.model, context, name) for name in context.layers}
        total = sum(
            context.activations[name].shape[1] * (1 if mean_only else math.prod(a.shape[2:]))
            for name, (_, a, mean_only) in heads.items()
        )
        if self.max_directions is not None and total > self.max_directions:
            shapes = ", ".join(f"{name!r} {tuple(a.shape[1:])}{' (one per channel)' if mean_only else ''}"
                               for name, (_, a, mean_only) in heads.items())
            raise CamlensError(
                f"gradcam++-general would take {total:,} third-order passes of the model after the target layer "
                f"({shapes}: one per channel and position), more than max_directions={self.max_directions:,}: "
                "explain the layer right before the global pooling (one pass per channel there), use gradcam++ "
                "(the closed form), or raise max_directions (--max-directions on the command line)"
            )
        done = 0

        def advance(step: int) -> None:
            nonlocal done
            done += step
            if context.progress is not None:
                context.progress(done, total)

        weights = {}
        for name, (head, a, mean_only) in heads.items():
            try:
                with _composite_attention():
                    d2, d3 = diagonal_derivatives(
                        head, a, context.channels[name], mean_only=mean_only, chunk_size=self.chunk_size,
                        progress=advance,
                    )
            except CamlensError:
                raise
            except Exception as error:
                raise CamlensError(
                    f"gradcam++-general cannot differentiate the model after layer {name!r} in forward mode "
                    f"(torch.func.jvp): {first_line(error)}; use gradcam++, or a model whose operations "
                    "have forward-mode derivatives"
                ) from error
            weights[name] = gradcampp_weights(context.activations[name], context.gradients[name], d2, d3)
        return weights
